"""The report's spot cut-outs: the strongest observed spots (not the
model's), titled by a label function (the refine command gives their
Miller indices)."""

import numpy as np
import torch

from torchbragg.refine.centroids import miller_label
from torchbragg.refine.report import spots_figure, strongest_observed
from torchbragg.simulator import Simulator


def test_strongest_observed_spots_come_first_and_are_labelled():
    yy, xx = np.mgrid[0:64, 0:64]
    data = np.zeros((1, 64, 64)) + 2.0
    for (s, f, peak) in ((10, 12, 50.0), (40, 45, 400.0), (50, 20, 150.0)):
        data[0] += peak * np.exp(-((yy - s) ** 2 + (xx - f) ** 2) / 3.0)
    valid = np.ones_like(data, dtype=bool)
    assert strongest_observed(data, valid, 2) == [(0, 40, 45), (0, 50, 20)]
    seen = []
    png, shown = spots_figure(data, np.zeros_like(data), valid, valid, 3,
                              label=lambda k, s, f: seen.append((k, s, f)) or "h k l")
    assert shown == 3 and seen[0] == (0, 40, 45) and png[:4] == b"\x89PNG"


def test_miller_label_of_a_rendered_spot():
    sim = Simulator.from_args("-cell 50 60 70 90 90 90 -misset 10 20 30 -default_F 100 -N 10 -lambda 1 "
                              "-distance 100 -detpixels 256 -pixel 0.1 -oversample 1".split(), dtype=torch.float64)
    with torch.no_grad():
        image = sim.render().numpy()
    (k, s, f), = strongest_observed(image, np.ones_like(image, dtype=bool), 1)
    h = np.array([int(v) for v in miller_label(sim)(k, s, f).split()])
    # the scattering vector of that pixel indexes within a fraction of the reflection
    from torchbragg.refine.centroids import Spots, index
    hkl, ok = index(sim, {}, Spots(np.array([k]), np.array([[f + 0.5, s + 0.5]]), np.ones((1, 2)), np.ones(1)))
    assert ok[0] and (hkl[0] == h).all() and np.abs(h).sum() > 0
