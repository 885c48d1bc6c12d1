"""Scattering from amorphous material in the beam (solvent, air, ice, ...):
the structure factor of one molecule from a .stol table, summed incoherently
over the molecules of the sample, rendered as photons per pixel on any
detector. This is what nanoBragg's companion nonBragg computes."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import physics as ph
from ._base import Model

# finest lookup grid: past this many cells a table falls back to a binary search
_MAX_CELLS = 1 << 22
# points per block of a render: small enough to stay in cache
_BLOCK_POINTS = 1 << 15


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
            raise ValueError("a .stol table needs at least 2 points and as many F values as stol values")
        if not (np.isfinite(s).all() and np.isfinite(f).all()) or (np.diff(s) == 0).any():
            raise ValueError("a .stol table needs finite values and no repeated stol")
        # a table whose stol goes back somewhere (shortwater.stol does) is read as
        # the original reads it: the interval of each point is found by walking
        # from the previous point's, in the original's pixel order
        self.monotonic = bool((np.diff(s) > 0).all())
        self._buffer("stol", s)
        self._buffer("F", f)
        origins, coeffs = ph.stol_cubic_coefficients(torch.as_tensor(s), torch.as_tensor(f))
        self._buffer("origins", origins)
        self._buffer("coeffs", coeffs)
        # interval lookup: a uniform grid finer than half the closest spacing
        # holds at most one table point per two cells, so the interval of a
        # cell's left edge is off by at most one; neighbours fix that
        self._buffer("upper", np.append(s, np.inf))
        self._buffer("lower", np.insert(s, 0, -np.inf))
        self.x0 = float(s[0])
        cells = int(math.ceil((s[-1] - s[0]) / (np.diff(s).min() / 2.0))) + 1 if self.monotonic else 0
        self.grid = 0 < cells <= _MAX_CELLS
        if self.grid:
            self.inv_h = (cells - 1) / float(s[-1] - s[0])
            edges = s[0] + np.arange(cells) / self.inv_h
            self.register_buffer("cell_interval", torch.as_tensor(
                np.searchsorted(s, edges, side="right"), dtype=torch.int64, device=self.device))
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
        if not self.grid:
            return torch.searchsorted(self.stol.to(stol), stol.detach(), right=True)
        x = stol.detach()
        cell = ((x - self.x0) * self.inv_h).clamp_(0, self.cell_interval.numel() - 1).to(torch.int64)
        j = self.cell_interval.index_select(0, cell.reshape(-1)).reshape(x.shape)
        up = self.upper.to(x).index_select(0, j.reshape(-1)).reshape(x.shape)
        low = self.lower.to(x).index_select(0, j.reshape(-1)).reshape(x.shape)
        return j + (x >= up).to(j.dtype) - (x < low).to(j.dtype)

    def _walk(self, stol: torch.Tensor) -> torch.Tensor:
        """The original's search: from the previous point's table position, up
        while stol is above the point there, then down while below (the table
        padded with two points at each end); the interval follows from where it stops."""
        padded = [-1e99, -1e98, *self.stol.double().cpu().tolist(), 1e98, 1e99]
        values = stol.detach().double().cpu().reshape(-1).tolist()
        top = len(padded) - 1
        out = np.empty(len(values), dtype=np.int64)
        n = 0
        for i, v in enumerate(values):
            while v > padded[n] and n < top:
                n += 1
            while v < padded[n] and n >= 2:
                n -= 1
            out[i] = n
        return torch.as_tensor(out - 1, device=stol.device).reshape(stol.shape).clamp_(0, len(padded) - 4)

    def structure_factor(self, stol: torch.Tensor) -> torch.Tensor:
        """F of one molecule at sin(theta)/lambda `stol` (1/A)."""
        return ph.amorphous_structure_factor(stol, self.origins.to(stol), self.coeffs.to(stol),
                                             self.interval(stol))

    # ------------------------------------------------------------------ render
    def forward(self, beam, detector, *, oversample: int = 1, polarization: bool = True,
                point_pixel: bool = False) -> torch.Tensor:
        """Photons per pixel, shape (panels, slow, fast); panels of different
        sizes: use `render_panel`."""
        sizes = {p.image_size for p in detector.panels}
        if len(sizes) > 1:
            raise ValueError("panels of different sizes: render them one by one with render_panel()")
        frames = detector.panel_frames(beam.incident())
        return torch.stack([self._render(beam, detector.panels[k], [t[k] for t in frames], oversample,
                                         polarization, point_pixel) for k in range(len(detector.panels))])

    def render_panel(self, beam, detector, panel: int, *, oversample: int = 1, polarization: bool = True,
                     point_pixel: bool = False) -> torch.Tensor:
        """Photons per pixel of one panel, shape (slow, fast)."""
        frames = detector.panel_frames(beam.incident())
        return self._render(beam, detector.panels[panel], [t[panel] for t in frames], oversample, polarization,
                            point_pixel)

    def _render(self, beam, panel, frame, oversample, polarization, point_pixel):
        dtype, device = self.dtype, self.device
        origin, fast, slow, normal = (v.to(dtype) for v in frame)
        os_ = max(int(oversample), 1)
        nf, ns = panel.fpixels, panel.spixels
        pf, ps = panel.pixel_size.to(dtype)[0], panel.pixel_size.to(dtype)[-1]
        # sub-pixel centres along fast and slow (mm from the origin)
        af = (torch.arange(nf * os_, dtype=dtype, device=device) + 0.5) * (pf / os_)
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
        stol_scale = 0.5 / (lam * lam)
        area = pf * ps
        molecules, fluence = self.molecule_count(), beam.fluence.to(dtype)

        def geometry(s):
            r2 = r2_s[s, None] + r2_f[None, :] + fs * as_[s, None] * af[None, :]
            return torch.rsqrt(r2)

        def stol_of(k, s, inv_r):
            cos2t = (inc_o[k] + inc_s[k, s, None] + inc_f[k][None, :]) * inv_r
            return cos2t, torch.sqrt((1.0 - cos2t).clamp(min=0.0) * stol_scale[k])

        walked = None
        if not self.monotonic:  # the walk visits pixel, sub-pixel row, sub-pixel, source in turn
            with torch.no_grad():
                inv_r = geometry(slice(None))
                every = torch.stack([stol_of(k, slice(None), inv_r)[1] for k in range(lam.numel())], -1)
                order = every.reshape(ns, os_, nf, os_, -1).permute(0, 2, 1, 3, 4)
                walked = self._walk(order.contiguous()).permute(0, 2, 1, 3, 4).reshape(every.shape)

        def rows(lo, hi):
            s = slice(lo, hi)
            inv_r = geometry(s)
            omega = 1e6 * inv_r * inv_r if point_pixel else area * close * inv_r * inv_r * inv_r
            total = 0.0
            for k in range(lam.numel()):
                cos2t, stol = stol_of(k, s, inv_r)
                if walked is None:
                    F = self.structure_factor(stol)
                else:
                    F = ph.amorphous_structure_factor(stol, self.origins.to(stol), self.coeffs.to(stol),
                                                      walked[s, :, k])
                term = ph.amorphous_scattering(F, molecules, fluence) * weights[k]
                if polarization:
                    e = (e_o[k] + e_s[k, s, None] + e_f[k][None, :]) * inv_r
                    term = term * ph.kahn_polarization(kahn, cos2t, e)
                total = total + term
            total = total * omega
            if os_ > 1:
                total = total.reshape(-1, os_, nf, os_).sum((1, 3))
            return total

        block = max(1, _BLOCK_POINTS // (nf * os_ * os_)) * os_
        starts = list(range(0, ns * os_, block))
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (origin, fast, slow, lam, kahn, weights,
                                                                           molecules, fluence))
        from .. import kernels
        pool = None if grad or device.type != "cpu" else kernels.eager_pool()
        if device.type != "cpu":
            image = rows(0, ns * os_)
        elif pool is not None:
            parts = [None] * len(starts)

            def fill(i):
                parts[i] = rows(starts[i], min(starts[i] + block, ns * os_))
            kernels.pool_map(pool, fill, range(len(starts)), lambda i: None)
            image = torch.cat(parts)
        else:
            image = torch.cat([rows(lo, min(lo + block, ns * os_)) for lo in starts])
        image = image * (self.scale / (lam.numel() * os_ * os_))
        if panel.mask is not None:
            image = image * panel.mask.to(dtype)
        return image
