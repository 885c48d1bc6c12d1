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
from golden import DATA

DATA = DATA / "golden_suite" / "noisify.tar.xz"


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


@pytest.mark.parametrize("case", ["everything_pgm", "psf_fiber_radius", "psf_gauss"])
def test_golden_files_without_the_compiled_helpers(golden, case, tmp_path, monkeypatch, capsys):
    """The same files from the pure Python loops (a checkout where _noise.c was not built)."""
    from torchbragg import noisify as nz
    monkeypatch.setattr(nz, "_C", None)
    test_golden_files_byte_identical(golden, case, tmp_path, monkeypatch, capsys)


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


# ----------------------------------------------------------------------------- detector response model

def test_noise_statistics_match_the_model():
    """Mean and variance of many readings: gain * photons + offset and
    gain^2 * photons + read-out^2 without PSF; with a PSF the variance is
    gain^2 * (photons convolved with the squared kernel) + read-out^2."""
    from torchbragg.models import DetectorResponse
    lam, gain, off, ro = 30.0, 2.5, 10.0, 3.0
    photons = torch.full((300, 300), lam, dtype=torch.float64)
    n = photons.numel()
    gen = torch.Generator().manual_seed(5)
    r = DetectorResponse(gain=gain, adc_offset=off, readout_noise=ro, dtype=torch.float64)
    adu = r.sample(photons, (0.1, 0.1), gen)
    mean_want = float(r.expectation(photons, (0.1, 0.1))[0, 0])
    var_want = float(r.variance(photons, (0.1, 0.1))[0, 0])
    assert mean_want == pytest.approx(gain * lam + off) and var_want == pytest.approx(gain ** 2 * lam + ro ** 2)
    assert abs(float(adu.mean()) - mean_want) < 4 * math.sqrt(var_want / n)
    assert float(adu.var()) == pytest.approx(var_want, rel=4 * math.sqrt(2 / n))
    # with a PSF: interior pixels, far from the edges
    rp = DetectorResponse(gain=gain, adc_offset=off, readout_noise=ro, psf="gauss", psf_fwhm=0.15, psf_radius=4,
                          dtype=torch.float64)
    adu = rp.sample(photons, (0.1, 0.1), gen)[10:-10, 10:-10]
    var_want = float(rp.variance(photons, (0.1, 0.1))[150, 150])
    k2 = float((rp.kernel((0.1, 0.1)) ** 2).sum())
    assert var_want == pytest.approx(gain ** 2 * lam * k2 + ro ** 2)
    assert var_want < 0.5 * (gain ** 2 * lam + ro ** 2)  # the blur averages neighbours
    assert abs(float(adu.mean()) - mean_want) < 4 * math.sqrt(var_want / adu.numel()) * 3  # correlated pixels
    assert float(adu.var()) == pytest.approx(var_want, rel=0.05)


def test_calibration_error_is_fixed_per_detector_and_overload_clips():
    from torchbragg.models import DetectorResponse
    r = DetectorResponse(calibration_noise=0.05, calibration_seed=3, dtype=torch.float64)
    a = r.calibration((100, 120))
    assert torch.equal(a, DetectorResponse(calibration_noise=0.05, calibration_seed=3).calibration(
        (100, 120), torch.float64))
    assert float(a.std()) == pytest.approx(0.05, rel=0.05) and float(a.mean()) == pytest.approx(1.0, abs=2e-3)
    assert not torch.equal(a, DetectorResponse(calibration_noise=0.05, calibration_seed=4).calibration(
        (100, 120), torch.float64))
    photons = torch.full((100, 120), 1e4, dtype=torch.float64)
    reading = r.sample(photons, (0.1, 0.1), torch.Generator().manual_seed(1))
    # the static factor shows through the Poisson noise (relative noise 1 % < 5 %)
    assert float(torch.corrcoef(torch.stack([reading.flatten(), a.flatten()]))[0, 1]) > 0.9
    over = DetectorResponse(gain=10.0, overload=5e4).sample(photons.float(), (0.1, 0.1))
    assert float(over.max()) == 5e4


def _blurred_target(kind, fwhm, dtype):
    from torchbragg.models import DetectorResponse
    photons = torch.as_tensor(_spots((32, 36), seed=3), dtype=dtype)
    truth = DetectorResponse(gain=1.7, adc_offset=5.0, psf=kind, psf_fwhm=fwhm, psf_radius=6, dtype=dtype)
    return photons, truth.expectation(photons, (0.1, 0.1)).detach()


