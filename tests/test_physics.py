"""First-principles checks where the original has no reference output."""

import math

import numpy as np
import pytest
import torch

from torchbragg import Simulator
from torchbragg import physics as ph

BASE = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-lambda", "1.0",
        "-distance", "100", "-pixel", "0.1", "-oversample", "1"]


def render(args, dtype="float64"):
    sim = Simulator.from_args(BASE + args + ["-dtype", dtype])
    with torch.no_grad():
        return sim.render()[0].numpy(), sim


def test_reflection_lands_where_braggs_law_puts_it():
    # rotate the crystal so (0 5 0) is exactly in diffraction: sin(theta) = lambda / 2d, d = 20 A
    theta = math.asin(1.0 / (2 * 20.0))
    img, sim = render(["-N", "20", "-misset", "0", "0", f"{math.degrees(theta):.10f}",
                       "-detpixels", "128", "-Xbeam", "14.0", "-Ybeam", "6.4"])
    # MOSFLM: slow runs along -y; the ray at 2theta in the xy plane meets the detector
    # 100 tan(2theta) mm from the (off-detector) direct beam
    y = 100.0 * math.tan(2 * theta)
    fbeam, sbeam = 6.4 + 0.05, 14.0 + 0.05
    want_fast = fbeam / 0.1 - 0.5
    want_slow = (sbeam - y) / 0.1 - 0.5
    s0, f0 = int(round(want_slow)), int(round(want_fast))
    near = img[s0 - 4:s0 + 5, f0 - 4:f0 + 5]
    s, f = np.unravel_index(np.argmax(near), near.shape)
    s, f = s + s0 - 4, f + f0 - 4
    win = img[s - 2:s + 3, f - 2:f + 3]
    ss, ff = np.mgrid[s - 2:s + 3, f - 2:f + 3]
    cs, cf = (win * ss).sum() / win.sum(), (win * ff).sum() / win.sum()
    assert abs(cf - want_fast) <= 0.5
    assert abs(cs - want_slow) <= 0.5
    # and it is a full-strength Bragg spot, not the tail of another one
    assert img[s, f] > 0.2 * img.max()


def _centre_pixel(args):
    # beam on the centre of pixel (16, 16): Fbeam = Ybeam + half a pixel under MOSFLM
    img, _ = render(args + ["-detpixels", "32", "-Xbeam", "1.6", "-Ybeam", "1.6"])
    return img[16, 16]


def test_peak_intensity_scales_as_n6_and_f2():
    i1 = _centre_pixel(["-N", "1"])
    i2 = _centre_pixel(["-N", "2"])
    i3 = _centre_pixel(["-N", "3"])
    assert i2 / i1 == pytest.approx(2 ** 6, rel=1e-9)
    assert i3 / i1 == pytest.approx(3 ** 6, rel=1e-9)
    f200 = _centre_pixel(["-N", "2", "-default_F", "200"])
    assert f200 / i2 == pytest.approx(4.0, rel=1e-9)


def test_absolute_scale_at_the_direct_beam():
    # r_e^2 * fluence * F^2 * N^6 * (pixel/distance)^2, polarization 1 in the forward direction
    i = _centre_pixel(["-N", "2"])
    want = ph.R_E_SQR * 125932015286227086360700780544.0 * 100.0 ** 2 * 2 ** 6 * (0.1 / 100.0) ** 2
    assert i == pytest.approx(want, rel=1e-9)


def test_solid_angle_limits():
    px, d = torch.tensor(1e-4, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    for tilt in (0.0, 0.3, 0.7):
        r = d / math.cos(tilt)
        omega = ph.solid_angle(px * px, r, d, point_pixel=False)
        assert float(omega) == pytest.approx(float(px ** 2 / d ** 2) * math.cos(tilt) ** 3, rel=1e-12)
        # a point pixel keeps 1/R^2 with R in metres, R given in mm
        assert float(ph.solid_angle(px * px, r, d, point_pixel=True)) == pytest.approx(1e6 / float(r) ** 2, rel=1e-12)


def test_polarization_limits():
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    inc, e_vec = t([1.0, 0, 0]), t([0, 0, 1.0])
    forward = ph.polarization_factor(t(0.9), inc, inc, e_vec)
    assert float(forward) == pytest.approx(1.0)
    along_e = t([0, 0, 1.0])  # 2theta = 90 degrees in the plane of the E-vector
    across_e = t([0, 1.0, 0])
    assert float(ph.polarization_factor(t(1.0), inc, along_e, e_vec)) == pytest.approx(0.0, abs=1e-12)
    assert float(ph.polarization_factor(t(1.0), inc, across_e, e_vec)) == pytest.approx(1.0)
    assert float(ph.polarization_factor(t(0.0), inc, along_e, e_vec)) == pytest.approx(0.5)


def test_capture_fractions_add_up_to_the_absorbed_fraction():
    mu, step, layers = torch.tensor(1 / 500e-6), torch.tensor(100e-6), torch.arange(4.0)
    parallax = torch.tensor(0.8)
    total = ph.capture_fraction(layers, step, mu, parallax).sum()
    assert float(total) == pytest.approx(1 - math.exp(-4 * 100e-6 / 500e-6 / 0.8), rel=1e-6)


PARAMS = ["crystal.cell", "crystal.misset", "detector.panels.0.frame.distance",
          "detector.panels.0.frame.beam_center", "beam.wavelength", "beam.fluence", "beam.direction",
          "beam.polarization_fraction", "scan.oscillation"]


@pytest.mark.parametrize("name", PARAMS)
def test_image_sum_has_a_gradient(name):
    sim = Simulator.from_args(["-cell", "70", "80", "90", "80", "95", "100", "-default_F", "100", "-N", "3",
                               "-lambda", "1.0", "-distance", "80", "-detpixels", "48", "-pixel", "0.2",
                               "-misset", "5", "10", "15", "-oversample", "1", "-dtype", "float64",
                               "-phi", "1", "-osc", "0.5", "-polar", "0.5"])
    p = sim.get_parameter(name).requires_grad_(True)
    sim.render().sum().backward()
    assert p.grad is not None
    assert torch.isfinite(p.grad).all()
    assert (p.grad != 0).any()
