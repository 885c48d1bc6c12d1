"""`torchbragg refine`: a perturbed experiment refined against a noisy
simulated still moves toward the truth and writes its outputs; bad input
gives one line and exit status 2 with nothing left behind; each image
format reads back what was written."""

import json
import math
import os
import re

import numpy as np
import pytest

from torchbragg.commands.nanobragg import main as nanobragg
from torchbragg.io.dials import read_experiments
from torchbragg.commands.refine import misorientation
from torchbragg.io.images import read_image
from torchbragg.commands.tool import main as tool

SIM = ("-cell 60 70 80 90 90 90 -misset 10 20 30 -default_F 100 -N 12 -lambda 1 -distance 80 "
       "-detpixels 128 -pixel 0.2 -oversample 1 -fluence 1e26").split()
PHYSICS = "-default_F 100 -N 12 -oversample 1 -fluence 1e26".split()


def rotation(axis, degrees):
    a = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = math.radians(degrees)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """truth.expt and its noise image (SMV, ADC offset 40); start.expt: the
    crystal turned by 0.05 degree and its cell scaled by 0.2 %."""
    d = tmp_path_factory.mktemp("refine_cli")
    rc = nanobragg(SIM + ["-seed", "3", "-write_expt", str(d / "truth.expt"), "-noisefile", str(d / "noise.img"),
                          "-intfile", str(d / "int.img"), "-floatfile", str(d / "float.bin"),
                          "-pgmfile", str(d / "image.pgm")])
    assert rc == 0
    doc = json.loads((d / "truth.expt").read_text())
    r = rotation([1.0, 1.0, 0.5], 0.05)
    for key in ("real_space_a", "real_space_b", "real_space_c"):
        doc["crystal"][0][key] = list(r @ np.asarray(doc["crystal"][0][key]) * 1.002)
    (d / "start.expt").write_text(json.dumps(doc))
    return d


@pytest.fixture(scope="module")
def refined(case):
    out = case / "out"
    rc = tool(["refine", str(case / "start.expt"), str(case / "noise.img"), "--adc-offset", "40", "--out", str(out),
               "--quiet"] + PHYSICS)
    assert rc == 0
    return out


def real(path):
    return read_experiments(str(path))[0].crystal.real_vectors().numpy()


def test_refine_moves_toward_the_truth(case, refined):
    for name in ("refined.expt", "refined.json", "report.md"):
        assert (refined / name).is_file()
    truth, start, final = real(case / "truth.expt"), real(case / "start.expt"), real(refined / "refined.expt")
    before, after = misorientation(truth, start), misorientation(truth, final)
    assert before == pytest.approx(0.05, abs=1e-6)
    assert after < before / 2.5
    doc = json.loads((refined / "refined.json").read_text())
    cell = {p["name"]: p for p in doc["parameters"] if p["group"] == "cell"}
    for name, true in (("a", 60.0), ("b", 70.0), ("c", 80.0)):
        p = cell[name]
        assert p["start"] == pytest.approx(true * 1.002, rel=1e-6)
        assert abs(p["value"] - true) < abs(p["start"] - true) / 2.5
        assert p["unit"] == "A" and p["sigma"] > 0
    assert np.linalg.norm(final, axis=1) == pytest.approx([p["value"] for p in (cell["a"], cell["b"], cell["c"])])
    assert {p["group"] for p in doc["parameters"]} == {"scale", "background", "orientation", "cell", "N"}
    assert isinstance(doc["converged"], bool) and isinstance(doc["undetermined"], list)
    assert doc["loss_history"] and doc["renders"] > 0
    assert doc["loss"] == pytest.approx(doc["loss_history"][-1])
    assert doc["seconds"] > 0 and doc["image"] == 1
    # the rest of the file is kept
    start_doc = json.loads((case / "start.expt").read_text())
    out_doc = json.loads((refined / "refined.expt").read_text())
    assert out_doc["imageset"] == start_doc["imageset"]
    panel, start_panel = out_doc["detector"][0]["panels"][0], start_doc["detector"][0]["panels"][0]
    assert panel["origin"] == pytest.approx(start_panel["origin"])
    assert out_doc["history"][-1].startswith("torchbragg refine")


