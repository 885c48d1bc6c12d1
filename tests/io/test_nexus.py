"""NXmx output: files written by NXmxWriter read back with the `nxmx` package
(what DIALS reads NeXus with) give the geometry and pixels that were written."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")
nxmx = pytest.importorskip("nxmx")

import torchbragg  # noqa: E402
from torchbragg.io.dials import Experiment  # noqa: E402
from torchbragg.io.frames import reader_rotation  # noqa: E402
from torchbragg.io.nexus import NXmxWriter, write_nxmx  # noqa: E402
from experiments import experiment

DIALS_TO_MCSTAS = np.diag([-1.0, 1.0, -1.0])


def unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def panel(origin, fast, slow, size, pixel=0.1, **kw):
    d = {"name": kw.pop("name", ""), "type": "SENSOR_PAD", "origin": list(origin), "fast_axis": list(fast),
         "slow_axis": list(slow), "image_size": list(size), "pixel_size": [pixel, pixel],
         "trusted_range": [-1.0, 1048575.0], "thickness": 0.32, "material": "Si", "mu": 3.96}
    d.update(kw)
    return d


def pilatus_rotation():
    """One tilted Pilatus-like panel with a gap mask, a two-axis goniometer
    scanning its second axis, three images."""
    a = math.radians(2.0)
    det = {"panels": [panel([-8.3, 7.9, -190.0], [math.cos(a), 0.0, math.sin(a)], [0.0, -1.0, 0.0], [97, 83],
                            pixel=0.172, mask=[[10, 1, 12, 83]])]}
    gonio = {"axes": [list(unit([0.2, 0.97, 0.1])), [1.0, 0.0, 0.0]], "angles": [15.0, 0.0],
             "names": ["phi", "omega"], "scan_axis": 1}
    scan = {"image_range": [1, 3], "oscillation": [5.0, 0.1]}
    return experiment(det, gonio, scan)


def counts_for(shape, seed):
    return np.random.default_rng(seed).poisson(3.0, size=shape).astype(np.int32)


def frames_of(expt):
    with torch.no_grad():
        o, f, s, _ = expt.detector.panel_frames(expt.beam.incident())
    return o.double().numpy(), f.double().numpy(), s.double().numpy()


def read_back(path):
    """Geometry and pixels as nxmx gives them (McStas frame, mm, degrees)."""
    fh = h5py.File(path, "r")
    root = nxmx.NXmx(fh)
    (entry,) = root.entries
    (inst,) = entry.instruments
    (det,) = inst.detectors
    (beam,) = inst.beams
    (sample,) = entry.samples
    (data,) = entry.data
    modules = []
    for m in det.modules:
        chain = nxmx.get_dependency_chain(m.fast_pixel_direction.depends_on)
        a = nxmx.get_cumulative_transformation(chain)[0]
        offset = np.zeros(3)
        if m.fast_pixel_direction.offset is not None:
            offset = m.fast_pixel_direction.offset.to("mm").magnitude
        # the offset and the axes are given in the frame the chain ends in
        modules.append(dict(origin=a[:3, :3] @ offset + a[:3, 3], fast=a[:3, :3] @ m.fast_pixel_direction.vector,
                            slow=a[:3, :3] @ m.slow_pixel_direction.vector,
                            pixel=(m.fast_pixel_direction[()].to("mm").magnitude.item(),
                                   m.slow_pixel_direction[()].to("mm").magnitude.item()),
                            slices=tuple(slice(int(a0), int(a0 + n)) for a0, n in zip(m.data_origin, m.data_size))))
    images = data[data.signal][()]
    out = dict(file=fh, entry=entry, det=det, beam=beam, sample=sample, modules=modules, images=images,
               wavelength=float(beam.incident_wavelength.to("angstrom").magnitude),
               thickness=float(det.sensor_thickness.to("mm").magnitude))
    return out


def module_pixels(back, image):
    """Each module's pixels as DIALS slices them out of the stored image."""
    frame = back["images"][image]
    return [frame[m["slices"]].reshape(frame[m["slices"]].shape[-2:]) for m in back["modules"]]


