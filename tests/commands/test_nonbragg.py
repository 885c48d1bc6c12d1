"""The nonBragg command and the amorphous Background model: parity with the
original's outputs (tests/data/golden_suite/nonBragg), first principles,
gradients and bad input."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from torchbragg import physics as ph
from torchbragg.commands.nonbragg import FLAGS, main
from torchbragg.errors import InputError
from torchbragg.io.stol import read_stol
from torchbragg.models import Background, Beam, Detector, DistanceMount, Frame, Panel
from golden import DATA, ROOT

SUITE = DATA / "golden_suite" / "nonBragg"
MANIFEST = json.loads((SUITE / "manifest.json").read_text())
CASES = sorted(MANIFEST)


def stol_file(name: str, folder: Path) -> Path:
    path = folder / name
    if not path.exists():
        path.write_bytes(gzip.decompress((SUITE / "stol" / f"{name}.gz").read_bytes()))
    return path


def run(argv, cwd: Path):
    """main() in `cwd`; (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def run_case(case: str, tmp_path: Path, extra=()):
    args = shlex.split(MANIFEST[case]["args"])
    for a in args:
        if a.endswith(".stol"):
            stol_file(a, tmp_path)
    outputs = ["-floatfile", "float.bin", "-noprogress"]
    if "-intfile" not in args:
        outputs += ["-intfile", "intimage.img"]
    if "-noisefile" not in args:
        outputs.append("-nonoise")
    return run(args + outputs + list(extra), tmp_path)


def reference(case: str, name: str) -> bytes:
    return gzip.decompress((SUITE / case / f"{name}.gz").read_bytes())


@pytest.mark.parametrize("case", CASES)
def test_golden_case(case, tmp_path):
    rc, out, err = run_case(case, tmp_path)
    assert rc == 0, err
    ref = np.frombuffer(reference(case, "float.bin"), "<f4").astype(np.float64)
    mine = np.fromfile(tmp_path / "float.bin", "<f4").astype(np.float64)
    assert mine.shape == ref.shape
    assert np.isfinite(mine).all()
    top = np.abs(ref).max()
    assert np.abs(mine - ref).max() <= 1e-3 * top
    assert abs(mine.sum() - ref.sum()) <= 1e-3 * abs(ref.sum())
    assert ref.sum() == pytest.approx(MANIFEST[case]["sum"], rel=1e-6, abs=0)
    for gz in (SUITE / case).glob("*.img.gz"):
        name = gz.name[:-3]
        assert (tmp_path / name).read_bytes() == reference(case, name), f"{name} differs from the original's"


EXTRA = SUITE.parent / "nonBragg_extra"
EXTRA_CASES = sorted(p.name for p in EXTRA.iterdir() if p.is_dir())


@pytest.mark.parametrize("case", EXTRA_CASES)
def test_more_flags_against_the_original(case, tmp_path):
    """Flags the shared cases leave out, against outputs of the original made the same way."""
    args = shlex.split((EXTRA / case / "args.txt").read_text())
    for a in args:
        if (SUITE / "stol" / f"{a}.gz").exists():
            stol_file(a, tmp_path)
    (tmp_path / "water4.stol").write_bytes(gzip.decompress((EXTRA / "water4.stol.gz").read_bytes()))
    shutil.copy(EXTRA / "sources.txt", tmp_path / "sources.txt")
    outputs = ["-floatfile", "float.bin", "-noprogress"]
    if "-intfile" not in args:
        outputs += ["-intfile", "intimage.img"]
    if "-noisefile" not in args:
        outputs.append("-nonoise")
    rc, out, err = run(args + outputs, tmp_path)
    assert rc == 0, err
    ref = np.frombuffer(gzip.decompress((EXTRA / case / "float.bin.gz").read_bytes()), "<f4").astype(np.float64)
    mine = np.fromfile(tmp_path / "float.bin", "<f4").astype(np.float64)
    assert np.abs(mine - ref).max() <= 1e-3 * np.abs(ref).max()
    assert abs(mine.sum() - ref.sum()) <= 1e-3 * abs(ref.sum())
    for gz in (EXTRA / case).glob("*.img.gz"):
        name = gz.name[:-3]
        assert (tmp_path / name).read_bytes() == gzip.decompress(gz.read_bytes()), f"{name} differs"
    want = [line for line in (EXTRA / case / "stdout.txt").read_text().splitlines() if line.startswith("  sample is")]
    assert [line for line in out.splitlines() if line.startswith("  sample is")] == want


REPORTED = ("  sample is", "  distance=", "  Xbeam=", "  detector origin:", "  DIRECTION_OF_DETECTOR",
            "  incident fluence", "  created a total", "solid angle", "max_I", "intfile_scale", "pgm_scale",
            "  wave=", "  hdivrange", "  vdivrange", "  roi:")


@pytest.mark.parametrize("case", ["water_divergence_dispersion", "shortwater_tilted", "water_thick_flux",
                                  "water_molecules", "ice_oversample"])
def test_report_matches_original(case, tmp_path):
    rc, out, _ = run_case(case, tmp_path)
    assert rc == 0
    ref = (SUITE / case / "stdout.txt").read_text().splitlines()
    mine = out.splitlines()
    for prefix in REPORTED:
        want = [line for line in ref if line.startswith(prefix)]
        got = [line for line in mine if line.startswith(prefix)]
        assert got == want, prefix


def test_float32_within_tolerance(tmp_path):
    rc, _, err = run_case("water_divergence_dispersion", tmp_path, ["-dtype", "float32"])
    assert rc == 0, err
    ref = np.frombuffer(reference("water_divergence_dispersion", "float.bin"), "<f4").astype(np.float64)
    mine = np.fromfile(tmp_path / "float.bin", "<f4").astype(np.float64)
    assert np.abs(mine - ref).max() <= 1e-5 * ref.max()


def test_pgm_is_deterministic(tmp_path):
    stol_file("water.stol", tmp_path)
    argv = "-stol water.stol -detpixels 32 -pixel 0.5 -nonoise -pgmfile a.pgm".split()
    assert run(argv, tmp_path)[0] == 0
    assert run(argv[:-1] + ["b.pgm"], tmp_path)[0] == 0
    a = (tmp_path / "a.pgm").read_bytes()
    assert a == (tmp_path / "b.pgm").read_bytes()
    assert a.startswith(b"P5\n32 32\n# pixels scaled by ")
    assert len(a.split(b"\n255\n", 1)[1]) == 32 * 32  # one byte a pixel


def test_help_lists_every_flag_with_unit_and_default(capsys):
    assert main(["-h"]) == 0
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert flag.names[0] in text
    for phrase in ("mm, default 0.1", "g/cm^3, default 1", "g/mol, default 18", "Angstrom, default 1",
                   "photons/m^2, default 1.25932e29", "mm, default 100"):
        assert phrase in text


# ----------------------------------------------------------------------------- .stol tables

def test_nanoice_table_skips_comments_and_warns_about_third_column(tmp_path):
    path = stol_file("nanoice.stol", tmp_path)
    table = read_stol(path)
    assert table.stol[0] == 0.0 and table.F[0] == pytest.approx(1.34812)
    assert len(table.stol) == 1000
    assert any("column 3" in w for w in table.warnings)
    rc, out, err = run(["-stol", path, "-detpixels", "16", "-pixel", "1", "-nonoise", "-nopgm"], tmp_path)
    assert rc == 0
    assert "warning" in err and "column 3" in err
    assert np.isfinite(np.fromfile(tmp_path / "floatimage.bin", "<f4")).all()


@pytest.mark.parametrize("text, message", [
    ("0 2.5\n", "at least 2"),
    ("# only a comment\n", "at least 2"),
    ("0 2.5\n0.1 nan\n", "finite"),
    ("0 2.5\n0.1 x\n", "two numbers"),
    ("0 2.5\n0.1 2\n0.1 1\n", "appears twice"),
    ("0\n", "expected 'stol F'"),
])
def test_bad_tables_are_refused(tmp_path, text, message):
    (tmp_path / "bad.stol").write_text(text)
    with pytest.raises(InputError, match=message):
        read_stol(tmp_path / "bad.stol")
    rc, out, err = run(["-stol", "bad.stol", "-detpixels", "8"], tmp_path)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("nonBragg: error:")
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.img"))


@pytest.mark.parametrize("argv, message", [
    ("-stol water.stol -bogus 3", "unknown flag '-bogus'"),
    ("-detpixels 8", "no .stol file"),
    ("-stol missing.stol", "no such file"),
    ("-stol water.stol -pixel 0", "-pixel must be positive"),
    ("-stol water.stol -distance", "expects 1 value"),
    ("-stol water.stol -lambda abc", "expects a number"),
    ("-stol water.stol -detpixels 8 -floatfile nowhere/f.bin", "does not exist"),
    ("-stol water.stol -detpixels 8 -roi 20 30 0 4", "selects no pixel"),
    ("-stol water.stol -detpixels 8 -img x.img", "not supported"),
    ("-stol water.stol -detpixels 8 -beam_vector 0 0 0", "zero vector"),
    ("-stol water.stol -detpixels 100000", "too large"),
    ("-stol water.stol -detpixels 8 -device gpu7", "-device takes"),
    ("-stol water.stol -detpixels 8 -dtype half", "-dtype takes"),
    ("-stol water.stol -detpixels 8 -polar 2", "Kahn"),
    ("-stol water.stol -detpixels 8 -noisefile n.img -seed x", "expects an integer"),
])
def test_bad_input_one_line_exit_2(tmp_path, argv, message):
    stol_file("water.stol", tmp_path)
    rc, out, err = run(shlex.split(argv), tmp_path)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("nonBragg: error:") and message in err, err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.img"))


# ----------------------------------------------------------------------------- the model

def water(tmp_path, **kw) -> Background:
    return Background.from_stol(stol_file("water.stol", tmp_path), dtype=torch.float64, **kw)


def one_pixel_setup(distance=100.0, offset=(7.0, 3.0), pixel=0.2, wavelength=1.0):
    """A single pixel centred `offset` mm (fast, slow) from the direct beam."""
    mount = DistanceMount((0, 0, 1), (0, -1, 0), (1, 0, 0), (0, 1, 0), distance=distance,
                          beam_center=(pixel / 2 - offset[0], pixel / 2 - offset[1]), dtype=torch.float64)
    det = Detector([Panel(mount, (1, 1), (pixel, pixel), dtype=torch.float64)], dtype=torch.float64)
    beam = Beam((-1.0, 0.0, 0.0), wavelength, polarization_normal=(0.0, -1.0, 0.0), dtype=torch.float64)
    return beam, det


def test_single_pixel_from_first_principles(tmp_path):
    bg = water(tmp_path)
    beam, det = one_pixel_setup()
    photons = float(bg(beam, det)[0, 0, 0])
    # the pixel centre in the lab frame (mm): beam along x, fast along z, slow along -y
    pos = np.array([100.0, -3.0, 7.0])
    r = np.linalg.norm(pos)
    cos2t = pos[0] / r
    stol = math.sin(math.acos(cos2t) / 2.0) / 1.0
    table = read_stol(tmp_path / "water.stol")
    k = int(np.searchsorted(table.stol, stol, side="right")) - 1
    xs, ys = table.stol[k - 1:k + 3], table.F[k - 1:k + 3]
    F = float(np.polyval(np.polyfit(xs, ys, 3), stol))  # the cubic through the four neighbours
    unpolarized = 0.5 * (1.0 + cos2t ** 2)
    omega = 0.2 * 0.2 / r ** 2 * (100.0 / r)
    molecules = 0.1 * 0.1 * 0.1 * 1e-3 * 1.0 * 6.02214179e23 / 18.0
    expected = F * F * 7.94079248018965e-30 * 125932015286227086360700780544.0 * molecules * unpolarized * omega
    assert photons == pytest.approx(expected, rel=1e-9)


def test_water_default_sample(tmp_path):
    bg = water(tmp_path)
    assert float(bg.molecule_count()) == pytest.approx(3.34563e16, rel=1e-5)  # what the original reports
    # forward scattering of water is 2.57 electrons
    assert float(bg.structure_factor(torch.tensor([0.0], dtype=torch.float64))) == pytest.approx(2.57, abs=0.01)


def test_intensity_scales_linearly_with_thickness_density_and_molecules(tmp_path):
    beam, det = one_pixel_setup()
    base = float(water(tmp_path)(beam, det).sum())
    assert float(water(tmp_path, thickness=0.3)(beam, det).sum()) == pytest.approx(3 * base, rel=1e-12)
    assert float(water(tmp_path, density=0.5)(beam, det).sum()) == pytest.approx(0.5 * base, rel=1e-12)
    assert float(water(tmp_path, molecular_weight=36.0)(beam, det).sum()) == pytest.approx(0.5 * base, rel=1e-12)
    assert float(water(tmp_path, size=(0.2, 0.05))(beam, det).sum()) == pytest.approx(base, rel=1e-12)
    n = float(water(tmp_path).molecule_count())
    fixed = water(tmp_path, molecules=2 * n, thickness=5.0)  # a molecule count overrides the box
    assert float(fixed(beam, det).sum()) == pytest.approx(2 * base, rel=1e-12)
    assert float(water(tmp_path, scale=1.7)(beam, det).sum()) == pytest.approx(1.7 * base, rel=1e-12)


def test_multipanel_detector_matches_panels_alone(tmp_path):
    bg = water(tmp_path)
    beam = Beam((0.0, 0.0, -1.0), 1.0, dtype=torch.float64)  # travelling along +z, towards the panels
    frames = [Frame((-6.0, -3.0, 80.0), (1, 0, 0), (0, 1, 0), dtype=torch.float64),
              Frame((2.0, -3.0, 80.0), (0.98, 0.0, 0.2), (0, 1, 0), dtype=torch.float64)]
    panels = [Panel(f, (12, 6), (0.5, 0.5), dtype=torch.float64) for f in frames]
    both = bg(beam, Detector(panels, dtype=torch.float64), oversample=2)
    assert both.shape == (2, 6, 12)
    for k, f in enumerate(frames):
        alone = bg(beam, Detector([Panel(f, (12, 6), (0.5, 0.5), dtype=torch.float64)], dtype=torch.float64),
                   oversample=2)
        torch.testing.assert_close(both[k], alone[0], rtol=0, atol=0)
    assert (both > 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_of_scale_and_thickness_match_finite_differences(tmp_path, dtype):
    beam, det = one_pixel_setup()
    beam, det = beam.to(dtype), det.to(dtype)
    bg = Background.from_stol(stol_file("water.stol", tmp_path), dtype=dtype, thickness=0.2, scale=1.3)
    weights = torch.linspace(0.5, 1.5, 1, dtype=dtype)
    for name in ("scale", "thickness"):
        p = getattr(bg, name)
        p.requires_grad_(True)
        loss = (bg(beam, det).flatten() * weights).sum() / 1e9
        (grad,) = torch.autograd.grad(loss, p)
        p.requires_grad_(False)
        h = 1e-3 * float(p)
        with torch.no_grad():
            p += h
            up = float((bg(beam, det).flatten() * weights).sum() / 1e9)
            p -= 2 * h
            down = float((bg(beam, det).flatten() * weights).sum() / 1e9)
            p += h
        assert float(grad) == pytest.approx((up - down) / (2 * h), rel=1e-3 if dtype == torch.float32 else 1e-7)
        assert float(grad) > 0


def test_interpolation_is_the_original_cubic():
    stol = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.5], dtype=torch.float64)
    F = torch.tensor([2.0, 3.0, 1.0, 4.0, 0.5], dtype=torch.float64)
    bg = Background(stol, F, dtype=torch.float64)
    x = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.29, 0.4, 0.5, 0.7, -0.1], dtype=torch.float64)
    got = bg.structure_factor(x)
    s, f = stol.numpy(), F.numpy()
    for xv, gv in zip(x.tolist(), got.tolist()):
        k = int(np.searchsorted(s, xv, side="right")) - 1  # last point <= x
        nodes = [i for i in range(k - 1, k + 3) if 0 <= i < len(s)]  # neighbours past the ends are dropped
        want = np.polyval(np.polyfit(s[nodes], f[nodes], len(nodes) - 1), xv)
        assert gv == pytest.approx(want, rel=1e-9, abs=1e-12)
    # the binary-search path (tables too fine for the cell grid) gives the same values
    bg._grids[(torch.float64, "cpu")] = None
    torch.testing.assert_close(bg.structure_factor(x), got, rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match="no repeated stol"):
        Background([0.0, 0.1, 0.1], [1.0, 2.0, 3.0])
    # the table points themselves are reproduced
    torch.testing.assert_close(bg.structure_factor(stol), F)
    assert ph.amorphous_scattering(torch.tensor(-2.0), torch.tensor(1.0), torch.tensor(1.0)) < 0


