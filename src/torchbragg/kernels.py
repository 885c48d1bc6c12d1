"""The render's per-chunk arithmetic, as pure functions of plain tensors.

A chunk is a block of pixels; its photons are a sum over the (pixel, layer,
sub-pixel, source, orientation) grid. `chunk_photons` evaluates that sum from
the chunk's pixel indices and a dict of tensors (the panel's frame, the
image's sources and cell vectors, the structure factors), with every static
choice in a `KernelPlan`. The same source runs two ways:

- eagerly, as a chain of element-wise tensor passes over cache-sized blocks,
  skipping the grid points whose Bragg term is exactly zero (culled by -dmin,
  outside a top-hat spot, where a Gaussian spot underflows, where the
  structure factor is zero); without gradients the chunks run side by side
  on the CPU threads;
- compiled by torch.compile into two fused loops per chunk, the points and
  the terms (vectorised C++/OpenMP on CPU, Triton on GPU); the switch is
  TORCHBRAGG_COMPILE (`compile_mode`).

Vectors are the last dimension, as in physics.py; the large ones are stored
component-major ("planar"), so each component is one contiguous block.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, replace

import torch

from . import physics as ph

COMPILE_ENV = "TORCHBRAGG_COMPILE"
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# Eager: grid elements per block of the Bragg sum, and points (pixel x layer x
# sub-pixel) per chunk, small enough that the temporaries stay in the CPU
# caches between passes and the allocator reuses their memory (fresh pages
# cost more than the arithmetic on them). With gradients a chunk keeps its
# intermediates until the backward pass: fewer, larger chunks.
EAGER_BLOCK = 1 << 17
EAGER_POINTS = 1 << 18
MIN_POINTS = 1 << 13
GRAD_POINTS = 1 << 20
# Compiled: grid elements per call (nothing of that size is stored in a
# forward), and points per call (their buffers are).
COMPILED_CHUNK = 1 << 22
COMPILED_POINTS = 1 << 18
# auto: compile a kernel once this process has rendered (or is about to
# render) this many of its grid elements, and only kernels that the eager
# path cannot cull and whose loop over the terms outweighs the per-point work
AUTO_MIN_ELEMENTS = 1_500_000_000
AUTO_MIN_TERMS_PER_POINT = 8
# Inductor stores an intermediate that many loads or operations feed when it
# has several users; in the loop over the terms that would store the Miller
# indices (three loads of the points, cell vectors and offsets each), so let
# the whole term stay one expression.
FUSE_TERMS = {"realize_reads_threshold": 16, "realize_cpu_opcount_threshold": 300,
              "realize_cpu_acc_reads_threshold": 64}
# cull when at most this fraction of a block's grid points can contribute
CULL_FRACTION = 0.5


@dataclass(frozen=True)
class KernelPlan:
    """What a chunk's arithmetic depends on besides tensor values and shapes:
    the render options, spot shape and structure-factor lookup, and how to
    evaluate (fused: one expression for torch.compile; block, cull: eager)."""
    fpixels: int
    oversample: int
    layers: int  # depth samples, at least 1
    sensor: bool  # the sensor absorbs (sensor_layers > 0)
    absorbed: bool
    surface_layer: bool  # DIALS's parallax rule: layer 0 at the surface holds what the slabs below do not shift
    curved: bool
    point_pixel: bool
    polarization: bool
    oversample_thick: bool
    oversample_polar: bool
    oversample_omega: bool
    dmin: float
    shape: str  # physics.LATTICE_FACTORS
    lookup: str  # "constant", "nearest" or "tricubic"
    weighted: bool  # the sources carry weights
    fused: bool = False
    block: int = EAGER_BLOCK  # grid elements per Bragg block (eager)
    cull: bool = True

    @property
    def running(self) -> bool:
        return self.oversample_thick or self.oversample_polar or self.oversample_omega

    def compiled(self) -> "KernelPlan":
        return replace(self, fused=True, block=0, cull=False)

    def key(self) -> "KernelPlan":
        """The same kernel however it is evaluated."""
        return replace(self, fused=False, block=0, cull=False)


# ----------------------------------------------------------------------------- per sub-pixel
# Points of a chunk are (layer, sub-pixel, pixel) with the pixel innermost:
# the longest axis is the contiguous one, for the eager passes and for the
# compiled loop, which vectorises across pixels.

def _planar(components: list[torch.Tensor]) -> torch.Tensor:
    """Vectors (..., 3) stored component-major."""
    return torch.stack(components).movedim(0, -1)


def pixel_coordinates(plan: KernelPlan, idx: torch.Tensor, dtype) -> torch.Tensor:
    """(fast, slow) pixel numbers (2, P) of the flat indices `idx`; apart from
    the compiled stages, which would repeat the integer division per point."""
    slow = torch.div(idx, plan.fpixels, rounding_mode="floor")
    return torch.stack([idx - slow * plan.fpixels, slow]).to(dtype)


def sub_pixel_positions(plan: KernelPlan, pix: torch.Tensor, t: dict) -> torch.Tensor:
    """Sub-pixel positions (layers, sub-pixels, P, 3) in mm, planar, of the
    pixels `pix` (pixel_coordinates)."""
    os_, T = plan.oversample, plan.layers
    dtype, device = t["origin"].dtype, t["origin"].device
    sub = t["pixel_size"] / os_  # (fast, slow)
    fpix, spix = pix[0], pix[1]
    k = torch.arange(os_, dtype=dtype, device=device)[:, None]
    fdet = sub[0] * (fpix * os_ + k) + sub[0] / 2  # (os, P)
    sdet = sub[1] * (spix * os_ + k) + sub[1] / 2
    depth = torch.arange(T, dtype=dtype, device=device)
    if plan.absorbed:
        depth = depth + 0.5  # mid-depth of each slab
        if plan.surface_layer:  # layer 0 at the surface, the slabs after it
            depth = torch.cat([depth.new_zeros(1), depth[:-1]])
    odet = t["layer_step"] * depth  # (T,)
    P = pix.shape[1]
    # per component: the small (layer, column, pixel) part, then one pass that
    # adds the row part and writes the planar vectors
    across = [(fdet * t["fast"][c])[None] + (odet * t["normal"][c] + t["origin"][c])[:, None, None]
              for c in range(3)]  # (T, os, P)
    down = [(sdet * t["slow"][c])[None, :, None] for c in range(3)]  # (1, os, 1, P)
    if any(x.requires_grad for x in across + down):
        pos = _planar([(a[:, None] + d).reshape(T, -1, P) for a, d in zip(across, down)])
    else:
        planar = torch.empty((3, T, os_, os_, P), dtype=dtype, device=device)
        for c in range(3):
            torch.add(across[c][:, None], down[c], out=planar[c])
        pos = planar.view(3, T, os_ * os_, P).movedim(0, -1)
    if plan.curved:
        # keep every pixel at the beam distance: flat coordinates become angles
        dist = t["distance"]
        start = dist * t["beam"]
        rot_s = ph.rotation_axis_angle(t["slow"], pos[..., 1] / dist)
        rot_f = ph.rotation_axis_angle(t["fast"], pos[..., 2] / dist)
        pos = ph.rotate(rot_f, ph.rotate(rot_s, start))
    return pos


def point_factors(plan: KernelPlan, pix: torch.Tensor, t: dict):
    """Per point of the pixels `pix` (pixel_coordinates): the unit
    diffracted rays (G, P, 3), G = layers x sub-pixels, planar; the -dmin
    mask (T, Sub, P, Src) or None; and capture fraction, polarization and
    solid angle where they are evaluated (per pixel unless an -oversample_*
    switch asks for every sub-pixel, as the original)."""
    dtype, device = t["origin"].dtype, t["origin"].device
    P, T = pix.shape[1], plan.layers
    incident, lam = t["incident"], t["lam"]
    pos = sub_pixel_positions(plan, pix, t)
    x, y, z = pos.unbind(-1)  # each contiguous
    airpath = torch.sqrt(x * x + y * y + z * z)  # (T,Sub,P)
    diffracted = pos / airpath.unsqueeze(-1)
    d = diffracted.unsqueeze(-2)  # (T,Sub,P,1,3)
    valid = None
    if plan.dmin > 0:
        # |d - i| of unit vectors from their dot product: no (T,Sub,P,Src,3) array needed
        cos2t = ph.dot(d, incident)
        stol = 0.5 * torch.sqrt(torch.clamp(2.0 - 2.0 * cos2t, min=0.0)) / lam
        valid = ~((stol > 0) & (plan.dmin > 0.5 / stol))

    running = plan.running
    ap = airpath if running and plan.oversample_omega else airpath[:1, :1]
    px = t["pixel_size"]
    omega = ph.solid_angle(px[0] * px[1], ap, t["close"], plan.point_pixel)  # (T|1,Sub|1,P)
    full_thick = (running and plan.oversample_thick) or plan.absorbed
    if plan.sensor:
        layer = torch.arange(T, dtype=dtype, device=device)[:, None, None]
        dd = diffracted if full_thick else diffracted[:, :1]
        cos = ph.dot(dd, t["normal"])
        if plan.surface_layer:
            # DIALS's parallax correction shifts a spot by the mean absorption depth times the absorbed
            # fraction f: the slabs keep their share of f times f, the surface layer f (1 - f)
            slabs = ph.capture_fraction(layer[:-1], t["layer_step"], t["mu"], cos[1:])
            f = slabs.sum(0, keepdim=True)
            capture = torch.cat([f * (1 - f), f * slabs])
        else:
            capture = ph.capture_fraction(layer, t["layer_step"], t["mu"], cos)  # (T,1|Sub,P)
    else:
        capture = torch.ones((T, 1, P), dtype=dtype, device=device)
    full_polar = (running and plan.oversample_polar) or valid is not None
    if not plan.polarization:
        polar = torch.ones((1, 1, P, 1), dtype=dtype, device=device)
    else:
        dp = d if full_polar else d[:1, :1]
        inc = incident if full_polar else incident[:1]
        polar = ph.polarization_factor(t["kahn"], inc, dp, t["e_vector"])  # (T|1,Sub|1,P,Src|1)
    return diffracted.reshape(-1, P, 3), valid, capture, polar, omega


def chunk_photons(plan: KernelPlan, idx: torch.Tensor, t: dict, stages=None) -> torch.Tensor:
    """Photons of the pixels `idx` (flat indices in the panel), shape (P,).
    `stages`: compiled (point_factors, bragg_sum); default the functions here."""
    factors, summed = stages or (point_factors, bragg_sum)
    points, valid, capture, polar, omega = factors(plan, pixel_coordinates(plan, idx, t["origin"].dtype), t)
    P, T = idx.shape[0], plan.layers
    if plan.running:
        n_src, n_orient = t["cells"].shape[:2]
        terms = bragg_terms(replace(plan, fused=False), points, t, valid, capture, 0, n_src, 0, n_orient)
        intensity = terms.reshape(n_src, n_orient, T, -1, P).permute(4, 2, 3, 0, 1)  # (P,T,Sub,Src,M)
        total = running_product(plan, intensity, capture.permute(2, 0, 1), polar.permute(2, 0, 1, 3),
                                omega.permute(2, 0, 1), None if valid is None else valid.permute(2, 0, 1, 3),
                                t["i_bg"])
    else:
        skip = plan.cull and not plan.fused and not torch.is_grad_enabled()
        rows = reachable_pixels(plan, points, t, valid) if skip else None
        if rows is None:
            total = t["i_bg"] + summed(plan, points, t, valid, capture)
        else:  # the Bragg sum of the pixels that can have one
            bragg = torch.zeros(P, dtype=points.dtype, device=points.device)
            if rows.numel():
                bragg = bragg.index_put((rows,), summed(plan, points[:, rows], t,
                                                        None if valid is None else valid[:, :, rows],
                                                        capture[..., rows]))
            total = t["i_bg"] + bragg

    result = t["scale"] * total
    if plan.sensor and not (plan.oversample_thick or plan.absorbed):
        result = result * capture[-1, 0]  # the last layer's value, as the original
    if not plan.oversample_polar:
        result = result * first_polar(polar, valid)
    if not plan.oversample_omega:
        result = result * omega[0, 0]
    return result


def reachable_pixels(plan, points, t, valid):
    """Flat positions (in the chunk) of the pixels where some Bragg term can
    be non-zero, when at most CULL_FRACTION of them can; else None. A term is
    exactly zero where -dmin cuts it and where |d*| = |d - i| / lambda lies
    beyond the structure-factor table's reach (`reach_sq`). No-gradient renders only."""
    G, P = points.shape[:2]
    keep = None
    if "reach_sq" in t:
        cos2t = points.reshape(-1, 3) @ t["incident"].T  # (G*P, Src)
        keep = ((2.0 - 2.0 * cos2t) / (t["lam"] * t["lam"]) <= t["reach_sq"]).view(G, P, -1)
    if valid is not None:
        v = valid.reshape(G, P, -1)
        keep = v if keep is None else keep & v
    if keep is None:
        return None
    keep = keep.any(-1).any(0)
    rows = keep.nonzero().squeeze(1)
    return rows if rows.numel() <= CULL_FRACTION * P else None


