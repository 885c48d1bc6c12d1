"""Point-spread functions of an area detector, integrated over pixels, and
their FFT convolution with an image. Differentiable in the width.

Two shapes, as nanoBragg's companion program noisify models them:

- Gaussian of full width at half maximum ``fwhm``;
- fibre-optic taper: the intensity falls as g / (2 pi (g^2 + r^2)^(3/2)),
  with g = fwhm * FIBER_G_PER_FWHM (the width at half height of that
  profile is fwhm).

Both are integrated analytically over each pixel, so a width much smaller
than a pixel gives the identity. Lengths are in mm (fwhm, pixel sizes).
Kernels are (2R+1, 2R+1) with index [slow, fast], centred; they are
normalised to one over the square so that the convolution conserves
photons, except what crosses the edges of the image (lost, as photons
spread off a real detector).
"""

from __future__ import annotations

import math

import torch

from .noisify import FIBER_G_PER_FWHM
_GAUSS_EDGE = math.sqrt(math.log(16.0))  # erf argument per fwhm: 2 sqrt(ln 2)
PSF_KINDS = ("gauss", "fiber")


def psf_radius_for(kind: str, fwhm: float, pixel: float, tail: float = 1e-4) -> int:
    """Kernel half-width (pixels) beyond which less than ``tail`` of the
    photons falls (a fixed choice, so that the kernel's shape does not
    depend on the image). The fibre's tail is heavy: it is capped at 64."""
    if fwhm <= 0.0:
        return 0
    w = fwhm / pixel
    if kind == "gauss":
        # fraction beyond r along one axis ~ erfc(r * 2 sqrt(ln 2) / fwhm)
        r = math.sqrt(-math.log(tail)) / _GAUSS_EDGE * w
    else:
        # fraction beyond radius r is g / sqrt(g^2 + r^2)
        g = FIBER_G_PER_FWHM * w
        r = g / tail
    return max(1, min(64, int(math.ceil(r))))


def _gauss_1d(edges: torch.Tensor, fwhm: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * torch.erf(edges * (_GAUSS_EDGE / fwhm))
    return cdf[1:] - cdf[:-1]


def _fiber_corner(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # photons in the quadrant [0, x] x [0, y] of the fibre profile
    return torch.atan(x * y / (g * torch.sqrt(g * g + x * x + y * y))) / (2.0 * math.pi)


def gauss_taps(fwhm, pixel_size, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian kernel's two factors, (slow, fast), each 2R+1 long and
    summing to one: ``psf_kernel("gauss", ...)`` is their outer product."""
    fwhm = torch.as_tensor(fwhm, dtype=torch.get_default_dtype() if not torch.is_tensor(fwhm) else None)
    pixel_size = torch.as_tensor(pixel_size, dtype=fwhm.dtype, device=fwhm.device)
    d = torch.arange(-radius, radius + 2, dtype=fwhm.dtype, device=fwhm.device) - 0.5  # pixel edges
    ts, tf = _gauss_1d(d * pixel_size[1], fwhm), _gauss_1d(d * pixel_size[0], fwhm)
    return ts / ts.sum(), tf / tf.sum()


def psf_kernel(kind: str, fwhm, pixel_size, radius: int, normalize: bool = True) -> torch.Tensor:
    """Fraction of a pixel's photons landing in each pixel around it.

    kind: "gauss" or "fiber". fwhm: tensor or float (mm). pixel_size: (fast,
    slow) mm, tensor or pair. radius: half-width in pixels. Returns
    (2R+1, 2R+1) [slow, fast] in the dtype/device of ``fwhm`` when it is a
    tensor. ``normalize`` divides by the sum over the square (the part of
    the tail beyond the square is put back on it).
    """
    if kind not in PSF_KINDS:
        raise ValueError(f"unknown PSF kind {kind!r} (gauss or fiber)")
    fwhm = torch.as_tensor(fwhm, dtype=torch.get_default_dtype() if not torch.is_tensor(fwhm) else None)
    pixel_size = torch.as_tensor(pixel_size, dtype=fwhm.dtype, device=fwhm.device)
    d = torch.arange(-radius, radius + 2, dtype=fwhm.dtype, device=fwhm.device) - 0.5  # pixel edges
    xf = d * pixel_size[0]
    ys = d * pixel_size[1]
    if kind == "gauss":
        k = torch.outer(_gauss_1d(ys, fwhm), _gauss_1d(xf, fwhm))
    else:
        g = FIBER_G_PER_FWHM * fwhm
        c = _fiber_corner(xf[None, :], ys[:, None], g)
        k = c[1:, 1:] - c[1:, :-1] - c[:-1, 1:] + c[:-1, :-1]
    return k / k.sum() if normalize else k


def _fast_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (FFT lengths that transform fast)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def kernel_spectrum(kernel: torch.Tensor, fs: int, ff: int) -> torch.Tensor:
    """rfft2 of ``kernel`` zero-padded to (fs, ff), as small real matrix
    products (the kernel is tiny next to the image: cheaper than a full FFT)."""
    ks, kf = kernel.shape
    dev, dt = kernel.device, kernel.dtype

    def phases(n: int, rows: int, cols: int):
        # angle -2 pi (j k mod n) / n, the product reduced exactly in integers
        jk = (torch.arange(rows, device=dev)[:, None] * torch.arange(cols, device=dev)[None, :]) % n
        ang = jk.to(torch.float64) * (-2.0 * math.pi / n)
        return torch.cos(ang).to(dt), torch.sin(ang).to(dt)

    cs, ss = phases(fs, fs, ks)  # (fs, ks)
    cf, sf = phases(ff, kf, ff // 2 + 1)  # (kf, ff//2+1)
    ar, ai = cs @ kernel, ss @ kernel
    return torch.complex(ar @ cf - ai @ sf, ar @ sf + ai @ cf)


def padded_shape(shape, kernel_shape) -> tuple[int, int]:
    """FFT size for a linear convolution of an image (..., S, F) with a kernel."""
    S, F = shape[-2:]
    return _fast_size(S + 2 * (kernel_shape[0] // 2)), _fast_size(F + 2 * (kernel_shape[1] // 2))


def convolve_psf(image: torch.Tensor, kernel: torch.Tensor, spectrum: torch.Tensor | None = None) -> torch.Tensor:
    """Linear (zero-padded) convolution of ``image`` (..., S, F) with a
    centred odd ``kernel`` (2R+1, 2R+1), by real FFTs; same shape out.
    Photons spread past the edges are dropped. ``spectrum``: the kernel's
    ``kernel_spectrum`` at ``padded_shape``, when already known."""
    rs, rf = kernel.shape[0] // 2, kernel.shape[1] // 2
    S, F = image.shape[-2:]
    fs, ff = padded_shape(image.shape, kernel.shape)
    if spectrum is None:
        spectrum = kernel_spectrum(kernel.to(image.dtype), fs, ff)
    full = torch.fft.irfft2(torch.fft.rfft2(image, s=(fs, ff)) * spectrum, s=(fs, ff))
    return full[..., rs:rs + S, rf:rf + F]
