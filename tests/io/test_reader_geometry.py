"""What a reader gets from every file the writers produce, derived here in
numpy from the NXmx definition (transformations: translations and rotations
with offsets, composed along depends_on chains; McStas to DIALS's imgCIF
frame is (x, y, z) -> (-x, y, -z); the beam along McStas +z) and from the
Pilatus mini-header conventions dxtbx uses (one panel perpendicular to the
beam, fast +x, slow -y, origin (-Beam_x px, Beam_y py, -distance), rotation
about +x, Exposure_period as the exposure time, negative pixels untrusted),
checked against the truth experiment written beside the images: panel
corners, scan angles, image numbers, exposure, mask. The files are also read
with fabio (CBF) and nxmx (NeXus)."""

from __future__ import annotations

import io
import json
import math
import os
import re
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")
nxmx = pytest.importorskip("nxmx")
fabio = pytest.importorskip("fabio")
import hdf5plugin  # noqa: E402,F401  (the bitshuffle filter)

from torchbragg.io.cbf import pilatus_header, write_minicbf  # noqa: E402
from torchbragg.io.dials import read_experiments  # noqa: E402
from torchbragg.io.frames import as_written  # noqa: E402
from torchbragg.io.nexus import NXmxWriter  # noqa: E402
from experiments import experiment, parse_minicbf_header as parse_header

MCSTAS_TO_IMGCIF = np.diag([-1.0, 1.0, -1.0])


# ----------------------------------------------------------------------------- experiments

def unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def turn(axis, deg):
    a, t = unit(axis), math.radians(deg)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


def panel(origin, fast=(1.0, 0.0, 0.0), slow=(0.0, -1.0, 0.0), size=(40, 30), pixel=0.172, **kw):
    d = {"name": kw.pop("name", "p"), "type": "SENSOR_PAD", "origin": list(map(float, origin)),
         "fast_axis": list(map(float, fast)), "slow_axis": list(map(float, slow)), "image_size": list(size),
         "pixel_size": [pixel, pixel], "trusted_range": [-1.0, 65535.0], "thickness": 0.45, "material": "Si",
         "mu": 3.9}
    d.update(kw)
    return d


SCAN = {"image_range": [1, 6], "properties": {"oscillation": [10.0 + 0.25 * i for i in range(6)],
                                              "exposure_time": [0.1] * 6,
                                              "epochs": [1.7e9 + 0.125 * i for i in range(6)]}}
X_AXIS = {"rotation_axis": [1.0, 0.0, 0.0]}


def single():
    return experiment({"panels": [panel((-3.1, 2.6, -120.0), mask=[[3, 1, 4, 30]])]}, X_AXIS, SCAN)


def tilted(deg):
    return experiment({"panels": [panel((-3.1, 2.6, -120.0), fast=(math.cos(math.radians(deg)), 0.0,
                                                                   math.sin(math.radians(deg))))]}, X_AXIS, SCAN)


def tiled():
    """Three modules of one plane at raw offsets, with gaps between them."""
    return experiment({"panels": [panel((-3.4, 2.6 - 35 * j * 0.172, -120.0), name=f"m{j}", raw_image_offset=[0, 35 * j])
                                  for j in range(3)]}, X_AXIS, SCAN)


def hierarchical():
    """Two quadrant groups, each turned and tilted, of two panels each, under a tilted root."""
    kids, panels = [], []
    for g in range(2):
        members = []
        for k in range(2):
            i = 2 * g + k
            panels.append(panel((k * 8.0, 0.5 * k, 0.3 * k), fast=(math.cos(0.01 * i), math.sin(0.01 * i), 0.0),
                                slow=(-math.sin(0.01 * i), math.cos(0.01 * i), 0.0), size=(40, 30), name=f"p{i}"))
            members.append({"panel": i})
        r = turn([0.1, 0.3, 1.0], 20.0 + 70.0 * g)
        kids.append({"name": f"quadrant{g}", "origin": [-9.0 + 14.0 * g, 6.0 - 3.0 * g, 1.5 * g],
                     "fast_axis": list(r[:, 0]), "slow_axis": list(r[:, 1]), "children": members})
    tilt = turn([0.0, 1.0, 0.0], 8.0)
    root = {"name": "root", "origin": [10.0, -12.0, -150.0], "fast_axis": list(tilt @ [1.0, 0.0, 0.0]),
            "slow_axis": list(tilt @ [0.0, -1.0, 0.0]), "children": kids}
    return experiment({"panels": panels, "hierarchy": root}, X_AXIS, SCAN)