# ----------------------------------------------------------------------------- composed with the Simulator

def test_simulator_adds_background_python_api(tmp_path):
    from torchbragg import Simulator
    from torchbragg.models import Crystal, StructureFactors
    from torchbragg.simulator import RenderOptions
    f64 = torch.float64
    beam = Beam((-1.0, 0.0, 0.0), 1.0, polarization_normal=(0.0, -1.0, 0.0), dtype=f64)
    frames = [Frame((100.0, 3.2, -3.2), (0, 0, 1), (0, -1, 0), dtype=f64),
              Frame((100.0, 3.2, 0.0), (0, 0, 1), (0, -1, 0), dtype=f64)]
    det = Detector([Panel(f, (16, 16), (0.4, 0.4), dtype=f64) for f in frames], dtype=f64)
    crystal = Crystal((50.0, 60.0, 70.0, 90.0, 90.0, 90.0), N=(5.0, 5.0, 5.0),
                      structure_factors=StructureFactors(default_F=100.0, dtype=f64), dtype=f64)
    bg = Background.from_stol(stol_file("water.stol", tmp_path), thickness=0.5, dtype=f64)
    options = RenderOptions(oversample=1)
    bragg = Simulator(beam, crystal, det, options=options).render()
    both = Simulator(beam, crystal, det, options=options, background=bg).render()
    torch.testing.assert_close(both - bragg, bg(beam, det), rtol=1e-12, atol=0)
    assert float(bg(beam, det).min()) > 0
    # the background's scale carries a gradient through the composed render
    bg.scale.requires_grad_(True)
    sim = Simulator(beam, crystal, det, options=options, background=bg)
    (grad,) = torch.autograd.grad(sim.render().sum(), bg.scale)
    with torch.no_grad():
        assert float(grad) == pytest.approx(float(bg(beam, det).sum()), rel=1e-9)


