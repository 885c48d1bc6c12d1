"""Source files for -sourcefile: one source per line, ``X Y Z weight lambda``."""

from __future__ import annotations

import math

from ..errors import InputError
from .hkl import NUMBER

# the original's column separators
DELIMITERS = " \t,;:!"
_SPLIT = str.maketrans({c: " " for c in DELIMITERS})


def _number(tok: str) -> float:
    if NUMBER.match(tok) or tok.lower() in ("nan", "+nan", "-nan"):
        return float(tok)
    raise ValueError(tok)


def read_text_columns(path, ncols: int, what: str = "text", line_numbers: bool = False) -> list[tuple[float, ...]]:
    """Rows of ``ncols`` numbers, the original's multi-column text format.

    Columns are separated by any run of space, tab, comma, semicolon, colon
    or exclamation mark; a line holding only separators is skipped; missing
    columns are NaN (a value may also be given as ``nan``); columns beyond
    ``ncols`` are ignored.  Where the original reads any other text as 0
    (comments included), this is an ``InputError`` naming the line, and so
    is an infinite value.  The original also turns missing columns of a last
    line without a newline into 0 rather than NaN; here they are NaN like on
    every other line. With ``line_numbers`` each row starts with its line.
    """
    try:
        with open(path, "r", encoding="latin-1") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"cannot read {what} file {path}: no such file") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        toks = line.translate(_SPLIT).split()
        if not toks:
            continue
        vals = []
        for tok in toks[:ncols]:
            try:
                vals.append(_number(tok))
            except ValueError:
                raise InputError(f"{path}:{lineno}: '{tok[:40]}' is not a number") from None
            if math.isinf(vals[-1]):
                raise InputError(f"{path}:{lineno}: '{tok[:40]}' is not finite")
        vals += [math.nan] * (ncols - len(vals))
        rows.append((lineno, *vals) if line_numbers else tuple(vals))
    return rows


def read_sources(path) -> list[tuple[float, float, float, float, float]]:
    """Rows of (X, Y, Z, weight, lambda in metres); a missing column is NaN.

    The original then fills a missing position with the point 10 m up-beam
    (-source_distance * beam direction, per component), a missing weight
    with 1 and a missing wavelength with the beam's (``source_defaults``).
    An empty file is an ``InputError`` (the original exits with an error),
    and so is a source at the sample (0 0 0: no direction) or a wavelength
    that is not positive, which would make the image NaN.
    """
    rows = read_text_columns(path, 5, "source", line_numbers=True)
    if not rows:
        raise InputError(f"{path}: no sources")
    for lineno, x, y, z, _w, lam in rows:
        if x == 0 and y == 0 and z == 0:
            raise InputError(f"{path}:{lineno}: source at 0 0 0 is at the sample and has no direction")
        if not (math.isnan(lam) or lam > 0):
            raise InputError(f"{path}:{lineno}: wavelength {lam:g} m must be positive")
    return [tuple(r[1:]) for r in rows]


def source_defaults(rows, beam_vector, wavelength_m: float, source_distance: float = 10.0):
    """The original's defaults for NaN columns (beam_vector: unit, towards the sample)."""
    out = []
    for x, y, z, w, lam in rows:
        out.append((
            -source_distance * beam_vector[0] if math.isnan(x) else x,
            -source_distance * beam_vector[1] if math.isnan(y) else y,
            -source_distance * beam_vector[2] if math.isnan(z) else z,
            1.0 if math.isnan(w) else w,
            wavelength_m if math.isnan(lam) else lam,
        ))
    return out
