"""The simulator: composes beam, crystal, goniometer, scan and detector into
the expected photons per pixel of every panel, in chunks of pixels so memory
stays bounded.

Per pixel the sum runs over sensor layers, sub-pixels, sources, rotation
steps and mosaic domains, all vectorised; pixels are chunked, and sources and
orientations too when one pixel alone would exceed the chunk. The arithmetic
of a chunk is in kernels.py (eager or compiled); this module gathers the
per-image tensors, picks the kernel and assembles the image.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels
from . import physics as ph
from .build.nanobragg import models_from_args, models_from_config
from .kernels import KERNELS, KernelPlan
from .models import Beam, Crystal, Detector, Goniometer, Scan
from .resolve import RenderOptions

# elements of the (pixel, layer, sub-pixel, source, orientation) grid per chunk
DEFAULT_CHUNK_ELEMENTS = int(os.environ.get("TORCHBRAGG_CHUNK", 1 << 21))


def nearest_panel(beam: Beam, detector: Detector) -> tuple[float, float]:
    """(distance along the beam, pixel size) in mm of the panel that needs the
    finest sampling: the nearest relative to its pixel size."""
    with torch.no_grad():
        incident = beam.incident().double()
        origin, _, _, normal = (t.double() for t in detector.panel_frames(incident))
        distance = ph.dot(origin, normal) / ph.dot(incident, normal)
        pixel = torch.stack([p.pixel_size.double().max() for p in detector.panels])
        k = int(torch.argmin(distance / pixel))
        return float(distance[k]), float(pixel[k])


def recommended_oversample(crystal: Crystal, beam: Beam, detector: Detector) -> int:
    """The crystal's automatic oversampling on the panel that needs the most."""
    distance, pixel = nearest_panel(beam, detector)
    return crystal.automatic_oversample(float(beam.wavelength), distance / 1000.0, pixel / 1000.0)


