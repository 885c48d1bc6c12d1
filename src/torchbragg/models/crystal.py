"""The crystal: unit cell and orientation, mosaic domains, size and spot
shape, and its structure factors."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import physics as ph
from ..resolve import automatic_oversample, crystal_extent
from ..units import DEG
from ._base import Model



class StructureFactors(Model):
    """Amplitudes F on a dense grid of Miller indices starting at `hkl_min`;
    `default_F` everywhere the grid has no value. `lookup` is "nearest" or
    "tricubic" (physics.STRUCTURE_FACTOR_LOOKUPS); without a grid every
    reflection has default_F."""

    def __init__(self, grid=None, hkl_min=(0, 0, 0), default_F=0.0, lookup: str = "nearest",
                 dtype=torch.float32, device="cpu"):
        super().__init__(dtype, device)
        self._param("default_F", default_F)
        self.has_grid = grid is not None
        if self.has_grid:
            self._param("Fhkl", grid)
            self._buffer("hkl_min", hkl_min, dtype=torch.long)
            if lookup not in ph.STRUCTURE_FACTOR_LOOKUPS:
                raise ValueError(f"unknown structure-factor lookup '{lookup}'")
        self.lookup = lookup if self.has_grid else "constant"

    def without_direct_beam(self) -> "StructureFactors":
        """A copy with F(0 0 0) = 0: the undiffracted beam, which a measured
        frame shows only as the beamstop's shadow, is no spot of the model.
        A table that does not reach 0 0 0 is extended to it (with default_F);
        without a table, a 3 x 3 x 3 one of default_F around it is made."""
        with torch.no_grad():
            f = self.default_F.detach().double()
            if self.has_grid:
                grid, lo = self.Fhkl.detach().double(), self.hkl_min.detach().cpu().long()
            else:
                grid, lo = f.expand(1, 1, 1).clone(), torch.zeros(3, dtype=torch.long)
            new_lo = torch.minimum(lo, torch.full_like(lo, -1))
            hi = lo + torch.tensor(grid.shape)
            new_hi = torch.maximum(hi, torch.full_like(hi, 2))
            full = f.expand(*(new_hi - new_lo).tolist()).clone()
            at = (lo - new_lo).tolist()
            full[at[0]:at[0] + grid.shape[0], at[1]:at[1] + grid.shape[1], at[2]:at[2] + grid.shape[2]] = grid
            zero = (-new_lo).tolist()
            full[zero[0], zero[1], zero[2]] = 0.0
        lookup = self.lookup if self.has_grid else "nearest"
        return StructureFactors(full, new_lo.tolist(), float(f), lookup, dtype=self.default_F.dtype,
                                device=self.default_F.device)

    def amplitude_sq(self, hkl: torch.Tensor) -> torch.Tensor:
        """|F|^2 at fractional indices hkl (..., 3); a scalar without a grid."""
        if not self.has_grid:
            return self.default_F * self.default_F
        f = ph.STRUCTURE_FACTOR_LOOKUPS[self.lookup](hkl, self.Fhkl, self.hkl_min, self.default_F)
        return f * f


def _cell_of_real(real: np.ndarray) -> tuple[float, ...]:
    a, b, c = (float(np.linalg.norm(v)) for v in real)

    def ang(u, v):
        return math.degrees(math.acos(max(-1.0, min(1.0, float(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v))))))

    return a, b, c, ang(real[1], real[2]), ang(real[0], real[2]), ang(real[0], real[1])


def _standard_real(cell) -> np.ndarray:
    c = torch.as_tensor(cell, dtype=torch.float64)
    real, _ = ph.real_cell(c[0], c[1], c[2], c[3] * DEG, c[4] * DEG, c[5] * DEG)
    return real.numpy()


def _nanobragg_vectors(cell, rot):
    """The original's construction: reciprocal vectors of the cell with a*
    along x, turned; real vectors along their cross products with exactly the
    cell lengths; reciprocal ones back from those and the cell-formula volume."""
    lengths, angles = cell[:3], cell[3:] * DEG
    recip, volume = ph.reciprocal_cell(lengths[0], lengths[1], lengths[2], angles[0], angles[1], angles[2])
    recip = recip @ rot.transpose(-1, -2)
    crosses = torch.stack([ph.cross(recip[1], recip[2]), ph.cross(recip[2], recip[0]),
                           ph.cross(recip[0], recip[1])])
    real = crosses / ph.norm(crosses).unsqueeze(-1) * lengths.unsqueeze(-1)
    return real, volume


def _standard_vectors(cell, rot):
    """Real vectors of the cell in the standard setting (a along x, b in the
    xy plane), turned: the same vectors a U matrix was derived from."""
    real, volume = ph.real_cell(cell[0], cell[1], cell[2], cell[3] * DEG, cell[4] * DEG, cell[5] * DEG)
    return real @ rot.transpose(-1, -2), volume


# How cell constants become vectors: the original's construction for -cell,
# the standard setting for crystals given as vectors (DIALS, A matrices).
CELL_SETTINGS = {"nanobragg": _nanobragg_vectors, "standard": _standard_vectors}


class Crystal(Model):
    """Resolved crystal values.

    cell: a, b, c (Angstrom), alpha, beta, gamma (degrees). U: rotation from the
    cell's setting (`setting`: "standard", a along x and b in the xy plane, or
    "nanobragg", the original's construction from a* along x) to the lab frame;
    misset: further rotations about lab x, y, z (degrees, applied in that
    order after U). The real-space vectors these give hold at goniometer
    angle 0. N: cells along a, b, c. mosaic_spread (degrees) scales the
    domain rotations `mosaic_axes` (D, 3) by `mosaic_factors` (D,); shape
    names the lattice factor (physics.LATTICE_FACTORS), fudge scales its size.
    `extras` keeps file fields torchbragg does not use.
    """

    def __init__(self, cell, U=None, *, misset=(0.0, 0.0, 0.0), N=(1.0, 1.0, 1.0), mosaic_spread=0.0,
                 mosaic_axes=None, mosaic_factors=None, shape: str = "square", fudge=1.0,
                 structure_factors: StructureFactors | None = None, space_group: str = " P 1",
                 setting: str = "standard", extras: dict | None = None, dtype=torch.float32, device="cpu"):
        super().__init__(dtype, device)
        self.extras = dict(extras or {})
        if shape not in ph.LATTICE_FACTORS:
            raise ValueError(f"unknown spot shape '{shape}'; known: {', '.join(ph.LATTICE_FACTORS)}")
        self._param("cell", cell)
        self._buffer("U", np.eye(3) if U is None else U, dtype=torch.float64)
        self._param("misset", misset)
        self._param("N", N)
        self._param("mosaic_spread", mosaic_spread)
        self._buffer("mosaic_axes", np.zeros((1, 3)) if mosaic_axes is None else mosaic_axes)
        self._buffer("mosaic_factors", np.zeros(1) if mosaic_factors is None else mosaic_factors)
        self.shape = shape
        self._param("fudge", fudge)
        self.structure_factors = structure_factors or StructureFactors(dtype=dtype, device=device)
        self.space_group = space_group
        if setting not in CELL_SETTINGS:
            raise ValueError(f"unknown cell setting '{setting}'")
        self.setting = setting

    # -- construction from the ways the field stores a crystal
    @classmethod
    def from_real_vectors(cls, a, b, c, **kw) -> "Crystal":
        """From real-space vectors (Angstrom, lab frame, at goniometer angle 0), as DIALS stores them."""
        real = np.array([a, b, c], dtype=np.float64)
        cell = _cell_of_real(real)
        # real rows = standard rows turned by U: real = real0 @ U.T
        U = np.linalg.solve(_standard_real(cell), real).T
        return cls(cell, U, setting="standard", **kw)

    @classmethod
    def from_reciprocal_vectors(cls, a_star, b_star, c_star, **kw) -> "Crystal":
        """From reciprocal vectors (1/Angstrom, lab frame), e.g. a MOSFLM A matrix / wavelength."""
        recip = torch.as_tensor(np.array([a_star, b_star, c_star], dtype=np.float64))
        return cls.from_real_vectors(*ph.real_from_reciprocal(recip).numpy(), **kw)

    # -- derived vectors
    def vectors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(real, reciprocal, volume): cell vectors as rows (Angstrom, 1/Angstrom)
        in the lab frame at goniometer angle 0, in float64; the reciprocal
        vectors follow from the real ones and the cell-formula volume."""
        rot = ph.rotation_xyz(self.misset.double() * DEG) @ self.U.double()
        real, volume = CELL_SETTINGS[self.setting](self.cell.double(), rot)
        recip = torch.stack([ph.cross(real[1], real[2]), ph.cross(real[2], real[0]),
                             ph.cross(real[0], real[1])]) / volume
        return real, recip, volume

    def real_vectors(self) -> torch.Tensor:
        return self.vectors()[0]

    def reciprocal_vectors(self) -> torch.Tensor:
        return self.vectors()[1]

    def automatic_oversample(self, wavelength: float, distance: float, pixel: float) -> int:
        """`resolve.automatic_oversample` for this crystal (distance and pixel
        in metres, wavelength in Angstrom)."""
        with torch.no_grad():
            lengths = torch.linalg.norm(self.real_vectors(), dim=-1).tolist()
            extent = crystal_extent(lengths, self.N.double().tolist())
        return int(automatic_oversample(extent, wavelength, distance, pixel))

    def volume(self) -> torch.Tensor:
        return self.vectors()[2]

    @property
    def mosaic_domains(self) -> int:
        return self.mosaic_factors.shape[0]

    def mosaic_rotations(self) -> torch.Tensor:
        """(D, 3, 3) rotation of each mosaic domain (factor 0: the identity)."""
        angle = self.mosaic_spread * DEG * self.mosaic_factors.to(self.mosaic_spread)
        return ph.rotation_axis_angle(self.mosaic_axes.to(self.mosaic_spread), angle)

    def lattice_factor_sq(self, hkl: torch.Tensor, recip: torch.Tensor) -> torch.Tensor:
        return ph.lattice_factor_sq(self.shape, hkl, self.N, recip, self.fudge)
