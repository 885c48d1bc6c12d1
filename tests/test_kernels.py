"""The render's kernels: compiled against eager, culled against unculled, the
TORCHBRAGG_COMPILE switch and the fallback to eager."""

import shlex
import warnings

import pytest
import torch

from torchbragg import Simulator, kernels
from torchbragg.commands.gradcheck import _uses_compile

BASE = "-cell 70 80 90 75 85 95 -N 4 -lambda 1.0 -pixel 0.2 -distance 60 -detpixels 24 -Xbeam 2 -Ybeam 2"
HKL = "\n".join(f"{h} {k} {l} {20 + 3 * h + 5 * k + 7 * l + (h * k * l) % 11}"
                for h in range(-4, 5) for k in range(-4, 5) for l in range(-4, 5)) + "\n"

# flag sets that take different paths through the kernels
FLAGS = {
    "square": "-default_F 100 -oversample 2",
    "hkl_mosaic_phi": "-hkl {hkl} -default_F 0 -mosaic 0.5 -mosaic_dom 3 -mosaic_seed 7 -phi 0 -osc 3 -phisteps 2",
    "tophat_dmin_absorption": "-default_F 100 -tophat_spots -fudge 1.3 -dmin 3 -detector_thick 100 "
                              "-detector_abs 320 -thicksteps 2",
    "gauss_sources": "-default_F 100 -gauss_xtal -dispersion 5 -dispsteps 3 -divergence 1 -divsteps 2",
    "round_curved": "-default_F 100 -round_xtal -curved_det -polar 0.9",
    "running_product": "-default_F 100 -oversample 2 -oversample_omega -oversample_polar",
}


@pytest.fixture
def hkl_file(tmp_path):
    path = tmp_path / "t.hkl"
    path.write_text(HKL)
    return str(path)


def simulator(flags, hkl_file, dtype=torch.float64):
    return Simulator.from_args(shlex.split(f"{BASE} {flags.format(hkl=hkl_file)}"), dtype=dtype)


def render(sim, mode, monkeypatch, grad_of=None):
    monkeypatch.setenv(kernels.COMPILE_ENV, mode)
    if grad_of is None:
        with torch.no_grad():
            return sim.render(), None
    param = sim.get_parameter(grad_of)
    param.requires_grad_(True)
    param.grad = None
    image = sim.render()
    image.pow(2).sum().backward()
    param.requires_grad_(False)
    return image.detach(), param.grad.clone()


needs_compiler = pytest.mark.skipif(not kernels.compiler_available(torch.device("cpu")),
                                    reason="torch.compile needs a C++ compiler on the CPU")


@needs_compiler
@pytest.mark.parametrize("name", FLAGS)
def test_compiled_render_equals_eager(name, hkl_file, monkeypatch):
    sim = simulator(FLAGS[name], hkl_file)
    eager, _ = render(sim, "0", monkeypatch)
    # three chunks, the last one padded
    monkeypatch.setattr(kernels, "COMPILED_CHUNK", sim.steps() * 250 * max(sim.options.sensor_layers, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would hide the compiled path
        compiled, _ = render(sim, "1", monkeypatch)
    assert eager.abs().max() > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12 * float(eager.abs().max()))


@needs_compiler
@pytest.mark.parametrize("name, param", [("square", "crystal.cell"), ("hkl_mosaic_phi", "crystal.misset"),
                                         ("tophat_dmin_absorption", "detector.panels.0.frame.distance")])
def test_compiled_gradient_equals_eager(name, param, hkl_file, monkeypatch):
    sim = simulator(FLAGS[name], hkl_file)
    # three chunks, the last one padded, each checkpointed
    monkeypatch.setattr(kernels, "COMPILED_CHUNK", sim.steps() * 250 * max(sim.options.sensor_layers, 1))
    eager, g_eager = render(sim, "0", monkeypatch, param)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled, g_compiled = render(sim, "1", monkeypatch, param)
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12 * float(eager.abs().max()))
    assert g_eager.abs().max() > 0
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-8, atol=1e-10 * float(g_eager.abs().max()))


@needs_compiler
def test_compiled_float32_close_to_eager(hkl_file, monkeypatch):
    sim = simulator(FLAGS["hkl_mosaic_phi"], hkl_file, torch.float32)
    eager, _ = render(sim, "0", monkeypatch)
    compiled, _ = render(sim, "1", monkeypatch)
    assert float((compiled - eager).abs().max() / eager.abs().max()) < 1e-5


