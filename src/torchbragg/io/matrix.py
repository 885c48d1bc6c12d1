"""MOSFLM orientation matrix files."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def read_mosflm_matrix(path: str) -> np.ndarray:
    """The reciprocal cell vectors (rows a*, b*, c*, times the wavelength) of a
    MOSFLM matrix file, whose first three lines hold the x, y and z components
    of a*, b* and c* in columns."""
    try:
        text = open(path).read()
    except OSError as exc:
        raise InputError(f"cannot read matrix file {path}: {exc.strerror}") from None
    numbers = []
    for tok in text.split():
        try:
            numbers.append(float(tok))
        except ValueError:
            break
        if len(numbers) == 9:
            break
    if len(numbers) < 9:
        raise InputError(f"{path}: expected a 3x3 matrix (9 numbers), found {len(numbers)}")
    columns = np.asarray(numbers, dtype=np.float64).reshape(3, 3)
    recip = columns.T.copy()
    if not np.all(np.isfinite(recip)) or abs(np.linalg.det(recip)) < 1e-12 * np.abs(recip).max() ** 3:
        raise InputError(f"{path}: the matrix is singular")
    return recip
