"""Gradient checks for every continuous parameter of the simulator.

Each case renders a small float64 detector placed over a few reflections (spot
centres, flanks and tails all fall on pixels) and checks the derivative of a
handful of linear functionals of the image against central differences with
`torch.autograd.gradcheck`. The image is evaluated as a function of one
parameter of the `Simulator` module with `torch.func.functional_call`, under
the parameter's name (`sim.named_parameters()`), e.g.
"detector.panels.0.frame.distance". Parameters are rescaled so the checked
variable is O(1) (e.g. thickness in micrometres), which keeps the default step
meaningful.

The checks are pytest tests: `torchbragg gradcheck` runs pytest on this file
of the installed package, and the source checkout's tests/test_gradients.py
imports them. When TORCHBRAGG_GRAD_RECORD names a file, every check appends
one JSON line with its measured errors; `torchbragg gradcheck` builds its
report from them. TORCHBRAGG_GRAD_DEVICE picks the device (default cpu).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from torchbragg import Simulator
from torchbragg.models import Detector, Frame, Goniometer, Panel, PanelGroup

__all__ = ["CASES", "inputs", "test_gradcheck", "test_gradgradcheck", "test_gradient_reaches_parameter",
           "test_every_parameter_is_checked", "test_chunked_render_gradient_matches",
           "test_float32_loss_gradient_matches_finite_differences", "test_loss_gradients",
           "test_background_float32_gradients_match_finite_differences",
           "test_parametrisation_gradients", "test_every_parameter_group_is_checked", "test_psf_width_gradient"]

EPS, ATOL, RTOL = 1e-6, 1e-5, 1e-3
DEVICE = os.environ.get("TORCHBRAGG_GRAD_DEVICE", "cpu")
# CUDA accumulates index gradients with atomics, so repeated backward passes may
# differ in the last bits; on CPU they must be bit-identical.
NONDET_TOL = 0.0 if DEVICE == "cpu" else 1e-12
# this file as pytest names it when the folder holding the package is the rootdir
HERE = Path(__file__).resolve().relative_to(Path(__file__).resolve().parents[2]).as_posix()

CELL = "-cell 100 110 120 85 95 100"
# Beam at the detector corner: reflections (0,0..2,0..3) spread over 24x24 pixels, about two pixels wide.
BASE = ("-default_F 100 -N 5 -lambda 1 -distance 100 -detpixels 24 -pixel 0.1 -oversample 1 "
        "-dtype float64 -misset 3 -5 7 -Xbeam 0 -Ybeam 0")
# h -1..1, k -2..0, l 0..2; reflections with l = 3 on the detector fall outside and take default_F.
HKL_TABLE = "\n".join(f"{h} {k} {l} {50 + 7 * (h + 1) + 11 * (k + 2) + 5 * l}"
                      for h in (-1, 0, 1) for k in (-2, -1, 0) for l in (0, 1, 2)) + "\n"
# the same reflections with Friedel mates equal (what a structure-factor refinement expects)
FRIEDEL_TABLE = "\n".join(f"{h} {k} {l} {50 + 7 * h * h + 11 * abs(k) + 5 * l * l + 3 * abs(h * k)}"
                           for h in (-1, 0, 1) for k in (-2, -1, 0) for l in (0, 1, 2)) + "\n"
# wide enough for the 4x4x4 neighbourhoods of tricubic interpolation
WIDE_TABLE = "\n".join(f"{h} {k} {l} {50 + 7 * h + 11 * k + 5 * l + (h * k * l) % 13}"
                        for h in range(-3, 4) for k in range(-4, 3) for l in range(-2, 6)) + "\n"


@dataclass(frozen=True)
class Case:
    param: str  # row of the coverage table, e.g. "crystal.misset[0]" or "crystal.cell[1]@interpolate"
    name: str  # the simulator's parameter, e.g. "crystal.misset"
    index: int | None  # component of a vector parameter, None: the whole tensor
    flags: str  # added to BASE; {mat}, {hkl} and {wide} become input files
    unit: float  # parameter = x * unit, so the checked x is O(1)
    second_order: bool
    setup: str | None  # a SETUPS entry that changes the built simulator (models the flags cannot make)
    line: int

    @property
    def id(self):
        return self.param


def case(param, flags="", unit=1.0, second_order=False, setup=None):
    """param: "name", "name[i]" (one component) or either with "@variant"."""
    name, _, rest = param.split("@")[0].partition("[")
    index = int(rest.rstrip("]")) if rest else None
    return Case(param, name, index, flags, unit, second_order, setup, sys._getframe(1).f_lineno)


# ----------------------------------------------------------------------------- models the flags cannot build

def _tilted_beam(sim):
    """Turn the beam about 0.2 degrees off the lab axis, so every component of
    the direction moves it (along an axis the radial component only changes
    the length, which the beam ignores)."""
    with torch.no_grad():
        d = sim.beam.direction
        d.copy_(torch.tensor([-1.0, 0.003, -0.002], dtype=d.dtype, device=d.device))


def _two_panels(sim):
    """The flag-built detector cut into two 12x24-pixel panels under a group
    whose frame is the old detector's (origin at its first pixel, same fast and
    slow axes); panel 0 sits at the group origin, panel 1 12 pixels along fast
    in a subgroup of its own, turned by about 3 mrad."""
    dt = dict(dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        origin, fast, slow, _ = (t[0].double().cpu() for t in sim.detector.panel_frames(sim.beam.incident()))
    px = sim.detector.panels[0].pixel_size.detach().double().cpu()

    def panel(frame):
        return Panel(frame, image_size=(12, 24), pixel_size=tuple(px.tolist()), thickness=0.0, mu=0.0, **dt)

    ex, ey = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
    panels = [panel(Frame((0.0, 0.0, 0.0), ex, ey, **dt)),
              panel(Frame((0.0, 0.0, 0.0), ex, ey, orientation=(1e-3, -2e-3, 1.5e-3), **dt))]
    sub = PanelGroup(Frame((12 * float(px[0]), 0.0, 0.0), ex, ey, **dt), children=[1], name="right", **dt)
    root = PanelGroup(Frame(tuple(origin.tolist()), tuple(fast.tolist()), tuple(slow.tolist()), **dt),
                      children=[0, sub], name="detector", **dt)
    sim.detector = Detector(panels, hierarchy=root, **dt)


def _two_axes(sim):
    """A second goniometer axis (lab y, at 3 degrees) outside the scan axis (lab z, the spindle)."""
    sim.goniometer = Goniometer(axes=[(0.0, 0.0, 1.0), (0.0, 1.0, 0.0)], angles=(0.0, 3.0), scan_axis=0,
                                dtype=torch.float64, device=DEVICE)


# a smooth amorphous table over the stol the cases' detector sees (0 .. 0.02 1/A)
BACKGROUND_STOL = [0.005 * i for i in range(9)]
BACKGROUND_F = [2.57 + 40.0 * s - 300.0 * s * s for s in BACKGROUND_STOL]


def _background(sim, **kw):
    """An amorphous background (models.Background) added to the image, strong
    enough to matter next to the spots."""
    from torchbragg.models import Background
    sim.background = Background(BACKGROUND_STOL, BACKGROUND_F, thickness=0.2, size=(0.1, 0.1), density=0.9,
                                molecular_weight=18.0, scale=300.0, dtype=torch.float64, device=DEVICE, **kw)


SETUPS = {"tilted_beam": _tilted_beam, "two_panels": _two_panels, "two_axes": _two_axes, "background": _background,
          "background_molecules": lambda sim: _background(sim, molecules=3e16)}

# ----------------------------------------------------------------------------- the cases

PHI = "-phi 10 -osc 1 -phisteps 3"
THICK = "-detector_thick 100 -detector_abs 320 -thicksteps 3 -detector_rotx 10"
TILT = "-detector_rotx 2 -detector_roty -3 -detector_rotz 4 -twotheta 5"
XDS = "-xds -ORGX 2 -ORGY 3 -detector_roty 4"
PANEL = "detector.panels.0"
CASES = [
    *(case(f"crystal.cell[{i}]", second_order=True) for i in range(6)),
    *(case(f"crystal.misset[{i}]", second_order=True) for i in range(3)),
    case("crystal.misset@mat", "-mat {mat}", second_order=True),
    case("crystal.cell@mat", "-mat {mat}"),
    case("scan.oscillation[0]", PHI),
    case("scan.oscillation[1]", PHI),
    case("goniometer.angles[1]", PHI, setup="two_axes"),
    case("crystal.mosaic_spread", "-mosaic 0.5 -mosaic_dom 4 -mosaic_seed 3"),
    case("crystal.N"),
    case("crystal.structure_factors.default_F"),
    case("crystal.structure_factors.default_F@hkl", "-hkl {hkl}"),
    case("crystal.structure_factors.Fhkl", "-hkl {hkl}", unit=100.0),
    case("crystal.cell[1]@interpolate", "-N 2 -hkl {wide} -interpolate"),
    case("crystal.fudge@gauss", "-gauss_xtal -fudge 1.3"),
    case("crystal.fudge@round", "-round_xtal -fudge 0.8"),
    case("crystal.N@round", "-round_xtal", second_order=True),
    case(f"{PANEL}.frame.distance", second_order=True),
    case(f"{PANEL}.frame.close_distance", "-xds -close_distance 95 -detector_roty 4"),
    case(f"{PANEL}.frame.close_center[0]", XDS),
    case(f"{PANEL}.frame.close_center[1]", XDS),
    case(f"{PANEL}.frame.beam_center[0]", second_order=True),
    case(f"{PANEL}.frame.beam_center[1]", second_order=True),
    case(f"{PANEL}.pixel_size"),
    *(case(f"{PANEL}.frame.rotation[{i}]", TILT) for i in range(3)),
    case(f"{PANEL}.frame.twotheta", TILT),
    case(f"{PANEL}.thickness", THICK, unit=1e-3),
    case(f"{PANEL}.mu", THICK),
    *(case(f"detector.hierarchy.frame.origin[{i}]", setup="two_panels") for i in range(3)),
    *(case(f"detector.hierarchy.frame.orientation[{i}]", unit=1e-3, setup="two_panels") for i in range(3)),
    *(case(f"detector.panels.1.frame.origin[{i}]", setup="two_panels") for i in range(3)),
    *(case(f"detector.panels.1.frame.orientation[{i}]", unit=1e-3, setup="two_panels") for i in range(3)),
    case("beam.wavelength", second_order=True),
    *(case(f"beam.direction[{i}]", unit=1e-3, setup="tilted_beam") for i in range(3)),
    case("beam.dispersion", "-dispersion 5 -dispsteps 3", unit=0.01),
    case("beam.divergence[0]", "-hdivrange 2 -vdivrange 1.5 -divsteps 3", unit=1e-3),
    case("beam.divergence[1]", "-hdivrange 2 -vdivrange 1.5 -divsteps 3", unit=1e-3),
    case("beam.fluence", unit=1e29),
    case("beam.fluence@flux", "-flux 1e12 -exposure 2 -beamsize 0.05", unit=1e21),  # 8e20 photons/m^2
    case("beam.polarization_fraction", "-polar 0.8"),
    case("beam.water_size", "-water 30", unit=1e-6),
    case("background.scale", setup="background", unit=300.0),
    case("background.thickness", setup="background", unit=0.1),
    case("background.size[0]", setup="background", unit=0.1),
    case("background.size[1]", setup="background", unit=0.1),
    case("background.density", setup="background"),
    case("background.molecular_weight", setup="background", unit=18.0),
    case("background.molecules", setup="background_molecules", unit=1e16),
]


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """Input files for the cases, and a working directory without a stray Fdump.bin."""
    monkeypatch.chdir(tmp_path)
    hkl = tmp_path / "tiny.hkl"
    hkl.write_text(HKL_TABLE)
    wide = tmp_path / "wide.hkl"
    wide.write_text(WIDE_TABLE)
    friedel = tmp_path / "friedel.hkl"
    friedel.write_text(FRIEDEL_TABLE)
    # A MOSFLM matrix for the same crystal: columns a*, b*, c* times the wavelength.
    ref = Simulator.from_args(shlex.split(f"{CELL} {BASE}"))
    with torch.no_grad():
        recip = ref.crystal.reciprocal_vectors().double() * float(ref.beam.wavelength)
        recip = recip @ _misset_matrix(ref)  # undo the misset: the file holds the unrotated crystal
    mat = tmp_path / "A.mat"
    mat.write_text("".join(" ".join(f"{recip[j, i]:.12f}" for j in range(3)) + "\n" for i in range(3)))
    return {"mat": str(mat), "hkl": str(hkl), "wide": str(wide), "friedel": str(friedel)}


def _misset_matrix(sim):
    from torchbragg import physics as ph
    return ph.rotation_xyz(sim.crystal.misset.double() * torch.pi / 180)


def build(c: Case, files, dtype="float64"):
    cell = "" if "-mat" in c.flags else CELL
    argv = shlex.split(f"{cell} {BASE} {c.flags.format(**files)}".replace("float64", dtype))
    sim = Simulator.from_args(argv, device=DEVICE)
    if c.setup:
        SETUPS[c.setup](sim)
    return sim


def setter(sim, c):
    """(x -> the parameter's value at x * unit, only component `index` changed
    when given; the starting x)."""
    base = sim.get_parameter(c.name).detach().clone()

    def value(x):
        v = x * c.unit
        if c.index is not None:
            v = torch.cat([base[:c.index], v.reshape(1), base[c.index + 1:]])
        return v.reshape(base.shape)

    x0 = (base[c.index] if c.index is not None else base) / c.unit
    return value, x0.reshape(-1).clone()


def functional(sim, c):
    """x -> a few O(1) linear functionals of the image: four random projections
    of the whole image and the peak, a half-height flank pixel and a tail pixel."""
    value, x0 = setter(sim, c)
    with torch.no_grad():
        ref = sim.render().reshape(-1)
    scale = ref.abs().max()
    assert scale > 0, "the detector shows no signal"
    peak = ref.max()
    pix = torch.stack([ref.argmax(), (ref - 0.5 * peak).abs().argmin(), (ref - 0.02 * peak).abs().argmin()])
    gen = torch.Generator().manual_seed(0)
    proj = (torch.randn(4, ref.numel(), generator=gen, dtype=torch.float64) / ref.numel() ** 0.5).to(ref)

    def f(x):
        img = functional_call(sim, {c.name: value(x)}, ()).reshape(-1) / scale
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
    """The parameter itself, made trainable in place, gets a finite,
    non-zero gradient (in the checked component) from an image loss."""
    t0 = time.perf_counter()
    sim = build(c, inputs)
    param = sim.get_parameter(c.name)
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


def _kind(sim, name, index):
    """(model class, attribute, component) of a parameter: what a check of it covers."""
    owner, _, attr = name.rpartition(".")
    return type(sim.get_submodule(owner)).__name__, attr, index


def test_every_parameter_is_checked(inputs):
    """Every parameter of every simulator the cases build (all panels, groups
    and axes included) is of a kind some case checks: the same attribute of
    the same model class, in the same component or as a whole. The scan axis's
    goniometer angle is the one exception: the scan's angles replace it."""
    covered, missing = set(), []
    builds = {}
    for c in CASES:
        sim = builds.setdefault((c.flags, c.setup), build(c, inputs))
        covered.add(_kind(sim, c.name, c.index))
    for sim in builds.values():
        for name, p in sim.named_parameters():
            parts = range(p.numel()) if p.dim() == 1 and p.numel() <= 6 else [None]
            for i in parts:
                cls, attr, _ = kind = _kind(sim, name, i)
                if cls == "Goniometer" and attr == "angles" and i == sim.goniometer.scan_axis:
                    continue
                if kind not in covered and (cls, attr, None) not in covered:
                    missing.append(name if i is None else f"{name}[{i}]")
    assert not missing, f"parameters no case checks: {sorted(set(missing))}"


