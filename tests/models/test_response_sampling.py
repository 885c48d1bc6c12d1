"""DetectorResponse.sample: the compiled CPU passes (Poisson photons; blur,
gain, offset, read-out noise, overload) against the distributions they draw
from, and against the torch path that other devices take."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from torchbragg.models import DetectorResponse
from torchbragg.models import response as response_module

needs_compiled = pytest.mark.skipif(response_module._C is None, reason="_noise.c was not built")
PIX = (0.1, 0.1)


@pytest.fixture(params=["compiled", "torch"])
def path(request, monkeypatch):
    """Every statistical test runs on both paths."""
    if request.param == "compiled":
        if response_module._C is None:
            pytest.skip("_noise.c was not built")
    else:
        monkeypatch.setattr(response_module, "_C", None)
    return request.param


def _poisson_chi2_pvalue(counts: np.ndarray, lam: float) -> float:
    """Chi-square of the counts against the Poisson pmf of mean lam, over
    bins of at least ~20 expected counts (tails pooled)."""
    counts = counts.ravel()
    n = counts.size
    lo, hi = int(stats.poisson.ppf(1e-6, lam)), int(stats.poisson.ppf(1 - 1e-6, lam))
    edges = [lo]  # bins [edges[i], edges[i+1]) of at least 20 expected counts
    while edges[-1] <= hi:
        k = edges[-1] + 1
        while k <= hi and n * (stats.poisson.cdf(k - 1, lam) - stats.poisson.cdf(edges[-1] - 1, lam)) < 20:
            k += 1
        edges.append(k)
    cdf = stats.poisson.cdf(np.array(edges) - 1, lam)
    prob = np.diff(cdf)
    prob[0] += cdf[0]  # the lower tail into the first bin
    prob[-1] += 1.0 - cdf[-1]  # the upper tail into the last
    idx = np.clip(np.searchsorted(edges, counts, side="right") - 1, 0, len(prob) - 1)
    observed = np.bincount(idx, minlength=len(prob))
    expected = n * prob
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    return float(stats.chi2.sf(chi2, len(prob) - 1))


@pytest.mark.parametrize("lam", [0.05, 1.0, 2.4, 2.6, 9.9, 10.1, 40.0, 1e3, 3e4, 1e6])
def test_poisson_counts_follow_the_pmf(path, lam):
    r = DetectorResponse(dtype=torch.float64)
    counts = r.sample(torch.full((400, 500), lam, dtype=torch.float64), PIX, torch.Generator().manual_seed(11))
    c = counts.numpy()
    assert np.all(c == np.round(c)) and c.min() >= 0
    assert _poisson_chi2_pvalue(c, lam) > 1e-3
    # the test has power: the same counts are far from a mean 1 % off
    if lam >= 40:
        assert _poisson_chi2_pvalue(c, lam * 1.01) < 1e-6


def test_poisson_photons_times_calibration_factor(path):
    """The calibration factor scales the mean before the Poisson draw; negative photons read 0."""
    r = DetectorResponse(calibration_noise=0.2, calibration_seed=5, dtype=torch.float64)
    photons = torch.full((300, 400), 50.0, dtype=torch.float64)
    photons[0] = -3.0
    counts = r.sample(photons, PIX, torch.Generator().manual_seed(2))
    assert torch.all(counts[0] == 0)
    want = 50.0 * r.calibration(photons.shape, torch.float64)[1:]
    z = (counts[1:] - want) / want.sqrt()  # standardised per pixel
    assert abs(float(z.mean())) < 4 / math.sqrt(z.numel())
    assert float(z.var()) == pytest.approx(1.0, abs=4 * math.sqrt(2 / z.numel()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_readout_gain_offset_moments(path, dtype):
    """gain * Poisson(lam) + offset + readout N(0, 1): mean, variance, and the
    third and fourth cumulants (gain^3 lam and gain^4 lam)."""
    lam, gain, off, ro = 4.0, 2.5, 40.0, 3.0
    r = DetectorResponse(gain=gain, adc_offset=off, readout_noise=ro, dtype=dtype)
    x = r.sample(torch.full((1000, 1000), lam, dtype=dtype), PIX, torch.Generator().manual_seed(3))
    assert x.dtype == dtype
    x = x.double().flatten()
    n = x.numel()
    var = gain ** 2 * lam + ro ** 2
    d = x - x.mean()
    k3 = float((d ** 3).mean())
    k4 = float((d ** 4).mean()) - 3 * float(d.var()) ** 2
    assert abs(float(x.mean()) - (gain * lam + off)) < 4 * math.sqrt(var / n)
    assert float(x.var()) == pytest.approx(var, rel=4 * math.sqrt(2 / n) * 1.2)
    assert k3 == pytest.approx(gain ** 3 * lam, abs=0.1 * gain ** 3 * lam)
    assert k4 == pytest.approx(gain ** 4 * lam, abs=0.3 * gain ** 4 * lam)


def test_readout_noise_is_normal_into_the_tails(path):
    """Zero photons: offset + readout N(0, 1), binned from -5.5 to 5.5 sigma
    (the ziggurat's tail beyond 3.65 sigma included) against the normal."""
    r = DetectorResponse(adc_offset=10.0, readout_noise=2.0, dtype=torch.float64)
    z = ((r.sample(torch.zeros(1000, 2000, dtype=torch.float64), PIX, torch.Generator().manual_seed(4)) - 10.0)
         / 2.0).numpy().ravel()
    edges = np.concatenate([[-np.inf], np.linspace(-4.5, 4.5, 91), [np.inf]])
    observed = np.histogram(z, edges)[0]
    expected = z.size * np.diff(stats.norm.cdf(edges))
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert stats.chi2.sf(chi2, len(expected) - 1) > 1e-3
    beyond = int((np.abs(z) > 3.6541528853610088).sum())
    want = z.size * 2 * stats.norm.sf(3.6541528853610088)
    assert abs(beyond - want) < 5 * math.sqrt(want)


@needs_compiled
def test_compiled_reading_is_the_same_on_any_number_of_threads():
    r = DetectorResponse(gain=1.3, adc_offset=40.0, readout_noise=3.0, psf="gauss", psf_fwhm=0.2, psf_radius=3,
                         calibration_noise=0.03)
    photons = torch.rand(2, 157, 263, generator=torch.Generator().manual_seed(0)) * 20
    threads = torch.get_num_threads()
    try:
        readings = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            readings.append(r.sample(photons, PIX, torch.Generator().manual_seed(9)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(readings[0], readings[1]) and torch.equal(readings[0], readings[2])
    other = r.sample(photons, PIX, torch.Generator().manual_seed(10))
    assert not torch.equal(readings[0], other)
    assert not torch.equal(readings[0][0], readings[0][1])  # panels draw their own


@needs_compiled
@pytest.mark.parametrize("psf,radius", [("gauss", 3), ("gauss", 12), ("gauss", 20), ("fiber", 5)])
@pytest.mark.parametrize("shape", [(61, 83), (2, 45, 70)])
def test_compiled_blur_equals_the_models_expectation(monkeypatch, psf, radius, shape):
    """With the Poisson step replaced by the identity and no read-out noise,
    a compiled reading is the model's expectation: the compiled separable
    Gaussian (radius up to 12) and the FFT blur agree with the FFT."""
    monkeypatch.setattr(response_module, "_poisson_compiled", lambda p, factor, seed: p.contiguous().clone())
    r = DetectorResponse(gain=1.7, adc_offset=5.0, psf=psf, psf_fwhm=0.25, psf_radius=radius, dtype=torch.float64)
    photons = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 100
    photons[..., 0, 0] = 1e5  # a spot on the corner: what leaves the edges is lost
    got = r.sample(photons, (0.1, 0.12))
    want = r.expectation(photons, (0.1, 0.12))
    assert torch.allclose(got, want, rtol=0, atol=1e-9)
    r.overload = 1e3
    assert torch.allclose(r.sample(photons, (0.1, 0.12)), torch.clamp(want, max=1e3), rtol=0, atol=1e-9)