def test_report_references_figures(refined):
    text = (refined / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(figures) == {"spots.png", "loss.png", "correlation.png"}
    for name in figures:
        assert (refined / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cell | a |" in text
    assert "Undetermined by these data" in text or "Every refined parameter is determined" in text
    assert not [n for n in os.listdir(refined) if n.startswith(".")]  # no temporary left


def _no_crystal(case, tmp):
    doc = json.loads((case / "truth.expt").read_text())
    del doc["experiment"][0]["crystal"]
    p = tmp / "nocrystal.expt"
    p.write_text(json.dumps(doc))
    return [str(p), str(case / "noise.img")]


def _wrong_shape(case, tmp):
    np.save(tmp / "small.npy", np.zeros((1, 64, 64), np.float32))
    return [str(case / "truth.expt"), str(tmp / "small.npy")]


def _bad_folder(case, tmp):
    (tmp / "plain").write_text("x")
    return None


@pytest.mark.parametrize("kind, pattern", [
    ("missing", "cannot read image .*missing.img: no such file"),
    ("unreadable", "not an SMV image"),
    ("shape", r"does not match the detector"),
    ("group", "unknown parameter group 'orientaton'"),
    ("crystal", "has no crystal"),
    ("folder", "cannot make the output folder"),
])
def test_bad_input(case, tmp_path, capsys, kind, pattern):
    expt, image = str(case / "truth.expt"), str(case / "noise.img")
    out = tmp_path / "out"
    extra = []
    if kind == "missing":
        image = str(tmp_path / "missing.img")
    elif kind == "unreadable":
        (tmp_path / "junk.img").write_bytes(b"not an image")
        image = str(tmp_path / "junk.img")
    elif kind == "shape":
        expt, image = _wrong_shape(case, tmp_path)
    elif kind == "group":
        extra = ["--refine", "scale,orientaton"]
    elif kind == "crystal":
        expt, image = _no_crystal(case, tmp_path)
    elif kind == "folder":
        _bad_folder(case, tmp_path)
        out = tmp_path / "plain" / "out"
    capsys.readouterr()
    rc = tool(["refine", expt, image, "--out", str(out), "--adc-offset", "40"] + extra + PHYSICS)
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("torchbragg refine: error: ") and re.search(pattern, err), err
    assert not out.exists()


# ----------------------------------------------------------------------------- image formats

@pytest.fixture(scope="module")
def experiment(case):
    return read_experiments(str(case / "truth.expt"))[0]


def counts():
    rng = np.random.default_rng(0)
    c = rng.poisson(3.0, size=(1, 128, 128)).astype(np.int32)
    c[0, 5, 7] = 1000
    return c


def test_read_npy(tmp_path, experiment):
    photons = counts().astype(np.float32) + 0.25
    np.save(tmp_path / "a.npy", photons)
    data, valid = read_image(str(tmp_path / "a.npy"), experiment.detector)
    assert data.shape == (1, 128, 128) and valid.all()
    np.testing.assert_array_equal(data, photons.astype(np.float64))
    np.save(tmp_path / "b.npy", photons[0])  # (slow, fast) for one panel
    np.testing.assert_array_equal(read_image(str(tmp_path / "b.npy"), experiment.detector)[0], data)


def test_read_smv(tmp_path, experiment):
    from torchbragg.dataset import Shot, smv_geometry
    from torchbragg.io.smv import write_smv
    c = counts()
    raw = (c[0] + 40).astype(np.uint16)
    raw[9, 9] = 10  # below the offset: left out
    write_smv(str(tmp_path / "a.img"), raw, smv_geometry(experiment, Shot(1, 0, None)))
    data, valid = read_image(str(tmp_path / "a.img"), experiment.detector, adc_offset=40)
    expect = c[0].astype(np.float64)
    assert not valid[0, 9, 9] and data[0, 9, 9] == 0
    valid_ref = np.ones_like(valid)
    valid_ref[0, 9, 9] = False
    np.testing.assert_array_equal(valid, valid_ref)
    np.testing.assert_array_equal(data[valid], expect[None][valid])


def test_read_cbf(tmp_path, experiment):
    from torchbragg.io.cbf import write_minicbf
    c = counts()
    c[0, 20:22, :] = -1  # a gap
    write_minicbf(str(tmp_path / "a.cbf"), c, experiment, 1)
    data, valid = read_image(str(tmp_path / "a.cbf"), experiment.detector)
    assert (~valid).sum() == 2 * 128 and not valid[0, 20:22].any()
    np.testing.assert_array_equal(data[valid], c[valid].astype(np.float64))


def test_read_nexus(tmp_path, experiment):
    from torchbragg.io.dials import Experiment
    from torchbragg.io.nexus import NXmxWriter
    first, second = counts(), counts() * 2
    still = Experiment(beam=experiment.beam, detector=experiment.detector, crystal=experiment.crystal)
    with NXmxWriter(str(tmp_path / "a.nxs"), still, 2) as w:
        w.write(0, first)
        w.write(1, second)
    data, valid = read_image(str(tmp_path / "a.nxs"), experiment.detector, index=1)
    assert valid.all()
    np.testing.assert_array_equal(data, second.astype(np.float64))
    data, _ = read_image(str(tmp_path / "a.nxs"), experiment.detector, index=0)
    np.testing.assert_array_equal(data, first.astype(np.float64))


def test_refine_detector_and_wavelength_write_back(case, tmp_path):
    out = tmp_path / "det"
    rc = tool(["refine", str(case / "start.expt"), str(case / "noise.img"), "--adc-offset", "40", "--out", str(out),
               "--refine", "scale,background,distance,wavelength", "--loss", "gaussian", "--read-noise", "1",
               "--max-iter", "5", "--quiet"] + PHYSICS)
    assert rc == 4  # five iterations, distance and wavelength degenerate: written, but not trusted
    doc = json.loads((out / "refined.json").read_text())
    assert not doc["converged"] and {"distance", "wavelength"} <= set(doc["undetermined"])
    values = {p["name"]: p["value"] for p in doc["parameters"]}
    expt = json.loads((out / "refined.expt").read_text())
    root = expt["detector"][0]["hierarchy"]
    panel = expt["detector"][0]["panels"][0]
    normal = np.cross(panel["fast_axis"], panel["slow_axis"])
    assert abs(float(np.dot(root["origin"], normal))) == pytest.approx(abs(values["distance_shift"]), rel=1e-5,
                                                                       abs=1e-9)
    assert expt["beam"][0]["wavelength"] == pytest.approx(values["wavelength"], rel=1e-6)