def check_detector(back, expt, q):
    o, f, s = frames_of(expt)
    assert len(back["modules"]) == len(expt.detector.panels)
    for k, m in enumerate(back["modules"]):
        np.testing.assert_allclose(m["origin"], q @ o[k], atol=1e-9)
        np.testing.assert_allclose(m["fast"], q @ f[k], atol=1e-12)
        np.testing.assert_allclose(m["slow"], q @ s[k], atol=1e-12)
        np.testing.assert_allclose(m["pixel"], expt.detector.panels[k].pixel_size.double().numpy(), rtol=1e-12)
        fast_n, slow_n = (m["slices"][i].stop - m["slices"][i].start for i in (-1, -2))
        assert (fast_n, slow_n) == expt.detector.panels[k].image_size


def test_single_panel_rotation_scan(tmp_path):
    expt = pilatus_rotation()
    images = [counts_for((83, 97), seed=i) for i in range(3)]
    path = tmp_path / "rot.nxs"
    with NXmxWriter(path, expt, 3) as w:
        for i in (2, 0, 1):  # any order
            w.write(i, images[i])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rot.nxs"]
    back = read_back(path)
    entry = back["entry"]
    assert entry.definition == "NXmx" and entry.start_time is not None and entry.end_time >= entry.start_time
    # a DIALS-frame experiment goes to McStas the standard way
    check_detector(back, expt, DIALS_TO_MCSTAS)
    assert back["wavelength"] == pytest.approx(0.9795, abs=0)
    assert back["thickness"] == pytest.approx(0.32)
    assert back["det"].sensor_material == "Si"
    # what DIALS computes: McStas -> imgCIF gives back the panel as it was
    o, f, s = frames_of(expt)
    np.testing.assert_allclose(DIALS_TO_MCSTAS @ back["modules"][0]["origin"], o[0], atol=1e-9)
    # beam along McStas +z; horizontal polarization: Stokes Q = 2 * 0.999 - 1
    stokes = back["beam"]["incident_polarization_stokes"][()]
    np.testing.assert_allclose(stokes, [1.0, 0.998, 0.0, 0.0], atol=1e-12)
    # the NXdetector distance is where the beam meets the panel plane
    n = DIALS_TO_MCSTAS @ unit(np.cross(f[0], s[0]))
    assert back["det"].distance.to("mm").magnitude == pytest.approx((DIALS_TO_MCSTAS @ o[0]) @ n / n[2])
    # goniometer: innermost axis first, vectors in McStas, scan angles per image start
    chain = nxmx.get_dependency_chain(back["sample"].depends_on)
    axes = nxmx.get_rotation_axes(chain)
    gonio = expt.goniometer
    np.testing.assert_allclose(axes.axes, (DIALS_TO_MCSTAS @ gonio.axes.numpy().T).T, atol=1e-12)
    assert list(axes.names) == ["phi", "omega"]
    assert list(axes.is_scan_axis) == [False, True]
    omega = chain[1]
    np.testing.assert_allclose(omega[()].to("deg").magnitude, [5.0, 5.1, 5.2], atol=1e-12)
    np.testing.assert_allclose(omega.end[()].to("deg").magnitude, [5.1, 5.2, 5.3], atol=1e-12)
    np.testing.assert_allclose(chain[0][()].to("deg").magnitude, [15.0] * 3)
    # pixels exact; gap mask flagged; bitshuffle-LZ4, one image per chunk
    assert back["images"].dtype == np.int32 and back["images"].shape == (3, 83, 97)
    for i in range(3):
        assert np.array_equal(module_pixels(back, i)[0], images[i])
    mask = back["det"].pixel_mask[()]
    assert mask.shape == (83, 97) and np.all(mask[:, 9:12] == 1) and mask.sum() == 3 * 83
    ds = back["file"]["/entry/data/data"]
    assert ds.chunks == (1, 83, 97) and "32008" in ds._filters