def kappa():
    """A kappa goniometer scanning phi: the rotation axis is far from +x."""
    k = unit([0.642788, -0.766044, 0.0])  # 50 deg kappa arm
    gonio = {"axes": [[1.0, 0.0, 0.0], list(k), [1.0, 0.0, 0.0]], "angles": [0.0, 40.0, 15.0],
             "names": ["phi", "kappa", "omega"], "scan_axis": 0}
    return experiment({"panels": [panel((-3.1, 2.6, -120.0))]}, gonio, SCAN)


def off_axis():
    """A beam 4 deg off -z, the detector square to it, the spindle along x."""
    r = turn([0.3, 1.0, 0.2], 4.0)
    det = {"panels": [panel(r @ [-3.1, 2.6, -120.0], fast=r @ [1.0, 0.0, 0.0], slow=r @ [0.0, -1.0, 0.0])]}
    return experiment(det, {"rotation_axis": list(r @ [1.0, 0.0, 0.0])}, SCAN, direction=r @ [0.0, 0.0, 1.0])


def mosflm():
    """nanoBragg's frame: beam along +x, spindle along +z."""
    det = {"panels": [panel((120.0, 3.1, -2.6), fast=(0.0, 0.0, 1.0), slow=(0.0, -1.0, 0.0))]}
    return experiment(det, {"rotation_axis": [0.0, 0.0, 1.0]}, SCAN, direction=(-1.0, 0.0, 0.0))


def counts(e, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.poisson(4.0, size=(p.image_size[1], p.image_size[0])).astype(np.int32) for p in e.detector.panels]


# ----------------------------------------------------------------------------- the truth's side

def truth_frames(e):
    """Per panel (origin, fast, slow) in mm and the pixel size and image size."""
    with torch.no_grad():
        o, f, s, _ = (t.double().numpy() for t in e.detector.panel_frames(e.beam.incident()))
    return [(o[k], f[k], s[k], p.pixel_size.double().numpy(), p.image_size) for k, p in enumerate(e.detector.panels)]


def corners(origin, fast, slow, pixel, size):
    return np.array([origin + u * pixel[0] * size[0] * fast + v * pixel[1] * size[1] * slow
                     for u in (0, 1) for v in (0, 1)])


# ----------------------------------------------------------------------------- NXmx, from the definition

def transformation(ds, index):
    """4x4 matrix of one NXtransformations entry at image `index`."""
    value = np.asarray(ds[()], float).reshape(-1)
    value = value[index] if value.size > 1 else value[0]
    vector = unit(ds.attrs["vector"])
    m = np.eye(4)
    if ds.attrs["transformation_type"] == "rotation":
        assert ds.attrs["units"] in ("deg", "degree", "degrees")
        m[:3, :3] = turn(vector, value)
    else:
        assert ds.attrs["units"] == "mm"
        m[:3, 3] = value * vector
    offset = np.eye(4)
    offset[:3, 3] = np.asarray(ds.attrs.get("offset", np.zeros(3)), float)
    return offset @ m


def chain(f, path, index=0):
    """The composed transformation of a depends_on path: outermost first."""
    m = np.eye(4)
    while path not in (".", ""):
        ds = f[path]
        m = transformation(ds, index) @ m
        path = ds.attrs["depends_on"]
        path = path.decode() if isinstance(path, bytes) else path
    return m


def text(ds):
    v = ds[()]
    return v.decode() if isinstance(v, bytes) else str(v)


