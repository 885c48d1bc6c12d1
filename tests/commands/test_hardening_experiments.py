"""The experiment, dataset and refinement paths refuse bad input as the
nanoBragg command does.

One table per class of bad input, several instances each, run through
`torchbragg simulate` and `torchbragg refine` in-process (exit status 2,
exactly one stderr line naming the problem, no traceback, no file left) and
through the Python API (InputError, a ValueError, with the same text).
Degenerate but legal inputs give a warning and a finite, non-negative image.
"""

import copy
import json
import os
import time

import numpy as np
import pytest

from torchbragg import dataset as ds
from torchbragg.commands import refine as refine_cmd
from torchbragg.commands import simulate as simulate_cmd
from torchbragg.errors import InputError
from torchbragg.io.dials import beam_from_dict, experiments_from_dict, read_experiments
from torchbragg.io.images import read_image

PHYSICS = ["-N", "2", "-default_F", "100", "-oversample", "1"]
PIXELS = 16


def identity():
    return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def base_doc(images=3):
    """A 16x16-pixel detector 50 mm from a 70x80x90 A crystal; a sweep of
    `images` 1-degree images about z."""
    half = PIXELS * 0.4 / 2
    panel = {"name": "", "type": "SENSOR_PAD", "fast_axis": [0.0, 0.0, 1.0], "slow_axis": [0.0, -1.0, 0.0],
             "origin": [50.0, half, -half], "raw_image_offset": [0, 0], "image_size": [PIXELS, PIXELS],
             "pixel_size": [0.4, 0.4], "trusted_range": [-1.0, 1e9], "thickness": 0.0, "material": "",
             "mu": 0.0, "mask": []}
    return {
        "__id__": "ExperimentList",
        "experiment": [{"__id__": "Experiment", "beam": 0, "detector": 0, "goniometer": 0, "scan": 0,
                        "crystal": 0}],
        "beam": [{"__id__": "monochromatic", "direction": [-1.0, 0.0, 0.0], "wavelength": 1.0,
                  "polarization_normal": [0.0, -1.0, 0.0], "polarization_fraction": 0.5}],
        "detector": [{"panels": [panel]}],
        "goniometer": [{"rotation_axis": [0.0, 0.0, 1.0], "fixed_rotation": identity(),
                        "setting_rotation": identity()}],
        "scan": [{"image_range": [1, images], "properties": {"oscillation": [float(i) for i in range(images)],
                                                              "exposure_time": [1.0] * images}}],
        "crystal": [{"__id__": "crystal", "real_space_a": [70.0, 0.0, 0.0], "real_space_b": [0.0, 80.0, 0.0],
                     "real_space_c": [0.0, 0.0, 90.0], "space_group_hall_symbol": " P 1"}],
    }


def still_doc():
    doc = base_doc(1)
    del doc["experiment"][0]["goniometer"], doc["experiment"][0]["scan"]
    doc["goniometer"], doc["scan"] = [], []
    return doc


def edit(path, value, doc=None):
    """A copy of `doc` (default base_doc()) with the field at `path` (keys and
    indices) set to `value`, or removed for value DELETE."""
    doc = copy.deepcopy(doc or base_doc())
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


DELETE = object()
PANEL = ("detector", 0, "panels", 0)
SCAN = ("scan", 0)


def write(tmp, doc, name="m.expt"):
    path = tmp / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def in_dir(tmp, fn, *args):
    old = os.getcwd()
    os.chdir(tmp)
    try:
        return fn(*args)
    finally:
        os.chdir(old)


def run(main, argv, tmp, capsys, stdout=None):
    """(exit status, stderr lines) of a command run in `tmp`; its stdout goes to the list `stdout`."""
    rc = in_dir(tmp, main, argv)
    captured = capsys.readouterr()
    if stdout is not None:
        stdout.append(captured.out)
    return rc, captured.err.strip().splitlines()