@pytest.mark.parametrize("kind", ["gauss", "fiber"])
def test_psf_width_fitted_by_gradient_descent_returns_the_true_width(kind):
    """The psf_width group (log of the FWHM) fitted to an image blurred with
    a known width, starting 40 % off."""
    from torch.func import functional_call

    from torchbragg.models import DetectorResponse
    from torchbragg.refine.parameters import Parametrisation

    class Holder(torch.nn.Module):  # the simulator's view the group needs: `.response`
        def __init__(self, response):
            super().__init__()
            self.response = response

    true = 0.23 if kind == "gauss" else 0.08
    photons, data = _blurred_target(kind, true, torch.float64)
    sim = Holder(DetectorResponse(gain=1.7, adc_offset=5.0, psf=kind, psf_fwhm=true * 1.4, psf_radius=6,
                                  dtype=torch.float64))
    param = Parametrisation(["psf_width"], sim)
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)

    def loss():
        subs = param.substitutions(sim, x)
        model = functional_call(sim.response, {"psf_fwhm": subs["response.psf_fwhm"]}, (photons, (0.1, 0.1)))
        return ((model - data) ** 2).sum()

    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=40, line_search_fn="strong_wolfe", tolerance_grad=1e-10)

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)
    fitted = float(param.physical(sim, x.detach())[0])
    assert fitted == pytest.approx(true, rel=1e-4)


@pytest.mark.parametrize("kind", ["gauss", "fiber"])
def test_psf_width_and_gain_gradients_against_finite_differences(kind):
    """float64: torch.autograd.gradcheck; float32: the gradient of a float32
    loss against central differences of the float64 loss."""
    from torch.func import functional_call

    from torchbragg.models import DetectorResponse
    photons64, data64 = _blurred_target(kind, 0.17, torch.float64)
    r64 = DetectorResponse(psf=kind, psf_fwhm=0.12, psf_radius=5, dtype=torch.float64)

    def f(width, gain, photons=photons64, data=data64, r=r64):
        model = functional_call(r, {"psf_fwhm": width, "gain": gain}, (photons, (0.1, 0.1)))
        return ((model - data) ** 2).mean()

    w = torch.tensor(0.14, dtype=torch.float64, requires_grad=True)
    g = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (w, g), eps=1e-6, atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradgradcheck(f, (w, g), eps=1e-6, atol=1e-5, rtol=1e-3)

    r32 = DetectorResponse(psf=kind, psf_fwhm=0.12, psf_radius=5, dtype=torch.float32)
    w32 = torch.tensor(0.14, requires_grad=True)
    g32 = torch.tensor(1.3, requires_grad=True)
    f(w32, g32, photons64.float(), data64.float(), r32).backward()
    for val, t32, other in ((0.14, w32, 1.3), (1.3, g32, 0.14)):
        h = 1e-5 * val
        args = (lambda v: (torch.tensor(v, dtype=torch.float64), torch.tensor(other, dtype=torch.float64))) \
            if t32 is w32 else (lambda v: (torch.tensor(other, dtype=torch.float64), torch.tensor(v, dtype=torch.float64)))
        num = (float(f(*args(val + h))) - float(f(*args(val - h)))) / (2 * h)
        assert float(t32.grad) == pytest.approx(num, rel=2e-3)


def test_simulator_detector_counts_compose_the_response():
    from torchbragg import Simulator
    from torchbragg.models import DetectorResponse
    sim = Simulator.from_args(["-cell", "70", "80", "90", "90", "90", "90", "-default_F", "100", "-N", "5",
                               "-detpixels", "24", "-pixel", "0.1", "-distance", "100", "-lambda", "1",
                               "-dtype", "float64", "-misset", "3", "-5", "7", "-Xbeam", "0", "-Ybeam", "0"])
    photons = sim.render().detach()
    assert torch.equal(sim.detector_counts(photons), photons)  # no response: the photons
    sim.response = DetectorResponse(gain=2.0, adc_offset=7.0, psf="gauss", psf_fwhm=0.15, psf_radius=4,
                                    dtype=torch.float64)
    mean = sim.detector_counts(photons, sample=False)
    want = 2.0 * sim.response.blur(photons[0], (0.1, 0.1)) + 7.0
    assert torch.allclose(mean[0], want)
    one = sim.detector_counts(photons, generator=torch.Generator().manual_seed(1))
    two = sim.detector_counts(photons, generator=torch.Generator().manual_seed(1))
    assert torch.equal(one, two) and not torch.equal(one, mean)
    assert "response.psf_fwhm" in dict(sim.named_parameters())


