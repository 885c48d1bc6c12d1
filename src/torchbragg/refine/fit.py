"""Goodness of fit of a refined model: is the minimum one the data accept?

Poisson deviance of the pixels against what photon noise allows for the
model (its expectation and variance, exact at low counts), normalised
residuals on the spots, and the spots whose observed centroid is shifted
from the model's beyond noise (the dipole residual of a wrong orientation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .losses import TINY

LOW_COUNTS = 30.0  # photons: below, the deviance's moments are summed over the Poisson distribution
SHIFT_CHI2 = 13.8  # chi-square (2 degrees of freedom) of a centroid shift with p = 0.001
SHIFT_FLOOR = 0.05  # px: smaller shifts are model detail, not a wrong minimum
SPOT_HALF = 3  # px: half-width of the box around a spot
MAX_SPOTS = 500

_TABLE: dict = {}


def poisson_deviance(model: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Per-pixel Poisson deviance 2 (d log(d/m) - (d - m)), 0 log 0 = 0."""
    m = torch.clamp(model, min=TINY)
    d = data.to(m)
    dlog = torch.where(d > 0, d * torch.log(torch.clamp(d, min=TINY) / m), torch.zeros_like(d))
    return 2.0 * (dlog - (d - m))


def _moments_table():
    """Mean and variance of the deviance of one Poisson count, on a grid of
    expectations up to LOW_COUNTS (log-spaced), summed over counts."""
    if "grid" not in _TABLE:
        mu = torch.logspace(-6, math.log10(LOW_COUNTS), 400, dtype=torch.float64)
        k = torch.arange(0, 200, dtype=torch.float64)
        logp = k[None, :] * torch.log(mu[:, None]) - mu[:, None] - torch.lgamma(k + 1)[None, :]
        p = torch.exp(logp)
        dev = poisson_deviance(mu[:, None].expand(-1, k.numel()), k[None, :].expand(mu.numel(), -1))
        mean = (p * dev).sum(1)
        var = (p * dev * dev).sum(1) - mean * mean
        _TABLE.update(grid=torch.log(mu), mean=mean, var=var)
    return _TABLE["grid"], _TABLE["mean"], _TABLE["var"]