def simulate(tmp, capsys, expt="m.expt", extra=(), out="p", physics=PHYSICS, stdout=None):
    return run(simulate_cmd.main, [expt, "--out", out, "--quiet", *physics, *extra], tmp, capsys, stdout)


def refused(rc, err, words, prog, tmp, leftover="p"):
    assert rc == 2, (rc, err)
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: "), err
    assert words in err[0], (words, err)
    assert "Traceback" not in err[0]
    left = [p.name for p in tmp.iterdir() if p.name.startswith(leftover) or ".tmp" in p.name]
    assert not left, left
    return err[0][len(f"{prog}: error: "):]


def same_text_from_api(message, fn):
    with pytest.raises(InputError) as info:
        fn()
    assert isinstance(info.value, ValueError)
    assert str(info.value) == message


def images_of(tmp, prefix="p"):
    return {p.name: np.load(p) for p in sorted(tmp.glob(f"{prefix}_*.npy"))}


def finite_non_negative(images):
    assert images
    for name, im in images.items():
        assert im.shape == (1, PIXELS, PIXELS), name
        assert np.isfinite(im).all() and (im >= 0).all(), name


# ----------------------------------------------------------------------------- class 2: one line, not a traceback

C2_FILES = [
    ("beam_is_a_string", lambda: edit(("beam", 0), "monochromatic"), "beam must be a JSON object"),
    ("image_size_words", lambda: edit(PANEL + ("image_size",), ["a", "b"]),
     "'image_size' must be 2 numbers, got [\"a\", \"b\"]"),
    ("mask_two_numbers", lambda: edit(PANEL + ("mask",), [[1, 2]]), "'mask' must be 4 numbers"),
    ("trusted_range_one", lambda: edit(PANEL + ("trusted_range",), [1]),
     "'trusted_range' must be 2 numbers, got [1]"),
    ("three_axes_one_angle", lambda: edit(("goniometer", 0), {"axes": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                                                              "angles": [10], "scan_axis": 1}),
     "'angles' must be 3 numbers"),
    ("oscillation_empty", lambda: edit(SCAN + ("properties", "oscillation"), []), "lists 0 values for the 3 images"),
    ("oscillation_pair_empty", lambda: edit(SCAN + ("oscillation",), [], edit(SCAN + ("properties",), DELETE)),
     "'oscillation' must be 2 numbers"),
    ("fast_parallel_slow", lambda: edit(PANEL + ("slow_axis",), [0.0, 0.0, -2.0]), "are parallel"),
    ("plane_through_sample", lambda: edit(PANEL + ("origin",), [0.0, 3.2, -3.2]), "passes through the sample"),
    ("panel_10_km_away", lambda: edit(PANEL + ("origin",), [1e7, 3.2, -3.2]), "lies 1e+07 mm from the sample"),
    ("wavelength_1e-300", lambda: edit(("beam", 0, "wavelength"), 1e-300), "outside the physical range"),
    ("pixel_1e30_mm", lambda: edit(PANEL + ("pixel_size",), [1e30, 1e30]), "'pixel_size' 1e+30 mm is outside"),
    ("image_size_huge", lambda: edit(PANEL + ("image_size",), [10 ** 9, 10 ** 9]), "GiB for their images"),
    ("panel_edge_huge", lambda: edit(PANEL + ("image_size",), [10 ** 6, 1]), "beyond any detector"),
    ("many_big_panels", lambda: edit(("detector", 0, "panels"), [dict(base_doc()["detector"][0]["panels"][0],
                                                                      image_size=[90000, 90000])] * 100),
     "GiB for their images"),
    ("scan_axis_text", lambda: edit(("goniometer", 0), {"axes": [[1, 0, 0]], "scan_axis": "x"}),
     "'scan_axis' must be an integer"),
    ("crystal_vector_text", lambda: edit(("crystal", 0, "real_space_a"), "70 0 0"),
     "'real_space_a' must be 3 numbers"),
    ("crystal_vector_huge", lambda: edit(("crystal", 0, "real_space_a"), [1e300, 0, 0]), "longer than 1e5 A"),
    ("hierarchy_child_panel_text", lambda: edit(("detector", 0, "hierarchy"), {
        "origin": [0, 0, 0], "fast_axis": [1, 0, 0], "slow_axis": [0, 1, 0], "children": [{"panel": "0"}]}),
     "'panel' must be an integer"),
    ("nested_500_levels", lambda: json.dumps(base_doc())[:-1] + ', "history": ' + "[" * 500 + "]" * 500 + "}",
     "nested more than 64 levels"),
    ("nested_100000_levels", lambda: '{"experiment": ' + "[" * 100000 + "]" * 100000 + "}",
     "nested deeper than JSON readers allow"),
    ("experiment_is_a_number", lambda: edit(("experiment", 0), 7), "experiment 0 must be a JSON object"),
]


