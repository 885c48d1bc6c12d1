"""Spot positions of a rendered DIALS still against DIALS's own prediction.

The oracle below is written from first principles, as DIALS predicts stills
(StillsReflectionPredictor plus ParallaxCorrectedPxMmStrategy), with nothing
from torchbragg: s0 = -direction / wavelength; q = A h with A the reciprocal
vectors as columns; q is turned about s0 x q onto the Ewald sphere keeping |q|;
s1 = s0 + q meets the panel plane; the mm position is shifted by the mean
absorption depth of the sensor along s1 and divided by the pixel size.

The render side samples the sensor in depth layers, each a thin copy of the
panel displaced along its normal, weighted per pixel by the fraction of the
beam its slab absorbs (exp(-mu z0 / cos) - exp(-mu z1 / cos)).

Reflections: indexed spots of the still thaum_0500 (tests/data/dials/
thaum_0500_still_predictions.csv) whose reciprocal-lattice point lies within
1.5e-5 / A of the Ewald sphere (so the spot's centroid does not depend on the
spot-shape model), whose 15 x 15 window is clear of the module gaps by 3
pixels, spread over the detector.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from torchbragg.io.dials import Experiment, read_experiments
from torchbragg.flags import parse_args
from torchbragg.models import Detector, Frame, Panel
from torchbragg.build.experiment import build_from_experiment
from golden import DATA

DATA = os.path.join(DATA, "dials")
EXPT = os.path.join(DATA, "thaum_0500_still.expt")
CSV = os.path.join(DATA, "thaum_0500_still_predictions.csv")

REFLECTIONS = [(19, 0, 39), (10, -17, -29), (8, -13, -16), (7, -1, 17), (11, 8, 39), (4, 5, 21), (-2, -3, -16),
               (1, 11, 22), (-5, 1, -17), (-8, 0, -38), (-5, 21, 14), (-11, 11, -23)]
WINDOW = 15
LAYERS = 10
# A crystal whose spots span a few pixels (so 3 x 3 sub-pixels sample them
# finely) with Gaussian spots (no side lobes for the window to cut).
FLAGS = "-N 10 -default_F 100 -oversample 3 -gauss_xtal -dtype float64".split()


# ----------------------------------------------------------------------------- the oracle

class StillsOracle:
    """DIALS's still prediction for the single panel of an experiment file, in numpy."""

    def __init__(self, path):
        with open(path) as fh:
            doc = json.load(fh)
        beam, xtal = doc["beam"][0], doc["crystal"][0]
        panel = doc["detector"][0]["panels"][0]
        hier = doc["detector"][0]["hierarchy"]
        assert hier["origin"] == [0.0, 0.0, 0.0] and hier["fast_axis"] == [1.0, 0.0, 0.0]
        assert hier["slow_axis"] == [0.0, 1.0, 0.0]  # panel frame = lab frame
        direction = np.asarray(beam["direction"], float)
        self.s0 = -direction / np.linalg.norm(direction) / beam["wavelength"]
        real = np.array([xtal[f"real_space_{x}"] for x in "abc"], float)  # rows a, b, c
        self.A = np.linalg.inv(real)  # columns a*, b*, c*: real @ A = identity
        self.fast = np.asarray(panel["fast_axis"], float)
        self.slow = np.asarray(panel["slow_axis"], float)
        self.origin = np.asarray(panel["origin"], float)
        self.D = np.column_stack([self.fast, self.slow, self.origin])
        self.pixel = np.asarray(panel["pixel_size"], float)
        self.mu, self.t0 = panel["mu"], panel["thickness"]
        n = np.cross(self.fast, self.slow)
        self.normal = -n if n @ self.origin < 0 else n  # away from the sample
        self.image_size = tuple(panel["image_size"])

    def excitation(self, hkl):
        """Distance (1/A) of the reciprocal-lattice point from the Ewald sphere."""
        q = self.A @ np.asarray(hkl, float)
        return np.linalg.norm(self.s0 + q) - np.linalg.norm(self.s0)

    def s1(self, hkl):
        q = self.A @ np.asarray(hkl, float)
        k = np.linalg.norm(self.s0)
        unit_s0 = self.s0 / k
        e1 = np.cross(q, unit_s0)
        e1 /= np.linalg.norm(e1)
        c0 = np.cross(unit_s0, e1)  # in the (s0, q) plane, on q's side
        qq = q @ q
        a = 0.5 * qq / k
        r = -a * unit_s0 + np.sqrt(qq - a * a) * c0  # |r| = |q|, |s0 + r| = |s0|
        assert abs(np.linalg.norm(r) - np.sqrt(qq)) < 1e-12
        assert abs(np.linalg.norm(self.s0 + r) - k) < 1e-12
        return self.s0 + r

    def mm(self, hkl):
        v = np.linalg.solve(self.D, self.s1(hkl))
        assert v[2] > 0
        return np.array([v[0] / v[2], v[1] / v[2]])

    def attenuation_length(self, s1):
        cos_t = (s1 / np.linalg.norm(s1)) @ self.normal
        return 1.0 / self.mu - (self.t0 / cos_t + 1.0 / self.mu) * np.exp(-self.mu * self.t0 / cos_t)

    def px(self, hkl, parallax=True, depth=None):
        """Pixel position (fast, slow) of the spot. parallax: DIALS's
        correction; depth (mm along the normal): the position where s1 crosses
        that plane of the sensor instead."""
        x, y = self.mm(hkl)
        s1 = self.s1(hkl)
        u = s1 / np.linalg.norm(s1)
        if depth is not None:
            shift = depth / (u @ self.normal)
            x, y = x + (u @ self.fast) * shift, y + (u @ self.slow) * shift
        elif parallax:
            o = self.attenuation_length(s1)
            x, y = x + (u @ self.fast) * o, y + (u @ self.slow) * o
        return np.array([x, y]) / self.pixel