@pytest.mark.parametrize("name, flags", [
    ("tophat", "-default_F 100 -tophat_spots -fudge 1.3"),
    ("dmin", "-default_F 100 -dmin 3 -oversample 2"),
    ("tophat_dmin_absorption", FLAGS["tophat_dmin_absorption"]),
    ("gauss_underflow", "-default_F 100 -gauss_xtal -N 20"),
    ("zero_structure_factors", "-hkl {hkl} -default_F 0 -lambda 3"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_culled_render_equals_unculled_exactly(name, flags, dtype, hkl_file, monkeypatch):
    """Terms that are exactly zero are skipped, not approximated: the image is
    bit for bit the one that evaluates every term."""
    sim = simulator(flags, hkl_file, dtype)
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    gathered = []
    scatter = torch.Tensor.index_copy
    monkeypatch.setattr(torch.Tensor, "index_copy", lambda *a, **k: gathered.append(1) or scatter(*a, **k))
    images = {}
    for fraction in (-1.0, 1.0):  # never cull, cull whenever something can be skipped
        monkeypatch.setattr(kernels, "CULL_FRACTION", fraction)
        gathered.clear()
        with torch.no_grad():
            images[fraction] = sim.render()
        culled = bool(gathered)
    assert culled
    assert images[1.0].abs().max() > 0
    assert torch.equal(images[1.0], images[-1.0])


@pytest.mark.parametrize("flags", [
    "-hkl {hkl} -default_F 0 -distance 20 -pixel 0.5",  # the table covers the middle of the detector
    "-hkl {hkl} -default_F 0 -distance 20 -pixel 0.5 -interpolate -N 6",
    "-default_F 100 -dmin 6 -distance 20 -pixel 0.5 -dispersion 4 -dispsteps 2",
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unreachable_pixels_are_skipped_exactly(flags, dtype, hkl_file, monkeypatch):
    """Pixels whose every term is cut by -dmin, or lies beyond the reach of the
    structure-factor table (F = 0 there), skip the Bragg sum; the image is the
    one that evaluates it, to the rounding of sums reduced in another order."""
    sim = simulator(flags, hkl_file, dtype)
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    summed, images = [], {}
    bragg_sum = kernels.bragg_sum
    monkeypatch.setattr(kernels, "bragg_sum", lambda plan, points, *a: summed.append(points.shape[1])
                        or bragg_sum(plan, points, *a))
    for fraction in (-1.0, 1.0):
        monkeypatch.setattr(kernels, "CULL_FRACTION", fraction)
        summed.clear()
        with torch.no_grad():
            images[fraction] = sim.render()
        pixels = sum(summed)
    assert 0 < pixels < 0.5 * images[1.0].numel()
    assert images[1.0].abs().max() > images[1.0].min() >= 0
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(images[1.0], images[-1.0], rtol=rtol, atol=0.0)


@pytest.mark.parametrize("flags, param", [("-default_F 100 -tophat_spots -fudge 1.3", "crystal.N"),
                                          ("-default_F 100 -dmin 3", "crystal.cell")])
def test_culled_gradient_equals_unculled(flags, param, hkl_file, monkeypatch):
    sim = simulator(flags, hkl_file)
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    grads = []
    for fraction in (-1.0, 1.0):
        monkeypatch.setattr(kernels, "CULL_FRACTION", fraction)
        grads.append(render(sim, "0", monkeypatch, param))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-12, atol=0.0)


def test_eager_chunks_on_threads_equal_one_thread(hkl_file, monkeypatch):
    sim = simulator(FLAGS["hkl_mosaic_phi"], hkl_file, torch.float32)
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    monkeypatch.setattr(kernels, "EAGER_POINTS", 64)  # many chunks
    threads = torch.get_num_threads()
    images = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                images.append(sim.render())
            assert torch.get_num_threads() == n  # the pool gives the count back
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(images[0], images[1])


def test_compile_switch(monkeypatch):
    cpu = torch.device("cpu")
    plan = simulator("-default_F 1", None)._plan(0, {})
    for value, mode in (("0", "0"), ("off", "0"), ("1", "1"), ("on", "1"), ("auto", "auto"), ("", "auto")):
        monkeypatch.setenv(kernels.COMPILE_ENV, value)
        assert kernels.compile_mode() == mode
    monkeypatch.delenv(kernels.COMPILE_ENV)
    assert kernels.compile_mode() == "auto"
    monkeypatch.setattr(kernels, "compiler_available", lambda device: True)
    k = kernels.Kernels()
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    assert not k.should_compile(plan, cpu, 10 ** 12, grad=False)
    monkeypatch.setenv(kernels.COMPILE_ENV, "1")
    assert k.should_compile(plan, cpu, 1, grad=False) and k.should_compile(plan, cpu, 1, grad=True)
    monkeypatch.setenv(kernels.COMPILE_ENV, "auto")
    assert not k.should_compile(plan, cpu, 1000, grad=False)  # a small image stays eager
    assert not k.should_compile(plan, cpu, 10 ** 12, grad=True)  # so does anything with gradients
    assert k.should_compile(plan, cpu, kernels.AUTO_MIN_ELEMENTS, grad=False)
    # nor kernels the eager path culls, or whose few terms per point do not pay for it
    tophat = simulator("-default_F 1 -tophat_spots", None)._plan(0, {})
    assert not k.should_compile(tophat, cpu, 10 ** 12, grad=False)
    assert not k.should_compile(plan, cpu, 10 ** 12, grad=False, terms_per_point=1)
    # the work adds up over renders of the same kernel (a sweep, a refinement's images)
    k = kernels.Kernels()
    half = kernels.AUTO_MIN_ELEMENTS // 2 + 1
    assert not k.should_compile(plan, cpu, half, grad=False)
    assert k.should_compile(plan, cpu, half, grad=False)
    assert _uses_compile()  # the gradient audit reports the switch as live


def test_without_a_compiler_renders_eagerly(hkl_file, monkeypatch):
    sim = simulator(FLAGS["square"], hkl_file)
    eager, _ = render(sim, "0", monkeypatch)
    monkeypatch.setattr(kernels, "compiler_available", lambda device: False)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile called without a compiler"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image, _ = render(sim, "1", monkeypatch)
    assert torch.equal(image, eager)


def test_failed_compilation_falls_back_to_eager(hkl_file, monkeypatch):
    sim = simulator(FLAGS["hkl_mosaic_phi"], hkl_file)
    eager, _ = render(sim, "0", monkeypatch)

    def broken(self):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(kernels, "compiler_available", lambda device: True)
    monkeypatch.setattr(kernels.Kernels, "stages", broken)
    monkeypatch.setattr(kernels, "KERNELS", kernels.Kernels())
    monkeypatch.setattr("torchbragg.simulator.KERNELS", kernels.KERNELS)
    with pytest.warns(RuntimeWarning, match="rendering eagerly"):
        image, _ = render(sim, "1", monkeypatch)
    assert torch.equal(image, eager)
    with warnings.catch_warnings():  # the failure is remembered: no second attempt, no second warning
        warnings.simplefilter("error")
        again, _ = render(sim, "1", monkeypatch)
    assert torch.equal(again, eager)


def test_square_lattice_function_matches_the_formula_to_second_order():
    """The parallelepiped's F_latt^2 on indices stacked component first is one
    autograd node with its derivatives written out; value, gradient and second
    derivatives (Hessians for uncertainties) are those of the grating formula,
    on and off the nodes, for integer and non-integer N."""
    from torchbragg import physics as ph
    gen = torch.Generator().manual_seed(3)
    hkl = torch.randn(3, 30, dtype=torch.float64, generator=gen) * 4
    hkl[:, :3] = torch.round(hkl[:, :3])  # exactly on nodes
    hkl[1, 4] = 2.0 + 1e-8  # within the series' reach of a node
    hkl.requires_grad_(True)
    n = torch.tensor([4.0, 7.0, 3.5], dtype=torch.float64, requires_grad=True)
    recip, fudge = torch.eye(3, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)

    def fused(h, n_):
        return ph.LATTICE_FACTORS["square"](h, n_, recip, fudge)

    def formula(h, n_):
        return torch.stack([ph.sincg_sq(h[j] - torch.round(h[j]), n_[j]) for j in range(3)]).prod(0)

    torch.testing.assert_close(fused(hkl, n), formula(hkl, n), rtol=1e-12, atol=0.0)
    assert torch.autograd.gradcheck(fused, (hkl, n))
    assert torch.autograd.gradgradcheck(fused, (hkl, n))
    g_fused = torch.autograd.grad(fused(hkl, n).sum(), (hkl, n), create_graph=True)
    g_formula = torch.autograd.grad(formula(hkl, n).sum(), (hkl, n), create_graph=True)
    for a, b in zip(g_fused, g_formula):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.detach().abs().max()))
    h_fused = torch.autograd.grad(sum(g.sum() for g in g_fused), (hkl, n))
    h_formula = torch.autograd.grad(sum(g.sum() for g in g_formula), (hkl, n))
    for a, b in zip(h_fused, h_formula):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))
