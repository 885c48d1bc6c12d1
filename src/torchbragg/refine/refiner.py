"""The refinement engine: models fitted to measured images by L-BFGS over
one internal vector, staged and coarse to fine, with uncertainties from the
curvature of the negative log-likelihood at the minimum.

What is fitted is a list of entries (`Entry`: a simulator, its measured
image, the region of interest, which scan image it is or that it is a
still). Parameter groups are bound to the entries they act on, as DIALS
binds parameterisations to experiments: a group bound to every entry is
shared (the detector in a metrology fit, the crystal of a sweep), a group
bound to one entry is that entry's own (a still's orientation). Refining
one image is the one-entry case. The objective is the sum over entries of
each entry's loss over its region; the internal vector is the bound groups'
vectors one after the other, each in the well-scaled units of `parameters`.

Stages: with groups bound to single entries (`per_entry`), each entry is
first fitted alone (its own groups, shared ones at their start values), then
every group together with the spots broadened, then with the real spot
shape (`default_joint_strategy`); otherwise the coarse-to-fine plan of
`default_strategy`. Precision: the stages run with the simulators cast to
the first dtype of `dtype_schedule` (float32 by default: fast, but a float32
render stops a few standard uncertainties short of the minimum), and the
last stage is repeated in the last dtype (float64), where the curvature is
also computed. The user's simulators are copied for each precision (copied
together, so that modules they share stay shared), never changed during the
fit; `write` puts the refined values into them at the end. Renders go
through torch.func.functional_call with each entry's render options, so
nothing is changed to render an entry.

Writing: a value bound to one entry but stored in a module that several
simulators share (per-image scale with a shared Beam) cannot hold one value
per entry; it is left unwritten (listed in `RefinementResult.not_written`)
and its values are in `RefinementResult.images`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from ..errors import InputError
from .fit import combine, goodness_of_fit
from .losses import LOSSES
from .parameters import Background, Group, make_group
from .roi import mask_substitutions, render_mask, roi_mask, spot_region
from .stages import STAGE_KINDS, still_strategy, sweep_regions, sweeps_of, sweep_strategy

DTYPES = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
          torch.float64: torch.float64}


# ----------------------------------------------------------------------------- inputs

@dataclass
class Entry:
    """One measured image to fit.

    sim: its simulator; data: photons (panels, slow, fast), or (slow, fast)
    for one panel. mask: the region of interest, a boolean (panels, slow,
    fast), None (roi.roi_mask from the start model and the data) or "all".
    valid: pixels that may be used at all (None: every one), and-ed with the
    region. image: which scan image it is (None: the scan's first); still:
    rendered without rotation whatever the goniometer."""
    sim: Any
    data: Any
    mask: Any = None
    valid: Any = None
    image: int | None = None
    still: bool = False

    @property
    def is_still(self) -> bool:
        """Rendered without rotation: marked a still, or its simulator has
        no goniometer or a scan of zero oscillation."""
        sim = self.sim
        return self.still or sim.goniometer is None or sim.scan is None or float(sim.scan.oscillation[1]) == 0.0

    def render(self, sim, subs=None):
        """The expected photons of this entry from `sim` with parameters or
        buffers substituted by `subs`."""
        # with a detector response the model is its reading (blur, gain, offset)
        return functional_call(sim, subs or {}, (self.image,), dict(still=self.still, detected=True))

    def render_pixels(self, sim, subs, pixels):
        """The same, image[pixels] (1-D) only, computing just those pixels."""
        return functional_call(sim, subs or {}, (self.image,), dict(still=self.still, detected=True, pixels=pixels))


@dataclass
class Binding:
    """A parameter group bound to entries: its elements lie at
    x[offset:offset + group.size]; labels carry `prefix`."""
    group: Group
    entries: tuple
    offset: int
    prefix: str

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.group.size)


def image_shape(sim) -> tuple:
    p = sim.detector.panels[0]
    return len(sim.detector.panels), p.spixels, p.fpixels


def as_data(data, shape, what="data") -> torch.Tensor:
    """Measured photons as a float64 tensor of the simulator's image shape,
    refused when not usable."""
    if data is None:
        raise InputError("no data to refine against")
    d = data if torch.is_tensor(data) else torch.as_tensor(np.asarray(data))
    if d.dim() == 2 and shape[0] == 1:
        d = d.unsqueeze(0)
    if tuple(d.shape) != tuple(shape):
        raise InputError(f"{what} shape {tuple(d.shape)} does not match the simulator's image shape "
                         f"{tuple(shape)} (panels, slow, fast)")
    d = d.detach().to(torch.float64)
    if not bool(torch.isfinite(d).all()):
        raise InputError(f"{what} contain NaN or infinite values; mask them with roi= instead")
    return d


def _noise_options(options) -> dict:
    """The Gaussian likelihood's read noise (>= 0) and gain (> 0), checked."""
    options = dict(options or {})
    for key, ok, need in (("read_noise", lambda v: v >= 0, ">= 0"), ("gain", lambda v: v > 0, "> 0")):
        if key in options:
            v = torch.as_tensor(options[key]).detach().double()
            if not bool(torch.isfinite(v).all()) or not bool(ok(v).all()):
                raise InputError(f"{key} must be finite and {need}, got {options[key]!r}")
    return options


def _as_mask(mask, shape, what, k=None):
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "all":
            raise InputError(f"{what}: expected a boolean mask, None or 'all', got {mask!r}")
        return torch.ones(shape, dtype=torch.bool)
    m = torch.as_tensor(mask, dtype=torch.bool)
    if tuple(m.shape) != tuple(shape):
        if k is None:
            raise InputError(f"{what} shape {tuple(m.shape)} does not match the image shape {tuple(shape)}")
        raise InputError(f"{what} {k} has shape {tuple(m.shape)}, image {k} has {tuple(shape)}")
    return m


# ----------------------------------------------------------------------------- result

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
    parameters.py; labels of groups bound to one entry of several are
    prefixed "image{k}."), their refined values (start: 0) and standard
    uncertainties; covariance and correlation: (n, n) over them.
    parameters: the physical values (start, refined, uncertainty, unit) of
    the groups bound to every entry; images: per entry, those of its own
    groups. undetermined: internal labels the data cannot determine.
    loss / loss_history: the objective at the end and at every evaluation
    of the stages over every entry; renders: forward+backward renders of the
    fit (entries' own stages included); hessian_renders: the passes of the
    curvature and the preconditioners; converged: the last stage stopped on
    its tolerances before max_iter. image_loss / image_history /
    image_pixels: per entry, its part of the loss, its loss at every
    evaluation and the pixels of its region. not_written: values left
    unwritten (see the module's docstring).

    Honesty: gradient_converged: the last stage stopped on its tolerances
    and the Newton decrement g^T H^-1 g (`newton_decrement`, twice the
    loss still to gain) is below 1; fit / image_fit: goodness of fit
    (fit.goodness_of_fit) of all entries and of each; fit_acceptable: the
    deviance within `max_deviance_ratio` of what noise allows or within
    `max_deviance_z` standard deviations of it, and at most
    `max_shifted_fraction` of the spots shifted; converged: both.
    uncertainty_scale: sqrt(deviance ratio) when above 1, by which the
    uncertainties are inflated. warnings: what makes the result doubtful."""
    labels: list
    x: torch.Tensor
    sigma_internal: torch.Tensor
    covariance: torch.Tensor
    correlation: torch.Tensor
    parameters: list
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
    gradient_converged: bool = False
    fit_acceptable: bool = True
    fit: dict = field(default_factory=dict)
    image_fit: list = field(default_factory=list)
    uncertainty_scale: float = 1.0
    newton_decrement: float = float("nan")
    warnings: list = field(default_factory=list)

    def value(self, name: str, image: int | None = None) -> ParameterResult:
        """A parameter of the groups bound to every entry by its physical
        name, or entry `image`'s own."""
        for p in (self.parameters if image is None else self.images[image]):
            if p.name == name:
                return p
        raise KeyError(name if image is None else f"image {image}: {name}")

    def to_dict(self) -> dict:
        return dict(parameters=[vars(p) for p in self.parameters], images=[[vars(p) for p in ps] for ps in self.images],
                    labels=list(self.labels), x=self.x.tolist(), sigma_internal=self.sigma_internal.tolist(),
                    correlation=self.correlation.tolist(), loss=self.loss, loss_history=list(self.loss_history),
                    renders=self.renders, hessian_renders=self.hessian_renders, converged=self.converged,
                    undetermined=list(self.undetermined), stages=list(self.stages), seconds=self.seconds,
                    pixels=self.pixels, not_written=list(self.not_written), image_loss=list(self.image_loss),
                    image_history=[list(h) for h in self.image_history], image_pixels=list(self.image_pixels),
                    gradient_converged=self.gradient_converged, fit_acceptable=self.fit_acceptable,
                    fit=dict(self.fit), image_fit=[dict(f) for f in self.image_fit],
                    uncertainty_scale=self.uncertainty_scale, newton_decrement=self.newton_decrement,
                    warnings=list(self.warnings))

    def summary(self) -> str:
        many = f"{len(self.images)} images, " if len(self.images) > 1 else ""
        lines = [f"loss {self.loss:.3f}, {many}{self.renders} renders, {self.seconds:.1f} s, "
                 f"{'converged' if self.converged else 'NOT converged'}"]
        for p in self.parameters:
            lines.append(f"  {p.name:>24s} {p.start:14.6g} -> {p.value:14.6g} +- {p.sigma:.3g} {p.unit}")
        f = self.fit
        if f:
            lines.append(f"  fit: deviance {f['deviance_per_pixel']:.3f} per pixel, expected "
                         f"{f['expected_per_pixel']:.3f} (ratio {f['deviance_ratio']:.2f}); {f['spots']} spots, "
                         f"{f['shifted_spots']} with a shifted centroid")
        if self.undetermined:
            lines.append("  undetermined: " + ", ".join(self.undetermined))
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- strategies

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


def default_joint_strategy(names, broaden: float = 0.5, max_iter: int = 60) -> list[dict]:
    """After each entry's own stage: every group together with spots
    broadened (N times `broaden`, at least 3), then with the real spot shape."""
    names = list(names)
    stages = []
    if broaden:
        stages.append(dict(groups=names, broaden=broaden, max_iter=max_iter))
    stages.append(dict(groups=names, broaden=None, max_iter=2 * max_iter))
    return stages


def default_entry_strategy(names, broaden: float = 0.5, max_iter: int = 30) -> list[dict]:
    """An entry's own stage: with spots broadened (N times `broaden`, at
    least 3), scale (+ background) alone, then every group of the entry."""
    names = list(names)
    always = [g for g in ("scale", "background") if g in names]
    stages = []
    if always and len(always) < len(names):
        stages.append(dict(groups=always, broaden=broaden, max_iter=max_iter))
    stages.append(dict(groups=names, broaden=broaden, max_iter=max_iter))
    return stages


STRATEGIES = ("auto", "lbfgs", "still", "sweep")


def choose_strategy(entries, loss: str = "poisson") -> str:
    """The strategy "auto" picks for `entries` and the loss: centroids and
    second-order steps (which are Poisson's) when every entry is a still,
    or every entry a frame of a rotation scan (at least SWEEP_FRAMES of
    them); the L-BFGS stages otherwise."""
    if loss == "poisson" and all(e.is_still for e in entries):
        return "still"
    if loss == "poisson" and len(entries) >= SWEEP_FRAMES and all(not e.is_still for e in entries):
        return "sweep"
    return "lbfgs"


# frames of a sweep for its spots' centroids in angle: over fewer, most spots are cut by the
# sweep's ends (their centroids biased), and the L-BFGS stages fit the pixels instead
SWEEP_FRAMES = 5


def resolve_stages(strategy, names, broaden, max_iter, lbfgs) -> list[dict]:
    """The stages of a fit: "still" (`still_strategy`), "lbfgs" (the
    L-BFGS plan `lbfgs`), one stage of every group (None), or the caller's
    list, checked against the refined groups ("auto" is resolved by the
    Refiner, which knows the entries)."""
    if isinstance(strategy, str):
        if strategy == "still":
            return still_strategy(names)
        if strategy == "sweep":
            return sweep_strategy(names)
        if strategy != "lbfgs":
            raise InputError(f"unknown strategy {strategy!r}; give {', '.join(map(repr, STRATEGIES))}, None or a "
                             "list of stages")
        return lbfgs(names, broaden, max_iter)
    if strategy is None:
        return [dict(groups=names, broaden=None, max_iter=max_iter)]
    stages = [dict(s) for s in strategy]
    for s in stages:
        if s.get("kind") not in (None, "lbfgs") and s.get("kind") not in STAGE_KINDS:
            raise InputError(f"unknown stage kind {s['kind']!r}; give lbfgs, {', '.join(STAGE_KINDS)}")
        unknown = [g for g in s["groups"] if g not in names]
        if unknown:
            raise InputError(f"stage groups {unknown} are not among the refined groups {names}")
    return stages


def _group_copy(spec):
    """A fresh group per entry: names make new ones, instances are copied."""
    g = make_group(spec)
    return copy.deepcopy(g) if g is spec else g


# ----------------------------------------------------------------------------- the engine

class Refiner:
    """Refines parameter groups of the simulators of `entries` (Entry) against
    their images.

    groups: bound to every entry: group names or instances
    (parameters.GROUPS), or (group, entry indices) pairs binding a group to
    some entries. per_entry: groups of which each entry gets its own copy.
    loss: "poisson" or "gaussian" (loss_options: read_noise, gain) or a
    callable loss(model, data, mask). priors: {internal label: (mean,
    sigma)} Gaussian restraints in internal units. bounds: {internal label:
    (low, high)} soft bounds in internal units (a steep quadratic penalty
    outside). strategy: "auto" (`choose_strategy`: "still" when every entry
    is a still, else "lbfgs"), "still" (spot centroids, then Levenberg-
    Marquardt steps on the pixels), "lbfgs" (L-BFGS stages, coarse to fine),
    None (one L-BFGS stage of every group) or a list of stage dicts (groups,
    broaden, max_iter, kind); entry_strategy: with the L-BFGS stages, the
    entries' own stage first ("lbfgs": default_entry_strategy; "single":
    default_strategy; a list; None: skip it; the still strategy fits each
    entry's own groups in its centroid stage). max_iter / entry_max_iter: L-BFGS iterations per
    stage. dtype_schedule: stages in the first dtype, the last repeated in
    the last. undetermined_sigma: an internal uncertainty beyond it is
    undetermined."""

    def __init__(self, entries, groups=(), per_entry=(), *, loss="poisson", priors=None, bounds=None, max_iter=60,
                 dtype_schedule=("float32", "float64"), strategy="auto", entry_strategy="lbfgs",
                 entry_max_iter=30, loss_options=None, broaden=0.5, uncertainties=True, undetermined_sigma=1e4,
                 precondition=True, verbose=False, max_deviance_ratio=1.05, max_deviance_z=5.0,
                 max_shifted_fraction=0.2,
                 max_correlation=0.99, progress=None):
        self.entries = [e if isinstance(e, Entry) else Entry(*e) for e in entries]
        if not self.entries:
            raise InputError("no images to refine against")
        if not groups and not per_entry:
            raise InputError("no parameter groups to refine")
        n = len(self.entries)
        self.shapes = [image_shape(e.sim) for e in self.entries]
        what = (lambda k: "data") if n == 1 else (lambda k: f"image {k}")
        self.datas = [as_data(e.data, s, what(k)) for k, (e, s) in enumerate(zip(self.entries, self.shapes))]
        self.masks = [_as_mask(e.mask, s, "roi", None if n == 1 else k)
                      for k, (e, s) in enumerate(zip(self.entries, self.shapes))]
        self.valid = [_as_mask(e.valid, s, "valid", None if n == 1 else k)
                      for k, (e, s) in enumerate(zip(self.entries, self.shapes))]
        if callable(loss):
            self.loss_fn = loss
        elif loss in LOSSES:
            self.loss_fn = LOSSES[loss]
        else:
            raise InputError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)} (or a callable)")
        self.loss_name = loss if isinstance(loss, str) else "poisson"
        self.loss_options = _noise_options(loss_options)
        try:
            self.dtypes = [DTYPES[d] for d in dtype_schedule]
        except KeyError as exc:
            raise InputError(f"unknown dtype {exc.args[0]!r} in dtype_schedule; use float32 or float64") from None
        self._bind(groups, per_entry)
        self.priors = self._by_label(priors or {}, "priors")
        self.bounds = self._by_label(bounds or {}, "bounds")
        names = list(dict.fromkeys(b.group.name for b in self.bindings))
        own = [b for b in self.bindings if b.prefix]
        self.entry_names = list(dict.fromkeys(b.group.name for b in own))
        self.entry_stages = []
        if isinstance(strategy, str) and strategy == "auto":
            strategy = choose_strategy(self.entries, self.loss_name if isinstance(loss, str) else None)
        if own and entry_strategy is not None and strategy not in ("still", "sweep"):  # they fit own groups anyway
            if isinstance(entry_strategy, str) and entry_strategy == "single":
                entry_strategy = "lbfgs"
                plan = default_strategy
            else:
                plan = default_entry_strategy
            self.entry_stages = resolve_stages(entry_strategy, self.entry_names, broaden, entry_max_iter, plan)
        self.stages = resolve_stages(strategy, names, broaden, max_iter,
                                     default_joint_strategy if own else default_strategy)
        # stages without broadened spots fit the spots' own pixels (roi.spot_region)
        self.spot_regions = bool(self.stages) and all(s.get("kind") in STAGE_KINDS for s in self.stages)
        self.uncertainties = uncertainties
        self.undetermined_sigma = undetermined_sigma
        self.max_deviance_ratio = max_deviance_ratio
        self.max_deviance_z = max_deviance_z
        self.max_shifted_fraction = max_shifted_fraction
        self.max_correlation = max_correlation
        self.precondition = precondition
        self.verbose = verbose
        self.progress = progress
        self.renders = 0
        self.hessian_renders = 0
        self.information = None  # (indices, Fisher information, gradient) where a steps stage ended
        self._fit_at = None  # (internal vector, goodness of fit there)
        self.history: list[float] = []
        self.image_history: list[list[float]] = [[] for _ in self.entries]
        self.oversample: list = [None] * n  # re-derived automatic oversampling, written back with the values
        self.bragg: list = [None] * n  # where the Bragg term is rendered, when narrower than the region
        self.held: dict = {}  # (internal elements): their covariance, for groups a stage fixed from centroids
        self._inside: dict = {}  # entry -> which pixels of its region hold the Bragg term
        self._scale = None
        self._check_data()

    def _check_data(self):
        """Refuse data no likelihood can fit: photon counts below zero (Poisson)
        or no signal at all among the pixels that may be used."""
        for k, (d, valid, mask) in enumerate(zip(self.datas, self.valid, self.masks)):
            what = "the data" if len(self.datas) == 1 else f"image {k}"
            use = torch.ones_like(d, dtype=torch.bool)
            for m in (valid, mask):
                if m is not None:
                    use = use & m
            if not bool(use.any()):
                raise InputError(f"no pixel of {what} is both valid and in the region of interest")
            values = d[use]
            if self.loss_name == "poisson" and bool((values < 0).any()):
                raise InputError(f"{what} hold {int((values < 0).sum())} negative values among the pixels used; the "
                                 "Poisson likelihood needs photon counts (mark bad pixels invalid, or use the "
                                 "gaussian loss for readings with offsets)")
            if not bool((values > 0).any()):
                raise InputError(f"{what} hold no photons (no pixel above 0) among the pixels used: nothing to fit")

    def _bind(self, groups, per_entry):
        n = len(self.entries)
        specs = []
        for spec in groups:
            if isinstance(spec, tuple) and len(spec) == 2 and not isinstance(spec[0], tuple):
                g, ids = spec
                ids = tuple(sorted({int(i) for i in ids}))
                if not ids or not all(0 <= i < n for i in ids):
                    raise InputError(f"group {spec[0]!r} is bound to images {list(ids)}; there are {n}")
                specs.append((g, ids))
            else:
                specs.append((spec, tuple(range(n))))
        for k in range(n):
            specs += [(_group_copy(spec), (k,)) for spec in per_entry]
        self.bindings, offset = [], 0
        seen = {}  # (group name, entry) -> whether that binding was for every entry
        for spec, ids in specs:
            g = make_group(spec).bind(self.entries[ids[0]].sim)
            whole = len(ids) == n
            for k in ids:
                if (g.name, k) in seen:
                    if seen[(g.name, k)] == whole:
                        raise InputError(f"parameter group {g.name!r} given twice")
                    raise InputError(f"groups {[g.name]} are both shared and per image")
                seen[(g.name, k)] = whole
            prefix = "" if whole else (f"image{ids[0]}." if len(ids) == 1 else
                                       "images" + "+".join(map(str, ids)) + ".")
            self.bindings.append(Binding(g, ids, offset, prefix))
            offset += g.size
        self.size = offset
        self.labels = [b.prefix + lab for b in self.bindings for lab in b.group.labels]
        self.group_of = [b.group.name for b in self.bindings for _ in range(b.group.size)]
        self.entries_of = [b.entries for b in self.bindings for _ in range(b.group.size)]
        self.bound = [[b for b in self.bindings if k in b.entries] for k in range(n)]

    def _by_label(self, spec, what):
        out = {}
        for label, (a, b) in spec.items():
            if label not in self.labels:
                raise InputError(f"{what}: no parameter {label!r}; the refined ones are {self.labels}")
            out[self.labels.index(label)] = (float(a), float(b))
        return out

    # ------------------------------------------------------------------ objective
    def substitutions(self, k: int, sim, x) -> dict:
        """{parameter or buffer name: value} of entry k's models at internal vector x."""
        subs = {}
        for b in self.bound[k]:
            b.group.substitute(sim, x[b.slice], subs)
        return subs

    def model(self, k: int, sim, x, mask, broaden=None) -> torch.Tensor:
        """Expected photons (panels, slow, fast) of entry k at internal vector
        `x`, rendered over the mask only, with spots broadened when asked."""
        subs = self.substitutions(k, sim, x)
        if broaden:
            n = subs.get("crystal.N", sim.crystal.N.to(x.dtype))
            nb = torch.clamp(n * broaden, min=3.0)
            ratio = (n / nb).detach().prod()
            subs["crystal.N"] = nb
            subs["beam.fluence"] = subs.get("beam.fluence", sim.beam.fluence.to(x.dtype)) * ratio
        subs.update(mask_substitutions(self.rendered_mask(k, sim, mask)))
        model = self.entries[k].render(sim, subs)
        for b in self.bound[k]:
            extra = b.group.image_term(sim, x[b.slice], model.shape)
            if extra is not None:
                model = model + extra
        return model

    def rendered_mask(self, k: int, sim, mask) -> torch.Tensor:
        """The pixels a render for region `mask` of entry k computes: those of
        the region where the Bragg term is (engine.bragg), grown by a
        detector PSF's radius (roi.render_mask)."""
        bragg = self.bragg[k]
        return render_mask(sim, mask if bragg is None else mask & bragg.to(mask.device))

    def pixels(self, k: int, sim, x, mask) -> torch.Tensor:
        """model(k, sim, x, mask)[mask] (1-D), rendering only the pixels of
        the mask where the Bragg term is (engine.bragg), with no full frame."""
        return self.rendered_pixels(k, sim, x, mask) + self.additive_pixels(k, sim, x, mask)

    def additive_pixels(self, k: int, sim, x, mask):
        """The additive groups' photons (backgrounds) over the pixels of the mask (1-D, or 0)."""
        total = 0.0
        for b in self.bound[k]:
            extra = b.group.region_term(sim, x[b.slice], mask)
            if extra is not None:
                total = total + extra
        return total

    def rendered_pixels(self, k: int, sim, x, mask) -> torch.Tensor:
        """The render's part of pixels(): what the simulator computes."""
        subs = self.substitutions(k, sim, x)
        bragg = self.bragg[k]
        if sim.response is not None and sim.response.psf is not None:  # the blur needs the neighbours
            subs.update(mask_substitutions(self.rendered_mask(k, sim, mask)))
            return self.entries[k].render(sim, subs)[mask]
        if bragg is None:
            values = self.entries[k].render_pixels(sim, subs, mask)
        else:
            kept = self._inside.get(k)
            if kept is None or kept[0] is not mask or kept[1] is not bragg:
                kept = self._inside[k] = (mask, bragg, (mask & bragg.to(mask.device))[mask])
            inside = kept[2]
            rendered = self.entries[k].render_pixels(sim, subs, mask & bragg.to(mask.device))
            values = torch.zeros(inside.shape, dtype=rendered.dtype, device=rendered.device)
            values = values.masked_scatter(inside, rendered)
        return values

    def _entry_loss(self, k, sim, x, mask, data, broaden=None):
        return self.loss_fn(self.model(k, sim, x, mask, broaden), data, mask, **self.loss_options)

    def _restraints(self, x):
        loss = x.new_zeros(())
        for i, (mean, sigma) in self.priors.items():
            loss = loss + 0.5 * ((x[i] - mean) / sigma) ** 2
        for i, (lo, hi) in self.bounds.items():
            loss = loss + 1e4 * (torch.relu(lo - x[i]) ** 2 + torch.relu(x[i] - hi) ** 2)
        return loss

    def objective(self, x, entries=None) -> torch.Tensor:
        """The objective at internal vector `x` with the user's simulators:
        the losses of `entries` (default: all, with the priors and bounds)
        over their regions (those given, or the ones the last run used)."""
        ks = range(len(self.entries)) if entries is None else entries
        total = self._restraints(x) if entries is None else x.new_zeros(())
        for k in ks:
            sim = self.entries[k].sim
            mask = self.masks[k]
            if mask is None:
                raise InputError(f"the region of interest of image {k} is not set yet: give one or run first")
            data = self.datas[k].to(device=sim.device, dtype=x.dtype)
            total = total + self._entry_loss(k, sim, x, mask.to(sim.device), data)
        return total

    # ------------------------------------------------------------------ stages
    def _active(self, names, only=None):
        """Internal indices of the groups `names` (only those bound to entry
        `only` alone, when given) and the entries their loss depends on."""
        if only is None:
            active = [i for i, g in enumerate(self.group_of) if g in names]
        else:
            active = [i for i, (g, e) in enumerate(zip(self.group_of, self.entries_of)) if g in names and e == (only,)]
        touched = sorted({k for i in active for k in self.entries_of[i]})
        return active, touched

    def _preconditioner(self, sims, x, active, touched, masks, datas, broaden):
        """Per-parameter step scales 1 / sqrt(curvature) at the stage's start,
        so that L-BFGS sees a problem of unit scale. The curvature is the
        diagonal of the Fisher information (always positive, unlike the
        Hessian far from the minimum), estimated from a few backward passes,
        summed over the entries."""
        idx = torch.tensor(active, dtype=torch.long, device=x.device)
        if not self.precondition:
            return torch.ones(len(active), dtype=x.dtype, device=x.device)
        d = torch.zeros(self.size, dtype=torch.float64, device=x.device)
        for k in touched:
            v = x[idx].clone().requires_grad_(True)
            model = self.model(k, sims[k], x.index_put((idx,), v), masks[k], broaden)
            d[idx] += fisher_diagonal(model[masks[k]], v)
            self.hessian_renders += 1
        for i, (_, sigma) in self.priors.items():
            d[i] += 1.0 / sigma ** 2
        d = d[idx]
        ok = torch.isfinite(d) & (d > 0)
        scale = torch.where(ok, 1.0 / torch.sqrt(torch.where(ok, d, torch.ones_like(d))), torch.ones_like(d))
        return torch.clamp(scale, 1e-4, 1e2).to(x.dtype)

    def _stage(self, sims, x_master, stage, masks, datas, dtype, only=None, reuse=False):
        names = stage["groups"]
        active, touched = self._active(names, only)
        base = x_master.to(dtype)
        idx = torch.tensor(active, dtype=torch.long, device=base.device)
        broaden = stage.get("broaden")
        key = (tuple(active), broaden)
        if reuse and self._scale is not None and self._scale[0] == key:  # the same objective, another dtype
            scale = self._scale[1].to(dtype)
        else:
            scale = self._preconditioner(sims, base, active, touched, masks, datas, broaden)
        self._scale = (key, scale)
        x0 = base[idx].clone()
        xs = torch.zeros_like(x0).requires_grad_(True)
        max_iter = int(stage.get("max_iter", 60))
        opt = torch.optim.LBFGS([xs], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.5) + 5,
                                history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-2 if dtype == torch.float32 else 1e-3, tolerance_change=1e-9)
        history = self.history if only is None else []

        def closure():
            opt.zero_grad()
            total = 0.0
            for k in touched:  # one entry's graph at a time
                x = base.index_put((idx,), x0 + scale * xs)
                loss = self._entry_loss(k, sims[k], x, masks[k], datas[k], broaden)
                loss.backward()
                total += float(loss.detach())
                self.image_history[k].append(float(loss.detach()))
                self.renders += 1
            if only is None and (self.priors or self.bounds):
                loss = self._restraints(base.index_put((idx,), x0 + scale * xs))
                loss.backward()
                total += float(loss.detach())
            history.append(total)
            if self.progress is not None:
                self.progress(dict(stage=stage.get("name", ", ".join(names)), image=only, evaluation=len(history),
                                   loss=total, dtype=str(dtype).replace("torch.", "")))
            return torch.tensor(total, dtype=dtype)

        t0, r0 = time.perf_counter(), self.renders
        ran_away = False
        try:
            opt.step(closure)
        except RuntimeError:  # a line search that ran away on a flat objective
            ran_away = True
            with torch.no_grad():
                xs.copy_(torch.where(torch.isfinite(xs), xs, torch.zeros_like(xs)))
            if not history or not math.isfinite(history[-1]):
                history.append(float("nan"))
        n_iter = opt.state[opt._params[0]].get("n_iter", 0) if opt.state else 0
        with torch.no_grad():
            x_new = x_master.clone()
            x_new[idx] = (x0 + scale * xs.detach()).to(x_master.dtype)
        last = history[-1] if history else float("nan")
        finite = bool(torch.isfinite(xs).all()) and math.isfinite(last)
        info = dict(groups=list(names), broaden=broaden, dtype=str(dtype).replace("torch.", ""),
                    iterations=int(n_iter), renders=self.renders - r0, loss=last,
                    seconds=time.perf_counter() - t0, converged=finite and not ran_away and n_iter < max_iter)
        if only is not None:
            info["image"] = only
        if self.verbose:
            print(info)
        return (x_new if finite else x_master), info

    # ------------------------------------------------------------------ run
    def _copies(self, dtype):
        """The simulators cast to `dtype`, copied together so that shared
        modules stay shared."""
        copies = copy.deepcopy([e.sim for e in self.entries])
        for s in copies:
            s.to(dtype)
        return copies

    def _regions(self, sims, x):
        """Each entry's region of interest: the one given, or one from the
        model at internal vector `x` and the data (roi_mask, with room for
        broadened spots; for stages that never broaden them spot_region,
        which leaves out the faint tails of bright spots); and-ed with its
        valid pixels."""
        masks = []
        swept = set()
        if any(s.get("kind") == "rotation_centroids" for s in self.stages):
            swept = {k for ks in sweeps_of(self, sims) for k in ks if self.masks[k] is None}
        if swept:  # the sweep strategy's frames: where the start model predicts spots, rendering no whole frame
            given = list(self.masks)
            for ks in sweeps_of(self, sims):
                ks = [k for k in ks if k in swept]
                if ks:
                    sweep_regions(self, sims, x, ks, given)
        for k, (e, s) in enumerate(zip(self.entries, sims)):
            m = self.masks[k]
            if m is None:
                with torch.no_grad():
                    model = e.render(s, self.substitutions(k, s, x.to(s.dtype)))
                data = self.datas[k].to(model)
                if self.spot_regions:
                    m = spot_region(model, data, self.valid[k])
                    for j, p in enumerate(s.detector.panels):
                        if p.mask is not None:
                            m[j] &= p.mask.to(m.device)
                else:
                    m = roi_mask(s, data, model=model, render=e.render)
            m = m.to(s.device)
            if self.valid[k] is not None:
                m = m & self.valid[k].to(s.device)
            if not bool(m.any()):
                what = "the image" if len(self.entries) == 1 else f"image {k}"
                raise InputError(f"no pixel of {what} is both valid and in the region of interest")
            masks.append(m)
        return masks

    def run(self, write: bool = True) -> RefinementResult:
        t_start = time.perf_counter()
        # stages of kind "centroids" and "steps" alone render in float64 only
        dtypes = [torch.float64] if self.spot_regions else self.dtypes
        copies = {dt: self._copies(dt) for dt in dict.fromkeys(dtypes)}
        lo = copies[dtypes[0]]
        dev = lo[0].device  # the internal vector lives with the models
        x = torch.zeros(self.size, dtype=torch.float64, device=dev)
        stages, plan = [], list(self.stages)
        if not self.entry_stages and plan and plan[0].get("kind") == "centroids":
            # the centroids need no region; the spots' region follows where they put them
            x, info = self._second_order(copies, x, plan.pop(0), None)
            info["oversample"] = self._rederive_oversample(copies, x)
            stages.append(info)
        masks = self._regions(lo, x)
        self.masks = [m.cpu() for m in masks]
        self._start_backgrounds(lo, masks, x)
        dt = dtypes[0]
        datas = [d.to(device=dev, dtype=dt) for d in self.datas]
        for k in range(len(self.entries)) if self.entry_stages else ():  # each entry alone
            for stage in self.entry_stages:
                x, info = self._stage(lo, x, stage, masks, datas, dt, only=k)
                stages.append(info)
        for i, stage in enumerate(plan):
            sampled = [s.oversample for s in lo]
            if stage.get("kind") in STAGE_KINDS:
                x, info = self._second_order(copies, x, stage, masks)
            else:
                x, info = self._stage(lo, x, stage, masks, datas, dt)
            info["oversample"] = self._rederive_oversample(copies, x)
            stages.append(info)
            if stage.get("kind") == "steps" and i + 1 == len(plan) and [s.oversample for s in lo] != sampled:
                # the last steps sampled the spots for the start's crystal: again, as re-derived
                x, info = self._second_order(copies, x, stage, masks)
                info["oversample"] = self._rederive_oversample(copies, x)
                stages.append(info)
        if self.stages and self.stages[-1].get("kind") == "steps":
            pass  # the last stage ran in float64 already
        elif dtypes[-1] != dtypes[0] or not self.stages:
            dt = dtypes[-1]
            last = dict(self.stages[-1]) if self.stages else dict(groups=sorted(set(self.group_of)))
            last["broaden"] = None
            datas = [d.to(device=dev, dtype=dt) for d in self.datas]
            x, info = self._stage(copies[dt], x, last, masks, datas, dt, reuse=True)
            stages.append(info)
        converged = stages[-1]["converged"]
        result = self._result(copies[dtypes[-1]], x, masks, converged, stages)
        if write:
            result.not_written = self.write(x)
        result.seconds = time.perf_counter() - t_start
        return result

    def _second_order(self, copies, x, stage, masks):
        """A stage of kind "centroids" or "steps", in float64 (their
        differences and Fisher information need it)."""
        if torch.float64 not in copies:
            copies[torch.float64] = self._copies(torch.float64)
        dev = x.device
        return STAGE_KINDS[stage["kind"]](self, copies[torch.float64], x, stage, masks,
                                          [d.to(device=dev, dtype=torch.float64) for d in self.datas])

    def _start_backgrounds(self, sims, masks, x):
        """A background group starts from its first entry's data (unless a start was given)."""
        for b in self.bindings:
            if isinstance(b.group, Background):
                k = b.entries[0]
                with torch.no_grad():
                    subs = self.substitutions(k, sims[k], x.to(sims[k].dtype))
                    subs.update(mask_substitutions(self.rendered_mask(k, sims[k], masks[k])))
                    model = self.entries[k].render(sims[k], subs).double()
                b.group.start_from(self.datas[k].to(model), model, masks[k])

    def _rederive_oversample(self, copies, x):
        """Automatic oversampling follows the refined crystal size and
        wavelength (an N or wavelength far from its start changes how finely
        the spots must be sampled); a user's explicit choice is kept."""
        from ..simulator import recommended_oversample
        chosen, done = [], {}
        for k, e in enumerate(self.entries):
            if not e.sim.oversample_auto:
                chosen.append(e.sim.oversample)
                continue
            key = (id(e.sim), tuple(id(b) for b in self.bound[k]))  # the images of a sweep: one simulator
            if key not in done:
                probe = copy.deepcopy(e.sim).double()
                assign(probe, self.substitutions(k, probe, x.to(probe.device, torch.float64)))
                done[key] = recommended_oversample(probe.crystal, probe.beam, probe.detector)
            n = done[key]
            for sims in copies.values():
                sims[k].recommended_oversample = sims[k].oversample = n
            self.oversample[k] = n
            chosen.append(n)
        return chosen[0] if len(set(chosen)) == 1 else chosen

    def hessian(self, sims, x, masks, datas):
        """(Hessian, gradient) of the objective over every internal element:
        per entry, autograd's Hessian and gradient of its loss over the
        elements it depends on (central differences of gradients where double
        backward fails), assembled; plus the priors' and bounds' terms."""
        H = torch.zeros(self.size, self.size, dtype=torch.float64)
        grad = torch.zeros(self.size, dtype=torch.float64)
        held = self.held_elements
        for k in range(len(self.entries)):
            gi = [i for i, e in enumerate(self.entries_of) if k in e and i not in held]
            if not gi:
                continue
            idx = torch.tensor(gi, dtype=torch.long, device=x.device)

            def f(v, k=k, idx=idx):
                return self._entry_loss(k, sims[k], x.index_put((idx,), v), masks[k], datas[k])

            v0 = x[idx].clone()
            v = v0.clone().requires_grad_(True)
            (g0,) = torch.autograd.grad(f(v), v)
            grad[idx.cpu()] += g0.detach().double().cpu()
            try:
                block = torch.autograd.functional.hessian(f, v0)
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
                block = torch.stack(rows)
            cpu = idx.cpu()
            H[cpu[:, None], cpu[None, :]] += (0.5 * (block + block.T)).double().cpu()
        xc = x.detach().double().cpu()
        for i, (mean, sigma) in self.priors.items():
            H[i, i] += 1.0 / sigma ** 2
            grad[i] += (float(xc[i]) - mean) / sigma ** 2
        for i, (lo, hi) in self.bounds.items():
            if not lo <= float(xc[i]) <= hi:
                H[i, i] += 2e4
                grad[i] += 2e4 * (float(xc[i]) - (lo if float(xc[i]) < lo else hi))
        return H, grad

    def _curvature(self, sims, x, masks, datas):
        """(Hessian, gradient) at the end: the Fisher information and gradient
        of a last steps stage over every element (the same Poisson
        likelihood, from the Jacobian it took there: no render more), else
        `hessian`."""
        if self._steps_curvature():
            active, fisher, g = self.information
            at = torch.tensor(active, dtype=torch.long)
            H = torch.zeros(self.size, self.size, dtype=torch.float64)
            grad = torch.zeros(self.size, dtype=torch.float64)
            H[at[:, None], at[None, :]] = fisher.double().cpu()
            grad[at] = g.double().cpu()
            return H, grad
        return self.hessian(sims, x, masks, datas)

    @property
    def held_elements(self) -> set:
        """Internal elements a centroid stage fixed (engine.held's blocks)."""
        return {i for block in self.held for i in block}

    def _steps_curvature(self) -> bool:
        """Whether the last stage, of kind "steps", left the Fisher information of every element (but
        those held from centroids)."""
        return self.information is not None and bool(self.stages) and self.stages[-1].get("kind") == "steps" \
            and set(self.information[0]) >= set(range(self.size)) - self.held_elements and self.loss_name == "poisson"

    def _fit(self, sims, x, masks):
        """Goodness of fit of every entry at x, and all together. The
        deviance is summed over the region's pixels that the refined model
        picks (roi.spot_region of its full render, and the region's random
        background pixels): those the data picked are biased upwards by the
        noise that picked them. The spot statistics use the whole region.
        The last one is kept (a steps stage's restarts judge it too)."""
        key = x.detach().double().cpu()
        if self._fit_at is not None and torch.equal(self._fit_at[0], key):
            return self._fit_at[1]
        parts = []
        with torch.no_grad():
            for k, sim in enumerate(sims):
                xk = x.to(sim.dtype)
                model = self.model(k, sim, xk, masks[k])
                subs = self.substitutions(k, sim, xk)
                if self.bragg[k] is not None:  # beyond the predicted spots the Bragg term is nothing
                    subs.update(mask_substitutions(self.rendered_mask(k, sim, masks[k])))
                bragg = self.entries[k].render(sim, subs)
                picked = masks[k] & spot_region(bragg, None, self.valid[k]).to(masks[k].device)
                parts.append(goodness_of_fit(model, self.datas[k], masks[k], self.loss_name, pixels=picked,
                                             **self.loss_options))
        self._fit_at = (key, (combine(parts), parts))
        return self._fit_at[1]

    def _rejections(self, fit) -> list[str]:
        """Why the data do not accept a fit (empty when they do)."""
        why = []
        ratio = fit["deviance_ratio"]
        if not (ratio <= self.max_deviance_ratio or fit["deviance_z"] <= self.max_deviance_z):
            why.append(f"the deviance is {ratio:.3g} times what photon noise allows "
                       f"({fit['deviance_z']:.1f} standard deviations above)")
        if fit["spots"] >= 3 and fit["shifted_fraction"] > self.max_shifted_fraction:
            why.append(f"{fit['shifted_spots']} of {fit['spots']} observed spots lie off the model's beyond noise "
                       "(shifted centroids)")
        return why

    def _result(self, sims, x, masks, stopped, stages):
        n = self.size
        labels = list(self.labels)
        fit, image_fit = self._fit(sims, x, masks)
        ratio = fit["deviance_ratio"]
        inflate = math.sqrt(ratio) if math.isfinite(ratio) and ratio > 1 else 1.0
        undetermined, warnings = set(), []
        decrement = float("nan")
        if self.uncertainties:
            dt = sims[0].dtype
            datas = [d.to(device=x.device, dtype=dt) for d in self.datas]
            if self.progress is not None:
                self.progress(dict(stage="uncertainties", image=None, evaluation=0, loss=float("nan"),
                                   dtype=str(dt).replace("torch.", "")))
            # elements a stage fixed from spot centroids keep the centroids' covariance
            held = self.held_elements
            free = torch.tensor([i for i in range(n) if i not in held], dtype=torch.long)
            H, grad = self._curvature(sims, x.to(dt), masks, datas)
            evals, evecs = torch.linalg.eigh(H[free[:, None], free[None, :]])
            top = float(evals.abs().max()) if len(free) else 0.0
            good = evals > 1e-10 * max(top, 1e-300)
            inv = torch.where(good, 1.0 / torch.where(good, evals, torch.ones_like(evals)), torch.zeros_like(evals))
            cov = torch.zeros(n, n, dtype=torch.float64)
            cov[free[:, None], free[None, :]] = ((evecs * inv) @ evecs.T) * inflate ** 2
            for block, c in self.held.items():
                b = torch.tensor(block, dtype=torch.long)
                cov[b[:, None], b[None, :]] = c.double().cpu()
            g = evecs.T @ grad[free]
            decrement = float((g * g * inv).sum())
            for j in torch.nonzero(~good).flatten().tolist():
                undetermined.update(free[torch.nonzero(evecs[:, j].abs() > 0.3).flatten()].tolist())
            sigma = torch.sqrt(torch.clamp(torch.diagonal(cov), min=0.0))
            for i in range(n):
                if not sigma[i] > 0 or sigma[i] > self.undetermined_sigma:
                    undetermined.add(i)
        else:
            cov = torch.full((n, n), float("nan"), dtype=torch.float64)
            sigma = torch.full((n,), float("nan"), dtype=torch.float64)
        d = torch.sqrt(torch.clamp(torch.diagonal(cov), min=1e-300))
        corr = cov / (d[:, None] * d[None, :])
        if self.uncertainties:
            for i, j in torch.nonzero(torch.triu(corr.abs() > self.max_correlation, diagonal=1)).tolist():
                if i not in undetermined or j not in undetermined:
                    warnings.append(f"{labels[i]} and {labels[j]} are correlated {float(corr[i, j]):+.3f}: the "
                                    "data determine only a combination of them")
                undetermined.update((i, j))
        finite_cov = torch.where(torch.isfinite(cov), cov, torch.zeros_like(cov))
        x64 = x.detach().double().cpu()
        shared, own = [], [[] for _ in self.entries]
        for b in self.bindings:
            sim = self.entries[b.entries[0]].sim
            sl = b.slice
            v = x64[sl].to(sim.device)
            J = torch.autograd.functional.jacobian(lambda u, g=b.group, s=sim: g.physical(s, u), v)
            J = torch.nan_to_num(J.double()).cpu().reshape(-1, v.numel())
            start = b.group.physical(sim, torch.zeros_like(v)).detach().double().cpu().reshape(-1)
            val = b.group.physical(sim, v).detach().double().cpu().reshape(-1)
            psig = torch.sqrt(torch.clamp(torch.diagonal(J @ finite_cov[sl, sl] @ J.T), min=0.0))
            if self.uncertainties:
                for j, (name, unit) in enumerate(zip(b.group.physical_labels, b.group.units)):
                    scale = _natural_scale(b.group.name, unit, float(val[j]))
                    if scale is not None and float(psig[j]) > scale:
                        moved = [b.offset + i for i in torch.nonzero(J[j].abs() > 0).flatten().tolist()]
                        if not set(moved) <= undetermined:
                            warnings.append(f"{b.prefix}{name} = {float(val[j]):.6g} +- {float(psig[j]):.3g} {unit}: "
                                            "the uncertainty exceeds the value's own scale")
                        undetermined.update(moved)
            for i in range(v.numel()):  # an undetermined parameter leaves what it moves undetermined
                if b.offset + i in undetermined:
                    psig = torch.where(J[:, i].abs() > 0, torch.full_like(psig, float("inf")), psig)
            params = [ParameterResult(b.group.name, name, unit, float(s), float(a), float(e))
                      for name, unit, s, a, e in zip(b.group.physical_labels, b.group.units, start, val, psig)]
            (own[b.entries[0]] if len(b.entries) == 1 and len(self.entries) > 1 else shared).extend(params)
        for i in undetermined:
            sigma[i] = float("inf")
        undetermined = [labels[i] for i in sorted(undetermined)]
        if undetermined:
            warnings.insert(0, "undetermined by the data: " + ", ".join(undetermined))
        # a Newton step would gain decrement / 2 of log-likelihood; the steps stage
        # ends where none under one unit is realised (its differences' own error)
        limit = 2.0 if self._steps_curvature() else 1.0
        gradient_ok = stopped and (not self.uncertainties or decrement < limit)
        why = self._rejections(fit)
        if len(image_fit) > 1:  # one image in a wrong minimum among many is not diluted
            for k, f in enumerate(image_fit):
                why += [f"image {k}: {w}" for w in self._rejections(f)]
        acceptable = not why
        swept = [f for st in stages if st.get("kind") == "rotation_centroids" for f in st.get("sweeps", [])]
        lost = [f for f in swept if not (f.get("rms_px", float("inf")) <= MAX_CENTROID_RMS_PX
                                         and f.get("reflections", 0) >= 0.5 * max(f.get("indexed", 0), 3))]
        if lost:
            found = "; ".join(f"{f.get('reflections', 0)} of {f.get('indexed', 0)} indexed spots kept, "
                              f"rms {f.get('rms_px', float('nan')):.3g} px" for f in lost)
            warnings.insert(0, f"likely a wrong minimum: the geometry does not fit the observed spot centroids "
                               f"({found})")
            acceptable = False
        elif why and any(f.get("held") for f in swept):
            # the geometry holds (centroids); what the pixels reject is the model of the spots' shapes and background
            warnings.insert(0, "the model does not reproduce the measured pixels within photon noise: " + "; ".join(why)
                            + ". The geometry comes from the observed spot centroids, which it fits (" + "; ".join(
                                f"rms {f['rms_px']:.3g} px, {f['rms_frames']:.3g} frames over {f['reflections']} "
                                "reflections" for f in swept if f.get("held")) + "); the spot shapes and background "
                            "are approximate")
        elif why:
            warnings.insert(0, "likely a wrong minimum: " + "; ".join(why))
        if not gradient_ok:
            warnings.insert(0, "not converged: " + (
                "the fit stopped before its tolerances (iteration limit or a failed line search)" if not stopped
                else f"the gradient is not small at the end (Newton decrement {decrement:.3g})"))
        if inflate > 1.05 and acceptable:
            warnings.append(f"the data scatter {ratio:.3g} times more than photon noise: uncertainties are "
                            f"inflated by {inflate:.3g}")
        return RefinementResult(labels=labels, x=x64, sigma_internal=sigma, covariance=cov, correlation=corr,
                                parameters=shared, images=own, loss=self.history[-1] if self.history else float("nan"),
                                loss_history=list(self.history), renders=self.renders,
                                converged=gradient_ok and acceptable, undetermined=undetermined, stages=stages,
                                hessian_renders=self.hessian_renders, pixels=int(sum(int(m.sum()) for m in masks)),
                                image_loss=[h[-1] if h else float("nan") for h in self.image_history],
                                image_history=[list(h) for h in self.image_history],
                                image_pixels=[int(m.sum()) for m in masks], gradient_converged=gradient_ok,
                                fit_acceptable=acceptable, fit=fit, image_fit=image_fit, uncertainty_scale=inflate,
                                newton_decrement=decrement, warnings=warnings)

    def write(self, x) -> list:
        """Put the values of internal vector `x` into the user's models;
        returns the names of values that shared modules cannot hold (left
        unwritten)."""
        targets = {}  # id(tensor) -> (tensor, value, name)
        conflicts = set()
        with torch.no_grad():
            for k, e in enumerate(self.entries):
                sim = e.sim
                for name, value in self.substitutions(k, sim, x.to(sim.device, torch.float64)).items():
                    t = _target(sim, name)
                    if id(t) in targets and not torch.equal(targets[id(t)][1], value.detach()):
                        conflicts.add(name)
                    targets[id(t)] = (t, value.detach(), name)
                if self.oversample[k] is not None:
                    sim.recommended_oversample = sim.oversample = self.oversample[k]
            for t, value, name in targets.values():
                if name not in conflicts:
                    t.copy_(value.to(t))
        return sorted(conflicts)


