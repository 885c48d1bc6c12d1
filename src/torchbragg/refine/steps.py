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
    after every accepted step; expected: the expectation at x."""
    x: torch.Tensor
    fisher: torch.Tensor
    gradient: torch.Tensor
    loss: float
    renders: int
    iterations: int
    converged: bool
    loss_history: list
    expected: torch.Tensor


def levenberg_marquardt(expected, data: torch.Tensor, x0: torch.Tensor, *, phases=(("poisson", 1e-2),),
                        steps=None, max_iter: int = 30, damping: float = 1e-3, prior_precision=None,
                        prior_mean=None, progress=None, known=None, parts=None) -> StepResult:
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
    whose derivative needs no render (a scale, an additive background).
    parts: [(expected_j, indices_j)], the expectation in parts (their
    outputs concatenated are `expected`'s), each depending only on the
    parameters `indices_j` (several stills: each image's own crystal and
    the shared detector); a Jacobian column then renders only the parts its
    parameter moves, and `renders` counts part renders."""
    x = x0.detach().double().clone()
    n = x.numel()
    data = data.detach().double()
    h = torch.full((n,), 0.1, dtype=torch.float64) if steps is None else torch.as_tensor(steps, dtype=torch.float64)
    prec = torch.zeros(n, dtype=torch.float64) if prior_precision is None else \
        torch.as_tensor(prior_precision, dtype=torch.float64)
    mean = torch.zeros(n, dtype=torch.float64) if prior_mean is None else torch.as_tensor(prior_mean, dtype=torch.float64)
    renders = 0
    if parts is None:
        parts = [(expected, range(n))]
    moves = [torch.zeros(n, dtype=torch.bool) for _ in parts]  # moves[j][i]: parameter i moves part j
    for m, (_, ids) in zip(moves, parts):
        m[list(ids)] = True

    def render_part(j, v):
        nonlocal renders
        renders += 1
        with torch.no_grad():
            return parts[j][0](v.to(x0)).double()

    def render(v):
        return torch.cat([render_part(j, v) for j in range(len(parts))])

    def jacobian(v):
        # the last phase's by central differences: a forward difference at a node
        # of a bright spot's shape transform (expectation near zero, derivative
        # zero) is half the curvature times the step, and over the tiny
        # expectation there the Poisson weight inflates the information and
        # skews the gradient; the phases before (Anscombe: weights bounded by
        # 8/3) take forward differences, at half the renders
        central = phase + 1 == len(phases)
        given = {} if known is None else known(v, mu)
        at = torch.split(mu, sizes)
        cols = []
        for i in range(n):
            if i in given:
                cols.append(given[i].double())
                continue
            e = torch.zeros(n, dtype=torch.float64)
            e[i] = h[i]
            cols.append(torch.cat([
                ((render_part(j, v + e) - render_part(j, v - e)) / (2 * h[i]) if central
                 else (render_part(j, v + e) - at[j]) / h[i]) if moves[j][i]
                else torch.zeros(size, dtype=torch.float64) for j, size in enumerate(sizes)]))
        return torch.stack(cols, 1)

    def broyden(J, change, delta):
        # the secant of a step corrects J along it, part by part, leaving the
        # columns of parameters that do not move a part zero there
        out, row = J.clone(), 0
        for m, size in zip(moves, sizes):
            d = torch.where(m, delta, torch.zeros_like(delta))
            norm = float(d @ d)
            if norm > 0:
                rows = slice(row, row + size)
                out[rows] += torch.outer(change[rows] - J[rows] @ delta, d) / norm
            row += size
        return out

    def loss_of(mu, v):
        # an expectation below zero has no likelihood (a background driven
        # under zero where the data are empty): such a step fails
        if bool((mu < 0).any()):
            return math.inf
        return float(objective(mu, data)) + 0.5 * float((prec * (v - mean) ** 2).sum())

    def information(mu):
        dl, w = terms(mu, data)
        return (J * w[:, None]).T @ J + torch.diag(prec), J.T @ dl + prec * (x - mean)

    pieces = [render_part(j, x) for j in range(len(parts))]
    sizes = [p.numel() for p in pieces]
    mu = torch.cat(pieces)
    phase = 0
    objective, terms = LIKELIHOODS[phases[0][0]]
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
        # rest is the differences' own error, the minimum is reached within it; a
        # phase before the last (forward differences) ends where its steps stop gaining
        last = phase + 1 == len(phases)
        if gain_expected < phases[phase][1] or (stalled and (gain_expected < 1.0 or not last)):
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
                # the forward differences' Jacobian serves the last phase's first step;
                # the next one fresh is by central differences
                fresh = False
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
                J = broyden(J, mu_new - mu, delta)
                gain = loss - loss_new
                x, mu, loss = trial, mu_new, loss_new
                while ratio > 1.5:
                    # the loss fell far more than its quadratic model said (far from
                    # the minimum, up a steep wall): the same step again is worth a render
                    mu_new = render(x + delta)
                    loss_new = loss_of(mu_new, x + delta)
                    if not (math.isfinite(loss_new) and loss_new < loss):
                        break
                    J = broyden(J, mu_new - mu, delta)
                    gain += loss - loss_new
                    x, mu, loss = x + delta, mu_new, loss_new
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
            if gain_expected < 1.0 or phase + 1 < len(phases):
                stalled = True
            elif damping > 1e8:
                break
    if not fresh:  # the information at the end from a Jacobian of its own, for the covariance
        J = jacobian(x)
    F, g = information(mu)
    return StepResult(x, F, g, loss, renders, it, converged, history, mu)
