"""`torchbragg gradcheck`: run the gradient checks and write an evidence bundle.

The checks are pytest tests shipped inside the package
(torchbragg/checks/gradients.py), so the audit runs from an installed package
as well as from a source checkout: pytest runs on that module file, with the
folder holding the package as its rootdir and no configuration file, so the
node ids read `torchbragg/checks/gradients.py::...` wherever it is installed.
Each check appends its measured errors to a JSON-lines file named by
TORCHBRAGG_GRAD_RECORD, and this module turns those records, the JUnit XML and
the logs into a bundle (default reports/gradients/<UTC stamp>/ under the
checkout, or under the current directory for an installed package):

  report.md          coverage table, tolerances, devices, warnings, how to reproduce
  gradcheck.log      verbatim pytest output
  collect_only.log   the test ids (pytest --collect-only -q)
  commands.txt       every command run, in order, with exit status, cwd, commit, time
  env.json           versions, devices, relevant environment variables
  junit.xml, records.jsonl   raw results the report was built from
  sha256.txt         checksums of every other file
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CHECKS_FILE = PACKAGE_DIR / "checks" / "gradients.py"
# pytest's rootdir: the folder holding the package (src/ of a checkout, site-packages when installed)
ROOTDIR = PACKAGE_DIR.parent
TEST_FILE = CHECKS_FILE.relative_to(ROOTDIR).as_posix()  # "torchbragg/checks/gradients.py"
COMPILE_ENV = "TORCHBRAGG_COMPILE"
# The checks render many tiny images; one thread per process avoids the
# thread hand-off that dominates them (and its collapse when the CPUs are
# shared). Applied only where the caller has not set them.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RELEVANT_ENV = (COMPILE_ENV, "TORCHBRAGG_CHUNK", "TORCHBRAGG_GRAD_DEVICE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "CUDA_VISIBLE_DEVICES", "PYTHONHASHSEED", "PYTHONPATH", "PYTEST_ADDOPTS")

# Every continuous parameter of the models (the simulator's parameter names,
# `Simulator.named_parameters()`; "[i]" is one component) and whether it also
# needs a second-order check. Panel 0 of a flag-built detector carries the
# nanoBragg placement (a DistanceMount); panel 1 and the hierarchy are those of
# a two-panel detector built from the models (plain frames in a group).
PANEL = "detector.panels.0"
PARAMETERS = [
    *(f"crystal.cell[{i}]" for i in range(6)),
    *(f"crystal.misset[{i}]" for i in range(3)),
    "scan.oscillation[0]", "scan.oscillation[1]", "goniometer.angles[1]",
    "crystal.mosaic_spread", "crystal.N", "crystal.structure_factors.Fhkl", "crystal.structure_factors.default_F",
    "crystal.fudge",
    f"{PANEL}.frame.distance", f"{PANEL}.frame.close_distance",
    f"{PANEL}.frame.close_center[0]", f"{PANEL}.frame.close_center[1]",
    f"{PANEL}.frame.beam_center[0]", f"{PANEL}.frame.beam_center[1]", f"{PANEL}.pixel_size",
    *(f"{PANEL}.frame.rotation[{i}]" for i in range(3)), f"{PANEL}.frame.twotheta",
    f"{PANEL}.thickness", f"{PANEL}.mu",
    *(f"detector.hierarchy.frame.origin[{i}]" for i in range(3)),
    *(f"detector.hierarchy.frame.orientation[{i}]" for i in range(3)),
    *(f"detector.panels.1.frame.origin[{i}]" for i in range(3)),
    *(f"detector.panels.1.frame.orientation[{i}]" for i in range(3)),
    "beam.wavelength", *(f"beam.direction[{i}]" for i in range(3)), "beam.dispersion",
    "beam.divergence[0]", "beam.divergence[1]", "beam.fluence", "beam.polarization_fraction", "beam.water_size",
    "background.scale", "background.thickness", "background.size[0]", "background.size[1]", "background.density",
    "background.molecular_weight", "background.molecules",
]
SECOND_ORDER = [p for p in PARAMETERS
                if p.startswith(("crystal.cell[", "crystal.misset[", f"{PANEL}.frame.beam_center"))] + [
    f"{PANEL}.frame.distance", "beam.wavelength"]

# What has no gradient on purpose (listed in every report).
NOT_DIFFERENTIABLE = [
    ("step counts: -phisteps, -mosaic_dom, -dispsteps, -divsteps, -thicksteps, -oversample",
     "integers; they choose the sampling grid"),
    ("conventions, pivots, -roi, -mask, panel sizes in pixels, the panel hierarchy's shape", "discrete choices"),
    ("spot shape and -interpolate switch", "discrete choices; each shape is checked where it has a gradient"),
    ("-tophat_spots (N, fudge under it)", "a step function: zero gradient almost everywhere"),
    ("which structure factor a nearest-neighbour lookup picks (and crystal.structure_factors.hkl_min)",
     "piecewise constant in h,k,l; the picked values (crystal.structure_factors.Fhkl, default_F) are differentiable"),
    ("-dmin cut-off", "a mask"),
    ("crystal.mosaic_axes, crystal.mosaic_factors (buffers)", "random draws fixed at build time (-mosaic_seed); "
     "crystal.mosaic_spread is differentiable when the run was built with a spread > 0 (at 0 no domains are drawn)"),
    ("crystal.U (a buffer)", "the setting the cell (or -mat file) starts from; orientation changes go through "
     "crystal.misset, which is checked on both the -cell and the -mat path"),
    ("convention vectors: beam.polarization_normal, the frames' starting axes (fast0, slow0, normal0, "
     "twotheta_axis), goniometer.axes, fixed_rotation, setting_rotation (buffers), and the custom vectors that "
     "set them (-fdet_vector, -beam_vector, -polar_vector, -spindle_axis, -pix0_vector)",
     "constants of the convention or model; beam.direction, the frames' orientation, rotation and twotheta, "
     "and goniometer.angles move what they place"),
    ("goniometer.angles[scan axis] (every angle of a one-axis goniometer)",
     "replaced by the scan's rotation angles; scan.oscillation moves them"),
    ("-flux, -exposure, -beamsize", "resolved into beam.fluence at build time; beam.fluence is checked, also on "
     "a run built from -flux -exposure -beamsize"),
    ("sensor thickness and mu when built with none", "no layers are created; build with -detector_thick to train them"),
    ("-sourcefile positions and wavelengths (beam.source_positions, source_wavelengths: buffers)",
     "constants read from the file"),
]

# What the report says was done about a warning, by category.
WARNING_ACTIONS = {
    "ResourceWarning": "a file handle left open; no value the checks compare depends on it. Not filtered, "
                       "so it stays visible until the code at that location closes the file",
    "DeprecationWarning": "an API that will change; results are unaffected today. Not filtered, left for follow-up",
    "FutureWarning": "an API that will change; results are unaffected today. Not filtered, left for follow-up",
}


def _utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _checkout() -> Path | None:
    """The source checkout the package runs from (src/torchbragg of a project
    folder), or None for an installed package."""
    base = ROOTDIR.parent
    if ROOTDIR.name == "src" and (base / "pyproject.toml").is_file():
        return base
    return None


def _claim(path: Path) -> bool:
    """Take an empty or missing directory for a new bundle; never reuse one
    that holds anything (commands.txt is created exclusively as the claim)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            return False
        with open(path / "commands.txt", "x"):
            pass
        return True
    except (FileExistsError, NotADirectoryError):
        return False


