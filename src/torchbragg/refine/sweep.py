"""Rotation sweeps: the geometry from spot centroids, the pixels only where
spots are.

A sweep of measured frames is refined as DIALS refines one: the crystal and
detector geometry against the centroids of the observed spots (x, y on the
detector and z, the rotation angle in frames), which are robust to how well
the model reproduces each spot's shape; the pixels then fit what only they
determine (scales, background, the spot shapes) with that geometry held.

- `sweep_spots`: the observed spots of each frame (centroids.observed_spots)
  linked across consecutive frames into one spot per reflection passage,
  with its centroid in x, y and z;
- `index_sweep`: their Miller indices under a model, each rotated back from
  the angle of its z;
- `fit_rotation_centroids`: damped Gauss-Newton on the differences from
  where each reflection crosses the Ewald sphere (centroids.predict_rotation),
  with the covariance of the result;
- `predicted_region`: the pixels of one frame where the model's reflections
  fall (boxes around their predicted centroids, on the frames their rocking
  curves reach) plus a sample of the rest for the background. The Bragg
  term is rendered over the boxes only: elsewhere it is zero by
  construction, so the background sample costs no render.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn
from torch.func import functional_call

from .centroids import GEOMETRY_GROUPS, gauss_newton, observed_spots, predict_rotation, robust_rms
from .parameters import Parametrisation


@dataclass
class SweepSpots:
    """Observed spots of a sweep: panel, centroid (n, 3: x, y pixels, z
    frames from the start of the scan's first image, as DIALS's xyzobs.px),
    background-subtracted photons, and the first and last frame (from the
    scan's start) each was seen on."""
    panel: np.ndarray
    xyz: np.ndarray
    intensity: np.ndarray
    first: np.ndarray
    last: np.ndarray

    def __len__(self) -> int:
        return len(self.panel)


def sweep_spots(images, frames, valids=None, *, link: float = 5.0) -> SweepSpots:
    """Spots of measured frames `images` (each (panels, slow, fast) photons)
    at frame numbers `frames` (from the scan's start, consecutive or not):
    each frame's spots (observed_spots) joined with those of the next frame
    whose centroid lies within `link` pixels; the joined spot's centroid is
    weighted by the photons of each frame, a frame f counting as z = f + 0.5."""
    valids = [None] * len(images) if valids is None else valids
    order = np.argsort(np.asarray(frames))
    found = []
    for j in order:
        s = observed_spots(images[j], valids[j])
        found.append((int(frames[j]), s))
    offsets = np.cumsum([0] + [len(s) for _, s in found])
    n = int(offsets[-1])
    parent = np.arange(n)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in range(len(found) - 1):
        (fa, sa), (fb, sb) = found[a], found[a + 1]
        if fb != fa + 1 or not len(sa) or not len(sb):
            continue
        for p in np.intersect1d(sa.panel, sb.panel):
            ia, ib = np.nonzero(sa.panel == p)[0], np.nonzero(sb.panel == p)[0]
            tree = cKDTree(sb.xy[ib])
            for i, near in zip(ia, tree.query_ball_point(sa.xy[ia], link)):
                for j in near:
                    ra, rb = root(offsets[a] + i), root(offsets[a + 1] + ib[j])
                    if ra != rb:
                        parent[rb] = ra
    if n == 0:
        empty = np.zeros(0)
        return SweepSpots(empty.astype(int), np.zeros((0, 3)), empty, empty.astype(int), empty.astype(int))
    frame = np.concatenate([np.full(len(s), f) for f, s in found])
    panel = np.concatenate([s.panel for _, s in found])
    xy = np.concatenate([s.xy for _, s in found])
    w = np.concatenate([s.intensity for _, s in found])
    groups = np.array([root(i) for i in range(n)])
    ids, inverse = np.unique(groups, return_inverse=True)
    total = np.bincount(inverse, w)
    safe = np.maximum(total, 1e-300)
    xyz = np.stack([np.bincount(inverse, w * xy[:, 0]) / safe, np.bincount(inverse, w * xy[:, 1]) / safe,
                    np.bincount(inverse, w * (frame + 0.5)) / safe], 1)
    first = np.full(len(ids), np.iinfo(np.int64).max)
    last = np.full(len(ids), np.iinfo(np.int64).min)
    np.minimum.at(first, inverse, frame)
    np.maximum.at(last, inverse, frame)
    pan = np.zeros(len(ids), int)
    pan[inverse] = panel
    return SweepSpots(pan, xyz, total, first, last)


class _Unrotated(nn.Module):
    """A simulator's crystal, beam and detector before any rotation, for
    functional_call."""

    def __init__(self, sim):
        super().__init__()
        self.sim = sim

    def forward(self):
        sim = self.sim
        incident, lam = sim.beam.sources()
        origin, fast, slow, normal = sim.detector.panel_frames(sim.beam.incident())
        pixel = torch.stack([p.pixel_size for p in sim.detector.panels])
        return sim.crystal.real_vectors(), incident[0], lam[0], origin, fast, slow, normal, pixel


def index_sweep(sim, subs: dict, spots: SweepSpots, tolerance: float = 0.3):
    """Miller indices (n, 3) of sweep `spots` under the model (each spot's
    scattering vector turned back by the rotation at its z), and which of
    them index within `tolerance` of an integer on every axis and are the
    only spot of their reflection (else the brightest)."""
    with torch.no_grad():
        real, inc, lam, origin, fast, slow, normal, pixel = (
            t.double() for t in functional_call(_Unrotated(sim), {"sim." + k: v for k, v in subs.items()}, ()))
        p = torch.as_tensor(spots.panel, dtype=torch.long)
        xyz = torch.as_tensor(spots.xyz, dtype=torch.float64)
        pos = origin[p] + (xyz[:, :1] * pixel[p, :1]) * fast[p] + (xyz[:, 1:2] * pixel[p, 1:]) * slow[p]
        q = (pos / torch.linalg.norm(pos, dim=1, keepdim=True) - inc) / lam
        start, width = (float(v) for v in sim.scan.oscillation)
        rot = sim.goniometer.rotation(start + width * xyz[:, 2])  # (n, 3, 3)
        frac = torch.einsum("ni,nij,kj->nk", q, rot, real)
    frac = frac.cpu().numpy()
    hkl = np.rint(frac)
    ok = (np.abs(frac - hkl).max(1) < tolerance) & (np.abs(hkl).sum(1) > 0)
    brightest: dict = {}
    for i in np.nonzero(ok)[0]:
        key = tuple(hkl[i].astype(int))
        if key not in brightest or spots.intensity[i] > spots.intensity[brightest[key]]:
            brightest[key] = i
    ok[:] = False
    ok[list(brightest.values())] = True
    return hkl.astype(np.int64), ok


@dataclass
class RotationFit:
    """What `fit_rotation_centroids` found: the parameters, their
    covariance (from the Gauss-Newton normal matrix and the scatter of the
    residuals), which reflections the last round kept, and rms position
    (px) and angle (frames) residuals at the start and the end."""
    x: torch.Tensor
    covariance: torch.Tensor
    keep: torch.Tensor
    rms_px_start: float
    rms_px: float
    rms_frames_start: float
    rms_frames: float
    iterations: int

    @property
    def reflections(self) -> int:
        return int(self.keep.sum())


def fit_rotation_centroids(sim, subs_of, x0: torch.Tensor, hkl, panel, xyz, *, weights=None, rounds: int = 6,
                           iterations: int = 15, reject: float = 6.0) -> RotationFit:
    """Fit parameters `x0` (the model's substitutions are `subs_of(x)`) to
    observed centroids `xyz` (n, 3: x, y pixels, z frames) of reflections
    `hkl` (n, 3) on panels `panel` (n,) of a rotation scan, as dials.refine
    does: residuals from where each reflection crosses the Ewald sphere
    (predict_rotation), positions in pixels and angles in frames, each
    scaled by its robust rms at the start of each round, when reflections
    beyond `reject` of them are left out of the round and the others
    weighted by Tukey's biweight (every round judges every reflection
    afresh, so fits from different starts end on the same ones). `weights` (n, 3): per residual, 0 to leave one out (the angle of
    a spot cut by the sweep's ends)."""
    hkl = torch.as_tensor(np.asarray(hkl), dtype=torch.long)
    panel = torch.as_tensor(np.asarray(panel), dtype=torch.long)
    obs = torch.as_tensor(np.asarray(xyz), dtype=torch.float64)
    w = torch.ones_like(obs) if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float64)
    x = x0.detach().double().clone()

    def rms(d, wk):
        pos = float(torch.sqrt((d[:, :2] ** 2).sum(1).mean())) if len(d) else float("nan")
        z = d[:, 2][wk[:, 2] > 0]
        return pos, float(torch.sqrt((z ** 2).mean())) if len(z) else float("nan")

    with torch.no_grad():
        pred, found = predict_rotation(sim, subs_of(x), hkl, panel, obs[:, 2])
    start = rms((pred - obs)[found], w[found])
    keep, taken, scale = found, 0, torch.ones(3, dtype=torch.float64)
    tukey = torch.ones_like(obs)
    for _ in range(rounds):
        with torch.no_grad():
            pred, found = predict_rotation(sim, subs_of(x), hkl, panel, obs[:, 2])
        d = (pred - obs)[found]
        dz = d[:, 2][w[found][:, 2] > 0]
        scale = torch.tensor([max(robust_rms(d[:, 0]), 0.05), max(robust_rms(d[:, 1]), 0.05),
                              max(robust_rms(dz), 0.01) if len(dz) else 1.0], dtype=torch.float64)
        z = (pred - obs).abs() * (w > 0) / scale
        keep = found & ~(z >= reject).any(1)
        # Tukey's biweight: a residual weighs less the nearer it is to the rejection limit and
        # nothing there, so that a reflection crossing it moves nothing and fits from
        # different starts end alike
        tukey = (1 - torch.clamp(z / reject, max=1.0) ** 2) ** 2
        if int(keep.sum()) < 3:
            break
        h, p, o, near, wk = hkl[keep], panel[keep], obs[keep], obs[keep, 2], w[keep] * tukey[keep]

        def residual(v):
            return ((predict_rotation(sim, subs_of(v), h, p, near)[0] - o) * wk / scale).reshape(-1)

        x, steps = gauss_newton(residual, x, None, iterations)
        taken += steps
    with torch.no_grad():
        pred, found = predict_rotation(sim, subs_of(x), hkl, panel, obs[:, 2])
    keep = keep & found
    d = (pred - obs)[keep]
    end = rms(d, w[keep])
    covariance = _covariance(lambda v: ((predict_rotation(sim, subs_of(v), hkl[keep], panel[keep], obs[keep, 2])[0]
                                         - obs[keep]) * w[keep] * tukey[keep] / scale).reshape(-1), x)
    return RotationFit(x.detach(), covariance, keep, start[0], end[0], start[1], end[1], taken)


