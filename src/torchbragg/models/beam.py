"""The incident beam: direction, wavelength and its spread, divergence,
polarization, fluence, and the water droplet the beam passes through."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import physics as ph
from ._base import Model

NANOBRAGG_FLUENCE = 125932015286227086360700780544.0  # photons/m^2, the original's default


class Beam(Model):
    """Resolved beam values. Vectors are in the lab frame.

    direction: unit vector from the sample towards the source (as DIALS stores
    it; the beam travels along -direction). wavelength in Angstrom.
    dispersion: full width of the wavelength spread as a fraction, sampled in
    `dispersion_steps` equal steps from -1/2 to +1/2 of it.
    divergence: full horizontal and vertical ranges (radians) sampled on the
    grid points `divergence_points` ((ih, iv) indices of a `divergence_steps`
    grid); `divergence_step` fixes a step (radians) per axis instead of
    range / (n - 1).
    sources: optional table of source positions (n, 3) and wavelengths (n,)
    (Angstrom, NaN: the beam's), replacing divergence and dispersion, with
    optional relative weights (n,) (a spectrum; default: all equal).
    polarization_fraction: fraction of the intensity polarized in the plane
    normal to `polarization_normal` (0.5: unpolarized).
    fluence: photons per m^2 over the exposure. water_size: edge of a cube of
    water around the crystal (m) that scatters a diffuse background.
    `extras` keeps file fields torchbragg does not use.
    """

    def __init__(self, direction=(0.0, 0.0, 1.0), wavelength=1.0, *, polarization_fraction=0.5,
                 polarization_normal=(0.0, 1.0, 0.0), fluence=NANOBRAGG_FLUENCE, dispersion=0.0,
                 dispersion_steps: int = 1, divergence=(0.0, 0.0), divergence_steps: Sequence[int] = (1, 1),
                 divergence_step: Sequence[float | None] = (None, None),
                 divergence_points: Sequence[tuple[int, int]] | None = None,
                 source_positions=None, source_wavelengths=None, source_weights=None, water_size=0.0,
                 extras: dict | None = None, dtype=torch.float32, device="cpu"):
        super().__init__(dtype, device)
        self.extras = dict(extras or {})
        self._param("direction", direction)
        self._param("wavelength", wavelength)
        self._param("polarization_fraction", polarization_fraction)
        self._buffer("polarization_normal", polarization_normal)
        self._param("fluence", fluence)
        self._param("water_size", water_size)
        self._param("dispersion", dispersion)
        self.dispersion_steps = int(dispersion_steps)
        self._param("divergence", divergence)
        self.divergence_steps = tuple(int(n) for n in divergence_steps)
        self.divergence_step = tuple(divergence_step)
        if divergence_points is None:
            divergence_points = [(i, j) for i in range(self.divergence_steps[0])
                                 for j in range(self.divergence_steps[1])]
        self.divergence_points = [tuple(p) for p in divergence_points]
        self.has_source_table = source_positions is not None
        if self.has_source_table:
            self._buffer("source_positions", source_positions)
            self._buffer("source_wavelengths", source_wavelengths)
        self.weighted = source_weights is not None
        if self.weighted:
            self._param("source_weights", source_weights)

    def incident(self) -> torch.Tensor:
        """Unit vector along which the beam travels."""
        return -ph.unitize(self.direction)

    def kahn_factor(self) -> torch.Tensor:
        """Kahn's polarization factor 2p - 1 of the polarization fraction p."""
        return 2.0 * self.polarization_fraction - 1.0

    def e_vector(self) -> torch.Tensor:
        """Unit E-vector direction: in the polarization plane, normal to the beam."""
        return ph.unitize(ph.cross(self.polarization_normal.to(self.direction), self.incident()))

    def _divergence_step(self, axis: int) -> torch.Tensor:
        n, given = self.divergence_steps[axis], self.divergence_step[axis]
        if given is not None or n < 2:
            return torch.as_tensor(given or 0.0, dtype=self.dtype, device=self.device)
        return self.divergence[axis] / (n - 1)

    def weights(self) -> torch.Tensor | None:
        """Relative weight of each source, mean 1 (None: all equal)."""
        if not self.weighted:
            return None
        return self.source_weights / self.source_weights.mean()

    def sources(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit incident directions (n, 3) and wavelengths (n,) in Angstrom, in
        the original's order (horizontal, vertical, then wavelength)."""
        beam = self.incident()
        if self.has_source_table:
            pos = self.source_positions.to(beam)
            unset = torch.isnan(pos)
            pos = torch.where(unset, (-10.0 * beam).expand_as(pos), pos)
            lam = self.source_wavelengths.to(beam)
            lam = torch.where(torch.isnan(lam), self.wavelength.expand_as(lam), lam)
            return -ph.unitize(pos), lam
        polar = self.e_vector()
        vert = ph.unitize(ph.cross(beam, polar))
        idx = torch.tensor(self.divergence_points, dtype=self.dtype, device=self.device).reshape(-1, 2)
        hdiv = self._divergence_step(0) * idx[:, 0] - self.divergence[0] / 2.0
        vdiv = self._divergence_step(1) * idx[:, 1] - self.divergence[1] / 2.0
        rot = ph.rotation_axis_angle(vert, hdiv) @ ph.rotation_axis_angle(polar, vdiv)
        src = ph.unitize(ph.rotate(rot, -10.0 * beam))
        n = self.dispersion_steps
        dstep = self.dispersion / (n - 1) if n > 1 else torch.zeros_like(self.dispersion)
        tic = torch.arange(n, dtype=self.dtype, device=self.device)
        lam = self.wavelength * (1.0 + dstep * tic - self.dispersion / 2.0)
        return (-src).repeat_interleave(n, dim=0), lam.repeat(len(self.divergence_points))
