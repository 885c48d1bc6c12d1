"""The simulator: composes crystal, beam and detector into the expected
photons per pixel, in chunks of pixels so memory stays bounded.

Per pixel the sum runs over sensor layers, sub-pixels, sources, spindle steps
and mosaic domains, all vectorised; only the pixel axis is chunked.
"""

from __future__ import annotations

import math
import os

import torch
from torch.utils.checkpoint import checkpoint

from . import physics as ph
from .models import Beam, Crystal, Detector

# elements of the (pixel, layer, sub-pixel, source, orientation) grid per chunk
DEFAULT_CHUNK_ELEMENTS = int(os.environ.get("TORCHBRAGG_CHUNK", 1 << 21))


def recommended_oversample(crystal: Crystal, beam: Beam, detector: Detector) -> int:
    """The original's automatic oversampling: three sub-pixels per reciprocal
    pixel across the largest crystal dimension."""
    with torch.no_grad():
        lengths = torch.linalg.norm(crystal.real_vectors(), dim=-1).cpu().tolist()
        n_cells = crystal.N.double().cpu().tolist()
        xtal_max = max(length * 1e-10 * n for length, n in zip(lengths, n_cells))
        distance = float(detector.geometry(beam.beam_direction, torch.float64)["distance"])
        recip_px = float(beam.wavelength.double()) / 1e10 * distance / (float(detector.pixel_size.double()) / 1000.0)
    n = int(math.ceil(3.0 * xtal_max / recip_px))
    return max(n, 1)


