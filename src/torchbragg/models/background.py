"""Scattering from amorphous material in the beam (solvent, air, ice, ...):
the structure factor of one molecule from a .stol table, summed incoherently
over the molecules of the sample, rendered as photons per pixel on any
detector. This is what nanoBragg's companion nonBragg computes."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .. import physics as ph
from ..errors import InputError
from ._base import Model

# finest lookup grid: past this many cells a table falls back to a binary search
_MAX_CELLS = 1 << 18
# bytes per block of a render: small enough to stay in cache
_BLOCK_BYTES = 1 << 17


def _compiled():
    """The table lookups of _noise.c, or None when not built."""
    import ctypes as ct

    from ..noise import LIBRARY as lib
    if lib is None or not hasattr(lib, "tb_stol_intervals_f64"):
        return None
    p, lg = ct.c_void_p, ct.c_long
    lib.tb_stol_walk.restype = None
    lib.tb_stol_walk.argtypes = [p, lg, p, lg, p]
    for name in ("tb_stol_cells_f32", "tb_stol_cells_f64"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [p, lg, p, p, lg, p]
    for name in ("tb_stol_intervals_f32", "tb_stol_intervals_f64"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [p, lg, p, p, p, p]
    return lib


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _compiled_for(t: torch.Tensor) -> str | None:
    """The suffix of the compiled lookup for `t`, or None where the torch code runs
    (no helpers, another device or dtype, or a gradient to carry)."""
    if _C is None or t.device.type != "cpu" or (t.requires_grad and torch.is_grad_enabled()):
        return None
    return _SUFFIX.get(t.dtype)


_C = _compiled()


@contextlib.contextmanager
def _one_thread():
    """Small tensor work on one thread: on a busy machine handing a tiny op to
    a team of threads costs far more than the op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Background(Model):
    """An amorphous sample: a .stol table (buffers `stol`, 1/A, and `F`, the
    structure factor of one molecule) and the sample, a box `thickness` (mm,
    along the beam) x `size` (height, width, mm) of a material of `density`
    (g/cm^3) and `molecular_weight` (g/mol), or a fixed number of `molecules`
    (then the box does not matter). `scale` multiplies the result. All of
    them are parameters; the image is linear in scale, thickness, the sizes
    and density (or the molecule count)."""

    def __init__(self, stol, F, *, thickness=0.1, size=(0.1, 0.1), density=1.0, molecular_weight=18.0,
                 molecules=None, scale=1.0, dtype=torch.float32, device="cpu"):
        super().__init__(dtype, device)
        s = np.asarray(stol, dtype=np.float64).reshape(-1)
        f = np.asarray(F, dtype=np.float64).reshape(-1)
        if s.size < 2 or s.size != f.size:
            raise InputError("a .stol table needs at least 2 points and as many F values as stol values")
        if not (np.isfinite(s).all() and np.isfinite(f).all()) or (np.diff(s) == 0).any():
            raise InputError("a .stol table needs finite values and no repeated stol")
        # a table whose stol goes back somewhere (shortwater.stol does) is read as
        # the original reads it: the interval of each point is found by walking
        # from the previous point's, in the original's pixel order
        self.monotonic = bool((np.diff(s) > 0).all())
        self._buffer("stol", s)
        self._buffer("F", f)
        with _one_thread():
            origins, coeffs = ph.stol_cubic_coefficients(torch.as_tensor(s), torch.as_tensor(f))
        self._buffer("origins", origins)
        self._buffer("coeffs", coeffs)
        # interval lookup on a uniform grid of cells at most half the closest
        # spacing: at most one table point per cell (see `_grid`)
        self.x0 = float(s[0])
        self.cells = int(math.ceil((s[-1] - s[0]) / (np.diff(s).min() / 2.0))) + 1 if self.monotonic else 0
        self.inv_h = (self.cells - 1) / float(s[-1] - s[0]) if self.cells else 0.0
        self._grids: dict = {}
        self._param("scale", scale)
        self._param("thickness", thickness)
        self._param("size", size)
        self._param("density", density)
        self._param("molecular_weight", molecular_weight)
        self.counts_molecules = molecules is not None
        if self.counts_molecules:
            self._param("molecules", molecules)

    @classmethod
    def from_stol(cls, path, stol_per_column: float = 1.0, **kw) -> "Background":
        """A background from a .stol file (see `torchbragg.io.stol`); keywords
        as the constructor's. Warnings about the file are in `.warnings`."""
        from ..io.stol import read_stol
        table = read_stol(path, stol_per_column)
        bg = cls(table.stol, table.F, **kw)
        bg.warnings = table.warnings
        return bg

    # ------------------------------------------------------------------ physics
    def molecule_count(self) -> torch.Tensor:
        if self.counts_molecules:
            return self.molecules
        return ph.sample_molecules(self.thickness, self.size[0], self.size[1], self.density, self.molecular_weight)

    def interval(self, stol: torch.Tensor) -> torch.Tensor:
        """Index of the table interval holding each stol (number of table points <= stol;
        for a table that goes back, the original's walk over the points in order)."""
        if not self.monotonic:
            return self._walk(stol)
        return torch.searchsorted(self.stol.to(stol), stol.detach(), right=True)

    def _cell(self, stol: torch.Tensor) -> torch.Tensor:
        """Position on the cell grid; the same operations for table points and
        queries, so a point's cell never passes a table point's (both monotonic)."""
        return stol * self.inv_h - self.x0 * self.inv_h

    def _grid(self, dtype, device):
        """Per cell: the cell position of the table point inside it (+inf: none), and for each side
        of it the interval's cubic re-expanded in t = cell position - cell index,
        packed 4 values a row; None when the grid would be too fine or the dtype
        cannot be packed."""
        key = (dtype, str(device))
        if key not in self._grids:
            with _one_thread():
                self._grids[key] = self._build_grid(dtype, device)
        return self._grids[key]

    def _build_grid(self, dtype, device):
        if not 0 < self.cells <= _MAX_CELLS or dtype not in (torch.float32, torch.float64):
            return None
        cells = self.cells
        knots = self.stol.detach().to("cpu", dtype)
        at = self._cell(knots).clamp(0, cells - 1).floor().long()
        if not bool((at[1:] > at[:-1]).all()):
            return None
        knot_in = torch.full((cells,), math.inf, dtype=dtype)
        knot_in[at] = self._cell(knots)
        left = torch.searchsorted(at, torch.arange(cells), right=False)  # table points in earlier cells
        interval = torch.stack([left, (left + 1).clamp(max=knots.numel())], 1).reshape(-1)  # (cell, side)
        origins, coeffs = self.origins.detach().cpu().double(), self.coeffs.detach().cpu().double()
        h = 1.0 / self.inv_h
        # u = x - origin = d + h t with x = (c + t + x0 / h) h
        c = torch.arange(cells, dtype=torch.float64).repeat_interleave(2)
        d = (c + self.x0 * self.inv_h) * h - origins[interval]
        a = coeffs[interval]  # (cells * 2, 4) in u
        b = torch.stack([a[:, 0] + d * (a[:, 1] + d * (a[:, 2] + d * a[:, 3])),
                         h * (a[:, 1] + d * (2 * a[:, 2] + 3 * d * a[:, 3])),
                         h * h * (a[:, 2] + 3 * d * a[:, 3]),
                         h ** 3 * a[:, 3]], 1)
        packed = b.to(dtype).contiguous().view(torch.complex128)  # one gather fetches a row
        return dict(knot_in=knot_in.to(device), packed=packed.to(device))

    def structure_factor(self, stol: torch.Tensor) -> torch.Tensor:
        """F of one molecule at sin(theta)/lambda `stol` (1/A)."""
        grid = self._grid(stol.dtype, stol.device) if self.monotonic else None
        if grid is None:
            return self._from_intervals(stol, self.interval(stol))
        return self._from_cells(self._cell(stol), grid)

    def _from_intervals(self, stol, interval):
        suffix = _compiled_for(stol)
        if suffix:  # the same operations in one compiled pass
            x, j = stol.contiguous(), interval.to(torch.int64).contiguous()
            origins, coeffs = self.origins.to(stol).contiguous(), self.coeffs.to(stol).contiguous()
            out = torch.empty_like(x)
            getattr(_C, "tb_stol_intervals_" + suffix)(x.data_ptr(), x.numel(), j.data_ptr(), origins.data_ptr(),
                                                        coeffs.data_ptr(), out.data_ptr())
            return out
        j = interval.reshape(-1)
        u = stol - self.origins.to(stol).index_select(0, j).reshape(stol.shape)
        return ph.amorphous_structure_factor(u, self.coeffs.to(stol).index_select(0, j).reshape(*stol.shape, 4))

    def _from_cells(self, y, grid):
        """F at cell positions `y` (see `_cell`). A point within rounding of a
        table point may take the cubic of the interval on its other side: both
        pass through that point."""
        suffix = _compiled_for(y)
        if suffix:  # the same operations in one compiled pass
            y = y.contiguous()
            out = torch.empty_like(y)
            getattr(_C, "tb_stol_cells_" + suffix)(y.data_ptr(), y.numel(), grid["knot_in"].data_ptr(),
                                                    grid["packed"].data_ptr(), self.cells, out.data_ptr())
            return out
        c = y.detach().clamp(0, self.cells - 1).floor_()
        index = c.to(torch.int32).reshape(-1)
        side = y.detach().reshape(-1) >= grid["knot_in"].index_select(0, index)
        row = index * 2 + side.to(torch.int32)
        coeffs = grid["packed"].index_select(0, row).view(y.dtype).reshape(*y.shape, 4)
        return ph.amorphous_structure_factor(y - c, coeffs)

    def _walk(self, stol: torch.Tensor) -> torch.Tensor:
        """The original's search: from the previous point's table position, up
        while stol is above the point there, then down while below (the table
        padded with two points at each end); the interval follows from where it
        stops. Where the points at or below stol are a leading run of the
        table, every start stops at its end, so only the other points are walked."""
        padded = np.array([-1e99, -1e98, *self.stol.double().cpu().tolist(), 1e98, 1e99])
        v = np.ascontiguousarray(stol.detach().double().cpu().reshape(-1).numpy())
        if _C is not None:  # the walk itself, compiled
            out = np.empty(v.size, dtype=np.int64)
            _C.tb_stol_walk(padded.ctypes.data, padded.size, v.ctypes.data, v.size, out.ctypes.data)
            return torch.as_tensor(out - 1, device=stol.device).reshape(stol.shape).clamp_(0, len(padded) - 4)
        top = len(padded) - 1
        rising = np.maximum.accumulate(padded)
        after = np.minimum.accumulate(padded[::-1])[::-1]  # smallest value from here on
        at_or_below = np.searchsorted(rising, v, side="right")
        below = np.searchsorted(rising, v, side="left")
        clean = (after[np.minimum(at_or_below, top)] > v) & (after[np.minimum(below, top)] >= v)
        out = at_or_below - 1
        p = padded.tolist()
        todo = np.flatnonzero(~clean)
        k = 0
        while k < len(todo):
            i = int(todo[k])
            n, x = (int(out[i - 1]) if i else 0), float(v[i])
            while x > p[n] and n < top:
                n += 1
            while x < p[n] and n >= 2:
                n -= 1
            out[i] = n
            # the points right after it that sit between table points n and n + 1 stay there
            nxt = todo[k + 1:k + 513]
            keep = (nxt == i + 1 + np.arange(len(nxt))) & (padded[n] <= v[nxt]) & (v[nxt] < padded[min(n + 1, top)])
            run = len(nxt) if keep.all() else int(np.argmin(keep))
            out[nxt[:run]] = n
            k += 1 + run
        return torch.as_tensor(out - 1, device=stol.device).reshape(stol.shape).clamp_(0, len(padded) - 4)

    # ------------------------------------------------------------------ render
    def forward(self, beam, detector, *, oversample: int = 1, polarization: bool = True,
                point_pixel: bool = False, sensor_depth=None, curved: bool = False) -> torch.Tensor:
        """Photons per pixel, shape (panels, slow, fast); panels of different
        sizes: use `render_panel`. `sensor_depth` (mm): count only the photons
        a sensor of that depth absorbs (with each panel's mu); None: all.
        `curved`: the original's curved detector (every pixel at the beam
        distance, its flat coordinates turned into angles)."""
        sizes = {p.image_size for p in detector.panels}
        if len(sizes) > 1:
            raise ValueError("panels of different sizes: render them one by one with render_panel()")
        pool = self._pool()
        with _one_thread():
            frames = detector.panel_frames(beam.incident())
            images = [self._render(beam, detector.panels[k], [t[k] for t in frames], oversample, polarization,
                                   point_pixel, pool, sensor_depth, curved) for k in range(len(detector.panels))]
            return images[0].unsqueeze(0) if len(images) == 1 else torch.stack(images)

    def render_panel(self, beam, detector, panel: int, *, oversample: int = 1, polarization: bool = True,
                     point_pixel: bool = False, sensor_depth=None, curved: bool = False) -> torch.Tensor:
        """Photons per pixel of one panel, shape (slow, fast)."""
        pool = self._pool()
        with _one_thread():
            frames = detector.panel_frames(beam.incident())
            return self._render(beam, detector.panels[panel], [t[panel] for t in frames], oversample, polarization,
                                point_pixel, pool, sensor_depth, curved)

    def _pool(self):
        """Threads that render blocks side by side (CPU, several torch threads); the
        rest of a render runs on one thread."""
        from .. import kernels
        return kernels.eager_pool() if self.device.type == "cpu" else None

    def _render(self, beam, panel, frame, oversample, polarization, point_pixel, pool, sensor_depth, curved):
        dtype, device = self.dtype, self.device
        origin, fast, slow, normal = (v.to(dtype) for v in frame)
        os_ = max(int(oversample), 1)
        nf, ns = panel.fpixels, panel.spixels
        pf, ps = panel.pixel_size.to(dtype)[0], panel.pixel_size.to(dtype)[-1]
        # sub-pixel centres along fast and slow (mm from the origin); along fast
        # sub-pixel major, so that summing a pixel's sub-pixels adds whole rows
        sub = torch.arange(os_, device=device)[:, None] + os_ * torch.arange(nf, device=device)[None, :]
        af = (sub.reshape(-1).to(dtype) + 0.5) * (pf / os_)
        as_ = (torch.arange(ns * os_, dtype=dtype, device=device) + 0.5) * (ps / os_)
        incident, lam = beam.sources()
        incident, lam = incident.to(dtype), lam.to(dtype)
        weights = beam.weights()
        weights = torch.ones_like(lam) if weights is None else weights.to(dtype)
        e_axis = beam.e_vector().to(dtype)
        e_in = ph.unitize(ph.cross(incident, ph.unitize(ph.cross(e_axis.expand_as(incident), incident))))
        kahn = beam.kahn_factor().to(dtype)
        close = ph.dot(origin, normal)
        # |position|^2 and the projections on each source's beam and E-vector,
        # separable in (slow, fast) except the fast.slow cross term
        r2_f = af * af * ph.dot(fast, fast) + 2.0 * af * ph.dot(origin, fast)
        r2_s = ph.dot(origin, origin) + as_ * as_ * ph.dot(slow, slow) + 2.0 * as_ * ph.dot(origin, slow)
        fs = 2.0 * ph.dot(fast, slow)
        inc_f, inc_s = af[None, :] * (incident @ fast)[:, None], as_[None, :] * (incident @ slow)[:, None]
        inc_o = incident @ origin
        e_f, e_s = af[None, :] * (e_in @ fast)[:, None], as_[None, :] * (e_in @ slow)[:, None]
        e_o = e_in @ origin
        # sin^2(theta)/lambda^2 = (1 - cos 2theta) / (2 lambda^2)
        stol_scale = 0.5 / (lam * lam)
        grid = self._grid(dtype, device) if self.monotonic else None
        if grid is not None:  # straight to cell positions: y = stol inv_h - x0 inv_h
            stol_scale = stol_scale * (self.inv_h * self.inv_h)
        shift = self.x0 * self.inv_h
        molecules, fluence = self.molecule_count(), beam.fluence.to(dtype)
        absorbing = None if sensor_depth is None else panel.mu.to(dtype) * sensor_depth / close
        inc_of = inc_f + inc_o[:, None]
        e_of = e_f + e_o[:, None]
        fs_s = fs * as_

        if curved:  # every pixel at the beam distance: its flat lab y and z become angles, as in the original
            b = beam.incident().to(dtype)
            mount = getattr(panel.frame, "geometry", None)  # a DistanceMount knows the original's distance
            distance = mount(beam.incident())["distance"].to(dtype) if mount else close / ph.dot(b, normal)
            start = distance * b

        def geometry(s):
            """(1/R, positions (rows, cols, 3) where the detector is curved, else None)."""
            if not curved:
                r2 = torch.addcmul(r2_s[s, None] + r2_f[None, :], fs_s[s, None], af[None, :])
                return torch.rsqrt(r2), None
            pos = origin + as_[s, None, None] * slow + af[None, :, None] * fast
            dist = ph.norm(start)
            pos = ph.rotate(ph.rotation_axis_angle(fast, pos[..., 2] / dist),
                            ph.rotate(ph.rotation_axis_angle(slow, pos[..., 1] / dist), start))
            return torch.rsqrt(ph.dot(pos, pos)), pos

        def along(k, s, where, vectors, flat_s, flat_of):
            """Each position's component along source k's vector, over R."""
            inv_r, pos = where
            return (flat_s[k, s, None] + flat_of[k][None, :] if pos is None else pos @ vectors[k]) * inv_r

        def stol_of(k, s, where):
            cos2t = along(k, s, where, incident, inc_s, inc_of)
            return cos2t, torch.sqrt((stol_scale[k] - stol_scale[k] * cos2t).clamp(min=0.0))

        points = _BLOCK_BYTES // torch.finfo(dtype).bits * 8
        block = max(1, points // (nf * os_ * os_)) * os_
        starts = list(range(0, ns * os_, block))
        grad = torch.is_grad_enabled() and (any(t.requires_grad for t in (origin, fast, slow, lam, kahn, weights,
                                                                            molecules, fluence))
                                            or any(p.requires_grad for p in self.parameters()))
        from .. import kernels
        pool = None if grad or device.type != "cpu" else pool

        def each_block(fn):
            """fn(lo) for every block, side by side on the pool's threads where there is one."""
            if pool is None:
                for lo in starts:
                    fn(lo)
            else:
                kernels.pool_map(pool, fn, starts, lambda lo: None)

        walked = every = None
        if not self.monotonic:  # the walk visits pixel, sub-pixel row, sub-pixel, source in turn
            every = torch.empty(ns * os_, nf * os_, lam.numel(), dtype=dtype, device=device)

            def stols(lo):
                s = slice(lo, min(lo + block, ns * os_))
                where = geometry(s)
                for k in range(lam.numel()):
                    every[s, :, k] = stol_of(k, s, where)[1]
            with torch.no_grad():
                each_block(stols)
                order = every.reshape(ns, os_, os_, nf, -1).permute(0, 3, 1, 2, 4)
                walked = self._walk(order.contiguous()).permute(0, 2, 3, 1, 4).reshape(every.shape)
            if grad:
                every = None  # the render's stol carries the gradient: computed again

        def rows(lo, hi):
            s = slice(lo, hi)
            where = geometry(s)
            inv_r = where[0]
            total = None
            for k in range(lam.numel()):
                if every is None:
                    cos2t, x = stol_of(k, s, where)
                else:  # the walk's values, the same operations
                    cos2t, x = along(k, s, where, incident, inc_s, inc_of), every[s, :, k]
                if grid is not None:
                    F = self._from_cells(x - shift if shift else x, grid)
                elif walked is not None:
                    F = self._from_intervals(x, walked[s, :, k])
                else:
                    F = self.structure_factor(x)
                term = ph.amorphous_scattering(F, molecules * weights[k], fluence)
                if polarization:
                    term = term * ph.kahn_polarization(kahn, cos2t, along(k, s, where, e_in, e_s, e_of))
                total = term if total is None else total + term
            total = total * torch.pow(inv_r, 2 if point_pixel else 3)  # solid angle, less its constant
            if absorbing is not None:  # photons absorbed along a path depth / cos = depth R / close
                total = total * -torch.expm1(-absorbing / inv_r)
            if os_ > 1:
                total = total.reshape(-1, os_ * os_, nf).sum(1)
            # the constants and the mask while the block is in cache
            total = total * scale
            return total if mask is None else total * mask[lo // os_:hi // os_]

        omega = 1e6 if point_pixel else pf * ps * close  # pixel area x obliquity, and R^3 above
        scale = omega * self.scale / (lam.numel() * os_ * os_)
        mask = None if panel.mask is None else panel.mask.to(dtype)
        if device.type != "cpu":
            image = rows(0, ns * os_)
        elif not grad:
            image = torch.empty(ns, nf, dtype=dtype, device=device)

            def fill(lo):
                image[lo // os_:min(lo + block, ns * os_) // os_] = rows(lo, min(lo + block, ns * os_))
            each_block(fill)
        else:
            image = torch.cat([rows(lo, min(lo + block, ns * os_)) for lo in starts])
        return image
