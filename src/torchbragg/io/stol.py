""".stol tables: sin(theta)/lambda against the structure factor of one
molecule of an amorphous material, one point a line.

Blank lines and lines starting with '#' are skipped; numbers are separated by
spaces, tabs or any of ,;:! as in the original. Only the first two columns are
used: a third column (nanoice.stol has one) is ignored with a warning, where
the original read the comment lines as points at stol 0 and made NaN pixels.
Tables with fewer than two points, a non-finite value, or a stol value given
twice are refused. A table whose stol goes back somewhere (shortwater.stol
does) is accepted with a warning and interpolated as the original does: each
point's place in the table is found by walking from the previous pixel's, so
the result depends on the pixel order, which torchbragg then follows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

_SPLIT = re.compile(r"[\s,;:!]+")

# what the first column holds, by the flag that names the file: sin(theta)/lambda,
# 4 sin(theta)/lambda (= 2/d), or Q = 4 pi sin(theta)/lambda, all per Angstrom
STOL_PER_COLUMN = {"-stol": 1.0, "-4stol": 0.25, "-Q": 1.0 / (4.0 * math.pi)}


@dataclass
class StolTable:
    stol: np.ndarray  # sin(theta)/lambda, 1/A, increasing
    F: np.ndarray  # structure factor of one molecule (electrons)
    warnings: list[str] = field(default_factory=list)


def read_stol(path, stol_per_column: float = 1.0) -> StolTable:
    """Read a table; the first column times `stol_per_column` is sin(theta)/lambda."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"cannot read {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"cannot read {path}: it is a folder") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    stol, F, extra = [], [], 0
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        words = [w for w in _SPLIT.split(text) if w]
        if len(words) < 2:
            raise InputError(f"{path} line {number}: expected 'stol F', got '{text[:60]}'")
        try:
            s, f = float(words[0]), float(words[1])
        except ValueError:
            raise InputError(f"{path} line {number}: expected two numbers 'stol F', got '{text[:60]}'") from None
        if not (math.isfinite(s) and math.isfinite(f)):
            raise InputError(f"{path} line {number}: stol and F must be finite numbers, got '{text[:60]}'")
        extra = max(extra, len(words) - 2)
        stol.append(s * stol_per_column)
        F.append(f)
    if len(stol) < 2:
        raise InputError(f"{path} has {len(stol)} point(s); a .stol table needs at least 2 lines 'stol F'")
    s = np.asarray(stol, dtype=np.float64)
    steps = np.diff(s)
    warnings = []
    if (steps == 0).any():
        k = int(np.argmax(steps == 0))
        raise InputError(f"{path}: sin(theta)/lambda {stol[k]:g} appears twice (points {k + 1} and {k + 2}); "
                         "each value may appear once")
    if (steps < 0).any():
        k = int(np.argmax(steps < 0))
        warnings.append(f"{path}: sin(theta)/lambda goes back from {stol[k]:g} to {stol[k + 1]:g} (point {k + 2}); "
                        "interpolating as the original does, in its pixel order (slower)")
    if extra:
        cols = "column 3" if extra == 1 else f"columns 3 to {extra + 2}"
        warnings.append(f"{path}: ignoring {cols}; only the first two (stol F) are used")
    return StolTable(s, np.asarray(F, dtype=np.float64), warnings)
