#!/usr/bin/env python3
"""Benchmark torchbragg (and, if NB_C_BIN is set, the original nanoBragg).

Every measurement runs in a fresh subprocess inside a scratch folder:

  render   time of torchbragg.commands.nanobragg.main(argv + ['-floatfile', tmp, '-nonoise',
           '-nopgm']) inside a
           child process, after its imports
  command  wall time of `python -m torchbragg ...` as a whole process
  RSS      peak resident memory of that process (os.wait4)
  C        wall time and peak RSS of the original program, same arguments

  against  the same render timed with another revision of torchbragg
           (--against REV: a git worktree of REV), interleaved in the same run

  sweep    --sweep N: a whole N-image rotation sweep of case 2's geometry
           (0.1 deg images, 2 phi steps each, SMV noise images) with
           `torchbragg simulate`, against the original run once per image

Usage: python scripts/bench.py [--cases 1,3] [--repeat N] [--dtype float64]
                               [--against REV] [--sweep N] [--compile 0|1|auto]
                               [--json out.json] [--list]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HKL_PLACEHOLDER = "{hkl}"

CASES = {
    1: ("cubic, lambda 6.2, 1024^2",
        "-cell 100 100 100 90 90 90 -default_F 100 -lambda 6.2 -N 5 -distance 100 "
        "-detpixels 1024 -pixel 0.1"),
    2: ("cubic, lambda 1.0, N 10, 1024^2",
        "-cell 100 100 100 90 90 90 -default_F 100 -lambda 1.0 -N 10 -distance 100 "
        "-detpixels 1024"),
    3: ("triclinic, mosaic, phi, tilted, absorption, 512^2",
        "-cell 70 80 90 75 85 95 -default_F 100 -N 5 -mosaic 0.5 -mosaic_dom 5 "
        "-mosaic_seed 7 -phi 3 -osc 90 -phisteps 9 -detector_rotx 5 -detector_roty 3 "
        "-detector_rotz 2 -twotheta 10 -detector_abs 500 -detector_thick 450 "
        "-thicksteps 5 -polar 0.95 -detpixels 512 -pixel 0.1 -distance 100 -oversample 1"),
    4: ("Pilatus 6M frame, HKL table, 10 phi steps",
        "-hkl {hkl} -cell 100 100 100 90 90 90 -N 5 -lambda 1.0 -distance 200 "
        "-detpixels_x 2463 -detpixels_y 2527 -pixel 0.172 -phi 0 -osc 1 -phisteps 10"),
}
HKL_RANGE = 30  # case 4 table: h, k, l in -30..30

QUICK_LIMIT_S = 0.5  # -h and a bad argument must answer faster than this

RENDER_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch  # the render time excludes imports, as the original's has none
try:
    import torchbragg.commands.nanobragg as cli
except ImportError:  # revisions before the commands/ package
    import torchbragg.cli as cli
import torchbragg.outputs, torchbragg.simulator
for name in ("torchbragg.build.nanobragg", "torchbragg.nanobragg", "torchbragg.build"):  # the factory
    try:
        __import__(name)
    except ImportError:
        pass
t1 = time.perf_counter()
argv = json.loads(sys.argv[1])
rc = cli.main(argv)
t2 = time.perf_counter()
info = {"rc": rc, "import_s": t1 - t0, "render_s": t2 - t1}
try:
    import torch
    info["torch"] = torch.__version__
    info["threads"] = torch.get_num_threads()
except Exception:
    pass
with open(sys.argv[2], "w") as fh:
    json.dump(info, fh)
"""


def parse_cases(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    bad = [c for c in out if c not in CASES]
    if bad or not out:
        raise ValueError(f"unknown case(s) {bad or text!r}; known: {sorted(CASES)}")
    return list(dict.fromkeys(out))


def case_argv(case: int, hkl_path: str | None = None) -> list[str]:
    args = shlex.split(CASES[case][1])
    if hkl_path is not None:
        args = [hkl_path if a == HKL_PLACEHOLDER else a for a in args]
    return args


def write_hkl(path: Path, hmax: int = HKL_RANGE) -> None:
    """P1 table with deterministic, smoothly varying amplitudes."""
    import math
    lines = []
    for h in range(-hmax, hmax + 1):
        for k in range(-hmax, hmax + 1):
            for l in range(-hmax, hmax + 1):
                f = 50.0 + 40.0 * math.cos(0.7 * h + 1.3 * k + 2.1 * l) ** 2 \
                    + 10.0 * ((h * 31 + k * 17 + l * 7) % 5)
                lines.append(f"{h} {k} {l} {f:.2f}\n")
    path.write_text("".join(lines))


def torchbragg_env(root: Path = ROOT) -> dict:
    env = dict(os.environ)
    src = str(root / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_measured(cmd: list[str], cwd: Path, env: dict | None = None,
                 timeout: float | None = None) -> dict:
    """Run a process; return wall seconds, exit status and peak RSS (MB)."""
    with open(cwd / "stdout.txt", "wb") as so, open(cwd / "stderr.txt", "wb") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=so, stderr=se,
                                stdin=subprocess.DEVNULL)
        if timeout is None:
            _, status, ru = os.wait4(proc.pid, 0)
        else:
            deadline = t0 + timeout
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    proc.kill()
                    _, status, ru = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.001)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in kB on Linux, bytes on macOS
    scale = 1.0 / (1024 * 1024) if sys.platform == "darwin" else 1.0 / 1024
    return {"wall_s": wall, "rc": proc.returncode, "rss_mb": ru.ru_maxrss * scale,
            "stderr": (cwd / "stderr.txt").read_text(errors="replace")[-500:]}


