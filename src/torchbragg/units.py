"""Units and physical constants, in one place.

Lengths in the models are mm, wavelengths Angstrom, angles degrees (radians
inside the physics); the original's flags use the same units. These are the
factors between them and the constants the original uses, with its values.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError

DEG = math.pi / 180.0  # radians per degree
RTD = 180.0 * (1.0 / math.pi)  # degrees per radian, computed as the original does (180*M_1_PI)
MM = 1e-3  # metres per mm
UM = 1e-6  # metres per micron
MRAD = 1e-3  # radians per mrad
ANGSTROM = 1e-10  # metres per Angstrom

HC_EV_ANGSTROM = 12398.42  # h c in eV Angstrom, as the original's -energy flag uses it
HC_EV_ANGSTROM_CODATA = 12398.419843320026  # h c in eV Angstrom, CODATA 2018 (image headers)
R_E_SQR = 7.94079248018965e-30  # square of the classical electron radius (Thomson cross section), m^2
AVOGADRO = 6.02214179e23  # per mol, the original's value


def unit_vector(v) -> np.ndarray:
    """`v` (any 3 numbers) scaled to length 1, float64; a zero vector is refused."""
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    n = np.linalg.norm(v)
    if not n > 0:
        raise InputError(f"zero-length vector {tuple(float(x) for x in v)}")
    return v / n
