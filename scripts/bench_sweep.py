#!/usr/bin/env python3
"""Benchmark `torchbragg refine --strategy sweep` on the measured sweep of
tests/data/lcys_02 (ten PILATUS 2M frames of L-cysteine with DIALS's
integrated experiment and reflections).

One fit from DIALS's model, then --starts fits from it turned by 0.2 degree
about a random axis with each cell length off by up to 0.3 % (seeded). Per
fit: seconds of the refinement (the engine's), seconds of the whole command,
renders, the rotation and largest cell-length difference from the fit that
started at DIALS's model, the refined model's centroid rms against DIALS's
observed centroids (xyzobs.px of the strong reflections) over DIALS's own
prediction's, the deviance ratio and the exit status. Success: within
0.01 degree and 0.05 % of the fit from DIALS's model, and a centroid rms at
most 1.1 times DIALS's.

Usage: python scripts/bench_sweep.py [--starts 3] [--seed 0] [--threads 2] [--physics "FLAGS"] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "src" / "torchbragg").is_dir():
    sys.path.insert(0, str(ROOT / "src"))
DATA = ROOT / "tests" / "data" / "lcys_02"
PHYSICS = "-default_F 0 -N 30"
GROUPS = "orientation,cell,scale,radial_background"


def turned_experiment(folder: Path, axis, degrees: float, lengths) -> Path:
    """DIALS's experiment on the compressed frames, its crystal turned and its cell lengths scaled."""
    doc = json.loads((DATA / "23_integrated.expt").read_text())
    doc["imageset"][0]["template"] = str(DATA / "l-cyst_02_#####.cbf.bz2")
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    r = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k
    c = doc["crystal"][0]
    for name, f in zip(("real_space_a", "real_space_b", "real_space_c"), lengths):
        c[name] = list(r @ np.array(c[name]) * f)
    path = folder / "start.expt"
    path.write_text(json.dumps(doc))
    return path


def real_vectors(expt: Path) -> np.ndarray:
    from torchbragg.io.dials import read_experiments
    c = read_experiments(str(expt))[0].crystal
    return c.real_vectors().detach().double().numpy()


def centroid_rms(expt: Path) -> tuple[float, float]:
    """(refined model's, DIALS's prediction's) rms distance from DIALS's observed centroids, px."""
    import torch

    from torchbragg.build.experiment import build_from_experiment, parse_experiment_flags
    from torchbragg.io.dials import read_experiments
    from torchbragg.refine.centroids import predict_rotation
    rows = [r for r in json.loads((DATA / "23_integrated_refl.json").read_text())["reflections"] if r["flags"] & 32]
    hkl = np.array([r["hkl"] for r in rows])
    obs = np.array([r["xyzobs_px"] for r in rows])
    cal = np.array([r["xyzcal_px"] for r in rows])
    sim = build_from_experiment(read_experiments(str(expt))[0], parse_experiment_flags(["-default_F", "1"]),
                                dtype=torch.float64)[0]
    with torch.no_grad():
        xyz, _ = predict_rotation(sim, {}, torch.as_tensor(hkl), torch.zeros(len(hkl), dtype=torch.long),
                                  torch.as_tensor(obs[:, 2]))
    ours = float(np.sqrt((np.linalg.norm(xyz.numpy()[:, :2] - obs[:, :2], axis=1) ** 2).mean()))
    return ours, float(np.sqrt((np.linalg.norm(cal[:, :2] - obs[:, :2], axis=1) ** 2).mean()))


def fit(start: Path, out: Path, physics: str) -> dict:
    from torchbragg.commands.tool import main as tool
    t0 = time.perf_counter()
    rc = tool(["refine", str(start), "--images", "1:10", "--out", str(out), "--refine", GROUPS,
               "--quiet", "-hkl", str(DATA / "23_integrated_refl.json")] + physics.split())
    wall = time.perf_counter() - t0
    doc = json.loads((out / "refined.json").read_text())
    ours, dials = centroid_rms(out / "refined.expt")
    return dict(rc=rc, seconds=doc["seconds"], wall=wall, renders=doc["renders"], rms_px=ours, dials_rms_px=dials,
                deviance_ratio=doc["fit"]["deviance_ratio"], real=real_vectors(out / "refined.expt"))


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(rotation between two crystals, degrees; largest relative cell-length difference)."""
    u, _, vt = np.linalg.svd(np.linalg.solve(a, b))
    angle = math.degrees(math.acos(min(1.0, (np.trace(u @ vt) - 1) / 2)))
    return angle, float(np.abs(np.linalg.norm(b, axis=1) / np.linalg.norm(a, axis=1) - 1).max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", type=int, default=3, help="perturbed starts (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument("--physics", default=PHYSICS, help=f"model flags (default {PHYSICS!r})")
    p.add_argument("--json", metavar="FILE")
    opts = p.parse_args(argv)
    import torch
    if opts.threads:
        torch.set_num_threads(opts.threads)
    rng = np.random.default_rng(opts.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        starts = [("DIALS's model", np.array([0.0, 0.0, 1.0]), 0.0, (1.0, 1.0, 1.0))]
        for i in range(opts.starts):
            axis = rng.normal(size=3)
            starts.append((f"turned {i + 1}", axis / np.linalg.norm(axis), 0.2, tuple(1 + rng.uniform(-3e-3, 3e-3, 3))))
        reference = None
        for name, axis, degrees, lengths in starts:
            folder = tmp / f"fit{len(rows)}"
            folder.mkdir()
            r = fit(turned_experiment(folder, axis, degrees, lengths), folder / "out", opts.physics)
            reference = r["real"] if reference is None else reference
            r["rotation_deg"], r["cell_rel"] = compare(reference, r["real"])
            r["success"] = r["rotation_deg"] < 0.01 and r["cell_rel"] < 5e-4 and r["rms_px"] <= 1.1 * r["dials_rms_px"]
            r["start"] = name
            rows.append(r)
    head = ["start", "fit s", "command s", "renders", "rotation deg", "cell %", "centroid rms px (DIALS)",
            "deviance ratio", "exit", "success"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(" --- " for _ in head) + "|")
    for r in rows:
        print(f"| {r['start']} | {r['seconds']:.1f} | {r['wall']:.1f} | {r['renders']} | {r['rotation_deg']:.4f} | "
              f"{100 * r['cell_rel']:.3f} | {r['rms_px']:.3f} ({r['dials_rms_px']:.3f}) | {r['deviance_ratio']:.2f} | "
              f"{r['rc']} | {'yes' if r['success'] else 'no'} |")
    median = np.median([r["seconds"] for r in rows])
    print(f"successes: {sum(r['success'] for r in rows)}/{len(rows)}; median fit {median:.1f} s")
    if opts.json:
        Path(opts.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "real"} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