class Simulator(nn.Module):
    """Renders the expected photons per pixel, shape (panels, slow, fast)."""

    def __init__(self, beam: Beam, crystal: Crystal, detector: Detector, goniometer: Goniometer | None = None,
                 scan: Scan | None = None, options: RenderOptions | None = None, recommended: int | None = None,
                 response: nn.Module | None = None, background: nn.Module | None = None):
        super().__init__()
        self.beam, self.crystal, self.detector = beam, crystal, detector
        self.response = response  # a DetectorResponse: what the detector makes of the photons
        self.background = background  # e.g. models.Background: its photons are added to every panel
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
        models, info = models_from_args(argv, dtype=dtype, device=device, **kw)
        return cls(**models).to(info.dtype)

    @classmethod
    def from_config(cls, cfg, dtype=None, device=None, **kw) -> "Simulator":
        """A simulator for a SimulationConfig (nanoBragg flags parsed)."""
        models, info = models_from_config(cfg, dtype=dtype, device=device, **kw)
        return cls(**models).to(info.dtype)

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

    def rotation_angles(self, image: int | None = None, still: bool = False) -> torch.Tensor | None:
        """Scan angles (degrees) of the rotation steps of `image`; None for a
        still (no goniometer, or `still`: no rotation whatever the goniometer)."""
        if self.goniometer is None or still:
            return None
        steps = self.options.phisteps
        if self.scan is None:
            return torch.zeros(steps, dtype=torch.float64, device=self.device)
        angles = self.scan.angles(self.scan.image_range[0] if image is None else image, steps)
        if self.options.phi_midpoints:
            angles = angles + self.scan.oscillation[1] / (2 * steps)
        return angles

    def orientations(self, image: int | None = None, still: bool = False) -> torch.Tensor:
        """Real cell vectors for every (rotation step, mosaic domain): (M, 3, 3),
        rows a, b, c in Angstrom; the mosaic turns after the goniometer."""
        real = self.crystal.real_vectors()
        mos = self.crystal.mosaic_rotations().double()  # (D,3,3)
        phi = self.rotation_angles(image, still)
        if phi is None:
            full = mos.unsqueeze(0)
        else:
            full = mos.unsqueeze(0) @ self.goniometer.rotation(phi).unsqueeze(1)  # (phi, D, 3, 3)
        oriented = real.unsqueeze(0).unsqueeze(0) @ full.transpose(-1, -2)
        return oriented.reshape(-1, 3, 3).to(self.dtype)

    def steps(self, beam=None, still: bool = False) -> int:
        n_src = (self.beam if beam is None else beam).sources()[1].numel()
        phisteps = 1 if self.goniometer is None or still else self.options.phisteps
        return n_src * self.crystal.mosaic_domains * phisteps * self.oversample ** 2

    def active_pixels(self, panel: int) -> torch.Tensor:
        """Flat indices of a panel's pixels inside the ROI and not masked."""
        p = self.detector.panels[panel]
        nf, ns = p.image_size
        roi = self.options.roi or (-1, -1, -1, -1)
        xmin, xmax = (roi[0] if roi[0] >= 0 else 0), (roi[1] if roi[1] >= 0 else nf)
        ymin, ymax = (roi[2] if roi[2] >= 0 else 0), (roi[3] if roi[3] >= 0 else ns)
        if p.mask is None and xmin <= 0 and ymin <= 0 and xmax >= nf - 1 and ymax >= ns - 1:
            return torch.arange(nf * ns, device=self.device)
        fs = torch.arange(nf, device=self.device)
        ss = torch.arange(ns, device=self.device)
        keep = ((fs >= xmin) & (fs <= xmax)).unsqueeze(0) & ((ss >= ymin) & (ss <= ymax)).unsqueeze(1)
        if p.mask is not None:
            keep = keep & p.mask
        return torch.nonzero(keep.flatten(), as_tuple=False).squeeze(1)

    # ------------------------------------------------------------------ render
    def forward(self, image: int | None = None, *, still: bool = False, beam=None, progress=None,
                detected: bool = False, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """`render`; with `detected`, what the detector reads on average
        through `response` (blur, gain, offset), the photons without one.
        `pixels`: a boolean (panels, slow, fast); then only those pixels are
        rendered and returned, as image[pixels] (1-D)."""
        if pixels is not None:
            return self.render_pixels(pixels, image, still=still, beam=beam, detected=detected)
        photons = self.render(image, still=still, beam=beam, progress=progress)
        return self.detector_counts(photons, sample=False) if detected else photons

    def render_pixels(self, pixels: torch.Tensor, image: int | None = None, *, still: bool = False, beam=None,
                      detected: bool = False) -> torch.Tensor:
        """image[pixels] (1-D) of image `image`, computing only the pixels of
        the boolean `pixels` (panels, slow, fast): no full frame is made,
        unless an amorphous background or a point-spread function (which
        need every pixel) is part of the image."""
        blurred = detected and self.response is not None and self.response.psf is not None
        if self.background is not None or blurred:
            return self.forward(image, still=still, beam=beam, detected=detected)[pixels.to(self.device)]
        shared = self._shared(image, still, beam)
        out = []
        for k in range(len(self.detector.panels)):
            idx = torch.nonzero(pixels[k].to(self.device).reshape(-1)).squeeze(1)
            if idx.numel():
                values = self._render_panel(k, shared, None, pixels=idx)
                mask = self.detector.panels[k].mask
                out.append(values if mask is None else values * mask.reshape(-1)[idx].to(values.dtype))
        values = torch.cat(out) if out else torch.zeros(0, dtype=self.dtype, device=self.device)
        if detected and self.response is not None:  # gain and offset, pixel by pixel
            values = self.response.expectation(values, self.detector.panels[0].pixel_size)
        return values

    def render(self, image: int | None = None, *, still: bool = False, beam=None, progress=None) -> torch.Tensor:
        """Photons per pixel of image `image` of the scan (default: the first),
        shape (panels, slow, fast). What varies per call: `still` renders
        without rotation whatever the goniometer; `beam` (a Beam, e.g. with
        another spectrum) stands in for the simulator's. A substituted
        orientation or any other parameter goes through
        torch.func.functional_call. `progress(done, total)` follows the pixels."""
        sizes = {p.image_size for p in self.detector.panels}
        if len(sizes) > 1:
            raise ValueError("panels of different sizes: render them one by one with render_panel()")
        panels = range(len(self.detector.panels))
        shared = self._shared(image, still, beam)
        total = sum(self.active_pixels(k).numel() for k in panels) if progress else 0
        done, out = 0, []
        for k in panels:
            def step(n, _):
                if progress:
                    progress(done + n, total)
            out.append(self._render_panel(k, shared, step))
            done += self.active_pixels(k).numel() if progress else 0
        return torch.stack(out)

    def detector_counts(self, photons: torch.Tensor, sample: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Photons (panels, slow, fast) as the detector reads them through
        `response` (ADU): one noisy reading, or its expectation when `sample`
        is False. Without a response, the photons themselves."""
        if self.response is None:
            return photons
        panels = self.detector.panels
        if sample:
            with torch.no_grad():
                same = all(torch.equal(p.pixel_size, panels[0].pixel_size) for p in panels)
            if same:  # one draw for the whole detector: each panel its own calibration error
                return self.response.sample(photons, panels[0].pixel_size, generator)
        out = [self.response.sample(photons[k], p.pixel_size, generator) if sample
               else self.response.expectation(photons[k], p.pixel_size) for k, p in enumerate(panels)]
        return torch.stack(out)

    def render_panel(self, panel: int, image: int | None = None, *, still: bool = False, beam=None) -> torch.Tensor:
        """Photons per pixel of one panel, shape (slow, fast)."""
        return self._render_panel(panel, self._shared(image, still, beam), None)

    def _shared(self, image, still=False, beam=None):
        """What every panel and chunk of one image uses."""
        beam, xtal = (self.beam if beam is None else beam), self.crystal
        incident, lam = beam.sources()
        frames = self.detector.panel_frames(beam.incident())
        orient = self.orientations(image, still)
        fluence = beam.fluence
        # cell vectors over each source's wavelength (Src, M, 3, 3) and their
        # incident part i . a / lambda (Src, M, 3): per image, not per chunk
        cells = orient.unsqueeze(0) / lam[:, None, None, None]
        offset = (cells @ incident[:, None, :, None]).squeeze(-1)
        t = dict(incident=incident, lam=lam, cells=cells, offset=offset, recip=xtal.reciprocal_vectors().to(self.dtype),
                 n=xtal.N, fudge=xtal.fudge, kahn=beam.kahn_factor(), e_vector=beam.e_vector().to(self.dtype),
                 i_bg=ph.water_background(fluence, beam.water_size), scale=ph.R_E_SQR * fluence / self.steps(beam, still))
        weights = beam.weights()
        if weights is not None:
            t["weights"] = weights.to(self.dtype)
        sf = xtal.structure_factors
        t["default_F"] = sf.default_F
        if sf.has_grid:
            t["hkl_min"] = sf.hkl_min
            if sf.lookup == "nearest":
                t["F_padded"] = ph.padded_structure_factors(sf.Fhkl, sf.default_F)
            else:
                t["Fhkl"] = sf.Fhkl
            if not torch.is_grad_enabled():  # a zero |F|^2 has a non-zero second derivative
                t["reach_sq"] = ph.structure_factor_reach_sq(sf.Fhkl, sf.hkl_min, t["recip"], sf.default_F,
                                                             sf.lookup).to(self.dtype)
        return dict(frames=frames, tensors=t, beam=beam.incident())

    def _panel_geometry(self, k, shared):
        origin, fast, slow, normal = (t[k].to(self.dtype) for t in shared["frames"])
        panel = self.detector.panels[k]
        beam = shared["beam"].to(self.dtype)
        close = ph.dot(origin, normal)
        return dict(origin=origin, fast=fast, slow=slow, normal=normal, close=close, beam=beam,
                    distance=close / ph.dot(beam, normal), pixel_size=panel.pixel_size,
                    layer_step=panel.thickness / self.options.layer_divisor, mu=panel.mu)

    def _plan(self, k, t) -> KernelPlan:
        opt, panel = self.options, self.detector.panels[k]
        return KernelPlan(fpixels=panel.fpixels, oversample=self.oversample, layers=max(opt.sensor_layers, 1),
                          sensor=opt.sensor_layers > 0, absorbed=opt.absorbed_layers,
                          surface_layer=opt.absorbed_layers and opt.parallax == "dials", curved=opt.curved,
                          point_pixel=opt.point_pixel, polarization=opt.polarization,
                          oversample_thick=opt.oversample_thick, oversample_polar=opt.oversample_polar,
                          oversample_omega=opt.oversample_omega, dmin=float(opt.dmin), shape=self.crystal.shape,
                          lookup=self.crystal.structure_factors.lookup, weighted="weights" in t)

    def _render_panel(self, k, shared, progress, pixels=None):
        """Panel k's image (slow, fast); given `pixels` (flat indices), their
        values only (1-D), the background and the mask left out."""
        panel = self.detector.panels[k]
        if self.device.type == "cpu":
            kernels.prime_allocator()
        t = {**shared["tensors"], **self._panel_geometry(k, shared)}
        plan = self._plan(k, t)
        per_pixel = plan.layers * self.oversample ** 2 * t["cells"].shape[0] * t["cells"].shape[1]
        compact = pixels is not None
        pixels = self.active_pixels(k) if pixels is None else pixels
        n, size = pixels.numel(), panel.spixels * panel.fpixels
        grad = torch.is_grad_enabled() and any(v.requires_grad for v in t.values())
        values = None
        if n and KERNELS.should_compile(plan, self.device, n * per_pixel, grad,
                                        per_pixel // (plan.layers * self.oversample ** 2)):
            values = self._compiled_chunks(plan.compiled(), pixels, t, per_pixel, grad, progress)
        if values is None:
            values = self._eager_chunks(plan, pixels, t, per_pixel, grad, progress, size, compact)
        if compact:
            if isinstance(values, torch.Tensor):
                return values
            return torch.cat(values) if values else torch.zeros(0, dtype=self.dtype, device=self.device)
        if isinstance(values, torch.Tensor):  # the chunks wrote the image themselves
            return self._add_background(k, values.reshape(panel.spixels, panel.fpixels), pixels)
        flat = torch.zeros(size, dtype=self.dtype, device=self.device)
        if values:
            flat = flat.index_put((pixels,), torch.cat(values))
        return self._add_background(k, flat.reshape(panel.spixels, panel.fpixels), pixels)

    def _add_background(self, k, image, pixels):
        """The Bragg image of panel k plus the background's photons on its rendered pixels
        (one sample per pixel: the background is smooth)."""
        if self.background is None:
            return image
        opt = self.options
        depth = None  # the sensor the Bragg term models absorbs the background as well
        if opt.sensor_layers > 0:
            depth = self.detector.panels[k].thickness * (max(opt.sensor_layers, 1) / opt.layer_divisor)
        extra = self.background.render_panel(self.beam, self.detector, k, polarization=opt.polarization,
                                             point_pixel=opt.point_pixel, sensor_depth=depth,
                                             curved=opt.curved).to(image)
        if pixels.numel() < image.numel():  # outside the ROI and the mask, as the Bragg term: 0
            keep = torch.zeros(image.numel(), dtype=image.dtype, device=image.device).index_fill_(0, pixels, 1.0)
            extra = extra * keep.reshape(image.shape)
        return image + extra

    def _eager_chunks(self, plan, pixels, t, per_pixel, grad, progress, size, compact=False):
        """Chunks of at most chunk_elements grid elements and a few hundred
        thousand points; without gradients on the CPU they run side by side on
        the threads (each single-threaded), writing into the image (`compact`:
        into the list of the pixels' values)."""
        n = pixels.numel()
        budget = self.chunk_elements // (16 if plan.lookup == "tricubic" else 1)
        chunk = max(1, budget // per_pixel)
        if grad:  # one thread pass per op: large blocks, few hand-offs between threads
            chunk = min(chunk, max(1, kernels.GRAD_POINTS // (plan.layers * self.oversample ** 2)))
            plan = replace(plan, block=self.chunk_elements)
        else:  # cache-sized blocks, the chunks side by side on the threads
            chunk = min(chunk, max(1, kernels.EAGER_POINTS // (plan.layers * self.oversample ** 2)))
            plan = replace(plan, block=min(kernels.EAGER_BLOCK, self.chunk_elements))
        pool = None if grad or self.device.type != "cpu" else kernels.eager_pool()
        if pool is not None:  # at least a chunk per thread, unless that makes them tiny
            points = plan.layers * self.oversample ** 2
            chunk = min(chunk, max(-(-n // pool._max_workers), kernels.MIN_POINTS // points, 1))
        starts = range(0, n, chunk)
        if pool is not None:
            whole = compact or n == size  # then the values go in the pixels' order
            flat = (torch.empty if whole else torch.zeros)(n if compact else size, dtype=self.dtype,
                                                           device=self.device)

            def fill(start):
                idx = pixels[start:start + chunk]
                value = kernels.chunk_photons(plan, idx, t)
                if whole:
                    flat[start:start + idx.numel()] = value
                else:
                    flat.index_put_((idx,), value)
            kernels.pool_map(pool, fill, starts, lambda s: progress and progress(min(s + chunk, n), n))
            return flat
        use_ckpt = grad and n > chunk
        values = []
        for start in starts:
            idx = pixels[start:start + chunk]
            values.append(checkpoint(kernels.chunk_photons, plan, idx, t, use_reentrant=False) if use_ckpt
                          else kernels.chunk_photons(plan, idx, t))
            if progress is not None:
                progress(min(start + chunk, n), n)
        return values

    def _compiled_chunks(self, plan, pixels, t, per_pixel, grad, progress):
        """Chunks of one fixed shape (the last padded with its first pixel) so
        that one compiled graph serves them all; None if compiling failed."""
        n = pixels.numel()
        points = plan.layers * self.oversample ** 2
        chunk = min(n, max(1, min(kernels.COMPILED_CHUNK // per_pixel, kernels.COMPILED_POINTS // points)))
        values = []
        for start in range(0, n, chunk):
            idx = pixels[start:start + chunk]
            m = idx.numel()
            if m < chunk:
                idx = torch.cat([idx, idx[:1].expand(chunk - m)])
            out = KERNELS.run(plan, idx, t, use_ckpt=grad and n > chunk)
            if out is None:
                return None
            values.append(out[:m])
            if progress is not None:
                progress(min(start + chunk, n), n)
        return values