@pytest.mark.parametrize("name,make,words", C2_FILES, ids=[c[0] for c in C2_FILES])
def test_c2_malformed_experiment_fields_are_one_line(tmp_path, capsys, name, make, words):
    path = write(tmp_path, make())
    message = refused(*simulate(tmp_path, capsys), words, "torchbragg simulate", tmp_path)
    same_text_from_api(message.replace("m.expt", str(path)), lambda: read_experiments(str(path)))


def test_c2_api_and_option_tracebacks_are_one_line(tmp_path, capsys):
    with pytest.raises(InputError, match="beam must be a JSON object"):
        beam_from_dict("monochromatic")
    with pytest.raises(InputError, match="beam must be a JSON object"):
        experiments_from_dict(edit(("beam", 0), ["x"]))
    write(tmp_path, base_doc())
    refused(*simulate(tmp_path, capsys, extra=["-xtalsize", "1e6"], physics=PHYSICS[:4]),
            "automatic oversampling would take",
            "torchbragg simulate", tmp_path)
    (tmp_path / "orient.bin").write_bytes(bytes(range(256)) * 4)
    refused(*simulate(tmp_path, capsys, extra=["--orientations", "orient.bin"]), "orient.bin is not a text file",
            "torchbragg simulate", tmp_path)
    same_text_from_api(f"{tmp_path / 'orient.bin'} is not a text file",
                       lambda: ds.read_orientations(str(tmp_path / "orient.bin")))
    refused(*simulate(tmp_path, capsys, extra=["--spectra", "orient.bin"]), "orient.bin is not a text file",
            "torchbragg simulate", tmp_path)


# ----------------------------------------------------------------------------- class 3: inconsistent files

C3_FILES = [
    ("oscillation_widths_differ", lambda: edit(SCAN + ("properties", "oscillation"), [0.0, 1.0, 3.0]),
     "oscillation widths differ"),
    ("exposure_times_short", lambda: edit(SCAN + ("properties", "exposure_time"), [1.0]),
     "'exposure_time' lists 1 values for the 3 images"),
    ("axes_not_perpendicular", lambda: edit(PANEL + ("slow_axis",), [0.0, -1.0, 0.01]), "not perpendicular"),
    ("thickness_negative", lambda: edit(PANEL + ("thickness",), -0.3), "'thickness' -0.3 mm"),
    ("mu_negative", lambda: edit(PANEL + ("mu",), -2.0), "'mu' -2"),
    ("polarization_fraction_2", lambda: edit(("beam", 0, "polarization_fraction"), 2), "not a fraction"),
    ("fixed_rotation_zero", lambda: edit(("goniometer", 0, "fixed_rotation"), [0.0] * 9),
     "'fixed_rotation' is not a rotation"),
    ("setting_rotation_mirror", lambda: edit(("goniometer", 0, "setting_rotation"), [-1.0, 0, 0, 0, 1, 0, 0, 0, 1]),
     "'setting_rotation' is not a rotation"),
    ("scan_without_goniometer", lambda: edit(("experiment", 0, "goniometer"), DELETE),
     "no goniometer to turn the crystal"),
    ("mask_rectangle_reversed", lambda: edit(PANEL + ("mask",), [[5, 5, 2, 2]]), "is empty"),
]


