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


# ----------------------------------------------------------------------------- command line

def test_help_lists_every_flag_with_unit_and_default(capsys):
    assert cmd.main(["-h"]) == 0
    text = capsys.readouterr().out
    for f in cmd.FLAGS:
        for name in f.names:
            assert name in text
        if f.unit:
            assert f"[{f.unit}]" in text
    assert "(default 40)" in text and "(default 0.03)" in text and "[um] (default 46)" in text


def _bad(argv, capsys):
    rc = cmd.main(argv)
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("argv, words", [
    (["-floatfile", "in.bin", "-bogus", "1"], "unknown flag '-bogus'"),
    (["-floatfile", "missing.bin"], "cannot read missing.bin"),
    (["-floatfile", "in.bin", "-detpixels", "64"], "fewer than the 64x64"),
    (["-floatfile", "in.bin", "-psf", "box"], "-psf expects gauss or fiber"),
    (["-floatfile", "in.bin", "-pixel", "0"], "-pixel must be positive"),
    (["-floatfile", "in.bin", "-readout", "abc"], "-readout expects a number"),
    (["-floatfile", "in.bin", "-seed", "1.5"], "-seed expects an integer"),
    (["-floatfile", "in.bin", "-bits", "8"], "-bits must be 16 or 32"),
    (["-floatfile", "in.bin", "-psf_radius", "-2"], "-psf_radius must not be negative"),
    (["-floatfile", "in.bin", "-scale"], "-scale expects a value"),
    (["-scale", "2"], "no input image"),
    (["-floatfile", "in.bin", "-noisefile", "nofolder/x.img"], "cannot write nofolder/x.img"),
])
def test_bad_input_one_line_exit_2_no_file(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    np.ones(32 * 32, dtype="<f4").tofile("in.bin")
    Path("intimage.img").write_bytes(b"old")
    rc, err = _bad(argv, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("noisify: error: ") and words in err, err
    assert "Traceback" not in err
    assert Path("intimage.img").read_bytes() == b"old"  # nothing written, nothing half-written
    assert not Path("noiseimage.img").exists() and not Path("image.pgm").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_nonoise_writes_no_noise_image_and_bits32(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    img = np.zeros((16, 24), dtype="<f4")
    img[5, 7] = 70000.0
    img.tofile("in.bin")
    assert cmd.main(["-floatfile", "in.bin", "-detpixels_x", "24", "-nonoise", "-bits", "32", "-adc", "0",
                     "-gain", "2"]) == 0
    assert not Path("noiseimage.img").exists()
    raw = Path("intimage.img").read_bytes()
    assert b"TYPE=long_integer;" in raw[:512] and b"SIZE1=24;\nSIZE2=16;" in raw[:512]
    data = np.frombuffer(raw[512:], dtype="<u4").reshape(16, 24)
    # the noiseless image is clipped at 65535 whatever the bits, as in the original
    assert data[5, 7] == 65535 and data.sum() == 65535


# ----------------------------------------------------------------------------- PSF: spatial and FFT

def _spots(shape=(40, 44), seed=0):
    g = np.random.default_rng(seed)
    img = np.zeros(shape, dtype=np.float32)
    ys = g.integers(10, shape[0] - 10, 12)
    xs = g.integers(10, shape[1] - 10, 12)
    img[ys, xs] = g.uniform(100, 5000, 12).astype(np.float32)
    img[12:28, 12:30] += np.float32(3.0)
    return img


@pytest.mark.parametrize("kind, fwhm_px, radius", [("gauss", 1.7, 5), ("fiber", 0.6, 6)])
def test_spatial_psf_of_the_command_equals_fft_psf_of_the_model(kind, fwhm_px, radius):
    """The original's spatial PSF (used by the command for byte identity) and
    the FFT convolution of the model agree to float precision: same
    pixel-integrated kernel (on the original's disc), photons beyond the disc
    added back evenly, the image kept away from the edges."""
    from torchbragg import noisify as nz
    from torchbragg.psf import FIBER_G_PER_FWHM, convolve_psf, psf_kernel
    img = _spots()
    spatial = nz.apply_psf(img, kind, fwhm_px, radius, log=lambda s: None)
    k = psf_kernel(kind, torch.tensor(fwhm_px, dtype=torch.float64), (1.0, 1.0), radius, normalize=False)
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.where(d[:, None] ** 2 + d[None, :] ** 2 <= radius * radius, k, torch.zeros_like(k))
    fft = convolve_psf(torch.as_tensor(img, dtype=torch.float64), k).numpy()
    vals = img[img > 0].astype(np.float64)
    if kind == "gauss":
        lost = (vals * np.exp(-math.log(16) * (radius / fwhm_px) ** 2)).sum()
    else:
        g = fwhm_px * FIBER_G_PER_FWHM
        lost = (vals * g / math.sqrt(g * g + radius * radius)).sum()
    fft += lost / img.size
    assert np.abs(spatial - fft).max() <= 2e-6 * np.abs(fft).max()


@pytest.mark.parametrize("kind", ["gauss", "fiber"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_psf_conserves_photons_away_from_edges(kind, dtype, tol):
    """The kernel sums to one, so the blurred image holds the photons it got;
    the edge rule: photons spread past the image's edges are lost, so the
    check keeps the photons further than the kernel radius from the edges."""
    from torchbragg.models import DetectorResponse
    r = DetectorResponse(psf=kind, psf_fwhm=0.3, psf_radius=6, dtype=dtype)
    img = torch.as_tensor(_spots(), dtype=dtype)
    out = r.blur(img, (0.172, 0.2))
    assert out.shape == img.shape
    assert abs(float(out.sum()) - float(img.sum())) <= tol * float(img.sum())
    assert float(out.max()) < float(img.max())
    # at the edge photons leave
    edge = torch.zeros_like(img)
    edge[0, 0] = 100.0
    assert float(r.blur(edge, (0.172, 0.2)).sum()) < 100.0 * (1 - 1e-3)


def test_psf_narrow_is_identity_and_kernel_matches_the_original_integrals():
    from torchbragg import noisify as nz
    from torchbragg.psf import psf_kernel
    k = psf_kernel("gauss", torch.tensor(1e-4, dtype=torch.float64), (0.1, 0.1), 2)
    assert float(k[2, 2]) == pytest.approx(1.0, abs=1e-12)
    for kind, fwhm in (("gauss", 2.3), ("fiber", 1.1)):
        k = psf_kernel(kind, torch.tensor(fwhm, dtype=torch.float64), (1.0, 1.0), 3, normalize=False)
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                want = (nz._gauss_pixel(dx, dy, fwhm) if kind == "gauss"
                        else nz._fiber_pixel(dx, dy, fwhm * nz.FIBER_G_PER_FWHM))
                assert float(k[dy + 3, dx + 3]) == pytest.approx(want, rel=1e-10, abs=1e-15)
