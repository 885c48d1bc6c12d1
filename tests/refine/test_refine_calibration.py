"""Calibration of the refined uncertainties: over noise realisations of one
truth, (refined - truth) / uncertainty should scatter with unit width."""

import numpy as np
import torch

from torchbragg.dataset import photon_counts
from torchbragg.refine import refine, roi_mask
from torchbragg.simulator import Simulator

ARGS = ("-cell 60 70 80 90 90 90 -misset 10 20 30 -default_F 100 -N 12 -lambda 1 -distance 80 "
        "-detpixels 128 -pixel 0.2 -oversample 1 -fluence 1e26").split()


def test_uncertainties_are_calibrated():
    truth = Simulator.from_args(ARGS, dtype=torch.float64)
    with torch.no_grad():
        image = (truth.render() + 2.0).numpy()
    roi = roi_mask(truth, photon_counts(image, 100, 1))
    pulls = []
    for seed in range(8):
        data = photon_counts(image, 100 + seed, 1)
        sim = Simulator.from_args(ARGS, dtype=torch.float64)
        # started at the truth, the refined internal vector is refined - truth
        res = refine(sim, data, ["orientation", "scale", "background"], roi=roi, strategy=None, max_iter=40,
                     dtype_schedule=("float64",), priors=None)
        assert res.converged and not res.undetermined
        pulls.extend((res.x / res.sigma_internal)[:4].tolist())  # orientation x, y, z and scale
    std = float(np.std(pulls))
    assert 0.5 < std < 2.0, pulls
