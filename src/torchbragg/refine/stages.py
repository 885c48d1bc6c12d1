"""Stages of the refinement engine beyond L-BFGS (stage dicts with a
"kind"): "centroids", the geometric groups fitted to the observed spot
centroids of each image (centroids.fit_centroids, no render), and "steps",
Levenberg-Marquardt steps on the pixels (steps.levenberg_marquardt:
Anscombe, then Poisson), and "rotation_centroids", the geometric groups of a
rotation sweep fitted to the observed spots' centroids in x, y and angle
(sweep.fit_rotation_centroids, no render), which then holds them and
confines each frame's render to where the spots are. `still_strategy`
chains centroids and steps: the engine's strategy="still"; `sweep_strategy`
chains rotation centroids and steps: strategy="sweep"."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .centroids import GEOMETRY_GROUPS, fit_centroids
from .parameters import Scale
from .steps import levenberg_marquardt, poisson_deviance
from .sweep import fit_rotation_centroids, index_sweep, predicted_positions, predicted_region, reflections_of, \
    rocking_frames, sweep_spots

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


def sweep_strategy(names, max_iter: int = 30) -> list[dict]:
    """The geometric groups from the spots' centroids in x, y and angle
    (held from then on where their centroids determine them well), then the
    other groups (scales, background, spot shapes, and the geometry the
    centroids left loose) by Levenberg-Marquardt steps on the pixels."""
    names = list(names)
    geometric = [g for g in names if g in GEOMETRY_GROUPS]
    stages = [dict(kind="rotation_centroids", groups=geometric)] if geometric else []
    stages.append(dict(kind="steps", groups=names, max_iter=max_iter))
    return stages


# internal units (0.01 degree, 0.1 % of a cell length, 0.01 px, ...): a
# geometry the centroids determine better than this is held for the pixels
HOLD_SIGMA = 3.0


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


def sweeps_of(engine, sims) -> list[list[int]]:
    """The entries of each rotation sweep: scan images sharing one simulator."""
    sweeps: dict = {}
    for k, e in enumerate(engine.entries):
        if not e.still and sims[k].goniometer is not None and sims[k].scan is not None:
            sweeps.setdefault(id(sims[k]), []).append(k)
    return list(sweeps.values())


def frame_of(entry, sim) -> int:
    """An entry's frame, counted from its scan's first image."""
    first = sim.scan.image_range[0]
    return (first if entry.image is None else entry.image) - first


def sweep_regions(engine, sims, x, ks, masks, extra_hkl=None) -> None:
    """Each frame `ks` of a sweep: the Bragg term over boxes around the
    predicted spots of the model at `x` (sweep.predicted_region), the
    region those plus a sample of the background; written into `masks`,
    engine.masks and engine.bragg."""
    sim = sims[ks[0]]
    subs = engine.substitutions(ks[0], sim, x.to(sim.dtype))
    hkl = reflections_of(sim, extra_hkl)
    frames = [frame_of(engine.entries[k], sim) for k in ks]
    reach = rocking_frames(sim)
    for k, f, (xyz, panel, found) in zip(ks, frames, predicted_positions(sim, subs, hkl, frames)):
        bragg, region = predicted_region(sim, xyz, panel, found, f, engine.valid[k], reach=reach,
                                         data=engine.datas[k])
        dev = masks[k].device if masks[k] is not None else sims[k].device
        masks[k] = region.to(dev)
        engine.masks[k] = region
        engine.bragg[k] = bragg.to(dev)


def rotation_centroid_stage(engine, sims, x, stage, masks, datas):
    """An engine stage of kind "rotation_centroids": for each rotation
    sweep, its shared geometric groups fitted to the centroids of the spots
    observed over its frames (sweep_spots, index_sweep,
    fit_rotation_centroids; re-indexed once at the fitted model), held
    afterwards (engine.held: their covariance from the centroids), and the
    frames' regions set from the fitted model's predictions."""
    t0 = time.perf_counter()
    x_new = x.clone()
    fits = []
    for ks in sweeps_of(engine, sims):
        k0, sim = ks[0], sims[ks[0]]
        bound = [b for b in engine.bound[k0] if b.group.name in stage["groups"] and b.group.name in GEOMETRY_GROUPS
                 and set(ks) <= set(b.entries)]
        idx = [i for b in bound for i in range(b.offset, b.offset + b.group.size)]
        if not idx:
            continue
        frames = [frame_of(engine.entries[k], sim) for k in ks]
        spots = sweep_spots([datas[k] for k in ks], frames, [engine.valid[k] for k in ks])
        base = x_new.double().cpu()
        where = torch.tensor(idx, dtype=torch.long)

        def subs_of(v, base=base, where=where, k0=k0, sim=sim):
            return engine.substitutions(k0, sim, base.index_put((where,), v).to(x.device, sim.dtype))

        v = base[where]
        fit, hkl, ok = None, None, None
        for _ in range(2):  # indexed again at the fitted model: fits from any start in the basin end alike
            hkl, ok = index_sweep(sim, subs_of(v), spots)
            if int(ok.sum()) < max(3, len(idx)):
                break
            fit = fit_rotation_centroids(sim, subs_of, v, hkl[ok], spots.panel[ok], spots.xyz[ok])
            v = fit.x
        if fit is None:
            fits.append(dict(images=[engine.entries[k].image for k in ks], spots=len(spots),
                             indexed=int(ok.sum()) if ok is not None else 0, rms_px=float("nan")))
            continue
        # held where the centroids pin it down (enough spots seen whole in angle); otherwise
        # (spots cut by the sweep's ends, few frames) the pixels refine it from the start
        held = bool(torch.sqrt(torch.diagonal(fit.covariance)).max() <= HOLD_SIGMA)
        if held:
            x_new[where.to(x.device)] = v.to(x)
            engine.held[tuple(idx)] = fit.covariance
        sweep_regions(engine, sims, x_new, ks, masks, hkl[ok])
        fits.append(dict(images=[engine.entries[k].image for k in ks], spots=len(spots), indexed=int(ok.sum()),
                         reflections=fit.reflections, rms_start_px=fit.rms_px_start, rms_px=fit.rms_px,
                         rms_start_frames=fit.rms_frames_start, rms_frames=fit.rms_frames,
                         iterations=fit.iterations, held=held,
                         sigma=torch.sqrt(torch.diagonal(fit.covariance)).tolist()))
    ok = bool(fits) and all(np.isfinite(f["rms_px"]) for f in fits)
    info = dict(kind="rotation_centroids", groups=list(stage["groups"]), broaden=None, dtype="float64", renders=0,
                iterations=sum(f.get("iterations", 0) for f in fits), loss=float("nan"),
                seconds=time.perf_counter() - t0, converged=ok, sweeps=fits)
    return x_new, info


def _known_columns(engine, sims, touched, active, masks, base, idx):
    """known(v, mu) for levenberg_marquardt over the concatenated pixels of
    entries `touched`: the columns that need no render. A scale's: the
    render is proportional to the fluence (not so through a detector
    response's offset, which is left to differences). An additive image
    term's (the background groups, linear in their elements): its value
    per unit element."""
    sizes = [int(masks[k].sum()) for k in touched]
    starts = np.cumsum([0] + sizes).tolist()
    pos = {i: j for j, i in enumerate(active)}

    def known(v, mu):
        cols = {}
        full = base.index_put((idx,), v.to(base))
        for t, k in enumerate(touched):
            seg, sim, m = slice(starts[t], starts[t + 1]), sims[k], masks[k]
            for b in engine.bound[k]:
                if isinstance(b.group, Scale) and sim.response is None and b.offset in pos:
                    bragg = mu[seg] - engine.additive_pixels(k, sim, full, m)
                    cols.setdefault(pos[b.offset], torch.zeros_like(mu))[seg] += bragg * b.group.step
            for b in engine.bound[k]:
                if not b.group.additive:
                    continue
                zero = b.group.region_term(sim, torch.zeros_like(full[b.slice]), m).to(mu)
                for j in range(b.group.size):
                    if b.offset + j in pos:
                        unit = torch.zeros_like(full[b.slice])
                        unit[j] = 1.0
                        col = b.group.region_term(sim, unit, m).to(mu) - zero
                        cols.setdefault(pos[b.offset + j], torch.zeros_like(mu))[seg] += col
        return cols

    return known


def _scale_start(engine, sims, base, active, touched, masks, datas):
    """The stage's start with each refined scale put where the photons say
    (the model is proportional to it: sum of data less background over sum
    of the render), so that steps start near the right magnitude."""
    where = torch.tensor(active, dtype=torch.long, device=base.device)
    v = base[where].cpu().clone()
    full = base  # an entry depends on its own scale only: the others' new starts change nothing
    for b in engine.bindings:
        if not isinstance(b.group, Scale) or b.offset not in active:
            continue
        signal = rendered = 0.0
        for k in b.entries:
            if k not in touched:
                continue
            mu = engine.rendered_pixels(k, sims[k], full, masks[k]).double()
            extra = engine.additive_pixels(k, sims[k], full, masks[k])
            signal += float((datas[k].double()[masks[k]] - extra).sum())
            rendered += float(mu.sum())
        if signal > 0 and rendered > 0:
            v[active.index(b.offset)] += math.log(signal / rendered) / b.group.step
    return v


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
    held = engine.held_elements  # fixed by a centroid stage
    active = [i for i in active if i not in held]
    touched = sorted({k for i in active for k in engine.entries_of[i]})
    idx = torch.tensor(active, dtype=torch.long, device=x.device)
    base = x.double()
    column = {i: j for j, i in enumerate(active)}

    # an entry's render is made again only when an element it depends on changed: a
    # background's change none (it is added), and the pixels are those of its region
    additive = {i for b in engine.bindings if b.group.additive for i in range(b.offset, b.offset + b.group.size)}

    def part(k):
        renders = [j for j, i in enumerate(active) if k in engine.entries_of[i] and i not in additive]
        kept = {}

        def expected(v):
            full = base.index_put((idx,), v.to(base))
            key = tuple(v[renders].tolist())
            if kept.get("key") != key:
                kept["key"], kept["value"] = key, engine.rendered_pixels(k, sims[k], full, masks[k])
            return kept["value"] + engine.additive_pixels(k, sims[k], full, masks[k])
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
                                   known=_known_columns(engine, sims, touched, active, masks, base, idx))

    def wrong(res):
        """Whether the data reject the fit in any of its entries (the
        engine's test: the deviance over the pixels its model picks, the
        spots shifted from the model's)."""
        full = x.clone()
        full[idx] = res.x.to(x)
        fit, parts = engine._fit(sims, full, masks)
        return any(engine._rejections(f) for f in parts)

    start = _scale_start(engine, sims, base, active, touched, masks, datas)
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


STAGE_KINDS = {"centroids": centroid_stage, "steps": steps_stage, "rotation_centroids": rotation_centroid_stage}
