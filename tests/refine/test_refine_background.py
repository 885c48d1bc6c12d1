"""The radial background group: a piecewise-linear function of the
scattering angle, fitted by Levenberg-Marquardt steps to counts drawn from
a known smooth profile on a tilted detector."""

import math

import numpy as np
import pytest
import torch

from torchbragg.refine.parameters import RadialBackground, pixel_two_theta
from torchbragg.refine.steps import levenberg_marquardt
from torchbragg.simulator import Simulator
from golden import DATA


def detector():
    return Simulator.from_args("-cell 50 50 50 90 90 90 -default_F 1 -distance 80 -detpixels 96 -pixel 0.5 "
                               "-detector_rotx 20".split(), dtype=torch.float64)


def test_two_theta_of_the_pixels():
    sim = detector()
    tth = pixel_two_theta(sim)
    assert tth.shape == (1, 96, 96)
    # the direct beam meets the (tilted) detector: the smallest angle is near zero
    assert float(tth.min()) < math.radians(0.5)
    assert math.radians(20) < float(tth.max()) < math.radians(60)


def test_radial_profile_recovered_from_counts():
    sim = detector()
    tth = pixel_two_theta(sim)
    truth = 40.0 * torch.exp(-tth / 0.25) + 5.0  # air scatter falling off with angle
    data = torch.poisson(truth, generator=torch.Generator().manual_seed(3))
    group = RadialBackground(knots=12).bind(sim)
    mask = torch.ones_like(data, dtype=torch.bool)
    group.start_from(data, torch.zeros_like(data), mask)
    start = group.physical(sim, torch.zeros(12, dtype=torch.float64))
    fit = levenberg_marquardt(lambda x: group.image_term(sim, x, data.shape)[mask], data[mask],
                              torch.zeros(12, dtype=torch.float64))
    assert fit.converged
    model = group.image_term(sim, fit.x, data.shape)
    # the piecewise-linear profile follows the curve within a few percent, the constant does not
    rel = ((model - truth) / truth).abs()
    assert float(rel.max()) < 0.06, float(rel.max())
    assert float(((data.mean() - truth) / truth).abs().max()) > 0.5
    # and the fit is statistically acceptable: half the deviance near half a unit per pixel
    assert abs(fit.loss / data.numel() - 0.5) < 0.05
    assert float((start - group.physical(sim, fit.x)).abs().max()) < 3.0  # the medians start it close
    values = group.physical(sim, fit.x).numpy()
    assert np.all(np.diff(values[values > 0]) < 0.5)  # falling with angle


def test_profile_flags_from_dials_profile_block():
    """DIALS's profile of the measured sweep (sigma_m 0.057, sigma_b 0.091
    degree, 0.1 degree images) becomes a mosaic spread, a divergence FWHM
    in mrad and rotation steps of at most half the rocking width."""
    import json

    from torchbragg.refine.strategy import profile_flags
    doc = json.loads((DATA / "lcys_02" / "23_integrated.expt").read_text())
    profile = doc["profile"][0]
    flags = profile_flags(profile, 0.1)
    values = dict(zip(flags[::2], flags[1::2]))
    assert float(values["-mosaic"]) == pytest.approx(profile["sigma_m"])
    assert float(values["-divergence"]) == pytest.approx(math.radians(profile["sigma_b"]) * 1e3 * 2.3548, rel=1e-3)
    steps = int(values["-phisteps"])
    assert 0.1 / steps <= 0.5 * profile["sigma_m"] < 0.1 / (steps - 1)
    assert profile_flags(None, 0.1) == [] and "-phisteps" not in profile_flags(profile)
