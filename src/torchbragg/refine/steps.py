"""Second-order steps on the Poisson likelihood: Levenberg-Marquardt with
the Fisher information J^T diag(1/mu) J of the expected photons mu.

A fit of a dozen parameters needs a handful of such steps where L-BFGS with
line searches takes hundreds of renders. The Jacobian J (pixels x
parameters) is taken by central differences of renders without a graph
(two per parameter), kept up to date by Broyden's rank-one updates from the
renders the steps make anyway near the minimum, and taken afresh after
large steps, when the quadratic model fails, and at the end. At the minimum
the inverse Fisher matrix is the covariance of the estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import fit


def poisson_deviance(mu: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Half the Poisson deviance sum(mu - d + d log(d / mu)): the negative
    log-likelihood up to a constant, near half the number of pixels at the
    minimum."""
    return 0.5 * fit.poisson_deviance(mu, data).sum()


ANSCOMBE = 3.0 / 8.0


def anscombe_distance(mu: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """2 sum (sqrt(d + 3/8) - sqrt(mu + 3/8))^2: least squares on
    variance-stabilised counts, with the Poisson loss's curvature near its
    minimum but bounded where the model is near zero and the data are not
    (the nodes of a bright spot's shape transform), so that a model spot a
    little off its measured place is not a wall."""
    return 2.0 * ((torch.sqrt(torch.clamp(data, min=0.0) + ANSCOMBE)
                   - torch.sqrt(torch.clamp(mu, min=0.0) + ANSCOMBE)) ** 2).sum()


def _poisson_terms(mu, data):
    """Per pixel: d loss / d mu and the Fisher weight."""
    w = 1.0 / torch.clamp(mu, min=1e-6)
    return 1.0 - data * w, w


def _anscombe_terms(mu, data):
    root = torch.sqrt(torch.clamp(mu, min=0.0) + ANSCOMBE)
    return -2.0 * (torch.sqrt(torch.clamp(data, min=0.0) + ANSCOMBE) - root) / root, 1.0 / root ** 2


LIKELIHOODS = {"poisson": (poisson_deviance, _poisson_terms), "anscombe": (anscombe_distance, _anscombe_terms)}


@dataclass
class StepResult:
    """x: the parameters at the end; fisher: J^T diag(1/mu) J there (plus the
    priors' information); loss: half the deviance; renders: images
    rendered; iterations: steps taken; converged: the last step's expected
    decrease of the loss was below the tolerance; loss_history: the loss
    after every accepted step."""
    x: torch.Tensor
    fisher: torch.Tensor
    gradient: torch.Tensor
    loss: float
    renders: int
    iterations: int
    converged: bool
    loss_history: list


def levenberg_marquardt(expected, data: torch.Tensor, x0: torch.Tensor, *, phases=(("poisson", 1e-2),),
                        steps=None, max_iter: int = 30, damping: float = 1e-3, prior_precision=None,
                        prior_mean=None, progress=None, known=None) -> StepResult:
    """Minimise a loss of counts `data` (1-D) given `expected(x)` (1-D
    photons, rendered without a graph), in `phases` of (loss, tolerance):
    each loss of LIKELIHOODS in turn (the Jacobian, of the expectation, is
    shared), typically ("anscombe", 1.0) to come in from afar, then
    ("poisson", 0.01) for the estimate and its information.

    A phase ends when the step's expected decrease of its loss,
    g^T F^-1 g / 2, is below its tolerance (a fraction of a unit of
    log-likelihood is far inside the statistical error) with a Jacobian
    taken afresh, by central differences of `steps` (default 0.1 internal
    units; 2 renders per parameter). prior_precision / prior_mean: Gaussian
    restraints (diagonal), added to the loss and the information.
    progress: called after every iteration with a dict (phase, iteration,
    loss, expected_gain, renders). known:
    known(x, mu) -> {parameter index: column d mu / d x_i} for parameters
    whose derivative needs no render (a scale, an additive background)."""
    x = x0.detach().double().clone()
    n = x.numel()
    data = data.detach().double()
    h = torch.full((n,), 0.1, dtype=torch.float64) if steps is None else torch.as_tensor(steps, dtype=torch.float64)
    prec = torch.zeros(n, dtype=torch.float64) if prior_precision is None else \
        torch.as_tensor(prior_precision, dtype=torch.float64)
    mean = torch.zeros(n, dtype=torch.float64) if prior_mean is None else torch.as_tensor(prior_mean, dtype=torch.float64)
    renders = 0

    def render(v):
        nonlocal renders
        renders += 1
        with torch.no_grad():
            return expected(v.to(x0)).double()

    def jacobian(v):
        # central differences: a forward difference at a node of a bright spot's
        # shape transform (expectation near zero, derivative zero) is half the
        # curvature times the step, and over the tiny expectation there it
        # inflates the information and skews the gradient
        given = {} if known is None else known(v, mu)
        cols = []
        for i in range(n):
            if i in given:
                cols.append(given[i].double())
                continue
            e = torch.zeros(n, dtype=torch.float64)
            e[i] = h[i]
            cols.append((render(v + e) - render(v - e)) / (2 * h[i]))
        return torch.stack(cols, 1)

    phase = 0
    objective, terms = LIKELIHOODS[phases[0][0]]

    def loss_of(mu, v):
        return float(objective(mu, data)) + 0.5 * float((prec * (v - mean) ** 2).sum())

    def information(mu):
        dl, w = terms(mu, data)
        return (J * w[:, None]).T @ J + torch.diag(prec), J.T @ dl + prec * (x - mean)

    mu = render(x)
    loss = loss_of(mu, x)
    history = [loss]
    J = jacobian(x)
    fresh = True
    converged, stalled, it = False, False, 0
    for it in range(1, max_iter + 1):
        F, g = information(mu)
        if not bool(torch.isfinite(F).all() & torch.isfinite(g).all()):
            break
        gain_expected = 0.5 * float(g @ torch.linalg.lstsq(F, g.unsqueeze(1)).solution.squeeze(1))
        if progress:
            progress(dict(phase=phases[phase][0], iteration=it, loss=loss, expected_gain=gain_expected,
                          renders=renders))
        # no step gains with a fresh Jacobian while under one unit is expected: the
        # rest is the differences' own error, the minimum is reached within it
        if gain_expected < phases[phase][1] or (stalled and gain_expected < 1.0):
            stalled = False
            if not fresh:
                J, fresh = jacobian(x), True
                continue
            if phase + 1 < len(phases):
                phase += 1
                objective, terms = LIKELIHOODS[phases[phase][0]]
                damping = 1e-3
                loss = loss_of(mu, x)
                history.append(loss)
                continue
            converged = True
            break
        accepted = False
        for _ in range(8):
            A = F + damping * torch.diag(torch.clamp(torch.diagonal(F), min=1e-12))
            delta = -torch.linalg.lstsq(A, g.unsqueeze(1)).solution.squeeze(1)
            predicted = -float(g @ delta + 0.5 * delta @ F @ delta)
            trial = x + delta
            mu_new = render(trial)
            loss_new = loss_of(mu_new, trial)
            ratio = (loss - loss_new) / predicted if predicted > 0 else -1.0
            if math.isfinite(loss_new) and loss_new < loss:
                # Broyden: the secant of this step corrects J along delta
                J = J + torch.outer(mu_new - mu - J @ delta, delta) / float(delta @ delta)
                gain = loss - loss_new
                x, mu, loss = trial, mu_new, loss_new
                damping = damping * max(1 / 3, 1 - (2 * ratio - 1) ** 3) if ratio > 0 else damping * 2
                accepted, fresh = True, False
                # far from the minimum the curvature changes with every step and a secant
                # update corrects only one direction of it: take J afresh
                if ratio < 0.25 or gain > n:
                    J, fresh = jacobian(x), True
                break
            if not fresh:
                J, fresh = jacobian(x), True
                break
            damping *= 4
        history.append(loss)
        if not accepted and fresh:
            if gain_expected < 1.0:
                stalled = True
            elif damping > 1e8:
                break
    if not fresh:  # the information at the end from a Jacobian of its own, for the covariance
        J = jacobian(x)
    F, g = information(mu)
    return StepResult(x, F, g, loss, renders, it, converged, history)