def fit_sweep_centroids(sim, hkl, panel, xyz, groups, **kw) -> tuple[RotationFit, list]:
    """fit_rotation_centroids of the geometric groups among `groups` (names
    or groups) of `sim`, from its current values: (fit, internal labels);
    the fit's x goes to the model through Parametrisation(geometric, sim)."""
    names = [g for g in groups if (g if isinstance(g, str) else g.name) in GEOMETRY_GROUPS]
    param = Parametrisation(names, sim)
    fit = fit_rotation_centroids(sim, lambda v: param.substitutions(sim, v), torch.zeros(param.size,
                                 dtype=torch.float64), hkl, panel, xyz, **kw)
    return fit, list(param.labels)


def _covariance(residual, x: torch.Tensor) -> torch.Tensor:
    """(J^T J)^-1 times the residuals' variance per degree of freedom: the
    least-squares covariance with weights scaled by the scatter found."""
    from .centroids import forward_jacobian
    with torch.no_grad():
        r = residual(x)
    J = forward_jacobian(residual, x, torch.ones(x.numel(), dtype=torch.bool), r)
    dof = max(r.numel() - x.numel(), 1)
    return torch.linalg.pinv(J.T @ J) * float((r * r).sum()) / dof


# ----------------------------------------------------------------------------- regions