def first_polar(polar, valid):
    """The polarization factor of the first sub-pixel and source that was
    not culled by -dmin (the original computes it once per pixel)."""
    flat = polar.permute(2, 0, 1, 3).reshape(polar.shape[2], -1)
    if valid is None:
        return flat[:, 0]
    v = valid.permute(2, 0, 1, 3).reshape(valid.shape[2], -1)
    first = torch.argmax(v.to(torch.uint8), dim=1)
    return flat.gather(1, first[:, None]).squeeze(1) * v.any(dim=1)


def running_product(plan, intensity, capture, polar, omega, valid, i_bg):
    """The original multiplies the running pixel sum by each per-sub-pixel
    factor after every term when an -oversample_* switch is on; this is the
    closed form of that recurrence. intensity (P, T, Sub, Src, M); capture,
    polar, omega, valid pixel-first too."""
    P, T, Sub, Src, M = intensity.shape
    dtype, device = intensity.dtype, intensity.device
    w = torch.ones((P, T, Sub, Src), dtype=dtype, device=device)
    if plan.oversample_thick:
        w = w * capture.unsqueeze(-1)
    if plan.oversample_polar:
        w = w * polar
    if plan.oversample_omega:
        w = w * omega.unsqueeze(-1)
    if valid is not None:
        w = torch.where(valid, w, torch.ones_like(w))
    exponents = torch.arange(M, 0, -1, dtype=dtype, device=device)  # M .. 1
    inner = (intensity * w.unsqueeze(-1) ** exponents).sum(-1).reshape(P, -1)  # (P, G)
    whole = (w ** M).reshape(P, -1)
    after = torch.flip(torch.cumprod(torch.flip(whole, [1]), 1), [1])  # prod over g' >= g
    after_excl = torch.cat([after[:, 1:], torch.ones_like(after[:, :1])], 1)
    return i_bg * after[:, 0] + (inner * after_excl).sum(-1)