def test_psf_width_group_needs_a_psf():
    from torchbragg.models import DetectorResponse
    from torchbragg.refine.parameters import Parametrisation

    class Holder(torch.nn.Module):
        def __init__(self, response):
            super().__init__()
            self.response = response

    with pytest.raises(ValueError, match="point-spread function"):
        Parametrisation(["psf_width"], Holder(DetectorResponse(gain=2.0)))


# ----------------------------------------------------------------------------- torchbragg simulate

RESPONSE = ["-psf", "gauss", "-psf_fwhm", "300", "-readout", "2", "-gain", "1.5", "-adc_offset", "10",
            "-calibration_noise", "1", "-seed", "3"]
SCENE = ["-N", "4", "-default_F", "100", "-water", "100", "-fluence", "1e25"]


@pytest.fixture(scope="module")
def still(tmp_path_factory):
    import golden
    folder = tmp_path_factory.mktemp("still")
    rc, text = golden.run_cli(["-cell", "70", "80", "90", "75", "85", "95", "-lambda", "1.2", "-distance", "100",
                               "-detpixels", "48", "-misset", "10", "20", "30", "-pixel", "0.2", "-N", "4",
                               "-default_F", "100", "-floatfile", "x.bin", "-nonoise", "-nopgm",
                               "-write_expt", "one.expt"], folder)
    assert rc == 0, text
    return folder


def _simulate(argv, cwd):
    import contextlib
    import os

    from torchbragg.commands.simulate import run
    old = os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(io.StringIO()):
            return run(argv)
    finally:
        os.chdir(old)


def test_simulate_writes_detector_readings_as_cbf_and_nxmx(still):
    """A frame with water background, Gaussian PSF, gain, offset, calibration
    error and read-out noise: the CBF (fabio) and the NXmx (nxmx) hold the
    same readings as the npy, whose statistics match the response model."""
    import fabio
    import h5py
    nxmx = pytest.importorskip("nxmx")
    from torchbragg.models import DetectorResponse
    for fmt in ("npy", "cbf", "nxs", "smv"):
        assert _simulate(["one.expt", "--out", f"r_{fmt}", "--quiet", "--format", fmt, *SCENE, *RESPONSE], still) == 0
    assert _simulate(["one.expt", "--out", "photons", "--quiet", *SCENE, "-nonoise"], still) == 0
    readings = np.load(still / "r_npy_00001.npy")
    assert readings.dtype == np.int32 and readings.shape == (1, 48, 48)
    assert np.array_equal(fabio.open(str(still / "r_cbf_00001.cbf")).data, readings[0])
    with h5py.File(still / "r_nxs.nxs", "r") as fh:
        (entry,) = nxmx.NXmx(fh).entries
        (data,) = entry.data
        frames = data[data.signal][()]
    assert np.array_equal(np.asarray(frames)[0], readings[0])
    from torchbragg.io.smv import read_smv
    assert np.array_equal(read_smv(still / "r_smv_00001.img")[1], np.clip(readings[0], 0, 65535))

    photons = torch.as_tensor(np.load(still / "photons_00001.npy")[0], dtype=torch.float64)
    assert 500 < float(photons.mean()) < 5000  # water background
    r = DetectorResponse(gain=1.5, adc_offset=10.0, readout_noise=2.0, psf="gauss", psf_fwhm=0.3, pixel_size=0.2,
                         dtype=torch.float64)
    mean = r.expectation(photons, (0.2, 0.2))[4:-4, 4:-4]
    got = torch.as_tensor(readings[0], dtype=torch.float64)[4:-4, 4:-4]
    # readings are floored: mean - 0.5; 1 % calibration error on top of the photon noise
    assert float((got - mean + 0.5).mean()) == pytest.approx(0.0, abs=0.02 * float(mean.mean()) / 10)
    assert 0.3 < float((got - mean).std() / (1.5 * 0.01 * mean.mean())) < 3