def nxmx_models(path):
    """Detector panels (imgCIF: origin, fast, slow, pixel, size, data slices),
    scan (angles per image, width), sample rotations (imgCIF), exposures, mask."""
    f = h5py.File(path, "r")
    det = f["/entry/instrument/detector"]
    panels = []
    for name in sorted(k for k in det if k.startswith("module")):
        m = det[name]
        axes = []
        for key in ("fast_pixel_direction", "slow_pixel_direction"):
            ds = m[key]
            a = chain(f, ds.attrs["depends_on"] if isinstance(ds.attrs["depends_on"], str)
                      else ds.attrs["depends_on"].decode())
            where = a @ np.append(np.asarray(ds.attrs["offset"], float), 1.0)  # pixel 0 of this direction
            axes.append((where[:3], a[:3, :3] @ unit(ds.attrs["vector"]), float(ds[()])))
        (o_f, fast, px_f), (o_s, slow, px_s) = axes
        np.testing.assert_allclose(o_f, o_s, atol=1e-9)  # both directions start from the same corner
        origin, size = o_f, tuple(int(x) for x in m["data_size"][()][::-1][:2])
        slices = tuple(slice(int(a), int(a + n)) for a, n in zip(m["data_origin"][()], m["data_size"][()]))
        panels.append((MCSTAS_TO_IMGCIF @ origin, MCSTAS_TO_IMGCIF @ fast, MCSTAS_TO_IMGCIF @ slow,
                       np.array([px_f, px_s]), size, slices))
    sample = f["/entry/sample"]
    n = f["/entry/data/data"].shape[0]
    scan = rotations = None
    if text(sample["depends_on"]) != ".":
        top = text(sample["depends_on"])
        path, scan_ds = top, None
        while path != ".":  # the first varying rotation is the scan axis (as dxtbx takes it)
            ds = f[path]
            values = np.asarray(ds[()], float).reshape(-1)
            if scan_ds is None and ds.attrs["transformation_type"] == "rotation" and values.size > 1 \
                    and np.any(values != values[0]):
                scan_ds = ds
            path = ds.attrs["depends_on"]
        starts = np.asarray(scan_ds[()], float)
        ends = np.asarray(f[scan_ds.name + "_end"][()], float)
        scan = (starts, float(np.median(ends - starts)))
        rotations = [MCSTAS_TO_IMGCIF @ chain(f, top, i)[:3, :3] @ MCSTAS_TO_IMGCIF for i in range(n)]
    count_time = det["count_time"][()] if "count_time" in det else None
    frame_time = float(det["frame_time"][()]) if "frame_time" in det else None
    return dict(file=f, panels=panels, scan=scan, rotations=rotations, n=n, count_time=count_time,
                frame_time=frame_time, mask=det["pixel_mask"][()], data=f["/entry/data/data"],
                wavelength=float(f["/entry/instrument/beam/incident_wavelength"][()]))


def check_nxmx(path, truth, images):
    """Everything a reader of the NXmx file gets agrees with the truth experiment."""
    got = nxmx_models(path)
    # the beam along McStas +z is imgCIF -z: the truth's beam must travel that way
    np.testing.assert_allclose(truth.beam.incident().double().numpy(), [0.0, 0.0, -1.0], atol=1e-12)
    assert got["wavelength"] == pytest.approx(float(truth.beam.wavelength), abs=1e-12)
    frames = truth_frames(truth)
    assert len(got["panels"]) == len(frames)
    for (o, f_, s_, px, size, _), (to, tf, ts, tpx, tsize) in zip(got["panels"], frames):
        assert size == tuple(tsize)
        np.testing.assert_allclose(px, tpx, atol=1e-12)
        np.testing.assert_allclose(corners(o, f_, s_, px, size), corners(to, tf, ts, tpx, tsize), atol=1e-6)
    n = len(images)
    assert got["n"] == n
    for k, image in enumerate(images):  # the pixels of each module
        frame = got["data"][k]
        for (_, _, _, _, _, sl), c in zip(got["panels"], image):
            np.testing.assert_array_equal(frame[sl].reshape(c.shape), c)
    # mask: flagged exactly where the truth's panels are masked (and in gaps)
    for (_, _, _, _, size, sl), p in zip(got["panels"], truth.detector.panels):
        flagged = got["mask"][sl].reshape(size[1], size[0]) != 0
        want = np.zeros((size[1], size[0]), bool) if p.mask is None else ~p.mask.numpy().astype(bool)
        np.testing.assert_array_equal(flagged, want)
    scan = truth.scan
    if scan is None:
        assert got["scan"] is None
        return got
    # dxtbx numbers a file's images 1..n: so does the truth
    assert scan.image_range == (1, n)
    start, width = scan.oscillation.double().tolist()
    np.testing.assert_allclose(got["scan"][0], start + width * np.arange(n), atol=1e-9)
    assert got["scan"][1] == pytest.approx(width, abs=1e-12)
    phis = torch.tensor(start + width * np.arange(n), dtype=torch.float64)
    np.testing.assert_allclose(np.array(got["rotations"]), truth.goniometer.rotation(phis).numpy(), atol=1e-12)
    props = scan.extras["properties"]
    np.testing.assert_allclose(got["count_time"], props["exposure_time"], atol=1e-12)
    epochs = np.asarray(props["epochs"])
    assert got["frame_time"] == pytest.approx(float(np.median(np.diff(epochs))) if n > 1 else props["exposure_time"][0])
    start_time = got["file"]["/entry/start_time"][()].decode()
    assert start_time == np.datetime_as_string(np.datetime64(int(round(epochs[0] * 1e6)), "us"), unit="us") + "Z"
    return got


