"""Fitting a simulator to measured images: L-BFGS over the internal vector
of a parametrisation, staged and coarse to fine, with uncertainties from the
curvature of the negative log-likelihood at the minimum.

Precision: the stages run with the simulator cast to the first dtype of
`dtype_schedule` (float32 by default: fast, but a float32 render stops a few
standard uncertainties short of the minimum), and the last stage is repeated
with the simulator cast to the last dtype (float64), where the curvature is
also computed. The user's models are copied for each precision, never
mutated during the fit; `write` puts the refined values into them at the end.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call

from .losses import LOSSES
from .parameters import Background, Parametrisation
from .roi import mask_substitutions, roi_mask

DTYPES = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
          torch.float64: torch.float64}


@dataclass
class ParameterResult:
    """One reported value: start, refined value and standard uncertainty."""
    group: str
    name: str
    unit: str
    start: float
    value: float
    sigma: float


@dataclass
class RefinementResult:
    """What a refinement found.

    labels / x / sigma_internal: internal parameters (units in
    parameters.py), their refined values (start: 0) and standard
    uncertainties; covariance and correlation: (n, n) over them.
    parameters: the physical values (start, refined, uncertainty, unit).
    undetermined: internal labels the data cannot determine (near-zero
    curvature or an uncertainty beyond `undetermined_sigma` internal units).
    loss_history: the loss at every evaluation; renders: forward+backward
    renders of the fit (the curvature's are counted in hessian_renders);
    converged: the last stage stopped on its tolerances before max_iter;
    hessian_renders: forward plus backward passes of the curvature."""
    labels: list
    x: torch.Tensor
    sigma_internal: torch.Tensor
    covariance: torch.Tensor
    correlation: torch.Tensor
    parameters: list
    loss: float
    loss_history: list
    renders: int
    converged: bool
    undetermined: list
    stages: list = field(default_factory=list)
    background: dict = field(default_factory=dict)
    seconds: float = 0.0
    hessian_renders: int = 0
    pixels: int = 0

    def value(self, name: str) -> ParameterResult:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_dict(self) -> dict:
        return dict(parameters=[vars(p) for p in self.parameters], labels=list(self.labels),
                    x=self.x.tolist(), sigma_internal=self.sigma_internal.tolist(),
                    correlation=self.correlation.tolist(), loss=self.loss, loss_history=list(self.loss_history),
                    renders=self.renders, hessian_renders=self.hessian_renders, converged=self.converged,
                    undetermined=list(self.undetermined), stages=list(self.stages), seconds=self.seconds,
                    pixels=self.pixels)

    def summary(self) -> str:
        lines = [f"loss {self.loss:.3f}, {self.renders} renders, {self.seconds:.1f} s, "
                 f"{'converged' if self.converged else 'NOT converged'}"]
        for p in self.parameters:
            lines.append(f"  {p.name:>24s} {p.start:14.6g} -> {p.value:14.6g} +- {p.sigma:.3g} {p.unit}")
        if self.undetermined:
            lines.append("  undetermined: " + ", ".join(self.undetermined))
        return "\n".join(lines)


def default_strategy(names, broaden: float = 0.5, max_iter: int = 60) -> list[dict]:
    """Staged, coarse to fine: with spots broadened (N times `broaden`
    squared, then times `broaden`, at least 3) fit scale (+ background),
    then orientation and the beam centre, then the cell; with the real spot shape orientation again, then
    N, then every chosen group together. Stages whose groups were not chosen
    are left out; scale and background join every stage they were chosen for."""
    names = list(names)
    always = [g for g in ("scale", "background") if g in names]
    coarse = broaden * broaden if broaden else None
    plan = [
        (always, coarse),
        (["orientation", "beam_centre"] + always, coarse),
        (["orientation", "beam_centre"] + always, broaden),
        (["orientation", "beam_centre", "cell"] + always, broaden),
        (["orientation"] + always, None),
        (["N", "mosaic"] + always, None),
    ]
    stages, seen = [], set()
    for groups, b in plan:
        chosen = [g for g in groups if g in names]
        key = (tuple(chosen), b)
        if not chosen or key in seen or (b and not any(g not in always for g in chosen) and stages):
            continue
        seen.add(key)
        stages.append(dict(groups=chosen, broaden=b, max_iter=max_iter))
    stages.append(dict(groups=names, broaden=None, max_iter=2 * max_iter))
    return stages


def as_data(data, shape, dtype):
    """Measured photons as a tensor of the image shape (panels, slow, fast)."""
    if data is None:
        raise ValueError("no data to refine against")
    d = data if torch.is_tensor(data) else torch.as_tensor(np.asarray(data))
    if d.dim() == 2 and shape[0] == 1:
        d = d.unsqueeze(0)
    if tuple(d.shape) != tuple(shape):
        raise ValueError(f"data shape {tuple(d.shape)} does not match the simulator's image shape "
                         f"{tuple(shape)} (panels, slow, fast)")
    d = d.detach().to(dtype)
    if not bool(torch.isfinite(d).all()):
        raise ValueError("data contain NaN or infinite values; mask them with roi= instead")
    return d


class Refiner:
    """Refines the models of `sim` against `data` (panels, slow, fast photons).

    groups: parameter group names or Group instances (parameters.GROUPS).
    loss: "poisson" or "gaussian" (loss_options: read_noise, gain) or a
    callable loss(model, data, mask). roi: boolean (panels, slow, fast) mask,
    None for roi.roi_mask(sim, data), or "all". priors: {internal label:
    (mean, sigma)} Gaussian restraints in internal units. bounds: {internal
    label: (low, high)} soft bounds in internal units (a steep quadratic
    penalty outside). strategy: "default" (default_strategy), None (one
    stage of all groups) or a list of stage dicts (groups, broaden,
    max_iter). max_iter: L-BFGS iterations per stage."""

    def __init__(self, sim, data, groups, *, loss="poisson", roi=None, priors=None, bounds=None, max_iter=60,
                 dtype_schedule=("float32", "float64"), strategy="default", loss_options=None, broaden=0.5,
                 uncertainties=True, undetermined_sigma=1e4, precondition=True, verbose=False):
        if not groups:
            raise ValueError("no parameter groups to refine")
        self.sim = sim
        with torch.no_grad():
            shape = (len(sim.detector.panels), sim.detector.panels[0].spixels, sim.detector.panels[0].fpixels)
        self.data = as_data(data, shape, torch.float64)
        self.param = Parametrisation(groups, sim)
        if callable(loss):
            self.loss_fn = loss
        elif loss in LOSSES:
            self.loss_fn = LOSSES[loss]
        else:
            raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)} (or a callable)")
        self.loss_options = dict(loss_options or {})
        try:
            self.dtypes = [DTYPES[d] for d in dtype_schedule]
        except KeyError as exc:
            raise ValueError(f"unknown dtype {exc.args[0]!r} in dtype_schedule; use float32 or float64") from None
        if isinstance(roi, str) and roi == "all":
            roi = torch.ones(shape, dtype=torch.bool)
        if roi is not None:
            roi = torch.as_tensor(roi, dtype=torch.bool)
            if tuple(roi.shape) != shape:
                raise ValueError(f"roi shape {tuple(roi.shape)} does not match the image shape {shape}")
        self.roi = roi
        self.priors = self._by_label(priors or {}, "priors")
        self.bounds = self._by_label(bounds or {}, "bounds")
        names = [g.name for g in self.param.groups]
        self.stages = resolve_stages(strategy, names, broaden, max_iter, default_strategy)
        self.uncertainties = uncertainties
        self.precondition = precondition
        self.undetermined_sigma = undetermined_sigma
        self.verbose = verbose
        self.renders = 0
        self.history: list[float] = []
        self.oversample: int | None = None  # re-derived automatic oversampling, written back with the values

    def _by_label(self, spec, what):
        out = {}
        for label, (a, b) in spec.items():
            if label not in self.param.labels:
                raise ValueError(f"{what}: no parameter {label!r}; the refined ones are {self.param.labels}")
            out[self.param.labels.index(label)] = (float(a), float(b))
        return out

    # ------------------------------------------------------------------ objective
    def _model(self, sim, x, mask, broaden=None):
        """Expected photons (panels, slow, fast) for internal vector `x`,
        rendered over the mask only, with spots broadened when asked."""
        subs = self.param.substitutions(sim, x)
        if broaden:
            n = subs.get("crystal.N", sim.crystal.N.to(x.dtype))
            nb = torch.clamp(n * broaden, min=3.0)
            ratio = (n / nb).detach().prod()
            subs["crystal.N"] = nb
            subs["beam.fluence"] = subs.get("beam.fluence", sim.beam.fluence.to(x.dtype)) * ratio
        subs.update(mask_substitutions(mask))
        model = functional_call(sim, subs, ())
        extra = self.param.image_terms(sim, x, model.shape)
        return model if extra is None else model + extra

    def _objective(self, sim, x, mask, data, broaden=None):
        loss = self.loss_fn(self._model(sim, x, mask, broaden), data, mask, **self.loss_options)
        for i, (mean, sigma) in self.priors.items():
            loss = loss + 0.5 * ((x[i] - mean) / sigma) ** 2
        for i, (lo, hi) in self.bounds.items():
            loss = loss + 1e4 * (torch.relu(lo - x[i]) ** 2 + torch.relu(x[i] - hi) ** 2)
        return loss

    def _stage(self, sim, x_master, stage, mask, data, dtype):
        names = stage["groups"]
        idx = []
        offset = 0
        for g, n in zip(self.param.groups, self.param.sizes):
            if g.name in names:
                idx.extend(range(offset, offset + n))
            offset += n
        base = x_master.to(dtype)
        idx = torch.tensor(idx, dtype=torch.long, device=base.device)
        broaden = stage.get("broaden")
        scale = self._preconditioner(sim, base, idx, mask, data, broaden)
        x0 = base[idx].clone()
        xs = torch.zeros_like(x0).requires_grad_(True)
        max_iter = int(stage.get("max_iter", 60))
        opt = torch.optim.LBFGS([xs], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.5) + 5,
                                history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-2 if dtype == torch.float32 else 1e-3, tolerance_change=1e-9)

        def closure():
            opt.zero_grad()
            x = base.index_put((idx,), x0 + scale * xs)
            loss = self._objective(sim, x, mask, data, broaden)
            loss.backward()
            self.renders += 1
            self.history.append(float(loss.detach()))
            return loss

        return run_stage(self, opt, closure, xs, x_master, idx, x0, scale, names, broaden, dtype, max_iter)

    def _preconditioner(self, sim, base, idx, mask, data, broaden):
        """Per-parameter step scales 1 / sqrt(curvature) at the stage's start,
        so that L-BFGS sees a problem of unit scale. The curvature is the
        diagonal of the Fisher information (always positive, unlike the
        Hessian far from the minimum), estimated from a few backward passes."""
        if not self.precondition:
            return torch.ones(len(idx), dtype=base.dtype, device=base.device)
        v = base[idx].clone().requires_grad_(True)
        model = self._model(sim, base.index_put((idx,), v), mask, broaden)
        d = fisher_diagonal(model[mask], v)
        self.renders += 1
        for j, i in enumerate(idx.tolist()):
            if i in self.priors:
                d[j] += 1.0 / self.priors[i][1] ** 2
        ok = torch.isfinite(d) & (d > 0)
        scale = torch.where(ok, 1.0 / torch.sqrt(torch.where(ok, d, torch.ones_like(d))), torch.ones_like(d))
        if self.verbose:
            print("curvature", d.tolist())
        return torch.clamp(scale, 1e-4, 1e2).to(base.dtype)

    # ------------------------------------------------------------------ run
    def run(self, write: bool = True) -> RefinementResult:
        t_start = time.perf_counter()
        sims = {}
        for dt in dict.fromkeys(self.dtypes):
            sims[dt] = copy.deepcopy(self.sim).to(dt)
        dev = self.sim.device  # the internal vector lives with the models
        data = self.data.to(dev)
        mask = self.roi
        if mask is None:
            mask = roi_mask(sims[self.dtypes[0]], data)
        mask = mask.to(dev)
        self._init_background(sims[self.dtypes[0]], mask)
        x = torch.zeros(self.param.size, dtype=torch.float64, device=dev)
        stages = []
        for k, stage in enumerate(self.stages):
            dt = self.dtypes[0]
            x, info = self._stage(sims[dt], x, stage, mask, data.to(dt), dt)
            info["oversample"] = self._rederive_oversample(sims, x)
            stages.append(info)
        if self.dtypes[-1] != self.dtypes[0] or not self.stages:
            dt = self.dtypes[-1]
            last = dict(self.stages[-1]) if self.stages else dict(groups=[g.name for g in self.param.groups])
            last["broaden"] = None
            x, info = self._stage(sims[dt], x, last, mask, data.to(dt), dt)
            stages.append(info)
        converged = stages[-1]["converged"]
        hi = sims[self.dtypes[-1]]
        result = self._result(hi, x, mask, converged, stages)
        result.seconds = time.perf_counter() - t_start
        if write:
            self.write(x)
        return result

    def _rederive_oversample(self, sims, x) -> int:
        """Automatic oversampling follows the refined crystal size and
        wavelength (an N or wavelength far from its start changes how finely
        the spots must be sampled); a user's explicit choice is kept."""
        if not self.sim.oversample_auto:
            return self.sim.oversample
        from ..simulator import recommended_oversample
        probe = copy.deepcopy(self.sim).double()
        assign(probe, self.param.substitutions(probe, x.double()))
        n = recommended_oversample(probe.crystal, probe.beam, probe.detector)
        for s in sims.values():
            s.recommended_oversample = s.oversample = n
        self.oversample = n
        return n

    def _init_background(self, sim, mask):
        """Start each panel's background constant at the median difference of
        data and model over the region's faint pixels, unless a start was given."""
        for g in self.param.groups:
            if isinstance(g, Background) and bool((g._start == 0).all()):
                with torch.no_grad():
                    model = functional_call(sim, mask_substitutions(mask), ()).double()
                    starts = []
                    for k in range(model.shape[0]):
                        m = mask[k] & (model[k] <= torch.quantile(model[k][mask[k]], 0.5))
                        starts.append(max(float((self.data[k].to(model)[m] - model[k][m]).median()), 0.0) if m.any()
                                      else 0.0)
                g._start = torch.tensor(starts, dtype=torch.float64)

    def _curvature(self, sim, x, mask):
        """Hessian of the loss in the internal vector, by autograd (falling
        back to central differences of autograd gradients)."""
        data = self.data.to(device=sim.device, dtype=sim.dtype)
        counter = [0]

        def f(v):
            counter[0] += 1
            return self._objective(sim, v, mask, data)

        x = x.to(sim.dtype)
        try:
            H = torch.autograd.functional.hessian(f, x)
        except RuntimeError:
            h = 1e-3
            rows = []
            for i in range(x.numel()):
                grads = []
                for s in (h, -h):
                    v = x.clone()
                    v[i] += s
                    v.requires_grad_(True)
                    (g,) = torch.autograd.grad(f(v), v)
                    grads.append(g)
                rows.append((grads[0] - grads[1]) / (2 * h))
            H = torch.stack(rows)
        H = 0.5 * (H + H.T)
        return H.double(), counter[0] + x.numel()

    def _result(self, sim, x, mask, converged, stages):
        n = x.numel()
        labels = list(self.param.labels)
        hessian_renders = 0
        if self.uncertainties:
            H, hessian_renders = self._curvature(sim, x, mask)
            H = H.cpu()
            evals, evecs = torch.linalg.eigh(H)
            top = float(evals.abs().max()) if n else 0.0
            good = evals > 1e-10 * max(top, 1e-300)
            inv = torch.where(good, 1.0 / torch.where(good, evals, torch.ones_like(evals)), torch.zeros_like(evals))
            cov = (evecs * inv) @ evecs.T
            weak = set()
            for j in torch.nonzero(~good).flatten().tolist():
                for i in torch.nonzero(evecs[:, j].abs() > 0.3).flatten().tolist():
                    weak.add(i)
            sigma = torch.sqrt(torch.clamp(torch.diagonal(cov), min=0.0))
            for i in range(n):
                if not sigma[i] > 0 or sigma[i] > self.undetermined_sigma:
                    weak.add(i)
            for i in weak:
                sigma[i] = float("inf")
            undetermined = [labels[i] for i in sorted(weak)]
        else:
            cov = torch.full((n, n), float("nan"), dtype=torch.float64)
            sigma = torch.full((n,), float("nan"), dtype=torch.float64)
            undetermined = []
        d = torch.sqrt(torch.clamp(torch.diagonal(cov), min=1e-300))
        corr = cov / (d[:, None] * d[None, :])
        # physical values and propagated uncertainties
        x64 = x.double()
        orig = self.sim
        J = torch.autograd.functional.jacobian(lambda v: self.param.physical(orig, v), x64)
        J = torch.nan_to_num(J.double()).cpu()
        phys_start = self.param.physical(orig, torch.zeros_like(x64)).detach().cpu()
        phys = self.param.physical(orig, x64).detach().cpu()
        finite_cov = torch.where(torch.isfinite(cov), cov, torch.zeros_like(cov))
        psig = torch.sqrt(torch.clamp(torch.diagonal(J @ finite_cov @ J.T), min=0.0))
        for i in range(n):  # an undetermined parameter leaves what it moves undetermined
            if not math.isfinite(float(sigma[i])):
                psig = torch.where(J[:, i].abs() > 0, torch.full_like(psig, float("inf")), psig)
        params = [ParameterResult(g, name, unit, float(s), float(v), float(e))
                  for (g, name, unit), s, v, e in zip(self.param.physical_labels(), phys_start, phys, psig)]
        background = {}
        for g, xi in zip(self.param.groups, torch.split(x64, self.param.sizes)):
            if isinstance(g, Background):
                background = dict(zip(g.labels, g.physical(orig, xi).tolist()))
        return RefinementResult(labels=labels, x=x64.detach().cpu(), sigma_internal=sigma, covariance=cov,
                                correlation=corr, parameters=params, loss=self.history[-1],
                                loss_history=list(self.history), renders=self.renders, converged=converged,
                                undetermined=undetermined, stages=stages, background=background,
                                hessian_renders=hessian_renders, pixels=int(mask.sum()))

    def write(self, x) -> None:
        """Put the values of internal vector `x` into the user's models."""
        assign(self.sim, self.param.substitutions(self.sim, x.to(self.sim.device, torch.float64)))
        if self.oversample is not None:
            self.sim.recommended_oversample = self.sim.oversample = self.oversample


def assign(sim, subs: dict) -> None:
    """Copy substituted values {parameter or buffer name: tensor} into `sim`."""
    with torch.no_grad():
        for name, value in subs.items():
            try:
                target = sim.get_parameter(name)
            except AttributeError:
                target = sim.get_buffer(name)
            target.copy_(value.detach().to(target))


def refine(sim, data, groups, *, loss="poisson", roi=None, priors=None, bounds=None, max_iter=60,
           dtype_schedule=("float32", "float64"), strategy="default", write=True, **kw) -> RefinementResult:
    """Refine parameter `groups` of `sim` against measured `data` (panels, slow,
    fast photons) and write the refined values into the models (unless
    write=False). See `Refiner` for the arguments and `RefinementResult`."""
    return Refiner(sim, data, groups, loss=loss, roi=roi, priors=priors, bounds=bounds, max_iter=max_iter,
                   dtype_schedule=dtype_schedule, strategy=strategy, **kw).run(write=write)


def fisher_diagonal(expected: torch.Tensor, v: torch.Tensor, samples: int = 8, seed: int = 0) -> torch.Tensor:
    """Diagonal of the Poisson Fisher information sum_p (d mu_p / d v_i)^2 / mu_p
    of expected photons `expected` (1-D, built from `v`): the mean of g_i^2 over
    gradients g = J^T (z / sqrt(mu)) with random signs z, one backward pass
    each instead of one Hessian-vector product per parameter."""
    gen = torch.Generator(device=expected.device).manual_seed(seed)
    w = torch.rsqrt(torch.clamp(expected.detach(), min=1.0))
    acc = torch.zeros_like(v, dtype=torch.float64)
    for k in range(samples):
        z = torch.randint(0, 2, expected.shape, generator=gen, device=expected.device).to(expected.dtype) * 2 - 1
        (g,) = torch.autograd.grad(expected, v, z * w, retain_graph=k < samples - 1, allow_unused=True)
        if g is not None:
            acc += g.double() ** 2
    return acc / samples


def run_stage(owner, opt, closure, xs, x_master, idx, x0, scale, names, broaden, dtype, max_iter):
    """One L-BFGS stage of a refiner (`owner` keeps renders, history and
    verbosity): run it, recover from a line search that ran away, and
    return (the new internal vector, what the stage did)."""
    t0, r0 = time.perf_counter(), owner.renders
    ran_away = False
    try:
        opt.step(closure)
    except RuntimeError:  # a line search that ran away on a flat objective
        ran_away = True
        with torch.no_grad():
            xs.copy_(torch.where(torch.isfinite(xs), xs, torch.zeros_like(xs)))
        if not owner.history or not math.isfinite(owner.history[-1]):
            owner.history.append(float("nan"))
    n_iter = opt.state[opt._params[0]].get("n_iter", 0)
    with torch.no_grad():
        x_new = x_master.clone()
        x_new[idx] = (x0 + scale * xs.detach()).to(x_master.dtype)
    finite = bool(torch.isfinite(xs).all()) and math.isfinite(owner.history[-1])
    info = dict(groups=list(names), broaden=broaden, dtype=str(dtype).replace("torch.", ""),
                iterations=int(n_iter), renders=owner.renders - r0, loss=owner.history[-1],
                seconds=time.perf_counter() - t0, converged=finite and not ran_away and n_iter < max_iter)
    if owner.verbose:
        print(info)
    return (x_new if finite else x_master), info


def resolve_stages(strategy, names, broaden, max_iter, default) -> list[dict]:
    """The stages of a fit: the `default` strategy, one stage of every group
    (None), or the caller's list, checked against the refined groups."""
    if strategy == "default":
        return default(names, broaden, max_iter)
    if strategy is None:
        return [dict(groups=names, broaden=None, max_iter=max_iter)]
    stages = [dict(s) for s in strategy]
    for s in stages:
        unknown = [g for g in s["groups"] if g not in names]
        if unknown:
            raise ValueError(f"stage groups {unknown} are not among the refined groups {names}")
    return stages