@contextlib.contextmanager
def revision_tree(rev: str, path: Path):
    """A detached worktree of git revision `rev` at `path` for the duration;
    ValueError when git cannot make it."""
    r = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ValueError(f"--against {rev}: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def fresh_dir(base: Path, name: str) -> Path:
    d = base / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def bench_render(argv, scratch: Path, env) -> dict:
    d = fresh_dir(scratch, "render")
    out = d / "result.json"
    r = run_measured([sys.executable, "-c", RENDER_CHILD,
                      json.dumps(argv + ["-floatfile", str(d / "float.bin"), "-nonoise", "-nopgm"]), str(out)],
                     d, env)
    if r["rc"] != 0 or not out.exists():
        raise RuntimeError(f"torchbragg render failed (status {r['rc']}): {r['stderr']}")
    info = json.loads(out.read_text())
    if info["rc"] not in (0, None):
        raise RuntimeError(f"torchbragg.commands.nanobragg.main returned {info['rc']}: {r['stderr']}")
    info["rss_mb"] = r["rss_mb"]
    return info


def bench_command(cmd, argv, scratch: Path, env, name: str) -> dict:
    d = fresh_dir(scratch, name)
    r = run_measured(cmd + argv + ["-floatfile", str(d / "float.bin")], d, env)
    if r["rc"] != 0:
        raise RuntimeError(f"{name} failed (status {r['rc']}): {r['stderr']}")
    return r


def quick_checks(env, scratch: Path, repeat: int) -> list[dict]:
    exe = Path(sys.executable).with_name("nanoBragg")
    base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torchbragg"]
    rows = []
    for label, extra, want in (("-h", ["-h"], 0), ("bad argument", ["-no_such_flag"], 2)):
        times, rc = [], None
        for _ in range(repeat):
            r = run_measured(base + extra, fresh_dir(scratch, "quick"), env, timeout=60)
            times.append(r["wall_s"])
            rc = r["rc"]
        best = min(times)
        rows.append({"check": f"nanoBragg {label}", "command": base + extra, "rc": rc,
                     "expected_rc": want, "min_s": best,
                     "median_s": statistics.median(times),
                     "ok": best < QUICK_LIMIT_S and rc == want})
    return rows


SWEEP_OSC, SWEEP_PHISTEPS = 0.1, 2


def bench_sweep(n: int, scratch: Path, env, c_bin, tb_extra) -> dict:
    """Whole-job times of an n-image sweep: one torchbragg process against n runs of the original."""
    d = fresh_dir(scratch, "sweep")
    geometry = case_argv(2) + ["-phi", "0", "-osc", str(SWEEP_OSC), "-phisteps", str(SWEEP_PHISTEPS)]
    # the experiment of the first image (-roi of one pixel: nothing to render), then n images in its scan
    r = run_measured([sys.executable, "-m", "torchbragg"] + geometry + ["-roi", "0", "0", "0", "0", "-nonoise",
                      "-nopgm", "-floatfile", str(d / "x.bin"), "-intfile", str(d / "x.img"), "-write_expt",
                      str(d / "one.expt")], d, env)
    if r["rc"] != 0:
        raise RuntimeError(f"writing the sweep's experiment failed: {r['stderr']}")
    doc = json.loads((d / "one.expt").read_text())
    doc["scan"][0]["image_range"] = [1, n]
    doc["scan"][0]["properties"] = {"oscillation": [SWEEP_OSC * i for i in range(n)],
                                    "exposure_time": [1.0] * n, "epochs": [0.0] * n}
    (d / "sweep.expt").write_text(json.dumps(doc))
    physics = ["-N", "10", "-default_F", "100", "-phisteps", str(SWEEP_PHISTEPS), "-seed", "1"]
    r = run_measured([sys.executable, "-m", "torchbragg.commands.tool", "simulate", str(d / "sweep.expt"), "--out",
                      str(d / "tb"), "--quiet", "--format", "smv"] + physics + tb_extra, d, env)
    if r["rc"] != 0:
        raise RuntimeError(f"torchbragg simulate failed: {r['stderr']}")
    row = {"images": n, "tb_s": r["wall_s"], "tb_rss_mb": r["rss_mb"]}
    if c_bin:
        t0 = time.perf_counter()
        for i in range(n):
            c = run_measured([c_bin] + case_argv(2) + ["-phi", str(SWEEP_OSC * i), "-osc", str(SWEEP_OSC),
                              "-phisteps", str(SWEEP_PHISTEPS), "-seed", str(1 + i), "-floatfile",
                              str(d / "c.bin"), "-intfile", str(d / "c.img"), "-noisefile", str(d / "n.img"),
                              "-nopgm"], d)
            if c["rc"] != 0:
                raise RuntimeError(f"the original failed on image {i + 1}: {c['stderr']}")
        row["c_s"] = time.perf_counter() - t0
    return row


def summarize(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "all": values}


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Time torchbragg against the original nanoBragg "
        "(set NB_C_BIN to a build of the original to include it).")
    p.add_argument("--cases", default=",".join(str(c) for c in CASES),
                   help="comma-separated case numbers or ranges, e.g. 1,3 or 1-3 "
                   "(default: all)")
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement (min and median)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="pass -dtype to torchbragg (default: its own default)")
    p.add_argument("--tb-extra", default="", metavar="ARGS",
                   help="extra flags for torchbragg only, one string")
    p.add_argument("--c-bin", default=os.environ.get("NB_C_BIN"),
                   help="original nanoBragg (default: $NB_C_BIN)")
    p.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--skip-quick", action="store_true", help="skip the -h / bad-argument timing")
    p.add_argument("--against", metavar="REV", help="also time the render of git revision REV, interleaved")
    p.add_argument("--sweep", type=int, metavar="N", help="time an N-image sweep instead of the cases")
    p.add_argument("--compile", choices=("0", "1", "auto"), default=None,
                   help="set TORCHBRAGG_COMPILE for the torchbragg runs (default: the environment's)")
    opts = p.parse_args(argv)
    try:
        cases = parse_cases(opts.cases)
    except ValueError as exc:
        p.error(str(exc))
    if opts.repeat < 1:
        p.error("--repeat must be at least 1")

    if opts.list:
        for c in cases:
            print(f"{c}: {CASES[c][0]}\n   {' '.join(case_argv(c, 'P1.hkl'))}")
        if 4 in cases:
            print(f"(P1.hkl: generated P1 table, h, k, l in -{HKL_RANGE}..{HKL_RANGE})")
        return 0

    c_bin = None
    if opts.c_bin:
        c_bin = shutil.which(opts.c_bin) or opts.c_bin
        if not (os.path.isfile(c_bin) and os.access(c_bin, os.X_OK)):
            p.error(f"C nanoBragg not executable: {opts.c_bin}")
        c_bin = os.path.abspath(c_bin)

    tb_extra = shlex.split(opts.tb_extra)
    if opts.dtype:
        tb_extra += ["-dtype", opts.dtype]
    env = torchbragg_env()
    if opts.compile is not None:
        env["TORCHBRAGG_COMPILE"] = opts.compile
    tb_cmd = [sys.executable, "-m", "torchbragg"]

    report = {"python": sys.version.split()[0], "platform": platform.platform(),
              "cpus": os.cpu_count(), "repeat": opts.repeat, "dtype": opts.dtype,
              "tb_extra": tb_extra, "c_bin": c_bin, "compile": env.get("TORCHBRAGG_COMPILE"), "cases": []}
    failed = False
    with tempfile.TemporaryDirectory(prefix="tb-bench-") as tmp, contextlib.ExitStack() as trees:
        scratch = Path(tmp)
        base_env = None
        if opts.against:
            try:
                tree = trees.enter_context(revision_tree(opts.against, scratch / "against"))
            except ValueError as exc:
                p.error(str(exc))
            base_env = torchbragg_env(tree)
            if opts.compile is not None:
                base_env["TORCHBRAGG_COMPILE"] = opts.compile
            report["against"] = opts.against
        hkl = None
        if 4 in cases and not opts.sweep:
            hkl = scratch / "P1.hkl"
            write_hkl(hkl)
            print(f"P1.hkl: generated P1 table, h, k, l in -{HKL_RANGE}..{HKL_RANGE}", flush=True)
        if opts.sweep:
            row = bench_sweep(opts.sweep, scratch, env, c_bin, tb_extra)
            print(f"sweep of {row['images']} images (case 2 geometry, {SWEEP_OSC} deg, {SWEEP_PHISTEPS} phi steps "
                  f"each, SMV noise images):")
            print(f"  torchbragg simulate, one process: {row['tb_s']:.1f} s "
                  f"({row['images'] / row['tb_s']:.2f} images/s, peak RSS {row['tb_rss_mb']:.0f} MB)")
            if "c_s" in row:
                print(f"  original, once per image:         {row['c_s']:.1f} s "
                      f"({row['images'] / row['c_s']:.2f} images/s)")
                print(f"  torchbragg / original:            {row['tb_s'] / row['c_s']:.2f}")
            if opts.json:
                Path(opts.json).write_text(json.dumps(row, indent=2) + "\n")
            return 0
        for c in cases:
            args = case_argv(c, str(hkl) if hkl else None)
            shown = " ".join(case_argv(c, "P1.hkl"))
            print(f"case {c}: {CASES[c][0]}\n  args: {shown}", flush=True)
            row = {"case": c, "title": CASES[c][0], "args": case_argv(c, "P1.hkl")}
            try:
                renders, cmds, rss, c_walls, c_rss = [], [], [], [], []
                for _ in range(opts.repeat):
                    info = bench_render(args + tb_extra, scratch, env)
                    renders.append(info["render_s"])
                    if base_env is not None:
                        row.setdefault("against_s", []).append(bench_render(args + tb_extra, scratch,
                                                                            base_env)["render_s"])
                    row.setdefault("torch", info.get("torch"))
                    row.setdefault("threads", info.get("threads"))
                    r = bench_command(tb_cmd, args + tb_extra, scratch, env, "torchbragg")
                    cmds.append(r["wall_s"])
                    rss.append(r["rss_mb"])
                    if c_bin:
                        r = bench_command([c_bin], args, scratch, None, "c")
                        c_walls.append(r["wall_s"])
                        c_rss.append(r["rss_mb"])
                row["render_s"] = summarize(renders)
                if base_env is not None:
                    row["against_s"] = summarize(row["against_s"])
                row["command_s"] = summarize(cmds)
                row["rss_mb"] = max(rss)
                if c_bin:
                    row["c_command_s"] = summarize(c_walls)
                    row["c_rss_mb"] = max(c_rss)
            except RuntimeError as exc:
                row["error"] = str(exc)
                failed = True
                print(f"  FAILED: {exc}", flush=True)
            report["cases"].append(row)

        if not opts.skip_quick:
            try:
                report["quick"] = quick_checks(env, scratch, max(opts.repeat, 3))
            except OSError as exc:
                report["quick"] = [{"check": "quick", "error": str(exc)}]

    print_table(report, opts.repeat > 1)
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {opts.json}")
    return 1 if failed else 0