def reflections_of(sim, spots_hkl=None, limit: int = 200000) -> torch.Tensor:
    """Miller indices (n, 3) whose spots the model can show: where a
    structure-factor table without a default holds them, its non-zero
    entries; otherwise every reflection out to the detector's resolution
    (at most `limit`). `spots_hkl` (indexed observed spots) are added."""
    sf = sim.crystal.structure_factors
    rows = []
    with torch.no_grad():
        if sf.has_grid and float(sf.default_F) == 0.0:
            grid = sf.Fhkl.detach()
            idx = torch.nonzero(grid != 0)
            rows.append(idx.cpu() + sf.hkl_min.detach().cpu()[None, :])
        else:
            real = sim.crystal.real_vectors().detach().double()
            _, lam = sim.beam.sources()
            origin, fast, slow, _ = sim.detector.panel_frames(sim.beam.incident())
            cosines = []
            for k, p in enumerate(sim.detector.panels):
                for cf, cs in ((0, 0), (1, 0), (0, 1), (1, 1)):
                    corner = (origin[k] + cf * p.fpixels * p.pixel_size[0] * fast[k]
                              + cs * p.spixels * p.pixel_size[1] * slow[k]).double()
                    cosines.append(float(torch.dot(corner / torch.linalg.norm(corner),
                                                   sim.beam.incident().double())))
            # the widest scattering angle on the detector (a corner, or past the beam's foot)
            s_max = math.sqrt(max(0.0, 2.0 - 2.0 * min(cosines))) / float(lam[0])
            hmax = [int(math.ceil(s_max * float(torch.linalg.norm(real[i])))) for i in range(3)]
            if np.prod([2 * h + 1 for h in hmax]) > 50 * limit:
                raise ValueError(f"too many reflections to predict ({np.prod([2 * h + 1 for h in hmax]):.3g})")
            axes = [torch.arange(-h, h + 1) for h in hmax]
            grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
            q = torch.linalg.norm(grid.double() @ torch.linalg.inv(real).T, dim=1)
            grid = grid[(q <= s_max) & (q > 0)]
            if len(grid) > limit:
                raise ValueError(f"too many reflections to predict ({len(grid)})")
            rows.append(grid)
    if spots_hkl is not None and len(spots_hkl):
        rows.append(torch.as_tensor(np.asarray(spots_hkl), dtype=torch.long))
    hkl = torch.unique(torch.cat(rows).long(), dim=0)
    return hkl[hkl.abs().sum(1) > 0]


