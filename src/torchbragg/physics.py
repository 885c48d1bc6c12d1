"""Small pure tensor functions: the physics of nanoBragg, one formula each.

Vectors are the last dimension (size 3). Every function is differentiable with
respect to its tensor arguments and runs on any device and dtype.
"""

from __future__ import annotations

import math

import torch

from .units import AVOGADRO, R_E_SQR

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


def real_cell(a, b, c, alpha, beta, gamma):
    """Real-space vectors (rows, Angstrom) of a cell in the standard setting
    (a along x, b in the xy plane), and the volume. Angles in radians."""
    ca, cb, cg = torch.cos(alpha), torch.cos(beta), torch.cos(gamma)
    sg = torch.sin(gamma)
    volume = a * b * c * torch.sqrt(1.0 - ca * ca - cb * cb - cg * cg + 2.0 * ca * cb * cg)
    zero = torch.zeros_like(a)
    row_a = torch.stack([a, zero, zero])
    row_b = torch.stack([b * cg, b * sg, zero])
    row_c = torch.stack([c * cb, c * (ca - cb * cg) / sg, volume / (a * b * sg)])
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
    """Kahn polarization correction 0.5 (1 + cos^2 2theta - kahn cos 2psi
    sin^2 2theta) for unit incident and unit diffracted rays; `axis` is the
    E-vector direction of the source. In the frame (incident, E, B) a unit ray
    has components (c, e, b), so cos 2psi sin^2 2theta = e^2 - b^2: no
    angle, smooth gradients even along the beam."""
    b_in = unitize(cross(axis, incident))
    e_in = unitize(cross(incident, b_in))
    frame = torch.stack(torch.broadcast_tensors(incident, e_in, b_in), -2)  # (..., 3 axes, 3)
    if diffracted.dim() > 1 and diffracted.shape[-2] == 1 and frame.dim() == 3:
        # rays (..., 1, 3) against sources (Src, 3): one product, component-major
        proj = torch.mm(frame.reshape(-1, 3), diffracted.reshape(-1, 3).T)  # (Src * 3, rays)
        proj = proj.view(frame.shape[0], 3, *diffracted.shape[:-2]).movedim(0, -1)  # (3, ..., Src)
        c, e, b = proj.unbind(0)
    else:
        c, e, b = (dot(diffracted, v) for v in frame.unbind(-2))
    return 0.5 * (1.0 + c * c - kahn * (e * e - b * b))


def solid_angle(pixel_area: torch.Tensor, airpath: torch.Tensor, close_distance: torch.Tensor,
                point_pixel: bool) -> torch.Tensor:
    """Solid angle of a pixel seen from the sample: area / R^2 * obliquity
    (close_distance / R), lengths in mm. A point pixel gives 1 / R^2 with R in
    metres, as the original."""
    if point_pixel:
        return 1.0 / (airpath * airpath * 1e-6)
    return pixel_area / (airpath * airpath) * close_distance / airpath


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


# ----------------------------------------------------------------------------- amorphous scattering
# A .stol table gives the structure factor F of one molecule of an amorphous
# material (water, air, ice, ...) against sin(theta)/lambda. Between its points
# the original interpolates with the cubic through the two points on either side
# (4-point Lagrange); past either end the missing points sit at +-infinity, which
# leaves the quadratic (or the line) through the points that remain.

