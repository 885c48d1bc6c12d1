"""The still strategy (centroids, then Levenberg-Marquardt on the pixels),
through the engine as `torchbragg refine` runs it (refine's default,
"auto", for a still), from the starts of the recovery trials at three
signal levels: peak ~30 and ~300 photons over 3 photons of background, and
~3e4 photons without background, triclinic and tetragonal. TRIALS trials
per case here for time (twenty per case: scripts/bench_refine.py --levels
faint,medium,bright). Each must converge and reach the truth (0.01 degree,
0.05 % of the cell lengths, 0.1 px) or lie within 3 of its reported
uncertainties, and the uncertainties must be calibrated over the cases:
the pulls' standard deviation between 0.7 and 1.4. (A start outside the
basin reported not converged: test_refine_stages.py.)"""

import numpy as np
import pytest

from recovery import CELLS, LEVELS, assess, groups_for, trial_case
from torchbragg.refine import refine
from torchbragg.refine.steps import anscombe_distance, levenberg_marquardt, poisson_deviance

import torch

TRIALS = 2
PULLS = []


@pytest.mark.parametrize("level", sorted(LEVELS))
@pytest.mark.parametrize("system", sorted(CELLS))
def test_still_strategy_converges(system, level):
    for k in range(TRIALS):
        truth, sim, data = trial_case(system, level, k)
        fit = refine(sim, data, groups_for(level))
        result = assess(truth, sim, fit)
        print(system, level, k, result["errors"], fit.renders, f"{fit.seconds:.1f} s")
        assert fit.converged and fit.hessian_renders == 0
        assert result["ok"], result
        PULLS.extend(result["pulls"].values())


def test_pulls_are_calibrated():
    if len(PULLS) < 6 * TRIALS * len(CELLS) * len(LEVELS):  # run alone: make the trials here
        for system in CELLS:
            for level in LEVELS:
                for k in range(TRIALS):
                    truth, sim, data = trial_case(system, level, k)
                    PULLS.extend(assess(truth, sim, refine(sim, data, groups_for(level)))["pulls"].values())
    std = float(np.std(PULLS))
    assert 0.7 <= std <= 1.4, std


def test_levenberg_marquardt_poisson_estimate_and_information():
    """A Gaussian peak on a background, counted: the fit reaches the maximum
    of the likelihood from a start 3 widths off, and the inverse Fisher information matches the scatter of the
    estimates over repeated counts."""
    pix = torch.arange(64, dtype=torch.float64)

    def expected(x):
        return 2.0 + 500.0 * torch.exp(x[1] * 0.01) * torch.exp(-0.5 * ((pix - 30.0 - x[0]) / 2.0) ** 2)

    truth = torch.tensor([0.4, 0.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    estimates, sigmas = [], []
    for _ in range(40):
        data = torch.poisson(expected(truth), generator=gen)
        fit = levenberg_marquardt(expected, data, torch.tensor([6.0, 20.0], dtype=torch.float64),
                                  phases=(("anscombe", 1.0), ("poisson", 1e-3)), steps=[0.01, 0.01])
        assert fit.converged
        x = fit.x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(poisson_deviance(expected(x), data), x)
        # what one more exact Newton step would gain: far under one unit of log-likelihood
        assert float(0.5 * grad @ torch.linalg.solve(fit.fisher, grad)) < 0.02
        estimates.append(fit.x)
        sigmas.append(torch.sqrt(torch.diagonal(torch.linalg.inv(fit.fisher))))
    scatter = torch.stack(estimates).std(0)
    sigma = torch.stack(sigmas).mean(0)
    assert torch.allclose(scatter, sigma, rtol=0.3), (scatter, sigma)


def test_anscombe_distance_is_bounded_where_the_model_vanishes():
    data = torch.tensor([50.0, 0.0])
    assert float(anscombe_distance(torch.tensor([0.0, 0.0]), data)) < 2 * 51
    assert not np.isfinite(float(poisson_deviance(torch.tensor([0.0, 0.0]), data))) or \
        float(poisson_deviance(torch.tensor([0.0, 0.0]), data)) > 1000