def expected_deviance(model: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of the Poisson deviance of each pixel of expectation
    `model`: interpolated from exact sums at low counts, the expansion
    1 + 1/(6 mu) + 1/(6 mu^2) (variance 2 + 2/(3 mu); both match the sums at
    30 photons) above."""
    m = torch.clamp(model.detach().double().cpu(), min=0.0)
    grid, mean_t, var_t = _moments_table()
    lm = torch.log(torch.clamp(m, min=math.exp(float(grid[0]))))
    pos = torch.clamp(torch.searchsorted(grid, lm) - 1, 0, grid.numel() - 2)
    w = (lm - grid[pos]) / (grid[pos + 1] - grid[pos])
    low_mean = mean_t[pos] * (1 - w) + mean_t[pos + 1] * w
    low_var = var_t[pos] * (1 - w) + var_t[pos + 1] * w
    tiny = m < math.exp(float(grid[0]))  # below the grid: both vanish with the expectation
    low_mean = torch.where(tiny, mean_t[0] * m / math.exp(float(grid[0])), low_mean)
    low_var = torch.where(tiny, var_t[0] * m / math.exp(float(grid[0])), low_var)
    safe = torch.clamp(m, min=LOW_COUNTS)
    high_mean = 1.0 + 1.0 / (6.0 * safe) + 1.0 / (6.0 * safe * safe)
    high_var = 2.0 + 2.0 / (3.0 * safe)
    high = m > LOW_COUNTS
    return torch.where(high, high_mean, low_mean), torch.where(high, high_var, low_var)


def _spot_peaks(data, model, mask, half):
    """(panel, slow, fast) of observed spots: local maxima of the data inside
    the mask more than 5 standard deviations above the model's local
    background (its minimum around), strongest first."""
    win = 2 * half + 1
    inf = torch.tensor(float("inf"), dtype=data.dtype)
    peak = F.max_pool2d(torch.where(mask, data, -inf).unsqueeze(1), win, stride=1, padding=half).squeeze(1)
    bg = -F.max_pool2d(torch.where(mask, -model, -inf).unsqueeze(1), 2 * win + 1, stride=1, padding=win).squeeze(1)
    bg = torch.clamp(bg, min=0.0)
    strong = (data == peak) & mask & (data > bg + 5.0 * torch.sqrt(bg + 1.0))
    idx = torch.nonzero(strong)
    if idx.numel() == 0:
        return idx
    height = (data - bg)[strong]
    return idx[torch.argsort(height, descending=True)][:MAX_SPOTS]


def spot_statistics(model: torch.Tensor, data: torch.Tensor, mask: torch.Tensor, variance: torch.Tensor,
                    noise: torch.Tensor | None = None, half: int = SPOT_HALF) -> dict:
    """Around each observed spot (a (2 half + 1)^2 box of mask pixels):
    residuals normalised by the noise `variance` of each pixel, the
    integrated intensity's normalised residual (with the rms each would have
    if the data scattered as `noise`, the variance of the noise model;
    default `variance`), and whether the observed
    centroid (above the model's background in the box) is shifted from the
    model's beyond noise and by more than SHIFT_FLOOR px. A spot the model
    does not reproduce at all counts as shifted."""
    P, S, Fa = model.shape
    peaks = _spot_peaks(data, model, mask, half)
    noise = variance if noise is None else noise
    pixel_res, intensity_res, shifted = [], [], 0
    pixel_exp, intensity_exp = [], []
    for k, s, f in peaks.tolist():
        s0, s1, f0, f1 = max(s - half, 0), min(s + half + 1, S), max(f - half, 0), min(f + half + 1, Fa)
        box = mask[k, s0:s1, f0:f1]
        m, d, v, e = (t[k, s0:s1, f0:f1][box] for t in (model, data, variance, noise))
        ys = (torch.arange(s0, s1, dtype=torch.float64)[:, None].expand(s1 - s0, f1 - f0))[box]
        xs = (torch.arange(f0, f1, dtype=torch.float64)[None, :].expand(s1 - s0, f1 - f0))[box]
        pixel_res.append((d - m) / torch.sqrt(v))
        pixel_exp.append(e / v)
        intensity_res.append(float((d - m).sum() / torch.sqrt(v.sum())))
        intensity_exp.append(float(e.sum() / v.sum()))
        bg = m.min()
        wm, wd = m - bg, d - bg
        sm, sd = float(wm.sum()), float(wd.sum())
        if sd <= 0:
            continue
        if sm < 1.0 or sm < 0.05 * sd:  # observed, but not in the model
            shifted += 1
            continue
        cm = torch.stack([(wm * xs).sum(), (wm * ys).sum()]) / sm
        cd = torch.stack([(wd * xs).sum(), (wd * ys).sum()]) / sd
        var = torch.stack([(v * (xs - cm[0]) ** 2).sum(), (v * (ys - cm[1]) ** 2).sum()]) / (sm * sm)
        delta = cd - cm
        chi2 = float((delta * delta / torch.clamp(var, min=1e-12)).sum())
        if chi2 > SHIFT_CHI2 and float(delta.norm()) > SHIFT_FLOOR:
            shifted += 1
    n = len(intensity_res)
    pix = torch.cat(pixel_res) if pixel_res else torch.zeros(0, dtype=torch.float64)
    nan = float("nan")
    return dict(spots=n, shifted_spots=shifted, shifted_fraction=shifted / n if n else 0.0,
                spot_pixel_residual_rms=float(pix.pow(2).mean().sqrt()) if pix.numel() else nan,
                spot_pixel_residual_expected=float(torch.cat(pixel_exp).mean().sqrt()) if pix.numel() else nan,
                spot_intensity_residual_rms=math.sqrt(sum(r * r for r in intensity_res) / n) if n else nan,
                spot_intensity_residual_expected=math.sqrt(sum(intensity_exp) / n) if n else nan)


def goodness_of_fit(model: torch.Tensor, data: torch.Tensor, mask: torch.Tensor, loss: str = "poisson",
                    read_noise=0.0, gain=1.0, pixels: torch.Tensor | None = None) -> dict:
    """The fit of expected photons `model` to `data` over `mask` (all
    (panels, slow, fast)): the Poisson deviance (for the Gaussian
    likelihood, chi-square) summed over the pixels (`pixels`, default the
    mask: pixels chosen by the data's own noise bias it upwards) against
    its expectation and variance under photon noise for this model, their
    ratio, the standard score of the excess; and the spot statistics over
    the mask."""
    model = model.detach().double().cpu()
    data = data.detach().double().cpu().to(model)
    mask = mask.detach().bool().cpu()
    summed = mask if pixels is None else pixels.detach().bool().cpu() & mask
    m, d = model[summed], data[summed]
    n = int(m.numel())
    if loss == "gaussian":
        g = torch.as_tensor(gain, dtype=torch.float64)
        rn = torch.as_tensor(read_noise, dtype=torch.float64)
        variance = torch.clamp(g * torch.clamp(model, min=0.0) + rn * rn, min=TINY)
        dev = float(((d - m) ** 2 / variance[summed]).sum())
        mean, var = float(n), 2.0 * n
    else:
        variance = torch.clamp(model, min=0.1)  # a Pearson residual's scale, bounded where the model is ~0
        dev = float(poisson_deviance(m, d).sum())
        e, v = expected_deviance(m)
        mean, var = float(e.sum()), float(v.sum())
    out = dict(pixels=n, deviance=dev, expected_deviance=mean, deviance_variance=var,
               deviance_per_pixel=dev / n if n else float("nan"),
               expected_per_pixel=mean / n if n else float("nan"),
               deviance_ratio=dev / mean if mean > 0 else (1.0 if dev <= 1e-9 * max(n, 1) else float("inf")),
               deviance_z=(dev - mean) / math.sqrt(var) if var > 0 else 0.0)
    out.update(spot_statistics(model, data, mask, variance,
                               None if loss == "gaussian" else torch.clamp(model, min=0.0)))
    return out


def combine(parts: list[dict]) -> dict:
    """The goodness of fit of several entries together (sums of the pixel
    terms, spot counts added, residual rms pooled over the spots)."""
    if len(parts) == 1:
        return dict(parts[0])
    n = sum(p["pixels"] for p in parts)
    dev = sum(p["deviance"] for p in parts)
    mean = sum(p["expected_deviance"] for p in parts)
    var = sum(p["deviance_variance"] for p in parts)
    spots = sum(p["spots"] for p in parts)
    shifted = sum(p["shifted_spots"] for p in parts)

    def pooled(key):
        num = sum(p[key] ** 2 * p["spots"] for p in parts if p["spots"])
        return math.sqrt(num / spots) if spots else float("nan")

    return dict(pixels=n, deviance=dev, expected_deviance=mean, deviance_variance=var, deviance_per_pixel=dev / n if n else float("nan"),
                expected_per_pixel=mean / n if n else float("nan"),
                deviance_ratio=dev / mean if mean > 0 else float("inf"),
                deviance_z=(dev - mean) / math.sqrt(var) if var > 0 else 0.0, spots=spots, shifted_spots=shifted,
                shifted_fraction=shifted / spots if spots else 0.0,
                spot_pixel_residual_rms=pooled("spot_pixel_residual_rms"),
                spot_pixel_residual_expected=pooled("spot_pixel_residual_expected"),
                spot_intensity_residual_rms=pooled("spot_intensity_residual_rms"),
                spot_intensity_residual_expected=pooled("spot_intensity_residual_expected"))
