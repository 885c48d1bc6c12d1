"""MOSFLM orientation matrix files."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .hkl import NUMBER


def _number(tok: str) -> float:
    low = tok.lower()
    if NUMBER.match(tok) or low in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(tok)
    raise ValueError(tok)


def read_mosflm_matrix(path) -> np.ndarray:
    """Reciprocal cell vectors from a MOSFLM matrix file: rows a*, b*, c*.

    The original reads the first nine numbers of the file in order (line
    breaks do not matter) as a*x b*x c*x, a*y b*y c*y, a*z b*z c*z, so the
    file's first three lines hold the x, y and z components in columns; the
    rest of the file (U matrix, cell, missets) is ignored.  The vectors still
    include the wavelength of the indexing (divide by it, in Angstrom, for
    1/Angstrom).  Fewer than nine numbers, a non-number among them, or a
    singular or non-finite matrix is an ``InputError``.
    """
    try:
        with open(path, "r", encoding="latin-1") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise InputError(f"cannot read matrix file {path}: no such file") from None
    except OSError as exc:
        raise InputError(f"cannot read matrix file {path}: {exc.strerror or exc}") from None
    numbers = []
    for tok in text.split():
        try:
            numbers.append(_number(tok))
        except ValueError:
            raise InputError(f"{path}: '{tok[:40]}' is not a number (expected a 3x3 matrix)") from None
        if len(numbers) == 9:
            break
    if len(numbers) < 9:
        raise InputError(f"{path}: expected a 3x3 matrix (9 numbers), found {len(numbers)}")
    file_layout = np.asarray(numbers, dtype=np.float64).reshape(3, 3)
    recip = file_layout.T.copy()
    if not np.all(np.isfinite(recip)):
        raise InputError(f"{path}: the matrix has non-finite numbers")
    scale = np.abs(recip).max()
    # judge singularity on the matrix scaled to 1, so huge or tiny entries
    # neither overflow nor pass for singular
    if scale == 0.0 or abs(np.linalg.det(recip / scale)) <= 1e-12:
        raise InputError(f"{path}: the matrix is singular")
    return recip
