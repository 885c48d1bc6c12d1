"""What an area detector makes of the photons reaching it: a point-spread
function, a gain (ADU per photon), an ADC offset, read-out noise, a static
per-pixel calibration error and an overload (saturation) value.

``expectation`` (blur, gain, offset) is differentiable in the PSF width, the
gain and the offset; ``sample`` draws one reading in the order nanoBragg's
noisify uses: calibration factor, Poisson photons, PSF on the photon counts,
gain, offset, read-out noise, overload. Readings and expectations are in ADU
(the offset included), as the image files hold them.

On the CPU in float32/float64 ``sample`` runs its per-pixel steps in two
compiled passes of _noise.c (calibration and Poisson photons; gain, offset,
read-out noise and overload after the blur), on torch's thread count, with
streams seeded from the caller's generator: the same reading for any number
of threads. Other devices, or a checkout without the compiled helpers, take
the same steps in torch (statistically the same, other draws).
"""

from __future__ import annotations

import torch

from ..psf import PSF_KINDS, convolve_psf, gauss_taps, kernel_spectrum, padded_shape, psf_kernel, psf_radius_for
from ._base import Model


def _compiled():
    """The sampling passes of _noise.c, or None when not built."""
    import ctypes as ct

    from ..noise import LIBRARY as lib
    if lib is None or not hasattr(lib, "tb_readout_f64"):
        return None
    p, lg, d, i, u = ct.c_void_p, ct.c_long, ct.c_double, ct.c_int, ct.c_uint64
    for name in ("tb_poisson_f32", "tb_poisson_f64"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [p, p, lg, u, i, p]
    for name in ("tb_readout_f32", "tb_readout_f64"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [p, lg, lg, lg, lg, lg, p, p, i, d, d, d, d, u, i, p, p]
    return lib


_C = _compiled()
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# Gaussian PSFs up to this radius blur in the compiled pass, one direction
# after the other (2 (2R+1) products a pixel): below ~16 faster than the FFT
_DIRECT_RADIUS = 12


def _pixel_pair(pixel_size) -> tuple[float, float]:
    return tuple(float(v) for v in torch.as_tensor(pixel_size, dtype=torch.float64).reshape(-1).expand(2))


def _seed(generator) -> int:
    # one 64-bit word from the caller's generator (torch's default one without)
    return int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), generator=generator, dtype=torch.int64)) % 2 ** 64


def _poisson_compiled(p: torch.Tensor, factor, seed: int) -> torch.Tensor:
    p = p.contiguous()
    counts = torch.empty_like(p)
    fn = getattr(_C, "tb_poisson_" + _SUFFIX[p.dtype])
    fn(p.data_ptr(), None if factor is None else factor.contiguous().data_ptr(), p.numel(), seed,
       torch.get_num_threads(), counts.data_ptr())
    return counts


def _readout_compiled(x: torch.Tensor, gain: float, offset: float, readout: float, overload, seed: int,
                      taps=None):
    # taps: (slow, fast) factors of a separable kernel to blur ``x`` with first
    S, F = x.shape[-2:]
    v = x.reshape((-1, S, F))  # a view: the leading dims of a crop are contiguous
    if v.stride(-1) != 1:
        v = v.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    radius, ts, tf, tmp = 0, None, None, None
    if taps is not None:
        ts, tf = (t.to(x.dtype).contiguous() for t in taps)
        radius, tmp = ts.numel() // 2, torch.empty_like(out)
    fn = getattr(_C, "tb_readout_" + _SUFFIX[x.dtype])
    fn(v.data_ptr(), v.shape[0], S, F, v.stride(0), v.stride(1), None if ts is None else ts.data_ptr(),
       None if tf is None else tf.data_ptr(), radius, gain, offset, readout,
       float("nan") if overload is None else overload, seed, torch.get_num_threads(),
       None if tmp is None else tmp.data_ptr(), out.data_ptr())
    return out