@pytest.fixture(scope="module")
def oracle():
    return StillsOracle(EXPT)


@pytest.fixture(scope="module")
def experiment():
    return read_experiments(EXPT)[0]


def published():
    """{(h, k, l): (x_px, y_px)} of DIALS's published xyzcal.px."""
    with open(CSV) as fh:
        reader = csv.DictReader(line for line in fh if not line.startswith("#"))
        return {(int(r["h"]), int(r["k"]), int(r["l"])): np.array([float(r["x_px"]), float(r["y_px"])])
                for r in reader}


def windows(oracle):
    """The (fast, slow) first pixel of a window centred on each reflection."""
    half = WINDOW // 2
    return [tuple(int(np.floor(v)) - half for v in oracle.px(h)) for h in REFLECTIONS]


def centroid(img, f0, s0):
    ff, ss = np.meshgrid(np.arange(f0, f0 + img.shape[1]) + 0.5, np.arange(s0, s0 + img.shape[0]) + 0.5)
    total = img.sum()
    assert total > 0
    return np.array([(img * ff).sum() / total, (img * ss).sum() / total])


def border_fraction(img):
    return (img[0].sum() + img[-1].sum() + img[1:-1, 0].sum() + img[1:-1, -1].sum()) / img.sum()


def test_oracle_reproduces_the_published_table(oracle):
    """Sanity of the oracle: it predicts DIALS's published xyzcal.px for all
    indexed spots to the level the table agrees with its own .expt (median
    0.29 px, 90th percentile 0.82 px, max 2.1 px), and the selected reflections
    satisfy the selection rules."""
    table = published()
    assert len(table) > 500
    d = np.array([np.linalg.norm(oracle.px(h) - xy) for h, xy in table.items()])
    print(f"oracle vs published xyzcal.px over {d.size} spots: median {np.median(d):.3f} px, "
          f"90% {np.percentile(d, 90):.3f} px, max {d.max():.3f} px")
    assert np.median(d) < 0.4 and np.percentile(d, 90) < 1.1 and d.max() < 2.5

    with open(EXPT) as fh:
        masks = json.load(fh)["detector"][0]["panels"][0]["mask"]
    nf, ns = oracle.image_size
    good = np.ones((ns, nf), bool)
    for f0, s0, f1, s1 in masks:  # 1-based inclusive rectangles
        good[s0 - 1:s1, f0 - 1:f1] = False
    for h, (f0, s0) in zip(REFLECTIONS, windows(oracle)):
        assert h in table
        assert abs(oracle.excitation(h)) < 1.5e-5
        assert good[s0 - 3:s0 + WINDOW + 3, f0 - 3:f0 + WINDOW + 3].all(), h
    pos = np.array([oracle.px(h) for h in REFLECTIONS])
    # spread: every quadrant around the detector centre holds a reflection
    quadrants = {(x > nf / 2, y > ns / 2) for x, y in pos}
    assert len(quadrants) == 4


