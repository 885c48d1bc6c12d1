"""Poisson photon-noise image, draw for draw the same as nanoBragg's.

The C walks the image row by row, skips pixels outside the region of
interest (they stay 0), draws ``poidev(pixel)`` from the ``-seed`` stream,
adds the ADC offset, clips at 65535 (counting overloads) and truncates to
unsigned 16 bits.  The random stream is sequential, so this is a Python
loop over pixels.  Speed on one x86 core, per million pixels: about 1 s at
means below 1, 3 s at means around 5, and 10 s when the means are 12 or
more (the rejection method); a 2463x2527 image at a mean of 1 takes ~9 s.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from . import rng as _rng
from .rng import F32, BufferedRan1, Ran1, exp_or_inf, f32, fmaf, gammln

__all__ = ["noise_image"]

# the small-mean product runs in double; decisions closer than this to the
# threshold (relative) are redone with float32 rounding at every step
_TIE_TOL = 1e-5
_MAX_FAST_DRAWS = 60
_BLOCK = 1 << 16
_MARGIN = 512


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


def compiled_library():
    """The compiled helpers (_noise.c) through ctypes, or None when they were not built."""
    import ctypes
    import importlib.util
    try:
        spec = importlib.util.find_spec("torchbragg._noise")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    if not hasattr(lib, "tb_deviation_sq"):  # built from an older source
        return None
    lib.tb_fma_array.restype = None
    lib.tb_fma_array.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_double, ctypes.c_double, ctypes.c_void_p]
    lib.tb_running_sum.restype = ctypes.c_double
    lib.tb_running_sum.argtypes = [ctypes.c_void_p, ctypes.c_long]
    lib.tb_int_image.restype = None
    lib.tb_int_image.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_double, ctypes.c_double, ctypes.c_int,
                                 ctypes.c_void_p]
    lib.tb_float_moments.restype = None
    lib.tb_float_moments.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.POINTER(ctypes.c_double),
                                     ctypes.POINTER(ctypes.c_double)]
    lib.tb_deviation_sq.restype = ctypes.c_double
    lib.tb_deviation_sq.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_double]
    fn = lib.tb_noise_image
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                   ctypes.c_int, ctypes.c_long, ctypes.c_double, ctypes.c_int, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_long)]
    return lib


LIBRARY = compiled_library()  # None where no C compiler is at hand; the statistics use it too
_COMPILED = None if LIBRARY is None else LIBRARY.tb_noise_image


def compiled_available() -> bool:
    return _COMPILED is not None


def _noise_image_compiled(img, seed, adc_offset, roi, fma):
    import ctypes
    spixels, fpixels = img.shape
    out = np.zeros((spixels, fpixels), dtype=np.uint16)
    xmin, xmax, ymin, ymax = _roi_bounds(roi, spixels, fpixels)
    photons, overloads = ctypes.c_double(0.0), ctypes.c_long(0)
    if xmin <= xmax and ymin <= ymax:
        _COMPILED(img.ctypes.data, spixels, fpixels, xmin, xmax, ymin, ymax, int(seed), float(adc_offset),
                  int(bool(fma)), out.ctypes.data, ctypes.byref(photons), ctypes.byref(overloads))
    return out, photons.value, int(overloads.value)


def noise_image(float_image: np.ndarray, seed: int, adc_offset: float = 40.0,
                roi=None, prior: Optional[Ran1] = None, fma: bool = True, compiled: Optional[bool] = None):
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
    img = np.ascontiguousarray(float_image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError("float_image must be 2-D (spixels, fpixels)")
    if compiled is None:
        compiled = _COMPILED is not None
    if compiled and prior is None:
        if _COMPILED is None:
            raise RuntimeError("the compiled noise loop was not built")
        return _noise_image_compiled(img, seed, adc_offset, roi, fma)
    spixels, fpixels = img.shape
    out = np.zeros((spixels, fpixels), dtype=np.uint16)
    xmin, xmax, ymin, ymax = _roi_bounds(roi, spixels, fpixels)
    if xmin > xmax or ymin > ymax:
        return out, 0.0, 0

    stream = BufferedRan1(seed, prior=prior, block=_BLOCK)
    adc = float(adc_offset)
    total = 0.0
    overloads = 0
    exp = exp_or_inf
    poidev = _rng.poidev
    lo_tol = 1.0 - _TIE_TOL
    hi_tol = 1.0 + _TIE_TOL

    pack, unpack = F32.pack, F32.unpack
    sqrt, log, tan, floor, pi = math.sqrt, math.log, math.tan, math.floor, math.pi
    gl_cache: dict = {}

    buf: list = []
    pos = 0
    nbuf = 0
    oldm = stream.poi_oldm
    g = stream.poi_g
    sq = stream.poi_sq
    alxm = stream.poi_alxm
    for s in range(ymin, ymax + 1):
        row = img[s, xmin:xmax + 1].tolist()
        vals = [0] * len(row)
        for i, xm in enumerate(row):
            if pos > nbuf - _MARGIN:
                # keep enough draws ahead that a pixel never runs off the end
                buf = buf[pos:] + stream.raw_block(_BLOCK)
                pos = 0
                nbuf = len(buf)
            if xm < 12.0:
                if xm != oldm:
                    oldm = xm
                    g = f32(exp(-xm))
                p0 = pos
                t = buf[pos]  # 1.0 * r is exact
                pos += 1
                if t > g:
                    tp = t
                    t *= buf[pos]
                    pos += 1
                    while t > g:
                        tp = t
                        t *= buf[pos]
                        pos += 1
                        if pos - p0 > _MAX_FAST_DRAWS:
                            break
                    n = pos - p0
                    if (n > _MAX_FAST_DRAWS or t > g * lo_tol
                            or (n > 2 and tp < g * hi_tol)):
                        # near a tie: redo with the C's float rounding
                        pos = p0
                        t = buf[pos]
                        pos += 1
                        while t > g:
                            if pos >= nbuf:
                                buf = buf[p0:] + stream.raw_block(_BLOCK)
                                pos -= p0
                                p0 = 0
                                nbuf = len(buf)
                            t = f32(t * buf[pos])
                            pos += 1
                em = float(pos - p0 - 1)
            elif xm <= 1.0e6:
                # rejection method, inlined from rng.poidev (same arithmetic)
                if xm != oldm:
                    oldm = xm
                    sq = unpack(pack(sqrt(2.0 * xm)))[0]
                    alxm = unpack(pack(log(xm)))[0]
                    gl = gammln(unpack(pack(xm + 1.0))[0], fma)
                    if fma:
                        g = fmaf(xm, alxm, -gl)
                    else:
                        g = unpack(pack(unpack(pack(xm * alxm))[0] - gl))[0]
                while True:
                    while True:
                        if pos >= nbuf:
                            buf = buf[pos:] + stream.raw_block(_BLOCK)
                            pos = 0
                            nbuf = len(buf)
                        y = unpack(pack(tan(pi * buf[pos])))[0]
                        pos += 1
                        if fma:
                            em = fmaf(sq, y, xm)
                        else:
                            em = unpack(pack(unpack(pack(sq * y))[0] + xm))[0]
                        if not em < 0.0:
                            break
                    em = float(floor(em))
                    gl = gl_cache.get(em)
                    if gl is None:
                        if len(gl_cache) > 1 << 20:
                            gl_cache.clear()
                        gl = gl_cache[em] = gammln(em + 1.0, fma)
                    if fma:
                        e = unpack(pack(fmaf(em, alxm, -gl) - g))[0]
                    else:
                        e = unpack(pack(unpack(pack(unpack(pack(em * alxm))[0] - gl))[0] - g))[0]
                    t = unpack(pack(0.9 * (1.0 + unpack(pack(y * y))[0]) * exp(e)))[0]
                    if pos >= nbuf:
                        buf = buf[pos:] + stream.raw_block(_BLOCK)
                        pos = 0
                        nbuf = len(buf)
                    r = buf[pos]
                    pos += 1
                    if not r > t:
                        break
            else:
                # huge means (Gaussian) and NaN: hand the stream to the reference code
                stream.buf = buf
                stream.pos = pos
                stream.poi_oldm = oldm
                stream.poi_g = g
                stream.poi_sq = sq
                stream.poi_alxm = alxm
                em = poidev(xm, stream, fma)
                buf = stream.buf
                pos = stream.pos
                nbuf = len(buf)
                oldm = stream.poi_oldm
                g = stream.poi_g
                sq = stream.poi_sq
                alxm = stream.poi_alxm
            total += em
            test = em + adc
            if test > 65535.0:
                test = 65535.0
                overloads += 1
            if test >= 0.0:
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