def test_chunked_render_gradient_matches(inputs):
    """Rendering in checkpointed chunks gives the same gradient as one chunk."""
    grads = []
    names = ("crystal.cell", "detector.panels.0.frame.distance")
    for chunk in (None, 50):
        sim = Simulator.from_args(shlex.split(f"{CELL} {BASE}"), device=DEVICE, chunk_elements=chunk)
        params = [sim.get_parameter(n).requires_grad_(True) for n in names]
        (sim.render() ** 2).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- float32 end to end

FD_ARGS = ("-cell 100 110 120 85 95 100 -default_F 100 -N 5 -lambda 1 -distance 100 -detpixels 64 "
           "-pixel 0.1 -oversample 1 -misset 3 -5 7 -Xbeam 1 -Ybeam 1.5")
# (parameter, component, offset of the target, finite-difference step in float64)
FD_PARAMS = [("crystal.cell", 0, 0.3, 1e-4), ("crystal.misset", 0, 0.2, 1e-4),
             ("detector.panels.0.frame.distance", None, 0.5, 1e-4),
             ("detector.panels.0.frame.beam_center", 0, 0.03, 1e-5),
             ("detector.panels.0.frame.beam_center", 1, -0.02, 1e-5)]


def _shifted(sim, name, index, delta):
    with torch.no_grad():
        p = sim.get_parameter(name)
        if index is None:
            p += delta
        else:
            p[index] += delta