@pytest.mark.parametrize("flags, words", [
    (["-psf_fwhm", "100"], "-psf_fwhm and -psf_radius need -psf"),
    (["-psf", "box"], "-psf expects gauss or fiber"),
    (["-gain", "0"], "-gain must be positive"),
    (["-readout", "-1"], "-readout must be non-negative"),
    (["-calibration_noise", "x"], "-calibration_noise expects a number"),
])
def test_simulate_refuses_bad_response_flags(flags, words, still, capsys):
    from torchbragg.commands.simulate import main
    assert main([str(still / "one.expt"), "--out", str(still / "bad"), "--quiet", *SCENE, *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not list(still.glob("bad*"))


def test_sampling_keeps_the_kernel_spectrum_and_blurs_the_same():
    from torchbragg.models import DetectorResponse
    r = DetectorResponse(psf="fiber", psf_fwhm=0.2, psf_radius=5, dtype=torch.float64)
    img = torch.as_tensor(_spots(), dtype=torch.float64)
    assert torch.allclose(r._fixed_blur(img, (0.1, 0.1)), r.blur(img, (0.1, 0.1)), rtol=0, atol=1e-9)
    first = r._spectrum_cache[1]
    r._fixed_blur(img, (0.1, 0.1))
    assert r._spectrum_cache[1] is first
    with torch.no_grad():
        r.psf_fwhm.fill_(0.3)  # a new width: a new spectrum
    assert torch.allclose(r._fixed_blur(img, (0.1, 0.1)), r.blur(img, (0.1, 0.1)), rtol=0, atol=1e-9)
    assert r._spectrum_cache[1] is not first


def test_gaussian_likelihood_matches_the_response_in_adu_above_the_offset():
    """refine.losses.gaussian_nll's variance (gain * model + read_noise^2)
    is the response's when model and data are ADU above the offset (model =
    gain * photons): gain^2 * photons + read-out^2."""
    from torchbragg.models import DetectorResponse
    from torchbragg.refine.losses import gaussian_nll
    photons = torch.tensor([[3.0, 40.0], [250.0, 0.5]], dtype=torch.float64)
    r = DetectorResponse(gain=2.5, adc_offset=40.0, readout_noise=3.0, dtype=torch.float64)
    mean, var = r.expectation(photons, (0.1, 0.1)), r.variance(photons, (0.1, 0.1))
    data = mean + torch.tensor([[1.0, -4.0], [20.0, 2.0]], dtype=torch.float64)
    got = gaussian_nll(mean - 40.0, data - 40.0, read_noise=3.0, gain=2.5)
    want = 0.5 * (torch.log(var) + (data - mean) ** 2 / var).sum()
    assert float(got) == pytest.approx(float(want), rel=1e-12)


def test_header_flag_copies_the_header_and_takes_its_size(golden, tmp_path, monkeypatch, capsys):
    """-header: the outputs carry that file's 512-byte header, and its SIZE1/SIZE2
    and PIXEL_SIZE replace the guesses (the input given as the positional argument)."""
    src = golden / "psf_gauss"
    shutil.copy(src / "noise.img", tmp_path / "hdr.img")
    monkeypatch.chdir(tmp_path)
    np.ones(128 * 128, dtype="<f4").tofile("flat.bin")
    assert cmd.main(["flat.bin", "-header", "hdr.img", "-seed", "2", "-calibration", "0", "-adc", "0"]) == 0
    head = (src / "noise.img").read_bytes()[:512]
    for name in ("intimage.img", "noiseimage.img"):
        raw = Path(name).read_bytes()
        assert raw[:512] == head and len(raw) == 512 + 2 * 128 * 128
    noisy = np.frombuffer(Path("noiseimage.img").read_bytes()[512:], dtype="<u2")
    assert noisy.mean() == pytest.approx(1.0, abs=0.05)  # Poisson photons of mean 1
    assert "pixel=0.00025 meters (128x128 pixels)" in capsys.readouterr().out


def test_calibration_error_differs_between_panels():
    from torchbragg.models import DetectorResponse
    r = DetectorResponse(calibration_noise=0.05, calibration_seed=3, dtype=torch.float64)
    cal = r.calibration((2, 30, 40))
    assert not torch.allclose(cal[0], cal[1])
    reading = r.sample(torch.full((2, 30, 40), 1e6, dtype=torch.float64), (0.1, 0.1))
    assert float(torch.corrcoef(torch.stack([reading[1].flatten(), cal[1].flatten()]))[0, 1]) > 0.9