def stol_cubic_coefficients(stol: torch.Tensor, F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Piecewise cubic of a table with strictly increasing `stol` (n,): interval j
    (j = 0..n) holds the x with j table points <= x. Returns origins (n+1,) and
    coefficients (n+1, 4) of c0 + c1 u + c2 u^2 + c3 u^3, u = x - origin."""
    n = stol.numel()
    j = torch.arange(n + 1, device=stol.device)
    origin = stol[(j - 1).clamp(0, n - 1)]
    idx = j[:, None] + torch.arange(-2, 2, device=stol.device)[None, :]  # the four nodes of each interval
    real = (idx >= 0) & (idx < n)
    x = torch.where(real, stol[idx.clamp(0, n - 1)] - origin[:, None], torch.zeros_like(origin[:, None]))
    y = F[idx.clamp(0, n - 1)]
    coeffs = torch.zeros(n + 1, 4, dtype=stol.dtype, device=stol.device)
    one, zero = torch.ones_like(origin), torch.zeros_like(origin)
    for a in range(4):
        poly = [one, zero, zero, zero]
        denom = one
        for b in range(4):
            if b == a:
                continue
            # factor (u - x_b) / (x_a - x_b); a node at infinity contributes 1
            lin0 = torch.where(real[:, b], -x[:, b], one)
            lin1 = torch.where(real[:, b], one, zero)
            denom = denom * torch.where(real[:, b], x[:, a] - x[:, b], one)
            poly = [lin0 * poly[0]] + [lin0 * poly[k] + lin1 * poly[k - 1] for k in range(1, 4)]
        w = torch.where(real[:, a], y[:, a] / denom, zero)
        coeffs = coeffs + torch.stack([w * p for p in poly], -1)
    return origin, coeffs


def amorphous_structure_factor(u: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """F of one molecule from the cubic of its table interval: `coeffs` (..., 4)
    of c0 + c1 u + c2 u^2 + c3 u^3 (from `stol_cubic_coefficients`, possibly
    re-expanded about another point) at the offset `u`."""
    return ((coeffs[..., 3] * u + coeffs[..., 2]) * u + coeffs[..., 1]) * u + coeffs[..., 0]


def kahn_polarization(kahn: torch.Tensor, cos2theta: torch.Tensor, e_component: torch.Tensor) -> torch.Tensor:
    """The factor of `polarization_factor` from the diffracted ray's cosine to
    the beam and its component along the E-vector: with b^2 = 1 - c^2 - e^2,
    e^2 - b^2 = 2 e^2 + c^2 - 1."""
    c2 = cos2theta * cos2theta
    return 0.5 * (1.0 + kahn) + (0.5 * (1.0 - kahn)) * c2 - kahn * (e_component * e_component)


def amorphous_scattering(F: torch.Tensor, molecules: torch.Tensor, fluence: torch.Tensor) -> torch.Tensor:
    """Photons per steradian (before polarization) scattered by `molecules`
    molecules of structure factor F under `fluence` photons/m^2: incoherent
    sum, F^2 r_e^2 per molecule; a negative F gives negative intensity, as in
    the original."""
    return F * torch.abs(F) * (R_E_SQR * fluence * molecules)


def sample_molecules(thickness: torch.Tensor, height: torch.Tensor, width: torch.Tensor, density: torch.Tensor,
                     molecular_weight: torch.Tensor) -> torch.Tensor:
    """Molecules in a box of the given edges (mm) of a material of `density`
    (g/cm^3) and `molecular_weight` (g/mol)."""
    volume_cm3 = thickness * height * width * 1e-3
    return volume_cm3 * density * AVOGADRO / molecular_weight


# ----------------------------------------------------------------------------- lattice factors
# F_latt^2 of a crystal of N (3,) cells at fractional Miller indices given
# component first: three broadcastable tensors (h, k, l), or one tensor
# (3, ...). Kept apart, each component is one contiguous block, which is what
# lets a compiler vectorise the loop over the terms; as one tensor, each step
# is one pass over all three. `recip` holds the reciprocal vectors (rows, 1/A)
# for the shapes defined in reciprocal space; `fudge` scales the spot size.
# `lattice_factor_sq` takes the indices as one (..., 3) tensor.

def _per_component(n, hkl):
    """N shaped to broadcast against indices stacked component first."""
    return n.reshape(3, *([1] * (hkl.dim() - 1)))


def _square_lattice_sq(hkl, n, recip, fudge):
    """Parallelepiped crystal: the product of three grating transforms."""
    if not (any(x.requires_grad for x in hkl) or n.requires_grad):
        return _sincg_sq_product_inplace(hkl, n)
    if isinstance(hkl, torch.Tensor):
        return _SquareLatticeSq.apply(hkl, n)
    h, k, l = hkl
    return sincg_sq(h - torch.round(h), n[0]) * sincg_sq(k - torch.round(k), n[1]) * sincg_sq(l - torch.round(l), n[2])


def _grating(frac, n):
    """g = sin(N x) / sin(x) at x = pi frac (frac: the distance from the
    nearest node), and its derivatives in frac and N; within 1e-6 of the
    node, where the ratios are 0/0, their series to second order (which keeps
    second derivatives right at exact peaks)."""
    x = math.pi * frac
    small = torch.abs(x) < 1e-6
    s = torch.where(small, torch.ones_like(x), torch.sin(x))
    c, nx = torch.cos(x), n * x
    sn, cn = torch.sin(nx), torch.cos(nx)
    if not torch.is_grad_enabled():
        # first derivatives only; near the node the series' x^2 terms, under
        # N^2 2e-13 relative, are dropped
        inv_s = 1.0 / s
        g = torch.where(small, n, sn * inv_s)
        dg_dx = torch.where(small, x * (-n * (n * n - 1) / 3), (n * cn - g * c) * inv_s)
        dg_dn = torch.where(small, torch.ones_like(x), x * cn * inv_s)
        return g, dg_dx * math.pi, dg_dn
    g = torch.where(small, n * (1 - (n * n - 1) * x * x / 6), sn / s)
    dg_dx = torch.where(small, -n * (n * n - 1) * x / 3, (n * cn * s - sn * c) / (s * s))
    dg_dn = torch.where(small, 1 - (3 * n * n - 1) * x * x / 6, x * cn / s)
    return g, dg_dx * math.pi, dg_dn


class _SquareLatticeSq(torch.autograd.Function):
    """F_latt^2 = (g_a g_b g_c)^2 of indices stacked component first (3, ...),
    with its derivatives written out: one node in the graph instead of a
    dozen per component, and a backward of a few passes. The backward is
    made of differentiable operations, so second derivatives work too."""

    @staticmethod
    def forward(ctx, hkl, n):
        ctx.save_for_backward(hkl, n)
        with torch.no_grad():
            return _sincg_sq_product_inplace(hkl, n)

    @staticmethod
    def backward(ctx, grad):
        hkl, n = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return _square_lattice_grads_blocked(hkl, n, grad, ctx.needs_input_grad)
        others, dg_dh, dg_dn = _square_lattice_chain(hkl, n, grad)
        grad_hkl = others * dg_dh if ctx.needs_input_grad[0] else None
        grad_n = None
        if ctx.needs_input_grad[1]:
            grad_n = (others * dg_dn).reshape(3, -1).sum(1).reshape(n.shape)
        return grad_hkl, grad_n


def _square_lattice_chain(hkl, n, grad):
    """grad times d F_latt^2 / d g_j (3, ...), and the gratings' dg/dh and
    dg/dN, at indices `hkl` stacked component first."""
    g, dg_dh, dg_dn = _grating(hkl - torch.round(hkl), _per_component(n, hkl))
    twice = 2 * grad * (g[0] * g[1] * g[2])
    return torch.stack([g[1] * g[2], g[0] * g[2], g[0] * g[1]]) * twice, dg_dh, dg_dn


# grid points per block of a first-order backward: its dozen temporaries stay in cache
_BACKWARD_BLOCK = 1 << 15


def _square_lattice_grads_blocked(hkl, n, grad, needs):
    """The first derivatives of _SquareLatticeSq, in blocks of grid points."""
    flat = hkl.reshape(3, -1)
    g_out = grad.expand(hkl.shape[1:]).reshape(-1)
    grad_hkl = torch.empty_like(flat) if needs[0] else None
    grad_n = torch.zeros(3, dtype=hkl.dtype, device=hkl.device) if needs[1] else None
    for a in range(0, flat.shape[1], _BACKWARD_BLOCK):
        others, dg_dh, dg_dn = _square_lattice_chain(flat[:, a:a + _BACKWARD_BLOCK], n,
                                                     g_out[a:a + _BACKWARD_BLOCK])
        if grad_hkl is not None:
            torch.mul(others, dg_dh, out=grad_hkl[:, a:a + _BACKWARD_BLOCK])
        if grad_n is not None:
            grad_n += (others * dg_dn).sum(1)
    return (None if grad_hkl is None else grad_hkl.view(hkl.shape),
            None if grad_n is None else grad_n.reshape(n.shape))


def _sincg_sq_product_inplace(hkl, n):
    """The same value as `_square_lattice_sq`, in place, for renders that need
    no gradient (2-3x faster)."""
    # pi times the distance from the nearest node, nudged by 1e-30 so that a
    # point exactly on a node gives sin(N x)/sin(x) = N instead of 0/0
    tiny = torch.tensor(1e-30, dtype=hkl[0].dtype, device=hkl[0].device)
    if isinstance(hkl, torch.Tensor):
        x = torch.round(hkl).sub_(hkl)
        x = torch.add(tiny, x, alpha=-math.pi, out=x)
        s = torch.sin(x)
        x.mul_(_per_component(n, hkl)).sin_().div_(s)
        return (x[0] * x[1]).mul_(x[2]).square_()
    f = None
    for axis, h in enumerate(hkl):
        x = torch.round(h).sub_(h)
        x = torch.add(tiny, x, alpha=-math.pi, out=x)
        s = torch.sin(x)
        x.mul_(n[axis]).sin_().div_(s)
        f = x if f is None else f.mul_(x)
    return f.square_()


def _node_distance(h):
    """h minus its nearest integer (halves round up, as the original)."""
    return h - torch.ceil(h - 0.5)


def _round_lattice_sq(hkl, n, recip, fudge):
    """Spherical crystal: the sphere transform in the index distance scaled by N."""
    rs = None
    for axis, h in enumerate(hkl):
        delta = _node_distance(h)
        term = delta * delta * n[axis] * n[axis]
        rs = term if rs is None else rs + term
    rs = rs * fudge
    arg = math.pi * torch.sqrt(torch.clamp(rs, min=1e-30))
    # at the peak the clamp would zero the curvature: use the series in rs itself
    f = n[0] * n[1] * n[2] * ROUND_XTAL_SCALE * torch.where(rs < 1e-12, 1.0 - math.pi ** 2 * rs / 10.0, sinc3(arg))
    return f * f


def _reciprocal_radius_sq(hkl, n, recip):
    """|d*|^2 N_a^2 N_b^2 N_c^2 of the distance to the nearest node, and N_a N_b N_c."""
    delta = [_node_distance(h) for h in hkl]
    rad = None
    for c in range(3):
        dstar = delta[0] * recip[0, c] + delta[1] * recip[1, c] + delta[2] * recip[2, c]  # 1/Angstrom
        rad = dstar * dstar if rad is None else rad + dstar * dstar
    nnn = n[0] * n[1] * n[2]
    return rad * nnn * nnn, nnn


def _gauss_lattice_sq(hkl, n, recip, fudge):
    """Gaussian spot in reciprocal space."""
    rad_sq, nnn = _reciprocal_radius_sq(hkl, n, recip)
    f = nnn * torch.exp(-(rad_sq / 0.63 * fudge))
    return f * f


def _tophat_lattice_sq(hkl, n, recip, fudge):
    """Flat spot of fixed reciprocal radius."""
    rad_sq, nnn = _reciprocal_radius_sq(hkl, n, recip)
    f = nnn * (rad_sq * fudge < 0.3969).to(rad_sq.dtype)
    return f * f


LATTICE_FACTORS = {"square": _square_lattice_sq, "round": _round_lattice_sq,
                   "gauss": _gauss_lattice_sq, "tophat": _tophat_lattice_sq}

# Exponents beyond which exp(-x) rounds to exactly 0 (with a margin), per dtype.
_EXP_UNDERFLOW = {torch.float16: 20.0, torch.bfloat16: 100.0, torch.float32: 110.0, torch.float64: 750.0}


def _gauss_support(hkl, n, recip, fudge):
    """Where the Gaussian spot is not exactly zero: it underflows far from a node."""
    rad_sq, _ = _reciprocal_radius_sq(hkl, n, recip)
    return rad_sq / 0.63 * fudge < _EXP_UNDERFLOW.get(rad_sq.dtype, 750.0)


def _tophat_support(hkl, n, recip, fudge):
    """Inside the spot: the top hat is exactly zero outside."""
    rad_sq, _ = _reciprocal_radius_sq(hkl, n, recip)
    return rad_sq * fudge < 0.3969


# Spot shapes that are exactly zero (value and every derivative) away from the
# reciprocal-lattice nodes: a mask of where F_latt^2 may be non-zero. A render
# evaluates those shapes only there; the others (square, round) are never zero.
LATTICE_SUPPORTS = {"gauss": _gauss_support, "tophat": _tophat_support}


def lattice_factor_sq(shape: str, hkl, n, recip, fudge):
    """Squared lattice transform F_latt^2 of the spot shape `shape` at hkl (..., 3)."""
    return LATTICE_FACTORS[shape](hkl.unbind(-1), n, recip, fudge)


# ----------------------------------------------------------------------------- structure factors

def padded_structure_factors(grid, default_F):
    """The table with one layer of default_F around it: indices outside the
    table clamp onto that layer (built once per image for `nearest_in_padded`)."""
    return torch.nn.functional.pad(grid - default_F, (1, 1, 1, 1, 1, 1)) + default_F


def nearest_in_padded(hkl, padded, hkl_min):
    """F of the nearest node, hkl component first (three tensors or one (3, ...)
    tensor), in a table made by `padded_structure_factors`."""
    dtype, dims = hkl[0].dtype, padded.shape
    if isinstance(hkl, torch.Tensor):  # each step one pass over all three components
        top = torch.tensor(dims, dtype=dtype, device=hkl.device) - 1
        rel = torch.ceil(hkl - 0.5) - _per_component((hkl_min - 1).to(dtype), hkl)
        rel = torch.minimum(torch.clamp(rel, min=0), _per_component(top, hkl))
    else:
        rel = [torch.clamp(torch.ceil(h - 0.5) - (hkl_min[axis] - 1).to(dtype), 0, dims[axis] - 1)
               for axis, h in enumerate(hkl)]
    # the flat index in the fractional dtype while it is exact there (one
    # conversion instead of three, half the bytes per pass), else in int64
    exact = padded.numel() <= 2 / torch.finfo(dtype).eps
    if not exact:
        rel = [r.long() for r in rel]
    lin = (rel[0] * dims[1] + rel[1]) * dims[2] + rel[2]
    lin = lin.long() if exact else lin
    return padded.reshape(-1).index_select(0, lin.reshape(-1)).view(lin.shape)


def nearest_structure_factor(hkl, grid, hkl_min, default_F):
    """F of the nearest node at hkl (..., 3); nodes outside the table take `default_F`."""
    return nearest_in_padded(hkl.unbind(-1), padded_structure_factors(grid, default_F), hkl_min)


def tricubic_structure_factor(hkl, grid, hkl_min, default_F):
    """Tricubic interpolation over the 4x4x4 neighbourhood, where it lies inside
    the table; `default_F` elsewhere."""
    dims = grid.shape
    mins = hkl_min.to(hkl.dtype)
    size = torch.tensor(dims, dtype=hkl.dtype, device=hkl.device)
    inside = ((hkl - mins + 3 <= size) & (hkl - 2 >= mins)).all(-1)
    base = torch.floor(hkl) - 1 - mins  # index of the first node
    base = torch.where(inside.unsqueeze(-1), base, torch.zeros_like(base)).long()
    w = lagrange_weights(hkl)  # (...,3,4)
    offs = torch.arange(4, device=hkl.device)
    ih = (base[..., 0, None] + offs).clamp(0, dims[0] - 1)
    ik = (base[..., 1, None] + offs).clamp(0, dims[1] - 1)
    il = (base[..., 2, None] + offs).clamp(0, dims[2] - 1)
    lin = (ih[..., :, None, None] * (dims[1] * dims[2]) + ik[..., None, :, None] * dims[2]
           + il[..., None, None, :])
    vals = grid.reshape(-1)[lin]  # (...,4,4,4)
    wt = w[..., 0, :, None, None] * w[..., 1, None, :, None] * w[..., 2, None, None, :]
    f = (vals * wt).sum((-1, -2, -3))
    return torch.where(inside, f, default_F)


STRUCTURE_FACTOR_LOOKUPS = {"nearest": nearest_structure_factor, "tricubic": tricubic_structure_factor}

# How far (in node spacings per axis) from a point a lookup reads the table:
# the nearest node, or the 4 x 4 x 4 neighbourhood of the tricubic one.
LOOKUP_REACH = {"nearest": 0.5, "tricubic": 2.0}


def structure_factor_reach_sq(grid, hkl_min, recip, default_F, lookup: str):
    """|d*|^2 (1/A^2) beyond which a lookup in the table returns exactly 0:
    the largest |d*| of a node whose F is not 0, plus the lookup's reach along
    every reciprocal axis; infinite unless default_F is 0. |d*| does not change
    as the crystal turns, so this bounds every orientation at once."""
    nodes = torch.nonzero(grid != 0).to(recip.dtype) + hkl_min.to(recip.dtype)
    dstar = nodes @ recip
    largest = torch.sqrt((dstar * dstar).sum(-1).max()) if nodes.shape[0] else recip.new_zeros(())
    reach = largest + LOOKUP_REACH[lookup] * norm(recip).sum()
    return torch.where(default_F == 0, reach * reach, torch.full_like(reach, math.inf))