def test_simulate_command_with_background(tmp_path):
    import golden
    from torchbragg.build.experiment import build_from_experiment
    from torchbragg.commands.simulate import run as simulate
    from torchbragg.flags import parse_args
    from torchbragg.io.dials import read_experiments
    geometry = ["-cell", "70", "80", "90", "75", "85", "95", "-lambda", "1.2", "-distance", "100", "-detpixels", "32",
                "-misset", "10", "20", "30", "-pixel", "0.4"]
    physics = ["-N", "4", "-default_F", "100", "-dtype", "float64", "-fluence", "1e20"]
    rc, text = golden.run_cli(geometry + physics + ["-floatfile", "x.bin", "-nonoise", "-nopgm", "-write_expt",
                                                    "one.expt"], tmp_path)
    assert rc == 0, text
    stol_file("water.stol", tmp_path)
    with contextlib.chdir(tmp_path), contextlib.redirect_stdout(io.StringIO()):
        assert simulate(["one.expt", "--out", "plain", "--quiet", *physics]) == 0
        assert simulate(["one.expt", "--out", "wet", "--quiet", "--background", "water.stol", "-sample_thick",
                         "0.3", "-density", "0.9", *physics]) == 0
    plain, wet = np.load(tmp_path / "plain_00001.npy"), np.load(tmp_path / "wet_00001.npy")
    sim, _ = build_from_experiment(read_experiments(tmp_path / "one.expt")[0], parse_args(physics))
    bg = Background.from_stol(tmp_path / "water.stol", thickness=0.3, density=0.9, dtype=torch.float64)
    with torch.no_grad():
        expected = bg(sim.beam, sim.detector).numpy()
    # the sample flags went to the background, not to the crystal
    np.testing.assert_allclose(wet - plain, expected, rtol=1e-5, atol=1e-3 * expected.max())
    assert expected.min() > 0
    # written as a Pilatus miniCBF of photon counts, read back with fabio
    import fabio
    with contextlib.chdir(tmp_path), contextlib.redirect_stdout(io.StringIO()):
        assert simulate(["one.expt", "--out", "c", "--quiet", "--format", "cbf", "--background", "water.stol",
                         "-sample_thick", "0.3", "-density", "0.9", "-seed", "5", *physics]) == 0
    counts = fabio.open(str(tmp_path / "c_00001.cbf")).data.astype(np.float64)
    assert counts.shape == wet.shape[1:]
    assert abs(counts.sum() - wet.sum()) < 5 * math.sqrt(wet.sum())  # Poisson counts of the same photons
    with pytest.raises(InputError, match="must be positive"):
        with contextlib.chdir(tmp_path):
            simulate(["one.expt", "--out", "bad", "--background", "water.stol", "-sample_thick", "0"])