def test_float32_loss_gradient_matches_finite_differences(inputs, request):
    """MSE between a float32 render and a target rendered at shifted parameters:
    the float32 autograd gradient agrees with float64 central differences."""
    t0 = time.perf_counter()
    target_sim = Simulator.from_args(shlex.split(FD_ARGS + " -dtype float64"), device=DEVICE)
    for name, index, offset, _ in FD_PARAMS:
        _shifted(target_sim, name, index, offset)
    with torch.no_grad():
        target = target_sim.render()
    norm = float((target ** 2).mean())

    sim32 = Simulator.from_args(shlex.split(FD_ARGS + " -dtype float32"), device=DEVICE)
    leaves = {name: sim32.get_parameter(name).requires_grad_(True) for name, _, _, _ in FD_PARAMS}
    loss = ((sim32.render() - target.float()) ** 2).mean() / norm
    loss.backward()

    sim64 = Simulator.from_args(shlex.split(FD_ARGS + " -dtype float64"), device=DEVICE)

    def loss64():
        with torch.no_grad():
            return float(((sim64.render() - target) ** 2).mean() / norm)

    failures = []
    for name, index, _, step in FD_PARAMS:
        grad = leaves[name].grad
        analytic = float(grad if index is None else grad[index])
        _shifted(sim64, name, index, step)
        up = loss64()
        _shifted(sim64, name, index, -2 * step)
        down = loss64()
        _shifted(sim64, name, index, step)
        numerical = (up - down) / (2 * step)
        rel = abs(analytic - numerical) / abs(numerical)
        label = name if index is None else f"{name}[{index}]"
        c = Case(label, name, index, "", 1.0, False, None, sys._getframe().f_lineno)
        record(request, c, "float32_vs_fd64", rel < 0.01, time.perf_counter() - t0, dtype="float32",
               eps=step, atol=0.0, rtol=0.01, max_abs_err=abs(analytic - numerical), max_rel_err=rel,
               analytic=analytic, numerical=numerical)
        if not rel < 0.01:
            failures.append(f"{label}: autograd {analytic:.6g} vs finite difference {numerical:.6g} ({rel:.2%})")
    assert not failures, "; ".join(failures)


