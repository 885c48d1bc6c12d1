"""Port of nanoBragg's random number generator and deviates.

The original uses the Numerical Recipes ``ran1`` (a Park-Miller minimal
standard generator behind a 32-entry shuffle table) and keeps most
intermediate values in C ``float``.  Every function here reproduces that
arithmetic, including the float32 rounding of each step, so that the same
seeds give the same numbers.

Floats are Python floats that hold float32 values.  ``f32`` rounds a double
to the nearest float32; for one ``+ - * /`` or ``sqrt`` of two float32
operands, doing the operation in double and rounding once gives the correctly
rounded float32 result, which is what the C gets.

Fused multiply-add: the reference outputs the project compares with were
made by a build whose compiler fused ``a*b + c`` into one rounding (FMA
contraction, the GCC default wherever the target has FMA instructions).  It
changes the rejection branch of ``poidev`` (means of 12 and more) and the
Gaussian branch, so those functions take ``fma=True`` by default; pass
``fma=False`` for a plain x86-64 build without FMA.  The small-mean branch,
``ran1`` and the mosaic draws (axis and angle factor) are the same either
way; matrices built from the draws may differ in the last bit.

Seeds: the C stores ``seed = -atoi(arg)`` for ``-seed``, ``-mosaic_seed`` and
``-misset_seed``, so a user value of 12345 is the stored seed -12345.  All
functions here take the stored (normally negative) value.  The default
mosaic seed is -12345678.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import struct
from typing import Callable, Optional

import numpy as np

DEFAULT_MOSAIC_SEED = -12345678

# Numerical Recipes ran1 constants
_IA = 16807
_IM = 2147483647
_AM = 1.0 / _IM
_IQ = 127773
_IR = 2836
_NTAB = 32
_NDIV = 1 + (_IM - 1) // _NTAB
assert _NDIV == 1 << 26
_RNMX = 1.0 - 1.2e-7

F32 = struct.Struct("f")
_pack = F32.pack
_unpack = F32.unpack


def f32(x: float) -> float:
    """Round a double to the nearest float32 (returned as a Python float)."""
    try:
        return _unpack(_pack(x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _f32_fix_tie(s: float, err: float) -> float:
    """float32 rounding of the exact value ``s + err`` (``|err|`` < half an ulp of ``s``)."""
    r = f32(s)
    if err and r != s:
        other = 2.0 * s - r
        if f32(other) == other:
            # s sits exactly half-way between two float32 values: the
            # residual decides, not ties-to-even
            r = max(r, other) if err > 0 else min(r, other)
    return r


def fmaf(a: float, b: float, c: float) -> float:
    """C ``fmaf`` for float32 operands: a*b + c rounded once to float32."""
    p = a * b  # exact: two 24-bit significands fit in a double
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    return _f32_fix_tie(s, err)


def _fma(a: float, b: float, c: float) -> float:
    """C ``fma`` for doubles: a*b + c with one rounding (exact integer arithmetic)."""
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(c)):
        return a * b + c
    if a == 0.0 or b == 0.0:
        return a * b + c
    na, da = a.as_integer_ratio()
    nb, db = b.as_integer_ratio()
    nc, dc = c.as_integer_ratio()
    num = na * nb * dc + nc * da * db
    den = da * db * dc
    if num == 0:
        return a * b + c
    return num / den  # int / int is correctly rounded


_RNMX_F = f32(_RNMX)
_ONE_THIRD_F = f32(1.0 / 3.0)


def _load_powf() -> Callable[[float, float], float]:
    # the original rounds the mosaic cap factor with the C library's powf;
    # calling the same function keeps the last bit identical
    name = ctypes.util.find_library("m")
    if name:
        try:
            lib = ctypes.CDLL(name)
            fn = lib.powf
            fn.restype = ctypes.c_float
            fn.argtypes = [ctypes.c_float, ctypes.c_float]
            return lambda x, y: float(fn(x, y))
        except (OSError, AttributeError):
            pass
    return lambda x, y: f32(math.pow(f32(x), f32(y)))


_powf = _load_powf()


class Ran1:
    """State of one ``ran1`` stream: the seed word plus the shuffle table.

    In the C the shuffle table (``iy``, ``iv``) is a static shared by every
    stream, and it is rebuilt whenever a call sees a seed <= 0.  Every stream
    the program uses starts from a negative or zero seed, so each stream
    normally owns a fresh table.  A positive stored seed (the user passed a
    negative number) does not rebuild the table: it continues the table of
    whichever stream ran before; pass that stream as ``prior`` to reproduce
    this.  With no table at all a positive seed is replaced by 1.

    The object also carries the function-static state of ``gaussdev`` and
    ``poidev`` so that a stream of deviates matches the C call for call.
    """

    __slots__ = ("idum", "iy", "iv", "gauss_iset", "gauss_gset",
                 "poi_oldm", "poi_g", "poi_sq", "poi_alxm")

    def __init__(self, seed: int, prior: Optional["Ran1"] = None):
        self.idum = int(seed)
        if prior is not None:
            self.iy = prior.iy
            self.iv = list(prior.iv)
        else:
            self.iy = 0
            self.iv = [0] * _NTAB
        self.gauss_iset = 0
        self.gauss_gset = 0.0
        self.poi_oldm = -1.0
        self.poi_g = 0.0
        self.poi_sq = 0.0
        self.poi_alxm = 0.0

    def _init_table(self) -> None:
        idum = 1 if -self.idum < 1 else -self.idum
        iv = self.iv
        for j in range(_NTAB + 7, -1, -1):
            k = idum // _IQ
            idum = _IA * (idum - k * _IQ) - _IR * k
            if idum < 0:
                idum += _IM
            if j < _NTAB:
                iv[j] = idum
        self.iy = iv[0]
        self.idum = idum

    def __call__(self) -> float:
        """Next uniform deviate in (0, 1), a float32 value."""
        if self.idum <= 0 or not self.iy:
            self._init_table()
        idum = self.idum
        k = idum // _IQ
        idum = _IA * (idum - k * _IQ) - _IR * k
        if idum < 0:
            idum += _IM
        self.idum = idum
        iv = self.iv
        j = self.iy // _NDIV
        self.iy = iv[j]
        iv[j] = idum
        temp = f32(_AM * self.iy)
        return _RNMX_F if temp > _RNMX else temp

    def raw_block(self, n: int) -> list:
        """The next ``n`` deviates (a list of float32 values), generated in bulk.

        The Park-Miller step is a multiplication modulo 2^31-1, so a block of
        seeds is ``IA^k * idum mod IM`` (vectorised); only the shuffle table
        walk stays a Python loop.
        """
        if n <= 0:
            return []
        if self.idum <= 0 or not self.iy:
            self._init_table()
        seeds = (_ia_powers(n) * np.uint64(self.idum)) % np.uint64(_IM)
        iy, iv = self.iy, self.iv
        out = [0] * n
        i = 0
        for x in seeds.tolist():
            j = iy >> 26  # iy // NDIV, NDIV == 2**26
            iy = iv[j]
            iv[j] = x
            out[i] = iy
            i += 1
        self.idum, self.iy = int(seeds[-1]), iy
        vals = (np.asarray(out, dtype=np.float64) * _AM).astype(np.float32)
        vals = np.where(vals > _RNMX, np.float32(_RNMX_F), vals)
        return vals.astype(np.float64).tolist()

    def copy(self) -> "Ran1":
        new = Ran1(self.idum, prior=self)
        new.gauss_iset, new.gauss_gset = self.gauss_iset, self.gauss_gset
        new.poi_oldm, new.poi_g = self.poi_oldm, self.poi_g
        new.poi_sq, new.poi_alxm = self.poi_sq, self.poi_alxm
        return new


_IA_POW_CACHE: dict = {}


def _ia_powers(n: int) -> np.ndarray:
    """IA^k mod IM for k = 1..n as uint64 (products with a seed stay below 2^62)."""
    arr = _IA_POW_CACHE.get(n)
    if arr is None:
        vals = [0] * n
        v = 1
        for k in range(n):
            v = (v * _IA) % _IM
            vals[k] = v
        arr = np.asarray(vals, dtype=np.uint64)
        if len(_IA_POW_CACHE) > 8:
            _IA_POW_CACHE.clear()
        _IA_POW_CACHE[n] = arr
    return arr


class BufferedRan1(Ran1):
    """A ``Ran1`` that draws its numbers in blocks (for long noise runs).

    The numbers are the same as an unbuffered stream; only ``idum``/``iv``
    run ahead of what has been consumed, so do not hand it on as ``prior``.
    """

    __slots__ = ("buf", "pos", "block")

    def __init__(self, seed: int, prior: Optional[Ran1] = None, block: int = 65536):
        super().__init__(seed, prior)
        self.buf: list = []
        self.pos = 0
        self.block = block

    def refill(self) -> None:
        self.buf = self.raw_block(self.block)
        self.pos = 0

    def __call__(self) -> float:
        if self.pos >= len(self.buf):
            self.refill()
        v = self.buf[self.pos]
        self.pos += 1
        return v


def ran1(rng: Ran1) -> float:
    """Uniform deviate in (0, 1) from ``rng`` (float32 value)."""
    return rng()


def gammln(xx: float, fma: bool = True) -> float:
    """ln(Gamma(xx)) by the Lanczos series, float argument and result."""
    x = y = f32(xx)
    tmp = x + 5.5
    if fma:
        tmp = _fma(-(x + 0.5), math.log(tmp), tmp)
    else:
        tmp -= (x + 0.5) * math.log(tmp)
    ser = 1.000000000190015
    for c in (76.18009172947146, -86.50532032941677, 24.01409824083091,
              -1.231739572450155, 0.1208650973866179e-2, -0.5395239384953e-5):
        y += 1.0
        ser += c / y
    return f32(-tmp + math.log(2.5066282746310005 * ser / x))


def gaussdev(rng: Ran1, fma: bool = True) -> float:
    """Unit normal deviate (Box-Muller polar form, one spare kept in ``rng``)."""
    if rng.gauss_iset == 0:
        while True:
            v1 = f32(2.0 * rng() - 1.0)
            v2 = f32(2.0 * rng() - 1.0)
            if fma:
                rsq = fmaf(v1, v1, f32(v2 * v2))
            else:
                rsq = f32(f32(v1 * v1) + f32(v2 * v2))
            if not (rsq >= 1.0 or rsq == 0.0):
                break
        fac = f32(math.sqrt(-2.0 * math.log(rsq) / rsq))
        rng.gauss_gset = f32(v1 * fac)
        rng.gauss_iset = 1
        return f32(v2 * fac)
    rng.gauss_iset = 0
    return rng.gauss_gset


def _tan_pi(r: float) -> float:
    return math.tan(math.pi * r)


def poidev(xm: float, rng: Ran1, fma: bool = True) -> float:
    """Poisson deviate with mean ``xm`` (a float32 value), as a float.

    Three regimes, as in the C: mean > 1e6 uses a Gaussian approximation;
    mean < 12 multiplies uniform deviates until the product drops to
    exp(-mean); otherwise a Lorentzian rejection method with ``gammln``.
    Pre-computed terms are cached on ``rng`` exactly like the C's statics.
    ``fma`` selects the fused multiply-adds of the reference build.
    """
    xm = f32(xm)
    if xm > 1.0e6:
        dev = gaussdev(rng, fma)
        if fma:
            return f32(_fma(math.sqrt(xm), dev, xm))
        return f32(xm + math.sqrt(xm) * dev)
    if xm < 12.0:
        if xm != rng.poi_oldm:
            rng.poi_oldm = xm
            rng.poi_g = f32(math.exp(-xm))
        g = rng.poi_g
        em = -1.0
        t = 1.0
        while True:
            em += 1.0
            t = f32(t * rng())
            if not t > g:
                break
        return em
    if xm != rng.poi_oldm:
        rng.poi_oldm = xm
        rng.poi_sq = f32(math.sqrt(2.0 * xm))
        rng.poi_alxm = f32(math.log(xm))
        if fma:
            rng.poi_g = fmaf(xm, rng.poi_alxm, -gammln(f32(xm + 1.0), True))
        else:
            rng.poi_g = f32(f32(xm * rng.poi_alxm) - gammln(f32(xm + 1.0), False))
    sq, alxm, g = rng.poi_sq, rng.poi_alxm, rng.poi_g
    while True:
        while True:
            y = f32(_tan_pi(rng()))
            em = fmaf(sq, y, xm) if fma else f32(f32(sq * y) + xm)
            if not em < 0.0:
                break
        em = float(math.floor(em)) if math.isfinite(em) else em
        if fma:
            e = f32(fmaf(em, alxm, -gammln(f32(em + 1.0), True)) - g)
        else:
            e = f32(f32(f32(em * alxm) - gammln(f32(em + 1.0), False)) - g)
        t = f32(0.9 * (1.0 + f32(y * y)) * exp_or_inf(e))
        if not rng() > t:
            break
    return em


def exp_or_inf(x: float) -> float:
    """exp(x), infinite where a double overflows (as C's exp)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def uniform3Ddev(rng: Ran1) -> tuple[float, float, float, float]:
    """Random unit vector (dx, dy, dz) and the radius it was cut at."""
    while True:
        dx = f32(2.1 * (rng() - 0.5))
        dy = f32(2.1 * (rng() - 0.5))
        dz = f32(2.1 * (rng() - 0.5))
        dr = f32(math.sqrt(f32(f32(f32(dx * dx) + f32(dy * dy)) + f32(dz * dz))))
        if not (dr > 1 or dr < 1e-2):
            break
    return f32(dx / dr), f32(dy / dr), f32(dz / dr), dr


# ---------------------------------------------------------------- rotations

def mosaic_axis_and_factor(rng: Ran1) -> tuple[tuple[float, float, float], float]:
    """Draw one random rotation as (unit axis, angle factor).

    Uses three deviates, like the C.  The rotation angle is
    ``mosaicity * factor`` (see ``mosaic_angle``); the axis components are
    doubles and ``factor = powf(1 - r3*r3, 1/3)`` is a float32 value.
    """
    r1 = 2.0 * rng() - 1.0
    r2 = 2.0 * rng() - 1.0
    r3 = 2.0 * rng() - 1.0
    xyrad = math.sqrt(1.0 - r2 * r2)
    factor = _powf(f32(1.0 - r3 * r3), _ONE_THIRD_F)
    v1 = xyrad * math.sin(math.pi * r1)
    v2 = xyrad * math.cos(math.pi * r1)
    v3 = r2
    return (v1, v2, v3), factor


def mosaic_angle(mosaicity: float, factor: float) -> float:
    """Rotation angle in radians; the C multiplies in float precision."""
    return f32(f32(mosaicity) * f32(factor))


def umat_from_axis_angle(axis, rot: float) -> np.ndarray:
    """3x3 rotation by ``rot`` radians about unit ``axis``, term by term as the C."""
    v1, v2, v3 = (float(a) for a in axis)
    t1 = math.cos(rot)
    t2 = 1.0 - t1
    t3 = v1 * v1
    t6 = t2 * v1
    t7 = t6 * v2
    t8 = math.sin(rot)
    t9 = t8 * v3
    t11 = t6 * v3
    t12 = t8 * v2
    t15 = v2 * v2
    t19 = t2 * v2 * v3
    t20 = t8 * v1
    t24 = v3 * v3
    return np.array([
        [t1 + t2 * t3, t7 - t9, t11 + t12],
        [t7 + t9, t1 + t2 * t15, t19 - t20],
        [t11 - t12, t19 + t20, t1 + t2 * t24],
    ], dtype=np.float64)


def mosaic_rotation_umat(mosaicity: float, rng: Ran1) -> tuple[np.ndarray, tuple[tuple[float, float, float], float]]:
    """Random rotation on a spherical cap of angular size ``mosaicity`` (radians).

    Returns the 3x3 matrix (row-major, as the C's ``umat[9]``) and the draws
    it came from, ``(axis, factor)``, so the matrix can be rebuilt from a
    tensor-valued mosaic spread.
    """
    axis, factor = mosaic_axis_and_factor(rng)
    return umat_from_axis_angle(axis, mosaic_angle(mosaicity, factor)), (axis, factor)


def umat2misset(umat) -> tuple[float, float, float]:
    """Rotations about x, y, z (radians) that reproduce a rotation matrix.

    Rows are normalised, an all-zero row is replaced by the cross product of
    the other two, as the C does before taking the angles.
    """
    u = np.asarray(umat, dtype=np.float64).reshape(9)
    uxx, uxy, uxz, uyx, uyy, uyz, uzx, uzy, uzz = (float(v) for v in u)

    def norm(a, b, c):
        return math.sqrt(a * a + b * b + c * c)

    def unit(a, b, c):
        m = norm(a, b, c)
        return (a / m, b / m, c / m) if m > 0 else (a, b, c)

    def unit_rows(*rows):
        """Each row scaled to unit length (zero rows kept), and the lengths."""
        lengths = tuple(norm(*r) for r in rows)
        return (*(unit(*r) for r in rows), lengths)

    (uxx, uxy, uxz), (uyx, uyy, uyz), (uzx, uzy, uzz), (mx, my, mz) = unit_rows(
        (uxx, uxy, uxz), (uyx, uyy, uyz), (uzx, uzy, uzz))
    if mx >= 0 and my <= 0 and mz <= 0:
        uyx, uyy, uyz = 0.0, 1.0, 0.0
        uzx, uzy, uzz = 0.0, 0.0, 1.0
    if mx <= 0 and my >= 0 and mz <= 0:
        uxx, uxy, uxz = 1.0, 0.0, 0.0
        uzx, uzy, uzz = 0.0, 0.0, 1.0
    if mx <= 0 and my <= 0 and mz >= 0:
        uxx, uxy, uxz = 1.0, 0.0, 0.0
        uyx, uyy, uyz = 0.0, 1.0, 0.0

    for _ in range(2):
        xcy = unit(uxy * uyz - uxz * uyy, uxz * uyx - uxx * uyz, uxx * uyy - uxy * uyx)
        ycz = unit(uyy * uzz - uyz * uzy, uyz * uzx - uyx * uzz, uyx * uzy - uyy * uzx)
        zcx = unit(uzy * uxz - uzz * uxy, uzz * uxx - uzx * uxz, uzx * uxy - uzy * uxx)
        if mx <= 0:
            uxx, uxy, uxz = ycz
        if my <= 0:
            uyx, uyy, uyz = zcx
        if mz <= 0:
            uzx, uzy, uzz = xcy

    (uxx, uxy, uxz), (uyx, uyy, uyz), (uzx, uzy, uzz), (mx, my, mz) = unit_rows(
        (uxx, uxy, uxz), (uyx, uyy, uyz), (uzx, uzy, uzz))

    if uzx * uzx < 1.0:
        rotx = math.atan2(uzy, uzz)
        roty = math.atan2(-uzx, math.sqrt(uzy * uzy + uzz * uzz))
        rotz = math.atan2(uyx, uxx)
    else:
        rotx = math.atan2(1, 1) * 4
        roty = math.atan2(1, 1) * 2
        rotz = math.atan2(uxy, -uyy)
    return rotx, roty, rotz


# ---------------------------------------------------------------- program-level draws

def mosaic_domain_draws(mosaic_spread_rad: float, n_domains: int,
                        mosaic_seed: int = DEFAULT_MOSAIC_SEED,
                        rng: Optional[Ran1] = None) -> list[tuple[tuple[float, float, float], float]]:
    """The (axis, factor) of every mosaic domain, as the C draws them.

    The C draws one rotation per domain (three deviates each, domain 0
    included) and then forces domain 0 to the identity; domain 0 is returned
    as axis (0, 0, 1) with factor 0.0, which rebuilds the identity exactly.
    The draws do not depend on the spread (the angle is
    ``mosaic_angle(mosaic_spread_rad, factor)``); it is accepted so the call
    reads like the C's.  Pass ``rng`` to continue an existing stream (then
    ``mosaic_seed`` is ignored); its state afterwards is the C's.
    """
    if n_domains < 0:
        raise ValueError("n_domains must be >= 0")
    del mosaic_spread_rad  # the draws are independent of it
    if rng is None:
        rng = Ran1(mosaic_seed)
    draws = []
    for i in range(n_domains):
        axis, factor = mosaic_axis_and_factor(rng)
        if i == 0:
            axis, factor = (0.0, 0.0, 1.0), 0.0
        draws.append((axis, factor))
    return draws


def mosaic_umats(mosaic_spread_rad: float, n_domains: int,
                 mosaic_seed: int = DEFAULT_MOSAIC_SEED,
                 rng: Optional[Ran1] = None) -> np.ndarray:
    """The C's mosaic domain matrices, shape (n_domains, 3, 3)."""
    draws = mosaic_domain_draws(mosaic_spread_rad, n_domains, mosaic_seed, rng)
    out = np.empty((len(draws), 3, 3), dtype=np.float64)
    for i, (axis, factor) in enumerate(draws):
        if i == 0:
            out[i] = np.eye(3)
        else:
            out[i] = umat_from_axis_angle(axis, mosaic_angle(mosaic_spread_rad, factor))
    return out


def random_misset_angles(misset_seed: int, rng: Optional[Ran1] = None) -> tuple[float, float, float]:
    """Orientation drawn by ``-misset random``: (rotx, roty, rotz) in radians.

    The C calls its spherical-cap routine with ``90.0`` meaning "a full
    sphere" in degrees, but the routine uses the number as radians, so the
    rotation angle is ``90 * powf(1 - r3^2, 1/3)`` radians (many turns).  The
    orientation is therefore not uniform over rotations; this reproduces it
    anyway, then converts the matrix to misset angles like the C.
    ``misset_seed`` is the stored value (``-N`` for ``-misset_seed N``).
    """
    if rng is None:
        rng = Ran1(misset_seed)
    umat, _ = mosaic_rotation_umat(90.0, rng)
    return umat2misset(umat)
