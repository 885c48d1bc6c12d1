"""Joint refinement of several stills with a shared detector: recovery of a
distance offset and of a moved panel of a two-panel detector, with the
per-image orientations, scales and backgrounds free."""

import copy
import math

import numpy as np
import pytest
import torch

from torchbragg.dataset import photon_counts, random_rotations
from torchbragg.models import Detector, Frame, Panel
from torchbragg.refine import Entry, Panels, Refiner, refine_joint
from torchbragg.simulator import RenderOptions, Simulator

ARGS = ("-cell 60 70 80 90 90 90 -default_F 100 -N 12 -lambda 1 -distance 100 -detpixels 128 -pixel 0.2 "
        "-oversample 1 -fluence 4e26").split()
IMAGES = 10
PER_IMAGE = ["scale", "background", "orientation"]


def base_still(args=ARGS):
    return Simulator.from_args(list(args), dtype=torch.float64)


def two_panels(base):
    """The still's detector cut into two 64 x 128 Frame panels side by side."""
    with torch.no_grad():
        g = base.detector.panels[0].frame.geometry(base.beam.incident())
    panels = [Panel(Frame(g["pix0"] + k * 64 * 0.2 * g["fdet"], g["fdet"], g["sdet"], dtype=torch.float64),
                    (64, 128), (0.2, 0.2), dtype=torch.float64) for k in range(2)]
    return Detector(panels, dtype=torch.float64)


def stills(n=IMAGES, seed=0, detector=None, args=ARGS):
    """n simulators with one beam and detector and their own crystal, turned
    by random rotations drawn with `seed`."""
    base = base_still(args)
    det = detector(base) if detector else base.detector
    out = []
    for rot in random_rotations(n, seed):
        crystal = copy.deepcopy(base.crystal)
        with torch.no_grad():
            crystal.U.copy_(torch.as_tensor(rot) @ crystal.U)
        out.append(Simulator(base.beam, crystal, det, options=RenderOptions(oversample=1)))
    return out


def observe(sims, seed):
    with torch.no_grad():
        return [photon_counts((s.render() + 2.0).numpy(), seed + k, 1) for k, s in enumerate(sims)]