def test_background_float32_gradients_match_finite_differences(inputs, request):
    """The background's scale and sample thickness: float32 autograd gradients
    of a loss against a target agree with float64 central differences."""
    t0 = time.perf_counter()
    params = [("background.scale", 30.0, 3.0), ("background.thickness", 0.05, 0.002)]

    def sim_of(dtype):
        sim = Simulator.from_args(shlex.split(f"{CELL} {BASE}".replace("float64", dtype)), device=DEVICE)
        _background(sim)
        return sim.to(torch.float32 if dtype == "float32" else torch.float64)

    target_sim = sim_of("float64")
    for name, offset, _ in params:
        _shifted(target_sim, name, None, offset)
    with torch.no_grad():
        target = target_sim.render()
    norm = float((target ** 2).mean())
    sim32 = sim_of("float32")
    leaves = {name: sim32.get_parameter(name).requires_grad_(True) for name, _, _ in params}
    (((sim32.render() - target.float()) ** 2).mean() / norm).backward()
    sim64 = sim_of("float64")

    def loss64():
        with torch.no_grad():
            return float(((sim64.render() - target) ** 2).mean() / norm)

    failures = []
    for name, _, step in params:
        analytic = float(leaves[name].grad)
        _shifted(sim64, name, None, step)
        up = loss64()
        _shifted(sim64, name, None, -2 * step)
        down = loss64()
        _shifted(sim64, name, None, step)
        numerical = (up - down) / (2 * step)
        rel = abs(analytic - numerical) / abs(numerical)
        c = Case(name, name, None, "", 1.0, False, "background", sys._getframe().f_lineno)
        record(request, c, "float32_vs_fd64", rel < 0.01, time.perf_counter() - t0, dtype="float32", eps=step,
               atol=0.0, rtol=0.01, max_abs_err=abs(analytic - numerical), max_rel_err=rel, analytic=analytic,
               numerical=numerical)
        if not rel < 0.01:
            failures.append(f"{name}: autograd {analytic:.6g} vs finite difference {numerical:.6g} ({rel:.2%})")
    assert not failures, "; ".join(failures)


