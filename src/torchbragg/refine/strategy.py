"""Helpers for refining measured frames: the nanoBragg flags for the spot
shapes DIALS measured. (The refinement strategies are the engine's stages:
refiner.resolve_stages, stages.still_strategy.)"""

from __future__ import annotations

import math


# ----------------------------------------------------------------------------- measured frames

FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))  # of a Gaussian, in standard deviations


def profile_flags(profile: dict | None, oscillation_width: float | None = None) -> list[str]:
    """nanoBragg flags for the spot shapes DIALS measured: its profile block
    (gaussian_rs: sigma_m, the rocking width of the mosaic, and sigma_b,
    the beam divergence, standard deviations in degrees) as -mosaic (the
    spread, deg) with 25 domains and -divergence (the full range, mrad: the
    FWHM) with 3 steps each way; and, for a rotation image of
    `oscillation_width` degrees, -phisteps so that steps of at most half
    sigma_m sample the rocking curve (the default of one step renders each
    image at its start angle). Empty when there is no profile."""
    if not profile or "sigma_m" not in profile:
        return []
    sigma_m, sigma_b = float(profile["sigma_m"]), float(profile.get("sigma_b", 0.0))
    flags = ["-mosaic", f"{sigma_m:.6g}", "-mosaic_dom", "25"]
    if sigma_b > 0:
        flags += ["-divergence", f"{math.radians(sigma_b) * 1e3 * FWHM:.6g}", "-divsteps", "3"]
    if oscillation_width and sigma_m > 0:
        flags += ["-phisteps", str(max(1, math.ceil(abs(oscillation_width) / (0.5 * sigma_m))))]
    return flags
