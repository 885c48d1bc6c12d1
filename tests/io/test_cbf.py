"""miniCBF output: pixels survive byte-offset compression, and the Pilatus
header, read the way dxtbx reads it, gives back the experiment's geometry and
scan; geometry a miniCBF cannot describe is refused; failures leave no file."""

from __future__ import annotations

import copy
import math
import os
import re

import fabio
import numpy as np
import pytest
import torch

import torchbragg
from torchbragg.io.dials import Experiment, experiments_from_dict
from torchbragg.io.cbf import pilatus_header, write_minicbf
from experiments import parse_minicbf_header as parse

PX = 0.172
ORIGIN = (-211.5, 219.4, -190.0)


def panel(origin=ORIGIN, fast=(1.0, 0.0, 0.0), slow=(0.0, -1.0, 0.0), size=(2463, 2527), **kw):
    d = {"name": "Panel", "type": "SENSOR_PAD", "fast_axis": list(fast), "slow_axis": list(slow),
         "origin": list(origin), "raw_image_offset": [0, 0], "image_size": list(size), "pixel_size": [PX, PX],
         "trusted_range": [-1.0, 1048576.0], "thickness": 0.45, "material": "Si", "mu": 3.96, "mask": []}
    d.update(kw)
    return d


def doc(panels, scan=True):
    """A DIALS experiment list: Pilatus-like rotation (or still) experiment."""
    d = {"__id__": "ExperimentList",
         "experiment": [{"__id__": "Experiment", "beam": 0, "detector": 0}],
         "beam": [{"direction": [0.0, 0.0, 1.0], "wavelength": 0.97625, "polarization_fraction": 0.99}],
         "detector": [{"panels": panels}]}
    if scan:
        d["experiment"][0].update(goniometer=0, scan=0)
        d["goniometer"] = [{"rotation_axis": [1.0, 0.0, 0.0]}]
        d["scan"] = [{"image_range": [1, 10], "oscillation": [30.0, 0.1], "exposure_time": [0.1] * 10}]
    return d


def experiment(panels=None, scan=True):
    return experiments_from_dict(doc(panels or [panel()], scan))[0]


