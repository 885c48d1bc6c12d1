"""`torchbragg refine` (the sweep strategy, its default for the frames of a
rotation scan) on ten measured PILATUS 2M frames of
an L-cysteine rotation sweep (DLS I19-1; tests/data/lcys_02, the CBF files
bzip2-compressed as beamlines archive them) with DIALS's integrated
experiment: from DIALS's model, and from it turned 0.2 degree with its cell
0.3 % off, the fit ends on the same solution (within 0.01 degree and
0.05 %), whose predicted spot centroids match DIALS's observed ones
(xyzobs.px) as well as DIALS's own prediction does (within 1.1 times its
rms); the report says how the pixels are fitted, and the pixel model's
misfit on real spots is reported, not hidden."""

import json
import math

import numpy as np
import pytest
import torch

from torchbragg.build.experiment import build_from_experiment, parse_experiment_flags
from torchbragg.commands.tool import main as tool
from torchbragg.io.dials import read_experiments
from torchbragg.refine.centroids import predict_rotation
from torchbragg.refine.sweep import index_sweep, sweep_spots
from torchbragg.io.images import read_image
from golden import DATA

DATA = DATA / "lcys_02"
REFL = DATA / "23_integrated_refl.json"
PHYSICS = ["-hkl", str(REFL), "-default_F", "0", "-N", "30"]
AXIS = np.array([0.3, 0.8, -0.5]) / np.linalg.norm([0.3, 0.8, -0.5])


def rotation(axis, degrees):
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def experiment_file(folder, turned: bool):
    """DIALS's experiment, its images the compressed frames; `turned`: the
    crystal turned 0.2 degree and its cell lengths 0.3 % off."""
    doc = json.loads((DATA / "23_integrated.expt").read_text())
    doc["imageset"][0]["template"] = str(DATA / "l-cyst_02_#####.cbf.bz2")
    if turned:
        c = doc["crystal"][0]
        r = rotation(AXIS, 0.2)
        for name, f in (("real_space_a", 1.003), ("real_space_b", 0.997), ("real_space_c", 1.003)):
            c[name] = list(r @ np.array(c[name]) * f)
    path = folder / ("turned.expt" if turned else "dials.expt")
    path.write_text(json.dumps(doc))
    return path


def real(expt):
    return read_experiments(str(expt))[0]


def angle_between(a, b) -> float:
    u, _, vt = np.linalg.svd(np.linalg.solve(_real(a), _real(b)))
    return math.degrees(math.acos(min(1.0, (np.trace(u @ vt) - 1) / 2)))


def _real(e):
    sim = build_from_experiment(e, parse_experiment_flags(["-default_F", "1"]), dtype=torch.float64)[0]
    return sim.crystal.real_vectors().detach().numpy()


def strong():
    rows = [r for r in json.loads(REFL.read_text())["reflections"] if r["flags"] & 32]
    return (np.array([r["hkl"] for r in rows]), np.array([r["xyzobs_px"] for r in rows]),
            np.array([r["xyzcal_px"] for r in rows]))


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """Both fits: (rc, refined.json, refined experiment) from DIALS's model and from the turned one."""
    out = {}
    for turned in (False, True):
        folder = tmp_path_factory.mktemp("turned" if turned else "dials")
        rc = tool(["refine", str(experiment_file(folder, turned)), "--images", "1:10", "--out", str(folder / "out"),
                   "--refine", "orientation,cell,scale,radial_background",
                   "--quiet"] + PHYSICS)
        doc = json.loads((folder / "out" / "refined.json").read_text())
        out[turned] = (rc, doc, real(folder / "out" / "refined.expt"), (folder / "out" / "report.md").read_text())
    return out


def test_spots_found_over_the_frames_are_dials_strong_reflections():
    e = real(DATA / "23_integrated.expt")
    frames = [read_image(str(DATA / f"l-cyst_02_{i:05d}.cbf.bz2"), e.detector) for i in range(1, 11)]
    spots = sweep_spots([torch.as_tensor(d) for d, _ in frames], list(range(10)),
                        [torch.as_tensor(v) for _, v in frames])
    sim = build_from_experiment(e, parse_experiment_flags(["-default_F", "1"]), dtype=torch.float64)[0]
    hkl, ok = index_sweep(sim, {}, spots)
    dials_hkl, obs, _ = strong()
    ours = {tuple(h): xyz for h, xyz in zip(hkl[ok], spots.xyz[ok])}
    common = [i for i, h in enumerate(map(tuple, dials_hkl)) if h in ours]
    assert len(common) >= 0.8 * len(dials_hkl)
    d = np.array([ours[tuple(dials_hkl[i])] - obs[i] for i in common])
    # the same centroids as DIALS's spot finder, in x, y (px) and z (frames), for most
    assert np.median(np.linalg.norm(d[:, :2], axis=1)) < 0.2
    assert np.median(np.abs(d[:, 2])) < 0.2


