"""Centroid refinement of a measured rotation sweep against DIALS: ten
PILATUS 2M frames of L-cysteine (DLS I19-1), DIALS's integrated experiment
and its reflections (tests/data/lcys_02). The predictions of DIALS's own
model agree with DIALS's (xyzcal.px); from DIALS's model turned 0.2 degree
and its cell 0.3 % off, the fit returns to the solution it reaches from
DIALS's model, whose centroids match the observed ones (xyzobs.px) at least
as well as DIALS's prediction does."""

import json
import math

import numpy as np
import torch

from torchbragg.build.experiment import build_from_experiment, parse_experiment_flags
from torchbragg.io.dials import read_experiments
from torchbragg.refine.centroids import predict_rotation
from torchbragg.refine.parameters import Parametrisation
from torchbragg.refine.refiner import assign
from torchbragg.refine.sweep import fit_sweep_centroids
from golden import DATA

DATA = DATA / "lcys_02"
GROUPS = ["orientation", "cell"]





def experiment():
    e = read_experiments(str(DATA / "23_integrated.expt"))[0]
    return build_from_experiment(e, parse_experiment_flags(["-default_F", "1"]), dtype=torch.float64)[0]


def strong():
    rows = [r for r in json.loads((DATA / "23_integrated_refl.json").read_text())["reflections"] if r["flags"] & 32]
    return (np.array([r["hkl"] for r in rows]), np.array([r["xyzobs_px"] for r in rows]),
            np.array([r["xyzcal_px"] for r in rows]))


def rotation_between(a, b) -> float:
    u, _, vt = np.linalg.svd(np.linalg.solve(a.crystal.real_vectors().detach().numpy(),
                                             b.crystal.real_vectors().detach().numpy()))
    return math.degrees(math.acos(min(1.0, (np.trace(u @ vt) - 1) / 2)))


def test_predictions_of_dials_model_match_dials():
    sim = experiment()
    hkl, obs, cal = strong()
    with torch.no_grad():
        xyz, found = predict_rotation(sim, {}, torch.as_tensor(hkl), torch.zeros(len(hkl), dtype=torch.long),
                                      torch.as_tensor(obs[:, 2]))
    assert bool(found.all())
    xyz = xyz.numpy()
    assert np.sqrt(((xyz[:, :2] - cal[:, :2]) ** 2).sum(1).mean()) < 0.5  # px
    assert np.abs(xyz[:, 2] - cal[:, 2]).max() < 0.05  # frames


def test_sweep_fit_returns_to_its_solution_and_matches_observed_centroids():
    hkl, obs, cal = strong()
    panel = np.zeros(len(hkl), int)
    fitted = []
    for turned in (False, True):
        sim = experiment()
        if turned:
            axis = np.array([0.3, 0.8, -0.5]) / np.linalg.norm([0.3, 0.8, -0.5])
            assign(sim, Parametrisation(["orientation"], sim).substitutions(sim, torch.as_tensor(axis * 20.0)))
            with torch.no_grad():
                sim.crystal.cell[:3] *= torch.tensor([1.003, 0.997, 1.003], dtype=torch.float64)
        fit, _ = fit_sweep_centroids(sim, hkl, panel, obs, GROUPS)
        assign(sim, Parametrisation(GROUPS, sim).substitutions(sim, fit.x))
        fitted.append((sim, fit))
    (a, fit_a), (b, _) = fitted
    assert rotation_between(a, b) < 0.01
    assert float((a.crystal.cell[:3] / b.crystal.cell[:3] - 1).abs().max()) < 5e-4
    # centroid rms over the reflections the fit kept, against DIALS's own prediction of them
    with torch.no_grad():
        xyz, _ = predict_rotation(a, {}, torch.as_tensor(hkl), torch.zeros(len(hkl), dtype=torch.long),
                                  torch.as_tensor(obs[:, 2]))
    d = np.linalg.norm(xyz.numpy()[:, :2] - obs[:, :2], axis=1)
    used = d <= np.sort(d)[fit_a.reflections - 1]
    ours = np.sqrt((d[used] ** 2).mean())
    dials = np.sqrt((np.linalg.norm(cal[used, :2] - obs[used, :2], axis=1) ** 2).mean())
    print(f"centroid rms over {used.sum()} reflections: {ours:.3f} px (DIALS's prediction {dials:.3f} px), "
          f"{fit_a.rms_frames:.3f} frames")
    assert ours <= 1.1 * dials
