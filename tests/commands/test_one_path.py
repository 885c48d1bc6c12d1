"""One path from input to image: the same bad physics flags get the same
refusal (exit status 2, the same one line on stderr, no traceback, no file
written) from `nanoBragg`, `torchbragg simulate`, `torchbragg refine`, and
the same InputError text from the Python builders."""

import os

import numpy as np
import pytest

from torchbragg import Simulator
from torchbragg.build.experiment import build_from_experiment
from torchbragg.commands.nanobragg import main as nanobragg
from torchbragg.commands.tool import main as tool
from torchbragg.errors import InputError
from torchbragg.flags import parse_args
from torchbragg.io.dials import read_experiments
from torchbragg.resolve import place_detector

GEOMETRY = "-cell 50 50 50 90 90 90 -detpixels 16 -pixel 0.5 -distance 50".split()
PHYSICS = ["-default_F", "1"]

# (id, flags, the one line every path refuses them with)
BAD_PHYSICS = [
    # negative and non-finite values
    ("mosaic_negative", "-mosaic -1", "-mosaic must not be negative, got -1"),
    ("fluence_negative", "-fluence -1", "fluence and flux must not be negative"),
    ("water_negative", "-water -1", "-water must not be negative, got -1"),
    ("dispersion_negative", "-dispersion -1", "-dispersion must not be negative, got -1"),
    ("fudge_zero", "-fudge 0", "-fudge must be positive, got 0"),
    ("mosaic_nan", "-mosaic nan", "-mosaic expects a finite number, got 'nan'"),
    ("fluence_inf", "-fluence inf", "-fluence expects a finite number, got 'inf'"),
    ("flux_overflow", "-flux 1e300 -beamsize 1e-200", "-flux 1e+300 with -exposure 1 and -beamsize 1e-200 gives an "
     "infinite fluence"),
    ("mosaic_domains_zero", "-mosaic 1 -mosaic_dom 0", "-mosaic_dom 0 is not allowed (counts must be >= 1; "
     "-oversample 0 means automatic)"),
    ("roi_empty", "-roi 10 5 0 3", "-roi 10 5 0 3 is empty (give xmin xmax ymin ymax)"),
    # too many domains, sub-pixels, cells, sources, points
    ("mosaic_domains_1e9", "-mosaic 1 -mosaic_dom 1e9",
     "-mosaic_domains 1e+09 is beyond any sensible sampling (limit 10000)"),
    ("oversample_100000", "-oversample 100000", "-oversample 100000 is beyond any sensible sampling (limit 10000)"),
    ("oversample_20000", "-oversample 20000", "-oversample 20000 is beyond any sensible sampling (limit 10000)"),
    ("phisteps_20000", "-phisteps 20000", "-phisteps 20000 is beyond any sensible sampling (limit 10000)"),
    ("cells_1e5", "-N 100000", "-Na 100000 is beyond any sensible sampling (limit 10000)"),
    ("automatic_oversample", "-N 10000", "automatic oversampling would take 1.5e+04 sub-pixels per pixel edge "
     "(crystal large for this -distance, -pixel and -lambda); give -oversample N (limit 10000) or a smaller crystal"),
    ("crystal_1mm", "-xtalsize 1 -beamsize 10", "automatic oversampling would take 3e+05 sub-pixels per pixel edge "
     "(crystal large for this -distance, -pixel and -lambda); give -oversample N (limit 10000) or a smaller crystal"),
    ("divergence_grid", "-divergence 10 -divsteps 5000", "a divergence grid of 5000 x 5000 points is beyond any "
     "sensible sampling (limit 1e+06 points); give fewer -hdivsteps/-vdivsteps or larger -hdivstep/-vdivstep"),
    ("sources", "-divergence 1 -divsteps 400 -dispersion 1 -dispsteps 9000", "this run has 1.21e+09 sources "
     "(divergence points x wavelengths), more than the 1e+07 any machine can hold; give fewer -divsteps or "
     "-dispsteps"),
    ("total_work", "-oversample 300 -mosaic 1 -mosaic_dom 5000 -phisteps 100",
     "this run samples 1.15e+13 points (256 pixels x 90000 subpixels x 1 layers x 1 sources x 100 phisteps x "
     "5000 domains), more than the 1e+13 any machine can finish; reduce the sampling"),
    ("missing_hkl", "-hkl absent.hkl", "HKL file absent.hkl does not exist"),
]