def rocking_frames(sim) -> float:
    """How many frames either side of its centroid a reflection's spot
    reaches: three mosaic spreads (with the beam's divergence) plus one."""
    width = abs(float(sim.scan.oscillation[1]))
    spread = float(sim.crystal.mosaic_spread) if sim.crystal.mosaic_domains > 1 else 0.0
    divergence = math.degrees(float(sim.beam.divergence.detach().abs().max())) / 2.0  # full range: half of it
    return 1.0 + 3.0 * math.hypot(spread, divergence) / max(width, 1e-9)


def predicted_positions(sim, subs: dict, hkl: torch.Tensor, frames, margin: int = 7) -> tuple:
    """For each frame f (from the scan's start) of `frames`: the predicted
    centroids (x, y pixels, z frames) and panels of the reflections `hkl`
    crossing nearest to the frame's middle, as (xyz, panel, found) lists;
    a reflection's panel is the first whose pixels, grown by `margin`, its
    ray meets (found: it crosses the sphere and meets one)."""
    out = []
    n = len(hkl)
    with torch.no_grad():
        for f in frames:
            near = torch.full((n,), f + 0.5, dtype=torch.float64)
            xyz = torch.zeros(n, 3, dtype=torch.float64)
            panel = torch.zeros(n, dtype=torch.long)
            found = torch.zeros(n, dtype=torch.bool)
            for k, p in enumerate(sim.detector.panels):
                at, crossed = predict_rotation(sim, subs, hkl, torch.full((n,), k, dtype=torch.long), near)
                on = crossed & ~found & (at[:, 0] >= -margin) & (at[:, 0] < p.fpixels + margin) & \
                    (at[:, 1] >= -margin) & (at[:, 1] < p.spixels + margin)
                xyz[on] = at[on]
                panel[on] = k
                found |= on
            out.append((xyz, panel, found))
    return out


def predicted_region(sim, xyz: torch.Tensor, panel: torch.Tensor, found: torch.Tensor, frame: int,
                     valid=None, *, reach: float = 2.0, radius: int = 7, background: int = 4000, seed: int = 0,
                     data=None):
    """(bragg, region) masks (panels, slow, fast) of one frame: `bragg`, the
    pixels within `radius` of the predicted centroid of every reflection
    whose z lies within `reach` frames of the frame (and, given `data`, its
    bright pixels grown by two); `region`, those plus `background` valid
    pixels drawn from the rest (seeded)."""
    shape = (len(sim.detector.panels), sim.detector.panels[0].spixels, sim.detector.panels[0].fpixels)
    bragg = torch.zeros(shape, dtype=torch.bool)
    z = xyz[:, 2]
    near = found & ((z - (frame + 0.5)).abs() <= reach + 0.5)
    for x, y, k in zip(xyz[near, 0].tolist(), xyz[near, 1].tolist(), panel[near].tolist()):
        f0, s0 = int(math.floor(x)), int(math.floor(y))
        if -radius <= f0 < shape[2] + radius and -radius <= s0 < shape[1] + radius:
            bragg[k, max(s0 - radius, 0):s0 + radius + 1, max(f0 - radius, 0):f0 + radius + 1] = True
    if data is not None:
        from .roi import bright_pixels, grow
        bragg |= grow(bright_pixels(torch.as_tensor(data)).cpu(), 2)
    ok = torch.ones(shape, dtype=torch.bool) if valid is None else torch.as_tensor(valid).cpu().bool()
    bragg &= ok
    rest = torch.nonzero((ok & ~bragg).reshape(-1)).flatten()
    region = bragg.clone()
    if len(rest):
        g = np.random.default_rng(seed + frame)
        pick = torch.as_tensor(g.choice(len(rest), size=min(background, len(rest)), replace=False))
        region.view(-1)[rest[pick]] = True
    return bragg, region