def check_with_nxmx_package(path, truth):
    """The nxmx package (what dxtbx reads NeXus with) composes the same corners."""
    with h5py.File(path, "r") as fh:
        (entry,) = nxmx.NXmx(fh).entries
        (det,) = entry.instruments[0].detectors
        for m, (to, tf, ts, tpx, tsize) in zip(det.modules, truth_frames(truth)):
            a = nxmx.get_cumulative_transformation(nxmx.get_dependency_chain(m.fast_pixel_direction.depends_on))[0]
            origin = a[:3, :3] @ m.fast_pixel_direction.offset.to("mm").magnitude + a[:3, 3]
            fast = a[:3, :3] @ m.fast_pixel_direction.vector
            np.testing.assert_allclose(MCSTAS_TO_IMGCIF @ origin, to, atol=1e-6)
            np.testing.assert_allclose(MCSTAS_TO_IMGCIF @ fast, tf, atol=1e-9)
        assert entry.start_time is not None and det.frame_time is not None


CASES = {"single": single, "tilted": lambda: tilted(20.0), "tiled": tiled, "hierarchical": hierarchical,
         "kappa": kappa, "off_axis": off_axis, "mosflm": mosflm}


@pytest.mark.parametrize("case", list(CASES))
def test_nxmx_geometry_is_the_truth(tmp_path, case):
    """Images 3..5 of a 6-image scan in one NXmx file: the geometry, scan,
    exposure and mask a reader derives equal the truth the writer gives."""
    e = CASES[case]()
    images = [counts(e, seed) for seed in range(3)]
    path = tmp_path / f"{case}.nxs"
    with NXmxWriter(path, e, 3, start_image=3) as w:
        for k, image in enumerate(images):
            w.write(k, image)
    truth = w.truth
    # the truth is the input turned rigidly: spacings and angles between models are kept
    before, after = truth_frames(e), truth_frames(truth)
    for (o0, f0, s0, *_), (o1, f1, s1, *_) in zip(before, after):
        assert np.linalg.norm(o1) == pytest.approx(np.linalg.norm(o0), abs=1e-9)
        assert f1 @ truth.beam.incident().double().numpy() == pytest.approx(
            f0 @ e.beam.incident().double().numpy(), abs=1e-12)
    got = check_nxmx(path, truth, images)
    np.testing.assert_allclose(got["scan"][0], [10.5, 10.75, 11.0], atol=1e-12)  # images 3..5 of the input
    check_with_nxmx_package(path, truth)


# ----------------------------------------------------------------------------- miniCBF, from the mini-header

def minicbf_models(path):
    """What dxtbx builds from a miniCBF: one panel (origin, fast, slow, pixel,
    size), the scan of this file, exposure, the untrusted pixels."""
    img = fabio.open(str(path))
    h = parse_header(img.header["_array_data.header_contents"])
    pixel = np.array([float(x) * 1000 for x in h["Pixel_size"].replace("m", "").replace("x", "").split()])
    bx, by = (float(x) for x in re.sub(r"[(),]", " ", h["Beam_xy"]).split()[:2])
    distance = float(h["Detector_distance"].split()[0]) * 1000
    origin = np.array([-bx * pixel[0], by * pixel[1], -distance])
    data = img.data
    return dict(origin=origin, fast=np.array([1.0, 0.0, 0.0]), slow=np.array([0.0, -1.0, 0.0]), pixel=pixel,
                size=(data.shape[1], data.shape[0]), start=float(h["Start_angle"].split()[0]),
                width=float(h["Angle_increment"].split()[0]), exposure=float(h["Exposure_period"].split()[0]),
                exposure_time=float(h["Exposure_time"].split()[0]), wavelength=float(h["Wavelength"].split()[0]),
                excluded=int(h["N_excluded_pixels"]), data=data, header=h)