def _sincg_sq_product_inplace(hkl: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Same value as the differentiable grating transform in `_lattice_sq`,
    computed in place for renders that need no gradient (2-3x faster)."""
    # distance from the nearest node, nudged by 1e-30 so that a point exactly on
    # a node gives sin(N x)/sin(x) = N instead of 0/0
    x = torch.round(hkl).sub_(hkl).mul_(-math.pi).add_(1e-30)
    s = torch.sin(x)
    x.mul_(n).sin_().div_(s)
    f = x.prod(-1)
    return f.mul_(f)


class Simulator:
    """Renders the float image of a crystal, beam and detector."""

    def __init__(self, crystal: Crystal, beam: Beam, detector: Detector, chunk_elements: int | None = None,
                 recommended: int | None = None):
        self.crystal, self.beam, self.detector = crystal, beam, detector
        self.recommended_oversample = recommended or recommended_oversample(crystal, beam, detector)
        if detector.oversample is None or detector.oversample <= 0:
            detector.oversample = self.recommended_oversample
            self.oversample_auto = True
        else:
            self.oversample_auto = False
        self.chunk_elements = chunk_elements or DEFAULT_CHUNK_ELEMENTS

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_args(cls, argv: list[str], dtype=None, device=None, **kw) -> "Simulator":
        from .build import build_from_args
        return build_from_args(argv, dtype=dtype, device=device, **kw)[0]

    @classmethod
    def from_config(cls, cfg, dtype=None, device=None, **kw) -> "Simulator":
        from .build import build_from_config
        return build_from_config(cfg, dtype=dtype, device=device, **kw)[0]

    @property
    def dtype(self):
        return self.detector.dtype

    @property
    def device(self):
        return self.detector.device

    def n_sources(self) -> int:
        return self.beam.sources()[1].numel()

    def steps(self) -> int:
        os_ = self.detector.oversample
        return self.n_sources() * self.crystal.mosaic_domains * self.crystal.phisteps * os_ * os_

    def active_pixels(self) -> torch.Tensor:
        """Flat indices of pixels inside the ROI and not masked."""
        det = self.detector
        xmin, xmax, ymin, ymax = det.roi
        fs = torch.arange(det.fpixels, device=det.device)
        ss = torch.arange(det.spixels, device=det.device)
        keep = ((fs >= xmin) & (fs <= xmax)).unsqueeze(0) & ((ss >= ymin) & (ss <= ymax)).unsqueeze(1)
        if det.mask is not None:
            keep = keep & torch.as_tensor(det.mask.reshape(det.spixels, det.fpixels) != 0, device=det.device)
        return torch.nonzero(keep.flatten(), as_tuple=False).squeeze(1)

    # ------------------------------------------------------------------ render
    def render(self, progress=None) -> torch.Tensor:
        """The float image, shape (spixels, fpixels), photons per pixel.
        `progress(done, total)` is called after every chunk of pixels."""
        det, beam, xtal = self.detector, self.beam, self.crystal
        geo = det.geometry(beam.beam_direction)
        incident, lam = beam.sources()
        orient = xtal.lattice_orientations()
        recip = xtal.reciprocal_vectors().to(self.dtype)
        fluence = beam.effective_fluence()
        i_bg = ph.water_background(fluence, beam.water_size)
        scale = ph.R_E_SQR * fluence / self.steps()

        per_pixel = det.thicksteps * det.oversample ** 2 * incident.shape[0] * orient.shape[0]
        budget = self.chunk_elements // (16 if xtal.interpolate else 1)
        chunk = max(1, budget // max(per_pixel, 1))
        pixels = self.active_pixels()
        params = (geo, incident, lam, orient, recip, i_bg, scale)
        use_ckpt = torch.is_grad_enabled() and pixels.numel() > chunk and any(
            t.requires_grad for m in (det, beam, xtal) for t in m.parameters().values())
        values = []
        for start in range(0, pixels.numel(), chunk):
            idx = pixels[start:start + chunk]
            if use_ckpt:
                values.append(checkpoint(self._pixels, idx, *params, use_reentrant=False))
            else:
                values.append(self._pixels(idx, *params))
            if progress is not None:
                progress(min(start + chunk, pixels.numel()), pixels.numel())
        flat = torch.zeros(det.spixels * det.fpixels, dtype=self.dtype, device=self.device)
        if values:
            flat = flat.index_put((pixels,), torch.cat(values))
        return flat.reshape(det.spixels, det.fpixels)

    def _positions(self, idx, geo):
        """Sub-pixel positions (P, layers, sub-pixels, 3) in metres."""
        det = self.detector
        t = lambda v: torch.as_tensor(v, dtype=self.dtype, device=self.device)
        os_ = det.oversample
        px = det.pixel_size * 1e-3
        sub = px / os_
        fpix = (idx % det.fpixels).to(self.dtype)
        spix = torch.div(idx, det.fpixels, rounding_mode="floor").to(self.dtype)
        k = t(list(range(os_)))
        fdet = sub * (fpix[:, None] * os_ + k) + sub / 2  # (P, os)
        sdet = sub * (spix[:, None] * os_ + k) + sub / 2
        odet = det.layer_step() * t(list(range(det.thicksteps)))  # (T,)
        # (fast, slow, depth) coordinates of every sub-pixel, then one product with the frame
        coords = torch.stack(torch.broadcast_tensors(fdet[:, None, None, :], sdet[:, None, :, None],
                                                     odet[None, :, None, None]), -1)
        frame = torch.stack([geo["fdet"], geo["sdet"], geo["odet"]])
        pos = (coords.reshape(-1, 3) @ frame + geo["pix0"]).reshape(coords.shape)
        pos = pos.reshape(idx.numel(), det.thicksteps, os_ * os_, 3)
        if det.curved:
            # keep every pixel at the beam distance: flat coordinates become angles
            dist = geo["distance"]
            start = dist * geo["beam"]
            rot_s = ph.rotation_axis_angle(geo["sdet"], pos[..., 1] / dist)
            rot_f = ph.rotation_axis_angle(geo["fdet"], pos[..., 2] / dist)
            pos = ph.rotate(rot_f, ph.rotate(rot_s, start))
        return pos

    def _pixels(self, idx, geo, incident, lam, orient, recip, i_bg, scale):
        det, beam = self.detector, self.beam
        P, T = idx.numel(), det.thicksteps
        running = det.oversample_thick or det.oversample_polar or det.oversample_omega
        pos = self._positions(idx, geo)
        airpath = torch.linalg.vector_norm(pos, dim=-1)  # (P,T,Sub)
        diffracted = pos / airpath.unsqueeze(-1)
        d = diffracted.unsqueeze(-2)  # (P,T,Sub,1,3)
        valid = None
        if det.dmin > 0:
            # |d - i| of unit vectors from their dot product: no (P,T,Sub,Src,3) array needed
            cos2t = (diffracted.reshape(-1, 3) @ incident.T).reshape(*diffracted.shape[:-1], -1)
            stol = 0.5 * torch.sqrt(torch.clamp(2.0 - 2.0 * cos2t, min=0.0)) / lam
            valid = ~((stol > 0) & (det.dmin > 0.5 / stol))

        # Per-pixel factors; the original evaluates them once per pixel unless
        # an -oversample_* switch asks for every sub-pixel, so compute only what is used.
        full_omega = running and det.oversample_omega
        ap = airpath if full_omega else airpath[:, :1, :1]
        omega = ph.solid_angle(det.pixel_size * 1e-3, ap, geo["close_distance"], det.point_pixel)
        full_thick = running and det.oversample_thick
        if det.has_sensor:
            layer = torch.arange(T, dtype=self.dtype, device=self.device)[None, :, None]
            dd = diffracted if full_thick else diffracted[:, :, :1]
            capture = ph.capture_fraction(layer, det.layer_step(), det.mu(), ph.dot(dd, geo["odet"]))
        else:
            capture = torch.ones((P, T, 1), dtype=self.dtype, device=self.device)
        full_polar = (running and det.oversample_polar) or valid is not None
        if beam.nopolar:
            polar = torch.ones((P, 1, 1, 1), dtype=self.dtype, device=self.device)
        else:
            axis = torch.as_tensor(beam.polar_direction, dtype=self.dtype, device=self.device)
            dp = d if full_polar else d[:, :1, :1]
            inc = incident if full_polar else incident[:1]
            polar = ph.polarization_factor(beam.polarization, inc, dp, axis)

        hkl = self._miller_indices(diffracted, incident, lam, orient)  # (P,T,Sub,Src,M,3)
        intensity = self._lattice_sq(hkl, recip)  # (P,T,Sub,Src,M)
        f_sq = self._structure_factor_sq(hkl)
        if valid is not None:
            intensity = intensity * valid.unsqueeze(-1)

        if running:
            total = self._running_product(intensity * f_sq, capture, polar, omega, valid, i_bg)
        elif torch.is_tensor(f_sq) and f_sq.dim() > 0:
            total = i_bg + (intensity * f_sq).reshape(P, -1).sum(-1)
        else:
            total = i_bg + intensity.reshape(P, -1).sum(-1) * f_sq

        result = scale * total
        if not det.oversample_thick:
            result = result * capture[:, -1, 0]  # the last layer's value, as the original
        if not det.oversample_polar:
            result = result * self._first_polar(polar, valid)
        if not det.oversample_omega:
            result = result * omega[:, 0, 0]
        return result

    @staticmethod
    def _miller_indices(diffracted, incident, lam, orient):
        """h = a . (d - i) / lambda for every sub-pixel, source and orientation,
        as one product of the diffracted rays with the cell vectors (the
        incident part is the same for every pixel)."""
        n_src, n_orient = lam.shape[0], orient.shape[0]
        cells = orient.reshape(-1, 3).T  # (3, M*3)
        per_source = cells.unsqueeze(0) / lam[:, None, None]  # (Src, 3, M*3)
        offset = (incident.unsqueeze(1) @ per_source).reshape(n_src, n_orient, 3)
        hkl = diffracted.reshape(-1, 3) @ per_source.permute(1, 0, 2).reshape(3, -1)
        hkl = hkl.reshape(*diffracted.shape[:-1], n_src, n_orient, 3)
        if hkl.requires_grad or offset.requires_grad:
            return hkl - offset
        return hkl.sub_(offset)

    def _first_polar(self, polar, valid):
        """The polarization factor of the first sub-pixel and source that was
        not culled by -dmin (the original computes it once per pixel)."""
        flat = polar.reshape(polar.shape[0], -1)
        if valid is None:
            return flat[:, 0]
        v = valid.reshape(valid.shape[0], -1)
        first = torch.argmax(v.to(torch.uint8), dim=1)
        return flat.gather(1, first[:, None]).squeeze(1) * v.any(dim=1)

    def _running_product(self, intensity, capture, polar, omega, valid, i_bg):
        """The original multiplies the running pixel sum by each per-sub-pixel
        factor after every term when an -oversample_* switch is on; this is the
        closed form of that recurrence."""
        det = self.detector
        P, T, Sub, Src, M = intensity.shape
        w = torch.ones((P, T, Sub, Src), dtype=self.dtype, device=self.device)
        if det.oversample_thick:
            w = w * capture.unsqueeze(-1)
        if det.oversample_polar:
            w = w * polar
        if det.oversample_omega:
            w = w * omega.unsqueeze(-1)
        if valid is not None:
            w = torch.where(valid, w, torch.ones_like(w))
        exponents = torch.arange(M, 0, -1, dtype=self.dtype, device=self.device)  # M .. 1
        inner = (intensity * w.unsqueeze(-1) ** exponents).sum(-1).reshape(P, -1)  # (P, G)
        whole = (w ** M).reshape(P, -1)
        after = torch.flip(torch.cumprod(torch.flip(whole, [1]), 1), [1])  # prod over g' >= g
        after_excl = torch.cat([after[:, 1:], torch.ones_like(after[:, :1])], 1)
        return i_bg * after[:, 0] + (inner * after_excl).sum(-1)

    # ------------------------------------------------------------------ crystal terms
    def _lattice_sq(self, hkl, recip):
        """Squared lattice transform F_latt^2 for the crystal's spot shape."""
        xtal = self.crystal
        n = xtal.N
        if xtal.shape == "square":
            if not (hkl.requires_grad or n.requires_grad):
                return _sincg_sq_product_inplace(hkl, n)
            frac = hkl - torch.round(hkl)
            x = math.pi * frac
            small = torch.abs(frac) < 1e-6
            ratio = torch.sin(n * x) / torch.where(small, torch.ones_like(x), torch.sin(x))
            # second-order Taylor term: keeps the curvature (and gradgrad) right at exact peaks
            sq = torch.where(small, n * n * (1 - (n * n - 1) * x * x / 3), ratio * ratio)
            return sq[..., 0] * sq[..., 1] * sq[..., 2]
        delta = hkl - torch.ceil(hkl - 0.5)
        nnn = n[0] * n[1] * n[2]
        if xtal.shape == "round":
            hrad_sq = (delta * delta * n * n).sum(-1)
            rs = hrad_sq * xtal.fudge
            arg = math.pi * torch.sqrt(torch.clamp(rs, min=1e-30))
            # at the peak the clamp would zero the curvature: use the series in rs itself
            f = nnn * ph.ROUND_XTAL_SCALE * torch.where(rs < 1e-12, 1.0 - math.pi ** 2 * rs / 10.0, ph.sinc3(arg))
            return f * f
        dstar = delta @ recip  # 1/Angstrom
        rad_sq = (dstar * dstar).sum(-1) * nnn * nnn
        if xtal.shape == "gauss":
            f = nnn * torch.exp(-(rad_sq / 0.63 * xtal.fudge))
        else:
            f = nnn * (rad_sq * xtal.fudge < 0.3969).to(hkl.dtype)
        return f * f

    def _structure_factor_sq(self, hkl):
        xtal = self.crystal
        if xtal.Fhkl is None:
            return xtal.default_F * xtal.default_F
        grid = xtal.Fhkl
        hmin, kmin, lmin = xtal._hkl_min
        dims = grid.shape
        mins = torch.tensor([hmin, kmin, lmin], dtype=hkl.dtype, device=hkl.device)
        size = torch.tensor(dims, dtype=hkl.dtype, device=hkl.device)
        flat = grid.reshape(-1)
        strides = (dims[1] * dims[2], dims[2], 1)
        if not xtal.interpolate:
            # one layer of default_F around the table: indices clamp onto it when out of range
            padded = torch.nn.functional.pad(grid - xtal.default_F, (1, 1, 1, 1, 1, 1)) + xtal.default_F
            pdims = padded.shape
            rel = torch.ceil(hkl - 0.5) - mins + 1
            rel = torch.minimum(torch.clamp(rel, min=0), size + 1).long()
            lin = (rel[..., 0] * pdims[1] + rel[..., 1]) * pdims[2] + rel[..., 2]
            f = padded.reshape(-1)[lin]
            return f * f
        # tricubic: the 4x4x4 neighbourhood, only where it lies inside the table
        inside = ((hkl - mins + 3 <= size) & (hkl - 2 >= mins)).all(-1)
        base = torch.floor(hkl) - 1 - mins  # index of the first node
        base = torch.where(inside.unsqueeze(-1), base, torch.zeros_like(base)).long()
        w = ph.lagrange_weights(hkl)  # (...,3,4)
        offs = torch.arange(4, device=hkl.device)
        ih = (base[..., 0, None] + offs).clamp(0, dims[0] - 1)
        ik = (base[..., 1, None] + offs).clamp(0, dims[1] - 1)
        il = (base[..., 2, None] + offs).clamp(0, dims[2] - 1)
        lin = (ih[..., :, None, None] * strides[0] + ik[..., None, :, None] * strides[1]
               + il[..., None, None, :])
        vals = flat[lin]  # (...,4,4,4)
        wt = w[..., 0, :, None, None] * w[..., 1, None, :, None] * w[..., 2, None, None, :]
        f = (vals * wt).sum((-1, -2, -3))
        f = torch.where(inside, f, xtal.default_F)
        return f * f
