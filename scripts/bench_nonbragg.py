"""Time torchbragg's nonBragg render against the original program.

The reference cases (tests/data/golden_suite/nonBragg) are scaled to a
Pilatus 6M frame (2463 x 2527 pixels of 0.172 mm); everything else in each
case (table, wavelength, distance, sample, divergence, oversampling, ...)
stays. For every case the table gives the wall-clock seconds of:

  original   the original nonBragg run (--c-bin PATH, a binary you built), the
             whole process: its render dominates, it also writes its files
  float64    torchbragg's render (Background.forward) in float64, the
             command's default, whose files match the original's bit for bit
  float32    the same render in float32 (-dtype float32)

and the ratios to the original. Each time is the best of --repeat runs, the
runs of the three interleaved, all in one process on the same machine.

    python scripts/bench_nonbragg.py --c-bin /tmp/nonBragg --threads 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's torchbragg
SUITE = ROOT / "tests" / "data" / "golden_suite" / "nonBragg"
PILATUS = ["-detpixels_x", "2463", "-detpixels_y", "2527", "-pixel", "0.172"]
DROP = {"-detpixels": 1, "-detpixels_x": 1, "-detpixels_y": 1, "-pixel": 1, "-detsize": 1}


def case_args(case: str, folder: Path) -> list[str]:
    args = shlex.split(json.loads((SUITE / "manifest.json").read_text())[case]["args"])
    out, i = [], 0
    while i < len(args):
        if args[i] in DROP:
            i += 1 + DROP[args[i]]
            continue
        if args[i].endswith(".stol"):
            table = folder / args[i]
            if not table.exists():
                table.write_bytes(gzip.decompress((SUITE / "stol" / f"{args[i]}.gz").read_bytes()))
            out.append(str(table))
        else:
            out.append(args[i])
        i += 1
    return out + PILATUS


def time_original(binary: str, args: list[str], folder: Path) -> float:
    files = ["-floatfile", "c.bin", "-intfile", "c.img", "-pgmfile", "c.pgm", "-nonoise", "-noprogress"]
    t0 = time.perf_counter()
    subprocess.run([binary, *args, *files], cwd=folder, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def torch_render(args: list[str], dtype: str):
    """A function rendering the case's image with the model the command uses."""
    import torch

    from torchbragg.commands.nonbragg import build, parse, resolve
    setup = resolve(parse(args + ["-dtype", dtype]))
    beam, detector, background, _ = build(setup)

    def render():
        with torch.no_grad():
            t0 = time.perf_counter()
            background(beam, detector, oversample=setup.oversample,
                       polarization=not setup.opts.get("-nopolar", False),
                       point_pixel=setup.opts.get("-point_pixel", False))
            return time.perf_counter() - t0
    return render


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--c-bin", help="the original nonBragg binary (built with gcc -O3 -fopenmp)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, best kept (default 3)")
    ap.add_argument("--cases", nargs="*", help="case names (default: all)")
    opts = ap.parse_args(argv)
    import torch
    torch.set_num_threads(opts.threads)
    cases = opts.cases or sorted(json.loads((SUITE / "manifest.json").read_text()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for case in cases:
            args = case_args(case, folder)
            renders = {dt: torch_render(args, dt) for dt in ("float64", "float32")}
            best = {"original": float("inf"), "float64": float("inf"), "float32": float("inf")}
            for _ in range(opts.repeat):
                if opts.c_bin:
                    best["original"] = min(best["original"], time_original(opts.c_bin, args, folder))
                for dt, render in renders.items():
                    best[dt] = min(best[dt], render())
            rows.append((case, best))
            print(f"{case}: " + ", ".join(f"{k} {v:.3f} s" for k, v in best.items() if v < float("inf")),
                  file=sys.stderr, flush=True)
    cpu = os.cpu_count()
    print(f"\nPilatus 6M frame (2463 x 2527 pixels), {opts.threads} torch threads, {cpu} CPUs, "
          f"best of {opts.repeat}; seconds\n")
    head = "| case | original | float64 | ratio | float32 | ratio |" if opts.c_bin else "| case | float64 | float32 |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for case, b in rows:
        if opts.c_bin:
            c = b["original"]
            print(f"| {case} | {c:.3f} | {b['float64']:.3f} | {b['float64'] / c:.2f} | {b['float32']:.3f} | "
                  f"{b['float32'] / c:.2f} |")
        else:
            print(f"| {case} | {b['float64']:.3f} | {b['float32']:.3f} |")
    if opts.c_bin:
        for dt in ("float64", "float32"):
            total = sum(b[dt] for _, b in rows) / sum(b["original"] for _, b in rows)
            print(f"\nall cases, {dt}: {total:.2f} x the original's time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
