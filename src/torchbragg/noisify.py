"""The arithmetic of nanoBragg's companion program noisify, step for step, so
that the same float image and seeds give the same files byte for byte.

Order of the original, per pixel: beam flicker (a Gaussian factor from the
``-seed`` stream), calibration error (a Gaussian factor from the
``-calib_seed`` stream), Poisson photons (``-seed`` stream); then the
point-spread function on the whole photon image, then gain, ADC offset and
read-out noise (``-seed`` stream), clipped to the integer type.

The two streams share one shuffle table and the deviate routines' spare
values, as in the original (its generator keeps them in statics): this
module keeps one ``Ran1`` and swaps the seed word in and out.

The PSF is the original's spatial one: each source pixel spreads its photons
over a disc of the kernel (its radius chosen from that pixel's photons unless
``-psf_radius`` is given), products in double, each sum rounded to float,
outputs receiving their contributions in the order of the source pixels; a
source next to the right edge also feeds the first pixel of the next row
(the original's bounds test lets x reach the width). The photons outside the
disc are added back evenly over the image. The loops run in _noise.c when
it was built (the same arithmetic), else in Python. ``psf.py`` holds the
differentiable FFT version used by the detector model; the two agree to
float precision away from the edges (see the tests).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import numpy as np

from .rng import Ran1, gaussdev, poidev

# fwhm = 2 * sqrt(2^(2/3) - 1) * g for the fibre profile g / (2 pi (g^2 + r^2)^(3/2))
FIBER_G_PER_FWHM = 0.652383013252053

_LN16 = math.log(16.0)
_PHOTON_LOSS_FACTOR = 10.0


def _libm():
    name = ctypes.util.find_library("m")
    lib = ctypes.CDLL(name) if name else None
    fns = {}
    for fn in ("erf", "atan", "exp", "log"):
        f = getattr(lib, fn, None) if lib is not None else None
        if f is None:
            fns[fn] = getattr(math, fn)
            continue
        f.restype = ctypes.c_double
        f.argtypes = [ctypes.c_double]
        fns[fn] = f
    return fns


_M = _libm()
_erf, _atan, _exp, _log = _M["erf"], _M["atan"], _M["exp"], _M["log"]


# ---------------------------------------------------------------- noise

def _compiled():
    """The compiled helpers of _noise.c (same arithmetic), or None when not built."""
    import ctypes as ct

    from .noise import LIBRARY as lib
    if lib is None or not hasattr(lib, "tb_noisify_photons"):
        return None
    p, lg, d, i = ct.c_void_p, ct.c_long, ct.c_double, ct.c_int
    lib.tb_stream_size.restype = lg
    lib.tb_noisify_photons.restype = None
    lib.tb_noisify_photons.argtypes = [p, lg, lg, lg, d, d, p, ct.POINTER(lg), p, ct.POINTER(d)]
    lib.tb_noisify_read_noise.restype = None
    lib.tb_noisify_read_noise.argtypes = [p, lg, lg, d, p]
    lib.tb_noisify_psf_radii.restype = None
    lib.tb_noisify_psf_radii.argtypes = [p, lg, i, d, d, i, i, p, ct.POINTER(d)]
    lib.tb_noisify_psf_spread.restype = None
    lib.tb_noisify_psf_spread.argtypes = [p, p, p, lg, i, i, p, i, p]
    return lib


_C = _compiled()


class _Streams:
    """The generator state after the photon step, for the read-out noise."""

    def __init__(self, state, word: int):
        self.state, self.word = state, word

    def read_noise(self, n: int, readout: float) -> np.ndarray:
        """``n`` read-out noise values (ADU) continuing the ``-seed`` word."""
        if isinstance(self.state, Ran1):
            self.state.idum = self.word
            return np.array([readout * gaussdev(self.state, False) for _ in range(n)], dtype=np.float64)
        out = np.empty(n, dtype=np.float64)
        _C.tb_noisify_read_noise(ctypes.addressof(self.state), self.word, n, readout, out.ctypes.data)
        return out


def photon_noise(photons: np.ndarray, seed: int, calib_seed: int, flicker: float, calibration: float,
                 compiled: bool | None = None):
    """Flicker, calibration error and Poisson photons, pixel by pixel.

    photons: float32 image (any shape, row-major order is the draw order).
    seed, calib_seed: the stored seeds (``-N`` for ``-seed N``).
    compiled: use _noise.c (default: when built). Returns (float32 photon
    counts, total photons, the streams for ``read_noise``).
    """
    flat = np.ascontiguousarray(photons, dtype=np.float32).reshape(-1)
    out = np.empty(flat.size, dtype=np.float32)
    if (_C is not None) if compiled is None else compiled:
        state = ctypes.create_string_buffer(int(_C.tb_stream_size()))
        word, total = ctypes.c_long(0), ctypes.c_double(0.0)
        _C.tb_noisify_photons(flat.ctypes.data, flat.size, int(seed), int(calib_seed), float(flicker),
                              float(calibration), ctypes.addressof(state), ctypes.byref(word), out.ctypes.data,
                              ctypes.byref(total))
        return out.reshape(np.shape(photons)), total.value, _Streams(state, word.value)
    rng = Ran1(seed)
    s, c = int(seed), int(calib_seed)
    total = 0.0
    for i, p in enumerate(flat.tolist()):
        if flicker > 0.0:
            rng.idum = s
            p *= 1.0 + flicker * gaussdev(rng, False)
            s = rng.idum
        if calibration > 0.0:
            rng.idum = c
            p *= 1.0 + calibration * gaussdev(rng, False)
            c = rng.idum
        rng.idum = s
        v = poidev(p, rng, False)
        s = rng.idum
        out[i] = v
        total += v
    return out.reshape(np.shape(photons)), total, _Streams(rng, s)


def to_uint16(adu: np.ndarray) -> np.ndarray:
    """The C's double -> unsigned short on x86-64: truncate to a 32-bit int,
    keep the low 16 bits (negatives wrap)."""
    a = np.asarray(adu, dtype=np.float64)
    bad = ~np.isfinite(a) | (np.abs(a) >= 2147483648.0)
    t = np.trunc(np.where(bad, 0.0, a)).astype(np.int64)
    return (t & 0xFFFF).astype(np.uint16)


def to_uint32(adu: np.ndarray) -> np.ndarray:
    """The C's double -> unsigned int on x86-64 (a 64-bit truncation, low 32 bits)."""
    a = np.asarray(adu, dtype=np.float64)
    bad = ~np.isfinite(a) | (np.abs(a) >= 9.2e18)
    t = np.trunc(np.where(bad, 0.0, a)).astype(np.int64)
    return (t & 0xFFFFFFFF).astype(np.uint32)


