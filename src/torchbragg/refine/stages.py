"""Stages of the refinement engine beyond L-BFGS (stage dicts with a
"kind"): "centroids", the geometric groups fitted to the observed spot
centroids of each image (centroids.fit_centroids, no render), and "steps",
Levenberg-Marquardt steps on the pixels (steps.levenberg_marquardt:
Anscombe, then Poisson). `still_strategy` chains them: the engine's
strategy="still"."""

from __future__ import annotations

import time

import numpy as np
import torch

from .centroids import GEOMETRY_GROUPS, fit_centroids
from .parameters import Background, Group, Scale
from .steps import levenberg_marquardt, poisson_deviance


# degree: the restarts' turn of the orientation, under a spot's angular width
RESTART_TURN = 0.05


def still_strategy(names, max_iter: int = 30) -> list[dict]:
    """Centroids of the geometric groups (when any is refined), then every
    group by Levenberg-Marquardt steps (Anscombe, then Poisson), restarted
    from the neighbours of their start when they end in a wrong minimum."""
    names = list(names)
    geometric = [g for g in names if g in GEOMETRY_GROUPS]
    stages = [dict(kind="centroids", groups=geometric)] if geometric else []
    stages.append(dict(kind="steps", groups=names, max_iter=max_iter, restarts=True))
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
    info = dict(kind="centroids", groups=list(stage["groups"]), broaden=None, dtype="float64", renders=0,
                iterations=sum(f["iterations"] for f in fits), loss=float("nan"), seconds=time.perf_counter() - t0,
                converged=ok, images=fits)
    return (x_new if ok else x), info


def steps_stage(engine, sims, x, stage, masks, datas):
    """An engine stage of kind "steps": the stage's groups by Levenberg-
    Marquardt steps (Anscombe, then Poisson) over the entries they touch,
    rendered in float64 (`sims`) over each entry's region, each parameter's
    Jacobian column from the entries it moves alone; the priors are
    Gaussian restraints, the bounds are not applied. The Fisher information
    and gradient at the end are kept (engine.information) for the
    uncertainties."""
    t0 = time.perf_counter()
    active, touched = engine._active(stage["groups"])
    idx = torch.tensor(active, dtype=torch.long, device=x.device)
    base = x.double()
    column = {i: j for j, i in enumerate(active)}

    def part(k):
        def expected(v):
            full = base.index_put((idx,), v.to(base))
            return engine.model(k, sims[k], full, masks[k])[masks[k]]
        return expected, [column[i] for i in active if k in engine.entries_of[i]]

    measured = torch.cat([datas[k].double()[masks[k]] for k in touched])
    prec = torch.zeros(len(active), dtype=torch.float64)
    mean = torch.zeros(len(active), dtype=torch.float64)
    for j, i in enumerate(active):
        if i in engine.priors:
            mean[j], prec[j] = engine.priors[i][0], 1.0 / engine.priors[i][1] ** 2

    def progress(step):
        if engine.progress is not None:
            engine.progress(dict(stage=f"steps, {step['phase']}", image=None, evaluation=step["renders"],
                                 loss=step["loss"], dtype="float64"))

    def steps(v0):
        return levenberg_marquardt(None, measured, v0, phases=(("anscombe", 1.0), ("poisson", 1e-2)),
                                   max_iter=int(stage.get("max_iter", 30)), prior_precision=prec, prior_mean=mean,
                                   progress=progress, parts=[part(k) for k in touched],
                                   known=linear_columns(engine, sims, base, idx, touched, masks))

    def wrong(res):
        """Whether the data reject the fit in any of its entries (the
        engine's test: the deviance over the pixels its model picks, the
        spots shifted from the model's)."""
        full = x.clone()
        full[idx] = res.x.to(x)
        fit, parts = engine._fit(sims, full, masks)
        return any(engine._rejections(f) for f in parts)

    start = base[idx].cpu()
    res = steps(start)
    renders, tried = res.renders, 0
    turns = [j for b in engine.bindings if b.group.name == "orientation" for j in range(b.offset, b.offset + 3)]
    if stage.get("restarts") and any(i in column for i in turns) and wrong(res):
        # a wrong minimum: from the neighbours of the start, turned about each lab
        # axis by a fraction of a spot's angular width (all orientations alike), the best
        for axis in range(3):
            for sign in (1.0, -1.0):
                v0 = start.clone()
                for b in engine.bindings:
                    if b.group.name == "orientation" and b.offset + axis in column:
                        v0[column[b.offset + axis]] += sign * RESTART_TURN / 0.01
                other = steps(v0)
                renders, tried = renders + other.renders, tried + 1
                if other.loss < res.loss:
                    res = other
    engine.renders += renders
    engine.history.extend(res.loss_history)
    sizes = [int(masks[k].sum()) for k in touched]
    for k, mu, d in zip(touched, torch.split(res.expected, sizes), torch.split(measured, sizes)):
        engine.image_history[k].append(float(poisson_deviance(mu, d)))
    x_new = x.clone()
    x_new[idx] = res.x.to(x)
    engine.information = (active, res.fisher, res.gradient)
    info = dict(kind="steps", groups=list(stage["groups"]), broaden=None, dtype="float64",
                iterations=res.iterations, renders=renders, loss=res.loss, restarts=tried,
                seconds=time.perf_counter() - t0, converged=res.converged)
    return x_new, info


def linear_columns(engine, sims, base, idx, touched, masks):
    """known(v, mu) for levenberg_marquardt: the Jacobian columns that need
    no render: a constant background's (one on its panel's pixels of its
    entries) and the scale's where the render is proportional to the
    fluence (no detector response, no added term but backgrounds): the step
    times the photons without the backgrounds."""
    sizes = [int(masks[k].sum()) for k in touched]
    rows = dict(zip(touched, np.cumsum([0] + sizes[:-1]).tolist()))
    panel = {k: torch.nonzero(masks[k])[:, 0].cpu() for k in touched}
    total = sum(sizes)
    column = {i: j for j, i in enumerate(idx.tolist())}

    def proportional(k):
        return sims[k].response is None and all(
            isinstance(b.group, Background) or type(b.group).image_term is Group.image_term for b in engine.bound[k])

    def known(v, mu):
        full = base.index_put((idx,), v.to(base))
        cols = {}
        for b in engine.bindings:
            g = b.group
            linear = isinstance(g, Background) and not g.linear
            if not (linear or isinstance(g, Scale)) or b.offset not in column:
                continue
            for j in range(g.size):
                cols[column[b.offset + j]] = torch.zeros(total, dtype=torch.float64)
            for k in b.entries:
                if k not in rows:
                    continue
                sl = slice(rows[k], rows[k] + int(masks[k].sum()))
                if linear:
                    for p in range(g.size):
                        cols[column[b.offset + p]][sl] = (panel[k] == p).double()
                elif proportional(k):
                    extra = torch.zeros_like(mu[sl])
                    for other in engine.bound[k]:
                        term = other.group.image_term(sims[k], full[other.slice], masks[k].shape)
                        if term is not None:
                            extra = extra + term[masks[k]].double().cpu()
                    cols[column[b.offset]][sl] = g.step * (mu[sl] - extra)
                else:  # rendered
                    cols.pop(column[b.offset], None)
                    break
        return cols

    return known


STAGE_KINDS = {"centroids": centroid_stage, "steps": steps_stage}
