"""The simulator: composes beam, crystal, goniometer, scan and detector into
the expected photons per pixel of every panel, in chunks of pixels so memory
stays bounded.

Per pixel the sum runs over sensor layers, sub-pixels, sources, rotation
steps and mosaic domains, all vectorised; pixels are chunked, and sources and
orientations too when one pixel alone would exceed the chunk.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import physics as ph
from .models import Beam, Crystal, Detector, Goniometer, Scan

# elements of the (pixel, layer, sub-pixel, source, orientation) grid per chunk
DEFAULT_CHUNK_ELEMENTS = int(os.environ.get("TORCHBRAGG_CHUNK", 1 << 21))


@dataclass
class RenderOptions:
    """How the sums are sampled, and the original's per-pixel rules.

    oversample: sub-pixels per pixel edge (None: chosen from the crystal size).
    phisteps: rotation steps per image. sensor_layers: depth samples of the
    sensor (0: a thin detector that absorbs everything); the layers are
    thickness / layer_divisor apart. With oversample_thick/polar/omega off,
    capture fraction, polarization and solid angle are evaluated once per
    pixel as the original does. absorbed_layers: the sensor is cut into
    sensor_layers equal slabs, each sampled at its mid-depth and weighted by
    the photons it absorbs along each ray (the parallax a real sensor shows)
    instead of the original's rule. roi: (fast min, fast max, slow min, slow max)
    inclusive, on every panel. dmin: skip points whose resolution is finer."""
    oversample: int | None = None
    phisteps: int = 1
    sensor_layers: int = 0
    layer_divisor: int = 1
    oversample_thick: bool = False
    oversample_polar: bool = False
    oversample_omega: bool = False
    absorbed_layers: bool = False
    point_pixel: bool = False
    curved: bool = False
    polarization: bool = True
    dmin: float = 0.0
    roi: tuple[int, int, int, int] | None = None
    chunk_elements: int | None = None


def sensor_sampling(thicksteps: int | None, has_thickness: bool, absorbed: bool = False) -> tuple[int, int]:
    """(layers, divisor): the layers are thickness / divisor apart. Absorbed
    slabs: `thicksteps` (default 10) slabs of thickness / n. The original's
    rule: with a count the layers span the thickness end to end (thickness /
    (n - 1) apart), without one two layers half the thickness apart."""
    if not has_thickness:
        return 0, 1
    if absorbed:
        n = thicksteps if thicksteps and thicksteps > 0 else 10
        return n, n
    n = -1 if thicksteps is None else thicksteps
    return (2, 2) if n <= 0 else (max(n, 2), max(n, 2) - 1)


def oversample_for(crystal: Crystal, wavelength: float, distance: float, pixel: float) -> int:
    """The original's automatic oversampling: three sub-pixels per reciprocal
    pixel (wavelength * distance / pixel) across the largest crystal dimension.
    Distance and pixel in metres, wavelength in Angstrom; the arithmetic is
    the original's so that the integer comes out the same."""
    with torch.no_grad():
        lengths = torch.linalg.norm(crystal.real_vectors(), dim=-1).tolist()
        xtal_max = max(length * 1e-10 * n for length, n in zip(lengths, crystal.N.double().tolist()))
    recip_px = wavelength / 1e10 * distance / pixel
    return max(int(math.ceil(3.0 * xtal_max / recip_px)), 1)


def recommended_oversample(crystal: Crystal, beam: Beam, detector: Detector) -> int:
    """`oversample_for` on the panel that needs the most: the nearest along the
    beam relative to its pixel size."""
    with torch.no_grad():
        incident = beam.incident().double()
        origin, _, _, normal = (t.double() for t in detector.panel_frames(incident))
        distance = ph.dot(origin, normal) / ph.dot(incident, normal)
        pixel = torch.stack([p.pixel_size.double().max() for p in detector.panels])
        k = int(torch.argmin(distance / pixel))
        return oversample_for(crystal, float(beam.wavelength), float(distance[k]) / 1000.0, float(pixel[k]) / 1000.0)