def print_table(report: dict, show_median: bool) -> None:
    c_on = report["c_bin"] is not None
    against = report.get("against")
    head = ["case", "tb render s", "tb command s", "tb RSS MB"]
    if against:
        head += [f"{against} render s", f"{against}/tb render"]
    if c_on:
        head += ["C command s", "C RSS MB", "C/tb render", "C/tb command", "tb/C RSS"]
    rows = []
    for r in report["cases"]:
        if "error" in r:
            rows.append([str(r["case"]), "failed"] + [""] * (len(head) - 2))
            continue

        def t(key):
            s = r[key]
            return fmt(s["min"], ".3f") + (f" ({s['median']:.3f})" if show_median else "")
        line = [str(r["case"]), t("render_s"), t("command_s"), fmt(r["rss_mb"], ".0f")]
        if against:
            line += [t("against_s"), fmt(ratio(r["against_s"]["min"], r["render_s"]["min"]))]
        if c_on:
            c_min = r["c_command_s"]["min"]
            line += [t("c_command_s"), fmt(r["c_rss_mb"], ".0f"),
                     fmt(ratio(c_min, r["render_s"]["min"])),
                     fmt(ratio(c_min, r["command_s"]["min"])),
                     fmt(ratio(r["rss_mb"], r["c_rss_mb"]))]
        rows.append(line)
    widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for x in rows:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)))
    note = "times are the minimum over runs" + (", median in brackets" if show_median else "")
    if c_on:
        note += "; C/tb > 1 means torchbragg is faster"
    print(f"({note})")
    for q in report.get("quick", []):
        if "error" in q:
            print(f"{q['check']}: error {q['error']}")
            continue
        flag = "ok" if q["ok"] else f"NOT OK (want < {QUICK_LIMIT_S} s, status {q['expected_rc']})"
        print(f"{q['check']}: {q['min_s']:.3f} s (median {q['median_s']:.3f}), "
              f"status {q['rc']}: {flag}")


if __name__ == "__main__":
    sys.exit(main())