# ----------------------------------------------------------------------------- refinement: losses and parametrisations

# The refiner differentiates a likelihood of the image through a parametrisation
# (internal vector -> model parameters), to first order for the fit and to
# second order for the uncertainties; both are checked here for every loss and
# every parameter group, on a 24x24 image with a few spots.
LOSS_CASES = ["poisson", "gaussian"]


def _loss_inputs(name):
    from torchbragg.refine.losses import LOSSES
    g = torch.Generator().manual_seed(4)
    model = (torch.rand(1, 6, 7, generator=g, dtype=torch.float64) * 20 + 0.5).to(DEVICE)
    data = torch.poisson(model.cpu(), generator=g).to(DEVICE)
    mask = (torch.rand(1, 6, 7, generator=g) > 0.2).to(DEVICE)
    if name == "poisson":
        return (lambda m: LOSSES[name](m, data, mask)), (model,)
    noise = torch.tensor(1.5, dtype=torch.float64, device=DEVICE)
    gain = torch.tensor(1.2, dtype=torch.float64, device=DEVICE)
    return (lambda m, r, k: LOSSES[name](m, data, mask, r, k)), (model, noise, gain)


@pytest.mark.parametrize("name", LOSS_CASES)
@pytest.mark.parametrize("order", ["gradcheck", "gradgradcheck"])
def test_loss_gradients(name, order, request):
    """The negative log-likelihoods, in the model (and read noise and gain)."""
    t0 = time.perf_counter()
    f, args = _loss_inputs(name)
    args = tuple(a.clone().requires_grad_(True) for a in args)
    check = torch.autograd.gradcheck if order == "gradcheck" else torch.autograd.gradgradcheck
    ok = check(f, args, eps=EPS, atol=ATOL, rtol=RTOL, raise_exception=False)
    c = Case(f"loss.{name}", f"loss.{name}", None, "", 1.0, order == "gradgradcheck", None,
             sys._getframe().f_lineno)
    record(request, c, order, ok, time.perf_counter() - t0, eps=EPS, atol=ATOL, rtol=RTOL)
    assert ok, f"{name} likelihood: analytic and numerical derivatives differ"


