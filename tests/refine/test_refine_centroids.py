"""The centroid stage: observed spot centroids of a still, their predicted
positions from the Bragg geometry, and a Gauss-Newton fit of orientation,
cell and beam centre to them (no image rendered)."""

import math

import numpy as np
import torch

from torchbragg.dataset import photon_counts
from torchbragg.refine.centroids import fit_centroids, index, observed_spots, predict
from torchbragg.refine.parameters import Parametrisation
from torchbragg.refine.refiner import assign
from torchbragg.simulator import Simulator

PIXEL = 0.1


def still(cell="51 62 73 84 96 107", misset="12 -40 75"):
    args = (f"-cell {cell} -default_F 100 -N 10 -lambda 1.1 -distance 100 -detpixels 512 -pixel {PIXEL} "
            f"-oversample 1 -fluence 1e28 -misset {misset}").split()
    return Simulator.from_args(args, dtype=torch.float64)


def test_predicted_centroids_match_rendered_spots():
    """On a noise-free render of a skewed (triclinic) cell, the predicted
    centroid of each spot, cut by the Ewald sphere, lies within a fraction
    of a pixel of the measured one; the nearest point of the sphere alone
    would be off by up to a spot's width."""
    sim = still()
    with torch.no_grad():
        image = sim.render()
    spots = observed_spots(image, sigmas=5.0)
    hkl, ok = index(sim, {}, spots)
    assert ok.sum() >= 20
    with torch.no_grad():
        xy, eps = predict(sim, {}, torch.as_tensor(hkl[ok]), torch.as_tensor(spots.panel[ok]))
    d = np.linalg.norm(xy.numpy() - spots.xy[ok], axis=1)
    strong = spots.intensity[ok] > np.median(spots.intensity[ok])
    assert np.median(d[strong]) < 0.15, np.sort(d)
    assert np.median(np.abs(eps.numpy())[strong]) < 1.0  # the strong spots are the excited ones


def test_centroid_fit_recovers_beam_centre_and_orientation():
    """From a start turned 0.25 degree, with the cell lengths 0.4 % off and
    the beam centre 1.2 px off, the centroid fit of a noisy still brings the
    spots within a fraction of a pixel and the beam centre within 0.1 px."""
    truth = still("60 60 85 90 90 90")
    truth.crystal.space_group = " P 4"
    with torch.no_grad():
        data = torch.as_tensor(photon_counts((truth.render() + 3.0).numpy(), 11, 1))
    sim = still("60 60 85 90 90 90")
    sim.crystal.space_group = " P 4"
    axis = np.array([0.3, -0.8, 0.5]) / np.linalg.norm([0.3, -0.8, 0.5])
    assign(sim, Parametrisation(["orientation"], sim).substitutions(sim, torch.as_tensor(axis * 25.0)))
    with torch.no_grad():
        sim.crystal.cell[:3] *= 1.004
        sim.detector.panels[0].frame.beam_center += torch.tensor([1.2, -0.9]) * PIXEL
    groups = ["orientation", "cell", "beam_centre"]
    fit = fit_centroids(sim, data, groups)
    assert fit.spots >= 20
    assert fit.rms < 0.6 < 1.5 < fit.rms_start
    assign(sim, Parametrisation(groups, sim).substitutions(sim, fit.x))
    shift = (sim.detector.panels[0].frame.beam_center - truth.detector.panels[0].frame.beam_center) / PIXEL
    assert float(shift.abs().max()) < 0.1
    # the rotation part (polar decomposition) of the map from the fitted cell vectors to the true ones
    u, _, vt = np.linalg.svd(np.linalg.solve(sim.crystal.real_vectors().detach().numpy(),
                                             truth.crystal.real_vectors().detach().numpy()))
    angle = math.degrees(math.acos(min(1.0, (np.trace(u @ vt) - 1) / 2)))
    assert angle < 0.08
    assert float((sim.crystal.cell[:3] / truth.crystal.cell[:3] - 1).abs().max()) < 0.002