def test_tiled_panels_with_raw_image_offsets(tmp_path):
    """Two panels that tile one frame (rows 30..34 a gap): one (n, slow, fast)
    dataset, each module at its offset, gaps -1 and masked; a still (no goniometer)."""
    det = {"panels": [panel([-10.0, 12.0, -100.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [40, 30],
                            raw_image_offset=[0, 0], name="top"),
                      panel([-10.0, 12.0 - 3.5, -100.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [40, 30],
                            raw_image_offset=[0, 35], name="bottom")]}
    expt = experiment(det)
    counts = np.stack([counts_for((30, 40), seed=10), counts_for((30, 40), seed=11)])
    path = tmp_path / "tiled.h5"
    write_nxmx(path, expt, [counts, counts + 1])
    back = read_back(path)
    check_detector(back, expt, DIALS_TO_MCSTAS)
    assert back["images"].shape == (2, 65, 40)
    assert [m["slices"] for m in back["modules"]] == [(slice(0, 30), slice(0, 40)), (slice(35, 65), slice(0, 40))]
    for i, c in enumerate([counts, counts + 1]):
        got = module_pixels(back, i)
        assert np.array_equal(got[0], c[0]) and np.array_equal(got[1], c[1])
        assert np.all(back["images"][i, 30:35] == -1)
    mask = back["det"].pixel_mask[()]
    assert np.all(mask[30:35] == 1) and mask.sum() == 5 * 40
    assert back["sample"].depends_on is None  # no goniometer: stills


def test_four_panels_stacked(tmp_path):
    """Four panels under a hierarchy and no raw offsets (one smaller):
    (n, panels, slow, fast), module k at data_origin [k, 0, 0]."""
    kids = []
    panels = []
    for k, (x, y) in enumerate([(0.0, 0.0), (25.0, 0.0), (0.0, -20.0), (25.0, -20.0)]):
        size = [20, 16] if k < 3 else [18, 16]
        panels.append(panel([x, y, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], size, pixel=1.0, name=f"p{k}"))
        kids.append({"panel": k})
    tilt = math.radians(10.0)
    det = {"panels": panels,
           "hierarchy": {"name": "root", "origin": [-25.0, 20.0, -150.0],
                         "fast_axis": [math.cos(tilt), 0.0, math.sin(tilt)], "slow_axis": [0.0, -1.0, 0.0],
                         "children": kids}}
    gonio = {"rotation_axis": [1.0, 0.0, 0.0]}
    scan = {"image_range": [1, 10], "oscillation": [0.0, 1.0]}
    expt = experiment(det, gonio, scan)
    images = [[counts_for((16, 20 if k < 3 else 18), seed=20 + 4 * i + k) for k in range(4)] for i in range(2)]
    path = tmp_path / "four.nxs"
    with NXmxWriter(path, expt, 2, start_image=4) as w:
        for i, img in enumerate(images):
            w.write(i, img)
    back = read_back(path)
    check_detector(back, expt, DIALS_TO_MCSTAS)
    assert back["images"].shape == (2, 4, 16, 20)
    assert [m["slices"][0] for m in back["modules"]] == [slice(k, k + 1) for k in range(4)]
    for i in range(2):
        for k, got in enumerate(module_pixels(back, i)):
            assert np.array_equal(got, images[i][k])
        assert np.all(back["images"][i, 3, :, 18:] == -1)
    # images 4 and 5 of the scan
    chain = nxmx.get_dependency_chain(back["sample"].depends_on)
    assert len(chain) == 1
    np.testing.assert_allclose(chain[0][()].to("deg").magnitude, [3.0, 4.0])
    np.testing.assert_allclose(chain[0].vector, [-1.0, 0.0, 0.0])


def test_nanobragg_mosflm_frame(tmp_path):
    """nanoBragg's frame (beam along +x, spindle along z) goes to McStas as
    (x, y, z) -> (-z, y, x): beam +z, spindle -x as DIALS has it (+x)."""
    sim = torchbragg.Simulator.from_args(["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "1",
                                          "-detpixels", "48", "-pixel", "0.1", "-distance", "120",
                                          "-Xbeam", "2.9", "-Ybeam", "3.75", "-lambda", "1.3",
                                          "-phi", "10", "-osc", "0.5"])
    expt = Experiment(beam=sim.beam, detector=sim.detector, goniometer=sim.goniometer, scan=sim.scan)
    mosflm_to_mcstas = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(DIALS_TO_MCSTAS @ reader_rotation(expt), mosflm_to_mcstas, atol=1e-15)
    counts = counts_for((48, 48), seed=3)
    path = tmp_path / "sim.nxs"
    write_nxmx(path, expt, [counts])
    back = read_back(path)
    check_detector(back, expt, mosflm_to_mcstas)
    assert back["wavelength"] == pytest.approx(1.3, rel=1e-6)
    assert back["det"].distance.to("mm").magnitude == pytest.approx(120.0, rel=1e-6)
    chain = nxmx.get_dependency_chain(back["sample"].depends_on)
    np.testing.assert_allclose(chain[0].vector, [-1.0, 0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(chain[0][()].to("deg").magnitude, [10.0])
    np.testing.assert_allclose(chain[0].end[()].to("deg").magnitude, [10.5], rtol=1e-6)
    assert np.array_equal(module_pixels(back, 0)[0], counts)


def test_frame_rotation_rule():
    """The reader frame: DIALS's frame unchanged; always proper, beam -> -z,
    rotation axis into the x-z plane on the +x side."""
    det = {"panels": [panel([-5.0, 5.0, -100.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [10, 10])]}
    scan = {"image_range": [1, 2], "oscillation": [0.0, 1.0]}
    np.testing.assert_allclose(reader_rotation(experiment(det, {"rotation_axis": [1.0, 0.0, 0.0]}, scan)),
                               np.eye(3), atol=0)
    rng = np.random.default_rng(5)
    for b, a in rng.normal(size=(20, 2, 3)):
        q = reader_rotation(experiment(det, {"rotation_axis": list(a)}, scan, direction=list(-b)))
        np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(q) == pytest.approx(1.0)
        np.testing.assert_allclose(q @ unit(b), [0.0, 0.0, -1.0], atol=1e-12)
        turned = q @ unit(a)
        assert abs(turned[1]) < 1e-12 and turned[0] > 0


def test_exception_leaves_nothing(tmp_path):
    expt = pilatus_rotation()
    path = tmp_path / "broken.nxs"
    with pytest.raises(RuntimeError, match="stop"):
        with NXmxWriter(path, expt, 3) as w:
            w.write(0, counts_for((83, 97), seed=0))
            assert any(tmp_path.iterdir())  # the temporary file, not the target
            assert not path.exists()
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    # a file closed with images missing is not kept either
    with pytest.raises(ValueError, match="not written"):
        with NXmxWriter(path, expt, 3) as w:
            w.write(0, counts_for((83, 97), seed=0))
    assert list(tmp_path.iterdir()) == []


def test_bad_counts_rejected(tmp_path):
    expt = pilatus_rotation()
    path = tmp_path / "x.nxs"
    with pytest.raises(ValueError):
        with NXmxWriter(path, expt, 1, start_image=3) as w:
            w.write(0, np.zeros((83, 96), dtype=np.int32))
    with pytest.raises(ValueError):
        with NXmxWriter(path, expt, 1, start_image=3) as w:
            w.write(0, np.zeros((83, 97), dtype=np.float32))
    with pytest.raises(ValueError, match="outside the scan"):
        NXmxWriter(path, expt, 3, start_image=2)
    assert list(tmp_path.iterdir()) == []


def crystal_rotations(back, n):
    """(n, 3, 3) sample rotation per image from the nxmx chain."""
    chain = nxmx.get_dependency_chain(back["sample"].depends_on)
    a = nxmx.get_cumulative_transformation(chain)
    return np.broadcast_to(a[..., :3, :3], (n, 3, 3))


@pytest.mark.parametrize("kind", ["two_axis", "fixed_and_setting"])
def test_goniometer_chain_reproduces_rotation(tmp_path, kind):
    """The composed NXmx sample chain is the model's crystal rotation at each
    image's start angle, turned to McStas: Q R(phi) Q^T."""
    if kind == "two_axis":
        expt = pilatus_rotation()
    else:
        def rot(axis, deg):
            k = np.cross(np.eye(3), unit(axis))
            t = math.radians(deg)
            return np.eye(3) + math.sin(t) * k.T + (1 - math.cos(t)) * k.T @ k.T

        fixed, setting = rot([0.3, 0.2, 0.9], 40.0), rot([0.0, 1.0, 0.2], 175.0)
        det = {"panels": [panel([-5.0, 5.0, -100.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [10, 10])]}
        gonio = {"rotation_axis": [1.0, 0.0, 0.0], "fixed_rotation": list(fixed.ravel()),
                 "setting_rotation": list(setting.ravel())}
        expt = experiment(det, gonio, {"image_range": [1, 3], "oscillation": [-30.0, 2.5]})
    size = expt.detector.panels[0].image_size
    path = tmp_path / "g.nxs"
    write_nxmx(path, expt, [counts_for(size[::-1], seed=i) for i in range(3)])
    back = read_back(path)
    q = DIALS_TO_MCSTAS @ reader_rotation(expt)
    start, width = expt.scan.oscillation.double().tolist()
    want = expt.goniometer.rotation(torch.tensor([start + i * width for i in range(3)])).numpy()
    np.testing.assert_allclose(crystal_rotations(back, 3), q @ want @ q.T, atol=1e-12)
