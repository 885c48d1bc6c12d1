#!/usr/bin/env python3
"""Whole-command times of every reference case (tests/data/golden): this
tree's `python -m torchbragg ARGS` against another git revision's, run
alternately in fresh processes in a scratch copy of each case's inputs, with
the original's recorded time (manifest.json, the machine that made the
reference) for scale.

Usage: python scripts/bench_golden.py --against REV [--repeat N] [--cases a,b] [--json out.json]

Prints one row per case (minimum over the runs) and the worst ratio; exits
1 if a command fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import bench  # noqa: E402
import golden  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", metavar="REV", required=True, help="the revision to compare with")
    p.add_argument("--repeat", type=int, default=1, help="runs per command (default 1)")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--json", metavar="FILE", help="also write every number")
    opts = p.parse_args(argv)
    names = golden.cases() if not opts.cases else opts.cases.split(",")
    unknown = [n for n in names if n not in golden.MANIFEST]
    if unknown:
        p.error(f"unknown case(s) {unknown}")
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="tb-golden-") as tmp, contextlib.ExitStack() as trees:
        scratch = Path(tmp)
        try:
            tree = trees.enter_context(bench.revision_tree(opts.against, scratch / "against"))
        except ValueError as exc:
            p.error(str(exc))
        envs = {"tb": bench.torchbragg_env(), opts.against: bench.torchbragg_env(tree)}
        for name in names:
            times = {k: [] for k in envs}
            for _ in range(opts.repeat):
                for label, env in envs.items():
                    d = bench.fresh_dir(scratch, "run")
                    golden.materialize(name, d)
                    args = golden.args(name) + ["-floatfile", "float.bin", "-nopgm"]
                    res = bench.run_measured([sys.executable, "-m", "torchbragg"] + args, d, env)
                    if res["rc"] != 0:
                        print(f"{name}: {label} failed (status {res['rc']}): {res['stderr']}", file=sys.stderr)
                        failed = True
                    times[label].append(res["wall_s"])
            row = {"case": name, "tb_s": min(times["tb"]), "against_s": min(times[opts.against]),
                   "c_s": golden.MANIFEST[name].get("c_seconds")}
            row["ratio"] = row["tb_s"] / row["against_s"]
            rows.append(row)
            c = "" if row["c_s"] is None else f"{row['c_s']:.3f}"
            print(f"{name:32s} {row['tb_s']:7.3f} {row['against_s']:7.3f} {row['ratio']:6.2f} {c:>7s}",
                  flush=True)
    worst = max(rows, key=lambda r: r["ratio"])
    total_tb, total_against = sum(r["tb_s"] for r in rows), sum(r["against_s"] for r in rows)
    print(f"\ncolumns: case, tb command s, {opts.against} command s, tb/{opts.against}, original's recorded s")
    print(f"worst tb/{opts.against}: {worst['ratio']:.2f} ({worst['case']}); "
          f"all cases: {total_tb:.1f} s against {total_against:.1f} s ({total_tb / total_against:.2f})")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"against": opts.against, "repeat": opts.repeat, "cases": rows},
                                              indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
