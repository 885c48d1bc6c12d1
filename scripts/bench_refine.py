#!/usr/bin/env python3
"""Benchmark refinement of simulated stills.

K noisy stills (Poisson counts on a constant background) of a triclinic
crystal in random orientations are rendered, each start is drawn at random
within the errors of indexing (START: misset per axis, cell lengths, N, beam
centre, scale), and scale, background, orientation, cell, N and beam_centre
are refined with the default strategy (torchbragg.refine.refine, "auto":
for a still, the still strategy) on 0.2 mm pixels at 1 A, the geometry of
the L-BFGS recovery trials in tests/refine/test_refine_recovery.py.

  per still    seconds of the refinement, renders of the fit and of the
               curvature (Hessian), errors from the truth and success
  per render   forward+backward of the loss, timed on the region of interest
               (what the fit renders) and on the full image, and the forward
               alone on the full image (with its graph), in the fit's first
               precision (float32) after one warm-up
  overall      seconds per refined still, shots per second (stills / summed
               refinement seconds), successes

With --levels, the recovery trials of tests/recovery.py instead (512 x 512
stills, 0.1 mm pixels, 1.1 A, starts 0.1-0.3 degree off) at the chosen
signal levels (faint: peak ~30 photons over 3 of background, medium: ~300
over 3, bright: ~3e4 without background), refined through the engine as
`torchbragg refine` does (torchbragg.refine.refine with --strategy, default
auto: for a still, centroids, then Levenberg-Marquardt on the pixels): per
level and cell, wall and CPU seconds, renders (fit and curvature),
converged fits, successes (each error within its limit or within 3
reported uncertainties) and the standard deviation of the pulls.

Usage: python scripts/bench_refine.py [--stills K] [--detpixels N] [--device cuda] [--threads T]
                                      [--max-iter N] [--repeat R] [--seed S] [--json out.json]
       python scripts/bench_refine.py --levels faint,medium,bright [--systems triclinic,tetragonal]
                                      [--trials 20] [--strategy auto|still|lbfgs] [--threads 2]
                                      [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "src" / "torchbragg").is_dir():
    sys.path.insert(0, str(ROOT / "src"))

CASE = ("-cell 51 62 73 84 96 107 -default_F 100 -N 10 -lambda 1 -distance 100 -pixel 0.2 -oversample 1 "
        "-fluence 1e27")
BACKGROUND = 3.0  # photons per pixel under the spots
GROUPS = ["scale", "background", "orientation", "cell", "N", "beam_centre"]

# starts: uniform within +- these limits (cell: the three lengths)
START = {"misset_deg": 0.3, "cell_rel": 0.005, "N_rel": 0.30, "beam_centre_px": 1.5, "scale_rel": 0.50}
# success: each of these refined errors below its limit (angle and scale errors are reported only)
SUCCESS = {"misorientation_deg": 0.01, "cell_length_rel": 0.0005, "N_rel": 0.05, "beam_centre_px": 0.1}


def case_argv(detpixels: int) -> list[str]:
    return CASE.split() + ["-detpixels", str(detpixels)]


def build(detpixels: int, device: str):
    import torch

    from torchbragg.simulator import Simulator
    return Simulator.from_args(case_argv(detpixels), dtype=torch.float64, device=device)


def set_values(sim, group: str, x) -> None:
    """Move `sim`'s models by internal vector `x` of parameter group `group`
    (its own units: 0.01 deg, 0.1 % of a length, 1 % of N, ...)."""
    import torch

    from torchbragg.refine import Parametrisation
    p = Parametrisation([group], sim)
    with torch.no_grad():
        for name, value in p.substitutions(sim, torch.as_tensor(x, dtype=torch.float64)).items():
            try:
                target = sim.get_parameter(name)
            except AttributeError:
                target = sim.get_buffer(name)
            target.copy_(value.to(target))


def turn(sim, rotation) -> None:
    import torch
    with torch.no_grad():
        sim.crystal.U.copy_(torch.as_tensor(rotation).to(sim.crystal.U) @ sim.crystal.U)


def draw_start(sim, rng) -> dict:
    """Perturb a copy of the truth within START; returns what was applied."""
    misset = rng.uniform(-1, 1, 3) * START["misset_deg"]
    cell = rng.uniform(-1, 1, 3) * START["cell_rel"]
    n = rng.uniform(-1, 1) * START["N_rel"]
    centre = rng.uniform(-1, 1, 2) * START["beam_centre_px"]
    scale = rng.uniform(-1, 1) * START["scale_rel"]
    set_values(sim, "orientation", misset / 0.01)
    # triclinic cell group: lengths as log-ratios (0.1 %), then the three angles (kept)
    set_values(sim, "cell", [math.log1p(c) / 1e-3 for c in cell] + [0.0, 0.0, 0.0])
    set_values(sim, "N", [math.log1p(n) / 0.01])
    set_values(sim, "beam_centre", centre / 0.01)
    set_values(sim, "scale", [math.log1p(scale) / 0.01])
    return {"misset_deg": misset.tolist(), "cell_rel": cell.tolist(), "N_rel": n, "beam_centre_px": centre.tolist(),
            "scale_rel": scale}


def misorientation(a, b) -> float:
    import numpy as np
    qa = np.linalg.qr(a.crystal.real_vectors().detach().double().cpu().numpy().T)[0]
    qb = np.linalg.qr(b.crystal.real_vectors().detach().double().cpu().numpy().T)[0]
    return math.degrees(math.acos(max(-1.0, min(1.0, (float(np.trace(qa @ qb.T)) - 1) / 2))))


def errors(truth, sim, result, start) -> dict:
    """Refined minus truth: orientation, cell, N, beam centre, scale."""
    t_cell = truth.crystal.cell.detach().double().cpu()
    r_cell = sim.crystal.cell.detach().double().cpu()
    shift = [result.value(f"beam_centre_shift.{a}").value for a in ("fast", "slow")]
    return {
        "misorientation_deg": misorientation(truth, sim),
        "cell_length_rel": float(((r_cell[:3] - t_cell[:3]).abs() / t_cell[:3]).max()),
        "cell_angle_deg": float((r_cell[3:] - t_cell[3:]).abs().max()),
        "N_rel": float(((sim.crystal.N - truth.crystal.N).abs() / truth.crystal.N).max()),
        "beam_centre_px": max(abs(start["beam_centre_px"][0] + shift[0]), abs(start["beam_centre_px"][1] + shift[1])),
        "scale_rel": abs(float(sim.beam.fluence / truth.beam.fluence) - 1.0),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def time_render(sim, data, mask, repeat: int, device: str, backward: bool = True) -> dict:
    """Forward+backward of the Poisson loss over `mask` in float32 (the fit's
    first precision), or the forward alone (building the same graph): min and
    median seconds over `repeat` runs after a warm-up."""
    import copy

    import torch
    from torch.func import functional_call

    from torchbragg.refine import Parametrisation, poisson_nll
    from torchbragg.refine.roi import mask_substitutions
    s = copy.deepcopy(sim).to(torch.float32)
    p = Parametrisation(GROUPS, s)
    d = data.to(torch.float32)
    times = []
    for _ in range(repeat + 1):
        x = torch.zeros(p.size, dtype=torch.float32, requires_grad=True)
        sync(device)
        t0 = time.perf_counter()
        subs = p.substitutions(s, x)
        subs.update(mask_substitutions(mask))
        model = functional_call(s, subs, ())
        extra = p.image_terms(s, x, model.shape)
        model = model if extra is None else model + extra
        loss = poisson_nll(model, d, mask)
        if backward:
            loss.backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"min": min(times[1:]), "median": statistics.median(times[1:])}


def run_still(k: int, rotation, opts, rng) -> dict:
    import copy

    import torch

    from torchbragg.dataset import photon_counts
    from torchbragg.refine import refine, roi_mask
    truth = build(opts.detpixels, opts.device)
    turn(truth, rotation)
    with torch.no_grad():
        expected = truth.render().double().cpu().numpy() + BACKGROUND
    data = torch.as_tensor(photon_counts(expected, opts.seed + k, 1), dtype=torch.float64, device=opts.device)
    sim = copy.deepcopy(truth)
    start = draw_start(sim, rng)
    row = {"still": k, "start": start, "start_misorientation_deg": misorientation(truth, sim),
           "peak_photons": float(expected.max()), "pixels": int(expected.size)}
    roi = roi_mask(sim, data)
    row["roi_pixels"] = int(roi.sum())
    row["render_roi_s"] = time_render(sim, data, roi, opts.repeat, opts.device)
    row["render_full_s"] = time_render(sim, data, torch.ones_like(roi), opts.repeat, opts.device)
    row["forward_full_s"] = time_render(sim, data, torch.ones_like(roi), opts.repeat, opts.device, backward=False)
    t0 = time.perf_counter()
    result = refine(sim, data, GROUPS, roi=roi, max_iter=opts.max_iter)
    sync(opts.device)
    row["seconds"] = time.perf_counter() - t0
    row["renders"] = result.renders
    row["hessian_renders"] = result.hessian_renders
    row["converged"] = result.converged
    row["stages"] = result.stages
    row["errors"] = errors(truth, sim, result, start)
    row["success"] = all(row["errors"][key] < limit for key, limit in SUCCESS.items())
    return row


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return lines


STILL_COLUMNS = ["still", "s", "fit renders", "hessian renders", "misorientation deg", "cell %", "angle deg",
                 "N %", "beam centre px", "scale %", "success"]
SUMMARY_COLUMNS = ["stills", "device", "s/still", "fit renders/still", "hessian renders/still",
                   "fwd+bwd ROI s", "fwd full s", "fwd+bwd full s", "fwd+bwd/fwd", "ROI px", "success", "shots/s"]


def summarize(report: dict) -> dict:
    rows = [r for r in report["stills"] if "error" not in r]
    if not rows:
        return {}
    seconds = sum(r["seconds"] for r in rows)
    return {
        "stills": len(rows), "seconds_per_still": seconds / len(rows),
        "renders_per_still": statistics.mean(r["renders"] for r in rows),
        "hessian_renders_per_still": statistics.mean(r["hessian_renders"] for r in rows),
        "render_roi_s": statistics.median(r["render_roi_s"]["min"] for r in rows),
        "render_full_s": statistics.median(r["render_full_s"]["min"] for r in rows),
        "forward_full_s": statistics.median(r["forward_full_s"]["min"] for r in rows),
        "backward_ratio": statistics.median(r["render_full_s"]["min"] / r["forward_full_s"]["min"] for r in rows),
        "roi_pixels": statistics.median(r["roi_pixels"] for r in rows),
        "successes": sum(r["success"] for r in rows), "shots_per_second": len(rows) / seconds,
    }


def print_tables(report: dict) -> None:
    rows = []
    for r in report["stills"]:
        if "error" in r:
            rows.append([str(r["still"]), "failed: " + r["error"][:60]] + [""] * (len(STILL_COLUMNS) - 2))
            continue
        e = r["errors"]
        rows.append([str(r["still"]), fmt(r["seconds"], ".1f"), str(r["renders"]), str(r["hessian_renders"]),
                     fmt(e["misorientation_deg"], ".4f"), fmt(100 * e["cell_length_rel"], ".4f"),
                     fmt(e["cell_angle_deg"], ".4f"), fmt(100 * e["N_rel"], ".2f"), fmt(e["beam_centre_px"], ".4f"),
                     fmt(100 * e["scale_rel"], ".2f"), "yes" if r["success"] else "no"])
    print()
    print("\n".join(table(STILL_COLUMNS, rows)))
    s = report["summary"]
    if s:
        print()
        print("\n".join(table(SUMMARY_COLUMNS, [[
            str(s["stills"]), report["device"], fmt(s["seconds_per_still"], ".1f"), fmt(s["renders_per_still"], ".0f"),
            fmt(s["hessian_renders_per_still"], ".0f"), fmt(s["render_roi_s"], ".4f"),
            fmt(s["forward_full_s"], ".4f"), fmt(s["render_full_s"], ".4f"), fmt(s["backward_ratio"], ".2f"),
            fmt(s["roi_pixels"], ".0f"), f"{s['successes']}/{s['stills']}", fmt(s["shots_per_second"], ".4f")]])))
    limits = ", ".join(f"{k} < {v:g}" for k, v in SUCCESS.items())
    print(f"(success: {limits}; fwd+bwd: minimum over {report['repeat']} runs, float32, median over stills)")


def run_levels(opts) -> int:
    """The recovery trials at each level and cell: a table per case and a summary."""
    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np
    from recovery import CELLS, LEVELS, assess, groups_for, trial_case

    from torchbragg.refine import refine
    levels, systems = opts.levels.split(","), opts.systems.split(",")
    for name, known, given in (("--levels", LEVELS, levels), ("--systems", CELLS, systems)):
        bad = [g for g in given if g not in known]
        if bad:
            print(f"bench_refine.py: error: {name}: unknown {', '.join(bad)}; known: {', '.join(known)}",
                  file=sys.stderr)
            return 2
    report = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
              "threads": __import__("torch").get_num_threads(), "strategy": opts.strategy, "cases": []}
    rows = []
    warm = trial_case(systems[0], levels[0], opts.trials)  # imports and first-use set-up, outside the timings
    refine(warm[1], warm[2], groups_for(levels[0]), strategy=opts.strategy)
    for system in systems:
        for level in levels:
            trials = []
            for k in range(opts.trials):
                truth, sim, data = trial_case(system, level, k)
                t0, c0 = time.perf_counter(), time.process_time()
                fit = refine(sim, data, groups_for(level), strategy=opts.strategy)
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                a = assess(truth, sim, fit)
                trials.append(dict(trial=k, seconds=seconds, cpu_seconds=cpu, renders=fit.renders,
                                   hessian_renders=fit.hessian_renders, converged=fit.converged,
                                   deviance_z=fit.fit["deviance_z"], pixels=fit.pixels, errors=a["errors"],
                                   pulls=a["pulls"], success=a["ok"], stages=fit.stages))
                print(f"{system} {level} {k}: {seconds:.2f} s ({cpu:.2f} s CPU), {fit.renders} + "
                      f"{fit.hessian_renders} renders, "
                      f"rotation {a['errors']['rotation_deg']:.4f} deg, cell {100 * a['errors']['cell_rel']:.4f} %, "
                      f"beam centre {a['errors']['beam_centre_px']:.3f} px, deviance z {fit.fit['deviance_z']:.2f}, "
                      f"{'converged' if fit.converged else 'NOT converged'}, "
                      f"{'success' if a['ok'] else 'no success'}", flush=True)
            pulls = [v for t in trials for v in t["pulls"].values()]
            case = dict(system=system, level=level, peak_background=LEVELS[level], trials=trials,
                        seconds_median=statistics.median(t["seconds"] for t in trials),
                        seconds_max=max(t["seconds"] for t in trials),
                        cpu_seconds_median=statistics.median(t["cpu_seconds"] for t in trials),
                        renders_median=statistics.median(t["renders"] + t["hessian_renders"] for t in trials),
                        converged=sum(t["converged"] for t in trials),
                        successes=sum(t["success"] for t in trials), pull_std=float(np.std(pulls)))
            report["cases"].append(case)
            rows.append([system, level, f"{LEVELS[level][0]:g}/{LEVELS[level][1]:g}", fmt(case["seconds_median"], ".2f"),
                         fmt(case["seconds_max"], ".1f"), fmt(case["cpu_seconds_median"], ".2f"),
                         fmt(case["renders_median"], ".0f"), f"{case['converged']}/{len(trials)}",
                         f"{case['successes']}/{len(trials)}", fmt(case["pull_std"], ".2f")])
    print()
    print("\n".join(table(["cell", "level", "peak/background", "s/shot (median)", "s/shot (max)", "CPU s/shot (median)",
                            "renders/shot (median)", "converged", "success", "pull std"], rows)))
    print(f"(strategy {opts.strategy}, {report['threads']} threads; renders: the fit's and the curvature's)")
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
        print(f"wrote {opts.json}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Time refinement of simulated noisy stills (scale, background, "
                                "orientation, cell, N, beam_centre; default strategy).")
    p.add_argument("--stills", type=int, default=5, help="number of stills (default 5)")
    p.add_argument("--detpixels", type=int, default=512, help="detector size in pixels (default 512)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--max-iter", type=int, default=60, help="L-BFGS iterations per stage (default 60)")
    p.add_argument("--repeat", type=int, default=3, help="timed forward+backward runs per still (default 3)")
    p.add_argument("--seed", type=int, default=0, help="orientations, noise and starts (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument("--json", metavar="FILE", help="also write every number as JSON")
    p.add_argument("--levels", help="recovery trials of the still strategy at these signal levels "
                   "(comma-separated: faint, medium, bright) instead")
    p.add_argument("--systems", default="triclinic,tetragonal", help="cells of the --levels trials")
    p.add_argument("--trials", type=int, default=20, help="trials per level and cell (default 20)")
    p.add_argument("--strategy", default="auto", choices=("auto", "still", "lbfgs"),
                   help="refinement strategy of the --levels trials (default auto)")
    opts = p.parse_args(argv)
    for name in ("stills", "detpixels", "max_iter", "repeat", "threads", "trials"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    import numpy as np
    import torch
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if not (opts.device == "cpu" or opts.device.startswith("cuda")):
        p.error(f"--device {opts.device}: use cpu or cuda")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.levels:
        return run_levels(opts)

    from torchbragg.dataset import random_rotations
    report = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "device": opts.device,
              "case": case_argv(opts.detpixels), "background": BACKGROUND, "groups": GROUPS, "start": START,
              "success": SUCCESS, "max_iter": opts.max_iter, "repeat": opts.repeat, "seed": opts.seed, "stills": []}
    print(f"{opts.stills} stills: {' '.join(case_argv(opts.detpixels))} + {BACKGROUND:g} photons background, "
          f"Poisson noise; refining {', '.join(GROUPS)} on {opts.device}", flush=True)
    rng = np.random.default_rng(opts.seed)
    failed = False
    for k, rotation in enumerate(random_rotations(opts.stills, opts.seed)):
        try:
            row = run_still(k, rotation, opts, rng)
        except (RuntimeError, ValueError) as exc:  # one still's failure is reported, the rest still run
            row = {"still": k, "error": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}
            failed = True
        report["stills"].append(row)
        if "error" in row:
            print(f"still {k}: FAILED: {row['error']}", flush=True)
        else:
            print(f"still {k}: {row['seconds']:.1f} s, {row['renders']} + {row['hessian_renders']} renders, "
                  f"misorientation {row['start_misorientation_deg']:.3f} -> "
                  f"{row['errors']['misorientation_deg']:.4f} deg, {'success' if row['success'] else 'no success'}",
                  flush=True)
    report["summary"] = summarize(report)
    print_tables(report)
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {opts.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
