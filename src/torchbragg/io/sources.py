"""Source files for -sourcefile: one source per line, `X Y Z weight lambda`."""

from __future__ import annotations

import math
import re

from ..errors import InputError

_DELIMS = r"[ \t,;:!]+"


def read_sources(path: str) -> list[tuple[float, float, float, float, float]]:
    """Rows of (X, Y, Z, weight, lambda in metres); a missing column is NaN
    (the original then puts the source 10 m up-beam, weight 1, the beam's
    wavelength). Blank lines are skipped; a token that is not a number is an error."""
    try:
        lines = open(path).read().splitlines()
    except OSError as exc:
        raise InputError(f"cannot read source file {path}: {exc.strerror}") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        toks = [t for t in re.split(_DELIMS, line.strip()) if t]
        if not toks:
            continue
        vals = []
        for t in toks[:5]:
            try:
                vals.append(float(t))
            except ValueError:
                raise InputError(f"{path}:{lineno}: '{t}' is not a number") from None
        vals += [math.nan] * (5 - len(vals))
        rows.append(tuple(vals))
    if not rows:
        raise InputError(f"{path}: no sources")
    return rows