# a sweep's geometry fitted to its spot centroids with a larger rms has lost the spots (misindexed)
MAX_CENTROID_RMS_PX = 2.0

# groups of positive quantities: an uncertainty beyond the value is no determination
POSITIVE_GROUPS = ("cell", "N", "scale", "mosaic", "wavelength", "structure_factors")


def _natural_scale(group: str, unit: str, value: float) -> float | None:
    """The scale an uncertainty of a physical value must stay below to say
    anything: the value itself for positive quantities, 180 degrees for an
    angle; None where there is no such scale (shifts, backgrounds)."""
    if group in POSITIVE_GROUPS:
        return abs(value)
    if unit == "deg":
        return 180.0
    return None


def _target(sim, name):
    try:
        return sim.get_parameter(name)
    except AttributeError:
        return sim.get_buffer(name)


def assign(sim, subs: dict) -> None:
    """Copy substituted values {parameter or buffer name: tensor} into `sim`."""
    with torch.no_grad():
        for name, value in subs.items():
            target = _target(sim, name)
            target.copy_(value.detach().to(target))


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


# ----------------------------------------------------------------------------- conveniences

def refine(sim, data, groups, *, roi=None, write=True, image=None, still=False, valid=None,
           **kw) -> RefinementResult:
    """Refine parameter `groups` of `sim` against measured `data` (panels,
    slow, fast photons) and write the refined values into the models (unless
    write=False): the one-entry case of `Refiner` (see it for the options;
    roi is the Entry's mask)."""
    return Refiner([Entry(sim, data, roi, valid, image, still)], groups, **kw).run(write=write)


def refine_joint(sims, datas, shared=(), per_image=("scale", "orientation"), *, rois=None, write=True,
                 image_strategy="lbfgs", image_max_iter=30, **kw) -> RefinementResult:
    """Refine `shared` groups (one value for every image: distance,
    beam_centre, panels, wavelength, ...) and `per_image` groups
    (orientation, scale, N, background, cell, ...) of simulators `sims`
    against images `datas` (rois: None, "all" or one mask per image), and
    write the refined values into the models (unless write=False)."""
    sims, datas = list(sims), list(datas)
    if not sims:
        raise InputError("no simulators to refine")
    if len(sims) != len(datas):
        raise InputError(f"{len(sims)} simulators but {len(datas)} images")
    if rois is None or isinstance(rois, str):
        rois = [rois] * len(sims)
    elif len(rois) != len(sims):
        raise InputError(f"{len(rois)} regions of interest for {len(sims)} images")
    entries = [Entry(s, d, r) for s, d, r in zip(sims, datas, rois)]
    return Refiner(entries, shared, per_image, entry_strategy=image_strategy, entry_max_iter=image_max_iter,
                   **kw).run(write=write)