@pytest.mark.parametrize("name,make,words", C3_FILES, ids=[c[0] for c in C3_FILES])
def test_c3_inconsistent_experiment_files_are_refused(tmp_path, capsys, name, make, words):
    path = write(tmp_path, make())
    message = refused(*simulate(tmp_path, capsys), words, "torchbragg simulate", tmp_path)
    same_text_from_api(message.replace("m.expt", str(path)), lambda: read_experiments(str(path)))


def test_c3_degenerate_but_legal_inputs_warn_and_render(tmp_path, capsys):
    # an all-masked panel: a warning, and an image that is empty, not wrong
    write(tmp_path, edit(PANEL + ("mask",), [[1, 1, PIXELS, PIXELS]]))
    rc, err = simulate(tmp_path, capsys, extra=["--images", "1:1"])
    assert rc == 0 and err == ["WARNING: detector panel 0 is masked entirely: it stays empty"], err
    images = images_of(tmp_path)
    finite_non_negative(images)
    assert not images["p_00001.npy"].any()
    # a sweep file of zero-width images: a warning; every image is the still at the start angle
    write(tmp_path, edit(SCAN + ("properties", "oscillation"), [5.0, 5.0, 5.0]), "zero.expt")
    rc, err = simulate(tmp_path, capsys, expt="zero.expt", out="z")
    assert rc == 0 and len(err) == 1 and "oscillation width of 0" in err[0] and "5 degrees" in err[0], err
    images = images_of(tmp_path, "z")
    finite_non_negative(images)
    first = images["z_00001.npy"]
    assert first.max() > 0 and all(np.array_equal(first, im) for im in images.values())


ACCEPTED = [
    ("axes_nearly_perpendicular", lambda: edit(PANEL + ("slow_axis",), [0.0, -1.0, 1e-8])),
    ("polarization_fraction_0", lambda: edit(("beam", 0, "polarization_fraction"), 0.0)),
    ("polarization_fraction_1", lambda: edit(("beam", 0, "polarization_fraction"), 1.0)),
    ("image_range_as_floats", lambda: edit(SCAN + ("image_range",), [1.0, 3.0])),
    ("short_wavelength", lambda: edit(("beam", 0, "wavelength"), 0.01)),
    ("thick_absorbing_sensor", lambda: edit(PANEL + ("mu",), 3.0, edit(PANEL + ("thickness",), 0.45))),
]


