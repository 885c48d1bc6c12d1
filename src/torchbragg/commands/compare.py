"""nb-compare: run the original nanoBragg and torchbragg on the same arguments
and compare their float images.

    nb-compare [--outdir DIR] [--roi xmin xmax ymin ymax] [--threshold T]
               [--resample] [--png-scale PCTL] [--save-diff]
               [--c-bin PATH] [--py-bin PATH | --py-cmd CMD] -- ARGS...

Exit codes: 0 success, 1 usage error, 2 a program failed, 3 correlation
below --threshold, 4 image shapes differ (without --resample), 5 I/O or
parse error, 6 an image has NaN or infinite pixels.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from torchbragg.io.png import diff_preview, preview, scale_max, write_png

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_RUNNER = 2
EXIT_THRESHOLD = 3
EXIT_SHAPE = 4
EXIT_IO = 5
EXIT_NONFINITE = 6

# Flags whose value is a file the programs read: made absolute, because each
# program runs in its own working folder.
INPUT_FILE_FLAGS = {
    "-hkl", "-mat", "-img", "-mask", "-sourcefile", "-stol", "-4stol", "-Q",
}
# Flags whose value is a file the programs write: kept inside each program's
# own folder (by base name), so the two runs never write the same file.
OUTPUT_FILE_FLAGS = {
    "-intfile", "-intimage", "-pgmfile", "-pgmimage", "-noisefile",
    "-noiseimage", "-stolout",
}
FLOAT_FLAGS = {"-floatfile", "-floatimage"}
DEFAULT_FDUMP = "Fdump.bin"


class UsageError(Exception):
    pass


class CompareError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit code 1, not argparse's 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="nb-compare",
        usage="nb-compare [options] -- NANOBRAGG_ARGS...",
        description="Run the original nanoBragg (C) and torchbragg with the same "
        "arguments and compare their float images.",
        epilog="Exit codes: 0 success, 1 usage error, 2 a program failed, "
        "3 correlation below --threshold, 4 image shapes differ (no --resample), "
        "5 I/O or parse error.",
    )
    p.add_argument("--outdir", metavar="DIR",
                   help="output folder (must not exist or be empty); default "
                   "comparisons/YYYYMMDD-HHMMSS-<hash of args>")
    p.add_argument("--roi", nargs=4, type=int, metavar=("XMIN", "XMAX", "YMIN", "YMAX"),
                   help="compare only this region: fast (x) and slow (y) pixel "
                   "indices, zero-based, inclusive")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="exit 3 when the correlation is below T")
    p.add_argument("--resample", action="store_true",
                   help="if shapes differ, resize the torchbragg image to the C "
                   "shape (nearest neighbour) instead of failing")
    p.add_argument("--png-scale", type=float, default=99.5, metavar="PCTL",
                   help="previews map 0..(this percentile of both images) to "
                   "0..255 (default 99.5)")
    p.add_argument("--save-diff", action="store_true",
                   help="also write diff.bin (torchbragg - C, float32) and diff.png")
    p.add_argument("--c-bin", metavar="PATH",
                   help="original nanoBragg executable (default: $NB_C_BIN, "
                   "else ./nanoBragg)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--py-bin", metavar="PATH",
                   help="torchbragg executable (default: $NB_PY_BIN, else "
                   "'<this python> -m torchbragg')")
    g.add_argument("--py-cmd", metavar="CMD",
                   help="torchbragg command line as one string, e.g. "
                   "'python -m torchbragg -dtype float64'")
    return p


# ---------------------------------------------------------------- runners

def _resolve_exe(name: str, what: str) -> str:
    if os.sep in name or (os.altsep and os.altsep in name):
        path = os.path.abspath(os.path.expanduser(name))
        if not os.path.isfile(path):
            raise UsageError(f"{what} not found: {name}")
        if not os.access(path, os.X_OK):
            raise UsageError(f"{what} is not executable: {name}")
        return path
    found = shutil.which(name)
    if found is None:
        raise UsageError(f"{what} not found on PATH: {name}")
    return os.path.abspath(found)


def resolve_c_cmd(c_bin: str | None, env=os.environ) -> list[str]:
    if c_bin is not None and not c_bin.strip():
        raise UsageError("--c-bin is empty: give the original nanoBragg executable")
    src = c_bin or env.get("NB_C_BIN")
    if not src:
        if os.path.isfile("nanoBragg") and os.access("nanoBragg", os.X_OK):
            src = "./nanoBragg"
        else:
            raise UsageError(
                "no C nanoBragg given: pass --c-bin PATH or set NB_C_BIN "
                "(no ./nanoBragg here either)")
    return [_resolve_exe(src, "C nanoBragg")]


def _split_cmd(text: str, what: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:  # e.g. an unterminated quote
        raise UsageError(f"{what} {text!r} cannot be split into words: {exc}") from None


def resolve_py_cmd(py_bin: str | None, py_cmd: str | None, env=os.environ) -> list[str]:
    if py_cmd is not None:
        cmd, what = _split_cmd(py_cmd, "--py-cmd"), "--py-cmd"
    elif py_bin is not None:
        cmd, what = [py_bin], "--py-bin"
    elif env.get("NB_PY_BIN"):
        cmd, what = _split_cmd(env["NB_PY_BIN"], "NB_PY_BIN"), "NB_PY_BIN"
    else:
        return [sys.executable, "-m", "torchbragg"]
    if not cmd or not cmd[0]:
        raise UsageError(f"{what} is empty: give the torchbragg command to run")
    cmd[0] = _resolve_exe(cmd[0], "torchbragg command")
    return cmd


def prepare_args(args: list[str], cwd: str) -> tuple[list[str], list[str], bool]:
    """Arguments for one run in a private folder.

    Drops any -floatfile (the caller adds its own), makes input files
    absolute and output files local. Returns (args, notes, has_hkl).
    """
    out, notes = [], []
    has_hkl = False
    i = 0
    while i < len(args):
        a = args[i]
        has_val = i + 1 < len(args)
        if a in FLOAT_FLAGS and has_val:
            notes.append(f"{a} {args[i + 1]} replaced by the tool's own float file")
            i += 2
            continue
        if a in INPUT_FILE_FLAGS and has_val:
            val = args[i + 1]
            if a == "-hkl":
                has_hkl = True
            p = os.path.join(cwd, os.path.expanduser(val))
            out += [a, os.path.abspath(p) if os.path.exists(p) else val]
            i += 2
            continue
        if a in OUTPUT_FILE_FLAGS and has_val:
            val = args[i + 1]
            base = os.path.basename(val.rstrip("/\\")) or "output"
            if base != val:
                notes.append(f"{a} {val} written as {base} in each program's folder")
            out += [a, base]
            i += 2
            continue
        if a == "-dump" and has_val:
            val = args[i + 1]
            p = os.path.join(cwd, os.path.expanduser(val))
            out += [a, os.path.abspath(p) if os.path.exists(p) else val]
            i += 2
            continue
        out.append(a)
        i += 1
    return out, notes, has_hkl


@dataclass
class RunResult:
    cmd: list[str]
    returncode: int
    seconds: float
    float_path: Path


def run_program(cmd: list[str], args: list[str], workdir: Path, float_path: Path,
                stdout_path: Path, stderr_path: Path, env: dict) -> RunResult:
    full = list(cmd) + list(args) + ["-floatfile", str(float_path)]
    with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(full, cwd=workdir, stdout=so, stderr=se,
                                  stdin=subprocess.DEVNULL, env=env)
            rc = proc.returncode
        except OSError as exc:
            se.write(f"could not start {full[0]}: {exc}\n".encode())
            rc = 127
        seconds = time.perf_counter() - t0
    return RunResult(full, rc, seconds, float_path)


def _child_env() -> dict:
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    if pp:  # programs run elsewhere: keep relative entries meaningful
        env["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(x) if x else x for x in pp.split(os.pathsep))
    return env


# ---------------------------------------------------------------- images

def _last_value(args: list[str], names, n=1):
    val = None
    for i, a in enumerate(args):
        if a in names and i + n < len(args):
            val = args[i + 1:i + 1 + n]
    return val


def expected_shape(args: list[str]) -> tuple[int, int] | None:
    """(slow, fast) pixel counts the arguments ask for, or None if unknown
    (an -img/-mask header may set them)."""
    try:
        pixel = 0.1
        v = _last_value(args, {"-pixel"})
        if v:
            pixel = float(v[0])
        df = ds = 102.4
        for i, a in enumerate(args[:-1]):
            if a == "-detsize":
                df = ds = float(args[i + 1])
            elif a == "-detsize_f":
                df = float(args[i + 1])
            elif a == "-detsize_s":
                ds = float(args[i + 1])
        nf = ns = None
        for i, a in enumerate(args[:-1]):
            if a == "-detpixels":
                nf = ns = int(args[i + 1])
            elif a in ("-detpixels_f", "-detpixels_x"):
                nf = int(args[i + 1])
            elif a in ("-detpixels_s", "-detpixels_y"):
                ns = int(args[i + 1])
        if nf is None and ns is None and any(a in ("-img", "-mask") for a in args):
            return None
        if pixel <= 0:
            return None
        if nf is None:
            nf = math.ceil(df / pixel - 0.5)
        if ns is None:
            ns = math.ceil(ds / pixel - 0.5)
        if nf <= 0 or ns <= 0:
            return None
        return ns, nf
    except ValueError:
        return None


def read_float_image(path: Path, shape: tuple[int, int] | None) -> np.ndarray:
    """Little-endian float32, fast index contiguous -> (slow, fast) array."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CompareError(EXIT_IO, f"cannot read {path}: {exc}") from exc
    if len(data) % 4:
        raise CompareError(EXIT_IO, f"{path}: size {len(data)} is not a multiple of 4")
    img = np.frombuffer(data, dtype="<f4")
    n = img.size
    if n == 0:
        raise CompareError(EXIT_IO, f"{path} is empty")
    if shape is not None and shape[0] * shape[1] == n:
        return img.reshape(shape)
    side = math.isqrt(n)
    if side * side == n:
        return img.reshape(side, side)
    want = f" (arguments ask for {shape[0]}x{shape[1]})" if shape else ""
    raise CompareError(
        EXIT_IO, f"{path}: cannot tell the shape of {n} pixels{want}; "
        "pass -detpixels_x/-detpixels_y")


