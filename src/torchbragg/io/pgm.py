"""8-bit PGM previews in the original's layout."""

from __future__ import annotations

import numpy as np


def pgm_file_bytes(pixels: np.ndarray, scale: float) -> bytes:
    """P5 header, the original's comment line with the scale, 255, then the bytes."""
    height, width = pixels.shape
    head = "P5\n%d %d\n# pixels scaled by %g\n255\n" % (width, height, scale)
    return head.encode("ascii") + np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
