"""Refinement results that never look better than they are: goodness of fit
against what photon noise allows, wrong minima reported as not converged,
uncertainties inflated by over-dispersion, undetermined parameters listed,
unusable input refused (API and command), continuous N on the experiment
path, progress on stderr."""

import json
import math

import numpy as np
import pytest
import torch

from torchbragg.commands.nanobragg import main as nanobragg
from torchbragg.commands.tool import main as tool
from torchbragg.dataset import photon_counts
from torchbragg.errors import InputError
from torchbragg.refine import Entry, Refiner, refine
from torchbragg.refine.fit import expected_deviance, poisson_deviance
from torchbragg.simulator import Simulator

F64 = torch.float64
SMALL = ("-cell 60 70 80 90 90 90 -misset 10 20 30 -default_F 100 -N 12 -lambda 1 -distance 80 "
         "-detpixels 96 -pixel 0.25 -oversample 1 -fluence 1e26").split()
# sharp spots (N 30) on a larger cell: a narrow basin of convergence
SHARP = ("-cell 90 100 110 90 90 90 -misset 10 20 30 -default_F 100 -N 30 -lambda 1 -distance 100 "
         "-detpixels 96 -pixel 0.25 -oversample 1 -fluence 1e26").split()


def rotation(axis, degrees):
    a = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = math.radians(degrees)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


def simulator(flags, degrees=0.0):
    sim = Simulator.from_args(flags, dtype=F64)
    with torch.no_grad():
        sim.crystal.U.copy_(torch.as_tensor(rotation((0.3, 0.5, 0.8), degrees)) @ sim.crystal.U)
    return sim


def observed(flags, seed=3, background=2.0):
    with torch.no_grad():
        clean = simulator(flags).render()
    return clean, torch.as_tensor(photon_counts((clean + background).numpy(), seed, 1), dtype=F64)


def misorientation(a, b):
    r = (a.crystal.U @ b.crystal.U.T).double()
    return math.degrees(math.acos(max(-1.0, min(1.0, (float(torch.trace(r)) - 1) / 2))))


# ----------------------------------------------------------------------------- goodness of fit

def test_expected_deviance_matches_poisson_sampling():
    """The deviance's mean and variance under Poisson noise, exact at low
    counts and expanded at high, against draws."""
    g = torch.Generator().manual_seed(0)
    for mu in (0.02, 0.3, 2.0, 12.0, 80.0):
        draws = torch.poisson(torch.full((200000,), mu, dtype=F64), generator=g)
        dev = poisson_deviance(torch.full_like(draws, mu), draws)
        mean, var = (float(t) for t in expected_deviance(torch.tensor([mu], dtype=F64)))
        assert float(dev.mean()) == pytest.approx(mean, abs=4 * float(dev.std()) / math.sqrt(draws.numel()))
        assert float(dev.var()) == pytest.approx(var, rel=0.04)
    high, _ = expected_deviance(torch.tensor([1e4], dtype=F64))
    assert float(high) == pytest.approx(1.0, abs=1e-4)  # chi-square of one degree of freedom


def test_right_answer_is_converged_with_an_acceptable_fit():
    _, data = observed(SMALL)
    res = refine(simulator(SMALL, 0.05), data, ["scale", "background", "orientation"])
    assert res.converged and res.gradient_converged and res.fit_acceptable
    f = res.fit
    assert abs(f["deviance_ratio"] - 1) < 0.1 and abs(f["deviance_z"]) < 3
    assert f["spots"] >= 10 and f["shifted_spots"] <= 1
    assert 0.8 < f["spot_pixel_residual_rms"] < 1.2
    assert f["spot_pixel_residual_expected"] == pytest.approx(1.0, abs=0.01)
    assert res.newton_decrement < 1e-2
    assert not any(w.startswith(("likely", "not converged")) for w in res.warnings)


def test_thirty_degrees_off_on_noise_free_data_is_not_converged():
    clean, _ = observed(SMALL)
    sim = simulator(SMALL, 30.0)
    res = refine(sim, clean, ["scale", "orientation"])
    assert misorientation(sim, simulator(SMALL)) > 5  # it did land in a wrong minimum
    assert not res.converged and not res.fit_acceptable
    assert any(w.startswith("likely a wrong minimum: the deviance is") for w in res.warnings)
    assert res.fit["deviance_ratio"] > 10 and res.fit["shifted_fraction"] > 0.2
    assert "NOT converged" in res.summary() and "likely a wrong minimum" in res.summary()