def claim_bundle_dir(parent: Path, stamp: str) -> Path:
    """parent/stamp, or parent/stamp-2, -3, ... when an earlier bundle holds the name."""
    for n in range(1, 1000):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        if _claim(path):
            return path
    raise RuntimeError(f"no free bundle directory under {parent}")


class _Recorder:
    """Runs commands (in `cwd` unless told otherwise) and appends each to commands.txt."""

    def __init__(self, bundle: Path, cwd: Path):
        self.bundle, self.cwd, self.commit, self.n = bundle, cwd, "(not yet read)", 0

    def run(self, cmd: list[str], log: str | None = None, env: dict | None = None,
            cwd: Path | None = None) -> tuple[int, str]:
        self.n += 1
        cwd = cwd or self.cwd
        start, t0 = _utc(), time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, errors="replace")
            rc, out = proc.returncode, proc.stdout
        except OSError as exc:
            rc, out = 127, f"{exc}\n"
        seconds = time.monotonic() - t0
        if log:
            (self.bundle / log).write_text(out)
        with open(self.bundle / "commands.txt", "a") as fh:
            fh.write(f"[{self.n}] {start}  exit={rc}  seconds={seconds:.2f}  cwd={cwd}  commit={self.commit}\n"
                     f"    {shlex.join(cmd)}" + (f"\n    output: {log}" if log else "") + "\n")
        return rc, out

    def note(self, text: str):
        with open(self.bundle / "commands.txt", "a") as fh:
            fh.write(text.rstrip() + "\n")


