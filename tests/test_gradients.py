"""Gradient checks for every continuous parameter of the simulator.

Each case renders a small float64 detector placed over a few reflections (spot
centres, flanks and tails all fall on pixels) and checks the derivative of a
handful of linear functionals of the image against central differences with
`torch.autograd.gradcheck`. Parameters are rescaled so the checked variable is
O(1) (e.g. thickness in micrometres), which keeps the default step meaningful.

When TORCHBRAGG_GRAD_RECORD names a file, every check appends one JSON line
with its measured errors; `torchbragg gradcheck` builds its report from them.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass

import pytest
import torch

from torchbragg import Simulator

EPS, ATOL, RTOL = 1e-6, 1e-5, 1e-3
DEVICE = os.environ.get("TORCHBRAGG_GRAD_DEVICE", "cpu")
# CUDA accumulates index gradients with atomics, so repeated backward passes may
# differ in the last bits; on CPU they must be bit-identical.
NONDET_TOL = 0.0 if DEVICE == "cpu" else 1e-12
HERE = os.path.relpath(__file__, os.path.join(os.path.dirname(__file__), ".."))

CELL = "-cell 100 110 120 85 95 100"
# Beam at the detector corner: reflections (0,0..2,0..3) spread over 24x24 pixels, about two pixels wide.
BASE = ("-default_F 100 -N 5 -lambda 1 -distance 100 -detpixels 24 -pixel 0.1 -oversample 1 "
        "-dtype float64 -misset 3 -5 7 -Xbeam 0 -Ybeam 0")
# h -1..1, k -2..0, l 0..2; reflections with l = 3 on the detector fall outside and take default_F.
HKL_TABLE = "\n".join(f"{h} {k} {l} {50 + 7 * (h + 1) + 11 * (k + 2) + 5 * l}"
                      for h in (-1, 0, 1) for k in (-2, -1, 0) for l in (0, 1, 2)) + "\n"
# wide enough for the 4x4x4 neighbourhoods of tricubic interpolation
WIDE_TABLE = "\n".join(f"{h} {k} {l} {50 + 7 * h + 11 * k + 5 * l + (h * k * l) % 13}"
                        for h in range(-3, 4) for k in range(-4, 3) for l in range(-2, 6)) + "\n"


@dataclass(frozen=True)
class Case:
    param: str  # row of the coverage table, e.g. "crystal.misset[0]"
    attr: str  # "crystal.misset"
    index: int | None  # component of a vector parameter, None: the whole tensor
    flags: str  # added to BASE; {mat}, {hkl} and {wide} become input files
    unit: float  # parameter = x * unit, so the checked x is O(1)
    second_order: bool
    line: int

    @property
    def id(self):
        return self.param


def case(param, flags="", unit=1.0, second_order=False, attr=None, index=None):
    if attr is None:  # "detector.beam_center[0]@round": attribute, component, variant
        attr, _, rest = param.split("@")[0].partition("[")
        index = int(rest.rstrip("]")) if rest else None
    return Case(param, attr, index, flags, unit, second_order, sys._getframe(1).f_lineno)


THICK = "-detector_thick 100 -detector_abs 320 -thicksteps 3 -detector_rotx 10"
TILT = "-detector_rotx 2 -detector_roty -3 -detector_rotz 4 -twotheta 5"
CASES = [
    case("crystal.cell_a", second_order=True),
    case("crystal.cell_b", second_order=True),
    case("crystal.cell_c", second_order=True),
    case("crystal.cell_alpha", second_order=True),
    case("crystal.cell_beta", second_order=True),
    case("crystal.cell_gamma", second_order=True),
    case("crystal.misset[0]", second_order=True),
    case("crystal.misset[1]", second_order=True),
    case("crystal.misset[2]", second_order=True),
    case("crystal.A_orientation", "-mat {mat}", second_order=True),
    case("crystal.phi0", "-phi 10 -osc 1 -phisteps 3"),
    case("crystal.osc", "-phi 10 -osc 1 -phisteps 3"),
    case("crystal.mosaic_spread", "-mosaic 0.5 -mosaic_dom 4 -mosaic_seed 3"),
    case("crystal.N"),
    case("crystal.default_F"),
    case("crystal.default_F@hkl", "-hkl {hkl}"),
    case("crystal.Fhkl", "-hkl {hkl}", unit=100.0),
    case("crystal.cell_b@interpolate", "-N 2 -hkl {wide} -interpolate"),
    case("crystal.fudge@gauss", "-gauss_xtal -fudge 1.3"),
    case("crystal.fudge@round", "-round_xtal -fudge 0.8"),
    case("crystal.N@round", "-round_xtal", second_order=True),
    case("detector.distance", second_order=True),
    case("detector.close_distance", "-xds -close_distance 95 -detector_roty 4"),
    case("detector.close_center[0]", "-xds -ORGX 2 -ORGY 3 -detector_roty 4"),
    case("detector.close_center[1]", "-xds -ORGX 2 -ORGY 3 -detector_roty 4"),
    case("detector.beam_center[0]", second_order=True),
    case("detector.beam_center[1]", second_order=True),
    case("detector.pixel_size"),
    case("detector.rotation[0]", TILT),
    case("detector.rotation[1]", TILT),
    case("detector.rotation[2]", TILT),
    case("detector.twotheta", TILT),
    case("detector.thickness", THICK, unit=1e-6),
    case("detector.attenuation_depth", THICK, unit=1e-6),
    case("beam.wavelength", second_order=True),
    case("beam.dispersion", "-dispersion 5 -dispsteps 3"),
    case("beam.hdivrange", "-hdivrange 2 -vdivrange 1.5 -divsteps 3", unit=1e-3),
    case("beam.vdivrange", "-hdivrange 2 -vdivrange 1.5 -divsteps 3", unit=1e-3),
    case("beam.fluence", unit=1e29),
    case("beam.flux", "-flux 1e12 -exposure 2 -beamsize 0.05", unit=1e12),
    case("beam.exposure", "-flux 1e12 -exposure 2 -beamsize 0.05"),
    case("beam.beamsize", "-flux 1e12 -exposure 2 -beamsize 0.05", unit=0.01),
    case("beam.polarization", "-polar 0.8"),
    case("beam.water_size", "-water 30", unit=1e-6),
]


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """Input files for the cases, and a working directory without a stray Fdump.bin."""
    monkeypatch.chdir(tmp_path)
    hkl = tmp_path / "tiny.hkl"
    hkl.write_text(HKL_TABLE)
    wide = tmp_path / "wide.hkl"
    wide.write_text(WIDE_TABLE)
    # A MOSFLM matrix for the same crystal: columns a*, b*, c* times the wavelength.
    ref = Simulator.from_args(shlex.split(f"{CELL} {BASE}"))
    recip = ref.crystal.reciprocal_vectors().detach().double() * float(ref.beam.wavelength)
    recip = recip @ _misset_matrix(ref)  # undo the misset: the file holds the unrotated crystal
    mat = tmp_path / "A.mat"
    mat.write_text("".join(" ".join(f"{recip[j, i]:.12f}" for j in range(3)) + "\n" for i in range(3)))
    return {"mat": str(mat), "hkl": str(hkl), "wide": str(wide)}


def _misset_matrix(sim):
    from torchbragg import physics as ph
    return ph.rotation_xyz(sim.crystal.misset.double() * torch.pi / 180)


def build(c: Case, files, dtype="float64"):
    cell = "" if "-mat" in c.flags else CELL
    argv = shlex.split(f"{cell} {BASE} {c.flags.format(**files)}".replace("float64", dtype))
    return Simulator.from_args(argv, device=DEVICE)


def _owner(sim, c):
    part, name = c.attr.split(".")
    return getattr(sim, part), name


def setter(sim, c):
    """x -> sets the parameter to x * unit (only component `index` when given);
    returns the starting x."""
    obj, name = _owner(sim, c)
    base = getattr(obj, name).detach().clone()

    def set_(x):
        value = x * c.unit
        if c.index is not None:
            value = torch.cat([base[:c.index], value.reshape(1), base[c.index + 1:]])
        setattr(obj, name, value.reshape(base.shape))

    x0 = (base[c.index] if c.index is not None else base) / c.unit
    return set_, x0.reshape(-1).clone()


def functional(sim, c):
    """x -> a few O(1) linear functionals of the image: four random projections
    of the whole image and the peak, a half-height flank pixel and a tail pixel."""
    set_, x0 = setter(sim, c)
    with torch.no_grad():
        ref = sim.render().reshape(-1)
    scale = ref.abs().max()
    assert scale > 0, "the detector shows no signal"
    peak = ref.max()
    pix = torch.stack([ref.argmax(), (ref - 0.5 * peak).abs().argmin(), (ref - 0.02 * peak).abs().argmin()])
    gen = torch.Generator().manual_seed(0)
    proj = (torch.randn(4, ref.numel(), generator=gen, dtype=torch.float64) / ref.numel() ** 0.5).to(ref)

    def f(x):
        set_(x)
        img = sim.render().reshape(-1) / scale
        return torch.cat([proj @ img, img[pix]])

    return f, x0


def jacobians(f, x, eps):
    """(analytic, numerical) Jacobians of f at x, numerical by central differences."""
    x = x.detach().requires_grad_(True)
    out = f(x)
    rows = []
    for k in range(out.numel()):
        (g,) = torch.autograd.grad(out[k], x, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(x) if g is None else g)
    analytic = torch.stack(rows)
    cols = []
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = eps
        up, down = ((x.detach() + s * e).requires_grad_(True) for s in (1, -1))
        cols.append((f(up) - f(down)).detach() / (2 * eps))
    return analytic.detach(), torch.stack(cols, 1)


def errors(analytic, numerical, atol, rtol):
    diff = (analytic - numerical).abs()
    big = numerical.abs() >= 1e-3 * numerical.abs().max().clamp_min(1e-300)
    rel = (diff[big] / numerical.abs()[big]).max() if big.any() else torch.zeros(())
    return dict(max_abs_err=float(diff.max()), max_rel_err=float(rel),
                tol_ratio=float((diff / (atol + rtol * numerical.abs())).max()),
                grad_norm=float(numerical.norm()))


def record(request, c, check, passed, seconds, **fields):
    path = os.environ.get("TORCHBRAGG_GRAD_RECORD")
    if not path:
        return
    row = dict(test=request.node.nodeid, param=c.param, check=check, file=HERE, line=c.line, passed=bool(passed),
               seconds=round(seconds, 4), dtype=fields.pop("dtype", "float64"), device=DEVICE, **fields)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _require_graph(request, c, check, f, x0, t0):
    if not f(x0.detach().requires_grad_(True)).requires_grad:
        record(request, c, check, False, time.perf_counter() - t0, error="no autograd path to the parameter")
        pytest.fail(f"{c.param}: the image has no autograd path to the parameter")


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_gradcheck(c, inputs, request):
    t0 = time.perf_counter()
    sim = build(c, inputs)
    f, x0 = functional(sim, c)
    _require_graph(request, c, "gradcheck", f, x0, t0)
    ok = torch.autograd.gradcheck(f, (x0.requires_grad_(True),), eps=EPS, atol=ATOL, rtol=RTOL,
                                  nondet_tol=NONDET_TOL, raise_exception=False)
    err = errors(*jacobians(f, x0, EPS), ATOL, RTOL)
    record(request, c, "gradcheck", ok, time.perf_counter() - t0, eps=EPS, atol=ATOL, rtol=RTOL, **err)
    assert ok, f"{c.param}: analytic and numerical Jacobians differ ({err})"
    assert err["grad_norm"] > 0, f"{c.param}: the checked functionals do not depend on it"


@pytest.mark.parametrize("c", [c for c in CASES if c.second_order], ids=lambda c: c.id)
def test_gradgradcheck(c, inputs, request):
    t0 = time.perf_counter()
    sim = build(c, inputs)
    f, x0 = functional(sim, c)
    _require_graph(request, c, "gradgradcheck", f, x0, t0)
    x0.requires_grad_(True)
    ok = torch.autograd.gradgradcheck(f, (x0,), eps=EPS, atol=ATOL, rtol=RTOL, nondet_tol=NONDET_TOL,
                                      raise_exception=False)
    # the same comparison on one fixed vector-Jacobian product, for the record
    v = torch.linspace(1.0, -0.5, f(x0).numel(), dtype=x0.dtype, device=x0.device)

    def vjp(x):
        (g,) = torch.autograd.grad(f(x), x, v, create_graph=True)
        return g

    err = errors(*jacobians(vjp, x0, EPS), ATOL, RTOL)
    record(request, c, "gradgradcheck", ok, time.perf_counter() - t0, eps=EPS, atol=ATOL, rtol=RTOL, **err)
    assert ok, f"{c.param}: second derivatives differ ({err})"


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_gradient_reaches_parameter(c, inputs, request):
    """The parameter tensor itself, made trainable in place, gets a finite,
    non-zero gradient (in the checked component) from an image loss."""
    t0 = time.perf_counter()
    sim = build(c, inputs)
    obj, name = _owner(sim, c)
    param = getattr(obj, name)
    param.requires_grad_(True)
    img = sim.render()
    weights = torch.linspace(0.5, 1.5, img.numel(), dtype=img.dtype, device=img.device).reshape(img.shape)
    if img.requires_grad:
        (img * weights).sum().backward()
    grad = param.grad
    part = None if grad is None else (grad if c.index is None else grad[c.index])
    ok = part is not None and bool(torch.isfinite(grad).all()) and bool((part != 0).any())
    record(request, c, "nonzero", ok, time.perf_counter() - t0,
           grad_norm=None if part is None else float(part.norm()))
    assert grad is not None, f"{c.param}: no gradient reached the parameter"
    assert torch.isfinite(grad).all(), f"{c.param}: non-finite gradient {grad}"
    assert (part != 0).any(), f"{c.param}: gradient is zero"


def test_chunked_render_gradient_matches(inputs):
    """Rendering in checkpointed chunks gives the same gradient as one chunk."""
    grads = []
    for chunk in (None, 50):
        argv = shlex.split(f"{CELL} {BASE}")
        sim = Simulator.from_args(argv, device=DEVICE, chunk_elements=chunk)
        sim.crystal.cell_a.requires_grad_(True)
        sim.detector.distance.requires_grad_(True)
        (sim.render() ** 2).sum().backward()
        grads.append(torch.stack([sim.crystal.cell_a.grad, sim.detector.distance.grad]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- float32 end to end

FD_ARGS = ("-cell 100 110 120 85 95 100 -default_F 100 -N 5 -lambda 1 -distance 100 -detpixels 64 "
           "-pixel 0.1 -oversample 1 -misset 3 -5 7 -Xbeam 1 -Ybeam 1.5")
# (parameter, component, offset of the target, finite-difference step in float64)
FD_PARAMS = [("crystal.cell_a", None, 0.3, 1e-4), ("crystal.misset", 0, 0.2, 1e-4),
             ("detector.distance", None, 0.5, 1e-4), ("detector.beam_center", 0, 0.03, 1e-5),
             ("detector.beam_center", 1, -0.02, 1e-5)]


def _get(sim, attr):
    part, name = attr.split(".")
    return getattr(sim, part), name


def _shifted(sim, attr, index, delta):
    obj, name = _get(sim, attr)
    value = getattr(obj, name).detach().clone()
    if index is None:
        value = value + delta
    else:
        value[index] += delta
    setattr(obj, name, value)


def test_float32_loss_gradient_matches_finite_differences(request):
    """MSE between a float32 render and a target rendered at shifted parameters:
    the float32 autograd gradient agrees with float64 central differences."""
    t0 = time.perf_counter()
    target_sim = Simulator.from_args(shlex.split(FD_ARGS + " -dtype float64"), device=DEVICE)
    for attr, index, offset, _ in FD_PARAMS:
        _shifted(target_sim, attr, index, offset)
    with torch.no_grad():
        target = target_sim.render()
    norm = float((target ** 2).mean())

    sim32 = Simulator.from_args(shlex.split(FD_ARGS + " -dtype float32"), device=DEVICE)
    leaves = {}
    for attr, _, _, _ in FD_PARAMS:
        obj, name = _get(sim32, attr)
        leaves[attr] = getattr(obj, name).requires_grad_(True)
    loss = ((sim32.render() - target.float()) ** 2).mean() / norm
    loss.backward()

    sim64 = Simulator.from_args(shlex.split(FD_ARGS + " -dtype float64"), device=DEVICE)

    def loss64():
        with torch.no_grad():
            return float(((sim64.render() - target) ** 2).mean() / norm)

    failures = []
    for attr, index, _, step in FD_PARAMS:
        grad = leaves[attr].grad
        analytic = float(grad if index is None else grad[index])
        _shifted(sim64, attr, index, step)
        up = loss64()
        _shifted(sim64, attr, index, -2 * step)
        down = loss64()
        _shifted(sim64, attr, index, step)
        numerical = (up - down) / (2 * step)
        rel = abs(analytic - numerical) / abs(numerical)
        label = attr if index is None else f"{attr}[{index}]"
        c = Case(label, attr, index, "", 1.0, False, sys._getframe().f_lineno)
        record(request, c, "float32_vs_fd64", rel < 0.01, time.perf_counter() - t0, dtype="float32",
               eps=step, atol=0.0, rtol=0.01, max_abs_err=abs(analytic - numerical), max_rel_err=rel,
               analytic=analytic, numerical=numerical)
        if not rel < 0.01:
            failures.append(f"{label}: autograd {analytic:.6g} vs finite difference {numerical:.6g} ({rel:.2%})")
    assert not failures, "; ".join(failures)