# ---------------------------------------------------------------- spatial PSF

def _gauss_corner(x: float, y: float) -> float:
    # photons of a unit-fwhm Gaussian in [0, x] x [0, y], the original's expression
    return 0.125 * (_erf(2 * x * math.sqrt(math.log(2))) * _erf(y * math.sqrt(math.log(16)))
                    * math.sqrt(math.log(16) / math.log(2)))


def _gauss_pixel(dx: int, dy: int, fwhm: float) -> float:
    x, y, pix = dx / fwhm, dy / fwhm, 1.0 / fwhm
    h = pix / 2.
    return (_gauss_corner(x + h, y + h) - _gauss_corner(x + h, y - h)
            - _gauss_corner(x - h, y + h) + _gauss_corner(x - h, y - h))


def _fiber_corner(x: float, y: float, g: float) -> float:
    return _atan((x * y) / (g * math.sqrt(g * g + x * x + y * y))) / 2.0 / math.pi


def _fiber_pixel(dx: int, dy: int, g: float) -> float:
    h = 1.0 / 2.
    return (_fiber_corner(dx + h, dy + h, g) - _fiber_corner(dx + h, dy - h, g)
            - _fiber_corner(dx - h, dy + h, g) + _fiber_corner(dx - h, dy - h, g))


def _c_int(x: float) -> int:
    # double -> int as x86-64 converts it (NaN and overflow give INT_MIN)
    if x != x or abs(x) >= 2147483648.0:
        return -2147483648
    return int(x)


def _source_radius(kind: str, photons: float, fwhm: float, g: float) -> int:
    lost = math.sqrt(photons) / _PHOTON_LOSS_FACTOR
    if kind == "gauss":
        arg = -_log(lost / photons) / math.log(16)
        # below 0.01 photons the original takes the root of a negative number
        # (undefined behaviour); one pixel is kept here
        return 1 if arg < 0 else _c_int(1 + math.ceil(math.sqrt(arg) * fwhm))
    return _c_int(1 + math.ceil(g * (photons / lost)))


