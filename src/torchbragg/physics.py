"""Small pure tensor functions: the physics of nanoBragg, one formula each.

Vectors are the last dimension (size 3). Every function is differentiable with
respect to its tensor arguments and runs on any device and dtype.
"""

from __future__ import annotations

import math

import torch

R_E_SQR = 7.94079248018965e-30  # Thomson cross section, m^2
AVOGADRO = 6.02214179e23
WATER_F = 2.57  # forward-scattering structure factor of water
WATER_MW = 18.0
# Volume correction between a cube and the inscribed sphere used by -round_xtal.
ROUND_XTAL_SCALE = 0.723601254558268


def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum(-1)


def cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    u, v = torch.broadcast_tensors(u, v)
    return torch.linalg.cross(u, v, dim=-1)


def norm(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(dot(v, v))


def unitize(v: torch.Tensor) -> torch.Tensor:
    return v / norm(v).unsqueeze(-1)


def rotation_x(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([
        torch.stack([one, zero, zero], -1),
        torch.stack([zero, c, -s], -1),
        torch.stack([zero, s, c], -1),
    ], -2)


def rotation_y(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([
        torch.stack([c, zero, s], -1),
        torch.stack([zero, one, zero], -1),
        torch.stack([-s, zero, c], -1),
    ], -2)


def rotation_z(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([
        torch.stack([c, -s, zero], -1),
        torch.stack([s, c, zero], -1),
        torch.stack([zero, zero, one], -1),
    ], -2)


def rotation_xyz(angles: torch.Tensor) -> torch.Tensor:
    """Rotation about x, then y, then z (radians): the original's order for
    misset and detector rotations."""
    return rotation_z(angles[..., 2]) @ rotation_y(angles[..., 1]) @ rotation_x(angles[..., 0])


def skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrix: skew(v) @ u == cross(v, u)."""
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    zero = torch.zeros_like(x)
    return torch.stack([
        torch.stack([zero, -z, y], -1),
        torch.stack([z, zero, -x], -1),
        torch.stack([-y, x, zero], -1),
    ], -2)


def rotation_axis_angle(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Right-handed rotation by `angle` (radians) about unit `axis` (Rodrigues).

    `angle` may carry leading batch dimensions; the result is (..., 3, 3)."""
    angle = torch.as_tensor(angle)
    c = torch.cos(angle)[..., None, None]
    s = torch.sin(angle)[..., None, None]
    k = skew(axis)
    outer = axis[..., :, None] * axis[..., None, :]
    eye = torch.eye(3, dtype=axis.dtype, device=axis.device)
    return c * eye + s * k + (1 - c) * outer


def rotate(matrix: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (matrix @ v.unsqueeze(-1)).squeeze(-1)


def rotation_vector_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a rotation vector (axis * angle), smooth at zero."""
    theta2 = dot(rotvec, rotvec)
    theta = torch.sqrt(theta2 + 1e-30)
    # Taylor-safe coefficients keep the gradient finite at rotvec == 0.
    small = theta2 < 1e-12
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / (theta2 + 1e-30))
    k = skew(rotvec)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def reciprocal_cell(a, b, c, alpha, beta, gamma):
    """Reciprocal vectors (rows of a 3x3, 1/Angstrom) of a cell in the
    original's default orientation (a* along x, b* in the xy plane), and the
    cell volume. Angles in radians."""
    ca, cb, cg = torch.cos(alpha), torch.cos(beta), torch.cos(gamma)
    sa, sb, sg = torch.sin(alpha), torch.sin(beta), torch.sin(gamma)
    aavg = (alpha + beta + gamma) / 2
    skew = torch.sin(aavg) * torch.sin(aavg - alpha) * torch.sin(aavg - beta) * torch.sin(aavg - gamma)
    volume = 2.0 * a * b * c * torch.sqrt(torch.abs(skew))
    a_star = b * c * sa / volume
    b_star = c * a * sb / volume
    c_star = a * b * sg / volume
    cos_alpha_star = (cb * cg - ca) / (sb * sg)
    cos_beta_star = (cg * ca - cb) / (sg * sa)
    cos_gamma_star = (ca * cb - cg) / (sa * sb)
    sin_gamma_star = c * (1.0 / volume) / (a_star * b_star)
    zero = torch.zeros_like(a_star)
    row_a = torch.stack([a_star, zero, zero])
    row_b = torch.stack([b_star * cos_gamma_star, b_star * sin_gamma_star, zero])
    row_c = torch.stack([
        c_star * cos_beta_star,
        c_star * (cos_alpha_star - cos_beta_star * cos_gamma_star) / sin_gamma_star,
        c_star * volume / (a * b * c * sin_gamma_star),
    ])
    return torch.stack([row_a, row_b, row_c]), volume


def real_from_reciprocal(recip: torch.Tensor) -> torch.Tensor:
    """Real-space cell vectors (rows) from reciprocal ones (rows)."""
    a_s, b_s, c_s = recip[0], recip[1], recip[2]
    v_star = dot(a_s, cross(b_s, c_s))
    return torch.stack([cross(b_s, c_s), cross(c_s, a_s), cross(a_s, b_s)]) / v_star


def sincg_sq(frac: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Squared grating transform sin(pi N h)^2 / sin(pi h)^2 written in the
    distance `frac` of h from its nearest integer; exact for integer N and
    much better conditioned in float32 than the raw index."""
    x = math.pi * frac
    small = torch.abs(frac) < 1e-6
    den = torch.where(small, torch.ones_like(x), torch.sin(x))
    ratio = torch.sin(n * x) / den
    # second-order Taylor term: keeps the curvature (and gradgrad) right at exact peaks
    return torch.where(small, n * n * (1 - (n * n - 1) * x * x / 3), ratio * ratio)


def sinc3(x: torch.Tensor) -> torch.Tensor:
    """Fourier transform of a sphere, 3 (sin x - x cos x) / x^3."""
    small = torch.abs(x) < 1e-4
    xs = torch.where(small, torch.ones_like(x), x)
    full = 3.0 * (torch.sin(xs) / xs - torch.cos(xs)) / (xs * xs)
    return torch.where(small, 1.0 - x * x / 10.0, full)


def polarization_factor(kahn: torch.Tensor, incident: torch.Tensor, diffracted: torch.Tensor,
                        axis: torch.Tensor) -> torch.Tensor:
    """Kahn polarization correction for unit incident and diffracted rays;
    `axis` is the E-vector direction of the source."""
    cos2t = dot(incident, diffracted)
    cos2t_sq = cos2t * cos2t
    sin2t_sq = 1.0 - cos2t_sq
    b_in = unitize(cross(axis, incident))
    e_in = unitize(cross(incident, b_in))
    e_out = dot(diffracted, e_in)
    b_out = dot(diffracted, b_in)
    # cos(2 psi) with psi = -atan2(B, E), written without atan2 for smooth gradients.
    r2 = e_out * e_out + b_out * b_out
    cos_2psi = torch.where(r2 > 0, (e_out * e_out - b_out * b_out) / torch.where(r2 > 0, r2, torch.ones_like(r2)),
                           torch.ones_like(r2))
    return 0.5 * (1.0 + cos2t_sq - kahn * cos_2psi * sin2t_sq)


def solid_angle(pixel_size: torch.Tensor, airpath: torch.Tensor, close_distance: torch.Tensor,
                point_pixel: bool) -> torch.Tensor:
    """Solid angle of a pixel seen from the sample: (pixel/R)^2 * obliquity."""
    if point_pixel:
        return 1.0 / (airpath * airpath)
    return pixel_size * pixel_size / (airpath * airpath) * close_distance / airpath


def capture_fraction(layer: torch.Tensor, layer_step: torch.Tensor, mu: torch.Tensor,
                     parallax: torch.Tensor) -> torch.Tensor:
    """Fraction of photons absorbed in sensor layer `layer` (0-based) along a
    ray whose cosine to the sensor normal is `parallax`."""
    depth = layer_step * mu / parallax
    return torch.exp(-layer * depth) - torch.exp(-(layer + 1) * depth)


def lagrange_weights(x: torch.Tensor) -> torch.Tensor:
    """Cubic Lagrange weights on the four integer nodes floor(x)-1 .. floor(x)+2;
    returns (..., 4). Same polynomial as the original's nested polint."""
    t = x - torch.floor(x)  # position relative to node 1
    # nodes at -1, 0, 1, 2 relative to floor(x)
    w0 = -t * (t - 1) * (t - 2) / 6.0
    w1 = (t + 1) * (t - 1) * (t - 2) / 2.0
    w2 = -(t + 1) * t * (t - 2) / 2.0
    w3 = (t + 1) * t * (t - 1) / 6.0
    return torch.stack([w0, w1, w2, w3], -1)


def water_background(fluence: torch.Tensor, water_size: torch.Tensor) -> torch.Tensor:
    """Per-step intensity of a water droplet of edge `water_size` (m), in the
    original's units (it is normalised like a Bragg term afterwards)."""
    return (WATER_F * WATER_F * R_E_SQR * fluence * water_size ** 3 * 1e6 * AVOGADRO / WATER_MW)