# ----------------------------------------------------------------------------- Bragg terms

def bragg_sum(plan, points, t, valid, capture):
    """The Bragg terms of the points (G, P, 3) summed per pixel, (P,).
    Eager: in blocks of at most plan.block grid elements (pixels, then
    sources and orientations), so the temporaries of a block stay in cache
    and memory is bounded however many sources and orientations there are."""
    G, P = points.shape[:2]
    n_src, n_orient = t["cells"].shape[:2]
    if plan.block <= 0 or G * P * n_src * n_orient <= plan.block:
        return bragg_terms(plan, points, t, valid, capture, 0, n_src, 0, n_orient).sum((0, 1))
    budget = plan.block // (16 if plan.lookup == "tricubic" else 1)
    per_pixel = G * n_src * n_orient
    if per_pixel <= budget:
        step = budget // per_pixel
        whole = replace(plan, block=0)
        return torch.cat([bragg_sum(whole, points[:, p:p + step], t,
                                    None if valid is None else valid[:, :, p:p + step],
                                    capture[..., p:p + step]) for p in range(0, P, step)])
    # one pixel exceeds the block: take sources and orientations in slices
    s_step, m_step = n_src, max(1, budget // (G * n_src))
    if budget < G * n_src:
        s_step, m_step = max(1, budget // G), 1
    total = 0.0
    for s0 in range(0, n_src, s_step):
        for m0 in range(0, n_orient, m_step):
            terms = bragg_terms(plan, points, t, valid, capture, s0, min(s0 + s_step, n_src), m0,
                                min(m0 + m_step, n_orient))
            total = total + terms.sum((0, 1))
    return total


def miller_indices(plan, points, cells, offset):
    """h = a . (d - i) / lambda for every orientation (and source) k of
    `cells` (k, 3, 3; rows a, b, c over lambda) and point d of `points`
    (G, P, 3): the three indices, each (k, G, P), as a tuple (fused) or one
    (3, k, G, P) tensor. `offset` (k, 3) is the incident part i . a / lambda."""
    G, P = points.shape[:2]
    k = cells.shape[0]
    if plan.fused:
        # written out, so that the compiler fuses it into the loop over the terms
        d = points.unsqueeze(0)  # (1, G, P, 3)
        c = cells[:, :, :, None, None]  # (k, 3, 3, 1, 1)
        return tuple(d[..., 0] * c[:, j, 0] + d[..., 1] * c[:, j, 1] + d[..., 2] * c[:, j, 2]
                     - offset[:, j, None, None] for j in range(3))
    # one product of all cell vectors with the points' components, rows (axis, k)
    dT = points.permute(2, 0, 1).reshape(3, G * P)
    flat = torch.addmm(-offset.T.reshape(-1, 1), cells.transpose(0, 1).reshape(3 * k, 3), dT)
    return flat.view(3, k, G, P)  # stacked: one pass per step for all three components


def bragg_terms(plan, points, t, valid, capture, s0, s1, m0, m1):
    """F_latt^2 |F|^2 (k, G, P) for sources s0:s1 and orientations m0:m1 (k =
    sources x orientations, sources outer), with the source weights, the
    -dmin cut and absorbed-slab weights. Eager with plan.cull: evaluated only
    at the grid points where it can be non-zero; the others are exactly 0."""
    G, P = points.shape[:2]
    n_orient = m1 - m0
    cells = t["cells"][s0:s1, m0:m1].reshape(-1, 3, 3)
    offset = t["offset"][s0:s1, m0:m1].reshape(-1, 3)
    k = cells.shape[0]
    hkl = miller_indices(plan, points, cells, offset)

    # the other per-term factors, broadcastable to (k, G, P)
    weights = None
    if plan.weighted:
        weights = t["weights"][s0:s1].repeat_interleave(n_orient)[:, None, None]
    mask = None
    if valid is not None:  # (T, Sub, P, Src) -> (k, G, P)
        v = valid[..., s0:s1].reshape(G, P, -1).permute(2, 0, 1)
        mask = v.repeat_interleave(n_orient, 0) if n_orient > 1 else v
    slab = None
    if plan.absorbed and plan.sensor:  # each slab counts what it absorbs
        slab = capture.expand(plan.layers, G // plan.layers, P).reshape(1, G, P)

    def terms_at(hkl_, f_sq, w, m, s):
        value = ph.LATTICE_FACTORS[plan.shape](hkl_, t["n"], t["recip"], t["fudge"])
        if w is not None:
            value = value * w
        if m is not None:
            value = value * m
        if s is not None:
            value = value * s
        return value * f_sq

    f_sq = None
    if plan.cull and not plan.fused:
        keep = mask
        support = ph.LATTICE_SUPPORTS.get(plan.shape)
        if support is not None:
            inside = support(hkl, t["n"], t["recip"], t["fudge"])
            keep = inside if keep is None else keep & inside
        if plan.lookup != "constant" and not torch.is_grad_enabled():
            # zero |F|^2 zeroes the term and its first derivatives (not the second: no-grad renders only)
            f_sq = amplitude_sq(plan, hkl, t)
            keep = f_sq != 0 if keep is None else keep & (f_sq != 0)
        if keep is not None:
            keep = keep.expand(k, G, P)
            kept = int(torch.count_nonzero(keep))
            if kept == 0:
                return torch.zeros((k, G, P), dtype=points.dtype, device=points.device)
            if kept <= CULL_FRACTION * keep.numel():
                # the terms that can be non-zero, gathered, evaluated and put back in place
                sel = keep.reshape(-1).nonzero().squeeze(1)

                def pick(x, at=sel):
                    return None if x is None else x.reshape(-1).index_select(0, at)
                hkl_s = torch.stack([pick(h) for h in hkl])  # as unculled: stacked, component first
                f_s = amplitude_sq(plan, hkl_s, t) if f_sq is None else pick(f_sq)
                value = terms_at(hkl_s, f_s, pick(weights, torch.div(sel, G * P, rounding_mode="floor")), None,
                                 pick(slab, sel % (G * P)))
                zeros = torch.zeros(k * G * P, dtype=value.dtype, device=value.device)
                return zeros.index_copy(0, sel, value).view(k, G, P)
    if f_sq is None:
        f_sq = amplitude_sq(plan, hkl, t)
    return terms_at(hkl, f_sq, weights, mask, slab)


def amplitude_sq(plan, hkl, t):
    """|F|^2 at fractional indices hkl (three tensors); a scalar without a table."""
    if plan.lookup == "constant":
        f = t["default_F"]
    elif plan.lookup == "nearest":
        f = ph.nearest_in_padded(hkl, t["F_padded"], t["hkl_min"])
    else:
        if isinstance(hkl, torch.Tensor):
            vectors = hkl.movedim(0, -1)
        else:
            vectors = torch.stack(torch.broadcast_tensors(*hkl), -1)
        f = ph.STRUCTURE_FACTOR_LOOKUPS[plan.lookup](vectors, t["Fhkl"], t["hkl_min"], t["default_F"])
    return f * f


# ----------------------------------------------------------------------------- compilation

def compile_mode() -> str:
    """TORCHBRAGG_COMPILE: "0" never, "1" every render (with gradients too),
    "auto" (default) no-gradient renders once their work pays for compiling."""
    value = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if value in ("0", "off", "false", "no", "never"):
        return "0"
    if value in ("1", "on", "true", "yes", "always"):
        return "1"
    return "auto"


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "torchbragg", "inductor")


def compiler_available(device: torch.device) -> bool:
    """Whether torch.compile can build kernels for `device`: a C++ compiler on
    CPU, Triton on CUDA."""
    if device.type == "cuda":
        import importlib.util
        return importlib.util.find_spec("triton") is not None
    if device.type != "cpu":
        return False
    cxx = os.environ.get("CXX") or "g++"
    return shutil.which(cxx) is not None


class Kernels:
    """Chooses between the eager and the compiled chunk function and keeps
    the compiled ones; a compilation that fails falls back to eager."""

    def __init__(self):
        self._compiled = None
        self._failed = set()
        self._work = {}

    def should_compile(self, plan: KernelPlan, device: torch.device, elements: int, grad: bool,
                       terms_per_point: int = 1 << 30) -> bool:
        """Whether to render `elements` grid elements of `plan` compiled."""
        mode = compile_mode()
        if mode == "0" or plan.key() in self._failed or not compiler_available(device):
            return False
        if mode == "1":
            return True
        # auto: compiled graphs have no double backward (Hessians), so renders
        # with gradients stay eager; so do kernels the eager path culls or whose
        # per-point work dominates, where compiling does not pay
        if grad or plan.running or plan.dmin > 0 or plan.lookup != "constant" or plan.shape in ph.LATTICE_SUPPORTS \
                or terms_per_point < AUTO_MIN_TERMS_PER_POINT:
            return False
        self._work[plan.key()] = done = self._work.get(plan.key(), 0) + elements
        return done >= AUTO_MIN_ELEMENTS

    def stages(self):
        """point_factors and bragg_sum compiled; the points are the graph
        boundary, so the loop over the terms reads them instead of
        recomputing positions or storing Miller indices."""
        if self._compiled is None:
            self._compiled = (torch.compile(point_factors, dynamic=False),
                              torch.compile(bragg_sum, dynamic=False, options=FUSE_TERMS))
        return self._compiled

    def run(self, plan: KernelPlan, idx, t, use_ckpt: bool = False):
        """chunk_photons with compiled stages; None when compiling failed (use eager)."""
        if CACHE_ENV not in os.environ:  # keep compiled kernels between processes (before inductor reads it)
            os.environ[CACHE_ENV] = _default_cache_dir()
        import torch._dynamo
        from torch.utils.checkpoint import checkpoint
        try:
            # one graph per plan and chunk shape; a render needs a few, a test session many
            with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
                if use_ckpt:
                    return checkpoint(chunk_photons, plan, idx, t, self.stages(), use_reentrant=False)
                return chunk_photons(plan, idx, t, self.stages())
        except Exception as exc:  # no compiler, unsupported op or platform: eager still works
            self._failed.add(plan.key())
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            warnings.warn(f"torchbragg: compiled render failed, rendering eagerly ({type(exc).__name__}: {first})",
                          RuntimeWarning, stacklevel=3)
            return None


KERNELS = Kernels()

_POOL = None
_PRIMED = False


def prime_allocator():
    """Allocate and free 16 MB once (untouched, so nothing is written). The C
    allocator (glibc) hands blocks above its threshold, at first 128 kB, to
    the kernel on every free and faults them in afresh on the next use; it
    raises the threshold to the size of the largest such block freed, so the
    cache-sized temporaries of the eager chunks then reuse memory. On a
    virtual machine a page fault costs more than the arithmetic on the page
    (the first render of a process took twice as long without this)."""
    global _PRIMED
    if not _PRIMED:
        _PRIMED = True
        block = torch.empty(16 << 20, dtype=torch.uint8)
        del block


def eager_pool():
    """Threads that render eager chunks side by side; None with a single thread."""
    global _POOL
    workers = torch.get_num_threads()
    if workers <= 1:
        return None
    if _POOL is None or _POOL._max_workers != workers:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(workers, thread_name_prefix="torchbragg")
    return _POOL


def pool_map(pool, fn, items, done):
    """fn over items on the pool's threads, each with one torch thread and no
    gradient: a tensor pass then needs no hand-off between threads, which on
    a busy machine costs more than the pass. done(item) follows in order."""
    threads = torch.get_num_threads()
    inference = torch.is_inference_mode_enabled()

    def work(item):
        torch.set_num_threads(1)  # this thread's OpenMP team; the count is restored below
        with torch.inference_mode() if inference else torch.no_grad():
            return fn(item)
    try:
        values = []
        for item, value in zip(items, pool.map(work, items)):
            values.append(value)
            done(item)
        return values
    finally:
        torch.set_num_threads(threads)