def counts_for(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.poisson(3.0, size=shape).astype(np.int32)
    c.flat[::997] = 1_500_000  # large values take the wide byte-offset codes
    return c


def read_back(path):
    """(pixels, header convention, dxtbx-style dictionary, geometry as dxtbx derives it)."""
    img = fabio.open(str(path))
    h = parse(img.header["_array_data.header_contents"])
    pixel = [float(x) * 1000 for x in h["Pixel_size"].replace("m", "").replace("x", "").split()]
    beam_xy = [float(x) for x in re.sub(r"[(),]", " ", h["Beam_xy"]).split()[:2]]
    geom = dict(pixel=pixel, beam_xy=beam_xy,
                beam_mm=(beam_xy[0] * pixel[0], beam_xy[1] * pixel[1]),
                distance=float(h["Detector_distance"].split()[0]) * 1000,
                wavelength=float(h["Wavelength"].split()[0]),
                start=float(h["Start_angle"].split()[0]), width=float(h["Angle_increment"].split()[0]),
                exposure=float(h["Exposure_period"].split()[0]), cutoff=int(h["Count_cutoff"].split()[0]))
    return img.data, img.header["_array_data.header_convention"], h, geom


def frames(expt):
    with torch.no_grad():
        return [t.double().numpy()[0] for t in expt.detector.panel_frames(expt.beam.incident())]


def test_pilatus_6m_rotation_round_trip(tmp_path):
    expt = experiment()
    counts = counts_for((2527, 2463))
    path = tmp_path / "image_00003.cbf"
    write_minicbf(path, counts, expt, image=3)
    assert path.read_bytes()[:6] == b"###CBF"  # what dxtbx checks first
    assert b'conversions="x-CBF_BYTE_OFFSET"' in path.read_bytes()[:8192]
    data, convention, h, g = read_back(path)
    gaps = np.zeros(counts.shape, bool)  # the module gaps of a 6M: -1, as a Pilatus writes them
    gaps[:, np.arange(2463) % 494 >= 487] = True
    gaps[np.arange(2527) % 212 >= 195, :] = True
    assert data.dtype == np.int32 and np.array_equal(data, np.where(gaps, -1, counts))
    assert convention == "PILATUS_1.2"
    assert h["Detector"] == "PILATUS 6M, S/N 60-0000"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", h["timestamp"])
    assert h["Pixel_size"] == "172e-6 m x 172e-6 m"
    assert g["pixel"] == pytest.approx([PX, PX], abs=1e-12)
    assert float(h["Silicon"].split()[2]) == pytest.approx(0.00045)
    assert g["wavelength"] == pytest.approx(0.97625, abs=1e-6)
    assert g["distance"] == pytest.approx(190.0, abs=1e-7)
    assert g["start"] == pytest.approx(30.2) and g["width"] == pytest.approx(0.1)
    assert g["exposure"] == pytest.approx(0.1) and g["cutoff"] == 1048576
    # dxtbx's detector: fast +x, slow -y, beam along -z
    origin = np.array([-g["beam_mm"][0], g["beam_mm"][1], -g["distance"]])
    np.testing.assert_allclose(origin, ORIGIN, rtol=0, atol=1e-6)
    np.testing.assert_allclose(g["beam_xy"], [211.5 / PX, 219.4 / PX], rtol=0, atol=1e-6)
    assert pilatus_header(expt, 3) == fabio.open(str(path)).header["_array_data.header_contents"].replace(
        "\r\n", "\n")


def test_still_and_one_image_stack(tmp_path):
    expt = experiment([panel(origin=(-40.0, 50.0, -100.0), size=(487, 195))], scan=False)
    counts = counts_for((1, 195, 487), seed=1)
    path = tmp_path / "still.cbf"
    write_minicbf(path, counts, expt, image=1)
    data, convention, h, g = read_back(path)
    assert np.array_equal(data, counts[0]) and convention == "PILATUS_1.2"
    assert h["Detector"].startswith("PILATUS 100K")
    assert g["start"] == 0.0 and g["width"] == 0.0 and g["exposure"] == 0.0  # a still: no scan, no exposure
    np.testing.assert_allclose([-g["beam_mm"][0], g["beam_mm"][1], -g["distance"]], [-40.0, 50.0, -100.0],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simulator_experiment(tmp_path, dtype):
    """A nanoBragg-flag experiment (beam along +x): the header's distance and
    beam centre place the panel origin where the simulator has it."""
    sim = torchbragg.Simulator.from_args(["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "1",
                                          "-detpixels", "64", "-pixel", "0.1", "-distance", "120",
                                          "-Xbeam", "2.9", "-Ybeam", "3.75", "-lambda", "1.3",
                                          "-phi", "10", "-osc", "0.5"], dtype=dtype)
    sim.scan.extras["exposure_time"] = [0.25]
    expt = Experiment(beam=sim.beam, detector=sim.detector, goniometer=sim.goniometer, scan=sim.scan)
    counts = counts_for((64, 64), seed=2)
    path = tmp_path / "sim_0001.cbf"
    write_minicbf(path, counts, expt, image=1)
    data, convention, h, g = read_back(path)
    assert np.array_equal(data, counts)
    assert convention == "GENERIC_MINI" and "PILATUS" not in h["Detector"]  # not a Pilatus module tiling
    assert g["pixel"] == pytest.approx([0.1, 0.1], abs=1e-9)
    assert g["wavelength"] == pytest.approx(1.3, abs=1e-6)
    assert g["start"] == pytest.approx(10.0) and g["width"] == pytest.approx(0.5)
    assert g["exposure"] == pytest.approx(0.25)
    # nanoBragg's frame (beam +x, spindle +z) turned to the reader's: (x, y, z) -> (z, y, -x)
    origin, fast, slow, normal = frames(expt)
    q = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    assert g["distance"] == pytest.approx(float(origin @ normal), abs=1e-6)
    rebuilt = np.array([-g["beam_mm"][0], g["beam_mm"][1], -g["distance"]])
    np.testing.assert_allclose(rebuilt, q @ origin, rtol=0, atol=1e-6)
    np.testing.assert_allclose(q @ fast, [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(q @ slow, [0.0, -1.0, 0.0], atol=1e-12)


def test_modules_are_assembled_with_gaps(tmp_path):
    """A Pilatus 300K as three modules at their raw offsets: one frame with
    -1 in the gap rows, the header describing the frame of the first module."""
    top = np.array(ORIGIN)
    modules = [panel(origin=tuple(top + [0.0, -212 * j * PX, 0.0]), size=(487, 195), name=f"module_{j}",
                     raw_image_offset=[0, 212 * j]) for j in range(3)]
    expt = experiment(modules)
    parts = [counts_for((195, 487), seed=10 + j) for j in range(3)]
    path = tmp_path / "modules.cbf"
    write_minicbf(path, np.stack(parts), expt, image=10)
    data, convention, h, g = read_back(path)
    assert data.shape == (619, 487) and convention == "PILATUS_1.2" and h["Detector"].startswith("PILATUS 300K")
    for j in range(3):
        assert np.array_equal(data[212 * j:212 * j + 195], parts[j])
    assert (data[195:212] == -1).all() and (data[407:424] == -1).all()
    np.testing.assert_allclose([-g["beam_mm"][0], g["beam_mm"][1], -g["distance"]], ORIGIN, rtol=0, atol=1e-6)
    assert g["start"] == pytest.approx(30.9)


def no_files(folder):
    return sorted(os.listdir(folder)) == []


@pytest.mark.parametrize("case, message", [
    ("tilted", "tilted 10 deg .* write NeXus"),
    ("no_offsets", "overlaps another panel .* NeXus"),
    ("overlap", "overlaps another panel"),
    ("misplaced", "misplace pixels of panel 1 .* write NeXus"),
    ("outside_scan", "image 11 is outside the scan's images 1..10"),
    ("float_counts", "counts must be integers"),
    ("wrong_shape", r"counts have shape \(10, 10\)"),
])
def test_refusals_leave_no_file(tmp_path, case, message):
    c = math.cos(math.radians(10.0))
    s = math.sin(math.radians(10.0))
    small = dict(size=(487, 195))
    panels = {"tilted": [panel(fast=(c, 0.0, s), **small)],
              "no_offsets": [panel(**small), panel(origin=(-211.5, 0.0, -190.0), **small)],
              "overlap": [panel(**small), panel(**small)],
              "misplaced": [panel(**small), panel(raw_image_offset=[0, 212], **small)],
              }.get(case, [panel(**small)])
    if case == "no_offsets":
        for p in panels:
            del p["raw_image_offset"]
    expt = experiment(panels)
    counts = np.zeros((len(panels), 195, 487), np.int32)
    image = 11 if case == "outside_scan" else 1
    if case == "float_counts":
        counts = counts.astype(np.float32)
    if case == "wrong_shape":
        counts = np.zeros((10, 10), np.int32)
    with pytest.raises(ValueError, match=message):
        write_minicbf(tmp_path / "x.cbf", counts, expt, image=image)
    assert no_files(tmp_path)
    if case not in ("float_counts", "wrong_shape"):
        with pytest.raises(ValueError, match=message):
            pilatus_header(expt, image)


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    from fabio.cbfimage import CbfImage

    expt = experiment([panel(size=(487, 195))])
    path = tmp_path / "x.cbf"
    path.write_bytes(b"old")

    def broken(self, fname):
        with open(fname, "wb") as fh:
            fh.write(b"###CBF: half")
        raise RuntimeError("disk went away")

    monkeypatch.setattr(CbfImage, "write", broken)
    with pytest.raises(RuntimeError, match="disk went away"):
        write_minicbf(path, np.zeros((195, 487), np.int32), expt, image=1)
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["x.cbf"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="cannot write"):
        write_minicbf(tmp_path / "missing" / "x.cbf", np.zeros((195, 487), np.int32), expt, image=1)
    assert sorted(os.listdir(tmp_path)) == ["x.cbf"]


def test_header_is_deterministic_and_uses_scan_epochs():
    d = doc([panel(size=(487, 195))])
    d["scan"][0] = {"image_range": [1, 2], "properties": {"oscillation": [0.0, 0.2], "epochs": [1.5e9, 1.5e9 + 0.2],
                                                          "exposure_time": [0.2, 0.2]}}
    expt = experiments_from_dict(copy.deepcopy(d))[0]
    h = parse(pilatus_header(expt, 2))
    assert h["timestamp"] == "2017-07-14T02:40:00.200"
    assert float(h["Start_angle"].split()[0]) == pytest.approx(0.2)
    assert float(h["Exposure_time"].split()[0]) == float(h["Exposure_period"].split()[0]) == pytest.approx(0.2)
    assert pilatus_header(expt, 2) == pilatus_header(expt, 2)


@pytest.mark.parametrize("degrees, written", [(0.002, True), (0.01, False)])
def test_tilt_is_written_only_within_a_tenth_of_a_pixel(tmp_path, degrees, written):
    """A 6M-sized panel 190 mm away: 0.002 deg of tilt moves its far corners by
    about 0.07 px in dxtbx's untilted model (written), 0.01 deg by 0.35 px (refused)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    expt = experiment([panel(fast=(c, 0.0, s))])
    counts = np.zeros((2527, 2463), np.int32)
    if written:
        write_minicbf(tmp_path / "x.cbf", counts, expt, image=1)
        assert (fabio.open(str(tmp_path / "x.cbf")).data >= -1).all()
    else:
        with pytest.raises(ValueError, match=r"misplace pixels of panel 0 \('Panel'\) by 0\.3\d+ px"):
            write_minicbf(tmp_path / "x.cbf", counts, expt, image=1)
        assert no_files(tmp_path)


def test_compressed_cbf_frames_read_as_the_plain_file(tmp_path):
    """Beamlines archive CBF frames bzip2- or gzip-compressed; they read as
    the file inside. A cut or foreign stream is refused with one line."""
    import bz2
    import gzip

    from golden import DATA
    from torchbragg.errors import InputError
    from torchbragg.io.dials import read_experiments
    from torchbragg.io.images import read_image

    e = read_experiments(str(DATA / "lcys_02" / "23_integrated.expt"))[0]
    packed = DATA / "lcys_02" / "l-cyst_02_00004.cbf.bz2"
    plain = tmp_path / "frame.cbf"
    plain.write_bytes(bz2.decompress(packed.read_bytes()))
    (tmp_path / "frame.cbf.gz").write_bytes(gzip.compress(plain.read_bytes()))
    want, valid = read_image(str(plain), e.detector)
    for path in (packed, tmp_path / "frame.cbf.gz"):
        got, ok = read_image(str(path), e.detector)
        assert np.array_equal(got, want) and np.array_equal(ok, valid)
    assert want.sum() > 0 and (~valid).any()  # photons, and the module gaps left out
    (tmp_path / "cut.cbf.bz2").write_bytes(packed.read_bytes()[:20000])
    with pytest.raises(InputError, match="cut short"):
        read_image(str(tmp_path / "cut.cbf.bz2"), e.detector)
    (tmp_path / "junk.cbf.gz").write_bytes(b"not a gzip stream")
    with pytest.raises(InputError, match="not a valid gz file"):
        read_image(str(tmp_path / "junk.cbf.gz"), e.detector)