def apply_psf(image: np.ndarray, kind: str, fwhm_pixels: float, user_radius: int, log=print,
              compiled: bool | None = None) -> np.ndarray:
    """The original's spatial PSF on a (ypixels, xpixels) float32 image.

    fwhm_pixels: FWHM in pixels (double); user_radius: -psf_radius (0:
    chosen per source pixel); compiled: the per-source radii in _noise.c
    (default: when built). Returns the float32 blurred image.
    """
    img = np.ascontiguousarray(image, dtype=np.float32)
    H, W = img.shape
    n = H * W
    flat = img.reshape(-1)
    g = fwhm_pixels * FIBER_G_PER_FWHM
    maxwidth = max(W, H)
    radius = user_radius
    if radius <= 0:
        max_i = max(0.0, float(flat.max())) if n else 0.0
        log("  maximum input photon/pixel: %g" % max_i)
        if max_i <= 0.0:
            log("WARNING: no photons, PSF skipped")
            return np.zeros_like(img)
        lost = math.sqrt(max_i) / _PHOTON_LOSS_FACTOR
        if kind == "gauss":
            radius = _c_int(1 + math.ceil(math.sqrt(-_log(lost / max_i) / math.log(4) / 2) * fwhm_pixels))
        else:
            radius = _c_int(1 + math.ceil(g * (max_i / lost)))
        log("  auto-selected psf_radius = %d pixels" % radius)
        if radius == 0:
            radius = 1
    radius = min(radius, maxwidth)

    kernel = {}
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy > radius * radius:
                continue
            kernel[dx, dy] = _gauss_pixel(dx, dy, fwhm_pixels) if kind == "gauss" else _fiber_pixel(dx, dy, g)

    # per source pixel: its disc radius and the photons beyond it
    src = np.flatnonzero(flat > 0.0)
    vals = flat[src].astype(np.float64)
    radii = np.empty(src.size, dtype=np.int64)
    use_c = compiled if compiled is not None else _C is not None
    if use_c:
        lost = ctypes.c_double(0.0)
        _C.tb_noisify_psf_radii(vals.ctypes.data, vals.size, 0 if kind == "gauss" else 1, fwhm_pixels, g,
                                user_radius, maxwidth, radii.ctypes.data, ctypes.byref(lost))
        lost_total = lost.value
    else:
        lost_total = 0.0
        for m, p in enumerate(vals.tolist()):
            r = user_radius if user_radius != 0 else _source_radius(kind, p, fwhm_pixels, g)
            if r == 0:
                r = 1
            r = min(r, maxwidth)
            radii[m] = r
            if kind == "gauss":
                rsq = float(r) / fwhm_pixels
                rsq = rsq * rsq
                lost_total += p * _exp(-math.log(16) * rsq)
            else:
                lost_total += p * g / math.sqrt(g * g + r * r)

    out = np.zeros(n + 1, dtype=np.float32)  # the original may write one past the end
    if use_c:
        dense = np.zeros((2 * radius + 1, 2 * radius + 1), dtype=np.float64)
        for (dx, dy), k in kernel.items():
            dense[dy + radius, dx + radius] = k
        src = np.ascontiguousarray(src, dtype=np.int64)
        _C.tb_noisify_psf_spread(src.ctypes.data, vals.ctypes.data, radii.ctypes.data, src.size, W, H,
                                 dense.ctypes.data, radius, out.ctypes.data)
    else:
        _spread(out, src, vals, radii, kernel, W, H)
    log("adding back %g lost photons" % lost_total)
    res = out[:n]
    res[:] = (res.astype(np.float64) + lost_total / n).astype(np.float32)
    return res.reshape(H, W)


def _spread(out, src, vals, radii, kernel, W, H) -> None:
    """``tb_noisify_psf_spread`` in numpy: one pass per kernel offset; each
    output receives its contributions in source order (offsets by descending
    shift), so the float sums round as the original's."""
    n = W * H
    x0 = src % W
    y0 = src // W
    r2 = radii * radii
    for dx, dy in sorted(kernel, key=lambda o: (-(o[1] * W + o[0]), o[0], o[1])):
        k = kernel[dx, dy]
        if k == 0.0:
            continue
        x = x0 + dx
        y = y0 + dy
        ok = (r2 >= dx * dx + dy * dy) & (x >= 0) & (x <= W) & (y >= 0) & (y <= H)
        j = y * W + x
        ok &= (j >= 0) & (j <= n)
        j = j[ok]
        out[j] = (out[j].astype(np.float64) + vals[ok] * k).astype(np.float32)