def _uses_compile() -> bool:
    """Whether any module of the package calls torch.compile (read from the source)."""
    pkg = Path(__file__).resolve().parent.parent
    return any("torch.compile(" in p.read_text(errors="replace") for p in pkg.rglob("*.py")
               if p.name != "gradcheck.py")


def _environment(root: Path | None, commit: str, dirty: bool | None, device: str, child_env: dict) -> dict:
    import numpy
    import torch

    from .. import __version__
    cuda = torch.cuda.is_available()
    return {
        "torchbragg": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        # as the checks saw it: torch takes its intra-op thread count from OMP_NUM_THREADS
        "torch_threads": int(child_env["OMP_NUM_THREADS"]) if str(child_env.get("OMP_NUM_THREADS", "")).isdigit()
        else torch.get_num_threads(),
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "checked_device": device,
        "dtype": "float64 (gradcheck, gradgradcheck); float32 (end-to-end loss check)",
        "compile": {"env": COMPILE_ENV, "value": child_env.get(COMPILE_ENV), "default": "off (unset)",
                    "torch_compile_in_package": _uses_compile()},
        # as the test run saw them
        "env": {**{k: child_env.get(k) for k in RELEVANT_ENV},
                **{k: v for k, v in sorted(child_env.items()) if k.startswith("TORCHBRAGG_")}},
        "checkout": None if root is None else str(root),
        "package_dir": str(PACKAGE_DIR),
        "checks_file": str(CHECKS_FILE),
    }


def _junit(path: Path) -> dict[str, dict]:
    """nodeid -> {outcome, seconds, file, line, message} from pytest's JUnit XML."""
    out = {}
    if not path.exists():
        return out
    try:
        tree = ET.parse(path)
    except ET.ParseError:
        return out
    for tc in tree.iter("testcase"):
        file = tc.get("file") or TEST_FILE
        nodeid = f"{file}::{tc.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or "").splitlines()[0][:200] if el.get("message") else ""
                break
        line = tc.get("line")
        out[nodeid] = dict(outcome=outcome, seconds=float(tc.get("time") or 0.0), file=file,
                           line=int(line) + 1 if line is not None else None, message=message)
    return out


def _records(path: Path) -> dict[tuple[str, str], dict]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[(row["test"], row["param"])] = row
    return out


def _param_of(nodeid: str) -> str | None:
    m = re.search(r"\[(.+)\]$", nodeid)
    return m.group(1) if m else None


def _warnings(log: str) -> list[dict]:
    """Distinct warnings from pytest's summary: category, location, message and the tests that raised them."""
    m = re.search(r"=+ warnings summary =+\n(.*?)\n(?:-- Docs:[^\n]*\n)?=+ ", log, re.S)
    if not m:
        return []
    seen: dict[tuple, dict] = {}
    for block in re.split(r"\n\s*\n", m.group(1)):
        tests = [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith(" ")]
        where = re.search(r"^\s+(\S+?):(\d+): (\w+): (.*)$", block, re.M)
        if where:
            # temporary paths differ between tests: compare messages without them
            message = re.sub(r"/tmp/[^\s'\"]+", "<tmp>", where.group(4))
            key = (where.group(1), where.group(2), where.group(3), message)
        elif block.strip():
            key = ("?", "?", "Warning", block.strip().splitlines()[-1])
        else:
            continue
        entry = seen.setdefault(key, dict(location=f"{key[0]}:{key[1]}", category=key[2], message=key[3], tests=[]))
        entry["tests"] += tests
    return list(seen.values())


def _fmt(x, spec=".2e"):
    return "" if x is None else format(x, spec)


