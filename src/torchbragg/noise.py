"""Poisson photon-noise image, draw for draw the same as nanoBragg's.

The C walks the image row by row, skips pixels outside the region of
interest (they stay 0), draws ``poidev(pixel)`` from the ``-seed`` stream,
adds the ADC offset, clips at 65535 (counting overloads) and truncates to
unsigned 16 bits.  The random stream is sequential, so this is a plain
Python loop; the common small-mean case is inlined and the uniform deviates
are generated in blocks.  About 1.5 s per million pixels at a mean of a few
photons on one current x86 core; pixels with means of 12 or more (rejection
method) cost a few microseconds each.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import rng as _rng
from .rng import BufferedRan1, Ran1, _exp, _f32

__all__ = ["noise_image"]


def _roi_bounds(roi, spixels: int, fpixels: int):
    if roi is None:
        return 0, fpixels - 1, 0, spixels - 1
    xmin, xmax, ymin, ymax = (int(v) for v in roi)
    return max(xmin, 0), min(xmax, fpixels - 1), max(ymin, 0), min(ymax, spixels - 1)


def _to_ushort(v: float) -> int:
    # C conversion of a double to unsigned short on x86-64: truncate to a
    # 32-bit int (NaN/huge -> INT_MIN), keep the low 16 bits
    if v != v or abs(v) >= 2147483648.0:
        return 0
    return int(v) & 0xFFFF


def noise_image(float_image: np.ndarray, seed: int, adc_offset: float = 40.0,
                roi=None, prior: Optional[Ran1] = None, fma: bool = True):
    """Poisson-noise version of ``float_image`` as the C's noise file.

    float_image: (spixels, fpixels) photons per pixel (cast to float32).
    seed: the stored seed (``-N`` for ``-seed N``).
    adc_offset: added to every photon count before clipping.
    roi: (xmin, xmax, ymin, ymax), inclusive pixel indices; None = whole image.
    prior: the stream that ran before (only used when ``seed`` > 0, see
        ``rng.Ran1``).
    fma: reproduce the fused multiply-adds of the reference build (only
        changes pixels with means of 12 or more; see ``rng``).

    Returns (uint16 image, total photons, overload count).
    """
    img = np.asarray(float_image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError("float_image must be 2-D (spixels, fpixels)")
    spixels, fpixels = img.shape
    out = np.zeros((spixels, fpixels), dtype=np.uint16)
    xmin, xmax, ymin, ymax = _roi_bounds(roi, spixels, fpixels)
    if xmin > xmax or ymin > ymax:
        return out, 0.0, 0

    stream = BufferedRan1(seed, prior=prior)
    adc = float(adc_offset)
    total = 0.0
    overloads = 0
    f32 = _f32
    exp = _exp

    buf = stream.buf
    pos = stream.pos
    oldm = stream.poi_oldm
    g = stream.poi_g
    for s in range(ymin, ymax + 1):
        row = img[s, xmin:xmax + 1].tolist()
        vals = [0] * len(row)
        for i, xm in enumerate(row):
            if xm < 12.0:
                if xm != oldm:
                    oldm = xm
                    g = f32(exp(-xm))
                em = 0.0
                if pos >= len(buf):
                    stream.refill()
                    buf = stream.buf
                    pos = 0
                t = buf[pos]
                pos += 1
                while t > g:
                    em += 1.0
                    if pos >= len(buf):
                        stream.refill()
                        buf = stream.buf
                        pos = 0
                    t = f32(t * buf[pos])
                    pos += 1
            else:
                # rare paths: hand the stream state to the reference code
                stream.pos = pos
                stream.poi_oldm = oldm
                stream.poi_g = g
                em = _rng.poidev(xm, stream, fma)
                buf = stream.buf
                pos = stream.pos
                oldm = stream.poi_oldm
                g = stream.poi_g
            total += em
            test = em + adc
            if test > 65535.0:
                test = 65535.0
                overloads += 1
            if 0.0 <= test:
                vals[i] = int(test)
            else:
                vals[i] = _to_ushort(test)
        out[s, xmin:xmax + 1] = vals
    return out, total, overloads


def _noise_image_reference(float_image, seed, adc_offset=40.0, roi=None, prior=None, fma=True):
    """Unoptimised loop over ``rng.poidev``; used by the tests as a cross-check."""
    img = np.asarray(float_image, dtype=np.float32)
    spixels, fpixels = img.shape
    out = np.zeros((spixels, fpixels), dtype=np.uint16)
    xmin, xmax, ymin, ymax = _roi_bounds(roi, spixels, fpixels)
    r = Ran1(seed, prior=prior)
    total, overloads = 0.0, 0
    for s in range(ymin, ymax + 1):
        for f in range(xmin, xmax + 1):
            test = _rng.poidev(float(img[s, f]), r, fma)
            total += test
            test += adc_offset
            if test > 65535.0:
                test = 65535.0
                overloads += 1
            out[s, f] = _to_ushort(test)
    return out, total, overloads

