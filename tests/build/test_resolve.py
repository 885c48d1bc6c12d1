"""The resolution step: the numbers `resolve` derives from flags (or from an
experiment plus flags), without torch, are the ones the built models hold."""

import math
import subprocess
import sys

import pytest
import torch

from torchbragg import Simulator
from torchbragg.build.experiment import build_from_experiment, experiment_geometry
from torchbragg.build.nanobragg import models_from_args, write_experiment
from torchbragg.flags import parse_args
from torchbragg.io.dials import read_experiments
from torchbragg.resolve import resolve, resolve_experiment

BASE = "-cell 70 80 90 90 90 90 -default_F 1 -detpixels 24 -pixel 0.3 -distance 60".split()

CASES = [
    ("defaults", []),
    ("mosaic_default_domains", ["-mosaic", "0.5"]),
    ("mosaic_domains", ["-mosaic", "0.5", "-mosaic_dom", "4"]),
    ("domains_without_spread", ["-mosaic_dom", "6"]),
    ("divergence_dispersion", ["-divergence", "0.4", "-divsteps", "5", "-dispersion", "0.2", "-dispsteps", "3"]),
    ("square_divergence", ["-divergence", "0.4", "-divsteps", "4", "-square_div"]),
    ("phi_steps", ["-osc", "0.3", "-phistep", "0.1"]),
    ("thick_sensor", ["-detector_thick", "300", "-detector_thicksteps", "4"]),
    ("absorbed_layers", ["-detector_thick", "300", "-absorbed_layers"]),
    ("xtalsize", ["-xtalsize", "0.002", "-beamsize", "0.001"]),
    ("xds_sample_pivot", ["-xds", "-twotheta", "20"]),
    ("adxv_beam_centre", ["-adxv", "-Xbeam", "3", "-Ybeam", "4"]),
    ("dials", ["-dials", "-ORGX", "10", "-ORGY", "12"]),
    ("custom_vectors", ["-fdet_vector", "0", "0", "1", "-sdet_vector", "0", "-1", "0", "-odet_vector", "1", "0", "0"]),
    ("detsize", ["-detsize", "5.4"]),
    ("roi", ["-roi", "2", "9", "-1", "5"]),
]


@pytest.mark.parametrize("flags", [pytest.param(f, id=i) for i, f in CASES])
def test_resolved_numbers_are_those_of_the_models(flags):
    argv = BASE + flags
    cfg = parse_args(argv)
    res = resolve(cfg)
    sim = Simulator.from_args(argv, dtype=torch.float64)
    panel, opts = sim.detector.panels[0], sim.options
    place = res.placement
    assert (place.fpixels, place.spixels) == (panel.fpixels, panel.spixels) == res.panels[0]
    assert place.pivot == panel.frame.pivot
    with torch.no_grad():
        g = panel.frame.geometry(sim.beam.incident())
        assert place.distance == pytest.approx(float(g["distance"]) / 1000.0, rel=1e-12)
        if place.pivot == "BEAM":  # the beam spot is where the detector turns
            assert place.beam_spot == pytest.approx((float(g["Fbeam"]), float(g["Sbeam"])), abs=1e-9)
    assert res.mosaic_domains == sim.crystal.mosaic_domains
    assert res.mosaic_spread == pytest.approx(float(sim.crystal.mosaic_spread))
    _, wavelengths = sim.beam.sources()
    assert res.sampling.sources == wavelengths.numel()
    assert res.sampling.phisteps == opts.phisteps
    assert (res.sampling.layers, res.sampling.layer_divisor) == (opts.sensor_layers, opts.layer_divisor)
    assert res.sampling.oversample == sim.oversample
    assert res.sampling.oversample_auto == sim.oversample_auto
    assert res.n_cells == tuple(sim.crystal.N.tolist())
    x0, x1, y0, y1 = cfg.detector.roi or (0, -1, 0, -1)
    f = (x1 if x1 >= 0 else panel.fpixels - 1) - max(x0, 0) + 1
    s = (y1 if y1 >= 0 else panel.spixels - 1) - max(y0, 0) + 1
    assert res.sampling.pixels == f * s


def test_sampling_work_and_memory():
    res = resolve(parse_args(BASE + ["-oversample", "3", "-mosaic", "1", "-mosaic_dom", "5", "-phisteps", "2"]))
    assert res.sampling.counts() == dict(pixels=576, subpixels=9, layers=1, sources=1, phisteps=2, domains=5)
    assert res.sampling.work == 576 * 9 * 2 * 5
    assert res.memory == 576 * 24


def test_experiment_resolution_matches_its_simulator(tmp_path):
    argv = BASE + ["-mosaic", "0.3", "-mosaic_dom", "3"]
    _, info = models_from_args(argv)
    path = str(tmp_path / "x.expt")
    write_experiment(path, argv, info)
    experiment = read_experiments(path)[0]
    flags = ["-default_F", "1", "-N", "4", "-phisteps", "3", "-divergence", "0.2", "-divsteps", "3"]
    res = resolve_experiment(parse_args(flags), experiment_geometry(experiment))
    sim, _ = build_from_experiment(experiment, parse_args(flags), dtype=torch.float64)
    assert res.placement is None and res.panels == ((24, 24),)
    assert res.sampling.oversample == sim.oversample and res.sampling.oversample_auto
    assert res.sampling.phisteps == sim.options.phisteps == 3
    assert res.sampling.sources == sim.beam.sources()[1].numel()
    assert res.mosaic_domains == sim.crystal.mosaic_domains == 1  # the experiment's flags carry no spread
    assert res.n_cells == (4.0, 4.0, 4.0)


def test_resolution_needs_no_torch():
    """Refusals answer before torch is imported: resolve and validate are torch-free."""
    code = ("import sys; from torchbragg.flags import parse_args; from torchbragg.validate import check_config; "
            "r = check_config(parse_args(%r)); assert 'torch' not in sys.modules; print(r.sampling.oversample)"
            % (BASE,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == math.ceil(3 * 90e-10 / (1e-10 * 0.06 / 0.0003))
