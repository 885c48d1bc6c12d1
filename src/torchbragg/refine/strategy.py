"""A refinement strategy that holds from faint to bright images: spot
centroids first, then the pixels by second-order steps, coarse to fine.

1. Centroids (`centroids.fit_centroids`): orientation, cell, beam centre
   and detector from the observed spots' centroids; no render, robust to
   intensity, wide basin (a few pixels).
2. Pixels, coarse: Levenberg-Marquardt on variance-stabilised counts
   (`steps.anscombe_distance`), which stays smooth where a bright model
   spot's shape transform has nodes that the measured spot fills.
3. Pixels, fine: Levenberg-Marquardt on the Poisson likelihood, whose
   Fisher information at the minimum gives the covariance.

Only the pixels of the region of interest are rendered (`spot_region`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.func import functional_call

from .centroids import GEOMETRY_GROUPS, fit_centroids, local_background
from .parameters import Background, Parametrisation, Scale
from .refiner import assign
from .roi import mask_substitutions
from .steps import levenberg_marquardt


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
    carry little of the spots' position."""
    m = model.detach().double().cpu().numpy()
    d = data.detach().double().cpu().numpy()
    ok = np.ones(d.shape, bool) if valid is None else np.asarray(valid.cpu(), bool)
    out = np.zeros(d.shape, bool)
    for k in range(d.shape[0]):
        bg = local_background(d[k], ok[k])
        excess = d[k] - bg
        peak = ndimage.maximum_filter(excess, size=window)
        out[k] = (excess > np.maximum(sigmas * np.sqrt(bg + 1.0), fraction * peak)) & ok[k] \
            & (peak >= faintest * float(peak[ok[k]].max() if ok[k].any() else 0.0))
        mk = m[k] - np.median(m[k])
        mpeak = ndimage.maximum_filter(mk, size=window)
        out[k] |= (mk >= fraction * mpeak) & (mpeak >= faintest * max(float(mk.max()), 1e-300)) & (mk > 0)
    region = torch.as_tensor(out)
    if dilate > 0:
        region = F.max_pool2d(region.double().unsqueeze(1), 2 * dilate + 1, stride=1, padding=dilate).squeeze(1) > 0
    if background_fraction > 0:
        rng = np.random.default_rng(seed)
        region |= torch.as_tensor(rng.random(d.shape) < background_fraction)
    return region & torch.as_tensor(ok)


@dataclass
class StillFit:
    """What `refine_still` found: labels, x (internal vector, start 0) and
    its covariance (the inverse Fisher information of the Poisson fit);
    physical values (start, value, sigma) per physical label; half the
    Poisson deviance at the end and its expectation for a right model
    (`goodness`: their difference in standard deviations); renders and
    seconds of each stage; converged: the last stage stopped on its
    tolerance."""
    labels: list
    x: torch.Tensor
    covariance: torch.Tensor
    parameters: list
    loss: float
    pixels: int
    renders: int
    seconds: float
    converged: bool
    stages: list = field(default_factory=list)

    def value(self, name):
        for p in self.parameters:
            if p["name"] == name:
                return p
        raise KeyError(name)


def linear_columns(param, sim, region):
    """known(x, mu) for levenberg_marquardt: the derivatives that need no
    render over the pixels of `region`: the scale's (the whole render is
    proportional to the fluence: step times the photons without the added
    image terms) and a constant background's (one on its panel's pixels)."""
    offsets = np.cumsum([0] + param.sizes[:-1]).tolist()
    panel_of = torch.nonzero(region)[:, 0]

    def known(x, mu):
        cols = {}
        for g, off in zip(param.groups, offsets):
            if isinstance(g, Scale):
                extra = param.image_terms(sim, x, region.shape)
                bragg = mu if extra is None else mu - extra[region]
                cols[off] = g.step * bragg
            elif isinstance(g, Background) and not g.linear:
                for k in range(g.panels):
                    cols[off + k] = (panel_of == k).double()
        return cols

    return known


def _background_start(data, region) -> list:
    """Per panel: the median of the measured photons outside the spots."""
    return [float(data[k][~region[k]].median()) if bool((~region[k]).any()) else 0.0 for k in range(data.shape[0])]


