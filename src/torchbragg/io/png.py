"""Minimal PNG writer (zlib + struct) and 8-bit preview scaling.

Only what the comparison previews need: 8-bit grayscale (2-D arrays) and
8-bit RGB (H, W, 3 arrays), no interlacing, no dependency beyond numpy.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    """Encode a uint8 array of shape (H, W) or (H, W, 3) as PNG bytes."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"write_png needs a uint8 array, got {arr.dtype}")
    if arr.ndim == 2:
        color_type, channels = 0, 1
    elif arr.ndim == 3 and arr.shape[2] == 3:
        color_type, channels = 2, 3
    else:
        raise ValueError(f"write_png needs shape (H, W) or (H, W, 3), got {arr.shape}")
    height, width = arr.shape[:2]
    if height < 1 or width < 1:
        raise ValueError("write_png needs a non-empty image")
    rows = np.ascontiguousarray(arr).reshape(height, width * channels)
    # filter type 0 (None) byte in front of every scanline
    raw = np.empty((height, width * channels + 1), dtype=np.uint8)
    raw[:, 0] = 0
    raw[:, 1:] = rows
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), compress_level))
        + _chunk(b"IEND", b"")
    )


def write_png(path, image: np.ndarray) -> None:
    """Write a uint8 array of shape (H, W) (grayscale) or (H, W, 3) (RGB)."""
    Path(path).write_bytes(encode_png(image))


def scale_max(images, percentile: float = 99.5) -> float:
    """Upper display limit: the given percentile of the finite values of all images.

    Falls back to the maximum when the percentile is not positive (sparse
    patterns), and to 1.0 when everything is zero or non-finite.
    """
    vals = [np.asarray(im, dtype=np.float64).ravel() for im in images]
    vals = [v[np.isfinite(v)] for v in vals]
    vals = [v for v in vals if v.size]
    if not vals:
        return 1.0
    allv = np.concatenate(vals)
    top = float(np.percentile(allv, percentile, method="lower"))
    if not top > 0.0:
        top = float(allv.max())
    if not top > 0.0:
        top = 1.0
    return top


def preview(image, vmax: float | None = None, percentile: float = 99.5,
            vmin: float = 0.0) -> np.ndarray:
    """Map a float image linearly from [vmin, vmax] to uint8 [0, 255], clipped.

    vmax defaults to a robust limit, ``scale_max(image, percentile)``.
    Non-finite pixels become 0.
    """
    arr = np.asarray(image, dtype=np.float64)
    if vmax is None:
        vmax = scale_max([arr], percentile)
    span = vmax - vmin
    if not span > 0.0:
        span = 1.0
    out = (arr - vmin) / span
    out = np.where(np.isfinite(out), out, 0.0)
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def diff_preview(diff, percentile: float = 99.5) -> np.ndarray:
    """Signed difference as RGB: blue negative, white zero, red positive.

    The colour saturates at the given percentile of |diff|.
    """
    d = np.asarray(diff, dtype=np.float64)
    d = np.where(np.isfinite(d), d, 0.0)
    lim = scale_max([np.abs(d)], percentile)
    t = np.clip(d / lim, -1.0, 1.0)
    fade = np.round((1.0 - np.abs(t)) * 255.0).astype(np.uint8)
    rgb = np.empty(d.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = np.where(t >= 0, 255, fade)
    rgb[..., 1] = fade
    rgb[..., 2] = np.where(t <= 0, 255, fade)
    return rgb