@pytest.mark.parametrize("name,make", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_accepted_extremes_give_finite_non_negative_images(tmp_path, capsys, name, make):
    write(tmp_path, make())
    rc, err = simulate(tmp_path, capsys, extra=["--images", "2:2"])
    assert rc == 0 and not err, err
    finite_non_negative(images_of(tmp_path))


# ----------------------------------------------------------------------------- class 4: runaways


def cbf_file(tmp, name="x.cbf", data=None):
    from fabio.cbfimage import CbfImage
    data = np.arange(PIXELS * PIXELS, dtype=np.int32).reshape(PIXELS, PIXELS) % 7 if data is None else data
    path = tmp / name
    CbfImage(data=data).write(str(path))
    return path


def test_c4_runaways_are_bounded_before_any_work(tmp_path, capsys, monkeypatch):
    # a scan of a billion images is refused when read, without building its list
    write(tmp_path, edit(SCAN + ("image_range",), [1, 1e9]), "huge.expt")
    t0 = time.perf_counter()
    refused(*simulate(tmp_path, capsys, expt="huge.expt"), "more than the 1000000 a scan may hold",
            "torchbragg simulate", tmp_path)
    assert time.perf_counter() - t0 < 5
    write(tmp_path, base_doc())
    refused(*simulate(tmp_path, capsys, extra=["--images", "1:1000000000"]), "outside the scan's images 1:3",
            "torchbragg simulate", tmp_path)
    refused(*simulate(tmp_path, capsys, extra=["--stills", "1000000000"]), "more than the 1000000 shots",
            "torchbragg simulate", tmp_path)
    refused(*simulate(tmp_path, capsys, extra=["--images", "3:1"]), "--images 3:1 is empty",
            "torchbragg simulate", tmp_path)
    # two sweeps each within the limit, together beyond it: refused before any list is built
    doc = edit(SCAN, {"image_range": [1, 600000], "oscillation": [0.0, 0.01]})
    doc["experiment"].append(dict(doc["experiment"][0]))
    write(tmp_path, doc, "two.expt")
    t0 = time.perf_counter()
    refused(*simulate(tmp_path, capsys, expt="two.expt"), "would hold 1200000 images, more than the 1000000",
            "torchbragg simulate", tmp_path)
    assert time.perf_counter() - t0 < 5
    # --workers beyond the images and CPUs is capped, with a note
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    rc, err = simulate(tmp_path, capsys, extra=["--workers", "1000"])
    assert rc == 0 and err == ["note: --workers 1000 capped at 1 (3 images to render, 1 CPUs)"], err
    assert sorted(images_of(tmp_path)) == ["p_00001.npy", "p_00002.npy", "p_00003.npy"]


def test_c4_cbf_cut_inside_its_binary_section_is_refused(tmp_path, capsys):
    write(tmp_path, still_doc())
    detector = read_experiments(str(tmp_path / "m.expt"))[0].detector
    whole = cbf_file(tmp_path).read_bytes()
    start = whole.index(b"\x0c\x1a\x04\xd5")
    size = int(whole.split(b"X-Binary-Size:")[1].split()[0])
    for cut in (start + 2, start + 40, start + 4 + size - 1):
        (tmp_path / "cut.cbf").write_bytes(whole[:cut])
        t0 = time.perf_counter()
        rc, err = run(refine_cmd.main, ["m.expt", "cut.cbf", "--out", "r", *PHYSICS], tmp_path, capsys)
        assert time.perf_counter() - t0 < 10
        message = refused(rc, err, "cannot read CBF image cut.cbf", "torchbragg refine", tmp_path, "r")
        assert any(w in message for w in ("cut short", "corrupt", "no binary section")), message
        same_text_from_api(message, lambda: in_dir(tmp_path, read_image, "cut.cbf", detector))


# ----------------------------------------------------------------------------- class 5: outputs


def test_c5_output_names_are_checked_before_any_image(tmp_path, capsys):
    write(tmp_path, base_doc())
    refused(*simulate(tmp_path, capsys, out=""), "--out is empty", "torchbragg simulate", tmp_path)
    (tmp_path / "o").mkdir()
    refused(*simulate(tmp_path, capsys, out="o/"), "names a folder; give a file name prefix inside it",
            "torchbragg simulate", tmp_path)
    assert not list((tmp_path / "o").iterdir()) and not list(tmp_path.glob("o_*"))
    (tmp_path / "p.expt").mkdir()
    rc, err = simulate(tmp_path, capsys)
    assert rc == 2 and err == [f"torchbragg simulate: error: cannot write {tmp_path / 'p.expt'}: it is a folder"]
    assert not list(tmp_path.glob("p_*"))
    (tmp_path / "p.expt").rmdir()
    (tmp_path / "p_00002.npy").mkdir()
    rc, err = simulate(tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and "p_00002.npy: it is a folder" in err[0]
    assert [p.name for p in tmp_path.glob("p*")] == ["p_00002.npy"]


def test_c5_a_failed_run_leaves_nothing_unless_resumed(tmp_path, capsys, monkeypatch):
    write(tmp_path, base_doc())
    render = ds.Renderer.render

    def fail_on_shot_2(self, shot):
        if shot.number == 2:
            raise InputError("shot 2 failed")
        return render(self, shot)

    monkeypatch.setattr(ds.Renderer, "render", fail_on_shot_2)
    for fmt in ("npy", "smv", "nxs"):
        rc, err = simulate(tmp_path, capsys, extra=["--format", fmt])
        assert rc == 2 and err == ["torchbragg simulate: error: shot 2 failed"]
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("p")]
    # with --resume the complete image 1 is kept by design, and the rerun completes the set
    rc, err = simulate(tmp_path, capsys, extra=["--resume"])
    assert rc == 2 and sorted(p.name for p in tmp_path.glob("p*")) == ["p_00001.npy"]
    monkeypatch.setattr(ds.Renderer, "render", render)
    rc, err = simulate(tmp_path, capsys, extra=["--resume"])
    assert rc == 0 and sorted(images_of(tmp_path)) == ["p_00001.npy", "p_00002.npy", "p_00003.npy"]


@pytest.mark.parametrize("fmt,ext", [("npy", "npy"), ("smv", "img"), ("cbf", "cbf")])
def test_c5_resume_renders_again_what_is_not_whole(tmp_path, capsys, fmt, ext):
    write(tmp_path, base_doc())
    assert simulate(tmp_path, capsys, extra=["--format", fmt])[0] == 0
    whole = {k: (tmp_path / f"p_{k:05d}.{ext}").read_bytes() for k in (1, 2, 3)}
    (tmp_path / f"p_00002.{ext}").write_bytes(whole[2][: len(whole[2]) // 2])  # cut
    (tmp_path / f"p_00003.{ext}").write_bytes(b"")  # empty
    if fmt == "npy":  # a readable file of the wrong shape
        np.save(tmp_path / "p_00001.npy", np.zeros((1, 4, 4), np.float32))
    stdout = []
    rc, err = simulate(tmp_path, capsys, extra=["--resume", "--format", fmt], stdout=stdout)
    assert rc == 0 and not err, err
    if fmt == "npy":  # every file was cut, empty or of the wrong shape
        assert "resuming" not in stdout[0]
    else:
        assert "resuming: 1 of 3 images already written" in stdout[0]
    detector = _detector(tmp_path)
    for k in (1, 2, 3):
        again = tmp_path / f"p_{k:05d}.{ext}"
        if fmt == "cbf":  # miniCBF headers carry the time of writing: compare the pixels
            (tmp_path / "whole.cbf").write_bytes(whole[k])
            assert np.array_equal(read_image(str(again), detector)[0],
                                  read_image(str(tmp_path / "whole.cbf"), detector)[0])
        else:
            assert again.read_bytes() == whole[k]


def _detector(tmp):
    return read_experiments(str(tmp / "m.expt"))[0].detector


# ----------------------------------------------------------------------------- class 6: accurate messages

C6 = [
    ("oscillation_nan", lambda t: write(t, edit(SCAN + ("properties", "oscillation"), [0.0, float("nan"), 2.0])),
     [], "'oscillation' is not finite"),
    ("polarization_normal_along_beam", lambda t: write(t, edit(("beam", 0, "polarization_normal"), [2.0, 0, 0])),
     [], "'polarization_normal' lies along the beam"),
    ("spectrum_1e300_eV", lambda t: (write(t, base_doc()), (t / "s.txt").write_text("1 1e300 1\n")),
     ["--spectra", "s.txt"], "energy 1e+300 eV) is outside the physical range"),
    ("spectrum_weights_zero", lambda t: (write(t, base_doc()), (t / "s.txt").write_text("1 9000 0\n")),
     ["--spectra", "s.txt"], "add up to more than zero"),
    ("stills_1e9", lambda t: write(t, base_doc()), ["--stills", "1000000000"], "--stills 1000000000 is more than"),
    ("wavelength_negative", lambda t: write(t, edit(("beam", 0, "wavelength"), -1.0)), [],
     "beam wavelength must be positive"),
]


@pytest.mark.parametrize("name,setup,extra,words", C6, ids=[c[0] for c in C6])
def test_c6_each_problem_has_its_own_message(tmp_path, capsys, name, setup, extra, words):
    setup(tmp_path)
    message = refused(*simulate(tmp_path, capsys, extra=extra), words, "torchbragg simulate", tmp_path)
    assert "fluence and structure factors" not in message and "memory" not in message


def test_c6_reader_libraries_print_nothing_of_their_own(tmp_path, capfd):
    write(tmp_path, still_doc())
    (tmp_path / "junk.nxs").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)
    raw = bytearray(cbf_file(tmp_path).read_bytes())
    raw[raw.index(b"X-Binary-Size:"):raw.index(b"X-Binary-Size:") + 14] = b"X-Binary-Siz0:"
    (tmp_path / "nosize.cbf").write_bytes(bytes(raw))
    for image, words in (("junk.nxs", "cannot read NeXus image junk.nxs"),
                         ("nosize.cbf", "declares no X-Binary-Size")):
        rc = in_dir(tmp_path, refine_cmd.main, ["m.expt", image, "--out", "r", *PHYSICS])
        err = capfd.readouterr().err.strip().splitlines()
        refused(rc, err, words, "torchbragg refine", tmp_path, "r")


# ----------------------------------------------------------------------------- class 7: image files for refine


def nexus_file(path, frames, mask=None, data_group=False):
    import h5py
    with h5py.File(path, "w") as f:
        if data_group:
            f.create_group("entry/data/data")
        else:
            f.create_dataset("entry/data/data", data=frames)
        if mask is not None:
            f.create_dataset("entry/instrument/detector/pixel_mask", data=mask)


def _npy_bomb(path, shape):
    """An .npy header declaring `shape` float64 with 64 bytes of data."""
    import io
    from numpy.lib import format as npy
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    path.write_bytes(buf.getvalue() + bytes(64))


def _corrupt_cbf(t):
    raw = bytearray(cbf_file(t).read_bytes())
    raw[raw.index(b"\x0c\x1a\x04\xd5") + 20] ^= 0x55
    (t / "bad.cbf").write_bytes(bytes(raw))
    return "bad.cbf", []


C7 = [
    ("cbf_corrupted_bytes", _corrupt_cbf, "binary section is corrupt"),
    ("nexus_mask_wrong_shape", lambda t: (nexus_file(t / "m.nxs", np.ones((2, PIXELS, PIXELS)),
                                                     mask=np.zeros((4, 4), np.int32)), ("m.nxs", []))[1],
     "pixel_mask has shape (4, 4)"),
    ("nexus_data_is_a_group", lambda t: (nexus_file(t / "g.nxs", None, data_group=True), ("g.nxs", []))[1],
     "/entry/data/data is a group"),
    ("still_nexus_image_3", lambda t: (nexus_file(t / "s.nxs", np.ones((4, PIXELS, PIXELS))),
                                       ("s.nxs", ["--image", "3"]))[1], "--image 3 is outside the still's images"),
    ("all_zero_image", lambda t: (np.save(t / "zero.npy", np.zeros((PIXELS, PIXELS), np.float32)),
                                  ("zero.npy", []))[1], "every valid pixel is 0"),
    ("npy_declares_a_huge_array", lambda t: (_npy_bomb(t / "big.npy", (100000, 100000)), ("big.npy", []))[1],
     "beyond any detector's image"),
    ("npy_cut_short", lambda t: (_npy_bomb(t / "cut.npy", (PIXELS, PIXELS)), ("cut.npy", []))[1], "is cut short"),
    ("out_empty", lambda t: (np.save(t / "one.npy", np.ones((PIXELS, PIXELS), np.float32)),
                             ("one.npy", ["--out", ""]))[1], "--out is empty"),
    ("all_zero_nexus", lambda t: (nexus_file(t / "z.nxs", np.zeros((1, PIXELS, PIXELS))), ("z.nxs", []))[1],
     "every valid pixel is 0"),
]


@pytest.mark.parametrize("name,setup,words", C7, ids=[c[0] for c in C7])
def test_c7_refine_refuses_broken_image_files(tmp_path, capsys, name, setup, words):
    write(tmp_path, still_doc())
    image, extra = setup(tmp_path)
    rc, err = run(refine_cmd.main, ["m.expt", image, "--out", "r", *extra, *PHYSICS], tmp_path, capsys)
    message = refused(rc, err, words, "torchbragg refine", tmp_path, "r")
    if not extra:
        detector = _detector(tmp_path)
        same_text_from_api(message, lambda: in_dir(tmp_path, read_image, image, detector))


def test_c7_intact_cbf_and_nexus_mask_are_read(tmp_path):
    write(tmp_path, still_doc())
    detector = _detector(tmp_path)
    frame = (np.arange(PIXELS * PIXELS, dtype=np.int32).reshape(PIXELS, PIXELS) % 7) + 1
    data, valid = read_image(str(cbf_file(tmp_path, data=frame)), detector)
    assert np.array_equal(data[0], frame) and valid.all()
    mask = np.zeros((PIXELS, PIXELS), np.int32)
    mask[3, 4] = 1
    nexus_file(tmp_path / "ok.nxs", frame[None].astype(np.float32), mask=mask)
    data, valid = read_image(str(tmp_path / "ok.nxs"), detector)
    assert not valid[0, 3, 4] and valid.sum() == PIXELS * PIXELS - 1


# ----------------------------------------------------------------------------- class 8: the Python API


C8 = [
    ("not_a_rotation", dict(stills=1, orientations=[np.diag([1.0, 1.0, 2.0])]), "the matrix is not a rotation"),
    ("mirror", dict(orientations=[np.diag([1.0, 1.0, -1.0])]), "the matrix is not a rotation"),
    ("nan_matrix", dict(orientations=[np.full((3, 3), np.nan)]), "the matrix is not a rotation"),
    ("negative_wavelengths", dict(spectra={1: (np.array([-1.0, 1.0]), np.array([1.0, 1.0]))}),
     "wavelength -1 A"),
    ("zero_wavelength", dict(spectra={1: ([0.0], [1.0])}), "wavelength 0 A is outside the physical range"),
    ("negative_weights", dict(spectra={2: (np.array([1.0]), np.array([-1.0]))}), "not negative"),
    ("stills_minus_1", dict(stills=-1), "--stills expects a number of shots >= 1, got -1"),
    ("stills_float", dict(stills=2.5), "--stills expects a number of shots >= 1, got 2.5"),
    ("stills_1e9", dict(stills=10 ** 9), "more than the 1000000 shots"),
    ("experiment_minus_1", dict(experiment=-1), "--experiment -1"),
    ("orientation_seed_minus_1", dict(stills=2, orientation_seed=-1), "--orientation-seed expects an integer >= 0"),
]


@pytest.mark.parametrize("name,kw,words", C8, ids=[c[0] for c in C8])
def test_c8_dataset_api_refuses_bad_arguments(tmp_path, name, kw, words):
    path = write(tmp_path, base_doc())
    experiments = read_experiments(str(path))
    with pytest.raises(InputError) as info:
        ds.plan(experiments, **kw)
    assert words in str(info.value)
    with pytest.raises(ValueError) as info:
        next(ds.images(str(path), PHYSICS, **kw))
    assert words in str(info.value)
