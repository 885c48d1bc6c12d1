"""End-of-run statistics and the integer/PGM image scalings of nanoBragg.

All of these follow the C's arithmetic: the float image is float32, the
accumulators are doubles, sums run in row-major pixel order.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = [
    "ImageStats", "image_statistics", "intfile_scale", "int_image",
    "pgm_scale", "pgm_bytes", "c_g", "format_report",
]


@dataclass
class ImageStats:
    max_I: float
    max_I_x: float   # Fdet (m) of the pixel's last sub-pixel
    max_I_y: float   # Sdet (m)
    mean: float
    rms: float
    rmsd: float
    n_pixels: int    # unmasked pixels in the ROI (the C's sumn)


def _roi_slices(roi, spixels: int, fpixels: int):
    if roi is None:
        return slice(0, spixels), slice(0, fpixels)
    xmin, xmax, ymin, ymax = (int(v) for v in roi)
    xmin, ymin = max(xmin, 0), max(ymin, 0)
    xmax, ymax = min(xmax, fpixels - 1), min(ymax, spixels - 1)
    if xmin > xmax or ymin > ymax:
        return slice(0, 0), slice(0, 0)
    return slice(ymin, ymax + 1), slice(xmin, xmax + 1)


def _seq_sum(values: np.ndarray) -> float:
    # the C adds one pixel at a time; a running sum keeps its rounding
    if values.size == 0:
        return 0.0
    from .noise import _LIB
    if _LIB is not None:
        v = np.ascontiguousarray(values, dtype=np.float64)
        return float(_LIB.tb_running_sum(v.ctypes.data, v.size))
    return float(np.add.accumulate(values, dtype=np.float64)[-1])


def _omp_chunks(n: int, threads: int) -> list[tuple[int, int]]:
    """Row ranges of an OpenMP static schedule (libgomp: the first n % T threads get one more)."""
    threads = max(1, min(int(threads), max(n, 1)))
    q, r = divmod(n, threads)
    out, start = [], 0
    for i in range(threads):
        size = q + (1 if i < r else 0)
        out.append((start, start + size))
        start += size
    return out


def image_statistics(image, roi=None, mask=None, pixel_size_m: float = 0.0001,
                     oversample: int = 1, omp_threads: int = 1) -> ImageStats:
    """The C's max_I (and where), mean, rms and rmsd of a float image.

    image: (spixels, fpixels) float32 photons.
    roi: (xmin, xmax, ymin, ymax) inclusive, or None for the whole image.
    mask: optional array, pixels where it is 0 are skipped (as ``-mask``).
    pixel_size_m, oversample: give the reported position of the maximum,
        which is the Fdet/Sdet of the last sub-pixel of the first pixel (row
        by row) holding the maximum; (0, 0) when no pixel exceeds 0.

    mean and rms cover unmasked ROI pixels; rmsd (deviation from that mean)
    covers every ROI pixel, masked or not, as in the C.

    omp_threads: the C renders rows in parallel (OpenMP, static schedule)
        and keeps the maximum in a shared variable, so when several pixels
        share the maximum the one reported depends on timing.  With T > 1
        the pixel chosen is the one a lockstep run of T threads meets first,
        and the sums are per-thread partial sums; the reference outputs were
        made with 2 threads.  1 gives the serial program.
    """
    img = np.asarray(image, dtype=np.float32)
    spixels, fpixels = img.shape
    sy, sx = _roi_slices(roi, spixels, fpixels)
    sub = img[sy, sx]
    y0, x0 = sy.start or 0, sx.start or 0
    if mask is None:  # every ROI pixel: rows follow from positions
        vals = sub.reshape(-1)
        width = sub.shape[1]

        def where(flat):
            return flat // width + y0, flat % width + x0

        def row_start(row):
            return min(max(row - y0, 0), sub.shape[0]) * width
    else:
        sel = np.asarray(mask)[sy, sx] != 0
        vals = sub[sel]  # row-major order
        rows, cols = np.nonzero(sel)
        rows, cols = rows + y0, cols + x0

        def where(flat):
            return rows[flat], cols[flat]

        def row_start(row):
            return int(np.searchsorted(rows, row))
    n = int(vals.size)
    chunks = _omp_chunks(spixels, omp_threads)

    max_I, max_x, max_y = 0.0, 0.0, 0.0
    if n:
        finite = np.where(np.isnan(vals), -np.inf, vals)
        top = float(finite.max())
        if top > 0.0:
            max_I = top
            hr, hc = where(np.nonzero(finite == top)[0])
            starts = np.array([lo for lo, _ in chunks])
            thread = np.searchsorted(starts, hr, side="right") - 1
            # earliest in a lockstep run: local row, then column, then thread
            order = np.lexsort((thread, hc, hr - starts[thread]))
            spixel, fpixel = int(hr[order[0]]), int(hc[order[0]])
            sub_size = pixel_size_m / oversample
            last = oversample - 1
            max_x = sub_size * (fpixel * oversample + last) + sub_size / 2.0
            max_y = sub_size * (spixel * oversample + last) + sub_size / 2.0

    total = 0.0
    sumsqr = 0.0
    parts = [slice(row_start(lo), row_start(hi)) for lo, hi in chunks]  # each thread's rows: one run
    from .noise import _LIB
    if _LIB is not None:
        vals = np.ascontiguousarray(vals, dtype=np.float32)
        for part in parts:
            run = vals[part]
            s, q = ctypes.c_double(), ctypes.c_double()
            _LIB.tb_float_moments(run.ctypes.data, run.size, ctypes.byref(s), ctypes.byref(q))
            total += s.value
            sumsqr += q.value
    else:
        # float * float is rounded to float before the double accumulation
        # (and overflows to inf for huge pixels, as in the original: no warning)
        with np.errstate(over="ignore"):
            sq = (vals * vals).astype(np.float64)
        v64 = vals.astype(np.float64)
        for part in parts:
            total += _seq_sum(v64[part])
            sumsqr += _seq_sum(sq[part])
    sumn = n if n > 0 else 1
    avg = total / sumn
    if sumn <= 1:
        sumn = 2
    rms = math.sqrt(sumsqr / (sumn - 1))

    if _LIB is not None:
        every = np.ascontiguousarray(sub, dtype=np.float32)
        sumsqr2 = float(_LIB.tb_deviation_sq(every.ctypes.data, every.size, avg))
    else:
        dev = sub.astype(np.float64).ravel() - avg
        sumsqr2 = _seq_sum(dev * dev)
    n2 = int(sub.size)
    if n2 <= 1:
        n2 = 2
    rmsd = math.sqrt(sumsqr2 / (n2 - 1))
    return ImageStats(max_I, max_x, max_y, avg, rms, rmsd, n)


def intfile_scale(scale: float, max_I: float) -> float:
    """Scale for the integer image: ``scale`` if > 0, else 55000/max_I (1 if max_I <= 0)."""
    if scale <= 0.0:
        scale = 1.0
        if max_I > 0.0:
            scale = 55000.0 / max_I
    return scale


def _c_to_unsigned(x: np.ndarray, bits: int) -> np.ndarray:
    # C double -> unsigned char/short on x86-64: truncate to int32, keep the
    # low bits; NaN and out-of-range give INT_MIN, i.e. 0
    x = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(x) | (np.abs(x) >= 2147483648.0)
    i = np.trunc(np.where(bad, 0.0, x)).astype(np.int64)
    return (i & ((1 << bits) - 1)).astype(np.uint8 if bits == 8 else np.uint16)


def _fma_np(a: np.ndarray, b: float, c: float) -> np.ndarray:
    """a*b + c with (practically always) one rounding, elementwise.

    Dekker's exact product and a two-sum give the exact value as three
    doubles; adding the small parts first leaves only one rounding that
    matters.
    """
    from .noise import _LIB
    if _LIB is not None:
        src = np.ascontiguousarray(a, dtype=np.float64)
        out = np.empty_like(src)
        _LIB.tb_fma_array(src.ctypes.data, src.size, float(b), float(c), out.ctypes.data)
        return out
    a = np.asarray(a, dtype=np.float64)
    b = np.float64(b)
    c = np.float64(c)
    with np.errstate(over="ignore", invalid="ignore"):
        p = a * b
        split = 134217729.0  # 2**27 + 1
        ca = split * a
        ah = ca - (ca - a)
        al = a - ah
        cb = split * b
        bh = cb - (cb - b)
        bl = b - bh
        e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
        s = p + c
        bb = s - p
        err = (p - (s - bb)) + (c - bb)
        out = s + (err + e)
    # where the error terms are not finite (huge or non-finite input), the
    # plain result is what any build gives
    return np.where(np.isfinite(out), out, p + c)


def int_image(image, scale: float, adc_offset: float = 40.0, roi=None,
              max_I: Optional[float] = None, fma: bool = True) -> np.ndarray:
    """The C's integer image: floorf(pixel*scale + adc + 0.5), clipped to 0..65535.

    ``scale`` <= 0 means automatic (55000/max_I); ``max_I`` defaults to the
    ROI maximum (what the C's statistics give for an unmasked run).  Pixels
    outside the ROI are 0.  ``fma``: the reference build fuses
    ``pixel*scale + adc`` into one rounding (see ``rng``); it changes a pixel
    only when the sum lands within an ulp of a rounding boundary.
    """
    img = np.asarray(image, dtype=np.float32)
    if scale <= 0.0:
        if max_I is None:
            max_I = image_statistics(img, roi).max_I
        scale = intfile_scale(scale, max_I)
    out = np.zeros(img.shape, dtype=np.uint16)
    sy, sx = _roi_slices(roi, *img.shape)
    from .noise import _LIB
    if _LIB is not None:
        vals = np.ascontiguousarray(img[sy, sx])
        part = np.empty(vals.shape, dtype=np.uint16)
        _LIB.tb_int_image(vals.ctypes.data, vals.size, float(scale), float(adc_offset), int(bool(fma)),
                          part.ctypes.data)
        out[sy, sx] = part
        return out
    vals = img[sy, sx].astype(np.float64)
    if fma:
        test = _fma_np(vals, float(scale), float(adc_offset))
    else:
        test = vals * float(scale) + float(adc_offset)
    test = np.where(test > 65535.0, 65535.0, test)
    test = np.where(test < 0.0, 0.0, test)
    # floorf: the sum is rounded to float before flooring
    with np.errstate(invalid="ignore", over="ignore"):
        rounded = np.floor((test + 0.5).astype(np.float32)).astype(np.float64)
    out[sy, sx] = _c_to_unsigned(rounded, 16)
    return out


def pgm_scale(scale: float, intfile_scale_value: float, rmsd: float) -> float:
    """PGM scale: ``scale`` if > 0, else 250/(5*rmsd), or the int-file scale when rmsd is 0."""
    if scale <= 0.0:
        scale = intfile_scale_value
        if rmsd > 0.0:
            scale = 250.0 / (5.0 * rmsd)
    return scale


def pgm_bytes(image, pgm_scale_value: float, roi=None) -> np.ndarray:
    """(spixels, fpixels) uint8 PGM pixels: pixel*scale, capped at 255, truncated."""
    img = np.asarray(image, dtype=np.float32)
    out = np.zeros(img.shape, dtype=np.uint8)
    sy, sx = _roi_slices(roi, *img.shape)
    test = img[sy, sx].astype(np.float64) * float(pgm_scale_value)
    test = np.where(test > 255.0, 255.0, test)
    out[sy, sx] = _c_to_unsigned(test, 8)
    return out


def c_g(x: float) -> str:
    """C printf ``%g`` of a double (Python's %g matches except for NaN's sign)."""
    x = float(x)
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    return "%g" % x


def c_f0(x: float) -> str:
    """C printf ``%.0f``."""
    x = float(x)
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    return "%.0f" % x


def format_report(stats: Optional[ImageStats] = None, intfile_scale_value: Optional[float] = None,
                  pgm_scale_value: Optional[float] = None, photons: Optional[float] = None,
                  overloads: Optional[int] = None) -> list[str]:
    """The C's end-of-run lines (without newlines), for the parts given."""
    lines = []
    if stats is not None:
        lines.append(f"max_I = {c_g(stats.max_I)}  at {c_g(stats.max_I_x)} {c_g(stats.max_I_y)}")
        lines.append(f"mean= {c_g(stats.mean)} rms= {c_g(stats.rms)} rmsd= {c_g(stats.rmsd)}")
    if intfile_scale_value is not None:
        lines.append(f"intfile_scale = {c_g(intfile_scale_value)}")
    if pgm_scale_value is not None:
        lines.append(f"pgm_scale = {c_g(pgm_scale_value)}")
    if photons is not None:
        lines.append(f"{c_f0(photons)} photons on noise image ({int(overloads or 0)} overloads)")
    return lines
