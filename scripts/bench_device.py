#!/usr/bin/env python3
"""Time per image on one device (a GPU, or the CPU for comparison), in one
process through the Python API, float32 and float64:

  series     case 1 (1024x1024), N images, each in a new crystal orientation
             (misset turned by 0.01 deg per image): seconds per image
  case 2     case 2 (1024x1024, 3x3 sub-pixels): one image
  pilatus    case 4 (Pilatus 6M, HKL table, 10 phi steps): one image
  fwd        a 1024x1024 still of the refinement benchmark's crystal, cell,
             misset and distance trainable: the forward with its graph
  fwd+bwd    the same forward and the backward of a summed loss

Each figure is the minimum over --repeat runs after one warm-up (the series:
the mean over its images after a warm-up image); CUDA work is synchronised
before each clock reading. Cases are those of scripts/bench.py.

Usage: python scripts/bench_device.py [--device cuda] [--images 100] [--repeat 3]
                                      [--dtypes float32,float64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from bench_refine import case_argv as refine_argv  # noqa: E402

ROWS = ["series", "case 2", "pilatus", "fwd", "fwd+bwd"]


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clocked(fn, device, repeat: int) -> float:
    fn()  # warm-up: kernels chosen, caches filled
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def series_seconds(sim, images: int, device) -> float:
    """Mean seconds per image over `images` renders, each in a new orientation."""
    import torch
    misset = sim.get_parameter("crystal.misset")
    start = misset.detach().clone()
    with torch.no_grad():
        sim.render()
        sync(device)
        t0 = time.perf_counter()
        for k in range(images):
            misset.copy_(start + 0.01 * (k + 1))
            sim.render()
        sync(device)
        misset.copy_(start)
    return (time.perf_counter() - t0) / images


def measure(dtype_name: str, opts, hkl: Path) -> dict:
    import torch
    from torchbragg import Simulator
    dtype, device = getattr(torch, dtype_name), torch.device(opts.device)
    out = {}

    def still(argv):
        return Simulator.from_args(argv, dtype=dtype, device=device)

    def no_grad_render(sim):
        def fn():
            with torch.no_grad():
                sim.render()
        return fn

    rows = set(opts.rows)
    if "series" in rows:
        out["series"] = series_seconds(still(bench.case_argv(1)), opts.images, device)
    if "case 2" in rows:
        out["case 2"] = clocked(no_grad_render(still(bench.case_argv(2))), device, opts.repeat)
    if "pilatus" in rows:
        out["pilatus"] = clocked(no_grad_render(still(bench.case_argv(4, str(hkl)))), device, opts.repeat)
    if rows & {"fwd", "fwd+bwd"}:
        sim = still(refine_argv(1024))
        for name in ("crystal.cell", "crystal.misset", "detector.panels.0.frame.distance"):
            sim.get_parameter(name).requires_grad_(True)

        def forward():
            return sim.render().sum()
        if "fwd" in rows:
            out["fwd"] = clocked(forward, device, opts.repeat)
        if "fwd+bwd" in rows:
            out["fwd+bwd"] = clocked(lambda: forward().backward(), device, opts.repeat)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--images", type=int, default=100, help="images in the case-1 series (default 100)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each other row (default 3)")
    p.add_argument("--dtypes", default="float32,float64", help="comma-separated (default float32,float64)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--json", metavar="FILE", help="also write every number")
    opts = p.parse_args(argv)
    import torch
    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if not (opts.device == "cpu" or opts.device.startswith("cuda")):
        p.error(f"--device {opts.device}: use cpu or cuda")
    if opts.images < 1 or opts.repeat < 1:
        p.error("--images and --repeat must be at least 1")
    dtypes = [d.strip() for d in opts.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("float32", "float64") for d in dtypes):
        p.error(f"--dtypes: float32 and/or float64, got {opts.dtypes!r}")
    opts.rows = [r.strip() for r in opts.rows.split(",") if r.strip()]
    if not opts.rows or any(r not in ROWS for r in opts.rows):
        p.error(f"--rows: a subset of {', '.join(ROWS)}, got {opts.rows}")

    if opts.device.startswith("cuda"):
        name = torch.cuda.get_device_name(opts.device)
    else:
        name = platform.processor() or platform.machine()
    report = {"device": opts.device, "device_name": name, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "images": opts.images, "repeat": opts.repeat, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="tb-device-") as tmp:
        hkl = Path(tmp) / "P1.hkl"
        if "pilatus" in opts.rows:
            bench.write_hkl(hkl)
        for d in dtypes:
            report["seconds"][d] = measure(d, opts, hkl)
            print(f"{d}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in report["seconds"][d].items()), flush=True)

    print(f"\n{opts.device} ({name}), torch {torch.__version__}; ms per image (series: mean over "
          f"{opts.images} images; others: minimum of {opts.repeat})")
    head = ["row"] + [f"{d} ms" for d in dtypes] + (["float64/float32"] if len(dtypes) == 2 else [])
    lines = []
    for r in opts.rows:
        vals = [report["seconds"][d][r] for d in dtypes]
        line = [r] + [f"{v * 1e3:.2f}" for v in vals]
        if len(dtypes) == 2:
            line.append(f"{vals[1] / vals[0]:.2f}")
        lines.append(line)
    for d in dtypes:
        s = report["seconds"][d]
        if "fwd" in s and "fwd+bwd" in s:
            print(f"{d} fwd+bwd / fwd: {s['fwd+bwd'] / s['fwd']:.2f}")
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for x in lines:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)))
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
