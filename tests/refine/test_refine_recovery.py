"""Recovery trials: noisy 512 x 512 stills of a triclinic and a tetragonal
crystal, refined from starts drawn at random within the errors of indexing
(misset 0.3 degree per axis, cell lengths 0.5 %, N 30 %, beam centre 1.5
pixels, scale 50 %) with the detector distance held fixed. At least 19 of
20 trials per cell must reach the truth (0.01 degree, 0.05 % of the cell
lengths, 5 % of N, 0.1 pixel), and the reported uncertainties must be
calibrated: (refined - truth) / uncertainty scatters with a standard
deviation between 0.7 and 1.4 over the trials."""

import math

import numpy as np
import pytest
import torch

from torchbragg.dataset import photon_counts
from torchbragg.refine import refine
from torchbragg.simulator import Simulator

TRIALS = 20
PIXEL = 0.2  # mm
GROUPS = ["scale", "background", "orientation", "cell", "N", "beam_centre"]
CELLS = {
    "triclinic": ("51 62 73 84 96 107", " P 1"),
    "tetragonal": ("60 60 85 90 90 90", " P 4"),
}


def flags(cell, misset):
    return (f"-cell {cell} -default_F 100 -N 10 -lambda 1 -distance 100 -detpixels 512 -pixel {PIXEL} "
            f"-oversample 1 -fluence 1e27 -misset {misset[0]} {misset[1]} {misset[2]}").split()


def rotation_vector_deg(r: np.ndarray) -> np.ndarray:
    """Rotation vector (degrees) of a rotation matrix."""
    angle = math.acos(max(-1.0, min(1.0, (np.trace(r) - 1) / 2)))
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    if angle < 1e-12:
        return 0.5 * np.degrees(axis)
    return math.degrees(angle) * axis / (2 * math.sin(angle))


def trial(system: str, k: int):
    """One trial: truth and start from seed k; returns the errors and the
    pulls (refined - truth) / uncertainty of every refined quantity."""
    cell, group = CELLS[system]
    rng = np.random.default_rng(1000 * (system == "tetragonal") + k)
    args = flags(cell, rng.uniform(-180, 180, 3).round(3))
    truth = Simulator.from_args(args, dtype=torch.float64)
    truth.crystal.space_group = group
    with torch.no_grad():
        data = photon_counts((truth.render() + 3.0).numpy(), 7000 + k, 1)

    sim = Simulator.from_args(args, dtype=torch.float64)
    sim.crystal.space_group = group
    shift_px = rng.uniform(-1.5, 1.5, 2)
    with torch.no_grad():
        sim.crystal.misset += torch.as_tensor(rng.uniform(-0.3, 0.3, 3))
        lengths = 1 + rng.uniform(-0.005, 0.005, 3)
        if system == "tetragonal":
            lengths[1] = lengths[0]
        sim.crystal.cell[:3] *= torch.as_tensor(lengths)
        sim.crystal.N *= float(1 + rng.uniform(-0.3, 0.3))
        sim.beam.fluence *= float(1 + rng.uniform(-0.5, 0.5))
        sim.detector.panels[0].frame.beam_center += torch.as_tensor(shift_px * PIXEL)
        start_real = sim.crystal.real_vectors().numpy()
        # the start orientation with the true cell: the rotation the fit must find
        cell0 = sim.crystal.cell.clone()
        sim.crystal.cell.copy_(truth.crystal.cell)
        start_true_cell = sim.crystal.real_vectors().numpy()
        sim.crystal.cell.copy_(cell0)
    res = refine(sim, data, GROUPS)

    true_real = truth.crystal.real_vectors().detach().numpy()
    turn = np.linalg.solve(start_true_cell, true_real).T  # true_real = start_true_cell @ turn.T
    refined_real = sim.crystal.real_vectors().detach().numpy()
    misorientation = _misorientation(true_real, refined_real)
    errors = dict(
        misorientation=misorientation,
        cell=float((sim.crystal.cell[:3] / truth.crystal.cell[:3] - 1).abs().max()) * 100,
        N=float((sim.crystal.N / truth.crystal.N - 1).abs().max()) * 100,
        beam_centre=float((sim.detector.panels[0].frame.beam_center
                           - truth.detector.panels[0].frame.beam_center).abs().max()) / PIXEL,
        converged=res.converged, undetermined=list(res.undetermined), renders=res.renders, seconds=res.seconds,
    )
    rv = rotation_vector_deg(turn)
    expected = {"rotation.x": rv[0], "rotation.y": rv[1], "rotation.z": rv[2],
                "beam_centre_shift.fast": -shift_px[0], "beam_centre_shift.slow": -shift_px[1]}
    true_cell = truth.crystal.cell.detach().numpy()
    for name, v in zip(("a", "b", "c", "alpha", "beta", "gamma"), true_cell):
        expected[name] = v
    expected["Na"] = float(truth.crystal.N[0])
    pulls = {}
    for p in res.parameters:
        if p.name in expected and p.sigma > 0 and math.isfinite(p.sigma) and p.value != p.start:
            pulls[p.name] = (p.value - expected[p.name]) / p.sigma
    return errors, pulls


def _misorientation(real_a, real_b) -> float:
    qa = np.linalg.qr(real_a.T)[0]
    qb = np.linalg.qr(real_b.T)[0]
    return math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(qa @ qb.T) - 1) / 2))))


def success(e) -> bool:
    return e["misorientation"] < 0.01 and e["cell"] < 0.05 and e["N"] < 5 and e["beam_centre"] < 0.1


@pytest.mark.parametrize("system", sorted(CELLS))
def test_recovery_trials(system):
    results = [trial(system, k) for k in range(TRIALS)]
    lines = [f"{k:2d} {'ok ' if success(e) else 'BAD'} misorientation {e['misorientation']:.4f} deg, "
             f"cell {e['cell']:.4f} %, N {e['N']:.2f} %, beam centre {e['beam_centre']:.3f} px, "
             f"{e['renders']} renders, {e['seconds']:.1f} s" for k, (e, _) in enumerate(results)]
    print(f"\n{system}:\n" + "\n".join(lines))
    good = [r for r in results if success(r[0])]
    assert len(good) >= TRIALS - 1, "\n".join(lines)
    pulls = [z for _, p in good for z in p.values()]
    by_name = {}
    for _, p in good:
        for name, z in p.items():
            by_name.setdefault(name, []).append(z)
    print("pull std per parameter:", {n: round(float(np.std(v)), 2) for n, v in by_name.items()})
    std = float(np.std(pulls))
    print(f"pull std over every parameter and trial: {std:.2f} ({len(pulls)} pulls)")
    assert 0.7 <= std <= 1.4
