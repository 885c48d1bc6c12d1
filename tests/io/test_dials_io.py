"""DIALS experiment lists in and out: models, shared models, multi-axis
goniometers, both scan layouts, blocks torchbragg does not model, bad files."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from torchbragg.io.dials import experiments_from_dict, experiments_to_dict, read_experiments, write_experiments
from torchbragg.errors import InputError
from golden import DATA

DATA = DATA / "dials"


def rot(axis, deg):
    """Right-handed rotation about a unit axis (Rodrigues), written out independently."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = math.radians(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


def test_unmodelled_blocks_survive_a_round_trip(tmp_path):
    doc = json.loads((DATA / "thaum_0500_still.expt").read_text())
    el = read_experiments(str(DATA / "thaum_0500_still.expt"))
    write_experiments(str(tmp_path / "out.expt"), el.experiments)
    back = json.loads((tmp_path / "out.expt").read_text())
    assert back["imageset"] == doc["imageset"]
    assert back["profile"] == doc["profile"]
    p0, q0 = doc["detector"][0]["panels"][0], back["detector"][0]["panels"][0]
    for key in ("mask", "px_mm_strategy", "identifier", "type", "trusted_range", "image_size", "material"):
        assert q0[key] == p0[key], key
    np.testing.assert_allclose(q0["origin"], p0["origin"], atol=1e-12)
    np.testing.assert_allclose(back["crystal"][0]["real_space_a"], doc["crystal"][0]["real_space_a"], atol=1e-9)
    assert back["crystal"][0]["space_group_hall_symbol"] == " P 4"
    for key in ("mosaicity", "ML_half_mosaicity_deg", "B_covariance"):  # fields not modelled are kept
        assert back["crystal"][0][key] == doc["crystal"][0][key], key
    for key in ("divergence", "sigma_divergence"):
        assert back["beam"][0][key] == doc["beam"][0][key], key
    np.testing.assert_allclose(back["beam"][0]["direction"], doc["beam"][0]["direction"], atol=1e-12)


def test_legacy_scan_layout_and_its_angles():
    el = read_experiments(str(DATA / "centroid_docs_legacy.expt"))
    doc = json.loads((DATA / "centroid_docs_legacy.expt").read_text())
    scan = el[0].scan
    start, width = doc["scan"][0]["oscillation"]
    assert scan.image_range == tuple(doc["scan"][0]["image_range"])
    first = scan.image_range[0]
    got = scan.angles(first + 3, 4).double().numpy()
    np.testing.assert_allclose(got, start + 3 * width + np.arange(4) * width / 4)
    # written back in the current layout: one start angle per image
    out = experiments_to_dict(el.experiments)["scan"][0]
    n = scan.num_images
    np.testing.assert_allclose(out["properties"]["oscillation"], start + width * np.arange(n))


def test_shared_models_are_shared_and_written_once():
    doc = json.loads((DATA / "centroid_docs_legacy.expt").read_text())
    doc["crystal"].append(copy.deepcopy(doc["crystal"][0]))
    doc["crystal"][1]["real_space_a"] = [x * 1.01 for x in doc["crystal"][1]["real_space_a"]]
    second = dict(doc["experiment"][0], crystal=1)
    doc["experiment"].append(second)
    el = experiments_from_dict(doc)
    assert len(el) == 2
    assert el[0].beam is el[1].beam and el[0].detector is el[1].detector
    assert el[0].crystal is not el[1].crystal
    out = experiments_to_dict(el.experiments)
    assert len(out["beam"]) == len(out["detector"]) == 1 and len(out["crystal"]) == 2
    assert [e["crystal"] for e in out["experiment"]] == [0, 1]


def test_multi_axis_goniometer_composes_like_dxtbx():
    """axes[0] is nearest the crystal; the scan axis turns by the scan angle,
    the others by their angles: R = R(a2, t2) R(a1, phi) R(a0, t0)."""
    doc = json.loads((DATA / "centroid_docs_legacy.expt").read_text())
    axes = [[1.0, 0.0, 0.0], [0.0, 0.64, 0.77], [1.0, 0.0, 0.0]]
    doc["goniometer"] = [{"axes": axes, "angles": [10.0, 0.0, -35.0], "names": ["PHI", "KAPPA", "OMEGA"],
                          "scan_axis": 1}]
    el = experiments_from_dict(doc)
    g = el[0].goniometer
    phi = torch.tensor([3.0, 40.0], dtype=torch.float64)
    want = [rot(axes[2], -35.0) @ rot(axes[1], p) @ rot(axes[0], 10.0) for p in (3.0, 40.0)]
    np.testing.assert_allclose(g.rotation(phi).numpy(), np.stack(want), atol=1e-12)
    out = experiments_to_dict(el.experiments)["goniometer"][0]
    assert out["names"] == ["PHI", "KAPPA", "OMEGA"] and out["scan_axis"] == 1
    np.testing.assert_allclose(out["angles"], [10.0, 0.0, -35.0])


def test_single_axis_goniometer_with_fixed_and_setting_rotations():
    doc = json.loads((DATA / "centroid_docs_legacy.expt").read_text())
    F, S = rot([0, 0, 1], 20.0), rot([0, 1, 0], -15.0)
    doc["goniometer"] = [{"rotation_axis": [1.0, 0.0, 0.0], "fixed_rotation": F.reshape(-1).tolist(),
                          "setting_rotation": S.reshape(-1).tolist()}]
    g = experiments_from_dict(doc)[0].goniometer
    np.testing.assert_allclose(g.rotation(torch.tensor(30.0, dtype=torch.float64)).numpy(),
                               S @ rot([1, 0, 0], 30.0) @ F, atol=1e-12)
    np.testing.assert_allclose(g.rotation_axis.numpy(), S @ [1.0, 0.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("mutate,words", [
    (lambda d: d.pop("experiment"), "not a DIALS experiment list"),
    (lambda d: d["experiment"][0].update(beam=5), "refers to beam 5"),
    (lambda d: d["beam"][0].update(wavelength=-1), "wavelength must be positive"),
    (lambda d: d["beam"][0].pop("wavelength"), "only monochromatic beams"),
    (lambda d: d["beam"][0].update(direction=[0, 0, 0]), "'direction' has zero length"),
    (lambda d: d["detector"][0]["panels"][0].update(image_size=[0, 10]), "'image_size' must be two positive"),
    (lambda d: d["detector"][0]["panels"][0].update(pixel_size=[0.1]), "'pixel_size' must be 2 numbers"),
    (lambda d: d["crystal"][0].update(real_space_b=d["crystal"][0]["real_space_a"]), "coplanar"),
    (lambda d: d["scan"][0].pop("oscillation"), "scan has no oscillation"),
])
def test_bad_experiment_files_are_one_clear_message(mutate, words):
    doc = json.loads((DATA / "centroid_docs_legacy.expt").read_text())
    mutate(doc)
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        experiments_from_dict(doc)


def test_unreadable_files(tmp_path):
    (tmp_path / "junk.expt").write_text("{not json")
    with pytest.raises(InputError, match="is not JSON"):
        read_experiments(str(tmp_path / "junk.expt"))
    with pytest.raises(InputError, match="cannot read experiment file"):
        read_experiments(str(tmp_path / "missing.expt"))
