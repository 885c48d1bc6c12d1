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

Only the pixels of the region of interest are rendered (`roi.spot_region`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call

from .centroids import GEOMETRY_GROUPS, fit_centroids
from .fit import expected_deviance
from .parameters import Background, Parametrisation, Scale
from .refiner import assign
from .roi import mask_substitutions, spot_region
from .steps import levenberg_marquardt, poisson_deviance


@dataclass
class StillFit:
    """What `refine_still` found: labels, x (internal vector, start 0) and
    its covariance (the inverse Fisher information of the Poisson fit);
    physical values (start, value, sigma) per physical label; loss: half
    the Poisson deviance at the end over the region's `pixels`;
    deviance_z: the deviance above its expectation for a right model, in
    standard deviations, over the pixels the refined model picks; renders
    and seconds of each stage;
    converged: the steps stopped on their tolerance and the deviance is
    within MAX_DEVIANCE_Z of its expectation (else a wrong minimum)."""
    labels: list
    x: torch.Tensor
    covariance: torch.Tensor
    parameters: list
    loss: float
    pixels: int
    renders: int
    seconds: float
    converged: bool
    deviance_z: float = float("nan")
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


def deviance_z(model: torch.Tensor, data: torch.Tensor) -> float:
    """The Poisson deviance of `data` given `model` (1-D) in standard
    deviations above what photon noise gives for a right model."""
    mean, var = expected_deviance(model)
    dev = float(2.0 * poisson_deviance(model, data))
    return (dev - float(mean.sum())) / math.sqrt(max(float(var.sum()), 1e-300))


# a fit whose deviance lies further above its expectation ends in a wrong minimum
MAX_DEVIANCE_Z = 5.0
RESTART_TURN = 0.05  # degree: the neighbours' turn, under a spot's angular width


def refine_still(sim, data, groups, valid=None, *, write: bool = True, centroids: bool = True,
                 max_iter: int = 30, restarts: bool = True) -> StillFit:
    """Refine parameter `groups` of simulator `sim` (rendered as it is:
    a still, or its first scan image) against measured photons `data`
    (panels, slow, fast): centroids, then the pixels coarse (Anscombe) and
    fine (Poisson), by Levenberg-Marquardt steps; writes the refined values
    into `sim` unless write=False. valid: pixels that may be used.
    "background" starts at the median of the pixels outside the spots.
    restarts: when the fit's deviance is beyond MAX_DEVIANCE_Z of its
    expectation, fit again from six neighbours of the centroid solution
    (turned by RESTART_TURN about each lab axis) and keep the best."""
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
    known = linear_columns(param, work, region)

    def pixels(x0):
        return levenberg_marquardt(expected, measured, x0, phases=(("anscombe", 1.0), ("poisson", 1e-2)),
                                   max_iter=max_iter, known=known)

    def judged(x):
        """The deviance z of the fit over the region's pixels its model picks:
        those the data picked are biased upwards by the noise that picked them."""
        with torch.no_grad():
            subs = param.substitutions(work, x)
            model = functional_call(work, subs, ())
            extra = param.image_terms(work, x, model.shape)
            model = (model if extra is None else model + extra).double()
        use = region & spot_region(model, None, valid)
        return deviance_z(model[use], d[use])

    fine = pixels(x_start)
    renders = fine.renders
    stages.append(dict(stage="pixels", iterations=fine.iterations, renders=fine.renders, loss=fine.loss,
                       seconds=time.perf_counter() - t, deviance_z=judged(fine.x)))
    if restarts and stages[-1]["deviance_z"] > MAX_DEVIANCE_Z:
        # a wrong minimum: start again from the neighbours of the centroid solution,
        # turned about each axis by a fraction of a spot's angular width, keep the best
        t = time.perf_counter()
        labels = param.labels
        tried = []
        for axis in ("x", "y", "z"):
            if f"orientation.{axis}" not in labels:
                continue
            for sign in (1.0, -1.0):
                x0 = x_start.clone()
                x0[labels.index(f"orientation.{axis}")] += sign * RESTART_TURN / 0.01
                tried.append(pixels(x0))
        if tried:
            best = min(tried, key=lambda r: r.loss)
            renders += sum(r.renders for r in tried)
            if best.loss < fine.loss:
                fine = best
            stages.append(dict(stage="restarts", starts=len(tried), renders=sum(r.renders for r in tried),
                               loss=fine.loss, seconds=time.perf_counter() - t, deviance_z=judged(fine.x)))
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
    z = stages[-1]["deviance_z"]
    return StillFit(labels=list(param.labels), x=fine.x, covariance=cov, parameters=params, loss=fine.loss,
                    pixels=int(region.sum()), renders=renders + 1, seconds=time.perf_counter() - t0,
                    converged=fine.converged and z <= MAX_DEVIANCE_Z, deviance_z=z, stages=stages)


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
