"""Multi-panel detectors: hierarchies compose to the lab frames dxtbx gives,
survive a write/read round trip, and render the same pixels as one big panel;
moving a panel or a group moves its spots where the geometry says."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from torchbragg.commands import simulate
from torchbragg.io.dials import experiments_from_dict, read_experiments, write_experiments
from torchbragg.flags import parse_args
from torchbragg.build.experiment import build_from_experiment
from golden import DATA

DATA = os.path.join(DATA, "dials")


# ----------------------------------------------------------------------------- CSPAD hierarchy

# Lab frames of the 64-tile CSPAD, composed independently with dxtbx's rule.
CSPAD = {
    0: ((-0.0026865820857509, 0.9999963911318364, 0.0), (0.9999963911318364, 0.0026865820857509, 1.2e-16),
        (-47.9503379494348, -3.9382440911386176, -123.92714613532014)),
    1: ((-0.0026865820857509, 0.9999963911318364, 0.0), (0.9999963911318364, 0.0026865820857509, 1.2e-16),
        (-48.008513842699344, 17.715917761564036, -123.92714613532014)),
    17: ((0.9999871297899162, -0.005073485441535284, 0.0), (-0.005073485441535284, -0.9999871297899162, 1.2e-16),
         (19.335623782545177, 49.28972544968925, -123.92714613532065)),
    63: ((-0.003363645322212696, 0.9999943429290721, 0.0), (0.9999943429290721, 0.003363645322212696, 1.2e-16),
         (-60.30300131708332, -27.42895795549853, -123.92714613531975)),
}


def lab_frames(expt):
    with torch.no_grad():
        return [t.double().numpy() for t in expt.detector.panel_frames(expt.beam.incident())]


def shape_of(detector, group=None):
    """The hierarchy as nested lists: panel indices and sub-lists for groups."""
    group = detector.hierarchy if group is None else group
    return [c if isinstance(c, int) else shape_of(detector, group.groups[c[1]]) for c in group.children_order]


def test_cspad_hierarchy_composes_to_dxtbx_lab_frames(tmp_path):
    expt = read_experiments(os.path.join(DATA, "cspad_64.expt"))[0]
    assert len(expt.detector) == 64
    origin, fast, slow, normal = lab_frames(expt)
    for k, (f, s, o) in CSPAD.items():
        np.testing.assert_allclose(fast[k], f, rtol=0, atol=1e-12)
        np.testing.assert_allclose(slow[k], s, rtol=0, atol=1e-12)
        np.testing.assert_allclose(origin[k], o, rtol=0, atol=1e-9)
    np.testing.assert_allclose(origin[:, 2], -123.927146135, rtol=0, atol=1e-9)
    np.testing.assert_allclose(normal, np.tile([0.0, 0.0, -1.0], (64, 1)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.cross(fast, slow), normal, rtol=0, atol=1e-12)  # already away from the sample
    shape = shape_of(expt.detector)
    assert len(shape) == 4 and all(len(q) == 8 for q in shape) and all(len(s) == 2 for q in shape for s in q)
    assert sorted(p for q in shape for s in q for p in s) == list(range(64))
    assert {p.image_size for p in expt.detector.panels} == {(194, 185)}
    assert {tuple(p.pixel_size.tolist()) for p in expt.detector.panels} == {(0.10992, 0.10992)}

    path = str(tmp_path / "cspad_again.expt")
    write_experiments(path, [expt])
    again = read_experiments(path)[0]
    for a, b in zip(lab_frames(expt), lab_frames(again)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)
    assert shape_of(again.detector) == shape
    assert [p.image_size for p in again.detector.panels] == [p.image_size for p in expt.detector.panels]


# ----------------------------------------------------------------------------- Pilatus 6M as 60 modules

MODULE = (487, 195)  # pixels (fast, slow)
STRIDE = (494, 212)  # module pitch in pixels, gaps included


def pilatus_docs():
    """The thaum still with its one 2463 x 2527 panel, and the same detector as
    a root group (the panel's frame) of 60 modules at their raw offsets. Thin
    sensors and no masks: the geometry is what is compared."""
    with open(os.path.join(DATA, "thaum_0500_still.expt")) as fh:
        doc = json.load(fh)
    panel = doc["detector"][0]["panels"][0]
    gaps = panel["mask"]
    panel.update(mask=[], thickness=0.0, mu=0.0, px_mm_strategy={"type": "SimplePxMmStrategy"})
    one = copy.deepcopy(doc)
    split = copy.deepcopy(doc)
    px = panel["pixel_size"][0]
    modules = []
    for j in range(12):
        for i in range(5):
            m = copy.deepcopy(panel)
            m.update(name=f"module_{j * 5 + i}", origin=[STRIDE[0] * i * px, STRIDE[1] * j * px, 0.0],
                     fast_axis=[1.0, 0.0, 0.0], slow_axis=[0.0, 1.0, 0.0], image_size=list(MODULE),
                     raw_image_offset=[STRIDE[0] * i, STRIDE[1] * j])
            modules.append(m)
    split["detector"][0]["panels"] = modules
    split["detector"][0]["hierarchy"].update(origin=panel["origin"], fast_axis=panel["fast_axis"],
                                             slow_axis=panel["slow_axis"],
                                             children=[{"panel": k} for k in range(60)])
    return one, split, gaps


def test_pilatus_modules_render_the_big_panel_pixels():
    """Every module renders exactly the big panel's pixels at its raw offset,
    and the modules together cover exactly the pixels outside the gaps."""
    one, split, gaps = pilatus_docs()
    cfg = parse_args("-N 5 -default_F 100 -oversample 1 -dtype float64".split())
    big_expt, split_expt = experiments_from_dict(one)[0], experiments_from_dict(split)[0]
    o1, f1, s1, _ = lab_frames(big_expt)
    o2, f2, s2, _ = lab_frames(split_expt)
    px = 0.172
    for k in range(60):
        i, j = k % 5, k // 5
        np.testing.assert_allclose(o2[k], o1[0] + STRIDE[0] * i * px * f1[0] + STRIDE[1] * j * px * s1[0],
                                   rtol=0, atol=1e-9)
        np.testing.assert_allclose(f2[k], f1[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(s2[k], s1[0], rtol=0, atol=1e-12)

    # A band of 40 rows of every module (a fifth of the pixels) keeps the test
    # quick: the modules by ROI, the big panel by a mask of the same pixels.
    band = (90, 129)
    covered = np.zeros((2527, 2463), int)
    in_band = np.zeros((2527, 2463), bool)
    for k in range(60):
        f0, s0 = STRIDE[0] * (k % 5), STRIDE[1] * (k // 5)
        covered[s0:s0 + MODULE[1], f0:f0 + MODULE[0]] += 1
        in_band[s0 + band[0]:s0 + band[1] + 1, f0:f0 + MODULE[0]] = True
    sim_big, _ = build_from_experiment(big_expt, cfg)
    sim_big.detector.panels[0].set_mask(in_band)
    sim_split, _ = build_from_experiment(split_expt, cfg)
    sim_split.options.roi = (0, MODULE[0] - 1, band[0], band[1])
    with torch.no_grad():
        big = sim_big.render()[0].numpy()
        mods = sim_split.render().numpy()
    assert big.shape == (2527, 2463) and mods.shape == (60, 195, 487)
    assert not big[~in_band].any()
    peak = big.max()
    assert peak > 0 and (big > 0.01 * peak).sum() > 20  # spots, not just background
    worst = 0.0
    for k in range(60):
        f0, s0 = STRIDE[0] * (k % 5), STRIDE[1] * (k // 5)
        region = big[s0:s0 + MODULE[1], f0:f0 + MODULE[0]]
        assert not mods[k, :band[0]].any() and not mods[k, band[1] + 1:].any()
        worst = max(worst, np.abs(mods[k] - region).max())
    print(f"max |module - big panel| = {worst:.3g} photons (max pixel {peak:.4g})")
    assert worst <= 1e-5 * peak
    gap = np.zeros(big.shape, bool)
    for f0, s0, fe, se in gaps:  # 1-based inclusive rectangles, as dxtbx writes Pilatus gaps
        gap[s0 - 1:se, f0 - 1:fe] = True
    assert covered.max() == 1  # no pixel in two modules
    np.testing.assert_array_equal(covered == 1, ~gap)


# ----------------------------------------------------------------------------- moving panels and groups

PIXEL = 0.1
FLAGS = "-N 10 -default_F 100 -oversample 3 -gauss_xtal -dtype float64".split()


def _panel(name, origin, size=(128, 128)):
    return {"name": name, "type": "SENSOR_PAD", "fast_axis": [1.0, 0.0, 0.0], "slow_axis": [0.0, 1.0, 0.0],
            "origin": list(origin), "image_size": list(size), "pixel_size": [PIXEL, PIXEL],
            "trusted_range": [-1.0, 1e6], "thickness": 0.0, "mu": 0.0, "material": "", "mask": []}


def _group(origin, children, name=""):
    return {"name": name, "type": "", "origin": list(origin), "fast_axis": [1.0, 0.0, 0.0],
            "slow_axis": [0.0, 1.0, 0.0], "children": children}


CORNER = (-6.45, -6.35, -100.0)  # the beam meets the panel at pixel (64.5, 63.5)


def small_doc(panels, hierarchy):
    """A still at 100 mm: 1 A beam along -z, a 50 A cubic cell with c along the
    beam, so its zero-layer spots sit 20 pixels apart."""
    return {"__id__": "ExperimentList",
            "experiment": [{"__id__": "Experiment", "beam": 0, "detector": 0, "crystal": 0}],
            "beam": [{"direction": [0.0, 0.0, 1.0], "wavelength": 1.0, "polarization_normal": [0.0, 1.0, 0.0],
                      "polarization_fraction": 0.999}],
            "detector": [{"panels": panels, "hierarchy": hierarchy}],
            "crystal": [{"__id__": "crystal", "real_space_a": [50.0, 0.0, 0.0], "real_space_b": [0.0, 50.0, 0.0],
                         "real_space_c": [0.0, 0.0, 50.0], "space_group_hall_symbol": " P 1"}]}


def single_panel_doc():
    return small_doc([_panel("tile", CORNER)], _group((0.0, 0.0, 0.0), [{"panel": 0}]))


def render(sim):
    with torch.no_grad():
        return sim.render().numpy()


def peaks(img, half=6, frac=0.05):
    """Local maxima above frac * max whose (2 half + 1)^2 window is inside the image."""
    out = []
    ns, nf = img.shape
    floor = frac * img.max()
    for s in range(half, ns - half):
        for f in range(half, nf - half):
            v = img[s, f]
            if v > floor and v == img[s - half:s + half + 1, f - half:f + half + 1].max():
                out.append((f, s))
    return out


def window_centroid(img, fc, sc, half=6):
    """Intensity-weighted mean of pixel centres in the window around pixel (fc, sc)."""
    fc, sc = int(math.floor(fc)), int(math.floor(sc))
    ns, nf = img.shape
    assert half <= fc < nf - half and half <= sc < ns - half, (fc, sc)
    w = img[sc - half:sc + half + 1, fc - half:fc + half + 1]
    ff, ss = np.meshgrid(np.arange(fc - half, fc + half + 1) + 0.5, np.arange(sc - half, sc + half + 1) + 0.5)
    return np.array([(w * ff).sum() / w.sum(), (w * ss).sum() / w.sum()])


@pytest.fixture(scope="module")
def tile():
    """(simulator, image, spot centroids) of the single 128 x 128 tile."""
    sim, _ = build_from_experiment(experiments_from_dict(single_panel_doc())[0], parse_args(FLAGS))
    img = render(sim)[0]
    spots = [window_centroid(img, f, s) for f, s in peaks(img, half=10)]
    assert len(spots) >= 9
    return sim, img, spots


def test_translated_tile_moves_its_spots(tile):
    sim, img, spots = tile
    frame = sim.detector.panels[0].frame
    with torch.no_grad():
        _, fast, slow, _ = frame()
        start = frame.origin.clone()
        frame.origin += 0.3 * fast - 0.2 * slow
    try:
        moved = render(sim)[0]
    finally:
        with torch.no_grad():
            frame.origin.copy_(start)
    errs = []
    for c in spots:
        want = c + np.array([-3.0, 2.0])
        if not (8 <= want[0] < 120 and 8 <= want[1] < 120):
            continue
        errs.append(np.abs(window_centroid(moved, *want) - want).max())
    print(f"translation: {len(errs)} spots, max centroid error {max(errs):.2g} px")
    assert len(errs) >= 6 and max(errs) < 0.05


def test_rotated_tile_keeps_spots_at_their_lab_points(tile):
    sim, img, spots = tile
    frame = sim.detector.panels[0].frame
    with torch.no_grad():
        o0, f0, s0, n0 = (t.double().numpy() for t in frame())
        frame.orientation.copy_(torch.as_tensor(math.radians(2.0) * n0 / np.linalg.norm(n0)))
        o1, f1, s1, n1 = (t.double().numpy() for t in frame())
    try:
        assert abs(math.degrees(math.acos(f0 @ f1)) - 2.0) < 1e-9 and np.allclose(n1, n0)
        moved = render(sim)[0]
    finally:
        with torch.no_grad():
            frame.orientation.zero_()
    errs, shift = [], 0.0
    for c in spots:
        lab = o0 + c[0] * PIXEL * f0 + c[1] * PIXEL * s0
        want = np.array([(lab - o1) @ f1, (lab - o1) @ s1]) / PIXEL
        if not (8 <= want[0] < 120 and 8 <= want[1] < 120):
            continue
        errs.append(np.linalg.norm(window_centroid(moved, *want) - want))
        shift = max(shift, np.linalg.norm(want - c))
    print(f"rotation by 2 deg: {len(errs)} spots, max centroid error {max(errs):.3f} px "
          f"(spots moved up to {shift:.2f} px)")
    assert len(errs) >= 6 and max(errs) < 0.1


def quadrant_doc():
    """The tile as four 64 x 64 panels: 0 and 1 (the left column) under a group
    placed at the tile's corner, 2 and 3 directly under the root."""
    x, y, z = CORNER
    h = 64 * PIXEL
    panels = [_panel("left_top", (0.0, 0.0, 0.0), (64, 64)), _panel("left_bottom", (0.0, h, 0.0), (64, 64)),
              _panel("right_top", (x + h, y, z), (64, 64)), _panel("right_bottom", (x + h, y + h, z), (64, 64))]
    left = _group(CORNER, [{"panel": 0}, {"panel": 1}], name="left")
    return small_doc(panels, _group((0.0, 0.0, 0.0), [left, {"panel": 2}, {"panel": 3}]))


def test_group_shift_moves_only_its_panels_spots(tile, tmp_path):
    _, whole, spots = tile
    expt = experiments_from_dict(quadrant_doc())[0]
    sim, _ = build_from_experiment(expt, parse_args(FLAGS))
    quads = render(sim)
    tiles = {0: (0, 0), 1: (0, 64), 2: (64, 0), 3: (64, 64)}  # (fast, slow) offsets in the big tile
    for k, (f0, s0) in tiles.items():
        np.testing.assert_allclose(quads[k], whole[s0:s0 + 64, f0:f0 + 64], rtol=1e-10, atol=1e-12 * whole.max())

    # the command line renders the same file to the same pixels
    path = str(tmp_path / "quadrants.expt")
    write_experiments(path, [expt])
    assert simulate.main([path, "--out", str(tmp_path / "quad"), "--quiet"] + FLAGS) == 0
    np.testing.assert_allclose(np.load(str(tmp_path / "quad_00001.npy")), quads, rtol=1e-5,
                               atol=1e-6 * quads.max())

    group = sim.detector.hierarchy.groups[0]
    with torch.no_grad():
        _, gf, gs, _ = group.frame()
        group.frame.origin += 0.3 * gf - 0.2 * gs
    moved = render(sim)
    np.testing.assert_array_equal(moved[2:], quads[2:])  # panels outside the group stay put
    assert not np.allclose(moved[:2], quads[:2])
    errs = []
    for k in (0, 1):
        f0, s0 = tiles[k]
        for c in spots:
            local = c - np.array([f0, s0])
            want = local + np.array([-3.0, 2.0])
            if not (8 <= local[0] < 56 and 8 <= local[1] < 56 and 8 <= want[0] < 56 and 8 <= want[1] < 56):
                continue
            errs.append(np.abs(window_centroid(moved[k], *want) - want).max())
    print(f"group shift: {len(errs)} spots on the group's panels, max centroid error {max(errs):.2g} px")
    assert len(errs) >= 2 and max(errs) < 0.05
