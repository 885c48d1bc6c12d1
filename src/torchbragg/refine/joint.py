"""Joint refinement of several images: per-image crystals (orientation and,
optionally, per-image scale, N, background, ...) with parameters shared by
every image (the detector and the beam: the metrology use case), or one
crystal shared by several images of a sweep (every group shared, none per
image: each simulator renders its own scan image of the same models).

The simulators usually share their Detector and Beam module objects (build
them from one simulator with a deep copy of the crystal per image, or from an
experiment list whose experiments refer to the same detector and beam) but
need not: a shared group is substituted into every simulator from its own
start values, so equal but separate models work too.

The objective is the sum over images of each image's loss over its region of
interest. The internal vector is [shared | image 0 | image 1 | ...], each part
in the well-scaled units of `parameters` (one unit step each). The curvature
of the joint objective is the sum of per-image blocks over (shared, own
parameters), so it costs one small Hessian per image; the covariance comes
from the full assembled Hessian, so the shared parameters' uncertainties
account for every per-image parameter they correlate with.

Default strategy: each image alone first (its per-image groups through the
single-image `Refiner` with the shared parameters at their start values),
then every group together with the spots broadened, then with the real spot
shape; the last stage is repeated in the last dtype of `dtype_schedule`,
where the curvature is also computed. Without per-image groups the stages
are the single-image refiner's coarse-to-fine ones (`default_strategy`),
each over the sum of the images' losses.

Writing: a per-image parameter stored in a module that several simulators
share (per-image scale with a shared Beam) cannot hold one value per image;
it is left unwritten (listed in `JointResult.not_written`) and its values
are in `JointResult.images`. Give each simulator its own Beam to keep them.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from .losses import LOSSES
from .parameters import Background, Parametrisation, make_group
from .refiner import (DTYPES, ParameterResult, Refiner, as_data, default_strategy, fisher_diagonal, resolve_stages,
                      run_stage)
from .roi import mask_substitutions, roi_mask


@dataclass
class JointResult:
    """What a joint refinement found.

    labels / x / sigma_internal / covariance / correlation: over the joint
    internal vector (shared labels as they are, per-image ones prefixed
    "image{i}."). shared: ParameterResults of the shared groups; images: one
    list of ParameterResults per image. undetermined: internal labels the
    data cannot determine. loss_history: the joint loss at every evaluation
    of the joint stages (the per-image stage's are in `stages`). renders:
    forward(+backward) renders of the fit (per-image stage included),
    hessian_renders the passes of the curvature (preconditioners: one
    render with a few backward passes per image; uncertainties: per image,
    one forward and two per parameter). not_written: model parameters left
    unwritten (see the module's docstring). image_loss / image_history / image_pixels: per
    image, its part of the final loss, its loss at every evaluation (its
    per-image stage's, then its share of the joint stages') and the pixels
    of its region."""
    labels: list
    x: torch.Tensor
    sigma_internal: torch.Tensor
    covariance: torch.Tensor
    correlation: torch.Tensor
    shared: list
    images: list
    loss: float
    loss_history: list
    renders: int
    converged: bool
    undetermined: list
    stages: list = field(default_factory=list)
    seconds: float = 0.0
    hessian_renders: int = 0
    pixels: int = 0
    not_written: list = field(default_factory=list)
    image_loss: list = field(default_factory=list)
    image_history: list = field(default_factory=list)
    image_pixels: list = field(default_factory=list)

    def value(self, name: str, image: int | None = None) -> ParameterResult:
        """A shared parameter by its physical name, or image `image`'s."""
        for p in (self.shared if image is None else self.images[image]):
            if p.name == name:
                return p
        raise KeyError(name if image is None else f"image {image}: {name}")

    def to_dict(self) -> dict:
        return dict(shared=[vars(p) for p in self.shared], images=[[vars(p) for p in ps] for ps in self.images],
                    labels=list(self.labels), x=self.x.tolist(), sigma_internal=self.sigma_internal.tolist(),
                    correlation=self.correlation.tolist(), loss=self.loss, loss_history=list(self.loss_history),
                    renders=self.renders, hessian_renders=self.hessian_renders, converged=self.converged,
                    undetermined=list(self.undetermined), stages=list(self.stages), seconds=self.seconds,
                    pixels=self.pixels, not_written=list(self.not_written), image_loss=list(self.image_loss),
                    image_history=[list(h) for h in self.image_history], image_pixels=list(self.image_pixels))

    def summary(self) -> str:
        lines = [f"loss {self.loss:.3f}, {len(self.images)} images, {self.renders} renders, {self.seconds:.1f} s, "
                 f"{'converged' if self.converged else 'NOT converged'}"]
        for p in self.shared:
            lines.append(f"  {p.name:>24s} {p.start:14.6g} -> {p.value:14.6g} +- {p.sigma:.3g} {p.unit}")
        if self.undetermined:
            lines.append("  undetermined: " + ", ".join(self.undetermined))
        return "\n".join(lines)


def default_joint_strategy(names, broaden: float = 0.5, max_iter: int = 60) -> list[dict]:
    """Every group together with spots broadened (N times `broaden`, at least
    3), then with the real spot shape. (The per-image stage that precedes
    these is set by `image_strategy`.)"""
    names = list(names)
    stages = []
    if broaden:
        stages.append(dict(groups=names, broaden=broaden, max_iter=max_iter))
    stages.append(dict(groups=names, broaden=None, max_iter=2 * max_iter))
    return stages


def default_image_strategy(names, broaden: float = 0.5, max_iter: int = 30) -> list[dict]:
    """The per-image stage: with spots broadened (N times `broaden`, at
    least 3), scale (+ background) alone, then every per-image group."""
    names = list(names)
    always = [g for g in ("scale", "background") if g in names]
    stages = []
    if always and len(always) < len(names):
        stages.append(dict(groups=always, broaden=broaden, max_iter=max_iter))
    stages.append(dict(groups=names, broaden=broaden, max_iter=max_iter))
    return stages


def _group_copy(spec):
    """A fresh group per image: names make new ones, instances are copied."""
    g = make_group(spec)
    return copy.deepcopy(g) if g is spec else g


class JointRefiner:
    """Refines `shared` groups (one internal vector for all images) and
    `per_image` groups (one each) of simulators `sims` against `datas` (one
    (panels, slow, fast) image per simulator).

    loss / loss_options: as `Refiner`. rois: None (roi.roi_mask per image),
    "all", or one boolean mask per image. priors: {joint label: (mean,
    sigma)} Gaussian restraints in internal units (per-image labels
    "image{i}.{label}"). strategy: "default" (default_joint_strategy; with
    no per-image groups the refiner's default_strategy), None (one stage of
    every group) or a list of stage dicts (groups: names of shared or
    per-image groups, broaden, max_iter). image_strategy: the
    strategy of the per-image stage ("default": default_image_strategy;
    "single": the single-image refiner's default; a list of stage dicts;
    None: skip it). dtype_schedule: stages in the first dtype, the last stage
    repeated in the last."""

    def __init__(self, sims, datas, shared=(), per_image=("scale", "orientation"), *, loss="poisson", rois=None,
                 priors=None, max_iter=60, dtype_schedule=("float32", "float64"), strategy="default",
                 image_strategy="default", image_max_iter=30, loss_options=None, broaden=0.5, uncertainties=True,
                 undetermined_sigma=1e4, precondition=True, verbose=False):
        sims = list(sims)
        datas = list(datas)
        if not sims:
            raise ValueError("no simulators to refine")
        if len(sims) != len(datas):
            raise ValueError(f"{len(sims)} simulators but {len(datas)} images")
        if not shared and not per_image:
            raise ValueError("no parameter groups to refine")
        self.sims = sims
        self.shapes = [(len(s.detector.panels), s.detector.panels[0].spixels, s.detector.panels[0].fpixels)
                       for s in sims]
        self.datas = [as_data(d, shape, torch.float64) for d, shape in zip(datas, self.shapes)]
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
        # shared groups: bound to the first simulator
        self.shared = Parametrisation([make_group(g) for g in shared], sims[0]) if shared else None
        shared_names = [g.name for g in self.shared.groups] if self.shared else []
        # per-image groups: a single-image Refiner per image (its parametrisation and its per-image stage)
        if rois is None:
            rois = [None] * len(sims)
        elif isinstance(rois, str) and rois == "all":
            rois = [torch.ones(shape, dtype=torch.bool) for shape in self.shapes]
        elif len(rois) != len(sims):
            raise ValueError(f"{len(rois)} regions of interest for {len(sims)} images")
        self.rois = []
        for k, (r, shape) in enumerate(zip(rois, self.shapes)):
            if r is not None:
                r = torch.as_tensor(r, dtype=torch.bool)
                if tuple(r.shape) != shape:
                    raise ValueError(f"roi {k} has shape {tuple(r.shape)}, image {k} has {shape}")
            self.rois.append(r)
        self.image_refiners = []
        if per_image:
            for k, (s, d) in enumerate(zip(sims, self.datas)):
                groups = [_group_copy(g) for g in per_image]
                both = sorted({g.name for g in groups} & set(shared_names))
                if both:
                    raise ValueError(f"groups {both} are both shared and per image")
                istrat = image_strategy
                if isinstance(istrat, str) and istrat == "default":
                    istrat = default_image_strategy([g.name for g in groups], broaden, image_max_iter)
                elif isinstance(istrat, str) and istrat == "single":
                    istrat = "default"
                self.image_refiners.append(Refiner(
                    s, d, groups, loss=loss, roi=self.rois[k] if self.rois[k] is not None else "all",
                    max_iter=image_max_iter, dtype_schedule=dtype_schedule[:1], strategy=istrat,
                    loss_options=loss_options, broaden=broaden, uncertainties=False, precondition=precondition))
        self.run_image_stage = bool(per_image) and image_strategy is not None
        self.per_names = [g.name for g in self.image_refiners[0].param.groups] if self.image_refiners else []
        # layout of the joint vector
        self.n_shared = self.shared.size if self.shared else 0
        self.n_image = [r.param.size for r in self.image_refiners] if self.image_refiners else [0] * len(sims)
        self.offsets = []
        off = self.n_shared
        for n in self.n_image:
            self.offsets.append(off)
            off += n
        self.size = off
        self.labels = list(self.shared.labels) if self.shared else []
        for k, r in enumerate(self.image_refiners):
            self.labels += [f"image{k}.{lab}" for lab in r.param.labels]
        self.group_of = []  # group name of every joint element
        if self.shared:
            for g in self.shared.groups:
                self.group_of += [g.name] * g.size
        for r in self.image_refiners:
            for g in r.param.groups:
                self.group_of += [g.name] * g.size
        self.priors = {}
        for label, (m, s) in (priors or {}).items():
            if label not in self.labels:
                raise ValueError(f"priors: no parameter {label!r}; the refined ones are {self.labels}")
            self.priors[self.labels.index(label)] = (float(m), float(s))
        names = shared_names + self.per_names
        # nothing per image, so no per-image stage to start from: the single-image coarse-to-fine plan
        default = default_joint_strategy if self.image_refiners else default_strategy
        self.stages = resolve_stages(strategy, names, broaden, max_iter, default)
        self.uncertainties = uncertainties
        self.undetermined_sigma = undetermined_sigma
        self.precondition = precondition
        self.verbose = verbose
        self.renders = 0
        self.hessian_renders = 0
        self.history: list[float] = []
        self.image_history: list[list[float]] = [[] for _ in sims]
        self._scale = None

    # ------------------------------------------------------------------ objective
    def _parts(self, k, x):
        xs = x[:self.n_shared]
        xi = x[self.offsets[k]:self.offsets[k] + self.n_image[k]]
        return xs, xi

    def _image_model(self, k, sim, x, mask, broaden=None):
        """Expected photons of image k at joint vector x, rendered over the mask only."""
        xs, xi = self._parts(k, x)
        subs = self.shared.substitutions(sim, xs) if self.shared else {}
        per = self.image_refiners[k].param if self.image_refiners else None
        if per is not None:
            subs = per.substitutions(sim, xi, subs)
        if broaden:
            n = subs.get("crystal.N", sim.crystal.N.to(x.dtype))
            nb = torch.clamp(n * broaden, min=3.0)
            ratio = (n / nb).detach().prod()
            subs["crystal.N"] = nb
            subs["beam.fluence"] = subs.get("beam.fluence", sim.beam.fluence.to(x.dtype)) * ratio
        subs.update(mask_substitutions(mask))
        model = functional_call(sim, subs, ())
        for p, v in ((self.shared, xs), (per, xi)):
            if p is not None:
                extra = p.image_terms(sim, v, model.shape)
                if extra is not None:
                    model = model + extra
        return model

    def _image_objective(self, k, sim, x, mask, data, broaden=None):
        """Loss of image k (no priors) at joint vector x."""
        return self.loss_fn(self._image_model(k, sim, x, mask, broaden), data, mask, **self.loss_options)

    def _prior(self, x):
        loss = x.new_zeros(())
        for i, (mean, sigma) in self.priors.items():
            loss = loss + 0.5 * ((x[i] - mean) / sigma) ** 2
        return loss

    def _image_indices(self, k, active):
        """Joint indices among `active` that image k's loss depends on."""
        lo, hi = self.offsets[k], self.offsets[k] + self.n_image[k]
        return [a for a in active if a < self.n_shared or lo <= a < hi]

    def _blocks(self, sims, x, active, masks, datas, broaden):
        """Per image: (joint indices, Hessian of its loss in them), by
        autograd (central differences of gradients where double backward
        fails)."""
        out = []
        for k, sim in enumerate(sims):
            gi = self._image_indices(k, active)
            if not gi:
                continue
            idx = torch.tensor(gi, dtype=torch.long)

            def f(v, k=k, idx=idx):
                return self._image_objective(k, sims[k], x.index_put((idx,), v), masks[k], datas[k], broaden)

            v0 = x[idx].clone()
            try:
                H = torch.autograd.functional.hessian(f, v0)
                self.hessian_renders += 2 * len(gi) + 1
            except RuntimeError:
                h = 1e-3
                rows = []
                for i in range(len(gi)):
                    grads = []
                    for s in (h, -h):
                        v = v0.clone()
                        v[i] += s
                        v.requires_grad_(True)
                        (g,) = torch.autograd.grad(f(v), v)
                        grads.append(g)
                    rows.append((grads[0] - grads[1]) / (2 * h))
                    self.hessian_renders += 2
                H = torch.stack(rows)
            out.append((gi, (0.5 * (H + H.T)).double()))
        return out

    def _hessian(self, sims, x, masks, datas):
        """The assembled Hessian of the joint objective over every element."""
        H = torch.zeros(self.size, self.size, dtype=torch.float64)
        for gi, block in self._blocks(sims, x, list(range(self.size)), masks, datas, None):
            idx = torch.tensor(gi, dtype=torch.long)
            H[idx[:, None], idx[None, :]] += block
        for i, (_, sigma) in self.priors.items():
            H[i, i] += 1.0 / sigma ** 2
        return H

    def _preconditioner(self, sims, x, active, masks, datas, broaden):
        """Step scales 1 / sqrt(curvature) as the single-image refiner sets
        them: the diagonal of the Fisher information (positive even far from
        the minimum, where the Hessian need not be), summed over the images."""
        if not self.precondition:
            return torch.ones(len(active), dtype=x.dtype)
        d = torch.zeros(self.size, dtype=torch.float64)
        for k, sim in enumerate(sims):
            gi = self._image_indices(k, active)
            if not gi:
                continue
            idx = torch.tensor(gi, dtype=torch.long)
            v = x[idx].clone().requires_grad_(True)
            model = self._image_model(k, sim, x.index_put((idx,), v), masks[k], broaden)
            d[idx] += fisher_diagonal(model[masks[k]], v)
            self.hessian_renders += 1
        for i, (_, sigma) in self.priors.items():
            d[i] += 1.0 / sigma ** 2
        d = d[torch.tensor(active, dtype=torch.long)]
        ok = torch.isfinite(d) & (d > 0)
        scale = torch.where(ok, 1.0 / torch.sqrt(torch.where(ok, d, torch.ones_like(d))), torch.ones_like(d))
        return torch.clamp(scale, 1e-4, 1e2).to(x.dtype)

    def _stage(self, sims, x_master, stage, masks, datas, dtype, reuse=False):
        names = stage["groups"]
        active = [i for i, g in enumerate(self.group_of) if g in names]
        idx = torch.tensor(active, dtype=torch.long)
        base = x_master.to(dtype)
        broaden = stage.get("broaden")
        key = (tuple(active), broaden)
        if reuse and self._scale is not None and self._scale[0] == key:  # the same objective, another dtype
            scale = self._scale[1].to(dtype)
        else:
            scale = self._preconditioner(sims, base, active, masks, datas, broaden)
        self._scale = (key, scale)
        x0 = base[idx].clone()
        xs = torch.zeros_like(x0).requires_grad_(True)
        max_iter = int(stage.get("max_iter", 60))
        opt = torch.optim.LBFGS([xs], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.5) + 5,
                                history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-2 if dtype == torch.float32 else 1e-3, tolerance_change=1e-9)
        touched = [k for k in range(len(sims)) if self._image_indices(k, active)]

        def closure():
            opt.zero_grad()
            total = 0.0
            for k in touched:  # one image's graph at a time
                x = base.index_put((idx,), x0 + scale * xs)
                loss = self._image_objective(k, sims[k], x, masks[k], datas[k], broaden)
                loss.backward()
                total += float(loss.detach())
                self.image_history[k].append(float(loss.detach()))
                self.renders += 1
            if self.priors:
                loss = self._prior(base.index_put((idx,), x0 + scale * xs))
                loss.backward()
                total += float(loss.detach())
            self.history.append(total)
            return torch.tensor(total, dtype=dtype)

        return run_stage(self, opt, closure, xs, x_master, idx, x0, scale, names, broaden, dtype, max_iter)

    # ------------------------------------------------------------------ run
    def _copies(self, dtype):
        """The simulators cast to `dtype`, copied together so that shared
        modules stay shared."""
        copies = copy.deepcopy(self.sims)
        for s in copies:
            s.to(dtype)
        return copies

    def run(self, write: bool = True) -> JointResult:
        t_start = time.perf_counter()
        copies = {dt: self._copies(dt) for dt in dict.fromkeys(self.dtypes)}
        lo = copies[self.dtypes[0]]
        masks = [r if r is not None else roi_mask(s, d) for r, s, d in zip(self.rois, lo, self.datas)]
        x = torch.zeros(self.size, dtype=torch.float64)
        stages = []
        self._init_shared_background(lo[0], masks[0])
        # each image on its own (shared parameters at their start values)
        for k, r in enumerate(self.image_refiners):
            r.roi = masks[k]
            r._init_background(lo[k], masks[k])
            if self.run_image_stage:
                t0 = time.perf_counter()
                res = r.run(write=False)
                x[self.offsets[k]:self.offsets[k] + self.n_image[k]] = res.x
                self.renders += res.renders
                self.image_history[k].extend(res.loss_history)
                stages.append(dict(groups=list(self.per_names), image=k, broaden="staged",
                                   dtype=str(r.dtypes[0]).replace("torch.", ""),
                                   iterations=sum(s["iterations"] for s in res.stages), renders=res.renders,
                                   loss=res.loss, seconds=time.perf_counter() - t0, converged=res.converged))
        # everything together
        for stage in self.stages:
            dt = self.dtypes[0]
            x, info = self._stage(copies[dt], x, stage, masks, [d.to(dt) for d in self.datas], dt)
            stages.append(info)
        if self.dtypes[-1] != self.dtypes[0] or not self.stages:
            dt = self.dtypes[-1]
            last = dict(self.stages[-1]) if self.stages else dict(groups=sorted(set(self.group_of)))
            last["broaden"] = None
            x, info = self._stage(copies[dt], x, last, masks, [d.to(dt) for d in self.datas], dt, reuse=True)
            stages.append(info)
        converged = stages[-1]["converged"]
        result = self._result(copies[self.dtypes[-1]], x, masks, converged, stages)
        if write:
            result.not_written = self.write(x)
        result.seconds = time.perf_counter() - t_start
        return result

    def _init_shared_background(self, sim, mask):
        """A shared background starts where the single-image refiner would
        start it on the first image (unless a start was given)."""
        groups = [g for g in (self.shared.groups if self.shared else []) if isinstance(g, Background)]
        if groups and bool((groups[0]._start == 0).all()):
            Refiner(self.sims[0], self.datas[0], groups, roi=mask, strategy=None)._init_background(sim, mask)

    def _result(self, sims, x, masks, converged, stages):
        n = self.size
        if self.uncertainties:
            dt = sims[0].dtype
            H = self._hessian(sims, x.to(dt), masks, [d.to(dt) for d in self.datas])
            evals, evecs = torch.linalg.eigh(H)
            top = float(evals.abs().max()) if n else 0.0
            good = evals > 1e-10 * max(top, 1e-300)
            inv = torch.where(good, 1.0 / torch.where(good, evals, torch.ones_like(evals)), torch.zeros_like(evals))
            cov = (evecs * inv) @ evecs.T
            weak = set()
            for j in torch.nonzero(~good).flatten().tolist():
                weak.update(torch.nonzero(evecs[:, j].abs() > 0.3).flatten().tolist())
            sigma = torch.sqrt(torch.clamp(torch.diagonal(cov), min=0.0))
            for i in range(n):
                if not sigma[i] > 0 or sigma[i] > self.undetermined_sigma:
                    weak.add(i)
            for i in weak:
                sigma[i] = float("inf")
            undetermined = [self.labels[i] for i in sorted(weak)]
        else:
            cov = torch.full((n, n), float("nan"), dtype=torch.float64)
            sigma = torch.full((n,), float("nan"), dtype=torch.float64)
            undetermined = []
        d = torch.sqrt(torch.clamp(torch.diagonal(cov), min=1e-300))
        corr = cov / (d[:, None] * d[None, :])
        finite_cov = torch.where(torch.isfinite(cov), cov, torch.zeros_like(cov))
        x64 = x.double()

        def physical(param, sim, sl):
            v = x64[sl]
            J = torch.nan_to_num(torch.autograd.functional.jacobian(lambda u: param.physical(sim, u), v).double())
            start = param.physical(sim, torch.zeros_like(v)).detach()
            val = param.physical(sim, v).detach()
            c = finite_cov[sl, sl]
            psig = torch.sqrt(torch.clamp(torch.diagonal(J @ c @ J.T), min=0.0))
            for i in range(v.numel()):
                if not math.isfinite(float(sigma[sl][i])):
                    psig = torch.where(J[:, i].abs() > 0, torch.full_like(psig, float("inf")), psig)
            return [ParameterResult(g, name, unit, float(s), float(a), float(e))
                    for (g, name, unit), s, a, e in zip(param.physical_labels(), start, val, psig)]

        shared = physical(self.shared, self.sims[0], slice(0, self.n_shared)) if self.shared else []
        images = []
        for k, r in enumerate(self.image_refiners):
            images.append(physical(r.param, self.sims[k], slice(self.offsets[k], self.offsets[k] + self.n_image[k])))
        if not self.image_refiners:
            images = [[] for _ in self.sims]
        return JointResult(labels=list(self.labels), x=x64.detach(), sigma_internal=sigma, covariance=cov,
                           correlation=corr, shared=shared, images=images, loss=self.history[-1],
                           loss_history=list(self.history), renders=self.renders, converged=converged,
                           undetermined=undetermined, stages=stages, hessian_renders=self.hessian_renders,
                           pixels=int(sum(int(m.sum()) for m in masks)),
                           image_loss=[h[-1] if h else float("nan") for h in self.image_history],
                           image_history=[list(h) for h in self.image_history],
                           image_pixels=[int(m.sum()) for m in masks])

    def write(self, x) -> list:
        """Put the values of joint vector `x` into the user's models; returns
        the names of per-image values that shared modules cannot hold (left
        unwritten)."""
        x = x.double()
        targets = {}  # id(tensor) -> (tensor, value, name, image)
        conflicts = set()
        with torch.no_grad():
            for k, sim in enumerate(self.sims):
                xs, xi = self._parts(k, x)
                subs = self.shared.substitutions(sim, xs) if self.shared else {}
                if self.image_refiners:
                    subs = self.image_refiners[k].param.substitutions(sim, xi, subs)
                for name, value in subs.items():
                    try:
                        t = sim.get_parameter(name)
                    except AttributeError:
                        t = sim.get_buffer(name)
                    key = id(t)
                    if key in targets and not torch.equal(targets[key][1], value.detach()):
                        conflicts.add(name)
                    targets[key] = (t, value.detach(), name)
            for t, value, name in targets.values():
                if name not in conflicts:
                    t.copy_(value.to(t))
        return sorted(conflicts)


def refine_joint(sims, datas, shared=(), per_image=("scale", "orientation"), *, write=True, **kw) -> JointResult:
    """Refine `shared` groups (one value for every image: distance,
    beam_centre, panels, wavelength, ...) and `per_image` groups (orientation,
    scale, N, background, cell, ...) of simulators `sims` against images
    `datas`, and write the refined values into the models (unless
    write=False). See `JointRefiner` for the options and `JointResult`."""
    return JointRefiner(sims, datas, shared, per_image, **kw).run(write=write)


__all__ = ["JointRefiner", "JointResult", "refine_joint", "default_joint_strategy", "default_image_strategy"]
