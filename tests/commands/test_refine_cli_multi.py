"""`torchbragg refine` on several images: a series of stills with a shared
detector (one NeXus file) recovers a distance offset and each crystal's
orientation, and keeps shared models shared in refined.expt; a sweep's
images (files in order) refine one shared crystal; the images are planned
from the files and options given; bad input gives one line and exit status
2 with nothing left behind."""

import json
import math
import re

import numpy as np
import pytest
import torch

from torchbragg.commands.nanobragg import main as nanobragg
from torchbragg.io.dials import read_experiments
from torchbragg.commands.refine import misorientation, parse, plan_shots
from torchbragg.commands.tool import main as tool

# broad spots (small N, long wavelength) on a tiny detector: a smooth loss, cheap renders
GEOMETRY = "-cell 100 110 120 90 90 90 -misset 10 20 30 -lambda 1.5 -distance 50 -detpixels 64 -pixel 0.25".split()
# -water: a few photons of background everywhere, so no pixel's expectation nears zero (a
# Poisson likelihood with a log(0) spike has many false minima)
PHYSICS = "-N 5 -default_F 100 -oversample 1 -fluence 1e28 -water 0.045".split()
SWEEP_PHYSICS = PHYSICS + ["-phisteps", "2"]
SHIFT = 0.5  # mm, the start's detector is this much further than the truth's
TURN = 0.05  # degrees, each start crystal is turned this much


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """64 x 64 renders gain nothing from a second thread, and lose much when
    the machine's other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rotation(axis, degrees):
    a = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = math.radians(degrees)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


def perturbed(doc, shift=0.0, turn=TURN):
    """A copy of an experiment-list document with the detector moved `shift`
    mm along its normal and every crystal turned by `turn` degrees."""
    doc = json.loads(json.dumps(doc))
    for det in doc["detector"]:
        p = det["panels"][0]
        normal = np.cross(p["fast_axis"], p["slow_axis"])
        det["hierarchy"]["origin"] = list(np.asarray(det["hierarchy"]["origin"]) + shift * normal)
    axes = ([1.0, 1.0, 0.5], [-0.5, 1.0, 1.0], [1.0, -0.3, 1.0])
    for c, axis in zip(doc["crystal"], axes * len(doc["crystal"])):
        r = rotation(axis, turn)
        for key in ("real_space_a", "real_space_b", "real_space_c"):
            c[key] = list(r @ np.asarray(c[key]))
    return doc


def write_one(d, name, extra=()):
    rc = nanobragg(GEOMETRY + PHYSICS + list(extra) + ["-nonoise", "-nopgm", "-floatfile", str(d / "x.bin"),
                                                       "-intfile", str(d / "x.img"), "-write_expt", str(d / name)])
    assert rc == 0


@pytest.fixture(scope="module")
def stills(tmp_path_factory):
    """truth.expt: three stills (one beam and detector, a crystal each) and
    their noisy images in truth.nxs; start.expt: the detector 0.5 mm off and
    every crystal turned 0.05 degree."""
    d = tmp_path_factory.mktemp("refine_stills")
    write_one(d, "one.expt")
    assert tool(["simulate", str(d / "one.expt"), "--stills", "3", "--format", "nxs", "--out", str(d / "truth"),
                 "--quiet", "-seed", "5"] + PHYSICS) == 0
    doc = json.loads((d / "truth.expt").read_text())
    assert len(doc["experiment"]) == 3 and len(doc["detector"]) == 1 and len(doc["crystal"]) == 3
    (d / "start.expt").write_text(json.dumps(perturbed(doc, SHIFT)))
    return d


@pytest.fixture(scope="module")
def stills_refined(stills):
    out = stills / "out"
    rc = tool(["refine", str(stills / "start.expt"), str(stills / "truth.nxs"), "--out", str(out),
               "--refine", "scale,orientation,distance", "--max-iter", "20", "--spots", "4", "--quiet"] + PHYSICS)
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """truth.expt: a four-image sweep (0.5 degree images) and its noisy CBF
    images; start.expt: the crystal turned 0.05 degree."""
    d = tmp_path_factory.mktemp("refine_sweep")
    write_one(d, "one.expt", ["-phi", "0", "-osc", "0.5", "-phisteps", "2"])
    doc = json.loads((d / "one.expt").read_text())
    doc["scan"][0]["image_range"] = [1, 4]
    doc["scan"][0]["properties"] = {"oscillation": [0.5 * i for i in range(4)], "exposure_time": [1.0] * 4,
                                    "epochs": [0.0] * 4}
    (d / "sweep.expt").write_text(json.dumps(doc))
    assert tool(["simulate", str(d / "sweep.expt"), "--format", "cbf", "--out", str(d / "truth"), "--quiet",
                 "-seed", "5"] + SWEEP_PHYSICS) == 0
    (d / "start.expt").write_text(json.dumps(perturbed(json.loads((d / "truth.expt").read_text()))))
    return d


def crystals(path):
    return [e.crystal.real_vectors().numpy() for e in read_experiments(str(path))]


# ----------------------------------------------------------------------------- stills

def test_stills_recover_shared_distance_and_orientations(stills, stills_refined):
    doc = json.loads((stills_refined / "refined.json").read_text())
    assert doc["mode"] == "stills" and doc["experiments"] == [0, 1, 2]
    assert doc["shared_groups"] == ["distance"] and doc["per_image_groups"] == ["scale", "orientation"]
    (d,) = doc["parameters"]
    assert d["name"] == "distance_shift" and d["unit"] == "mm" and d["start"] == 0.0
    assert d["value"] == pytest.approx(-SHIFT, abs=0.05)
    assert 0 < d["sigma"] < 0.05
    # refined.expt: the one detector is back at the truth's distance, the crystals at their orientations
    out = json.loads((stills_refined / "refined.expt").read_text())
    assert (len(out["detector"]), len(out["beam"]), len(out["crystal"])) == (1, 1, 3)
    assert [e["detector"] for e in out["experiment"]] == [0, 0, 0]
    assert [e["crystal"] for e in out["experiment"]] == [0, 1, 2]
    origin = np.asarray(out["detector"][0]["hierarchy"]["origin"])
    assert np.linalg.norm(origin) < 0.05  # the truth's root frame sits at the lab origin
    truth, start, final = crystals(stills / "truth.expt"), crystals(stills / "start.expt"), \
        crystals(stills_refined / "refined.expt")
    for t, s, f in zip(truth, start, final):
        assert misorientation(t, s) == pytest.approx(TURN, abs=1e-6)
        assert misorientation(t, f) < TURN / 2.5
    assert out["history"][-1].startswith("torchbragg refine")


def test_stills_per_image_sections(stills_refined):
    doc = json.loads((stills_refined / "refined.json").read_text())
    assert len(doc["images"]) == 3
    for k, im in enumerate(doc["images"]):
        assert im["experiment"] == k and im["file_index"] == k and im["image"] is None
        assert im["image_file"].endswith("truth.nxs")
        assert {p["group"] for p in im["parameters"]} == {"scale", "orientation"}
        for p in im["parameters"]:
            assert set(p) >= {"start", "value", "sigma", "unit"} and p["sigma"] > 0
        assert im["loss_history"] and im["loss"] == pytest.approx(im["loss_history"][-1])
        assert isinstance(im["converged"], bool) and im["pixels"] > 0
        assert im["crystal"]["rotation_from_start_deg"] > 0
    assert doc["loss"] == pytest.approx(sum(im["loss"] for im in doc["images"]), rel=1e-6)
    assert doc["loss_history"] and isinstance(doc["converged"], bool)
    n = len(doc["labels"])
    assert n == 1 + 3 * 4 and np.asarray(doc["correlation"]).shape == (n, n)


def test_stills_report_covers_every_image(stills_refined):
    text = (stills_refined / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(figures) == {"spots_image0.png", "spots_image1.png", "spots_image2.png", "loss.png",
                            "correlation.png"}
    for name in figures:
        assert (stills_refined / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| distance | distance_shift |" in text
    for k in range(3):
        assert f"| {k} | orientation | rotation.x |" in text and f"### Image {k} " in text


# ----------------------------------------------------------------------------- sweep

def test_sweep_refines_one_crystal_over_its_images(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    files = [str(sweep / f"truth_{k:05d}.cbf") for k in (1, 2, 3)]
    rc = tool(["refine", str(sweep / "start.expt")] + files + ["--out", str(out), "--refine", "scale,orientation",
                                                              "--max-iter", "8", "--spots", "4"] + SWEEP_PHYSICS)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "scan image 3" in printed and "rotation.x" in printed
    doc = json.loads((out / "refined.json").read_text())
    assert doc["mode"] == "sweep" and doc["per_image_groups"] == ["scale"]  # a scale per frame by default
    assert [im["image"] for im in doc["images"]] == [1, 2, 3]
    assert all([p["group"] for p in im["parameters"]] == ["scale"] and im["loss_history"] for im in doc["images"])
    assert {p["group"] for p in doc["parameters"]} == {"orientation"}
    (truth,), (start,), (final,) = crystals(sweep / "truth.expt"), crystals(sweep / "start.expt"), \
        crystals(out / "refined.expt")
    assert misorientation(truth, start) == pytest.approx(TURN, abs=1e-6)
    assert misorientation(truth, final) < 0.01
    assert doc["crystal"]["rotation_from_start_deg"] == pytest.approx(misorientation(start, final), abs=1e-4)
    expt = json.loads((out / "refined.expt").read_text())
    assert len(expt["crystal"]) == 1 and expt["scan"][0]["image_range"] == [1, 4]


def test_sweep_with_a_scale_per_image_and_the_still_strategy(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    files = [str(sweep / f"truth_{k:05d}.cbf") for k in (1, 2, 3)]
    rc = tool(["refine", str(sweep / "start.expt")] + files + ["--out", str(out), "--refine", "scale,orientation",
                                                              "--per-image", "scale", "--strategy", "still",
                                                              "--spots", "4"] + SWEEP_PHYSICS)
    capsys.readouterr()
    assert rc == 0
    doc = json.loads((out / "refined.json").read_text())
    assert doc["per_image_groups"] == ["scale"]
    assert all([p["group"] for p in im["parameters"]] == ["scale"] for im in doc["images"])
    (truth,), (final,) = crystals(sweep / "truth.expt"), crystals(out / "refined.expt")
    assert misorientation(truth, final) < 0.01
    # the frames were made with one fluence: their refined scales agree within their uncertainties
    scales = [im["parameters"][0] for im in doc["images"]]
    spread = max(p["value"] for p in scales) - min(p["value"] for p in scales)
    assert spread < 4 * max(p["sigma"] for p in scales)
    # the refined model's spot centroids against the observed ones, per image, in the document and the report
    rows = doc["centroids"]
    assert [r["image"] for r in rows] == [1, 2, 3]
    assert all(r["spots"] >= 3 and r["rms_px"] < 1.0 and r["rms_frames"] is not None for r in rows), rows
    assert "## Spot centroids" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------- planning

def plan(args, expt):
    opts = parse([str(expt)] + args + ["--out", "unused"])
    return plan_shots(opts, read_experiments(str(expt)))


def test_plan_stills(stills):
    expt = stills / "truth.expt"
    shots = plan(["a.cbf", "b.cbf", "c.cbf"], expt)
    assert [(s.experiment, s.path, s.index, s.number) for s in shots] == [(0, "a.cbf", 0, None), (1, "b.cbf", 0, None),
                                                                       (2, "c.cbf", 0, None)]
    shots = plan(["all.nxs", "--experiment", "2,0"], expt)
    assert [(s.experiment, s.path, s.index) for s in shots] == [(2, "all.nxs", 2), (0, "all.nxs", 0)]
    (one,) = plan(["b.cbf", "--experiment", "1"], expt)
    assert (one.experiment, one.path, one.index, one.number) == (1, "b.cbf", 0, None)
    (one,) = plan(["all.nxs", "--experiment", "2"], expt)
    assert (one.experiment, one.path, one.index, one.number) == (2, "all.nxs", 2, None)


def test_plan_sweep(sweep):
    expt = sweep / "truth.expt"
    assert [(s.path, s.index, s.number) for s in plan(["s.nxs", "--images", "2:4"], expt)] == \
        [("s.nxs", 1, 2), ("s.nxs", 2, 3), ("s.nxs", 3, 4)]
    assert [(s.path, s.number) for s in plan(["a.cbf", "b.cbf"], expt)] == [("a.cbf", 1), ("b.cbf", 2)]
    assert [(s.path, s.number) for s in plan(["a.cbf", "b.cbf", "c.cbf", "--images", "2:3"], expt)] == \
        [("b.cbf", 2), ("c.cbf", 3)]
    assert [(s.path, s.number) for s in plan(["a.cbf", "b.cbf", "--image", "2"], expt)] == [("b.cbf", 2)]
    assert [(s.path, s.index, s.number) for s in plan(["s.nxs"], expt)] == [("s.nxs", 0, 1)]


# ----------------------------------------------------------------------------- bad input

def _shared_crystal(stills, tmp):
    doc = json.loads((stills / "truth.expt").read_text())
    for e in doc["experiment"]:
        e["crystal"] = 0
    (tmp / "shared.expt").write_text(json.dumps(doc))
    return tmp / "shared.expt"


@pytest.mark.parametrize("case, pattern", [
    ("stills_two_files", "3 experiments are refined but 2 image files were given"),
    ("stills_one_file", "3 experiments are refined but one image file was given"),
    ("stills_image", "--image and --images choose images of one sweep"),
    ("stills_shared_crystal", "experiments 0 and 1 share one crystal"),
    ("stills_nexus_short", r"holds images 1\.\.3, not image 4"),
    ("stills_no_mosaic", "the mosaic group needs a mosaic spread above zero"),
    ("experiment_range", r"--experiment 5: the file holds experiments 0\.\.2"),
    ("experiment_text", "--experiment expects an integer"),
    ("sweep_range", "--images 3:9 is outside the scan's images 1:4"),
    ("sweep_image", r"--image 7 is outside the scan's images 1\.\.4"),
    ("sweep_too_many", r"5 image files were given for experiment 0, but the scan has 4 images \(1\.\.4\)"),
    ("sweep_one_file", "--images 1:3 asks for 3 images but .*truth_00001.cbf holds one"),
    ("sweep_both", "give --image N .* or --images FIRST:LAST .*, not both"),
])
def test_bad_input(stills, sweep, tmp_path, capsys, case, pattern):
    cbf = [str(sweep / f"truth_{k:05d}.cbf") for k in (1, 2, 3, 4)]
    nxs = str(stills / "truth.nxs")
    expt, images, extra, physics = str(stills / "truth.expt"), [nxs], [], PHYSICS
    if case.startswith("sweep"):
        expt, images, physics = str(sweep / "truth.expt"), cbf[:1], SWEEP_PHYSICS
    if case == "stills_two_files":
        images = cbf[:2]
    elif case == "stills_one_file":
        images = cbf[:1]
    elif case == "stills_image":
        extra = ["--image", "1"]
    elif case == "stills_shared_crystal":
        expt = str(_shared_crystal(stills, tmp_path))
    elif case == "stills_nexus_short":
        doc = json.loads((stills / "truth.expt").read_text())
        doc["experiment"].append(dict(doc["experiment"][0], crystal=3))
        doc["crystal"].append(doc["crystal"][0])
        (tmp_path / "four.expt").write_text(json.dumps(doc))
        expt = str(tmp_path / "four.expt")
    elif case == "stills_no_mosaic":
        extra = ["--refine", "mosaic,distance"]
    elif case == "experiment_range":
        extra = ["--experiment", "1,5"]
    elif case == "experiment_text":
        extra = ["--experiment", "first"]
    elif case == "sweep_range":
        extra = ["--images", "3:9"]
    elif case == "sweep_image":
        extra = ["--image", "7"]
    elif case == "sweep_too_many":
        images = cbf + cbf[:1]
    elif case == "sweep_one_file":
        extra = ["--images", "1:3"]
    elif case == "sweep_both":
        extra = ["--image", "1", "--images", "1:2"]
    out = tmp_path / "out"
    capsys.readouterr()
    rc = tool(["refine", expt] + images + ["--out", str(out)] + extra + physics)
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("torchbragg refine: error: ") and re.search(pattern, err), err
    assert not out.exists()


def test_sweep_strategy_leaves_geometry_loose_when_the_centroids_do(sweep, tmp_path, capsys):
    """Three 0.5 degree frames: most spots are cut by the sweep's ends, so
    their centroids in angle pin the orientation down poorly; the sweep
    strategy does not hold it then (the pixels refine it), and auto takes
    the L-BFGS stages for so few frames."""
    out = tmp_path / "out"
    files = [str(sweep / f"truth_{k:05d}.cbf") for k in (1, 2, 3)]
    rc = tool(["refine", str(sweep / "start.expt")] + files + ["--out", str(out), "--refine", "scale,orientation",
                                                              "--strategy", "sweep", "--spots", "4"] + SWEEP_PHYSICS)
    capsys.readouterr()
    doc = json.loads((out / "refined.json").read_text())
    first, steps = doc["stages"][0], doc["stages"][-1]
    assert first["kind"] == "rotation_centroids" and first["sweeps"][0]["held"] is False
    assert max(first["sweeps"][0]["sigma"]) > 3.0
    assert steps["kind"] == "steps" and "orientation" in steps["groups"]
    assert rc in (0, 4) and (rc == 0) == doc["converged"]
    assert not any("geometry comes from the observed spot centroids" in w for w in doc["warnings"])
    rc = tool(["refine", str(sweep / "start.expt")] + files + ["--out", str(tmp_path / "auto"), "--refine",
                                                              "scale,orientation", "--max-iter", "8", "--spots", "4",
                                                              "--quiet"] + SWEEP_PHYSICS)
    doc = json.loads((tmp_path / "auto" / "refined.json").read_text())
    assert all(s.get("kind") in (None, "lbfgs") for s in doc["stages"])