def layered_render(experiment, oracle, flags=FLAGS, layers=LAYERS):
    """Every window of every reflection rendered on thin panels at the
    mid-depths of `layers` slabs of the sensor, summed with each slab's
    absorbed fraction per pixel. Returns [(f0, s0, image)]."""
    det = experiment.detector
    with torch.no_grad():
        o, f, s, n = (t[0].double().numpy() for t in det.panel_frames(experiment.beam.incident()))
        pixel = det.panels[0].pixel_size.double().numpy()
        t0, mu = float(det.panels[0].thickness), float(det.panels[0].mu)
    assert np.allclose(n, oracle.normal) and t0 == oracle.t0 and mu == oracle.mu
    edges = np.linspace(0.0, t0, layers + 1)
    mids = 0.5 * (edges[1:] + edges[:-1])
    wins = windows(oracle)
    panels = []
    for f0, s0 in wins:
        corner = o + f0 * pixel[0] * f + s0 * pixel[1] * s
        for z in mids:
            panels.append(Panel(Frame(corner + z * n, f, s, dtype=torch.float64), (WINDOW, WINDOW),
                                tuple(pixel), dtype=torch.float64))
    thin = Experiment(beam=experiment.beam, detector=Detector(panels, dtype=torch.float64),
                      crystal=experiment.crystal)
    sim, _ = build_from_experiment(thin, parse_args(list(flags)))
    assert sim.options.sensor_layers == 0  # thin panels: every photon counted at its panel
    with torch.no_grad():
        img = sim.render().numpy().reshape(len(wins), layers, WINDOW, WINDOW)
    out = []
    for k, (f0, s0) in enumerate(wins):
        ff, ss = np.meshgrid(np.arange(f0, f0 + WINDOW) + 0.5, np.arange(s0, s0 + WINDOW) + 0.5)
        pos = o + (ff * pixel[0])[..., None] * f + (ss * pixel[1])[..., None] * s
        cos_t = (pos / np.linalg.norm(pos, axis=-1, keepdims=True)) @ n
        total = np.zeros((WINDOW, WINDOW))
        for j in range(layers):
            absorbed = np.exp(-mu * edges[j] / cos_t) - np.exp(-mu * edges[j + 1] / cos_t)
            total += absorbed * img[k, j]
        out.append((f0, s0, total))
    return out


@pytest.fixture(scope="module")
def rendered(experiment, oracle):
    return layered_render(experiment, oracle)


def test_centroids_match_dials_parallax_prediction(rendered, oracle):
    """Rendered centroids sit on DIALS's parallax-corrected predictions, and
    measurably off the uncorrected ones wherever the parallax is large."""
    table = published()
    errs, errs_flat, to_table = [], [], []
    for h, (f0, s0, img) in zip(REFLECTIONS, rendered):
        assert border_fraction(img) < 1e-3, h  # the whole spot is inside the window
        c = centroid(img, f0, s0)
        with_p, without_p = oracle.px(h), oracle.px(h, parallax=False)
        errs.append(np.linalg.norm(c - with_p))
        errs_flat.append(np.linalg.norm(c - without_p))
        to_table.append(np.linalg.norm(c - table[h]))
        print(f"{h!s:>15}  centroid ({c[0]:8.3f}, {c[1]:8.3f})  parallax {np.linalg.norm(with_p - without_p):.3f} px"
              f"  |c - oracle| {errs[-1]:.3f}  |c - oracle without parallax| {errs_flat[-1]:.3f}"
              f"  |c - published| {to_table[-1]:.3f}")
    errs, errs_flat, to_table = map(np.array, (errs, errs_flat, to_table))
    parallax = np.array([np.linalg.norm(oracle.px(h) - oracle.px(h, parallax=False)) for h in REFLECTIONS])
    print(f"max |c - oracle| {errs.max():.3f} px; published xyzcal.px: median {np.median(to_table):.3f} px, "
          f"max {to_table.max():.3f} px")
    assert errs.max() < 0.1
    big = parallax > 0.3
    assert big.sum() >= 6
    assert np.all(errs_flat[big] > 0.25)
    assert np.all(errs_flat[big] > 4 * errs[big])
    # The published table agrees with a re-prediction from its own .expt only
    # to a median 0.29 px (90th percentile 0.82 px): a loose bound only.
    assert np.median(to_table) < 1.0