def _write_report(bundle: Path, ctx: dict) -> None:
    L = []
    add = L.append
    env = ctx["env"]
    add("# Gradient audit\n")
    add(f"- torchbragg {env['torchbragg']}, git commit `{env['git_commit']}`"
        + (" (working tree has uncommitted changes)" if env["git_dirty"] else ""))
    add(f"- date (UTC): {ctx['date']}")
    add(f"- result: **{'PASS' if ctx['ok'] else 'FAIL'}** ({ctx['summary']})")
    add(f"- audit wall time: {ctx['seconds']:.1f} s (pytest run {ctx['pytest_seconds']:.1f} s, "
        f"collection {ctx['collect_seconds']:.1f} s); budget 60 s")
    if ctx["selection"]:
        add(f"- selection: `{ctx['selection']}` (a subset of the gradient suite)")
    add("")

    add("## Devices and dtypes\n")
    add(f"- float64 on `{ctx['device']}`: gradcheck and gradgradcheck (the checks below).")
    add("- float32 on the same device: end-to-end loss gradient against float64 central differences.")
    add(f"- package: `{env['package_dir']}`" + (f" (source checkout `{env['checkout']}`)" if env["checkout"]
                                                else " (installed package)")
        + f"; checks: `{TEST_FILE}`.")
    add(f"- CPU threads per check process: {env['torch_threads']} (OMP_NUM_THREADS="
        f"{env['env'].get('OMP_NUM_THREADS')}; the audit sets 1 unless the caller set it: the checks render "
        "tiny images, where extra threads only add hand-off time).")
    if ctx["device"] == "cuda":
        add(f"- CUDA: run on {', '.join(env['cuda_devices'])}.")
    elif env["cuda_available"]:
        add(f"- CUDA: available ({', '.join(env['cuda_devices'])}) but not run here; "
            "rerun with `torchbragg gradcheck --device cuda`.")
    else:
        add("- CUDA: **pending** (no CUDA device on this machine; `torch.cuda.is_available()` is False). "
            "Rerun with `torchbragg gradcheck --device cuda` where one exists.")
    comp = env["compile"]
    state = "unset" if comp["value"] is None else repr(comp["value"])
    if comp["torch_compile_in_package"]:
        add(f"- `{COMPILE_ENV}` (the switch for compiled kernels, off by default): {state} in this run.")
    else:
        add(f"- `{COMPILE_ENV}` (the switch for compiled kernels, off by default): {state} in this run. The "
            "simulator does not call torch.compile, so the switch changes nothing and every check here "
            "exercises eager autograd.")
    add("")

    add("## Coverage: first and second order (float64)\n")
    add("Errors are between the autograd Jacobian and central differences (same eps) of a few O(1) linear "
        "functionals of a small rendered image: four random projections of the whole image, its peak pixel, "
        "a half-height flank pixel and a tail pixel. `rel` is the largest |analytic - numerical| / |numerical| "
        "over entries larger than 1e-3 of the largest; `tol used` is the largest |difference| / (atol + rtol "
        "|numerical|), which gradcheck requires to be <= 1.\n")
    add("| parameter | check | test (file:line) | node id | result | max abs err | max rel err | tol used "
        "| eps / atol / rtol | seconds |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for r in ctx["rows"]:
        if r["check"] == "nonzero":
            continue
        tol = "" if r.get("eps") is None else f"{r['eps']:g} / {r['atol']:g} / {r['rtol']:g}"
        add(f"| `{r['param']}` | {r['check']} | {r['where']} | `{r['nodeid']}` | {r['outcome']} "
            f"| {_fmt(r.get('max_abs_err'))} | {_fmt(r.get('max_rel_err'))} | {_fmt(r.get('tol_ratio'))} "
            f"| {tol} | {r['seconds']:.2f} |")
    add("")
    add("## Coverage: the gradient reaches every parameter\n")
    add("The parameter tensor itself is made trainable in place (`requires_grad_()`), an image loss is "
        "back-propagated, and its gradient must exist, be finite and be non-zero.\n")
    add("| parameter | node id | result | gradient norm | seconds |")
    add("|---|---|---|---|---|")
    for r in ctx["rows"]:
        if r["check"] == "nonzero":
            add(f"| `{r['param']}` | `{r['nodeid']}` | {r['outcome']} | {_fmt(r.get('grad_norm'), '.3e')} "
                f"| {r['seconds']:.2f} |")
    add("")
    if ctx["other"]:
        add("Other tests in the run:\n")
        for nodeid, j in ctx["other"]:
            add(f"- `{nodeid}`: {j['outcome']} ({j['seconds']:.2f} s)")
        add("")

    if ctx["failures"]:
        add("## Failures\n")
        for nodeid, j in ctx["failures"]:
            add(f"- `{nodeid}`: {j['outcome']}: {j['message'] or 'see gradcheck.log'}")
        add("")

    add("## Parameters not covered\n")
    if ctx["uncovered"]:
        for p, why in ctx["uncovered"]:
            add(f"- `{p}`: {why}")
    else:
        add("- none: every continuous parameter has a passing first-order check"
            + (" and, where listed, a second-order check." if not ctx["missing_second"] else "."))
    for p in ctx["missing_second"]:
        add(f"- `{p}`: second-order check not run or not passing in this run")
    add("\nNot differentiable by design:\n")
    for what, why in NOT_DIFFERENTIABLE:
        add(f"- {what}: {why}")
    add("")

    add("## Tolerances and why they are valid\n")
    add("- gradcheck / gradgradcheck: eps = 1e-6, atol = 1e-5, rtol = 1e-3 (gradcheck's defaults; tighter than "
        "the project limit rtol = 0.05). Each checked variable is scaled to O(1) (sensor thickness and water "
        "size in micrometres, divergence, frame orientations and beam direction in mrad, dispersion in percent, "
        "fluence in 1e29 photons/m^2 (1e21 on the -flux build), Fhkl in units of 100; lengths in mm, angles "
        "in degrees, mu in 1/mm otherwise) and the image is divided by its peak, so the functionals "
        "and their derivatives are O(1). Central differences then err by about eps^2 |f'''| ~ 1e-12 (truncation) "
        "plus 1e-16 / eps ~ 1e-10 (rounding), five orders below atol; the `tol used` column shows the margin.")
    add("- float32 end to end: a float32 autograd gradient of an image MSE against float64 central differences "
        "(steps 1e-4 in A, deg and mm, 1e-5 mm for the beam centre) within 1 %: float32 rounding of the image "
        "(~1e-7 relative) averages over 4096 pixels, so 1 % leaves a wide margin while catching sign or "
        "factor errors.")
    add("- Second order runs for: " + ", ".join(f"`{p}`" for p in SECOND_ORDER) + "."
        + (f" Ran in this run: {ctx['second_ran']}." if ctx["second_ran"] is not None else ""))
    add("")

    add("## Warnings\n")
    if ctx["warnings"]:
        add("Distinct warnings (verbatim text in gradcheck.log):\n")
        for w in ctx["warnings"]:
            action = WARNING_ACTIONS.get(w["category"], "not expected; not filtered, left visible for review")
            tests = ", ".join(f"`{t}`" for t in w["tests"][:3]) + (" ..." if len(w["tests"]) > 3 else "")
            add(f"- {w['category']} at `{w['location']}`: {w['message']}  \n"
                f"  raised in {len(w['tests'])} test(s): {tests}  \n  what was done: {action}.")
    else:
        add("None seen (pytest ran with `-W default`, so every warning would be listed in gradcheck.log).")
    add("")

    add("## Reproduce\n")
    add("From any directory, with the package installed (or its source checkout's src/ on the path):\n")
    add("```\n" + ctx["reproduce"] + "\n```")
    add("or run the checks alone (the same pytest command the audit ran):\n")
    add("```\n" + ctx["pytest_cmd"] + "\n```")
    add("\nFiles: gradcheck.log (verbatim pytest output), collect_only.log, commands.txt, env.json, junit.xml, "
        "records.jsonl, sha256.txt (verify with `sha256sum -c sha256.txt` in this folder).")
    (bundle / "report.md").write_text("\n".join(L) + "\n")


def _checksums(bundle: Path) -> None:
    lines = []
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "sha256.txt"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {path.relative_to(bundle).as_posix()}")
    (bundle / "sha256.txt").write_text("\n".join(lines) + "\n")


def _parser():
    p = argparse.ArgumentParser(prog="torchbragg gradcheck",
                                description="Run the gradient checks and write an evidence bundle.")
    p.add_argument("--out", help="bundle directory (default: reports/gradients/<UTC stamp> in the source checkout, "
                                 "or in the current directory for an installed package); an existing non-empty "
                                 "directory is refused")
    p.add_argument("-k", dest="keyword", help="pytest -k expression selecting a subset of the checks")
    p.add_argument("--tests", nargs="+", metavar="NODEID",
                   help="checks to run instead of the whole gradient suite: node ids such as "
                        f"'{TEST_FILE}::test_gradcheck[beam.wavelength]' or just 'test_gradcheck[beam.wavelength]'")
    p.add_argument("--device", default="cpu", help="device for the checks (default cpu)")
    return p


PYTEST_MISSING = "torchbragg gradcheck needs pytest: pip install 'torchbragg[audit]'"


def main(argv: list[str] | None = None) -> int:
    try:
        import pytest  # noqa: F401  (the checks are pytest tests, run by this interpreter)
    except ImportError:
        print(PYTEST_MISSING, file=sys.stderr)
        return 2
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    t_start = time.monotonic()
    now = _dt.datetime.now(_dt.timezone.utc)
    root = _checkout()
    if not CHECKS_FILE.is_file():
        print(f"torchbragg gradcheck: the checks module {CHECKS_FILE} is missing from the package", file=sys.stderr)
        return 2
    if args.out:
        bundle = Path(args.out).resolve()
        if not _claim(bundle):
            print(f"torchbragg gradcheck: {bundle} already holds a bundle; not overwriting it", file=sys.stderr)
            return 2
    else:
        bundle = claim_bundle_dir((root or Path.cwd()) / "reports" / "gradients", now.strftime("%Y%m%dT%H%M%SZ"))

    rec = _Recorder(bundle, Path.cwd())
    if root is not None:
        rc, out = rec.run(["git", "rev-parse", "HEAD"], cwd=root)
        commit = out.strip() if rc == 0 else "unknown"
        rec.commit = commit
        rc, out = rec.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
        dirty = bool(out.strip()) if rc == 0 else None
    else:
        commit, dirty = "n/a (installed package)", None
        rec.commit = commit
        rec.note(f"installed package at {PACKAGE_DIR}: no source checkout, so no git commit to read")

    # node ids -> this package's checks file (ids of the old tests/ location are accepted too)
    names = [t.split("::", 1)[1] if "::" in t else (None if t.endswith(".py") else t) for t in args.tests or []]
    targets = [str(CHECKS_FILE) if n is None else f"{CHECKS_FILE}::{n}" for n in names] or [str(CHECKS_FILE)]
    selection = list(targets)
    if args.keyword:
        selection += ["-k", args.keyword]
    shown = [t.replace(str(CHECKS_FILE), TEST_FILE) for t in selection]
    subset = bool(args.tests or args.keyword)
    env = dict(os.environ, TORCHBRAGG_GRAD_RECORD=str(bundle / "records.jsonl"),
               TORCHBRAGG_GRAD_DEVICE=args.device)
    for key, value in THREAD_ENV.items():
        env.setdefault(key, value)
    # no configuration file, the package's folder as rootdir: the same node ids from a checkout or an install
    isolate = ["-c", os.devnull, "--rootdir", str(ROOTDIR), "--confcutdir", str(PACKAGE_DIR)]
    py = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"] + isolate

    t0 = time.monotonic()
    crc, collected = rec.run(py + ["--collect-only", "-q"] + selection, "collect_only.log", env)
    collect_seconds = time.monotonic() - t0
    ids = [line.strip() for line in collected.splitlines() if "::" in line and not line.startswith(" ")]

    pytest_args = ["-v", "-rA", "-W", "default", "-o", "junit_family=xunit1",
                   f"--junitxml={bundle / 'junit.xml'}"] + selection
    t0 = time.monotonic()
    prc, log = rec.run(py + pytest_args, "gradcheck.log", env)
    pytest_seconds = time.monotonic() - t0

    junit = _junit(bundle / "junit.xml")
    records = _records(bundle / "records.jsonl")
    rows, other = [], []
    for nodeid in ids:
        j = junit.get(nodeid, dict(outcome="not run", seconds=0.0, file=TEST_FILE, line=None, message=""))
        param = _param_of(nodeid)
        func = nodeid.split("::")[-1].split("[")[0]
        check = {"test_gradcheck": "gradcheck", "test_gradgradcheck": "gradgradcheck",
                 "test_gradient_reaches_parameter": "nonzero"}.get(func)
        fd = [r for (t, _), r in records.items() if t == nodeid and r["check"] == "float32_vs_fd64"]
        if fd:
            for r in fd:
                rows.append(dict(r, nodeid=nodeid, where=f"{r['file']}:{r['line']}", check="float32 vs fd64",
                                 outcome="passed" if r["passed"] else "failed", seconds=j["seconds"]))
            continue
        if check is None or param is None:
            other.append((nodeid, j))
            continue
        r = records.get((nodeid, param), {})
        where = f"{r['file']}:{r['line']}" if r else f"{j['file']}:{j['line']}"
        rows.append(dict(r, param=param, check=check, nodeid=nodeid, where=where, outcome=j["outcome"],
                         seconds=j["seconds"]))

    def passed(check, p):
        return any(r["check"] == check and r["param"].split("@")[0] == p and r["outcome"] == "passed"
                   for r in rows)

    uncovered = []
    for p in PARAMETERS:
        if passed("gradcheck", p):
            continue
        tried = [r for r in rows if r["check"] == "gradcheck" and r["param"].split("@")[0] == p]
        if tried:
            uncovered.append((p, "gradcheck failed: " + ", ".join(f"`{r['nodeid']}`" for r in tried)))
        else:
            uncovered.append((p, "not selected in this run" if subset else "no gradcheck test collected"))
    missing_second = [p for p in SECOND_ORDER if not passed("gradgradcheck", p)
                      and (not subset or any(r["param"].split("@")[0] == p and r["check"] == "gradgradcheck"
                                             for r in rows))]
    second_ran = sum(1 for r in rows if r["check"] == "gradgradcheck" and r["outcome"] != "not run")
    counts = {}
    for j in junit.values():
        counts[j["outcome"]] = counts.get(j["outcome"], 0) + 1
    ok = (prc == 0 and crc == 0 and bool(junit) and all(j["outcome"] in ("passed", "skipped") for j in junit.values())
          and (subset or (not uncovered and not missing_second)))
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no results"
    summary += f"; pytest exit status {prc}"

    environment = _environment(root, commit, dirty, args.device, env)
    seconds = time.monotonic() - t_start
    environment["audit_seconds"] = round(seconds, 2)
    (bundle / "env.json").write_text(json.dumps(environment, indent=2) + "\n")
    flags = (["--device", args.device] if args.device != "cpu" else []) + \
            (["--tests", *args.tests] if args.tests else []) + (["-k", args.keyword] if args.keyword else [])
    ctx = dict(env=environment, date=now.strftime("%Y-%m-%d %H:%M:%S"), ok=ok, summary=summary, seconds=seconds,
               pytest_seconds=pytest_seconds, collect_seconds=collect_seconds,
               selection=shlex.join(shown) if subset else "", device=args.device, rows=rows, other=other,
               uncovered=uncovered, missing_second=missing_second, second_ran=second_ran,
               failures=[(k, j) for k, j in junit.items() if j["outcome"] in ("failed", "error")],
               warnings=_warnings(log),
               reproduce=shlex.join(["torchbragg", "gradcheck", *flags, "--out", "reports/gradients/NEW"]),
               pytest_cmd=f"TORCHBRAGG_GRAD_RECORD=records.jsonl TORCHBRAGG_GRAD_DEVICE={args.device} "
                          + " ".join(f"{k}={env[k]}" for k in THREAD_ENV) + " "
                          + shlex.join(["python", "-m", "pytest", "-p", "no:cacheprovider"] + isolate + pytest_args)
                          .replace(str(bundle / "junit.xml"), "junit.xml"))
    _write_report(bundle, ctx)
    rec.note(f"audit finished {_utc()}  total seconds={seconds:.2f}  result={'PASS' if ok else 'FAIL'}")
    _checksums(bundle)
    print(f"gradient audit {'passed' if ok else 'FAILED'} ({summary}) in {seconds:.1f} s")
    print(f"bundle: {bundle}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
