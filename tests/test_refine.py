"""Refinement API: gradients of losses and parametrisations, recovery of
scale, orientation and cell on small noisy stills, and input checks."""

import math

import numpy as np
import pytest
import torch

from torchbragg.dataset import photon_counts
from torchbragg.refine import (Entry, Parametrisation, Refiner, crystal_system, gaussian_nll, poisson_nll, refine,
                               roi_mask)
from torchbragg.simulator import Simulator

ARGS = ("-cell 60 70 80 90 90 90 -misset 10 20 30 -default_F 100 -N 12 -lambda 1 -distance 80 "
        "-detpixels 128 -pixel 0.2 -oversample 1 -fluence 1e26").split()


def still(args=ARGS, dtype=torch.float64):
    return Simulator.from_args(list(args), dtype=dtype)


def noisy(sim, seed, background=2.0):
    with torch.no_grad():
        image = sim.render() + background
    return photon_counts(image.numpy(), seed, 1)


def misorientation(a, b):
    """Angle (degrees) of the rotation between two crystals' orientations."""
    qa = np.linalg.qr(a.crystal.real_vectors().detach().numpy().T)[0]
    qb = np.linalg.qr(b.crystal.real_vectors().detach().numpy().T)[0]
    r = qa @ qb.T
    return math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(r) - 1) / 2))))


# ----------------------------------------------------------------------------- (a) gradients

def test_losses_gradcheck():
    g = torch.Generator().manual_seed(0)
    model = (torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 5 + 0.5).requires_grad_()
    data = torch.poisson(model.detach(), generator=g)
    mask = torch.rand(2, 3, 4, generator=g) > 0.3
    assert torch.autograd.gradcheck(lambda m: poisson_nll(m, data, mask), (model,))
    rn = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    gain = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, r, k: gaussian_nll(m, data, mask, r, k), (model, rn, gain))


def test_poisson_nll_value():
    model = torch.tensor([[[2.0, 3.0]]], dtype=torch.float64)
    data = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    a = poisson_nll(model, data)
    b = poisson_nll(model * 1.1, data)
    direct = lambda m: (m - data * torch.log(m)).sum()
    assert float(a - b) == pytest.approx(float(direct(model) - direct(model * 1.1)), rel=1e-12)


@pytest.mark.parametrize("groups", [["orientation", "cell", "scale", "N"], ["distance", "beam_centre", "wavelength",
                                                                         "background"]])
