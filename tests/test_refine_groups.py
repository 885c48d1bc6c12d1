"""The spectrum and structure_factors refinement groups: gradients, the
symmetry mapping of the structure-factor table, refusals, and recovery on
small noisy stills (one image and three sharing their structure factors)."""

import copy
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from torchbragg.dataset import photon_counts
from torchbragg.models import Beam
from torchbragg.models.crystal import StructureFactors
from torchbragg.refine import Entry, Parametrisation, Refiner, refine, refine_joint
from torchbragg.refine.parameters import FHKL, Spectrum, StructureFactorGroup, reflections_in_view
from torchbragg.simulator import Simulator

ARGS = ("-cell 60 70 80 90 90 90 -misset 10 20 30 -default_F 100 -N 12 -lambda 1 -distance 80 "
        "-detpixels 128 -pixel 0.2 -oversample 1 -fluence 1e26").split()
TINY = ARGS[:-8] + "-detpixels 10 -pixel 1.6 -oversample 1 -fluence 1e26".split()
SMALL = ARGS[:-8] + "-detpixels 64 -pixel 0.4 -oversample 1 -fluence 1e26".split()
BRIGHT = ARGS[:-1] + ["1e27"]
F64 = torch.float64


def still(args=ARGS):
    return Simulator.from_args(list(args), dtype=F64)


def noisy(sim, seed):
    """Poisson counts of the model, without a background (not refined here)."""
    with torch.no_grad():
        image = sim.render()
    return photon_counts(image.numpy(), seed, 1)


def mmm_table(bound=18, seed=0):
    """|F| on h, k, l in [-bound, bound] with the symmetry of P 2 2 2 (mmm with
    Friedel mates): a value per (|h|, |k|, |l|)."""
    rng = np.random.default_rng(seed)
    h = np.arange(-bound, bound + 1)
    H, K, L = np.meshgrid(h, h, h, indexing="ij")
    base = rng.uniform(50.0, 150.0, size=(bound + 1,) * 3)
    return base[np.abs(H), np.abs(K), np.abs(L)], (-bound, -bound, -bound)


def with_table(sim, grid, lo, space_group="P 2 2 2", default_F=0.0, lookup="nearest"):
    sim.crystal.structure_factors = StructureFactors(grid, lo, default_F, lookup, dtype=F64)
    sim.crystal.space_group = space_group
    return sim


def cell_value(grid, lo, hkl):
    return float(grid[hkl[0] - lo[0], hkl[1] - lo[1], hkl[2] - lo[2]])


def scale_reflections(sim, reflections, factors):
    """Multiply |F| of `reflections` (asymmetric-unit labels) and all their
    mates by `factors` in the model."""
    g = StructureFactorGroup(reflections).bind(sim)
    x = torch.zeros(g.size, dtype=F64)
    for r, f in zip(reflections, factors):
        x[g.reflections.index(tuple(r))] = math.log(f) / g.step
    subs = {}
    g.substitute(sim, x, subs)
    with torch.no_grad():
        sim.crystal.structure_factors.Fhkl.copy_(subs[FHKL])


def spectrum_beam(sim, wavelengths, weights=None):
    """The beam of `sim` with a source table of `wavelengths` (all along the beam)."""
    b = sim.beam
    n = len(wavelengths)
    return Beam(b.direction.detach(), float(np.average(wavelengths, weights=weights)),
                polarization_fraction=b.polarization_fraction.detach(),
                polarization_normal=b.polarization_normal.detach(), fluence=b.fluence.detach(),
                source_positions=np.full((n, 3), np.nan), source_wavelengths=np.asarray(wavelengths, dtype=float),
                source_weights=None if weights is None else np.asarray(weights, dtype=float), dtype=F64)


LINES = [0.99, 0.995, 1.0, 1.005, 1.01]
WEIGHTS = [1.0, 2.0, 4.0, 2.0, 1.0]


