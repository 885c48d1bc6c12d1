"""Structure factors: the P1 HKL text table and the original's binary cache
(Fdump.bin), in the original's layout so either program reads the other's."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

# what C's strtod takes as a decimal number (no hex floats, no underscores)
# one decimal number, as the text readers (hkl, matrix, source files) accept it
NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_MAX_CELLS = 2e9 / 8
_MAX_INDEX = 2.0 ** 31  # the original keeps indices in C ints


@dataclass
class HKLTable:
    """Structure factors on a dense grid; grid[h - h_min, k - k_min, l - l_min]."""
    grid: np.ndarray  # float64 (h_range, k_range, l_range)
    h_min: int
    k_min: int
    l_min: int
    count: int = 0  # reflections read (the original's "hkls")
    warnings: tuple[str, ...] = ()

    @property
    def h_max(self) -> int:
        return self.h_min + self.grid.shape[0] - 1

    @property
    def k_max(self) -> int:
        return self.k_min + self.grid.shape[1] - 1

    @property
    def l_max(self) -> int:
        return self.l_min + self.grid.shape[2] - 1

    @property
    def h_range(self) -> int:
        return self.grid.shape[0]

    @property
    def k_range(self) -> int:
        return self.grid.shape[1]

    @property
    def l_range(self) -> int:
        return self.grid.shape[2]


def _parse_number(tok: str) -> float:
    if NUMBER.match(tok):
        return float(tok)
    raise ValueError(tok)


def read_hkl(path, default_F: float = 0.0) -> HKLTable:
    """Read a text file of ``h k l F`` lines.

    Like the original: the index ranges span the smallest to largest index
    read, entries not in the file get ``default_F`` (0 when it is 0), and a
    later line for the same reflection wins.

    Unlike the original, which stops reading silently at the first thing
    that is not a number, a line that is not exactly four numbers is an
    ``InputError`` naming the file and line, and so is a non-finite amplitude
    or an index beyond the original's int range. A line with a non-integer
    index (``0.5 0 0 10``), which the original would truncate onto another
    reflection, is skipped with a warning (returned in ``warnings`` for the
    caller to print). Blank lines are skipped.
    """
    try:
        with open(path, "r", encoding="latin-1") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"cannot read HKL file {path}: no such file") from None
    except OSError as exc:
        raise InputError(f"cannot read HKL file {path}: {exc.strerror or exc}") from None

    data = _plain_table(lines)
    if data is not None:
        return _table(path, data, default_F, ())
    rows: list[list[float]] = []
    warnings: list[str] = []
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        try:
            vals = [_parse_number(p) for p in parts]
        except ValueError as exc:
            raise InputError(f"{path}:{lineno}: '{exc.args[0][:40]}' is not a number "
                             f"(expected 'h k l F')") from None
        if len(vals) != 4:
            raise InputError(f"{path}:{lineno}: expected four numbers 'h k l F', found {len(vals)}")
        if not math.isfinite(vals[3]):
            raise InputError(f"{path}:{lineno}: amplitude '{parts[3][:40]}' is not finite")
        for name, v in zip("hkl", vals[:3]):
            if not abs(v) < _MAX_INDEX:
                raise InputError(f"{path}:{lineno}: index {name}={parts['hkl'.index(name)][:40]} is out of range "
                                 f"(|index| < {_MAX_INDEX:.0e})")
        odd = [f"{name}={v:g}" for name, v in zip("hkl", vals[:3]) if v != int(v)]
        if odd:
            # truncating would land on (and overwrite) another reflection
            warnings.append(f"WARNING: {path}:{lineno}: non-integer index {' '.join(odd)}; line skipped")
            continue
        rows.append(vals)
    if not rows:
        raise InputError(f"{path}: no reflections (expected lines of 'h k l F')")

    return _table(path, np.asarray(rows, dtype=np.float64), default_F, tuple(warnings))


_PLAIN = re.compile(r"[0-9eE+\-.\s]*")


def _plain_table(lines: list[str]) -> np.ndarray | None:
    """The (n, 4) numbers of a table whose every line is four plain decimal
    numbers with integer indices, read at numpy's speed; None for anything
    else, which the line-by-line reader then explains."""
    text = "\n".join(lines)
    if not _PLAIN.fullmatch(text):
        return None
    tokens = text.split()
    if not tokens or any(len(line.split()) not in (0, 4) for line in lines):
        return None
    try:
        data = np.array(tokens, dtype=np.float64).reshape(-1, 4)
    except ValueError:
        return None
    idx = data[:, :3]
    if not (np.isfinite(data).all() and (np.abs(idx) < _MAX_INDEX).all() and (idx == np.trunc(idx)).all()):
        return None
    return data


def _table(path, data: np.ndarray, default_F: float, warnings: tuple[str, ...]) -> HKLTable:
    idx = np.trunc(data[:, :3]).astype(np.int64)  # the original keeps indices in ints
    lo = idx.min(axis=0)
    hi = idx.max(axis=0)
    shape = tuple(int(x) for x in hi - lo + 1)
    if float(np.prod([s + 1 for s in shape], dtype=np.float64)) > _MAX_CELLS:
        raise InputError(f"{path}: index range {shape} is too large for a dense table")
    grid = np.full(shape, float(default_F), dtype=np.float64)
    grid[idx[:, 0] - lo[0], idx[:, 1] - lo[1], idx[:, 2] - lo[2]] = data[:, 3]
    return HKLTable(grid, int(lo[0]), int(lo[1]), int(lo[2]), count=len(data), warnings=warnings)


def fdump_bytes(table: HKLTable) -> bytes:
    """The original's cache: ``h_min h_max k_min k_max l_min l_max`` then newline
    and form feed, then the table as native doubles, (h_range+1) x (k_range+1)
    x (l_range+1) with the extra high planes zero."""
    h, k, l = table.grid.shape
    padded = np.zeros((h + 1, k + 1, l + 1), dtype="=f8")
    padded[:h, :k, :l] = table.grid
    head = "%d %d %d %d %d %d\n\f" % (table.h_min, table.h_max, table.k_min, table.k_max,
                                      table.l_min, table.l_max)
    return head.encode("ascii") + padded.tobytes()


def write_fdump(path, table: HKLTable) -> None:
    """Write the cache whole or not at all. The cache is optional, so failures
    stay ``OSError`` for the caller to report as a warning."""
    from .atomic import raw_atomic_open
    with raw_atomic_open(path, "wb") as fh:
        fh.write(fdump_bytes(table))


_FDUMP_HEAD = re.compile(rb"\s*([+-]?\d+)\s+([+-]?\d+)\s+([+-]?\d+)\s+([+-]?\d+)\s+([+-]?\d+)\s+([+-]?\d+)[ \t\r]*\n\f")


def read_fdump(path) -> HKLTable:
    """Read a cache written by ``write_fdump`` or the original."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise InputError(f"cannot read {path}: no such file") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    m = _FDUMP_HEAD.match(raw[:200])
    if not m:
        raise InputError(f"{path} is not a structure-factor cache (bad header)")
    h0, h1, k0, k1, l0, l1 = (int(x) for x in m.groups())
    shape = (h1 - h0 + 2, k1 - k0 + 2, l1 - l0 + 2)
    if min(shape) < 2:
        raise InputError(f"{path}: empty index range in the header")
    if float(np.prod(shape, dtype=np.float64)) > _MAX_CELLS:
        raise InputError(f"{path}: index range is too large")
    body = raw[m.end():]
    need = int(np.prod(shape)) * 8
    if len(body) < need:
        raise InputError(f"{path} is truncated: expected {need} bytes of data, found {len(body)}")
    padded = np.frombuffer(body[:need], dtype="=f8").reshape(shape)
    grid = padded[:-1, :-1, :-1].astype(np.float64)
    if not np.isfinite(grid).all():
        raise InputError(f"{path}: {int((~np.isfinite(grid)).sum())} structure factors are NaN or infinite "
                         "(delete the cache or give -hkl)")
    return HKLTable(grid, h0, k0, l0, count=int(np.prod(grid.shape)))
