"""Negative log-likelihoods of measured photons given the expected photons
of a model, summed over the pixels of a mask. Both are differentiable in the
model (and, for the Gaussian one, in the noise parameters).

All tensors share a shape, typically (panels, slow, fast); `mask` is boolean
(True: use the pixel) or None (every pixel)."""

from __future__ import annotations

import torch

TINY = 1e-10  # photons: the model is clamped above this before its logarithm


def _select(model, data, mask):
    if model.shape != data.shape:
        raise ValueError(f"model shape {tuple(model.shape)} and data shape {tuple(data.shape)} differ")
    data = data.to(model)
    if mask is None:
        return model.reshape(-1), data.reshape(-1)
    if mask.shape != model.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} and model shape {tuple(model.shape)} differ")
    mask = mask.to(device=model.device, dtype=torch.bool)
    return model[mask], data[mask]


def poisson_nll(model: torch.Tensor, data: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Poisson negative log-likelihood of counts `data` with expectation
    `model`, up to a constant: sum(model - data * log(model)) over the mask.

    The model is clamped at a tiny positive value (1e-10 photons). The
    constant sum(data * log(data) - data) (0 log 0 = 0) is subtracted, so each
    pixel contributes half its Poisson deviance: the value is near the
    number of pixels at the minimum and keeps its precision in float32;
    derivatives are those of sum(model - data * log(model))."""
    m, d = _select(model, data, mask)
    m = torch.clamp(m, min=TINY)
    with torch.no_grad():
        const = torch.where(d > 0, d * torch.log(torch.clamp(d, min=TINY)) - d, torch.zeros_like(d))
    return (m - d * torch.log(m) + const).sum()


def gaussian_nll(model: torch.Tensor, data: torch.Tensor, mask: torch.Tensor | None = None, read_noise=0.0,
                 gain=1.0) -> torch.Tensor:
    """Gaussian negative log-likelihood of a detector's readings `data`
    (in photons) with expectation `model` (photons), up to a constant.

    The variance of a pixel is gain * model + read_noise^2 (Poisson
    statistics of the photons scaled by the gain, plus read noise in the
    units of `data`), clamped at a tiny positive value; the sum is
    0.5 * sum(log(variance) + (data - model)^2 / variance) over the mask.
    `read_noise` and `gain` may be floats or tensors (broadcast to the
    pixels selected, or scalars)."""
    m, d = _select(model, data, mask)
    read_noise = torch.as_tensor(read_noise, dtype=m.dtype, device=m.device)
    gain = torch.as_tensor(gain, dtype=m.dtype, device=m.device)
    if mask is not None and read_noise.dim() > 0 and read_noise.shape == model.shape:
        read_noise = read_noise[mask]
    if mask is not None and gain.dim() > 0 and gain.shape == model.shape:
        gain = gain[mask]
    var = torch.clamp(gain * torch.clamp(m, min=0.0) + read_noise * read_noise, min=TINY)
    return 0.5 * (torch.log(var) + (d - m) ** 2 / var).sum()


LOSSES = {"poisson": poisson_nll, "gaussian": gaussian_nll}
