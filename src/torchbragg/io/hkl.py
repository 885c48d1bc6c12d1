"""Structure factors: the P1 HKL text table and the original's binary cache
(Fdump.bin), in the original's layout so either program reads the other's."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass
class HKLTable:
    """Structure factors on a dense grid; grid[h - h_min, k - k_min, l - l_min]."""
    grid: np.ndarray  # float64 (h_range, k_range, l_range)
    h_min: int
    k_min: int
    l_min: int
    count: int = 0  # reflections read from the text file
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


def read_hkl(path: str, default_F: float = 0.0) -> HKLTable:
    """Read `h k l F` lines. Reflections not listed get default_F. Non-integer
    indices are accepted with a warning (like the original, which truncates
    them); a line that is not four numbers is an error naming the line."""
    if not os.path.isfile(path):
        raise InputError(f"cannot read HKL file {path}: no such file")
    rows, warnings = [], []
    with open(path, "r", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = re.split(r"[\s,]+", text)
            try:
                vals = [float(p) for p in parts[:4]]
            except ValueError:
                vals = []
            if len(parts) < 4 or len(vals) < 4 or not all(math.isfinite(v) for v in vals):
                raise InputError(f"{path}:{lineno}: expected four numbers 'h k l F', got '{text[:60]}'")
            for name, v in zip("hkl", vals[:3]):
                if v != math.ceil(v - 0.4):
                    warnings.append(f"WARNING: non-integer value for {name} ({v:g}) at line {len(rows)}")
            rows.append(vals)
    if not rows:
        raise InputError(f"{path}: no reflections (expected lines of 'h k l F')")
    data = np.asarray(rows, dtype=np.float64)
    idx = np.trunc(data[:, :3]).astype(np.int64)  # the original stores indices through an int
    lo = idx.min(axis=0)
    hi = idx.max(axis=0)
    shape = tuple(int(x) for x in hi - lo + 1)
    if np.prod(shape) > 2e9 / 8:
        raise InputError(f"{path}: index range {shape} is too large for a dense table")
    grid = np.full(shape, float(default_F), dtype=np.float64)
    grid[idx[:, 0] - lo[0], idx[:, 1] - lo[1], idx[:, 2] - lo[2]] = data[:, 3]
    return HKLTable(grid, int(lo[0]), int(lo[1]), int(lo[2]), count=len(rows), warnings=tuple(warnings))


def fdump_bytes(table: HKLTable) -> bytes:
    """The original's cache: a text line of index ranges and a form feed, then
    the table as native doubles with one padding plane on each high edge."""
    h, k, l = table.grid.shape
    padded = np.zeros((h + 1, k + 1, l + 1), dtype="<f8")
    padded[:h, :k, :l] = table.grid
    head = "%d %d %d %d %d %d\n\f" % (table.h_min, table.h_max, table.k_min, table.k_max, table.l_min, table.l_max)
    return head.encode("ascii") + padded.tobytes()


def write_fdump(path: str, table: HKLTable) -> None:
    from .atomic import atomic_write
    atomic_write(path, fdump_bytes(table))


def read_fdump(path: str) -> HKLTable:
    try:
        raw = open(path, "rb").read()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    end = raw.find(b"\f")
    try:
        if end < 0:
            raise ValueError
        h0, h1, k0, k1, l0, l1 = (int(x) for x in raw[:end].split())
    except ValueError:
        raise InputError(f"{path} is not a structure-factor cache (bad header)") from None
    shape = (h1 - h0 + 2, k1 - k0 + 2, l1 - l0 + 2)
    body = raw[end + 1:]
    need = int(np.prod(shape)) * 8
    if min(shape) < 2 or len(body) < need:
        raise InputError(f"{path} is truncated: expected {need} bytes of data, found {len(body)}")
    padded = np.frombuffer(body[:need], dtype="<f8").reshape(shape)
    grid = padded[:-1, :-1, :-1].copy()
    return HKLTable(grid, h0, k0, l0, count=int(np.prod(grid.shape)))