def _frame_detector(sim):
    """The flag-built detector as a DIALS-style frame panel (what 'panels' moves)."""
    with torch.no_grad():
        origin, fast, slow, _ = (t[0].double().cpu() for t in sim.detector.panel_frames(sim.beam.incident()))
    p = sim.detector.panels[0]
    panel = Panel(Frame(tuple(origin.tolist()), tuple(fast.tolist()), tuple(slow.tolist()), dtype=torch.float64,
                        device=DEVICE), p.image_size, tuple(p.pixel_size.detach().double().cpu().tolist()),
                  dtype=torch.float64, device=DEVICE)
    sim.detector = Detector([panel], dtype=torch.float64, device=DEVICE)


def _with_amorphous(sim):
    """A water-like amorphous background on the simulator (what 'amorphous' scales), about two
    photons per pixel beside the spots."""
    from torchbragg.models import Background
    sim.background = Background([0.0, 0.2, 0.4, 0.6], [2.57, 2.2, 1.4, 0.9], thickness=0.1, scale=1e-11,
                                dtype=torch.float64, device=DEVICE)


# group -> (extra flags, setup applied to the built simulator)
GROUP_CASES = {
    "orientation": ("", None),
    "cell": ("", None),
    "N": ("", None),
    "scale": ("", None),
    "mosaic": ("-mosaic 0.5 -mosaic_dom 4 -mosaic_seed 3", None),
    "background": ("", None),
    "background_plane": ("", None),
    "radial_background": ("", None),
    "distance": ("", None),
    "beam_centre": ("", None),
    "panels": ("", _frame_detector),
    "wavelength": ("", None),
    "spectrum": ("-dispersion 4 -dispsteps 3", None),
    "structure_factors": ("-hkl {friedel}", None),
    "amorphous": ("", _with_amorphous),
}