def indexing_errors(sims, seed=5, sigma=0.03):
    """Turn each crystal by a random misset (degrees per axis)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for s in sims:
            s.crystal.misset += torch.as_tensor(rng.normal(0.0, sigma, 3))


def misorientation(a, b):
    qa = np.linalg.qr(a.crystal.real_vectors().detach().numpy().T)[0]
    qb = np.linalg.qr(b.crystal.real_vectors().detach().numpy().T)[0]
    return math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(qa @ qb.T) - 1) / 2))))


# ----------------------------------------------------------------------------- distance

@pytest.fixture(scope="module")
def distance_fit():
    truth = stills()
    with torch.no_grad():
        truth[0].detector.panels[0].frame.distance += 1.0  # shared: every truth image moves
    data = observe(truth, 100)
    sims = stills()
    indexing_errors(sims)
    assert sims[0].detector is sims[9].detector and sims[0].crystal is not sims[9].crystal
    res = refine_joint(sims, data, shared=["distance"], per_image=PER_IMAGE)
    print(f"\njoint distance fit: {res.seconds:.1f} s, {res.renders} renders + {res.hessian_renders} for the "
          f"curvature\n{res.summary()}")
    return truth, sims, res


def test_recovers_distance_offset(distance_fit):
    truth, sims, res = distance_fit
    assert res.converged and not res.undetermined
    d = res.value("distance_shift")
    assert d.start == 0.0 and d.value == pytest.approx(1.0, abs=0.05)
    # written into the shared detector
    refined = float(sims[0].detector.panels[0].frame.distance)
    assert refined == pytest.approx(float(truth[0].detector.panels[0].frame.distance), abs=0.05)
    # per-image crystals: orientations recovered; per-image scales cannot live in the shared beam
    for k, (s, t) in enumerate(zip(sims, truth)):
        sig = math.sqrt(sum(p.sigma ** 2 for p in res.images[k] if p.group == "orientation"))
        assert 0 < sig < 0.02 and misorientation(s, t) < 3 * sig
    assert res.not_written == ["beam.fluence"]
    assert float(sims[0].beam.fluence) == float(truth[0].beam.fluence)
    for k in range(IMAGES):
        f = res.value("fluence", image=k)
        assert f.value / float(truth[k].beam.fluence) == pytest.approx(1.0, abs=0.05)
    assert len(res.labels) == 1 + IMAGES * 5 and res.labels[1] == "image0.scale"


def test_distance_uncertainty_is_finite_and_consistent(distance_fit):
    truth, sims, res = distance_fit
    d = res.value("distance_shift")
    assert math.isfinite(d.sigma) and 0 < d.sigma < 0.05
    assert abs(d.value - 1.0) < 3 * d.sigma, (d.value, d.sigma)
    assert res.covariance.shape == (len(res.labels), len(res.labels))


# ----------------------------------------------------------------------------- two panels

def test_recovers_shifted_and_rotated_panel():
    truth = stills(detector=two_panels)
    frame = truth[0].detector.panels[1].frame
    with torch.no_grad():
        _, fast, _, normal = (t[1] for t in truth[0].detector.panel_frames(truth[0].beam.incident()))
        frame.origin += 0.2 * fast  # mm, along the panel
        frame.orientation += math.radians(0.2) * normal  # about its normal
    data = observe(truth, 200)
    sims = stills(detector=two_panels)
    indexing_errors(sims, seed=6)
    res = refine_joint(sims, data, shared=[Panels([1])], per_image=PER_IMAGE)
    print(f"\njoint panel fit: {res.seconds:.1f} s, {res.renders} renders + {res.hessian_renders} for the "
          f"curvature\n{res.summary()}")
    assert res.converged
    moved = sims[0].detector.panels[1].frame
    shift = (moved.origin - sims[0].detector.panels[0].frame.origin).detach() - 64 * 0.2 * fast
    turn = torch.rad2deg(moved.orientation.detach())
    assert float(shift @ fast) == pytest.approx(0.2, abs=0.02)
    assert float(turn @ normal) == pytest.approx(0.2, abs=0.02)
    # the uncertainties of the in-plane shift and the turn say the same
    phys = {p.name: p for p in res.parameters}
    k_fast, k_norm = int(torch.argmax(fast.abs())), int(torch.argmax(normal.abs()))
    for name, axis, target in ((f"panel.1.{'xyz'[k_fast]}", fast, 0.2), (f"panel.1.r{'xyz'[k_norm]}", normal, 0.2)):
        p = phys[name]
        assert math.isfinite(p.sigma) and abs(p.value * float(axis[axis.abs().argmax()]) - target) < 3 * p.sigma + 1e-3
    # panel 0 is untouched
    assert torch.equal(sims[0].detector.panels[0].frame.origin, truth[0].detector.panels[0].frame.origin)


# ----------------------------------------------------------------------------- the objective and its inputs

def test_joint_objective_is_the_sum_of_single_image_ones():
    args = ARGS[:-8] + "-detpixels 24 -pixel 1.0 -oversample 1".split()
    sims = stills(3, args=args)
    data = observe(sims, 7)
    j = Refiner([Entry(s, d, "all") for s, d in zip(sims, data)], ["distance"], PER_IMAGE)
    x = torch.randn(j.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    n = (j.size - 1) // len(sims)
    for k, s in enumerate(sims):
        single = Refiner([Entry(s, data[k], "all")], ["distance"] + PER_IMAGE)
        xk = torch.cat([x[:1], x[1 + k * n:1 + (k + 1) * n]])
        a = j.objective(x, entries=[k])
        b = single.objective(xk)
        assert float(a) == pytest.approx(float(b), rel=1e-12)


def test_joint_bad_input():
    args = ARGS[:-8] + "-detpixels 24 -pixel 1.0 -oversample 1".split()
    sims = stills(2, args=args)
    data = observe(sims, 7)
    with pytest.raises(ValueError, match="2 simulators but 1 images"):
        refine_joint(sims, data[:1], shared=["distance"])
    with pytest.raises(ValueError, match="both shared and per image"):
        refine_joint(sims, data, shared=["scale"], per_image=["scale"])
    with pytest.raises(ValueError, match="no parameter groups"):
        refine_joint(sims, data, shared=[], per_image=[])
    with pytest.raises(ValueError, match="roi 1 has shape"):
        refine_joint(sims, data, shared=["distance"], rois=[None, torch.ones(1, 5, 5, dtype=torch.bool)])
    with pytest.raises(ValueError, match="priors: no parameter"):
        refine_joint(sims, data, shared=["distance"], priors={"image7.scale": (0, 1)})


def test_groups_bind_to_the_images_they_act_on():
    """A group bound to some images moves those images' models only; the
    internal vector holds the groups in the order given, then each image's own."""
    args = ARGS[:-8] + "-detpixels 24 -pixel 1.0 -oversample 1".split()
    sims = stills(3, args=args)
    for s in sims:  # their own detectors, so a distance bound to two stills leaves the third alone
        s.detector = copy.deepcopy(s.detector)
    data = observe(sims, 7)
    r = Refiner([Entry(s, d, "all") for s, d in zip(sims, data)], ["scale", ("distance", [0, 1])], ["orientation"])
    assert r.labels[:2] == ["scale", "images0+1.distance"] and r.labels[2:5] == [f"image0.orientation.{a}" for a in "xyz"]
    x = torch.zeros(r.size, dtype=torch.float64)
    moved = x.clone()
    moved[1] = 5.0
    for k, changes in ((0, True), (1, True), (2, False)):
        a, b = float(r.objective(x, entries=[k])), float(r.objective(moved, entries=[k]))
        assert (a != b) == changes
    with pytest.raises(ValueError, match="bound to images"):
        Refiner([Entry(s, d, "all") for s, d in zip(sims, data)], [("distance", [0, 3])])