def frame_position(got, where):
    """Pixel coordinates (fast, slow) dxtbx's panel gives a lab point, traced from the sample."""
    on = where * (-got["origin"][2] / -where[2])
    rel = on - got["origin"]
    return np.array([rel @ got["fast"] / got["pixel"][0], rel @ got["slow"] / got["pixel"][1]])


def check_minicbf(path, truth, image, offsets, tolerance_px=None):
    got = minicbf_models(path)
    np.testing.assert_allclose(truth.beam.incident().double().numpy(), [0.0, 0.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(truth.goniometer.rotation_axis.double().numpy(), [1.0, 0.0, 0.0], atol=1e-9)
    assert got["wavelength"] == pytest.approx(float(truth.beam.wavelength), abs=1e-8)
    for (to, tf, ts, tpx, tsize), (of, os_) in zip(truth_frames(truth), offsets):
        np.testing.assert_allclose(tpx, got["pixel"], atol=1e-12)
        mine = corners(got["origin"] + of * got["pixel"][0] * got["fast"] + os_ * got["pixel"][1] * got["slow"],
                       got["fast"], got["slow"], got["pixel"], tsize)
        if tolerance_px is None:
            np.testing.assert_allclose(mine, corners(to, tf, ts, tpx, tsize), atol=1e-6)
        else:  # a tilt within the rule: each true corner lands within the tolerance of its pixel
            for u, v, where in zip((0, 0, 1, 1), (0, 1, 0, 1), corners(to, tf, ts, tpx, tsize)):
                want = np.array([of + u * tsize[0], os_ + v * tsize[1]])
                assert np.linalg.norm(frame_position(got, where) - want) <= tolerance_px
    first = truth.scan.image_range[0]
    start, width = truth.scan.oscillation.double().tolist()
    assert got["start"] == pytest.approx(start + (image - first) * width, abs=1e-9)
    assert got["width"] == pytest.approx(width, abs=1e-10)
    props = truth.scan.extras["properties"]
    k = image - first
    assert got["exposure_time"] == pytest.approx(props["exposure_time"][k], abs=1e-7)
    assert got["exposure"] == pytest.approx(float(np.median(np.diff(props["epochs"]))), abs=1e-7)
    return got


@pytest.mark.parametrize("case", ["single", "tilted", "tiled", "mosflm", "off_axis"])
def test_minicbf_geometry_is_the_truth(tmp_path, case):
    e = {"single": single, "tilted": lambda: tilted(0.002), "tiled": tiled, "mosflm": mosflm,
         "off_axis": off_axis}[case]()
    truth = as_written(e)
    image = counts(e)
    path = tmp_path / f"{case}_00004.cbf"
    write_minicbf(path, image if len(image) > 1 else image[0], e, 4)
    offsets = [tuple(p.extras.get("raw_image_offset", (0, 0))) for p in truth.detector.panels]
    got = check_minicbf(path, truth, 4, offsets, tolerance_px=0.1 if case == "tilted" else None)
    # pixels: the panels at their offsets, -1 between them, -2 where the truth masks a pixel
    gap = np.ones(got["data"].shape, bool)
    bad = np.zeros(got["data"].shape, bool)
    for p, (of, os_), c in zip(truth.detector.panels, offsets, image):
        region = (slice(os_, os_ + c.shape[0]), slice(of, of + c.shape[1]))
        gap[region] = False
        masked = np.zeros(c.shape, bool) if p.mask is None else ~p.mask.numpy().astype(bool)
        bad[region] = masked
        np.testing.assert_array_equal(got["data"][region][~masked], c[~masked])
    assert (got["data"][gap] == -1).all() and (got["data"][bad] == -2).all()
    assert got["excluded"] == bad.sum() == (0 if case != "single" else 2 * 30)


def test_minicbf_long_sweep_does_not_drift(tmp_path):
    """A 3600-image sweep of 1/30 deg: the last header's start and the scan
    dxtbx extends from the first header both stay within 1e-6 deg."""
    scan = {"image_range": [1, 3600], "oscillation": [-45.0, 1.0 / 30.0]}
    e = experiment({"panels": [panel((-3.1, 2.6, -120.0))]}, X_AXIS, scan)
    first = parse_header(pilatus_header(e, 1))
    last = parse_header(pilatus_header(e, 3600))
    want = -45.0 + 3599.0 / 30.0
    assert float(last["Start_angle"].split()[0]) == pytest.approx(want, abs=1e-9)
    extended = float(first["Start_angle"].split()[0]) + 3599 * float(first["Angle_increment"].split()[0])
    assert extended == pytest.approx(want, abs=1e-6)


def tilt_error_px(e):
    """The largest corner misplacement (pixels) of dxtbx's untilted model of
    the experiment's one panel, beam centre and distance exact, in numpy."""
    truth = as_written(e)
    (o, f, s, px, size), = truth_frames(truth)
    n = np.cross(f, s)
    distance = -(o @ n) / n[2]
    hit = np.array([0.0, 0.0, -distance]) - o
    uv = np.linalg.lstsq(np.stack([f, s], -1), hit, rcond=None)[0] / px
    got = dict(origin=np.array([-uv[0] * px[0], uv[1] * px[1], -distance]), fast=np.array([1.0, 0.0, 0.0]),
               slow=np.array([0.0, -1.0, 0.0]), pixel=px)
    return max(np.linalg.norm(frame_position(got, where) - [u * size[0], v * size[1]])
               for u, v, where in zip((0, 0, 1, 1), (0, 1, 0, 1), corners(o, f, s, px, size)))


@pytest.mark.parametrize("case, words", [
    ("tilt", "misplace pixels of panel 0"),
    ("off_normal_beam", "misplace pixels of panel 0"),
    ("turned_panel", "fast axis turned 1 deg"),
    ("turned_module", "misplace pixels of panel 1"),
    ("minus_x_axis", "rotation axis"),
    ("kappa", "rotation axis"),
])
def test_minicbf_refuses_what_its_header_cannot_hold(tmp_path, case, words):
    """Each refusal is one line naming the problem and suggesting NeXus, and
    leaves no file; the same geometries go to NXmx exactly (above)."""
    big = dict(size=(1000, 1000))
    if case == "tilt":
        e = experiment({"panels": [panel((-86.0, 86.0, -120.0), fast=(math.cos(0.01), 0.0, math.sin(0.01)), **big)]},
                       X_AXIS, SCAN)
        assert tilt_error_px(e) > 0.1  # what our own numpy says the header would do
    elif case == "off_normal_beam":
        b = turn([0.0, 1.0, 0.0], 0.5) @ [0.0, 0.0, 1.0]
        e = experiment({"panels": [panel((-86.0, 86.0, -120.0), **big)]}, X_AXIS, SCAN, direction=b)
        assert tilt_error_px(e) > 0.1
    elif case == "turned_panel":
        r = turn([0.0, 0.0, 1.0], 1.0)
        e = experiment({"panels": [panel((-86.0, 86.0, -120.0), fast=r @ [1, 0, 0], slow=r @ [0, -1, 0], **big)]},
                       X_AXIS, SCAN)
    elif case == "turned_module":
        r = turn([0.0, 0.0, 1.0], 1.0)
        e = experiment({"panels": [panel((-3.4, 2.6, -120.0), raw_image_offset=[0, 0]),
                                   panel((-3.4, 2.6 - 35 * 0.172, -120.0), fast=r @ [1, 0, 0], slow=r @ [0, -1, 0],
                                         raw_image_offset=[0, 35])]}, X_AXIS, SCAN)
    elif case == "minus_x_axis":
        e = experiment({"panels": [panel((-3.1, 2.6, -120.0))]}, {"rotation_axis": [-1.0, 0.0, 0.0]}, SCAN)
    else:
        e = kappa()
    image = counts(e)
    with pytest.raises(ValueError, match=words + ".*write NeXus instead"):
        write_minicbf(tmp_path / "x_00001.cbf", image if len(image) > 1 else image[0], e, 1)
    assert os.listdir(tmp_path) == []


def test_minicbf_accepts_tilt_below_the_rule():
    """Our numpy estimate and the writer agree on a tilt just inside the rule."""
    big = dict(size=(1000, 1000))
    for rad in (1e-5, 3e-5):
        e = experiment({"panels": [panel((-86.0, 86.0, -120.0), fast=(math.cos(rad), 0.0, math.sin(rad)), **big)]},
                       X_AXIS, SCAN)
        inside = tilt_error_px(e) <= 0.1
        try:
            pilatus_header(e, 1)
            written = True
        except ValueError:
            written = False
        assert written == inside


# ----------------------------------------------------------------------------- end to end

def simulate(argv, cwd):
    from torchbragg.commands.simulate import run
    old = os.getcwd()
    try:
        os.chdir(cwd)
        with redirect_stdout(io.StringIO()):
            assert run(argv) == 0
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A small crystal on a 40 x 30 detector, six images."""
    folder = tmp_path_factory.mktemp("sweep")
    e = single()
    doc = {"experiment": [{"beam": 0, "detector": 0, "goniometer": 0, "scan": 0, "crystal": 0}],
           "beam": [{"direction": [0.0, 0.0, 1.0], "wavelength": 0.9795, "polarization_fraction": 0.999}],
           "detector": [{"panels": [panel((-3.1, 2.6, -120.0), mask=[[3, 1, 4, 30]])]}],
           "goniometer": [X_AXIS], "scan": [SCAN],
           "crystal": [{"real_space_a": [40.0, 0.0, 0.0], "real_space_b": [0.0, 50.0, 0.0],
                        "real_space_c": [0.0, 0.0, 60.0], "space_group_hall_symbol": " P 1"}]}
    assert e.detector.panels[0].mask is not None
    (folder / "in.expt").write_text(json.dumps(doc))
    return folder


PHYSICS = ["-N", "3", "-default_F", "100", "-oversample", "1", "-thicksteps", "2", "-nonoise"]


@pytest.mark.parametrize("fmt", ["nxs", "cbf"])
def test_simulate_truth_names_its_images_and_matches_them(sweep, fmt):
    """--images 2:3 into a new folder: the truth .expt names the files (as
    dials.import reads them), numbers the images as a reader of the files
    does, and its geometry is what the files say."""
    simulate(["in.expt", "--out", f"out_{fmt}/s", "--quiet", "--format", fmt, "--images", "2:3", *PHYSICS], sweep)
    folder = sweep / f"out_{fmt}"
    doc = json.loads((folder / "s.expt").read_text())
    (block,) = doc["imageset"]
    assert doc["experiment"][0]["imageset"] == 0 and block["__id__"] == "ImageSequence"
    truth = read_experiments(str(folder / "s.expt"))[0]
    if fmt == "nxs":
        assert block["template"] == "s.nxs" and block["single_file_indices"] == [0, 1]
        assert truth.scan.image_range == (1, 2)
        with h5py.File(folder / "s.nxs", "r") as f:
            images = [[f["/entry/data/data"][k]] for k in range(2)]
        check_nxmx(folder / "s.nxs", truth, images)
    else:
        assert block["template"] == "s_#####.cbf"
        assert truth.scan.image_range == (2, 3)  # the file names carry the numbers
        for n in (2, 3):
            check_minicbf(folder / f"s_{n:05d}.cbf", truth, n, [(0, 0)])


def test_refine_finds_the_images_the_truth_names(sweep):
    """`torchbragg refine PREFIX.expt --out DIR` with no image argument reads
    the images the truth names."""
    from torchbragg.commands.refine import main
    simulate(["in.expt", "--out", "r/s", "--quiet", "--format", "nxs", "--images", "1:1", *PHYSICS], sweep)
    old = os.getcwd()
    try:
        os.chdir(sweep)
        with redirect_stdout(io.StringIO()):
            rc = main(["r/s.expt", "--out", "r/fit", "--quiet", "--max-iter", "1", "--refine", "scale", *PHYSICS])
    finally:
        os.chdir(old)
    # 4: outputs written but the fit not accepted: the simulated image has the
    # direct beam (-default_F gives 0 0 0 an amplitude), which refine's model of
    # a measured frame leaves out, as a beamstop would
    assert rc in (0, 4)
    assert "s.nxs" in (sweep / "r" / "fit" / "refined.json").read_text()
    assert json.loads((sweep / "r" / "fit" / "refined.json").read_text())
