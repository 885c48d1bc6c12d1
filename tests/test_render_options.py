"""What varies per render is an argument, never a change to the simulator:
scan image, still, a substituted beam (spectrum) or orientation."""

import copy

import numpy as np
import torch
from torch.func import functional_call

from torchbragg.dataset import Renderer, Shot, spectrum_beam
from torchbragg.io.dials import Experiment
from torchbragg.models import Scan
from torchbragg.simulator import Simulator

FLAGS = ("-cell 60 70 80 90 90 90 -misset 10 20 30 -default_F 100 -N 6 -lambda 1 -distance 60 "
         "-detpixels 24 -pixel 0.8 -oversample 1 -phi 0 -osc 3 -phisteps 2").split()


def rotating():
    sim = Simulator.from_args(FLAGS, dtype=torch.float64)
    sim.scan = Scan((1, 3), (0.0, 3.0), dtype=torch.float64)
    return sim


def test_scan_image_and_still_are_render_arguments():
    sim = rotating()
    before = {k: v.clone() for k, v in sim.state_dict().items()}
    with torch.no_grad():
        first, third = sim(1), sim(3)
        still = sim(3, still=True)
        bare = copy.deepcopy(sim)
        bare.goniometer = bare.scan = None
        expected_still = bare()
    assert not torch.allclose(first, third)  # the crystal turned 6 degrees
    torch.testing.assert_close(still, expected_still, rtol=1e-12, atol=0)
    assert sim.goniometer is not None and sim.scan is not None
    assert all(torch.equal(v, sim.state_dict()[k]) for k, v in before.items())


def test_substituted_beam_and_orientation():
    sim = Simulator.from_args(FLAGS[:-6], dtype=torch.float64)
    other = spectrum_beam(sim.beam, [0.98, 1.02], [1.0, 2.0])
    with torch.no_grad():
        got = sim(beam=other)
        ref = Simulator(other, sim.crystal, sim.detector, options=sim.options)()
        U0 = sim.crystal.U.clone()
        R = torch.as_tensor(np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
        turned = functional_call(sim, {"crystal.U": R @ sim.crystal.U}, ())
        plain = sim()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    assert not torch.allclose(got, plain)
    assert not torch.allclose(turned, plain)
    assert torch.equal(sim.crystal.U, U0) and sim.beam.sources()[1].numel() == 1


def test_dataset_renderer_leaves_its_simulators_unchanged():
    sim = rotating()
    experiment = Experiment(beam=sim.beam, detector=sim.detector, crystal=sim.crystal, goniometer=sim.goniometer,
                            scan=sim.scan)
    from torchbragg.flags import parse_args
    r = Renderer([experiment], parse_args("-default_F 100 -N 6 -oversample 1 -phisteps 2".split()), dtype=torch.float64)
    built = r.simulator(0)
    U0 = built.crystal.U.clone()
    beam0 = built.beam
    turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    a = r.render(Shot(1, 0, None, turn, ([0.98, 1.02], [1.0, 2.0])))
    b = r.render(Shot(2, 0, None, None, None))
    c = r.render(Shot(3, 0, 2, None, None))
    assert torch.equal(built.crystal.U, U0) and built.beam is beam0
    assert built.goniometer is not None and built.scan is not None
    assert not np.allclose(a, b) and not np.allclose(b, c)
    again = r.render(Shot(2, 0, None, None, None))
    np.testing.assert_array_equal(again, b)


def test_rendering_a_pixel_list_gives_those_pixels_of_the_image():
    """Simulator(pixels=mask) computes only the pixels of the mask (no full
    frame) and returns image[mask], with and without gradients, float32 and
    float64; the panel's own mask still zeroes its pixels."""
    g = np.random.default_rng(3)
    for dtype in (torch.float64, torch.float32):
        sim = rotating().to(dtype)
        mask = torch.as_tensor(g.random((1, 24, 24)) < 0.3)
        with torch.no_grad():
            full = sim(2)
            part = sim(2, pixels=mask)
        torch.testing.assert_close(part, full[mask], rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
        n = sim.crystal.N.detach().clone().requires_grad_(True)
        (g_full,) = torch.autograd.grad(functional_call(sim, {"crystal.N": n}, (2,))[mask].sum(), n)
        (g_part,) = torch.autograd.grad(functional_call(sim, {"crystal.N": n}, (2,), dict(pixels=mask)).sum(), n)
        torch.testing.assert_close(g_part, g_full, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)
    sim = rotating()
    bad = torch.ones(24, 24, dtype=torch.bool)
    bad[:5] = False
    sim.detector.panels[0].set_mask(bad)
    with torch.no_grad():
        part = sim(1, pixels=torch.ones(1, 24, 24, dtype=torch.bool))
    assert bool((part.reshape(24, 24)[:5] == 0).all()) and bool((part.reshape(24, 24)[5:] > 0).any())