# Geometry the nanoBragg command resolves and refuses; an experiment holds
# its own geometry, so every experiment path refuses the flag itself.
BAD_GEOMETRY = [
    ("plane_contains_beam", "-twotheta 90", "impossible geometry: the detector plane contains the beam (check "
     "-twotheta, -detector_rotx/y/z and the detector vectors)"),
    ("rotated_edge_on", "-detector_roty 90", "impossible geometry: the detector plane contains the beam (check "
     "-twotheta, -detector_rotx/y/z and the detector vectors)"),
    ("behind_sample", "-twotheta 135", "impossible geometry: the detector is behind the sample (its normal is 45 "
     "degrees from the beam); check -twotheta and -detector_rotx/y/z, or pivot about the sample (-xds or -dials)"),
    ("distance_negative", "-distance -5", "-distance must be positive, got -5"),
]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A 16x16-pixel experiment written by nanoBragg and a blank image of it."""
    d = tmp_path_factory.mktemp("one_path")
    rc = nanobragg(GEOMETRY + PHYSICS + ["-oversample", "1", "-write_expt", str(d / "x.expt"), "-floatfile",
                                         str(d / "f.bin"), "-intfile", str(d / "i.img"), "-nopgm", "-nonoise"])
    assert rc == 0
    np.save(d / "image.npy", np.ones((1, 16, 16), dtype=np.float32))
    return d


def _refusal(run, prog, capsys, folder) -> str:
    """The one stderr line of a refused run in an empty folder, which stays empty."""
    before = set(os.listdir(folder))
    rc = run()  # a traceback would escape here and fail the test
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert set(os.listdir(folder)) == before, "a refused run left files behind"
    return lines[0][len(f"{prog}: error: "):]


def _command_lines(case, flags, capsys, work):
    """What nanoBragg, torchbragg simulate and torchbragg refine say."""
    expt, image = str(case / "x.expt"), str(case / "image.npy")
    return {
        "nanoBragg": _refusal(lambda: nanobragg(GEOMETRY + PHYSICS + flags), "nanoBragg", capsys, work),
        "simulate": _refusal(lambda: tool(["simulate", expt, "--out", str(work / "p")] + PHYSICS + flags),
                             "torchbragg simulate", capsys, work),
        "refine": _refusal(lambda: tool(["refine", expt, image, "--out", str(work / "r"), "--quiet"] + PHYSICS + flags),
                           "torchbragg refine", capsys, work),
    }


def _api_error(fn) -> str:
    with pytest.raises(InputError) as exc:
        fn()
    return str(exc.value)


@pytest.mark.parametrize("flags,line", [pytest.param(f.split(), m, id=i) for i, f, m in BAD_PHYSICS])
def test_every_path_refuses_bad_physics_alike(case, flags, line, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nanoBragg's default outputs would land here
    got = _command_lines(case, flags, capsys, tmp_path)
    experiment = read_experiments(str(case / "x.expt"))[0]
    got["Simulator.from_args"] = _api_error(lambda: Simulator.from_args(GEOMETRY + PHYSICS + flags))
    got["build_from_experiment"] = _api_error(lambda: build_from_experiment(experiment, parse_args(PHYSICS + flags)))
    assert got == dict.fromkeys(got, line)


@pytest.mark.parametrize("flags,line", [pytest.param(f.split(), m, id=i) for i, f, m in BAD_GEOMETRY])
def test_geometry_refused_by_the_command_and_by_every_experiment_path(case, flags, line, capsys, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = _command_lines(case, flags, capsys, tmp_path)
    assert got.pop("nanoBragg") == line
    assert _api_error(lambda: Simulator.from_args(GEOMETRY + PHYSICS + flags)) == line
    held = f"{flags[0]} is held by the experiment file; edit the experiment to change it"
    experiment = read_experiments(str(case / "x.expt"))[0]
    got["build_from_experiment"] = _api_error(lambda: build_from_experiment(experiment, parse_args(PHYSICS + flags)))
    assert got == dict.fromkeys(got, held)


@pytest.mark.parametrize("section,attr,value,line", [
    ("crystal", "mosaic_spread", float("nan"), "-mosaic must be a finite number, got nan"),
    ("beam", "fluence", float("inf"), "-fluence must be a finite number, got inf"),
    ("crystal", "mosaic_domains", 10**9, "-mosaic_domains 1e+09 is beyond any sensible sampling (limit 10000)"),
    ("beam", "water_size", -2.0, "-water must not be negative, got -2"),
])
def test_python_configs_refused_alike_by_both_builders(case, section, attr, value, line):
    """A configuration edited in Python (no parser in between) gets the
    command line's message from the nanoBragg and the experiment builder."""
    flags_cfg, experiment_cfg = parse_args(GEOMETRY + PHYSICS), parse_args(PHYSICS)
    for cfg in (flags_cfg, experiment_cfg):
        setattr(getattr(cfg, section), attr, value)
    experiment = read_experiments(str(case / "x.expt"))[0]
    assert _api_error(lambda: Simulator.from_config(flags_cfg)) == line
    assert _api_error(lambda: build_from_experiment(experiment, experiment_cfg)) == line


def test_dials_convention_pivots_about_the_sample_as_the_original():
    """-dials registers pivot BEAM while reading flags (as the original's
    parser does); the DIALS convention's own rule then pivots about the
    sample, whatever -pivot said. A custom vector after -dials makes the run
    CUSTOM, which keeps the parser's BEAM."""
    assert parse_args(["-dials"]).detector.pivot == "BEAM"
    assert place_detector(parse_args(["-dials"])).pivot == "SAMPLE"
    assert place_detector(parse_args(["-dials", "-pivot", "beam"])).pivot == "SAMPLE"
    assert place_detector(parse_args(["-dials", "-fdet_vector", "1", "0", "0"])).pivot == "BEAM"
    assert place_detector(parse_args(["-xds", "-fdet_vector", "1", "0", "0"])).pivot == "SAMPLE"
    sim = Simulator.from_args(GEOMETRY + PHYSICS + ["-dials", "-oversample", "1"])
    assert sim.detector.panels[0].frame.pivot == "SAMPLE"
