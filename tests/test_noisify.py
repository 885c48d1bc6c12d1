"""noisify: the command against the original's files, and the detector
response model (PSF, gain, offset, read-out noise, calibration) from first
principles."""

from __future__ import annotations

import io
import lzma
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from torchbragg.commands import noisify as cmd

DATA = Path(__file__).parent / "data" / "golden_suite" / "noisify.tar.xz"


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden_noisify")
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(DATA.read_bytes()))) as tar:
        tar.extractall(root, filter="data")
    return root / "noisify"


CASES = ["bragg_spots_overload", "calibration_error", "everything_pgm", "gain_flicker", "poisson_only",
         "psf_fiber_radius", "psf_gauss", "scale_readout_adc"]


@pytest.mark.parametrize("case", CASES)
def test_golden_files_byte_identical(golden, case, tmp_path, monkeypatch, capsys):
    src = golden / case
    shutil.copy(src / "in.bin", tmp_path / "in.bin")
    monkeypatch.chdir(tmp_path)
    args = (src / "args.txt").read_text().split() + ["-floatfile", "in.bin", "-noprogress"]
    assert cmd.main(args) == 0
    report = capsys.readouterr().out
    outputs = sorted(p.name for p in src.iterdir() if p.suffix in (".img", ".pgm"))
    assert "noise.img" in outputs
    for name in outputs:
        assert (tmp_path / name).read_bytes() == (src / name).read_bytes(), name
    # the photon count the original reports
    want = [ln for ln in (src / "stdout.txt").read_text().splitlines() if "photons on noise image (" in ln]
    assert want[0] in report