def resample_nearest(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = np.minimum((np.arange(shape[0]) * img.shape[0]) // shape[0], img.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) * img.shape[1]) // shape[1], img.shape[1] - 1)
    return img[np.ix_(rows, cols)]


def metrics(c: np.ndarray, py: np.ndarray) -> dict:
    a = c.astype(np.float64).ravel()
    b = py.astype(np.float64).ravel()
    d = b - a
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    mse = float(np.mean(d * d))
    if np.array_equal(a, b):
        corr = 1.0
    else:
        da, db = a - a.mean(), b - b.mean()
        den = math.sqrt(float(np.dot(da, da)) * float(np.dot(db, db)))
        corr = float(np.dot(da, db) / den) if den > 0 and math.isfinite(den) else float("nan")
    sum_c, sum_py = float(a.sum()), float(b.sum())
    return {
        "correlation": corr,
        "mse": mse,
        "rmse": math.sqrt(mse) if mse >= 0 else float("nan"),
        "max_abs_diff": float(np.max(np.abs(d))),
        "sum_c": sum_c,
        "sum_py": sum_py,
        "sum_ratio": sum_py / sum_c if sum_c != 0 else float("nan"),
        "all_finite": finite,
        "pixels": int(a.size),
    }


# ---------------------------------------------------------------- output

def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def args_hash(args: list[str]) -> str:
    return hashlib.sha1(json.dumps(list(args)).encode()).hexdigest()[:7]


def make_outdir(outdir: str | None, args: list[str]) -> Path:
    if outdir:
        path = Path(outdir)
        if path.exists():
            if not path.is_dir():
                raise UsageError(f"--outdir {outdir} exists and is not a folder")
            if any(path.iterdir()):
                raise UsageError(f"--outdir {outdir} is not empty; refusing to overwrite")
            return path
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise CompareError(EXIT_IO, f"cannot create {outdir}: {exc}") from exc
        return path
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("comparisons") / f"{stamp}-{args_hash(args)}"
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            path = base if n == 0 else base.with_name(f"{base.name}-{n}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as exc:
        raise CompareError(EXIT_IO, f"cannot create an output folder: {exc}") from exc
    raise CompareError(EXIT_IO, f"cannot find a free name for {base}")


def _fmt(x, spec=".6g"):
    return "nan" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def print_report(m: dict, c_s: float, py_s: float, shape, roi, out=None):
    out = out or sys.stdout
    print(f"C runtime: {c_s:.3f} s", file=out)
    print(f"Py runtime: {py_s:.3f} s", file=out)
    print(f"corr={_fmt(m['correlation'], '.6f')} rmse={_fmt(m['rmse'])} "
          f"max|diff|={_fmt(m['max_abs_diff'])} sum_ratio={_fmt(m['sum_ratio'], '.6f')} "
          f"size={shape[1]}x{shape[0]}" + (f" roi={roi}" if roi else ""), file=out)
    rows = [
        ("correlation", _fmt(m["correlation"], ".6f")),
        ("mse", _fmt(m["mse"])),
        ("rmse", _fmt(m["rmse"])),
        ("max |diff|", _fmt(m["max_abs_diff"])),
        ("sum C", _fmt(m["sum_c"])),
        ("sum Py", _fmt(m["sum_py"])),
        ("sum Py / C", _fmt(m["sum_ratio"], ".6f")),
        ("C time s", f"{c_s:.3f}"),
        ("Py time s", f"{py_s:.3f}"),
        ("C / Py time", _fmt(c_s / py_s if py_s > 0 else float("nan"), ".3f")),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}", file=out)


# ---------------------------------------------------------------- main

def _split_argv(argv: list[str]) -> tuple[list[str], list[str] | None]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, args = _split_argv(argv)
    parser = build_parser()
    try:
        try:
            opts = parser.parse_args(own)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        if args is None:
            raise UsageError("put the nanoBragg arguments after '--'")
        if not args:
            raise UsageError("no nanoBragg arguments after '--'")
        if opts.roi:
            x0, x1, y0, y1 = opts.roi
            if x0 < 0 or y0 < 0 or x1 < x0 or y1 < y0:
                raise UsageError("--roi needs 0 <= xmin <= xmax and 0 <= ymin <= ymax")
        if not 0.0 < opts.png_scale <= 100.0:
            raise UsageError("--png-scale must be in (0, 100]")
        c_cmd = resolve_c_cmd(opts.c_bin)
        py_cmd = resolve_py_cmd(opts.py_bin, opts.py_cmd)
        outdir = make_outdir(opts.outdir, args)
    except UsageError as exc:
        print(f"nb-compare: error: {exc} (usage: nb-compare [options] -- NANOBRAGG_ARGS..., see --help)",
              file=sys.stderr)
        return EXIT_USAGE
    except CompareError as exc:
        print(f"nb-compare: error: {exc}", file=sys.stderr)
        return exc.code
    return _compare(opts, args, c_cmd, py_cmd, outdir)


def _compare(opts, args, c_cmd, py_cmd, outdir: Path) -> int:
    cwd = os.getcwd()
    run_args, notes, has_hkl = prepare_args(args, cwd)
    summary = {
        "args": args,
        "run_args": run_args,
        "notes": notes,
        "c_binary": c_cmd,
        "py_command": py_cmd,
        "outdir": str(outdir.resolve()),
        "roi": opts.roi,
        "resample": bool(opts.resample),
        "resampled": False,
        "threshold": opts.threshold,
        "png_scale_method": "linear",
        "png_percentile": opts.png_scale,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }

    def finish(code: int, status: str, message: str | None = None) -> int:
        summary["status"] = status
        summary["exit_code"] = code
        if message:
            summary["error"] = message
            print(f"nb-compare: {message}", file=sys.stderr)
        try:
            (outdir / "summary.json").write_text(
                json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
        except OSError as exc:
            print(f"nb-compare: cannot write summary.json: {exc}", file=sys.stderr)
            return code if code else EXIT_IO
        print(f"artifacts: {outdir}")
        return code

    env = _child_env()
    results = {}
    for tag, cmd in (("c", c_cmd), ("py", py_cmd)):
        work = outdir / f"{tag}_run"
        work.mkdir()
        fdump = Path(cwd) / DEFAULT_FDUMP
        if not has_hkl and "-dump" not in run_args and fdump.is_file():
            shutil.copy2(fdump, work / DEFAULT_FDUMP)  # structure factors of a previous run
        res = run_program(cmd, run_args, work, (outdir / f"{tag}_float.bin").resolve(),
                          outdir / f"{tag}_stdout.txt", outdir / f"{tag}_stderr.txt", env)
        results[tag] = res
        summary[f"runtime_{tag}_ms"] = res.seconds * 1000.0
        summary[f"returncode_{tag}"] = res.returncode
        summary[f"command_{tag}"] = res.cmd
        if res.returncode != 0:
            name = "C nanoBragg" if tag == "c" else "torchbragg"
            tail = _tail(outdir / f"{tag}_stderr.txt") or _tail(outdir / f"{tag}_stdout.txt")
            return finish(EXIT_RUNNER, "runner_failure",
                          f"{name} exited with status {res.returncode}"
                          + (f": {tail}" if tail else "") + f" (logs in {outdir})")

    for tag, name in (("c", "C nanoBragg"), ("py", "torchbragg")):
        if not results[tag].float_path.is_file():
            return finish(EXIT_IO, "io_error",
                          f"{name} wrote no float image; see {outdir / (tag + '_stdout.txt')}")
    c_s, py_s = results["c"].seconds, results["py"].seconds
    try:
        shape = expected_shape(args)
        c_img = read_float_image(results["c"].float_path, shape)
        py_img = read_float_image(results["py"].float_path, shape)
    except CompareError as exc:
        return finish(exc.code, "io_error", str(exc))
    summary["shape_c"] = list(c_img.shape)
    summary["shape_py"] = list(py_img.shape)
    if c_img.shape != py_img.shape:
        if not opts.resample:
            return finish(EXIT_SHAPE, "shape_mismatch",
                          f"image shapes differ: C {c_img.shape}, torchbragg {py_img.shape} "
                          "(use --resample to compare anyway)")
        py_img = resample_nearest(py_img, c_img.shape)
        summary["resampled"] = True

    if opts.roi:
        x0, x1, y0, y1 = opts.roi
        ns, nf = c_img.shape
        if x0 >= nf or y0 >= ns:
            return finish(EXIT_USAGE, "usage_error",
                          f"--roi {opts.roi} lies outside the {ns}x{nf} image")
        x1, y1 = min(x1, nf - 1), min(y1, ns - 1)
        summary["roi_used"] = [x0, x1, y0, y1]
        c_cmp = c_img[y0:y1 + 1, x0:x1 + 1]
        py_cmp = py_img[y0:y1 + 1, x0:x1 + 1]
    else:
        c_cmp, py_cmp = c_img, py_img

    with np.errstate(all="ignore"):  # NaN or inf pixels are reported below, not warned about
        m = metrics(c_cmp, py_cmp)
    summary.update(m)
    summary["runtime_c_s"], summary["runtime_py_s"] = c_s, py_s
    print_report(m, c_s, py_s, c_cmp.shape, opts.roi)
    if not m["all_finite"]:
        bad = [name for name, img in (("C nanoBragg", c_cmp), ("torchbragg", py_cmp))
               if not np.isfinite(img).all()]
        return finish(EXIT_NONFINITE, "non_finite",
                      f"the {' and the '.join(bad)} image has NaN or infinite pixels; the images cannot be "
                      "compared")

    try:
        vmax = scale_max([c_cmp, py_cmp], opts.png_scale)
        summary["png_vmax"] = vmax
        write_png(outdir / "c.png", preview(c_cmp, vmax=vmax))
        write_png(outdir / "py.png", preview(py_cmp, vmax=vmax))
        if opts.save_diff:
            diff = py_cmp.astype(np.float32) - c_cmp.astype(np.float32)
            diff.astype("<f4").tofile(outdir / "diff.bin")
            write_png(outdir / "diff.png", diff_preview(diff, opts.png_scale))
    except OSError as exc:
        return finish(EXIT_IO, "io_error", f"cannot write previews: {exc}")

    corr = m["correlation"]
    if opts.threshold is not None and not (corr >= opts.threshold):
        return finish(EXIT_THRESHOLD, "below_threshold",
                      f"correlation {_fmt(corr, '.6f')} is below the threshold {opts.threshold}")
    return finish(EXIT_OK, "ok")


def _tail(path: Path, n: int = 300) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    lines = text.splitlines()
    return lines[-1][-n:] if lines else ""


if __name__ == "__main__":
    sys.exit(main())
