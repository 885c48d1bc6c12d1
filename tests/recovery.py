"""Recovery trials of a still: a noisy 512 x 512 image of a known crystal
(0.1 mm pixels and 1.1 A unless chosen otherwise, N 10, detector distance
fixed) and a start drawn within the errors of indexing (misorientation
0.1-0.3 degree, cell lengths 0.5 % per axis, N 30 %, fluence 50 %, beam
centre 1.5 px), at a chosen peak signal and background. The one trial
builder of the recovery tests (both strategies) and scripts/bench_refine.py."""

from __future__ import annotations

import math

import numpy as np
import torch

from torchbragg.dataset import photon_counts
from torchbragg.refine.parameters import Parametrisation
from torchbragg.refine.refiner import assign
from torchbragg.simulator import Simulator

PIXEL = 0.1  # mm
WAVELENGTH = 1.1  # A
CELLS = {
    "triclinic": ("51 62 73 84 96 107", " P 1"),
    "tetragonal": ("60 60 85 90 90 90", " P 4"),
}
# peak photons per pixel of the brightest spot, flat background photons per pixel
LEVELS = {"faint": (30.0, 3.0), "medium": (300.0, 3.0), "bright": (3e4, 0.0)}
LIMITS = {"rotation_deg": 0.01, "cell_rel": 0.0005, "beam_centre_px": 0.1}


def flags(cell, misset, pixel=PIXEL, wavelength=WAVELENGTH):
    return (f"-cell {cell} -default_F 100 -N 10 -lambda {wavelength} -distance 100 -detpixels 512 -pixel {pixel} "
            f"-oversample 1 -fluence 1e27 -misset {misset[0]} {misset[1]} {misset[2]}").split()


def groups_for(level):
    bg = LEVELS[level][1]
    return ["scale"] + (["background"] if bg > 0 else []) + ["orientation", "cell", "N", "beam_centre"]


def trial_case(system: str, level: str, k: int, pixel: float = PIXEL, wavelength: float = WAVELENGTH):
    """(truth, start simulator, data) of trial k (pixel size in mm,
    wavelength in A)."""
    cell, group = CELLS[system]
    peak, bg = LEVELS[level]
    rng = np.random.default_rng(1000 * (system == "tetragonal") + k)
    args = flags(cell, rng.uniform(-180, 180, 3).round(3), pixel, wavelength)
    truth = Simulator.from_args(args, dtype=torch.float64)
    truth.crystal.space_group = group
    with torch.no_grad():
        image = truth.render()
        truth.beam.fluence *= peak / float(image.max())
        data = torch.as_tensor(photon_counts((image * peak / float(image.max()) + bg).numpy(), 7000 + k, 1))
    sim = Simulator.from_args(args, dtype=torch.float64)
    sim.crystal.space_group = group
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    with torch.no_grad():
        sim.beam.fluence.copy_(truth.beam.fluence * float(1 + rng.uniform(-0.5, 0.5)))
        turn = Parametrisation(["orientation"], sim)
        assign(sim, turn.substitutions(sim, torch.as_tensor(axis * rng.uniform(0.1, 0.3) / 0.01)))
        lengths = 1 + rng.uniform(-0.005, 0.005, 3)
        if system == "tetragonal":
            lengths[1] = lengths[0]
        sim.crystal.cell[:3] *= torch.as_tensor(lengths)
        sim.crystal.N *= float(1 + rng.uniform(-0.3, 0.3))
        sim.detector.panels[0].frame.beam_center += torch.as_tensor(rng.uniform(-1.5, 1.5, 2) * pixel)
    return truth, sim, data


def rotation_vector_deg(r: np.ndarray) -> np.ndarray:
    angle = math.acos(max(-1.0, min(1.0, (np.trace(r) - 1) / 2)))
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    if angle < 1e-12:
        return 0.5 * np.degrees(axis)
    return math.degrees(angle) * axis / (2 * math.sin(angle))


def assess(truth, sim, fit) -> dict:
    """Errors of the refined `sim` from `truth` and pulls (error / reported
    uncertainty) of the orientation (about lab x, y, z, the cell held at the
    truth's so that cell-angle errors do not count), cell lengths and beam
    centre; ok: each within its limit or within 3 of its uncertainties.
    N's relative error is reported too."""
    import copy
    held = copy.deepcopy(sim)
    with torch.no_grad():
        held.crystal.cell.copy_(truth.crystal.cell)
    a = held.crystal.real_vectors().detach().numpy()
    b = truth.crystal.real_vectors().detach().numpy()
    u, _, vt = np.linalg.svd(np.linalg.solve(a, b))
    rot = -rotation_vector_deg((u @ vt).T)  # refined minus truth, lab frame
    sig = {p.name: p.sigma for p in fit.parameters}
    pixel = float(truth.detector.panels[0].pixel_size[0])
    pulls = {f"rotation.{ax}": rot[i] / sig[f"rotation.{ax}"] for i, ax in enumerate("xyz")}
    rel = (sim.crystal.cell[:3] / truth.crystal.cell[:3] - 1).detach().numpy()
    for i, name in enumerate("abc"):
        if name in sig and sig[name] > 0:
            pulls[name] = rel[i] * float(truth.crystal.cell[i]) / sig[name]
    centre = ((sim.detector.panels[0].frame.beam_center - truth.detector.panels[0].frame.beam_center)
              / pixel).detach().numpy()
    for i, ax in enumerate(("fast", "slow")):
        pulls[f"beam_centre_shift.{ax}"] = centre[i] / sig[f"beam_centre_shift.{ax}"]
    errors = {"rotation_deg": float(np.linalg.norm(rot)), "cell_rel": float(np.abs(rel).max()),
              "beam_centre_px": float(np.abs(centre).max()),
              "N_rel": float((sim.crystal.N / truth.crystal.N - 1).abs().max())}
    ok = (errors["rotation_deg"] < LIMITS["rotation_deg"] or all(abs(pulls[f"rotation.{a}"]) < 3 for a in "xyz")) \
        and (errors["cell_rel"] < LIMITS["cell_rel"] or all(abs(pulls[n]) < 3 for n in "abc" if n in pulls)) \
        and (errors["beam_centre_px"] < LIMITS["beam_centre_px"]
             or all(abs(pulls[f"beam_centre_shift.{a}"]) < 3 for a in ("fast", "slow")))
    return dict(errors=errors, pulls=pulls, ok=bool(ok) and all(math.isfinite(v) for v in pulls.values()))
