"""Regions of interest: the pixels a refinement looks at, so that its cost
follows the spots rather than the detector size."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.func import functional_call

from .centroids import local_background


def grow(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return F.max_pool2d(mask.float().unsqueeze(1), k, stride=1, padding=radius).squeeze(1) > 0


def spot_pixels(image: torch.Tensor, fraction: float = 0.05, min_peak: float | None = None,
                window: int = 9) -> torch.Tensor:
    """Pixels of `image` (panels, slow, fast) at or above `fraction` of the
    peak of their spot (the largest value within `window` pixels), for spots
    whose peak reaches `min_peak` (default: 2 % of the brightest pixel)."""
    img = image.detach().double()
    img = img - img.flatten(1).median(dim=1).values.reshape(-1, 1, 1)
    peak = F.max_pool2d(img.unsqueeze(1), window, stride=1, padding=window // 2).squeeze(1)
    if min_peak is None:
        min_peak = 0.02 * float(img.max())
    return (img >= fraction * peak) & (peak >= min_peak) & (img > 0)


def bright_pixels(data: torch.Tensor, sigmas: float = 5.0) -> torch.Tensor:
    """Pixels of measured `data` (panels, slow, fast) more than `sigmas`
    Poisson standard deviations above their panel's median."""
    d = torch.as_tensor(data).detach().double()
    med = d.flatten(1).median(dim=1).values.reshape(-1, 1, 1)
    return d > med + sigmas * torch.sqrt(med + 1.0)


def roi_mask(sim, data=None, *, fraction: float = 0.05, dilate: int = 3, background_fraction: float = 0.02,
             broaden: float | None = None, seed: int = 0, model: torch.Tensor | None = None,
             render=None) -> torch.Tensor:
    """Boolean (panels, slow, fast) mask of the pixels to refine against.

    Spots: pixels above `fraction` of their spot's peak in a render of the
    starting model (`model`, or rendered here), and, with `broaden`, in a
    render whose N is scaled by it (clamped at 3; broader spots reach
    further), and, given measured `data`, pixels of observed spots
    (`bright_pixels`); all dilated by `dilate` pixels. Background: a random
    `background_fraction` of the other pixels (seeded). Masked panel
    pixels are left out. `render(sim, substitutions)` renders the image
    meant (default: sim's first image)."""
    render = render or (lambda s, subs=None: functional_call(s, subs or {}, ()))
    with torch.no_grad():
        image = render(sim) if model is None else model.detach()
        spots = spot_pixels(image, fraction)
        if broaden:
            n = sim.crystal.N.detach()
            nb = torch.clamp(n * broaden, min=3.0).to(n)
            spots |= spot_pixels(render(sim, {"crystal.N": nb}), fraction)
        if data is not None:
            d = torch.as_tensor(np.asarray(data) if not torch.is_tensor(data) else data)
            if d.shape != image.shape:
                raise ValueError(f"data shape {tuple(d.shape)} differs from the image shape {tuple(image.shape)}")
            spots |= bright_pixels(d).to(spots.device)
    mask = grow(spots, dilate)
    if background_fraction > 0:
        rng = np.random.default_rng(seed)
        sample = torch.as_tensor(rng.random(tuple(mask.shape)) < background_fraction, device=mask.device)
        mask = mask | sample
    for k, p in enumerate(sim.detector.panels):
        if p.mask is not None:
            mask[k] &= p.mask.to(mask.device)
    return mask


def spot_region(model: torch.Tensor, data: torch.Tensor, valid: torch.Tensor | None = None, *,
                fraction: float = 0.05, faintest: float = 0.02, sigmas: float = 3.0, dilate: int = 2,
                window: int = 9,
                background_fraction: float = 0.02, seed: int = 0) -> torch.Tensor:
    """Boolean (panels, slow, fast) region to fit: the pixels of spots of
    the starting `model` and of the measured `data` above `fraction` of
    their spot's peak (within `window`), the data's also `sigmas` Poisson
    deviations above the local background, of spots whose peak reaches
    `faintest` of the brightest, dilated by `dilate` pixels; and
    a random `background_fraction` of the rest (seeded), for the background.
    The faint tails of bright spots are left out: they cost renders and
    carry little of the spots' position. Without `data`, the model's part
    alone (pixels not chosen by the data's noise, for judging a fit)."""
    m = model.detach().double().cpu().numpy()
    ok = np.ones(m.shape, bool) if valid is None else np.asarray(valid.cpu(), bool)
    out = np.zeros(m.shape, bool)
    for k in range(m.shape[0]):
        if data is not None:
            d = data[k].detach().double().cpu().numpy()
            bg = local_background(d, ok[k])
            excess = d - bg
            peak = ndimage.maximum_filter(excess, size=window)
            out[k] = (excess > np.maximum(sigmas * np.sqrt(bg + 1.0), fraction * peak)) & ok[k] \
                & (peak >= faintest * float(peak[ok[k]].max() if ok[k].any() else 0.0))
        mk = m[k] - np.median(m[k])
        mpeak = ndimage.maximum_filter(mk, size=window)
        out[k] |= (mk >= fraction * mpeak) & (mpeak >= faintest * max(float(mk.max()), 1e-300)) & (mk > 0)
    region = torch.as_tensor(out)
    region = grow(region, dilate)
    if background_fraction > 0:
        rng = np.random.default_rng(seed)
        region |= torch.as_tensor(rng.random(m.shape) < background_fraction)
    return region & torch.as_tensor(ok)


def roi_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(fast min, fast max, slow min, slow max) bounding all panels' pixels
    of `mask` (inclusive), the form of RenderOptions.roi; None if empty."""
    any_panel = mask.any(0)
    if not bool(any_panel.any()):
        return None
    s = torch.nonzero(any_panel.any(1)).flatten()
    f = torch.nonzero(any_panel.any(0)).flatten()
    return int(f.min()), int(f.max()), int(s.min()), int(s.max())


def mask_substitutions(mask: torch.Tensor) -> dict:
    """Panel masks {name: (slow, fast) bool} that make a render compute only
    the pixels of `mask` (for torch.func.functional_call)."""
    return {f"detector.panels.{k}.mask": mask[k] for k in range(mask.shape[0])}


def render_mask(sim, mask: torch.Tensor) -> torch.Tensor:
    """The pixels to render for the region `mask` (panels, slow, fast): with
    a detector PSF, the region grown by the kernel's radius, so that the
    light its neighbours spread into it is in the blurred model."""
    response = getattr(sim, "response", None)
    radius = 0 if response is None or response.psf is None else int(response.psf_radius)
    if radius == 0:
        return mask
    grown = F.max_pool2d(mask.to(torch.float32).unsqueeze(1), 2 * radius + 1, stride=1, padding=radius)
    return grown.squeeze(1) > 0