class Simulator(nn.Module):
    """Renders the expected photons per pixel, shape (panels, slow, fast)."""

    def __init__(self, beam: Beam, crystal: Crystal, detector: Detector, goniometer: Goniometer | None = None,
                 scan: Scan | None = None, options: RenderOptions | None = None, recommended: int | None = None):
        super().__init__()
        self.beam, self.crystal, self.detector = beam, crystal, detector
        self.goniometer, self.scan = goniometer, scan
        self.options = options or RenderOptions()
        self.recommended_oversample = recommended or recommended_oversample(crystal, beam, detector)
        self.oversample_auto = not (self.options.oversample and self.options.oversample > 0)
        self.oversample = self.recommended_oversample if self.oversample_auto else int(self.options.oversample)
        self.chunk_elements = self.options.chunk_elements or DEFAULT_CHUNK_ELEMENTS

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_args(cls, argv: list[str], dtype=None, device=None, **kw) -> "Simulator":
        """A simulator for nanoBragg flags (panel 0 is the original's detector)."""
        from .nanobragg import build_from_args
        return build_from_args(argv, dtype=dtype, device=device, **kw)[0]

    @classmethod
    def from_config(cls, cfg, dtype=None, device=None, **kw) -> "Simulator":
        from .nanobragg import build_from_config
        return build_from_config(cfg, dtype=dtype, device=device, **kw)[0]

    @property
    def dtype(self):
        return self.detector.dtype

    @property
    def device(self):
        return self.detector.device

    # ------------------------------------------------------------------ sampling
    def images(self) -> range:
        """Image numbers of the scan (1 for a still)."""
        if self.scan is None:
            return range(1, 2)
        return range(self.scan.image_range[0], self.scan.image_range[1] + 1)

    def rotation_angles(self, image: int | None = None) -> torch.Tensor | None:
        """Scan angles (degrees) of the rotation steps of `image`; None for a still."""
        if self.goniometer is None:
            return None
        steps = self.options.phisteps
        if self.scan is None:
            return torch.zeros(steps, dtype=torch.float64, device=self.device)
        return self.scan.angles(self.scan.image_range[0] if image is None else image, steps)

    def orientations(self, image: int | None = None) -> torch.Tensor:
        """Real cell vectors for every (rotation step, mosaic domain): (M, 3, 3),
        rows a, b, c in Angstrom; the mosaic turns after the goniometer."""
        real = self.crystal.real_vectors()
        mos = self.crystal.mosaic_rotations().double()  # (D,3,3)
        phi = self.rotation_angles(image)
        if phi is None:
            full = mos.unsqueeze(0)
        else:
            full = mos.unsqueeze(0) @ self.goniometer.rotation(phi).unsqueeze(1)  # (phi, D, 3, 3)
        oriented = real.unsqueeze(0).unsqueeze(0) @ full.transpose(-1, -2)
        return oriented.reshape(-1, 3, 3).to(self.dtype)

    def steps(self) -> int:
        n_src = self.beam.sources()[1].numel()
        phisteps = 1 if self.goniometer is None else self.options.phisteps
        return n_src * self.crystal.mosaic_domains * phisteps * self.oversample ** 2

    def active_pixels(self, panel: int) -> torch.Tensor:
        """Flat indices of a panel's pixels inside the ROI and not masked."""
        p = self.detector.panels[panel]
        nf, ns = p.image_size
        roi = self.options.roi or (-1, -1, -1, -1)
        xmin, xmax = (roi[0] if roi[0] >= 0 else 0), (roi[1] if roi[1] >= 0 else nf)
        ymin, ymax = (roi[2] if roi[2] >= 0 else 0), (roi[3] if roi[3] >= 0 else ns)
        fs = torch.arange(nf, device=self.device)
        ss = torch.arange(ns, device=self.device)
        keep = ((fs >= xmin) & (fs <= xmax)).unsqueeze(0) & ((ss >= ymin) & (ss <= ymax)).unsqueeze(1)
        if p.mask is not None:
            keep = keep & p.mask
        return torch.nonzero(keep.flatten(), as_tuple=False).squeeze(1)

    # ------------------------------------------------------------------ render
    def forward(self, image: int | None = None, progress=None) -> torch.Tensor:
        return self.render(image, progress)

    def render(self, image: int | None = None, progress=None) -> torch.Tensor:
        """Photons per pixel of image `image` of the scan (default: the first),
        shape (panels, slow, fast). `progress(done, total)` follows the pixels."""
        sizes = {p.image_size for p in self.detector.panels}
        if len(sizes) > 1:
            raise ValueError("panels of different sizes: render them one by one with render_panel()")
        panels = range(len(self.detector.panels))
        shared = self._shared(image)
        total = sum(self.active_pixels(k).numel() for k in panels) if progress else 0
        done, out = 0, []
        for k in panels:
            def step(n, _):
                if progress:
                    progress(done + n, total)
            out.append(self._render_panel(k, shared, step))
            done += self.active_pixels(k).numel() if progress else 0
        return torch.stack(out)

    def render_panel(self, panel: int, image: int | None = None) -> torch.Tensor:
        """Photons per pixel of one panel, shape (slow, fast)."""
        return self._render_panel(panel, self._shared(image), None)

    def _shared(self, image):
        """What every panel and chunk of one image uses."""
        beam, xtal = self.beam, self.crystal
        incident, lam = beam.sources()
        frames = self.detector.panel_frames(beam.incident())
        orient = self.orientations(image)
        recip = xtal.reciprocal_vectors().to(self.dtype)
        fluence = beam.fluence
        i_bg = ph.water_background(fluence, beam.water_size)
        scale = ph.R_E_SQR * fluence / self.steps()
        return dict(frames=frames, incident=incident, lam=lam, orient=orient, recip=recip, i_bg=i_bg, scale=scale)

    def _panel_geometry(self, k, shared):
        origin, fast, slow, normal = (t[k].to(self.dtype) for t in shared["frames"])
        panel = self.detector.panels[k]
        beam = self.beam.incident().to(self.dtype)
        close = ph.dot(origin, normal)
        layers = max(self.options.sensor_layers, 1)
        return dict(origin=origin, fast=fast, slow=slow, normal=normal, close=close, beam=beam,
                    distance=close / ph.dot(beam, normal), pixel_size=panel.pixel_size, fpixels=panel.fpixels,
                    layers=layers, layer_step=panel.thickness / self.options.layer_divisor, mu=panel.mu)

    def _render_panel(self, k, shared, progress):
        panel = self.detector.panels[k]
        geo = self._panel_geometry(k, shared)
        per_pixel = geo["layers"] * self.oversample ** 2 * shared["incident"].shape[0] * shared["orient"].shape[0]
        interpolate = self.crystal.structure_factors.lookup == "tricubic"
        budget = self.chunk_elements // (16 if interpolate else 1)
        chunk = max(1, budget // max(per_pixel, 1))
        pixels = self.active_pixels(k)
        args = (geo, shared["incident"], shared["lam"], shared["orient"], shared["recip"], shared["i_bg"],
                shared["scale"])
        use_ckpt = torch.is_grad_enabled() and pixels.numel() > chunk and any(
            t.requires_grad for t in self.parameters())
        values = []
        for start in range(0, pixels.numel(), chunk):
            idx = pixels[start:start + chunk]
            if use_ckpt:
                values.append(checkpoint(self._pixels, idx, *args, use_reentrant=False))
            else:
                values.append(self._pixels(idx, *args))
            if progress is not None:
                progress(min(start + chunk, pixels.numel()), pixels.numel())
        flat = torch.zeros(panel.spixels * panel.fpixels, dtype=self.dtype, device=self.device)
        if values:
            flat = flat.index_put((pixels,), torch.cat(values))
        return flat.reshape(panel.spixels, panel.fpixels)

    def _positions(self, idx, geo):
        """Sub-pixel positions (P, layers, sub-pixels, 3) in mm."""
        os_ = self.oversample
        sub = geo["pixel_size"] / os_  # (fast, slow)
        fpix = (idx % geo["fpixels"]).to(self.dtype)
        spix = torch.div(idx, geo["fpixels"], rounding_mode="floor").to(self.dtype)
        k = torch.arange(os_, dtype=self.dtype, device=self.device)
        fdet = sub[0] * (fpix[:, None] * os_ + k) + sub[0] / 2  # (P, os)
        sdet = sub[1] * (spix[:, None] * os_ + k) + sub[1] / 2
        T = geo["layers"]
        depth = torch.arange(T, dtype=self.dtype, device=self.device)
        if self.options.absorbed_layers:
            depth = depth + 0.5  # mid-depth of each slab
        odet = geo["layer_step"] * depth  # (T,)
        # (fast, slow, depth) coordinates of every sub-pixel, then one product with the frame
        coords = torch.stack(torch.broadcast_tensors(fdet[:, None, None, :], sdet[:, None, :, None],
                                                     odet[None, :, None, None]), -1)
        frame = torch.stack([geo["fast"], geo["slow"], geo["normal"]])
        pos = (coords.reshape(-1, 3) @ frame + geo["origin"]).reshape(idx.numel(), T, os_ * os_, 3)
        if self.options.curved:
            # keep every pixel at the beam distance: flat coordinates become angles
            dist = geo["distance"]
            start = dist * geo["beam"]
            rot_s = ph.rotation_axis_angle(geo["slow"], pos[..., 1] / dist)
            rot_f = ph.rotation_axis_angle(geo["fast"], pos[..., 2] / dist)
            pos = ph.rotate(rot_f, ph.rotate(rot_s, start))
        return pos

    def _pixels(self, idx, geo, incident, lam, orient, recip, i_bg, scale):
        opt, beam = self.options, self.beam
        P, T = idx.numel(), geo["layers"]
        running = opt.oversample_thick or opt.oversample_polar or opt.oversample_omega
        pos = self._positions(idx, geo)
        airpath = torch.linalg.vector_norm(pos, dim=-1)  # (P,T,Sub)
        diffracted = pos / airpath.unsqueeze(-1)
        d = diffracted.unsqueeze(-2)  # (P,T,Sub,1,3)
        valid = None
        if opt.dmin > 0:
            # |d - i| of unit vectors from their dot product: no (P,T,Sub,Src,3) array needed
            cos2t = (diffracted.reshape(-1, 3) @ incident.T).reshape(*diffracted.shape[:-1], -1)
            stol = 0.5 * torch.sqrt(torch.clamp(2.0 - 2.0 * cos2t, min=0.0)) / lam
            valid = ~((stol > 0) & (opt.dmin > 0.5 / stol))

        # Per-pixel factors; the original evaluates them once per pixel unless
        # an -oversample_* switch asks for every sub-pixel, so compute only what is used.
        full_omega = running and opt.oversample_omega
        ap = airpath if full_omega else airpath[:, :1, :1]
        px = geo["pixel_size"]
        omega = ph.solid_angle(px[0] * px[1], ap, geo["close"], opt.point_pixel)
        full_thick = (running and opt.oversample_thick) or opt.absorbed_layers
        if opt.sensor_layers > 0:
            layer = torch.arange(T, dtype=self.dtype, device=self.device)[None, :, None]
            dd = diffracted if full_thick else diffracted[:, :, :1]
            capture = ph.capture_fraction(layer, geo["layer_step"], geo["mu"], ph.dot(dd, geo["normal"]))
        else:
            capture = torch.ones((P, T, 1), dtype=self.dtype, device=self.device)
        full_polar = (running and opt.oversample_polar) or valid is not None
        if not opt.polarization:
            polar = torch.ones((P, 1, 1, 1), dtype=self.dtype, device=self.device)
        else:
            dp = d if full_polar else d[:, :1, :1]
            inc = incident if full_polar else incident[:1]
            polar = ph.polarization_factor(beam.kahn_factor(), inc, dp, beam.e_vector().to(self.dtype))

        if running:
            terms = self._bragg_terms(diffracted, incident, lam, orient, recip, valid, capture, beam.weights())
            total = self._running_product(terms, capture, polar, omega, valid, i_bg)
        else:
            total = i_bg + self._bragg_sum(diffracted, incident, lam, orient, recip, valid, capture)

        result = scale * total
        if not (opt.oversample_thick or opt.absorbed_layers):
            result = result * capture[:, -1, 0]  # the last layer's value, as the original
        if not opt.oversample_polar:
            result = result * self._first_polar(polar, valid)
        if not opt.oversample_omega:
            result = result * omega[:, 0, 0]
        return result

    def _bragg_terms(self, diffracted, incident, lam, orient, recip, valid, capture, weights):
        """F_latt^2 |F|^2 (P, T, Sub, Src, M) for these sources and orientations,
        with the source weights, the -dmin cut and absorbed-slab weights."""
        opt = self.options
        hkl = self._miller_indices(diffracted, incident, lam, orient)  # (P,T,Sub,Src,M,3)
        intensity = self.crystal.lattice_factor_sq(hkl, recip)  # (P,T,Sub,Src,M)
        if weights is not None:
            intensity = intensity * weights.to(intensity)[:, None]
        if valid is not None:
            intensity = intensity * valid.unsqueeze(-1)
        if opt.absorbed_layers and opt.sensor_layers > 0:
            intensity = intensity * capture[..., None, None]  # each slab counts what it absorbs
        return intensity * self.crystal.structure_factors.amplitude_sq(hkl)

    def _bragg_sum(self, diffracted, incident, lam, orient, recip, valid, capture):
        """The Bragg terms summed per pixel, (P,), over sources and orientations
        taken in slices small enough for the chunk budget: memory stays bounded
        however many sources, rotation steps and mosaic domains there are."""
        P = diffracted.shape[0]
        points = diffracted.numel() // 3  # P * T * Sub
        n_src, n_orient = lam.shape[0], orient.shape[0]
        budget = self.chunk_elements // (16 if self.crystal.structure_factors.lookup == "tricubic" else 1)
        s_step, m_step = n_src, n_orient
        if points * n_src * n_orient > budget:
            m_step = budget // (points * n_src)
            if m_step < 1:
                m_step, s_step = 1, max(1, budget // points)
        weights = self.beam.weights()
        total = 0.0
        for s0 in range(0, n_src, s_step):
            sl = slice(s0, s0 + s_step)
            w = None if weights is None else weights[sl]
            v = None if valid is None else valid[..., sl]
            for m0 in range(0, n_orient, m_step):
                terms = self._bragg_terms(diffracted, incident[sl], lam[sl], orient[m0:m0 + m_step], recip, v,
                                          capture, w)
                total = total + terms.reshape(P, -1).sum(-1)
        return total

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

    @staticmethod
    def _first_polar(polar, valid):
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
        opt = self.options
        P, T, Sub, Src, M = intensity.shape
        w = torch.ones((P, T, Sub, Src), dtype=self.dtype, device=self.device)
        if opt.oversample_thick:
            w = w * capture.unsqueeze(-1)
        if opt.oversample_polar:
            w = w * polar
        if opt.oversample_omega:
            w = w * omega.unsqueeze(-1)
        if valid is not None:
            w = torch.where(valid, w, torch.ones_like(w))
        exponents = torch.arange(M, 0, -1, dtype=self.dtype, device=self.device)  # M .. 1
        inner = (intensity * w.unsqueeze(-1) ** exponents).sum(-1).reshape(P, -1)  # (P, G)
        whole = (w ** M).reshape(P, -1)
        after = torch.flip(torch.cumprod(torch.flip(whole, [1]), 1), [1])  # prod over g' >= g
        after_excl = torch.cat([after[:, 1:], torch.ones_like(after[:, :1])], 1)
        return i_bg * after[:, 0] + (inner * after_excl).sum(-1)