def test_sweep_fit_returns_to_its_solution(fits):
    (_, doc_a, a, _), (_, doc_b, b, _) = fits[False], fits[True]
    assert angle_between(a, b) < 0.01
    assert np.abs(_cell(a) / _cell(b) - 1).max() < 5e-4
    for doc in (doc_a, doc_b):
        kinds = [s["kind"] for s in doc["stages"]]
        assert kinds[0] == "rotation_centroids" and "steps" in kinds
        sweep = doc["stages"][0]["sweeps"][0]
        assert sweep["reflections"] >= 15 and sweep["rms_px"] < 1.0


def _cell(e):
    r = _real(e)
    return np.linalg.norm(r, axis=1)


def test_refined_centroids_match_observed_as_well_as_dials(fits):
    _, _, refined, _ = fits[True]
    sim = build_from_experiment(refined, parse_experiment_flags(["-default_F", "1"]), dtype=torch.float64)[0]
    hkl, obs, cal = strong()
    with torch.no_grad():
        xyz, found = predict_rotation(sim, {}, torch.as_tensor(hkl), torch.zeros(len(hkl), dtype=torch.long),
                                      torch.as_tensor(obs[:, 2]))
    assert bool(found.all())
    ours = np.sqrt((np.linalg.norm(xyz.numpy()[:, :2] - obs[:, :2], axis=1) ** 2).mean())
    dials = np.sqrt((np.linalg.norm(cal[:, :2] - obs[:, :2], axis=1) ** 2).mean())
    assert ours <= 1.1 * dials


def test_report_says_how_the_pixels_fit(fits):
    rc, doc, _, report = fits[False]
    # real spots are not the model's shapes to photon noise: said, with the geometry's own judgement
    assert rc == 4 and doc["converged"] is False
    assert any("does not reproduce the measured pixels" in w and "spot centroids" in w for w in doc["warnings"])
    assert not any(w.startswith("likely a wrong minimum") for w in doc["warnings"])
    assert doc["fit"]["deviance_ratio"] > 1.05
    assert "Spot centroids" in report and "deviance" in report
    # a scale per frame by default, and a background that follows the scattering angle
    names = [p["name"] for img in doc["images"] for p in img["parameters"]]
    assert sum(n == "fluence" for n in names) == 10
    knots = [p["value"] for p in doc["parameters"] if p["group"] == "radial_background"]
    assert len(knots) == 8 and max(knots) > 2 * max(min(knots), 1e-3)  # not one constant
    assert [s["kind"] for s in doc["stages"]] == ["rotation_centroids", "steps"]  # auto: the sweep strategy


def test_predicted_spots_land_on_the_panel_their_ray_meets(tmp_path):
    """The same detector as two panels (its slow halves): every reflection
    predicted on the whole panel is predicted at the same place on the half
    its ray meets."""
    from torchbragg.refine.sweep import predicted_positions, reflections_of
    doc = json.loads((DATA / "23_integrated.expt").read_text())
    det = doc["detector"][0]
    whole = det["panels"][0]
    half = whole["image_size"][1] // 2
    top, bottom = json.loads(json.dumps(whole)), json.loads(json.dumps(whole))
    for p in (top, bottom):
        p.pop("mask", None)
    top["image_size"] = [whole["image_size"][0], half]
    bottom["image_size"] = [whole["image_size"][0], whole["image_size"][1] - half]
    bottom["origin"] = list(np.array(whole["origin"]) + half * whole["pixel_size"][1] * np.array(whole["slow_axis"]))
    det["panels"] = [top, bottom]
    det["hierarchy"]["children"] = [{"panel": 0}, {"panel": 1}]
    (tmp_path / "two.expt").write_text(json.dumps(doc))
    flags = parse_experiment_flags(PHYSICS)
    one = build_from_experiment(real(DATA / "23_integrated.expt"), flags, dtype=torch.float64)[0]
    two = build_from_experiment(real(tmp_path / "two.expt"), flags, dtype=torch.float64)[0]
    hkl = reflections_of(one)
    for (xyz1, p1, f1), (xyz2, p2, f2) in zip(predicted_positions(one, {}, hkl, [0, 5, 9], margin=0),
                                              predicted_positions(two, {}, hkl, [0, 5, 9], margin=0)):
        assert bool(f1.any()) and torch.equal(f1, f2) and bool((p1 == 0).all())
        assert bool((p2[f2] == (xyz1[f2, 1] >= half).long()).all()) and bool((p2[f2] == 1).any())
        moved = xyz2[f2].clone()
        moved[:, 1] += torch.where(p2[f2] == 1, float(half), 0.0)
        torch.testing.assert_close(moved, xyz1[f1], atol=1e-6, rtol=0)
