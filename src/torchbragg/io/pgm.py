"""8-bit PGM previews in the original's layout."""

from __future__ import annotations

import math

import numpy as np


def _g(x: float) -> str:
    x = float(x)
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    return "%g" % x


def pgm_file_bytes(pixels: np.ndarray, scale: float) -> bytes:
    """P5 header, the original's comment line with the scale, 255, then the bytes.

    ``pixels``: (spixels, fpixels) uint8, e.g. from ``stats.pgm_bytes``.
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError("PGM pixels must be 2-D (spixels, fpixels)")
    height, width = arr.shape
    head = "P5\n%d %d\n# pixels scaled by %s\n255\n" % (width, height, _g(scale))
    return head.encode("ascii") + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def write_pgm(path, pixels: np.ndarray, scale: float) -> None:
    """Write the PGM file whole or not at all."""
    from .atomic import atomic_write
    atomic_write(path, pgm_file_bytes(pixels, scale))


def read_pgm(path) -> np.ndarray:
    """Pixels of a binary (P5, 8-bit) PGM file as (height, width) uint8."""
    from ..errors import InputError
    try:
        raw = open(path, "rb").read()
    except OSError as exc:
        raise InputError(f"cannot read PGM file {path}: {exc.strerror or exc}") from None
    if not raw.startswith(b"P5"):
        raise InputError(f"{path} is not a binary PGM file")
    fields: list[int] = []
    pos = 2
    while len(fields) < 3:
        while pos < len(raw) and raw[pos:pos + 1].isspace():
            pos += 1
        if raw[pos:pos + 1] == b"#":
            nl = raw.find(b"\n", pos)
            pos = len(raw) if nl < 0 else nl + 1
            continue
        start = pos
        while pos < len(raw) and raw[pos:pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise InputError(f"{path}: bad PGM header")
        fields.append(int(raw[start:pos]))
    width, height, maxval = fields
    if maxval > 255:
        raise InputError(f"{path}: only 8-bit PGM files are supported")
    pos += 1  # one whitespace character ends the header
    body = raw[pos:pos + width * height]
    if len(body) < width * height:
        raise InputError(f"{path} is truncated")
    return np.frombuffer(body, dtype=np.uint8).reshape(height, width).copy()