def gradcheck_objective(sim, groups, seed):
    data = torch.as_tensor(noisy(sim, seed), dtype=F64)
    r = Refiner([Entry(sim, data, "all")], groups, strategy=None, uncertainties=False)
    x0 = torch.randn(r.size, dtype=F64, generator=torch.Generator().manual_seed(1)) * 2

    def f(x):
        return r.objective(x)

    assert torch.autograd.gradcheck(f, (x0.requires_grad_(),), eps=1e-4, atol=1e-4, rtol=1e-3, fast_mode=True)
    return r


# ----------------------------------------------------------------------------- structure factors: mapping

def test_symmetry_mates_share_one_parameter_in_p4():
    # 4/m: (h,k,l), (-k,h,l), (-h,-k,l), (k,-h,l) and their Friedel mates; (k,h,l) is another reflection
    h = range(-4, 5)
    orbits = {frozenset(m for s in (1, -1) for m in ((s * a, s * b, s * c), (-s * b, s * a, s * c),
                                                       (-s * a, -s * b, s * c), (s * b, -s * a, s * c),
                                                       (s * a, s * b, -s * c), (-s * b, s * a, -s * c),
                                                       (-s * a, -s * b, -s * c), (s * b, -s * a, -s * c)))
              for a in h for b in h for c in h}
    rng = np.random.default_rng(5)
    grid, lo = np.zeros((9, 9, 9)), (-4, -4, -4)
    for orbit in orbits:
        f = rng.uniform(50.0, 150.0)
        for m in orbit:
            grid[m[0] + 4, m[1] + 4, m[2] + 4] = f
    sim = with_table(still(TINY), grid, lo, "P 4")
    g = StructureFactorGroup().bind(sim)
    assert "F(1,2,3)" in g.labels and "F(2,1,3)" in g.labels
    assert g.size == len(orbits)
    x = torch.randn(g.size, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    subs = {}
    g.substitute(sim, x, subs)
    new = subs[FHKL]
    j = g.labels.index("F(1,2,3)")
    expect = cell_value(grid, lo, (1, 2, 3)) * math.exp(0.01 * float(x[j].detach()))
    for m in [(1, 2, 3), (-2, 1, 3), (-1, -2, 3), (2, -1, 3), (1, 2, -3), (-1, -2, -3), (2, -1, -3)]:
        assert cell_value(new.detach(), lo, m) == pytest.approx(expect, rel=1e-12)
    assert cell_value(new.detach(), lo, (2, 1, 3)) != pytest.approx(expect, rel=1e-6)
    # the gradient reaches each unique value once per grid cell it stands for
    (grad,) = torch.autograd.grad(new.sum(), x)
    per_cell = (grad / (0.01 * g.physical(sim, x.detach()))).round()
    assert sorted(per_cell.tolist()) == sorted(float(len(o)) for o in orbits)
    assert per_cell[j] == 8 and per_cell[g.labels.index("F(0,0,0)")] == 1
    assert per_cell[g.labels.index("F(0,0,1)")] == 2


def test_untouched_cells_stay_and_mates_follow_in_p222():
    grid, lo = mmm_table(5, seed=3)
    sim = with_table(still(TINY), grid, lo, "P 2 2 2")
    chosen = [(1, 2, 3), (-2, 0, 1), (2, 0, -1)]  # the last two are mates: one parameter
    g = StructureFactorGroup(chosen).bind(sim)
    assert g.labels == ["F(1,2,3)", "F(2,0,1)"]
    assert g.reflections == [(1, 2, 3), (2, 0, 1)]
    x = torch.tensor([30.0, -50.0], dtype=F64)
    new = Parametrisation([g], sim).substitutions(sim, x)[FHKL]
    changed = ~torch.isclose(new, torch.as_tensor(grid), rtol=1e-12, atol=0)
    expect = {(s1 * 1, s2 * 2, s3 * 3) for s1 in (1, -1) for s2 in (1, -1) for s3 in (1, -1)}
    expect |= {(s1 * 2, 0, s3 * 1) for s1 in (1, -1) for s3 in (1, -1)}
    got = {tuple(int(v) for v in np.array(c) + lo) for c in torch.nonzero(changed).tolist()}
    assert got == expect
    assert torch.equal(new[~changed], torch.as_tensor(grid)[~changed])  # bit for bit
    for m in expect:
        f0 = cell_value(grid, lo, m)
        assert cell_value(new, lo, m) == pytest.approx(f0 * math.exp(0.3 if 3 in np.abs(m) else -0.5), rel=1e-12)
    phys = g.physical(sim, x)
    assert float(phys[0]) == pytest.approx(cell_value(grid, lo, (1, 2, 3)) * math.exp(0.3))
    assert Parametrisation([g], sim).physical_labels()[0] == ("structure_factors", "F(1,2,3)", "electrons")


def test_hermann_mauguin_and_hall_symbols_agree():
    grid, lo = mmm_table(3)
    a = StructureFactorGroup().bind(with_table(still(TINY), grid, lo, "P 2 2 2"))  # HM
    b = StructureFactorGroup().bind(with_table(still(TINY), grid, lo, " P 2 2"))  # Hall
    p1 = StructureFactorGroup().bind(with_table(still(TINY), grid, lo, " P 1"))
    assert a.labels == b.labels and a.size == 4 ** 3
    assert p1.size == (7 ** 3 + 1) // 2  # Friedel mates only


def test_group_on_a_table_read_with_hkl(tmp_path):
    rows = [(h, k, l, 10.0 + abs(h) + 2 * abs(k) + 3 * abs(l))
            for h in range(-2, 3) for k in range(-2, 3) for l in range(-2, 3)]
    path = tmp_path / "P1.hkl"
    path.write_text("".join("%d %d %d %g\n" % r for r in rows))
    sim = still(TINY + ["-hkl", str(path)])
    assert sim.crystal.structure_factors.has_grid
    g = StructureFactorGroup().bind(sim)  # the crystal's P 1: Friedel mates only
    assert g.size == (5 ** 3 + 1) // 2
    sim.crystal.space_group = "P 2 2 2"
    g = StructureFactorGroup().bind(sim)
    assert g.size == 3 ** 3
    assert float(g.physical(sim, torch.zeros(g.size, dtype=F64))[g.labels.index("F(1,2,1)")]) == 18.0


def test_structure_factor_refusals():
    sim = still(TINY)
    with pytest.raises(ValueError, match="structure_factors group needs a table"):
        Parametrisation(["structure_factors"], sim)
    grid, lo = mmm_table(3)
    grid = grid.copy()
    grid[3 + 1, 3 + 2, 3 + 3] *= 1.5  # F(1,2,3) no longer equals F(-1,2,3)
    with_table(sim, grid, lo, "P 2 2 2")
    with pytest.raises(ValueError, match="different \\|F\\| to symmetry or Friedel mates"):
        StructureFactorGroup().bind(sim)
    with pytest.raises(ValueError, match="different"):
        StructureFactorGroup([(-1, -2, 3)]).bind(sim)
    StructureFactorGroup([(1, 1, 1)]).bind(sim)  # consistent reflections may still be refined
    with pytest.raises(ValueError, match="reflection \\(7, 0, 0\\) .* is not in the table"):
        StructureFactorGroup([(7, 0, 0)]).bind(sim)
    grid[3, 3, 3] = 0.0
    with_table(sim, grid, lo, "P 2 2 2")
    with pytest.raises(ValueError, match="F\\(0, 0, 0\\) is zero"):
        StructureFactorGroup([(0, 0, 0)]).bind(sim)
    # a simulator with another table cannot take the group bound to the first
    g = StructureFactorGroup([(1, 1, 1)]).bind(sim)
    other = with_table(still(TINY), *mmm_table(4), "P 2 2 2")
    with pytest.raises(ValueError, match="differs from the one the group was set up for"):
        g.substitute(other, torch.zeros(1, dtype=F64), {})


def test_structure_factor_gradcheck():
    grid, lo = mmm_table(18)
    sim = with_table(still(TINY), grid, lo, "P 2 2 2")
    seen = reflections_in_view(sim)[:4]
    assert len(seen) == 4
    gradcheck_objective(sim, [StructureFactorGroup(seen), "scale"], 3)


def test_structure_factor_gradcheck_tricubic():
    grid, lo = mmm_table(18)
    sim = with_table(still(TINY), grid, lo, "P 2 2 2", lookup="tricubic")
    gradcheck_objective(sim, [StructureFactorGroup(reflections_in_view(sim)[:3])], 4)


# ----------------------------------------------------------------------------- structure factors: recovery

def perturbation(n, seed):
    """Factors of about 20 % up or down."""
    rng = np.random.default_rng(seed)
    return np.exp(rng.choice([-1.0, 1.0], n) * rng.uniform(0.15, 0.25, n))


def test_recover_structure_factors():
    grid, lo = mmm_table(18)
    truth = with_table(still(BRIGHT), grid, lo, "P 2 2 2")
    data = noisy(truth, 21)
    seen = reflections_in_view(truth)[:8]
    sim = copy.deepcopy(truth)
    scale_reflections(sim, seen, perturbation(len(seen), 1))
    g = StructureFactorGroup(seen)
    res = refine(sim, data, [g], dtype_schedule=("float64",))
    assert res.converged
    true_f = StructureFactorGroup(seen).bind(truth).physical(truth, torch.zeros(len(seen), dtype=F64))
    start = torch.tensor([p.start for p in res.parameters], dtype=F64)
    value = torch.tensor([p.value for p in res.parameters], dtype=F64)
    sigma = torch.tensor([p.sigma for p in res.parameters], dtype=F64)
    err0 = torch.log(start / true_f).abs()
    err = torch.log(value / true_f).abs()
    assert float(err0.min()) > 0.14
    assert float(err.max()) < 0.05
    assert bool(((value - true_f).abs() < 4 * sigma).all())
    # written into every cell of each reflection
    new = StructureFactorGroup(seen).bind(sim).physical(sim, torch.zeros(len(seen), dtype=F64))
    assert torch.allclose(new, value, rtol=1e-10)


def test_refine_structure_factors_by_name_with_scale_prior():
    """By name the group refines every reflection with a nonzero |F|: a table
    that holds only a few; the scale, degenerate with all |F| together, is held
    by a prior."""
    full, lo = mmm_table(18)
    truth = with_table(still(BRIGHT), full, lo, "P 2 2 2")
    seen = reflections_in_view(truth)[:6]
    keep = StructureFactorGroup(seen).bind(truth)._index[torch.device("cpu")] >= 0
    grid = np.where(keep.numpy(), full, 0.0)
    truth = with_table(still(BRIGHT), grid, lo, "P 2 2 2")
    data = noisy(truth, 22)
    sim = copy.deepcopy(truth)
    scale_reflections(sim, seen, perturbation(len(seen), 2))
    res = refine(sim, data, ["structure_factors", "scale"], priors={"scale": (0.0, 0.1)},
                 dtype_schedule=("float64",))
    assert sorted(p.name for p in res.parameters if p.group == "structure_factors") == \
        sorted("F(%d,%d,%d)" % r for r in seen)
    true_f = StructureFactorGroup().bind(truth).physical(truth, torch.zeros(len(seen), dtype=F64))
    value = torch.tensor([p.value for p in res.parameters if p.group == "structure_factors"], dtype=F64)
    assert float(torch.log(value / true_f).abs().max()) < 0.05
    assert res.value("fluence").value == pytest.approx(float(truth.beam.fluence), rel=2e-3)


def test_recover_structure_factors_jointly_over_three_stills():
    """One shared table, a scale per still; the prior on the first still's
    scale holds the overall scale every |F| shares."""
    grid, lo = mmm_table(18)
    truths, seen = [], []
    for misset in ("10 20 30", "40 -15 5", "-25 60 12"):
        args = SMALL[:-1] + ["1e27"]
        args[args.index("-misset") + 1:args.index("-misset") + 4] = misset.split()
        t = with_table(still(args), grid, lo, "P 2 2 2")
        truths.append(t)
        seen += [r for r in reflections_in_view(t)[:4] if r not in seen]
    datas = [noisy(t, 30 + k) for k, t in enumerate(truths)]
    sims = [copy.deepcopy(t) for t in truths]
    factors = perturbation(len(seen), 3)
    for s in sims:  # one table for all: the same perturbation everywhere
        scale_reflections(s, seen, factors)
    res = refine_joint(sims, datas, shared=(StructureFactorGroup(seen),), per_image=("scale",),
                       priors={"image0.scale": (0.0, 0.1)}, dtype_schedule=("float64",), strategy=None)
    assert res.converged and not res.undetermined
    labels = StructureFactorGroup(seen).bind(truths[0]).labels
    true_f = StructureFactorGroup(seen).bind(truths[0]).physical(truths[0], torch.zeros(len(seen), dtype=F64))
    got = [res.value(lab) for lab in labels]
    start, value, sigma = (torch.tensor([getattr(p, a) for p in got], dtype=F64) for a in ("start", "value", "sigma"))
    err0 = torch.log(start / true_f).abs()
    err = torch.log(value / true_f).abs()
    assert float(err0.min()) > 0.14
    assert bool((err < 0.5 * err0).all())
    assert bool(((value - true_f).abs() < 4 * sigma).all())
    for k in range(3):
        assert res.value("fluence", k).value == pytest.approx(1e27, rel=0.05)
    # every simulator's table holds the refined values
    for s in sims:
        written = StructureFactorGroup(seen).bind(s).physical(s, torch.zeros(len(seen), dtype=F64))
        assert torch.allclose(written, value, rtol=1e-10)
    assert not res.not_written


# ----------------------------------------------------------------------------- spectrum

def test_spectrum_substitution_is_the_affine_map_of_the_wavelengths():
    sim = still(TINY)
    sim.beam = spectrum_beam(sim, LINES, WEIGHTS)
    lam0 = sim.beam.sources()[1].detach()
    w = torch.tensor(WEIGHTS, dtype=F64)
    mean = float((w * lam0).sum() / w.sum())
    p = Parametrisation(["spectrum"], sim)
    assert p.labels == ["spectrum.shift", "spectrum.width"]
    x = torch.tensor([20.0, 30.0], dtype=F64)
    subs = p.substitutions(sim, x)
    moved = copy.deepcopy(sim)
    with torch.no_grad():
        for name, v in subs.items():
            moved.get_parameter(name).copy_(v) if name == "beam.wavelength" else moved.get_buffer(name).copy_(v)
    expect = mean + math.exp(0.3) * (lam0 - mean) + 20e-4 * mean
    assert torch.allclose(moved.beam.sources()[1], expect, rtol=1e-12)
    with torch.no_grad():
        assert torch.allclose(functional_call(sim, subs, ()), moved.render(), rtol=1e-10)
    rms = math.sqrt(float((w * (lam0 - mean) ** 2).sum() / w.sum()))
    phys = p.physical(sim, x)
    assert float(phys[0]) == pytest.approx(mean * (1 + 20e-4), rel=1e-12)
    assert float(phys[1]) == pytest.approx(rms * math.exp(0.3), rel=1e-12)
    assert [lab for _, lab, _ in p.physical_labels()] == ["wavelength_mean", "bandwidth_rms"]


def test_spectrum_of_dispersion_steps():
    sim = still(TINY + "-dispersion 1 -dispsteps 5".split())
    assert not sim.beam.has_source_table and sim.beam.dispersion_steps == 5
    lam0 = sim.beam.sources()[1].detach()
    p = Parametrisation(["spectrum"], sim)
    x = torch.tensor([-15.0, 40.0], dtype=F64)
    subs = p.substitutions(sim, x)
    moved = copy.deepcopy(sim)
    with torch.no_grad():
        for name, v in subs.items():
            moved.get_parameter(name).copy_(v)
    mean = float(lam0.mean())
    expect = mean + math.exp(0.4) * (lam0 - mean) - 15e-4 * mean
    assert torch.allclose(moved.beam.sources()[1], expect, rtol=1e-12)
    assert float(p.physical(sim, x)[1]) == pytest.approx(float(lam0.std(unbiased=False)) * math.exp(0.4))


def test_spectrum_weights_are_honoured():
    sim = still(TINY)
    sim.beam = spectrum_beam(sim, LINES, WEIGHTS)
    flat = copy.deepcopy(sim)
    flat.beam = spectrum_beam(sim, LINES)
    with torch.no_grad():
        assert not torch.allclose(sim.render(), flat.render(), rtol=1e-3)
    # the mean the width scales about is the weighted one
    lopsided = copy.deepcopy(sim)
    lopsided.beam = spectrum_beam(sim, LINES, [0.0, 0.0, 0.0, 1.0, 3.0])
    for s, mean in ((sim, 1.0), (flat, 1.0), (lopsided, 1.00875)):
        p = Parametrisation(["spectrum"], s)
        assert float(p.physical(s, torch.zeros(2, dtype=F64))[0]) == pytest.approx(mean, rel=1e-12)
        lam = p.substitutions(s, torch.tensor([0.0, 50.0], dtype=F64))["beam.source_wavelengths"]
        w = s.beam.weights() if s.beam.weighted else torch.ones_like(lam)
        assert float((w * lam).sum() / w.sum()) == pytest.approx(mean, rel=1e-12)


def test_spectrum_refuses_a_single_wavelength():
    for sim in (still(TINY), still(TINY + "-dispsteps 5".split())):
        with pytest.raises(ValueError, match="spectrum group needs a spectrum of several wavelengths"):
            Parametrisation(["spectrum"], sim)
    sim = still(TINY)
    sim.beam = spectrum_beam(sim, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="spectrum"):
        Parametrisation(["spectrum"], sim)


def test_spectrum_gradcheck():
    sim = still(TINY)
    sim.beam = spectrum_beam(sim, LINES, WEIGHTS)
    gradcheck_objective(sim, [Spectrum(), "scale"], 5)
    gradcheck_objective(still(TINY + "-dispersion 1 -dispsteps 3".split()), ["spectrum"], 6)


def test_recover_spectrum_shift():
    truth = still()
    truth.beam = spectrum_beam(truth, LINES, WEIGHTS)
    data = noisy(truth, 41)
    sim = copy.deepcopy(truth)
    sim.beam = spectrum_beam(truth, [v * 1.002 for v in LINES], WEIGHTS)  # 0.2 % long
    res = refine(sim, data, ["spectrum"], dtype_schedule=("float64",))
    assert res.converged
    shift = res.x[0]
    sigma = float(res.sigma_internal[0])
    truth_shift = (1 / 1.002 - 1) / 1e-4
    assert sigma < 5.0
    assert float(shift) == pytest.approx(truth_shift, abs=4 * sigma)
    assert abs(float(res.x[1])) < 4 * float(res.sigma_internal[1])  # the width was right
    mean = res.value("wavelength_mean")
    assert mean.value == pytest.approx(1.0, abs=4 * mean.sigma)
    assert torch.allclose(sim.beam.sources()[1], torch.tensor(LINES, dtype=F64), rtol=5 * sigma * 1e-4)