def test_bench_script_scales_cases_to_a_pilatus_frame(tmp_path):
    import importlib.util
    path = ROOT / "scripts" / "bench_nonbragg.py"
    spec = importlib.util.spec_from_file_location("bench_nonbragg", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.case_args("water_divergence_dispersion", tmp_path)
    assert args[-6:] == ["-detpixels_x", "2463", "-detpixels_y", "2527", "-pixel", "0.172"]
    assert "-detpixels" not in args and args.count("-pixel") == 1
    assert "-dispsteps" in args and "-hdivrange" in args
    assert Path(args[args.index("-stol") + 1]).read_text().startswith("0 2.56999")


@pytest.mark.parametrize("argv, expect", [
    ("-detpixels_x 50 -detpixels 40", dict(fpixels=40, spixels=40)),
    ("-detpixels 40 -detpixels_y 30", dict(fpixels=40, spixels=30)),
    ("-detsize 25 -detsize_x 20 -pixel 0.5", dict(fpixels=40, spixels=50)),
    ("-energy 12398.42 -lambda 2", dict(wavelength=2e-10)),
    ("-lambda 2 -energy 12398.42", dict(wavelength=1e-10)),
    ("-thickness 0.3 -samplesize 0.05", dict(sample=(5e-5, 5e-5, 5e-5))),
    ("-samplesize 0.05 -thickness 0.3", dict(sample=(3e-4, 5e-5, 5e-5))),
    ("-distance 90 -twotheta 5", dict(pivot="SAMPLE")),
    ("-twotheta 5 -distance 90", dict(pivot="BEAM")),
])
def test_later_flags_win_as_in_the_original(argv, expect):
    from torchbragg.commands.nonbragg import parse, resolve
    setup = resolve(parse(["-stol", "x.stol", "-nonoise", *shlex.split(argv)]))
    for key, value in expect.items():
        got = getattr(setup, key)
        assert got == (pytest.approx(value) if not isinstance(value, str) else value), key


@pytest.mark.parametrize("compiled", [True, False])
def test_walk_of_a_table_that_goes_back_is_the_original_search(compiled, monkeypatch):
    """The compiled walk, and without it only points whose place in the table
    depends on the previous one walked one by one: the result is the
    sequential search's for every point."""
    from torchbragg.models import background
    if compiled and background._C is None:
        pytest.skip("_noise.c was not built")
    if not compiled:
        monkeypatch.setattr(background, "_C", None)
    rng = np.random.default_rng(1)

    def sequential(stol, values):
        padded = [-1e99, -1e98, *stol.tolist(), 1e98, 1e99]
        n, out = 0, []
        for x in values:
            while x > padded[n] and n < len(padded) - 1:
                n += 1
            while x < padded[n] and n >= 2:
                n -= 1
            out.append(n - 1)
        return np.clip(out, 0, len(padded) - 4)

    checked = 0
    for _ in range(100):
        s = np.round(rng.random(int(rng.integers(3, 12))), 2)
        s = s[np.r_[True, np.diff(s) != 0]]
        if len(s) < 3 or (np.diff(s) > 0).all():
            continue
        bg = Background(s, rng.random(len(s)), dtype=torch.float64)
        values = np.concatenate([np.round(rng.random(200), 2), rng.random(200)])  # ties with the table too
        np.testing.assert_array_equal(bg._walk(torch.as_tensor(values)).numpy(), sequential(s, values))
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_table_lookup_is_the_torch_lookup(dtype, monkeypatch):
    """The compiled passes of the table lookups (cell grid, known intervals)
    give the torch code's values bit for bit: at random points, at the table
    points themselves (either side's cubic) and beyond both ends."""
    from torchbragg.models import background
    if background._C is None:
        pytest.skip("_noise.c was not built")
    rng = np.random.default_rng(3)
    s = np.sort(np.concatenate([[0.0], rng.random(40) * 0.5, [0.5]]))
    s = s[np.r_[True, np.diff(s) > 1e-4]]
    bg = Background(s, rng.random(len(s)) * 3, dtype=dtype)
    grid = bg._grid(dtype, torch.device("cpu"))
    stol = torch.cat([torch.as_tensor(rng.random(5000) * 0.6 - 0.05), torch.as_tensor(s)]).to(dtype)
    y = bg._cell(stol)
    back = Background(np.r_[s[:5], s[3] - 1e-3, s[5:]], rng.random(len(s) + 1) * 3, dtype=dtype)  # goes back
    fast = [bg._from_cells(y, grid), bg._from_intervals(stol, bg.interval(stol)),
            back._from_intervals(stol, back.interval(stol))]
    monkeypatch.setattr(background, "_C", None)
    slow = [bg._from_cells(y, grid), bg._from_intervals(stol, bg.interval(stol)),
            back._from_intervals(stol, back.interval(stol))]
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_background_in_a_thick_sensor_counts_the_absorbed_photons(tmp_path):
    from torchbragg import Simulator
    from torchbragg.models import Crystal, StructureFactors
    from torchbragg.simulator import RenderOptions
    f64 = torch.float64
    beam = Beam((-1.0, 0.0, 0.0), 1.0, polarization_normal=(0.0, -1.0, 0.0), dtype=f64)
    frame = Frame((60.0, 4.0, -4.0), (0, 0, 1), (0, -1, 0), dtype=f64)
    det = Detector([Panel(frame, (8, 8), (1.0, 1.0), thickness=0.45, mu=2.0, dtype=f64)], dtype=f64)
    crystal = Crystal((50.0, 60.0, 70.0, 90.0, 90.0, 90.0), N=(3.0, 3.0, 3.0),
                      structure_factors=StructureFactors(default_F=10.0, dtype=f64), dtype=f64)
    bg = Background.from_stol(stol_file("water.stol", tmp_path), dtype=f64)
    options = RenderOptions(oversample=1, sensor_layers=3, layer_divisor=2)  # layers 0.225 mm apart
    bragg = Simulator(beam, crystal, det, options=options).render()
    both = Simulator(beam, crystal, det, options=options, background=bg).render()
    f = torch.arange(8, dtype=f64) + 0.5
    pos = torch.stack(torch.broadcast_tensors(torch.tensor(60.0, dtype=f64), 4.0 - f[:, None], -4.0 + f[None, :]), -1)
    r = torch.linalg.norm(pos, dim=-1)
    absorbed = 1.0 - torch.exp(-2.0 * 0.45 * 3 / 2 * r / 60.0)
    torch.testing.assert_close(both - bragg, bg(beam, det) * absorbed, rtol=1e-10, atol=0)
    assert float(absorbed.max()) < 0.9