def test_builtin_sensor_layers_sit_along_the_normal(experiment, oracle):
    """The simulator's own layered sensor (-thicksteps n, -parallax original, nanoBragg's rule:
    layers k * t / (n - 1) deep, counted equally, the pixel scaled by the last
    layer's capture fraction) puts the spot where s1 crosses the mean layer
    depth t / 2: its centroid follows that geometry, not DIALS's mean
    absorption depth."""
    h = (19, 0, 39)
    (f0, s0), = [w for hh, w in zip(REFLECTIONS, windows(oracle)) if hh == h]
    cfg = parse_args(FLAGS + ["-thicksteps", "8", "-parallax", "original"])
    sim, _ = build_from_experiment(experiment, cfg)
    assert (sim.options.sensor_layers, sim.options.layer_divisor) == (8, 7)
    sim.options.roi = (f0, f0 + WINDOW - 1, s0, s0 + WINDOW - 1)
    with torch.no_grad():
        img = sim.render_panel(0).numpy()[s0:s0 + WINDOW, f0:f0 + WINDOW]
    assert border_fraction(img) < 1e-3
    c = centroid(img, f0, s0)
    mean_depth = oracle.px(h, depth=0.5 * oracle.t0)
    print(f"{h}: |c - (s1 at depth t/2)| {np.linalg.norm(c - mean_depth):.3f} px, "
          f"|c - DIALS parallax| {np.linalg.norm(c - oracle.px(h)):.3f} px")
    assert np.linalg.norm(c - mean_depth) < 0.1
    assert np.linalg.norm(c - oracle.px(h)) > 0.3


def test_absorbed_layers_give_dials_parallax(experiment, oracle):
    """-absorbed_layers: the simulator's own sensor slabs, each weighted by what
    it absorbs, put the spot where DIALS's parallax correction does."""
    h = (19, 0, 39)
    (f0, s0), = [w for hh, w in zip(REFLECTIONS, windows(oracle)) if hh == h]
    sim, _ = build_from_experiment(experiment, parse_args(FLAGS + ["-absorbed_layers", "-thicksteps", "20"]))
    sim.options.roi = (f0, f0 + WINDOW - 1, s0, s0 + WINDOW - 1)
    with torch.no_grad():
        img = sim.render_panel(0).numpy()[s0:s0 + WINDOW, f0:f0 + WINDOW]
    c = centroid(img, f0, s0)
    assert np.linalg.norm(c - oracle.px(h)) < 0.1
    assert np.linalg.norm(c - oracle.px(h, parallax=False)) > 0.25


def window_centroid(experiment, flags, window):
    f0, s0 = window
    sim, _ = build_from_experiment(experiment, parse_args(list(flags)))
    sim.options.roi = (f0, f0 + WINDOW - 1, s0, s0 + WINDOW - 1)
    with torch.no_grad():
        img = sim.render_panel(0).numpy()[s0:s0 + WINDOW, f0:f0 + WINDOW]
    assert border_fraction(img) < 1e-3
    return centroid(img, f0, s0), sim


def test_default_render_matches_dials_predictions(experiment, oracle):
    """Default flags (plus -thicksteps) on the experiment path: every selected
    spot's centroid within 0.5 px of DIALS's parallax-corrected prediction."""
    errs = []
    for h, window in zip(REFLECTIONS, windows(oracle)):
        c, sim = window_centroid(experiment, FLAGS + ["-thicksteps", "6"], window)
        errs.append(np.linalg.norm(c - oracle.px(h)))
    assert sim.options.absorbed_layers and sim.options.parallax == "physical"
    print("centroid - DIALS prediction (px):", np.round(errs, 3))
    assert max(errs) < 0.5


@pytest.fixture(scope="module")
def thin_sensor(tmp_path_factory):
    """The same still on a sensor that absorbs about a third of the photons
    (mu 0.45 /mm over 1 mm, like silicon at 18 keV): DIALS's depth (mean depth
    times absorbed fraction) is then well short of the physical mean depth."""
    with open(EXPT) as fh:
        doc = json.load(fh)
    doc["detector"][0]["panels"][0]["mu"] = 0.45
    path = tmp_path_factory.mktemp("thin") / "thin.expt"
    path.write_text(json.dumps(doc))
    return read_experiments(str(path))[0], StillsOracle(str(path))


def physical_px(oracle, h):
    """Where s1 crosses the mean depth of the photons the sensor absorbs."""
    s1 = oracle.s1(h)
    cos_t = (s1 / np.linalg.norm(s1)) @ oracle.normal
    absorbed = 1.0 - np.exp(-oracle.mu * oracle.t0 / cos_t)
    u = s1 / np.linalg.norm(s1)
    shift = oracle.attenuation_length(s1) / absorbed
    return (oracle.mm(h) + shift * np.array([u @ oracle.fast, u @ oracle.slow])) / oracle.pixel