def refine_still(sim, data, groups, valid=None, *, write: bool = True, centroids: bool = True,
                 max_iter: int = 30) -> StillFit:
    """Refine parameter `groups` of simulator `sim` (rendered as it is:
    a still, or its first scan image) against measured photons `data`
    (panels, slow, fast): centroids, then the pixels coarse (Anscombe) and
    fine (Poisson), by Levenberg-Marquardt steps; writes the refined values
    into `sim` unless write=False. valid: pixels that may be used.
    "background" starts at the median of the pixels outside the spots."""
    t0 = time.perf_counter()
    d = torch.as_tensor(np.asarray(data) if not torch.is_tensor(data) else data).detach().double()
    if d.dim() == 2:
        d = d.unsqueeze(0)
    work = copy.deepcopy(sim).double()
    stages = []
    x0 = None
    geometric = [g for g in groups if (g if isinstance(g, str) else g.name) in GEOMETRY_GROUPS]
    if centroids and geometric:
        t = time.perf_counter()
        fit = fit_centroids(work, d, geometric, valid)
        x0 = dict(zip(fit.labels, fit.x.tolist()))
        stages.append(dict(stage="centroids", spots=fit.spots, rms_start_px=fit.rms_start, rms_px=fit.rms,
                           iterations=fit.iterations, renders=0, seconds=time.perf_counter() - t))
    probe = Parametrisation([g for g in groups if (g if isinstance(g, str) else g.name) != "background"], work)
    xp = torch.tensor([(x0 or {}).get(lab, 0.0) for lab in probe.labels], dtype=torch.float64)
    with torch.no_grad():
        start_model = functional_call(work, probe.substitutions(work, xp), ()).double()
    region = spot_region(start_model, d, valid)
    groups = [Background(start=_background_start(d, region)) if g == "background" else g for g in groups]
    param = Parametrisation(groups, work)
    x_start = torch.tensor([(x0 or {}).get(lab, 0.0) for lab in param.labels], dtype=torch.float64)
    subs_region = mask_substitutions(region)
    measured = d[region]

    def expected(x):
        subs = param.substitutions(work, x)
        subs.update(subs_region)
        model = functional_call(work, subs, ())
        extra = param.image_terms(work, x, model.shape)
        return (model if extra is None else model + extra)[region]

    t = time.perf_counter()
    fine = levenberg_marquardt(expected, measured, x_start, phases=(("anscombe", 1.0), ("poisson", 1e-2)),
                               max_iter=max_iter, known=linear_columns(param, work, region))
    stages.append(dict(stage="pixels", iterations=fine.iterations, renders=fine.renders, loss=fine.loss,
                       seconds=time.perf_counter() - t))
    cov = torch.linalg.pinv(fine.fisher)
    jac = torch.autograd.functional.jacobian(lambda v: param.physical(work, v), fine.x)
    psig = torch.sqrt(torch.clamp(torch.diagonal(jac @ cov @ jac.T), min=0.0))
    start_vals = param.physical(work, torch.zeros(param.size, dtype=torch.float64))
    values = param.physical(work, fine.x)
    params = [dict(group=group, name=name, unit=unit, start=s, value=v, sigma=e)
              for (group, name, unit), s, v, e in zip(param.physical_labels(), start_vals.tolist(), values.tolist(),
                                                      psig.tolist())]
    if write:
        assign(sim, param.substitutions(sim, fine.x.to(sim.dtype)))
    return StillFit(labels=list(param.labels), x=fine.x, covariance=cov, parameters=params, loss=fine.loss,
                    pixels=int(region.sum()), renders=fine.renders + 1,
                    seconds=time.perf_counter() - t0, converged=fine.converged, stages=stages)


# ----------------------------------------------------------------------------- stages of the engine

def still_strategy(names, max_iter: int = 30) -> list[dict]:
    """Centroids of the geometric groups (when any is refined), then every
    group by Levenberg-Marquardt steps (Anscombe, then Poisson)."""
    names = list(names)
    geometric = [g for g in names if g in GEOMETRY_GROUPS]
    stages = [dict(kind="centroids", groups=geometric)] if geometric else []
    stages.append(dict(kind="steps", groups=names, max_iter=max_iter))
    return stages