def test_parametrisation_gradcheck(groups):
    sim = still(ARGS[:-8] + "-detpixels 10 -pixel 1.6 -oversample 1".split())
    data = torch.as_tensor(noisy(sim, 3), dtype=torch.float64)
    r = Refiner([Entry(sim, data, "all")], groups, strategy=None, uncertainties=False)
    x0 = (torch.randn(r.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2)

    def f(x):
        return r.objective(x)

    assert torch.autograd.gradcheck(f, (x0.requires_grad_(),), eps=1e-4, atol=1e-4, rtol=1e-3, fast_mode=True)


def test_symmetry_of_cell_groups():
    assert crystal_system(" P 1") == "triclinic"
    assert crystal_system("P 2ac 2ab") == "orthorhombic"
    assert crystal_system("P 2y") == "monoclinic-b"
    assert crystal_system("P 4") == "tetragonal"
    assert crystal_system("P 2 2 3") == "cubic"
    sim = still()
    sim.crystal.space_group = "P 4"
    p = Parametrisation(["cell"], sim)
    assert p.labels == ["cell.a", "cell.c"]
    cell = p.physical(sim, torch.tensor([5.0, -3.0], dtype=torch.float64))
    assert float(cell[0]) == pytest.approx(60 * math.exp(5e-3))
    assert float(cell[1]) == pytest.approx(70 * math.exp(5e-3))
    assert float(cell[2]) == pytest.approx(80 * math.exp(-3e-3))
    assert cell[3:].tolist() == [90.0, 90.0, 90.0]


def test_orientation_turns_about_lab_axes():
    sim = still()
    p = Parametrisation(["orientation"], sim)
    x = torch.tensor([0.0, 0.0, 50.0], dtype=torch.float64)  # 0.5 degree about lab z
    subs = p.substitutions(sim, x)
    real0 = sim.crystal.real_vectors()
    with torch.no_grad():
        u0 = sim.crystal.U.clone()
        sim.crystal.U.copy_(subs["crystal.U"])
        real1 = sim.crystal.real_vectors()
        sim.crystal.U.copy_(u0)
    c, s = math.cos(math.radians(0.5)), math.sin(math.radians(0.5))
    rz = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    assert torch.allclose(real1, real0 @ rz.T, atol=1e-10)


# ----------------------------------------------------------------------------- (b, c) recovery

def test_recover_scale_and_orientation():
    truth = still()
    data = noisy(truth, 11)
    sim = still()
    with torch.no_grad():
        sim.crystal.misset += torch.tensor([0.06, -0.05, 0.06], dtype=torch.float64)  # about 0.1 degree
        sim.beam.fluence *= 1.2
    assert misorientation(sim, truth) > 0.08
    res = refine(sim, data, ["scale", "orientation", "background"])
    assert res.converged
    assert misorientation(sim, truth) < 0.02
    assert float(sim.beam.fluence / truth.beam.fluence) == pytest.approx(1.0, abs=0.05)
    assert res.renders < 400
    sig = res.value("rotation.x").sigma
    assert 1e-4 < sig < 0.05


def test_recover_scale_alone():
    truth = still()
    data = noisy(truth, 12, background=0.0)
    sim = still()
    with torch.no_grad():
        sim.beam.fluence *= 1.5
    res = refine(sim, data, ["scale"])
    assert res.converged
    f = res.value("fluence")
    assert f.value / float(truth.beam.fluence) == pytest.approx(1.0, abs=3 * f.sigma / f.value + 1e-3)
    assert float(sim.beam.fluence) == pytest.approx(f.value)


def test_recover_orthorhombic_cell():
    truth = still()
    truth.crystal.space_group = "P 2ac 2ab"
    data = noisy(truth, 13)
    sim = still()
    sim.crystal.space_group = "P 2ac 2ab"
    with torch.no_grad():
        sim.crystal.cell[:3] *= torch.tensor([1.003, 0.997, 1.003], dtype=torch.float64)
    res = refine(sim, data, ["scale", "orientation", "cell", "background"])
    cell = sim.crystal.cell.detach()
    assert torch.allclose(cell[:3], torch.tensor([60.0, 70.0, 80.0], dtype=torch.float64), rtol=1e-3)
    assert cell[3:].tolist() == [90.0, 90.0, 90.0]
    assert [p.name for p in res.parameters if p.group == "cell"] == ["a", "b", "c", "alpha", "beta", "gamma"]
    assert res.value("alpha").value == 90.0


# ----------------------------------------------------------------------------- (e) bad input

def test_bad_input():
    sim = still()
    data = np.zeros((1, 128, 128))
    with pytest.raises(ValueError, match="unknown parameter group 'orientaton'"):
        refine(sim, data, ["orientaton"])
    with pytest.raises(ValueError, match="does not match"):
        refine(sim, np.zeros((1, 100, 128)), ["scale"])
    with pytest.raises(ValueError, match="unknown loss"):
        refine(sim, data, ["scale"], loss="cauchy")
    with pytest.raises(ValueError, match="no parameter 'cell.q'"):
        refine(sim, data, ["scale"], priors={"cell.q": (0, 1)})
    with pytest.raises(ValueError, match="mosaic"):
        refine(sim, data, ["mosaic"])
    with pytest.raises(ValueError, match="panels"):
        refine(sim, data, ["panels"])
    with pytest.raises(ValueError, match="roi shape"):
        refine(sim, data, ["scale"], roi=torch.ones(1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="no parameter groups"):
        refine(sim, data, [])


def test_roi_is_small_and_covers_spots():
    sim = still()
    data = noisy(sim, 5)
    mask = roi_mask(sim, data)
    with torch.no_grad():
        image = sim.render()
    assert mask.dtype == torch.bool and mask.shape == image.shape
    assert bool(mask[image > 0.2 * image.max()].all())
    assert float(mask.float().mean()) < 0.35


# ----------------------------------------------------------------------------- detector groups

def frame_copy(sim):
    """The same experiment with its detector as a DIALS-style Frame panel."""
    import copy

    from torchbragg.models import Detector, Frame, Panel
    with torch.no_grad():
        g = sim.detector.panels[0].frame.geometry(sim.beam.incident())
        p = sim.detector.panels[0]
        panel = Panel(Frame(g["pix0"], g["fdet"], g["sdet"], dtype=torch.float64), p.image_size,
                      p.pixel_size.detach().clone(), dtype=torch.float64)
    return Simulator(copy.deepcopy(sim.beam), copy.deepcopy(sim.crystal), Detector([panel], dtype=torch.float64),
                     copy.deepcopy(sim.goniometer), copy.deepcopy(sim.scan), options=copy.deepcopy(sim.options),
                     recommended=sim.recommended_oversample)


@pytest.mark.parametrize("group, x", [("distance", [50.0]), ("beam_centre", [70.0, -40.0])])
def test_detector_groups_agree_between_mounts(group, x):
    from torch.func import functional_call
    mount = still(ARGS[:-8] + "-detpixels 48 -pixel 0.5 -oversample 1".split())
    frame = frame_copy(mount)
    x = torch.tensor(x, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(mount.render(), frame.render(), rtol=1e-6, atol=1e-6)
        images = [functional_call(s, Parametrisation([group], s).substitutions(s, x), ()) for s in (mount, frame)]
    assert not torch.allclose(images[0], mount.render().detach(), rtol=1e-3)
    assert torch.allclose(images[0], images[1], rtol=1e-6, atol=1e-6 * float(images[0].max()))


def test_panels_group_moves_frame_panels():
    frame = frame_copy(still(ARGS[:-8] + "-detpixels 16 -pixel 1.0 -oversample 1".split()))
    p = Parametrisation(["panels"], frame)
    assert p.labels == ["panel.0.x", "panel.0.y", "panel.0.z", "panel.0.rx", "panel.0.ry", "panel.0.rz"]
    subs = p.substitutions(frame, torch.tensor([100.0, 0, 0, 0, 0, 1.0], dtype=torch.float64))
    origin0 = frame.detector.panels[0].frame.origin.detach()
    assert torch.allclose(subs["detector.panels.0.frame.origin"] - origin0,
                          torch.tensor([1.0, 0, 0], dtype=torch.float64))
    assert float(subs["detector.panels.0.frame.orientation"][2]) == pytest.approx(math.radians(0.01))


def test_recover_scale_with_gaussian_loss():
    truth = still()
    data = noisy(truth, 14, background=0.0)
    sim = still()
    with torch.no_grad():
        sim.beam.fluence *= 0.7
    res = refine(sim, data, ["scale"], loss="gaussian", loss_options=dict(read_noise=0.5, gain=1.0))
    assert res.converged
    # a Gaussian likelihood of Poisson counts is biased low at a few photons per pixel
    assert float(sim.beam.fluence / truth.beam.fluence) == pytest.approx(0.97, abs=0.05)


def test_fisher_diagonal_estimates_the_information():
    """The random-sign estimate of diag(J^T W J) agrees with the exact one."""
    from torchbragg.refine.refiner import fisher_diagonal
    g = torch.Generator().manual_seed(3)
    J = torch.randn(400, 3, generator=g, dtype=torch.float64)
    v = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    expected = torch.exp(J @ v) * 5.0
    mu = expected.detach()
    exact = ((J * mu[:, None]) ** 2 / mu[:, None]).sum(0)
    estimate = fisher_diagonal(expected, v, samples=400)
    assert torch.allclose(estimate, exact, rtol=0.15)
    assert (fisher_diagonal(torch.exp(J @ v), v, samples=4) > 0).all()


def test_automatic_oversampling_follows_refined_n():
    """With automatic oversampling, a fit that moves N far re-derives the
    sub-pixel count for the refined crystal."""
    from torchbragg.simulator import recommended_oversample
    args = ARGS[:-6] + "-N 5 -detpixels 96 -pixel 0.25 -fluence 1e28".split()
    assert "-oversample" not in args
    truth = still(args)
    data = noisy(truth, 21)
    sim = still(args)
    with torch.no_grad():
        sim.crystal.N.fill_(3.5)
    sim.recommended_oversample = sim.oversample = recommended_oversample(sim.crystal, sim.beam, sim.detector)
    assert sim.oversample < truth.oversample
    res = refine(sim, data, ["scale", "background", "N"])
    assert res.converged
    assert float(sim.crystal.N[0]) == pytest.approx(5.0, rel=0.02)
    assert sim.oversample == truth.oversample
    assert res.stages[-2]["oversample"] == truth.oversample