@pytest.mark.parametrize("rule", ["physical", "dials"])
def test_parallax_rules_on_a_thin_sensor(thin_sensor, rule):
    """Default (physical): the spot sits at the absorbed photons' mean depth;
    -parallax dials: where DIALS's correction puts it; the two differ by
    several tenths of a pixel at high angle."""
    experiment, oracle = thin_sensor
    h = (19, 0, 39)
    (window,) = [w for hh, w in zip(REFLECTIONS, windows(oracle)) if hh == h]
    flags = FLAGS + ["-thicksteps", "12"] + (["-parallax", "dials"] if rule == "dials" else [])
    c, sim = window_centroid(experiment, flags, window)
    assert sim.options.sensor_layers == (13 if rule == "dials" else 12)
    physical, dials = physical_px(oracle, h), oracle.px(h)
    assert np.linalg.norm(physical - dials) > 0.5
    want, other = (physical, dials) if rule == "physical" else (dials, physical)
    assert np.linalg.norm(c - want) < 0.1
    assert np.linalg.norm(c - other) > 0.4


def test_slab_count_follows_the_attenuation_length(experiment, thin_sensor):
    """Without -thicksteps: slabs at most half an attenuation length thick (2 to 16)."""
    opts = lambda e: build_from_experiment(e, parse_args(list(FLAGS)))[0].options  # noqa: E731
    assert opts(experiment).sensor_layers == 8  # mu t = 3.92: ceil(7.8)
    assert opts(thin_sensor[0]).sensor_layers == 2  # mu t = 0.45


# ----------------------------------------------------------------------------- a real sweep

LCYS = os.path.join(DATA, "..", "lcys_02", "23_integrated.expt")
LCYS_REFL = os.path.join(DATA, "..", "lcys_02", "23_integrated_refl.json")


@pytest.fixture(scope="module")
def lcys_spots():
    """Strong spots of the measured L-cysteine sweep (PILATUS 2M tilted 30
    deg, two-axis goniometer, a beam 2 deg off -z, 0.32 mm silicon at 18 keV
    absorbing a third of the photons) whose prediction lies mid-sweep, with
    DIALS's xyzcal.px (z: frames from the start of image 1)."""
    with open(LCYS_REFL) as fh:
        refl = json.load(fh)["reflections"]
    spots = [r["xyzcal_px"] for r in refl if r["flags"] & 32 and 2.5 < r["xyzcal_px"][2] < 7.5]
    spots = [s for s in spots if 10 < s[0] < 1465 and 10 < s[1] < 1669]
    return np.array(spots[:4])


@pytest.mark.parametrize("rule", ["physical", "dials"])
def test_real_sweep_centroids_match_dials(lcys_spots, rule):
    """Each spot rendered over the ten frames in a window: its (x, y, z)
    centroid against DIALS's prediction. Default flags (physical parallax):
    within 0.5 px; -parallax dials: within 0.1 px (like for like). z (frames,
    steps sampled at their middles) within 0.25 frame."""
    experiment = read_experiments(LCYS)[0]
    flags = "-N 30 -default_F 100 -oversample 2 -phisteps 4 -thicksteps 8".split()
    sim, _ = build_from_experiment(experiment, parse_args(flags + (["-parallax", "dials"] if rule == "dials" else [])))
    assert sim.options.phi_midpoints and sim.options.parallax == rule
    half = 6
    errs = []
    for x, y, z in lcys_spots:
        f0, s0 = int(x) - half, int(y) - half
        sim.options.roi = (f0, f0 + 2 * half, s0, s0 + 2 * half)
        with torch.no_grad():
            stack = np.array([sim.render(n)[0].numpy()[s0:s0 + 2 * half + 1, f0:f0 + 2 * half + 1]
                              for n in range(1, 11)])
        total = stack.sum()
        ff, ss = np.meshgrid(np.arange(f0, f0 + 2 * half + 1) + 0.5, np.arange(s0, s0 + 2 * half + 1) + 0.5)
        c = np.array([(stack * ff).sum(), (stack * ss).sum(), (stack.sum((1, 2)) * (np.arange(10) + 0.5)).sum()])
        errs.append(c / total - [x, y, z])
    errs = np.array(errs)
    xy = np.hypot(errs[:, 0], errs[:, 1])
    print(rule, "xy (px):", np.round(xy, 3), "z (frames):", np.round(errs[:, 2], 3))
    assert xy.max() < (0.5 if rule == "physical" else 0.1)
    assert np.abs(errs[:, 2]).max() < 0.25
    if rule == "physical":  # the physical depth is measurably deeper than DIALS's
        assert np.median(xy) > 0.1