class DetectorResponse(Model):
    """gain: ADU per photon. adc_offset: ADU added to every pixel.
    readout_noise: rms ADU. psf: None, "gauss" or "fiber", of full width at
    half maximum psf_fwhm (mm) over psf_radius pixels (default: where less
    than 1e-4 of the photons falls beyond, for ``pixel_size`` mm pixels).
    calibration_noise: rms fractional per-pixel error, the same for every
    image of one detector (drawn from calibration_seed). overload: the
    largest reading (ADU); None for none."""

    def __init__(self, gain=1.0, adc_offset=0.0, readout_noise=0.0, psf: str | None = None, psf_fwhm=0.0,
                 psf_radius: int | None = None, pixel_size: float = 0.1, calibration_noise=0.0,
                 calibration_seed: int = 0, overload: float | None = None, dtype=torch.float32, device="cpu"):
        super().__init__(dtype, device)
        if psf is not None and psf not in PSF_KINDS:
            raise ValueError(f"unknown PSF {psf!r} (gauss or fiber)")
        for name, v in (("gain", gain), ("psf_fwhm", psf_fwhm), ("readout_noise", readout_noise),
                        ("calibration_noise", calibration_noise)):
            if float(torch.as_tensor(v).detach().min()) < 0 or (name == "gain" and float(torch.as_tensor(v)) == 0):
                raise ValueError(f"{name} must be {'positive' if name == 'gain' else 'non-negative'}")
        self._param("gain", gain)
        self._param("adc_offset", adc_offset)
        self._param("readout_noise", readout_noise)
        self._param("psf_fwhm", psf_fwhm)
        self.psf = psf
        if psf is None:
            psf_radius = 0
        elif psf_radius is None:
            psf_radius = psf_radius_for(psf, float(torch.as_tensor(psf_fwhm)), float(pixel_size))
        self.psf_radius = int(psf_radius)
        self.calibration_noise = float(calibration_noise)
        self.calibration_seed = int(calibration_seed)
        self.overload = None if overload is None else float(overload)
        self._calibration_cache = None
        self._spectrum_cache = None

    def kernel(self, pixel_size) -> torch.Tensor:
        """The pixel-integrated PSF, (2R+1, 2R+1) [slow, fast], summing to one."""
        return psf_kernel(self.psf, self.psf_fwhm, pixel_size, self.psf_radius)

    def blur(self, photons: torch.Tensor, pixel_size) -> torch.Tensor:
        """Photons (..., slow, fast) spread by the PSF (photons leaving the edges are lost)."""
        if self.psf is None or self.psf_radius == 0:
            return photons
        return convolve_psf(photons, self.kernel(pixel_size).to(photons.dtype))

    def _fixed_blur(self, counts: torch.Tensor, pixel_size) -> torch.Tensor:
        # sampling only (no gradient): the kernel's spectrum is kept between calls
        if self.psf is None or self.psf_radius == 0:
            return counts
        pix = _pixel_pair(pixel_size)
        n = 2 * self.psf_radius + 1
        fs, ff = padded_shape(counts.shape, (n, n))
        key = (self.psf, self.psf_radius, float(self.psf_fwhm), pix, fs, ff, counts.dtype, counts.device)
        if self._spectrum_cache is None or self._spectrum_cache[0] != key:
            k = psf_kernel(self.psf, self.psf_fwhm.detach().to(counts), pix, self.psf_radius)
            self._spectrum_cache = (key, kernel_spectrum(k, fs, ff))
        k = torch.empty((n, n), dtype=counts.dtype, device=counts.device)
        return convolve_psf(counts, k, self._spectrum_cache[1])

    def expectation(self, photons: torch.Tensor, pixel_size) -> torch.Tensor:
        """Mean reading (ADU) for expected ``photons`` per pixel."""
        return self.gain.to(photons.dtype) * self.blur(photons, pixel_size) + self.adc_offset.to(photons.dtype)

    forward = expectation

    def variance(self, photons: torch.Tensor, pixel_size) -> torch.Tensor:
        """Variance of a reading (ADU^2) without calibration error: Poisson
        photons spread by the PSF give gain^2 * (photons convolved with the
        squared kernel), plus the read-out noise squared."""
        g = self.gain.to(photons.dtype)
        if self.psf is None or self.psf_radius == 0:
            spread = photons
        else:
            spread = convolve_psf(photons, self.kernel(pixel_size).to(photons.dtype) ** 2)
        return g * g * spread + self.readout_noise.to(photons.dtype) ** 2

    def calibration(self, shape, dtype=None, device=None) -> torch.Tensor:
        """Per-pixel factor 1 + calibration_noise * N(0, 1), the same for a
        given seed and shape on every device (kept: it is the detector's);
        ``shape`` (..., slow, fast), every panel its own."""
        dtype, device = dtype or self.dtype, torch.device(device or self.device)
        key = (tuple(shape), dtype, device, self.calibration_seed, self.calibration_noise)
        if self._calibration_cache is None or self._calibration_cache[0] != key:
            gen = torch.Generator().manual_seed(self.calibration_seed)
            noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
            factor = torch.clamp(1.0 + self.calibration_noise * noise, min=0.0)
            self._calibration_cache = (key, factor.to(dtype=dtype, device=device))
        return self._calibration_cache[1]

    @torch.no_grad()
    def sample(self, photons: torch.Tensor, pixel_size, generator: torch.Generator | None = None) -> torch.Tensor:
        """One reading (ADU, float, not yet rounded) of expected ``photons``.
        ``generator`` (on the photons' device) makes it repeatable."""
        p = photons.detach()
        factor = self.calibration(p.shape, p.dtype, p.device) if self.calibration_noise > 0.0 else None
        compiled = _C is not None and p.device.type == "cpu" and p.dtype in _SUFFIX
        if compiled:
            counts = _poisson_compiled(p, factor, _seed(generator))
        else:
            p = torch.clamp(p, min=0.0)
            if factor is not None:
                p.mul_(factor)
            counts = torch.poisson(p, generator=generator)
        readout = float(self.readout_noise)
        if compiled and self.gain.numel() == 1 and self.adc_offset.numel() == 1:
            taps = None
            if self.psf == "gauss" and 0 < self.psf_radius <= _DIRECT_RADIUS:
                taps = gauss_taps(self.psf_fwhm.detach().double(), _pixel_pair(pixel_size), self.psf_radius)
            else:
                counts = self._fixed_blur(counts, pixel_size)
            return _readout_compiled(counts, float(self.gain), float(self.adc_offset), readout, self.overload,
                                     _seed(generator), taps)
        blurred = self._fixed_blur(counts, pixel_size)
        # in place from here: one pass per step over a large frame
        adu = blurred.mul_(self.gain.to(p.dtype)).add_(self.adc_offset.to(p.dtype))
        if readout > 0.0:
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
            adu.add_(noise, alpha=readout)
        if self.overload is not None:
            adu.clamp_(max=self.overload)
        return adu

    def extra_repr(self) -> str:
        return (f"psf={self.psf}, psf_radius={self.psf_radius}, calibration_noise={self.calibration_noise}, "
                f"overload={self.overload}")