def _group_objective(group, files):
    from torchbragg.refine import Entry, Refiner
    flags, setup = GROUP_CASES[group]
    sim = Simulator.from_args(shlex.split(f"{CELL} {BASE} {flags.format(**files)}"), device=DEVICE)
    if setup:
        setup(sim)
    with torch.no_grad():
        model = sim.render() + 2.0
    data = torch.poisson(model.cpu(), generator=torch.Generator().manual_seed(2)).to(model)
    r = Refiner([Entry(sim, data, "all")], [group], strategy=None, uncertainties=False)
    x0 = torch.randn(r.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return (lambda x: r.objective(x) / data.numel()), x0


def _known_groups():
    from torchbragg.refine.parameters import GROUPS
    return [g for g in GROUP_CASES if g in GROUPS]


@pytest.mark.parametrize("group", _known_groups())
@pytest.mark.parametrize("order", ["gradcheck", "gradgradcheck"])
def test_parametrisation_gradients(group, order, inputs, request):
    """The Poisson likelihood of a rendered image through each parameter
    group's internal vector (the refiner's objective), first and second order."""
    t0 = time.perf_counter()
    f, x0 = _group_objective(group, inputs)
    x0.requires_grad_(True)
    kw = dict(eps=1e-5, atol=1e-5, rtol=1e-3, nondet_tol=NONDET_TOL, raise_exception=False, fast_mode=True)
    check = torch.autograd.gradcheck if order == "gradcheck" else torch.autograd.gradgradcheck
    ok = check(f, (x0,), **kw)
    c = Case(f"refine.{group}", f"refine.{group}", None, "", 1.0, order == "gradgradcheck", None,
             sys._getframe().f_lineno)
    record(request, c, order, ok, time.perf_counter() - t0, eps=kw["eps"], atol=kw["atol"], rtol=kw["rtol"])
    assert ok, f"refinement group {group}: analytic and numerical derivatives of the objective differ"


@pytest.mark.parametrize("kind", ["gauss", "fiber"])
def test_psf_width_gradient(kind, request):
    """The detector response's PSF width through the psf_width group, and its
    gain: a Poisson likelihood of the response's expectation of a rendered
    image, first and second order."""
    from torchbragg.models import DetectorResponse
    from torchbragg.refine.losses import poisson_nll
    from torchbragg.refine.parameters import Parametrisation
    t0 = time.perf_counter()
    sim = Simulator.from_args(shlex.split(f"{CELL} {BASE}"), device=DEVICE)
    sim.response = DetectorResponse(gain=1.3, psf=kind, psf_fwhm=0.15, psf_radius=4, dtype=torch.float64,
                                    device=DEVICE)
    pixel = sim.detector.panels[0].pixel_size
    with torch.no_grad():
        photons = sim.render()[0]
        want = sim.response.expectation(photons, pixel) + 2.0
    data = torch.poisson(want.cpu(), generator=torch.Generator().manual_seed(2)).to(want)
    param = Parametrisation(["psf_width"], sim)

    def f(x, gain):
        width = param.substitutions(sim, x)["response.psf_fwhm"]
        model = functional_call(sim.response, {"psf_fwhm": width, "gain": gain}, (photons, pixel))
        return poisson_nll(model + 2.0, data) / data.numel()

    x = torch.tensor([3.0], dtype=torch.float64, device=DEVICE, requires_grad=True)
    gain = torch.tensor(1.2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    kw = dict(eps=1e-6, atol=1e-6, rtol=1e-3, nondet_tol=NONDET_TOL, raise_exception=False)
    ok = torch.autograd.gradcheck(f, (x, gain), **kw) and torch.autograd.gradgradcheck(f, (x, gain), **kw)
    c = Case(f"refine.psf_width.{kind}", "response.psf_fwhm", None, "", 1.0, True, None, sys._getframe().f_lineno)
    record(request, c, "gradcheck", ok, time.perf_counter() - t0, eps=kw["eps"], atol=kw["atol"], rtol=kw["rtol"])
    assert ok, f"PSF width ({kind}) or gain: analytic and numerical derivatives differ"


def test_every_parameter_group_is_checked():
    from torchbragg.refine.parameters import GROUPS
    # psf_width acts through the detector response, checked by test_psf_width_gradient
    missing = sorted(set(GROUPS) - set(GROUP_CASES) - {"psf_width"})
    assert not missing, f"parameter groups without a gradient check: {missing}"