def test_start_outside_the_basin_is_not_converged():
    """Sharp spots, few of them (96 x 96 pixels), a start 1.5 degrees off:
    the fit ends in a wrong minimum and says so, by the spots the model
    misses (the deviance over the pixels the model picks need not show a
    crystal whose spots it does not predict); from the truth the same data
    converge."""
    truth = simulator(SHARP)
    _, data = observed(SHARP)
    sim = simulator(SHARP, 1.5)
    res = refine(sim, data, ["scale", "background", "orientation"])
    assert misorientation(sim, truth) > 0.05
    assert not res.converged and res.gradient_converged and not res.fit_acceptable
    assert res.fit["shifted_fraction"] > 0.2 and res.fit["shifted_spots"] >= 3
    assert res.stages[-1]["restarts"] == 6  # the steps' restarts did not find the basin either
    assert any(w.startswith("likely a wrong minimum") for w in res.warnings)
    home = simulator(SHARP)
    ok = refine(home, data, ["scale", "background", "orientation"], strategy=None, max_iter=20)
    assert ok.converged and misorientation(home, truth) < 0.01


def test_over_dispersed_data_inflate_the_uncertainties():
    """Counts twice as scattered as Poisson (2 x Poisson(mu / 2)): deviance
    ratio near 2, uncertainties sqrt(2) times those of Poisson data."""
    clean, poisson = observed(SMALL)
    g = torch.Generator().manual_seed(4)
    wide = 2.0 * torch.poisson((clean + 2.0) / 2.0, generator=g)
    sigma = {}
    for name, data in (("poisson", poisson), ("wide", wide)):
        res = refine(simulator(SMALL), data, ["scale", "background", "orientation"], strategy=None, max_iter=20)
        sigma[name] = (res.value("rotation.x").sigma, res.uncertainty_scale, res.fit["deviance_ratio"])
    assert sigma["poisson"][1] < 1.05
    assert 1.6 < sigma["wide"][2] < 2.4 and sigma["wide"][1] == pytest.approx(math.sqrt(sigma["wide"][2]))
    assert sigma["wide"][0] / sigma["poisson"][0] == pytest.approx(math.sqrt(2), rel=0.2)


def test_wavelength_and_cell_together_are_undetermined():
    """On a still, scaling the cell and the wavelength together leaves the
    pattern unchanged: both are listed as undetermined and warned about."""
    _, data = observed(SMALL)
    res = refine(simulator(SMALL), data, ["scale", "background", "cell", "wavelength"], strategy=None, max_iter=10)
    assert "wavelength" in res.undetermined and any(lab.startswith("cell") for lab in res.undetermined)
    assert math.isinf(res.value("wavelength").sigma)
    assert any(w.startswith("undetermined by the data: ") and "wavelength" in w for w in res.warnings)
    # distance and wavelength: nearly degenerate (finite curvature), caught by their correlation
    res = refine(simulator(SMALL), data, ["scale", "background", "distance", "wavelength"], strategy=None,
                 max_iter=10)
    assert {"distance", "wavelength"} <= set(res.undetermined)
    assert any("distance and wavelength are correlated" in w for w in res.warnings)
    assert abs(float(res.correlation[res.labels.index("distance"), res.labels.index("wavelength")])) > 0.99


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("case, message", [
    ("negative", "negative values among the pixels used"),
    ("zero", "no photons"),
    ("empty roi", "no pixel of the data is both valid and in the region of interest"),
    ("nothing valid", "no pixel of the data is both valid and in the region of interest"),
    ("read noise", "read_noise must be finite and >= 0"),
    ("gain", "gain must be finite and > 0"),
])
def test_unusable_input_is_refused(case, message):
    sim = simulator(SMALL)
    shape = (1, 96, 96)
    data, roi, valid, kw = torch.ones(shape, dtype=F64), None, None, {}
    if case == "negative":
        data[0, 3, 4] = -2.0
    elif case == "zero":
        data = torch.zeros(shape, dtype=F64)
    elif case == "empty roi":
        roi = torch.zeros(shape, dtype=torch.bool)
    elif case == "nothing valid":
        valid = torch.zeros(shape, dtype=torch.bool)
    elif case == "read noise":
        kw = dict(loss="gaussian", loss_options=dict(read_noise=-1.0))
    else:
        kw = dict(loss="gaussian", loss_options=dict(gain=0.0))
    with pytest.raises(InputError, match=message) as info:
        refine(sim, data, ["scale"], roi=roi, valid=valid, **kw)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match=message):
        Refiner([Entry(sim, data, roi, valid)], ["scale"], **kw)


