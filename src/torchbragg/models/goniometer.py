"""Goniometer (one or several rotation axes) and Scan (which images cover
which rotation angles)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .. import physics as ph
from ..units import DEG
from ._base import Model



class Goniometer(Model):
    """Rotation axes (K, 3) with angles (K,) in degrees; axis `scan_axis` is
    the one a scan turns. axes[0] is nearest the crystal. The rotation of the
    crystal at scan angle phi is

        setting_rotation @ R(axes[K-1]) ... R(axes[scan_axis], phi) ... R(axes[0]) @ fixed_rotation

    (a single-axis goniometer is K = 1). Rotations are right-handed."""

    def __init__(self, axes=((1.0, 0.0, 0.0),), angles=None, *, scan_axis: int = 0, names: Sequence[str] | None = None,
                 fixed_rotation=None, setting_rotation=None, dtype=torch.float32, device="cpu"):
        super().__init__(dtype, device)
        axes = np.asarray(axes, dtype=np.float64).reshape(-1, 3)
        norms = np.linalg.norm(axes, axis=1)
        if not np.all(norms > 0):
            raise ValueError("a goniometer axis has zero length")
        self._buffer("axes", axes / norms[:, None], dtype=torch.float64)
        self._param("angles", np.zeros(len(axes)) if angles is None else angles)
        if not 0 <= scan_axis < len(axes):
            raise ValueError(f"scan axis {scan_axis} is not one of the {len(axes)} axes")
        self.scan_axis = int(scan_axis)
        self.names = list(names) if names is not None else [f"axis{i}" for i in range(len(axes))]
        self._buffer("fixed_rotation", np.eye(3) if fixed_rotation is None else fixed_rotation, dtype=torch.float64)
        self._buffer("setting_rotation", np.eye(3) if setting_rotation is None else setting_rotation,
                     dtype=torch.float64)

    def rotation(self, phi: torch.Tensor) -> torch.Tensor:
        """(..., 3, 3) crystal rotation at scan angles `phi` (degrees, any shape), float64."""
        phi = phi.double()
        angles = self.angles.double() * DEG
        axes = self.axes.double()
        result = self.setting_rotation.double().expand(*phi.shape, 3, 3)
        for k in range(axes.shape[0] - 1, -1, -1):
            angle = phi * DEG if k == self.scan_axis else angles[k].expand_as(phi)
            result = result @ ph.rotation_axis_angle(axes[k], angle)
        return result @ self.fixed_rotation.double()

    def scan_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(after, axis, before), float64: rotation(phi) = after @ R(axis, phi) @ before,
        so that many angles turn vectors without building a matrix for each."""
        angles = self.angles.double() * DEG
        axes = self.axes.double()
        after = self.setting_rotation.double()
        for k in range(axes.shape[0] - 1, self.scan_axis, -1):
            after = after @ ph.rotation_axis_angle(axes[k], angles[k])
        before = self.fixed_rotation.double()
        for k in range(self.scan_axis - 1, -1, -1):
            before = ph.rotation_axis_angle(axes[k], angles[k]) @ before
        return after, axes[self.scan_axis], before

    @property
    def rotation_axis(self) -> torch.Tensor:
        """The scan axis in the lab frame at the datum (DIALS's 'rotation axis')."""
        setting, axes = self.setting_rotation.double(), self.axes.double()
        for k in range(axes.shape[0] - 1, self.scan_axis, -1):
            setting = setting @ ph.rotation_axis_angle(axes[k], self.angles[k].double() * DEG)
        return ph.rotate(setting, axes[self.scan_axis])


class Scan(Model):
    """Images `image_range` (first, last; numbered from 1 as DIALS does), each
    covering `oscillation[1]` degrees from oscillation[0] + (i - first) *
    oscillation[1]. `extras` keeps what torchbragg does not use (exposure
    times, epochs, ...) so experiment files survive a round trip."""

    def __init__(self, image_range=(1, 1), oscillation=(0.0, 0.0), *, extras: dict | None = None,
                 dtype=torch.float32, device="cpu"):
        super().__init__(dtype, device)
        first, last = (int(i) for i in image_range)
        if last < first:
            raise ValueError(f"scan image range {first}..{last} is empty")
        self.image_range = (first, last)
        self._param("oscillation", oscillation)
        self.extras = dict(extras or {})

    @property
    def num_images(self) -> int:
        return self.image_range[1] - self.image_range[0] + 1

    def angles(self, image: int, steps: int) -> torch.Tensor:
        """The `steps` rotation angles (degrees) at which image `image` is
        sampled: its start and then every width / steps."""
        if not self.image_range[0] <= image <= self.image_range[1]:
            raise ValueError(f"image {image} is outside the scan's images "
                             f"{self.image_range[0]}..{self.image_range[1]}")
        start, width = self.oscillation[0], self.oscillation[1]
        first = start + (image - self.image_range[0]) * width
        return first + width / steps * torch.arange(steps, dtype=self.oscillation.dtype, device=self.oscillation.device)
