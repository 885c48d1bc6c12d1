"""Spot centroids: a first refinement stage robust to intensity.

Pixel likelihoods of sharp spots are rugged: a spot predicted a few pixels
from where it is measured gives no gradient towards it. Centroids do: the
observed spots of an image (intensity-weighted centroids of connected pixels
above a local background) are indexed against the starting model, and the
geometry (orientation, cell, beam centre, detector) is fitted by
Gauss-Newton steps to the positions the Bragg geometry predicts for their
Miller indices, as DIALS refines against reflections. No image is rendered.

Pixel coordinates here follow DIALS: pixel k spans [k, k + 1), so a pixel's
centre is at k + 0.5 (fast, slow).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.func import functional_call

from ..units import DEG
from .parameters import Parametrisation

GEOMETRY_GROUPS = ("orientation", "cell", "beam_centre", "distance", "panels", "wavelength")
# the least scatter of a measured still spot's excitation error, in units of
# its shape transform's extent (1/N of a reciprocal period): the standard
# deviation of the Gaussian of sin^2(pi N x) / sin^2(pi x) near its peak;
# brighter images show spots excited further out
EXCITATION_SCALE = 0.39


@dataclass
class Spots:
    """Observed spots: panel index, centroid (fast, slow) in pixels, its
    variance (fast, slow) in pixels squared, and the background-subtracted
    photons of each spot."""
    panel: np.ndarray
    xy: np.ndarray
    variance: np.ndarray
    intensity: np.ndarray

    def __len__(self) -> int:
        return len(self.panel)

    def select(self, keep) -> "Spots":
        return Spots(self.panel[keep], self.xy[keep], self.variance[keep], self.intensity[keep])


def local_background(image: np.ndarray, mask: np.ndarray | None = None, block: int = 32) -> np.ndarray:
    """A smooth background of one panel (slow, fast): the median of each
    block x block tile (of the pixels in `mask`), bilinearly spread back."""
    s, f = image.shape
    ns, nf = max(1, s // block), max(1, f // block)
    tiles = np.zeros((ns, nf))
    valid = np.ones(image.shape, bool) if mask is None else mask
    for i in range(ns):
        for j in range(nf):
            sl = (slice(i * s // ns, (i + 1) * s // ns), slice(j * f // nf, (j + 1) * f // nf))
            v = image[sl][valid[sl]]
            tiles[i, j] = np.median(v) if v.size else np.nan
    if np.isnan(tiles).all():
        return np.zeros_like(image, dtype=float)
    tiles = np.where(np.isnan(tiles), np.nanmedian(tiles), tiles)
    ys = (np.arange(s) + 0.5) / s * ns - 0.5
    xs = (np.arange(f) + 0.5) / f * nf - 0.5
    return ndimage.map_coordinates(tiles, np.meshgrid(ys, xs, indexing="ij"), order=1, mode="nearest")


def observed_spots(data, mask=None, *, sigmas: float = 3.0, fraction: float = 0.1, window: int = 9,
                   min_pixels: int = 2, block: int = 32, grow: int = 1) -> Spots:
    """Spots of measured `data` (panels, slow, fast photons): connected
    pixels (at least `min_pixels`) more than `sigmas` Poisson deviations
    above the local background and above `fraction` of the brightest pixel
    within `window`, grown by `grow` pixels; the centroid is weighted by
    the photons above the background."""
    d = np.asarray(data.detach().cpu() if torch.is_tensor(data) else data, dtype=float)
    m = None if mask is None else np.asarray(mask.cpu() if torch.is_tensor(mask) else mask, bool)
    panels, xy, var, inten = [], [], [], []
    structure = np.ones((3, 3), bool)
    for k in range(d.shape[0]):
        img = d[k]
        valid = np.ones(img.shape, bool) if m is None else m[k]
        bg = local_background(img, valid, block)
        # above the noise, and above `fraction` of the brightest pixel nearby:
        # a bright spot's side maxima (its shape transform's) are left out
        peak = ndimage.maximum_filter(img - bg, size=window)
        above = (img > bg + np.maximum(sigmas * np.sqrt(bg + 1.0), fraction * peak)) & valid
        labels, n = ndimage.label(above, structure)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(above, labels, np.arange(1, n + 1))
        if grow > 0:
            labels = ndimage.grey_dilation(labels, size=(2 * grow + 1, 2 * grow + 1)) * valid
        w = np.clip(img - bg, 0.0, None)
        idx = np.arange(1, n + 1)
        total = ndimage.sum_labels(w, labels, idx)
        ss, ff = np.indices(img.shape, dtype=float)
        cs = ndimage.sum_labels(w * (ss + 0.5), labels, idx) / np.maximum(total, 1e-300)
        cf = ndimage.sum_labels(w * (ff + 0.5), labels, idx) / np.maximum(total, 1e-300)
        # centroid variance: photon noise of each pixel's weight, and pixel quantisation
        counts = np.clip(img, 0.0, None) + bg
        lab = np.clip(labels - 1, 0, None)
        vs = ndimage.sum_labels(counts * (ss + 0.5 - cs[lab]) ** 2, labels, idx) / np.maximum(total, 1e-300) ** 2
        vf = ndimage.sum_labels(counts * (ff + 0.5 - cf[lab]) ** 2, labels, idx) / np.maximum(total, 1e-300) ** 2
        keep = (sizes >= min_pixels) & (total > 0)
        panels.append(np.full(int(keep.sum()), k))
        xy.append(np.stack([cf, cs], 1)[keep])
        var.append(np.stack([vf, vs], 1)[keep] + 1.0 / 12.0 / np.maximum(total[keep], 1.0)[:, None] + 1e-4)
        inten.append(total[keep])
    if not panels:
        return Spots(np.zeros(0, int), np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0))
    return Spots(np.concatenate(panels), np.concatenate(xy), np.concatenate(var), np.concatenate(inten))


class _Geometry(nn.Module):
    """What the Bragg geometry of one image needs from a simulator, as a
    module whose parameters functional_call can substitute."""

    def __init__(self, sim):
        super().__init__()
        self.sim = sim

    def forward(self, image):
        sim = self.sim
        incident, lam = sim.beam.sources()
        real = sim.crystal.real_vectors()
        phi = sim.rotation_angles(image)
        if phi is not None:  # the middle of the image's rotation
            rot = sim.goniometer.rotation(phi)
            real = real @ rot[len(rot) // 2].transpose(-1, -2).to(real)
        origin, fast, slow, normal = sim.detector.panel_frames(sim.beam.incident())
        pixel = torch.stack([p.pixel_size for p in sim.detector.panels])
        n_cells = sim.crystal.N.reshape(-1).expand(3)
        return real, incident[0], lam[0], n_cells, origin, fast, slow, normal, pixel


class _Sweep(nn.Module):
    """The rotation geometry of a scan, as a module for functional_call."""

    def __init__(self, sim):
        super().__init__()
        self.sim = sim

    def forward(self, hkl, phi):
        sim = self.sim
        incident, lam = sim.beam.sources()
        q0 = hkl.to(torch.float64) @ torch.linalg.inv(sim.crystal.real_vectors().double()).T
        after, e, before = sim.goniometer.scan_factors()
        v = q0 @ before.T
        c, sn = torch.cos(phi * DEG)[:, None], torch.sin(phi * DEG)[:, None]
        turned = v * c + torch.linalg.cross(e.expand_as(v), v) * sn + e * (v @ e)[:, None] * (1 - c)  # Rodrigues
        s = incident[0].double() / lam[0].double() + turned @ after.T
        return s, lam[0].double()


def predict_rotation(sim, subs: dict, hkl: torch.Tensor, panel: torch.Tensor, frame_near: torch.Tensor):
    """Where reflections `hkl` (n, 3) cross the Ewald sphere in a rotation
    scan: (x, y) pixels on panels `panel` and z in frames (0 at the start
    of the scan's first image, as DIALS's xyzobs.px), taking of each
    reflection's crossings the one nearest `frame_near` (n,). The angle is
    found on a grid of quarter images, then refined by one Newton step
    that carries the derivatives (the implicit function's)."""
    wrapped = _Sweep(sim)
    params = {"sim." + k: v for k, v in subs.items()}
    start, width = (float(v) for v in sim.scan.oscillation)
    first, last = sim.scan.image_range
    n_frames = last - first + 1
    hkl = torch.as_tensor(hkl)

    def excitation(phi, h=hkl):
        s, lam = functional_call(wrapped, params, (h, phi))
        return torch.linalg.norm(s, dim=-1) - 1.0 / lam

    with torch.no_grad():
        grid = start + width * torch.arange(-8, 4 * n_frames + 9, dtype=torch.float64) / 4
        # every (grid angle, reflection) in one batch
        f = excitation(grid.repeat_interleave(len(hkl)), hkl.repeat(len(grid), 1)).reshape(len(grid), -1).T
        cross = (f[:, :-1] * f[:, 1:] <= 0)
        t = f[:, :-1] / torch.where(cross, f[:, :-1] - f[:, 1:], torch.ones_like(f[:, 1:]))
        phis = grid[:-1] + t * (grid[1] - grid[0])
        frames = (phis - start) / width
        dist = torch.where(cross, (frames - torch.as_tensor(frame_near, dtype=torch.float64)[:, None]).abs(),
                           torch.full_like(frames, float("inf")))
        best = dist.argmin(1)
        phi0 = phis.gather(1, best[:, None]).squeeze(1)
        found = torch.isfinite(dist.gather(1, best[:, None]).squeeze(1))
    h = 1e-4 * abs(width)
    f0, f1 = excitation(phi0), excitation(phi0 + h)
    phi = phi0 - f0 * h / (f1 - f0).detach()
    s, lam = functional_call(wrapped, params, (hkl, phi))
    _, _, _, _, origin, fast, slow, normal, pixel = geometry(sim, subs)
    ray = s / torch.linalg.norm(s, dim=1, keepdim=True)
    o, fa, sl, nrm = (t_.double()[panel] for t_ in (origin, fast, slow, normal))
    dist_ = (o * nrm).sum(1) / (ray * nrm).sum(1)
    rel = dist_[:, None] * ray - o
    px = pixel.double()[panel]
    xyz = torch.stack([(rel * fa).sum(1) / px[:, 0], (rel * sl).sum(1) / px[:, 1], (phi - start) / width], 1)
    return xyz, found


def geometry(sim, subs: dict, image=None):
    """(real vectors (3, 3) rows a, b, c; incident unit vector; wavelength;
    cells per axis N (3,); panel origin, fast, slow, normal (panels, 3); pixel sizes (panels, 2))
    with the substitutions `subs` of a parametrisation."""
    wrapped = _Geometry(sim)
    return functional_call(wrapped, {"sim." + k: v for k, v in subs.items()}, (image,))


def predict(sim, subs: dict, hkl: torch.Tensor, panel: torch.Tensor, image=None):
    """Pixel positions (n, 2) (fast, slow) of the centroids of reflections
    `hkl` (n, 3) on panels `panel` (n,), and their excitation errors (n,).

    A still cuts each reciprocal-lattice point's spot (the crystal's shape
    transform, taken as the Gaussian of the lattice factor's curvature,
    which is elongated along the short cell edges) with the Ewald sphere,
    locally a plane: the centroid of the cut is the conditional mean of that
    Gaussian on the plane, shifted from the point by -e C n / (n.C n) (C:
    the Gaussian's covariance, n: the sphere's normal, e: the point's
    distance outside it), which for a skewed cell is off the sphere's
    nearest point by up to the spot's width. The excitation error is e in
    units of the spot's extent along n, sqrt(n.C n)."""
    real, inc, lam, n_cells, origin, fast, slow, normal, pixel = geometry(sim, subs, image)
    dtype = real.dtype
    recip = torch.linalg.inv(real)  # columns a*, b*, c*
    q = hkl.to(dtype) @ recip.T  # (n, 3) in 1/Angstrom
    s = inc.to(dtype) / lam.to(dtype) + q
    length = torch.linalg.norm(s, dim=1, keepdim=True)
    nrm_s = s / length
    e = length.squeeze(1) - 1.0 / lam.to(dtype)
    cov = (recip / n_cells.to(dtype) ** 2) @ recip.T  # up to a factor common to every axis
    cn = nrm_s @ cov  # (n, 3), C symmetric
    width_sq = (cn * nrm_s).sum(1)
    s = s - (e / width_sq)[:, None] * cn
    ray = s / torch.linalg.norm(s, dim=1, keepdim=True)
    o, f, sl, nrm = (t.to(dtype)[panel] for t in (origin, fast, slow, normal))
    t = (o * nrm).sum(1) / (ray * nrm).sum(1)
    rel = t[:, None] * ray - o
    px = pixel.to(dtype)[panel]
    xy = torch.stack([(rel * f).sum(1) / px[:, 0], (rel * sl).sum(1) / px[:, 1]], 1)
    return xy, e / torch.sqrt(width_sq)


def index(sim, subs: dict, spots: Spots, image=None, tolerance: float = 0.3):
    """Miller indices (n, 3) of `spots` under the model, and which of them
    index within `tolerance` of an integer on every axis and are the only
    spot of their reflection."""
    with torch.no_grad():
        real, inc, lam, _, origin, fast, slow, normal, pixel = geometry(sim, subs, image)
        dtype = real.dtype
        p = torch.as_tensor(spots.panel, dtype=torch.long)
        xy = torch.as_tensor(spots.xy, dtype=dtype)
        pos = origin.to(dtype)[p] + (xy[:, :1] * pixel.to(dtype)[p, :1]) * fast.to(dtype)[p] \
            + (xy[:, 1:] * pixel.to(dtype)[p, 1:]) * slow.to(dtype)[p]
        ray = pos / torch.linalg.norm(pos, dim=1, keepdim=True)
        frac = ((ray - inc.to(dtype)) / lam.to(dtype)) @ real.T
    frac = frac.double().cpu().numpy()
    hkl = np.rint(frac)
    ok = (np.abs(frac - hkl).max(1) < tolerance) & (np.abs(hkl).sum(1) > 0)
    brightest: dict = {}  # a spot split in two by the noise: keep its brighter part
    for i in np.nonzero(ok)[0]:
        key = (int(spots.panel[i]),) + tuple(hkl[i].astype(int))
        if key not in brightest or spots.intensity[i] > spots.intensity[brightest[key]]:
            brightest[key] = i
    ok[:] = False
    ok[list(brightest.values())] = True
    return hkl.astype(np.int64), ok


@dataclass
class CentroidFit:
    """What the centroid stage found: the internal vector of the geometric
    groups (Parametrisation units, labels), the spots used, the rms of
    their position residuals (px) at the start and at the end, the rms
    excitation error at the end (1/Angstrom), and Gauss-Newton iterations."""
    x: torch.Tensor
    labels: list
    spots: int
    rms_start: float
    rms: float
    rms_excitation: float
    iterations: int


def robust_rms(v: torch.Tensor) -> float:
    return float(1.4826 * v.abs().median()) if v.numel() else float("nan")


def forward_jacobian(residual, x: torch.Tensor, free: torch.Tensor, r0: torch.Tensor, step: float = 1e-3) -> torch.Tensor:
    """Forward differences of `residual` (smooth geometry, float64; `r0` its
    value at x) for the `free` parameters (zero columns for the others):
    one evaluation per parameter, cheaper here than forward-mode autograd,
    whose first use costs seconds of set-up; the error, step times the
    curvature, is far below what a Gauss-Newton step needs."""
    cols = []
    with torch.no_grad():
        for i in range(x.numel()):
            if not bool(free[i]):
                cols.append(torch.zeros_like(r0))
                continue
            e = torch.zeros_like(x)
            e[i] = step
            cols.append((residual(x + e) - r0) / step)
    return torch.stack(cols, 1)


def gauss_newton(residual, x: torch.Tensor, free: torch.Tensor | None = None, iterations: int = 10,
                 tolerance: float = 1e-6):
    """Damped Gauss-Newton (Levenberg-Marquardt) on the sum of squares of
    `residual(x)`; only the elements of `free` move; it stops when a step
    gains less than `tolerance` of the sum. Returns (x, iterations taken)."""
    free = torch.ones(x.numel(), dtype=torch.bool) if free is None else free
    damp, taken = 1e-3, 0
    with torch.no_grad():
        res = residual(x)
    for _ in range(iterations):
        chi2 = float((res * res).sum())
        J = forward_jacobian(residual, x, free, res)
        JTJ, g = J.T @ J, J.T @ res
        improved, chi2_new = False, chi2
        for _ in range(8):
            A = JTJ + damp * torch.diag(torch.clamp(torch.diagonal(JTJ), min=1e-12)) + torch.diag((~free).double())
            trial = x - torch.linalg.lstsq(A, g.unsqueeze(1)).solution.squeeze(1)
            with torch.no_grad():
                r_new = residual(trial)
            chi2_new = float((r_new * r_new).sum())
            if np.isfinite(chi2_new) and chi2_new < chi2:
                x, res, damp, improved = trial.detach(), r_new, max(damp / 10, 1e-7), True
                break
            damp *= 10
        taken += 1
        if not improved or chi2 - chi2_new < tolerance * chi2:
            break
    return x, taken


def fit_centroids(sim, data, groups, mask=None, *, spots: Spots | None = None, image=None, rounds: int = 4,
                  iterations: int = 10, tolerance: float = 0.3, reject: float = 5.0,
                  strongest: float = 0.25, stop_gain: float = 1e-3) -> CentroidFit:
    """Fit the geometric groups among `groups` (orientation, cell, beam
    centre, distance, panels, wavelength) to the observed spots of `data`.

    Residuals, as DIALS's stills refinement: each indexed spot's centroid
    against the position the Bragg geometry predicts (fast, slow), and the
    distance of its reciprocal-lattice point from the Ewald sphere (a
    measured still spot is excited, so near zero), which is what fixes the
    rotations out of the detector plane. Their scales are the robust rms of
    each at the current model (a spot's centroid also moves with how it is
    cut by the sphere; the excitation error's at least EXCITATION_SCALE).
    Each round indexes with the current model, takes
    damped Gauss-Newton steps (until one gains under `stop_gain` of the sum
    of squares: the fit is the start of the pixels', and such a step moves
    no spot by much) and rejects outliers beyond `reject` robust deviations.

    Only spots of at least `strongest` times the 95th percentile of the
    spots' photons take part: the bright ones are the nearly fully excited
    reflections, whose centroids the Gaussian cut predicts; a faint partial
    one is cut through the side maxima of its shape transform."""
    names = [g for g in groups if (g if isinstance(g, str) else g.name) in GEOMETRY_GROUPS]
    param = Parametrisation(names, sim)
    # the first round moves only the orientation and the beam centre: a cell
    # fitted to a misindexed first round wanders off with it
    first = torch.tensor([g.name in ("orientation", "beam_centre") for g, n in zip(param.groups, param.sizes)
                          for _ in range(n)])
    dtype = torch.float64
    x = torch.zeros(param.size, dtype=dtype)
    if spots is None:
        spots = observed_spots(data, mask)
    if len(spots) and strongest > 0:
        spots = spots.select(spots.intensity >= strongest * np.quantile(spots.intensity, 0.95))
    if len(spots) < 3 or param.size == 0:
        return CentroidFit(x, list(param.labels), len(spots), float("nan"), float("nan"), float("nan"), 0)
    obs = torch.as_tensor(spots.xy, dtype=dtype)
    var = torch.as_tensor(spots.variance, dtype=dtype)
    panel_all = torch.as_tensor(spots.panel, dtype=torch.long)
    rms_start, taken = None, 0
    usable = np.ones(len(spots), bool)
    rms, rms_eps = float("nan"), float("nan")
    for round_ in range(rounds):
        free = first if round_ == 0 and bool(first.any()) else torch.ones_like(first)
        subs = param.substitutions(sim, x.to(sim.dtype))
        hkl_np, ok = index(sim, subs, spots, image, tolerance)
        ok &= usable
        if ok.sum() < max(3, param.size):
            break
        sel = torch.as_tensor(np.nonzero(ok)[0])
        hkl, panel, o, v = torch.as_tensor(hkl_np[ok]), panel_all[sel], obs[sel], var[sel]
        with torch.no_grad():
            xy, eps = predict(sim, subs, hkl, panel, image)
            d = (xy.to(dtype) - o)
        pos_scale = max(robust_rms(d), 0.05)
        eps_scale = max(robust_rms(eps.to(dtype)), EXCITATION_SCALE)
        if rms_start is None:
            rms_start = float(torch.sqrt((d * d).sum(1).mean()))
        sig = torch.sqrt(v + pos_scale ** 2)

        def residual(w):
            xy, eps = predict(sim, param.substitutions(sim, w.to(sim.dtype)), hkl, panel, image)
            return torch.cat([((xy.to(dtype) - o) / sig).reshape(-1), eps.to(dtype) / eps_scale])

        x, steps = gauss_newton(residual, x, free, iterations, stop_gain)
        taken += steps
        with torch.no_grad():
            xy, eps = predict(sim, param.substitutions(sim, x.to(sim.dtype)), hkl, panel, image)
            d = xy.to(dtype) - o
        norm = torch.sqrt((d * d).sum(1)).numpy()
        bad = (norm > reject * max(robust_rms(torch.as_tensor(norm)), 0.05)) | \
            (np.abs(eps.double().numpy()) > reject * eps_scale)
        usable[np.nonzero(ok)[0][bad]] = False
        good = torch.as_tensor(~bad)
        rms = float(torch.sqrt((d[good] ** 2).sum(1).mean()))
        rms_eps = float(torch.sqrt((eps.double()[good] ** 2).mean()))
    return CentroidFit(x.detach(), list(param.labels), int(usable.sum()), float(rms_start or float("nan")), rms,
                       rms_eps, taken)


def miller_label(sim, image=None):
    """label(panel, slow, fast) -> "h k l" of the reflection whose spot
    covers that pixel under the model (the nearest reciprocal-lattice point
    of its scattering vector; for a scan image, at the image's middle
    angle)."""
    def label(k, s, f):
        spot = Spots(np.array([k]), np.array([[f + 0.5, s + 0.5]]), np.ones((1, 2)), np.ones(1))
        hkl, _ = index(sim, {}, spot, image, tolerance=0.5)
        return " ".join(str(int(v)) for v in hkl[0])
    return label


def centroid_rms(sim, data, valid=None, image=None) -> dict:
    """How well a model places the spots of one measured image, as
    dials.refine reports it: the observed spots' centroids (observed_spots,
    the brightest as in fit_centroids) against the model's, rms in pixels;
    for a scan image also the rms of where the model's reflections cross the
    Ewald sphere from the image's middle, in frames. image: the scan image
    (None: a still)."""
    found = observed_spots(data, valid)
    if len(found):
        found = found.select(found.intensity >= 0.25 * np.quantile(found.intensity, 0.95))
    if len(found) == 0:
        return dict(spots=0, rms_px=float("nan"), rms_frames=None)
    with torch.no_grad():
        hkl, ok = index(sim, {}, found, image)
        if not ok.any():
            return dict(spots=0, rms_px=float("nan"), rms_frames=None)
        h, p = torch.as_tensor(hkl[ok]), torch.as_tensor(found.panel[ok])
        if image is None:
            xy, _ = predict(sim, {}, h, p)
            frames = None
        else:
            middle = image - sim.scan.image_range[0] + 0.5
            xyz, crossed = predict_rotation(sim, {}, h, p, torch.full((len(h),), middle, dtype=torch.float64))
            xy = xyz[:, :2]
            frames = float(torch.sqrt(((xyz[crossed, 2] - middle) ** 2).mean())) if bool(crossed.any()) else None
    d = xy.double().numpy() - found.xy[ok]
    return dict(spots=int(ok.sum()), rms_px=float(np.sqrt((d ** 2).sum(1).mean())), rms_frames=frames)