# ----------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """truth.expt with its noise-free image (truth.npy); far.expt: the
    crystal turned 30 degrees."""
    d = tmp_path_factory.mktemp("honesty")
    assert nanobragg(SMALL + ["-write_expt", str(d / "truth.expt"), "-floatfile", str(d / "float.bin"),
                              "-intfile", str(d / "int.img"), "-pgmfile", str(d / "image.pgm"),
                              "-noisefile", str(d / "noise.img")]) == 0
    clean, _ = observed(SMALL)
    np.save(d / "truth.npy", clean.numpy())
    doc = json.loads((d / "truth.expt").read_text())
    r = rotation([1.0, 1.0, 0.5], 30.0)
    for key in ("real_space_a", "real_space_b", "real_space_c"):
        doc["crystal"][0][key] = list(r @ np.asarray(doc["crystal"][0][key]))
    (d / "far.expt").write_text(json.dumps(doc))
    return d


PHYSICS = "-default_F 100 -N 12 -oversample 1 -fluence 1e26".split()


def test_command_reports_a_wrong_minimum(experiment, capsys):
    out = experiment / "far"
    rc = tool(["refine", str(experiment / "far.expt"), str(experiment / "truth.npy"), "--out", str(out),
               "--refine", "scale,orientation"] + PHYSICS)
    err = capsys.readouterr().err
    assert rc == 4
    assert "torchbragg refine: warning: likely a wrong minimum" in err
    assert "torchbragg refine: " in err and "evaluation" in err and "loss" in err  # progress
    doc = json.loads((out / "refined.json").read_text())
    assert doc["converged"] is False and doc["fit_acceptable"] is False
    assert doc["fit"]["deviance_ratio"] > 10 and any(w.startswith("likely a wrong minimum") for w in doc["warnings"])
    report = (out / "report.md").read_text()
    assert "converged: NO" in report and "**warning: likely a wrong minimum" in report
    assert "## Goodness of fit" in report
    assert (out / "refined.expt").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--loss", "gaussian", "--read-noise", "-1"], "--read-noise must be >= 0"),
    (["--loss", "gaussian", "--gain", "0"], "--gain must be positive"),
    (["-N", "0.5"], "-N 0.5 is not allowed"),
    (["-Na", "x"], "-Na expects a number"),
])
def test_command_refuses_bad_noise_and_domain_options(experiment, capsys, extra, message):
    out = experiment / "bad"
    rc = tool(["refine", str(experiment / "truth.expt"), str(experiment / "truth.npy"), "--out", str(out)]
              + extra + PHYSICS[:2])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def test_command_refuses_an_image_without_photons(experiment, capsys):
    np.save(experiment / "empty.npy", np.zeros((1, 96, 96), np.float32))
    out = experiment / "empty"
    rc = tool(["refine", str(experiment / "truth.expt"), str(experiment / "empty.npy"), "--out", str(out)] + PHYSICS)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "without photons" in err[0]
    assert not out.exists()


def test_continuous_n_on_the_experiment_path(experiment, tmp_path, capsys):
    """-N 9.69 (what a refinement writes) renders and refines; the nanoBragg
    command keeps the original's integer reading."""
    flags = ["-default_F", "100", "-oversample", "1", "-fluence", "1e26"]
    for n in ("9.69", "10"):
        assert tool(["simulate", str(experiment / "truth.expt"), "--format", "npy", "--quiet",
                     "--out", str(tmp_path / f"n{n}"), "-N", n] + flags) == 0
    a = np.load(tmp_path / "n9.69_00001.npy")
    b = np.load(tmp_path / "n10_00001.npy")
    assert a.max() < b.max() and a.max() / b.max() == pytest.approx((9.69 / 10) ** 6, rel=0.05)
    rc = tool(["refine", str(experiment / "truth.expt"), str(tmp_path / "n9.69_00001.npy"), "--out",
               str(tmp_path / "fit"), "--refine", "scale,N", "--max-iter", "3", "--quiet", "-Na", "9.69", "-Nb", "9.69",
               "-Nc", "9.69"] + flags)
    assert rc in (0, 4)
    doc = json.loads((tmp_path / "fit" / "refined.json").read_text())
    assert {p["name"]: p["start"] for p in doc["parameters"]}["Na"] == pytest.approx(9.69)
    capsys.readouterr()
    assert nanobragg("-cell 60 70 80 90 90 90 -default_F 100 -lambda 1 -distance 80 -detpixels 8 -N 9.69".split()) == 2
    assert "-N expects an integer, got '9.69'" in capsys.readouterr().err


def test_one_image_in_a_wrong_minimum_is_not_diluted_by_the_others():
    """Three stills refined together, one of them started 30 degrees off:
    the joint fit is not converged and the warning names that image."""
    flags = SMALL[:-8] + "-detpixels 64 -pixel 0.375 -oversample 1 -fluence 1e26".split()
    datas, sims = [], []
    for k, turn in enumerate((0.0, 30.0, 0.0)):
        truth = simulator(flags)
        with torch.no_grad():
            truth.crystal.U.copy_(torch.as_tensor(rotation((1.0, k, 0.5), 20.0 * k)) @ truth.crystal.U)
            datas.append(truth.render())
        sim = simulator(flags, turn)
        with torch.no_grad():
            sim.crystal.U.copy_(torch.as_tensor(rotation((1.0, k, 0.5), 20.0 * k)) @ sim.crystal.U)
        sims.append(sim)
    res = Refiner([Entry(s, d) for s, d in zip(sims, datas)], [], ["scale", "orientation"], strategy=None,
                  entry_strategy=None, max_iter=15).run()
    assert not res.converged
    assert res.warnings[0].startswith("likely a wrong minimum") and "image 1: " in res.warnings[0]
    assert "image 0: " not in res.warnings[0] and "image 2: " not in res.warnings[0]
    assert res.image_fit[0]["deviance_ratio"] < 1.05 and res.image_fit[1]["deviance_ratio"] > 10