def centroid_stage(engine, sims, x, stage, masks, datas):
    """An engine stage of kind "centroids": each entry's geometric groups
    fitted to its observed spot centroids (fit_centroids), added to `x`.
    Groups shared by several entries are left to the pixel stages."""
    t0 = time.perf_counter()
    x_new = x.clone()
    fits = []
    for k, entry in enumerate(engine.entries):
        bound = [b for b in engine.bound[k] if b.group.name in stage["groups"] and b.group.name in GEOMETRY_GROUPS
                 and (len(b.entries) == 1 or len(engine.entries) == 1)]
        if not bound:
            continue
        sim = sims[k]
        valid = engine.valid[k]
        fit = fit_centroids(sim, datas[k].double(), [b.group for b in bound], valid,
                            image=None if entry.still else entry.image)
        for b in bound:
            for j, label in enumerate(b.group.labels):
                x_new[b.offset + j] += float(fit.x[fit.labels.index(label)])
        fits.append(dict(image=k, spots=fit.spots, rms_start_px=fit.rms_start, rms_px=fit.rms,
                         iterations=fit.iterations))
    ok = all(np.isfinite(f["rms_px"]) for f in fits)
    info = dict(kind="centroids", groups=list(stage["groups"]), renders=0, iterations=sum(f["iterations"] for f in fits),
                loss=float("nan"), seconds=time.perf_counter() - t0, converged=ok, images=fits)
    return (x_new if ok else x), info


def steps_stage(engine, sims, x, stage, masks, datas):
    """An engine stage of kind "steps": the stage's groups by Levenberg-
    Marquardt steps (Anscombe, then Poisson) over the entries they touch,
    rendered in float64 (`sims`) over each entry's region; the priors are
    Gaussian restraints, the bounds are not applied."""
    t0 = time.perf_counter()
    active, touched = engine._active(stage["groups"])
    idx = torch.tensor(active, dtype=torch.long, device=x.device)
    base = x.double()

    def expected(v):
        full = base.index_put((idx,), v.to(base))
        return torch.cat([engine.model(k, sims[k], full, masks[k])[masks[k]] for k in touched])

    measured = torch.cat([datas[k].double()[masks[k]] for k in touched])
    prec = torch.zeros(len(active), dtype=torch.float64)
    mean = torch.zeros(len(active), dtype=torch.float64)
    for j, i in enumerate(active):
        if i in engine.priors:
            mean[j], prec[j] = engine.priors[i][0], 1.0 / engine.priors[i][1] ** 2

    def progress(line):
        if engine.progress is not None:
            engine.progress(dict(stage="steps", image=None, evaluation=len(engine.history), loss=float("nan"),
                                 dtype="float64", message=line))

    res = levenberg_marquardt(expected, measured, base[idx].cpu(), phases=(("anscombe", 1.0), ("poisson", 1e-2)),
                              max_iter=int(stage.get("max_iter", 30)), prior_precision=prec, prior_mean=mean,
                              progress=progress)
    engine.renders += res.renders * len(touched)
    engine.history.extend(res.loss_history)
    x_new = x.clone()
    x_new[idx] = res.x.to(x)
    info = dict(kind="steps", groups=list(stage["groups"]), dtype="float64", iterations=res.iterations,
                renders=res.renders * len(touched), loss=res.loss, seconds=time.perf_counter() - t0,
                converged=res.converged)
    return x_new, info


STAGE_KINDS = {"centroids": centroid_stage, "steps": steps_stage}


# ----------------------------------------------------------------------------- measured frames

FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))  # of a Gaussian, in standard deviations


def profile_flags(profile: dict | None, oscillation_width: float | None = None) -> list[str]:
    """nanoBragg flags for the spot shapes DIALS measured: its profile block
    (gaussian_rs: sigma_m, the rocking width of the mosaic, and sigma_b,
    the beam divergence, standard deviations in degrees) as -mosaic (the
    spread, deg) with 25 domains and -divergence (the full range, mrad: the
    FWHM) with 3 steps each way; and, for a rotation image of
    `oscillation_width` degrees, -phisteps so that steps of at most half
    sigma_m sample the rocking curve (the default of one step renders each
    image at its start angle). Empty when there is no profile."""
    if not profile or "sigma_m" not in profile:
        return []
    sigma_m, sigma_b = float(profile["sigma_m"]), float(profile.get("sigma_b", 0.0))
    flags = ["-mosaic", f"{sigma_m:.6g}", "-mosaic_dom", "25"]
    if sigma_b > 0:
        flags += ["-divergence", f"{math.radians(sigma_b) * 1e3 * FWHM:.6g}", "-divsteps", "3"]
    if oscillation_width and sigma_m > 0:
        flags += ["-phisteps", str(max(1, math.ceil(abs(oscillation_width) / (0.5 * sigma_m))))]
    return flags
