"""Access to the original program's reference outputs vendored in tests/data/golden."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"  # reference outputs and inputs the tests read
ROOT = TESTS.parent  # the checkout
GOLDEN = DATA / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
OUTPUTS = {"float.bin", "int.img", "noise.img", "image.pgm", "Fdump.bin", "stdout.txt", "args.txt"}

# Cases where the original's substring flag matching changes the meaning of the
# command; torchbragg reads flags by exact name, so the image of the original
# corresponds to these equivalent explicit commands (see docs/golden_cases.md).
STRSTR_EQUIVALENT = {
    # "-misset_seed 12345 -floatfile float.bin" is also read as "-misset 12345 <0> <0>"
    "misset_random_12345": "-cell 100 100 100 90 90 90 -N 5 -lambda 1.0 -default_F 100 -pixel 0.1 "
                           "-distance 100 -detpixels 192 -misset 12345 0 0",
    # "-twotheta_axis 0 1 0" is also read as "-twotheta 0"
    "twotheta_axis_custom": "-cell 100 100 100 90 90 90 -N 5 -lambda 1.0 -default_F 100 -pixel 0.2 "
                            "-distance 80 -detpixels 128 -twotheta 0 -twotheta_axis 0 1 0",
}


def cases() -> list[str]:
    return sorted(MANIFEST)


def args(case: str, effective: bool = True) -> list[str]:
    text = STRSTR_EQUIVALENT[case] if effective and case in STRSTR_EQUIVALENT else MANIFEST[case]["args"]
    return shlex.split(text)


def reference(case: str, name: str = "float.bin") -> bytes:
    path = GOLDEN / case / (name + ".gz")
    if path.exists():
        return gzip.decompress(path.read_bytes())
    return (GOLDEN / case / name).read_bytes()


def float_image(case: str) -> np.ndarray:
    m = MANIFEST[case]
    return np.frombuffer(reference(case), "<f4").reshape(m["spixels"], m["fpixels"])


def stdout(case: str) -> str:
    return (GOLDEN / case / "stdout.txt").read_text()


def materialize(case: str, folder: Path) -> Path:
    """Copy the case's input files (not its reference outputs) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in os.listdir(GOLDEN / case):
        name = f[:-3] if f.endswith(".gz") else f
        if name in OUTPUTS:
            continue
        if f.endswith(".gz"):
            (folder / name).write_bytes(gzip.decompress((GOLDEN / case / f).read_bytes()))
        else:
            shutil.copy(GOLDEN / case / f, folder / name)
    return folder


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run the nanoBragg command in-process in `cwd`; returns (status, stdout)."""
    from torchbragg.commands.nanobragg import main
    old = os.getcwd()
    buf = io.StringIO()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(buf):
            rc = main(argv)
    finally:
        os.chdir(old)
    return rc, buf.getvalue()


def parity(got: np.ndarray, ref: np.ndarray) -> dict:
    got = got.astype(np.float64).ravel()
    ref = ref.astype(np.float64).ravel()
    r = float(np.corrcoef(got, ref)[0, 1]) if got.std() > 0 and ref.std() > 0 else float("nan")
    return dict(r=r, sum_ratio=float(got.sum() / ref.sum()),
                max_rel=float(np.abs(got - ref).max() / ref.max()))
