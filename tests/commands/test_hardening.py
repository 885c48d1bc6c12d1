"""Every input gives a finite, non-negative image or one clear line.

One table per class of bad input, several instances each. Every refused
case is run through the command line (non-zero status, exactly one stderr
line naming the problem, no traceback, no file left behind) and, where it is
not about output files, through the Python API, which must raise a
ValueError with the same message.
"""

import math
import os
import stat
import struct
import sys

import numpy as np
import pytest

import torchbragg
from torchbragg.commands.nanobragg import main
from torchbragg.errors import InputError

GOOD = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "10", "-N", "2", "-detpixels", "16",
        "-nonoise", "-nopgm"]
OUT = ["-floatfile", "out.bin", "-intfile", "out.img"]
PREFIX = "nanoBragg: error: "


def _write(tmp, name, data):
    p = tmp / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


def smv(tmp, name, size=(4, 4), extra="", body=None):
    w, h = size
    head = (f"{{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\nSIZE1={w};\n"
            f"SIZE2={h};\n{extra}}}\f").encode().ljust(512, b" ")
    return _write(tmp, name, head + (body if body is not None else b"\x01\x00" * w * h))


def matrix(tmp, name, rows):
    return _write(tmp, name, "\n".join(" ".join(f"{x:.17g}" for x in r) for r in rows) + "\n")


def fdump(tmp, values):
    """An Fdump.bin for h, k, l in 0..1 holding `values` (8 numbers)."""
    grid = np.zeros((3, 3, 3))
    grid[:2, :2, :2] = np.asarray(values, dtype=np.float64).reshape(2, 2, 2)
    return _write(tmp, "Fdump.bin", b"0 1 0 1 0 1\n\f" + grid.astype("=f8").tobytes())


NO_CELL = GOOD[7:]  # without -cell

# (id, argv(tmp) -> list, words in the message)
C01_NONFINITE = [
    ("distance_1e999", lambda t: GOOD + ["-distance", "1e999"], "-distance expects a finite number"),
    ("pixel_inf", lambda t: GOOD + ["-pixel", "inf"], "-pixel expects a finite number"),
    ("lambda_-inf", lambda t: GOOD + ["-lambda", "-inf"], "-lambda expects a finite number"),
    ("cell_inf", lambda t: ["-cell", "100", "inf", "100", "90", "90", "90"] + NO_CELL,
     "-cell expects a finite number"),
    ("misset_nan", lambda t: GOOD + ["-misset", "0", "nan", "0"], "-misset expects a finite number"),
    ("fluence_inf", lambda t: GOOD + ["-fluence", "inf"], "-fluence expects a finite number"),
    ("Xbeam_1e400", lambda t: GOOD + ["-Xbeam", "1e400"], "-Xbeam expects a finite number"),
]

C02_AUTO_OVERSAMPLE = [
    ("distance_1e-6", lambda t: GOOD + ["-distance", "1e-6"], "automatic oversampling would take"),
    ("lambda_1e-6", lambda t: GOOD + ["-lambda", "1e-6"], "automatic oversampling would take"),
    ("xtalsize_100mm", lambda t: GOOD + ["-xtalsize", "100"], "automatic oversampling would take"),
    ("twotheta_grazing", lambda t: GOOD + ["-twotheta", "89.9999"], "automatic oversampling would take"),
]

C03_TOTAL_WORK = [
    ("phi_times_mosaic", lambda t: GOOD + ["-detpixels", "1024", "-oversample", "1", "-phisteps", "10000",
                                           "-mosaic", "1", "-mosaic_dom", "10000"], "more than the 1e+13"),
    ("pixels_times_oversample", lambda t: GOOD + ["-detpixels", "4000", "-oversample", "1000", "-phisteps", "10"],
     "more than the 1e+13"),
    ("sources", lambda t: GOOD + ["-detpixels", "1000", "-oversample", "1", "-divergence", "1", "-divsteps", "1000",
                                  "-dispersion", "1", "-dispsteps", "1000"], "more than the 1e+13"),
    ("header_40000x40000", lambda t: GOOD[:11] + GOOD[13:] + ["-img", smv(t, "big.img", (40000, 40000), body=b"")],
     "40000x40000 pixels declared"),
    ("header_1e9_square", lambda t: GOOD[:11] + GOOD[13:] + ["-mask", smv(t, "huge.img", (10**9, 10**9), body=b"")],
     "is truncated"),
    ("detpixels_1e6", lambda t: GOOD + ["-detpixels", "1000000"], "more than this machine"),
]

C04_NONFINITE_IMAGE = [
    ("beamsize_0_with_flux", lambda t: GOOD + ["-flux", "1e12", "-beamsize", "0"], "-beamsize must be positive"),
    ("fluence_overflows", lambda t: GOOD + ["-flux", "1e300", "-beamsize", "1e-200"], "infinite fluence"),
    ("source_at_origin", lambda t: GOOD + ["-sourcefile", _write(t, "s.txt", "0 0 0 1 1e-10\n")],
     "s.txt:1: source at 0 0 0"),
    ("source_inf", lambda t: GOOD + ["-sourcefile", _write(t, "s.txt", "-10 0 0 1 1e-10\n-10 1e999 0 1\n")],
     "s.txt:2: '1e999' is not finite"),
    ("source_lambda_0", lambda t: GOOD + ["-sourcefile", _write(t, "s.txt", "-10 0 0 1 0\n")],
     "s.txt:1: wavelength 0 m must be positive"),
    ("hkl_nan", lambda t: GOOD + ["-hkl", _write(t, "n.hkl", "0 0 0 1\n1 0 0 nan\n")], "n.hkl:2: 'nan'"),
    ("hkl_1e999", lambda t: GOOD + ["-hkl", _write(t, "i.hkl", "0 0 0 1\n1 0 0 1e999\n")],
     "i.hkl:2: amplitude '1e999' is not finite"),
    ("fdump_nan", lambda t: GOOD[:7] + GOOD[9:] + ["-dumpfile", fdump(t, [1, 2, 3, math.nan, 5, 6, 7, 8])],
     "NaN or infinite"),
]
# caught only once the image exists: the command line stops before writing
C04_RENDERED = [
    ("default_F_1e200", lambda t: GOOD + ["-default_F", "1e200"], "NaN or infinite pixels"),
    ("default_F_1e30", lambda t: GOOD + ["-default_F", "1e30"], "NaN or infinite pixels"),
]

C05_HEADER_VALUES = [
    ("pixel_size_inf", lambda t: GOOD + ["-img", smv(t, "a.img", (16, 16), "PIXEL_SIZE=inf;\n")],
     "header PIXEL_SIZE=inf must be a positive number"),
    ("distance_nan", lambda t: GOOD + ["-img", smv(t, "b.img", (16, 16), "DISTANCE=nan;\n")],
     "header DISTANCE=nan must be a positive number"),
    ("wavelength_0", lambda t: GOOD + ["-img", smv(t, "c.img", (16, 16), "WAVELENGTH=0;\n")],
     "header WAVELENGTH=0 must be a positive number"),
    ("close_distance_negative", lambda t: GOOD + ["-mask", smv(t, "d.img", (16, 16), "CLOSE_DISTANCE=-5;\n")],
     "header CLOSE_DISTANCE=-5 must be a positive number"),
    ("beam_center_inf", lambda t: GOOD + ["-img", smv(t, "e.img", (16, 16), "BEAM_CENTER_X=-inf;\n")],
     "header BEAM_CENTER_X=-inf must be a finite number"),
    ("size_zero", lambda t: GOOD + ["-img", smv(t, "f.img", (0, 16))], "is not positive"),
]

C06_HKL_INDEX = [
    ("h_1e20", lambda t: GOOD + ["-hkl", _write(t, "a.hkl", "0 0 0 1\n1e20 0 0 1\n")],
     "a.hkl:2: index h=1e20 is out of range"),
    ("k_-3e9", lambda t: GOOD + ["-hkl", _write(t, "b.hkl", "0 -3e9 0 1\n")], "b.hkl:1: index k=-3e9 is out of range"),
    ("l_2pow31", lambda t: GOOD + ["-hkl", _write(t, "c.hkl", "0 0 2147483648 1\n")], "index l=2147483648"),
    ("range_too_large", lambda t: GOOD + ["-hkl", _write(t, "d.hkl", "-100000 -1000 0 1\n100000 1000 1000 1\n")],
     "too large for a dense table"),
]

C07_DEVICE = [
    ("tpu", lambda t: GOOD + ["-device", "tpu"], "-device takes cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("gpu", lambda t: GOOD + ["-device", "gpu"], "-device takes"),
    ("cuda_x", lambda t: GOOD + ["-device", "cuda:x"], "-device takes"),
    ("empty", lambda t: GOOD + ["-device", ""], "-device takes"),
    ("cuda_99", lambda t: GOOD + ["-device", "cuda:99"], "-device cuda:99"),
]

C09_SAME_OUTPUT = [
    ("float_int", lambda t: GOOD + ["-floatfile", "a", "-intfile", "a"], "-floatfile and -intfile both name a"),
    ("int_noise", lambda t: GOOD[:-2] + ["-floatfile", "f.bin", "-intfile", "x.img", "-noisefile", "./x.img"],
     "-intfile and -noisefile both name"),
    ("pgm_default_float", lambda t: GOOD[:-1] + ["-floatfile", "f.bin", "-intfile", "i.img", "-pgmfile", "f.bin"],
     "-floatfile and -pgmfile both name"),
    ("through_symlink", lambda t: (os.symlink("target.bin", t / "link.bin"),
                                   GOOD + ["-floatfile", "target.bin", "-intfile", "link.bin"])[1],
     "-floatfile and -intfile both name link.bin"),
    ("dumpfile", lambda t: GOOD + ["-hkl", _write(t, "p.hkl", "0 0 0 1\n"), "-floatfile", "f.bin", "-intfile", "i.img",
                                   "-dumpfile", "f.bin"], "-dumpfile and -floatfile both name f.bin"),
]

C10_OUTPUT_NAMES = [
    ("float_empty", lambda t: GOOD + ["-floatfile", "", "-intfile", "i.img"], "-floatfile needs a file name"),
    ("int_empty", lambda t: GOOD + ["-floatfile", "f.bin", "-intfile", ""], "-intfile needs a file name"),
    ("float_slash", lambda t: (os.mkdir(t / "sub"), GOOD + ["-floatfile", "sub/", "-intfile", "i.img"])[1],
     "-floatfile sub/ names a folder"),
    ("noise_slash", lambda t: GOOD[:-2] + ["-floatfile", "f.bin", "-intfile", "i.img", "-noisefile", "nowhere/"],
     "-noisefile nowhere/ names a folder"),
    ("pgm_folder", lambda t: (os.mkdir(t / "dir"),
                              GOOD[:-1] + ["-pgmfile", "dir", "-floatfile", "f", "-intfile", "i"])[1],
     "it is a folder"),
]

COUNT_WORDS = "counts must be >= 1; -oversample 0 means automatic"
C11_COUNTS = [(f"{flag}_{v}", (lambda f, v: lambda t: GOOD + [f, v])(flag, v),
               f"{flag} {v} is not allowed ({COUNT_WORDS})")
              for flag, v in (("-phisteps", "-1"), ("-mosaic_dom", "0"), ("-thicksteps", "0"), ("-N", "0"),
                              ("-Na", "-3"), ("-oversample", "-2"), ("-dispsteps", "0"), ("-hdivsteps", "-1"),
                              ("-divsteps", "0"), ("-detector_thicksteps", "-5"))]

C12_BEHIND = [
    ("twotheta_135", lambda t: GOOD + ["-twotheta", "135"], "the detector is behind the sample"),
    ("twotheta_100_adxv", lambda t: GOOD + ["-adxv", "-twotheta", "100"], "the detector is behind the sample"),
    ("rotz_and_twotheta", lambda t: GOOD + ["-detector_rotz", "-60", "-twotheta", "60"], "behind the sample"),
    ("twotheta_90", lambda t: GOOD + ["-twotheta", "90"], "the detector plane contains the beam"),
    ("rotx_roty_90", lambda t: GOOD + ["-detector_roty", "90"], "the detector plane contains the beam"),
]

C13_ZERO_VECTORS = [(flag, (lambda f: lambda t: GOOD + [f, "0", "0", "0"])(flag),
                     f"{flag} 0 0 0 is a zero-length vector")
                    for flag in ("-beam_vector", "-spindle_axis", "-polar_vector", "-fdet_vector", "-sdet_vector",
                                 "-twotheta_axis")]

C14_MATRIX = [
    ("huge_regular", lambda t: ["-mat", matrix(t, "h.mat", np.eye(3) * 1e120)] + NO_CELL,
     "h.mat: the matrix gives a unit cell of volume"),
    ("huge_singular", lambda t: ["-mat", matrix(t, "s.mat", [[1e200, 1e200, 0], [1e200, 1e200, 0], [0, 0, 1e200]])]
     + NO_CELL, "s.mat: the matrix is singular"),
    ("tiny_regular", lambda t: ["-mat", matrix(t, "t.mat", np.eye(3) * 1e-20)] + NO_CELL,
     "automatic oversampling would take"),
    ("inf_entry", lambda t: ["-mat", matrix(t, "i.mat", [[float("inf"), 0, 0], [0, 1, 0], [0, 0, 1]])] + NO_CELL,
     "non-finite"),
]

C19_CELLS = [
    ("10_10_170", lambda t: ["-cell", "10", "10", "10", "10", "10", "170"] + NO_CELL, "impossible unit cell"),
    ("120_120_120", lambda t: ["-cell", "100", "100", "100", "120", "120", "120"] + NO_CELL, "impossible unit cell"),
    ("60_60_150", lambda t: ["-cell", "100", "100", "100", "60", "60", "150"] + NO_CELL, "impossible unit cell"),
    ("gamma_180", lambda t: ["-cell", "100", "100", "100", "90", "90", "180"] + NO_CELL, "impossible unit cell"),
    ("volume_overflow", lambda t: ["-cell", "1e200", "1e200", "1e200", "90", "90", "90"] + NO_CELL,
     "cannot be simulated"),
]

TABLES = {"c01": C01_NONFINITE, "c02": C02_AUTO_OVERSAMPLE, "c03": C03_TOTAL_WORK, "c04": C04_NONFINITE_IMAGE,
          "c04r": C04_RENDERED, "c05": C05_HEADER_VALUES, "c06": C06_HKL_INDEX, "c07": C07_DEVICE,
          "c09": C09_SAME_OUTPUT, "c10": C10_OUTPUT_NAMES, "c11": C11_COUNTS, "c12": C12_BEHIND,
          "c13": C13_ZERO_VECTORS, "c14": C14_MATRIX, "c19": C19_CELLS}
# output files are the command line's business; the rendered-image check too
NOT_API = {"c09", "c10", "c04r"}


def _cases(tables):
    return [pytest.param(cls, build, words, id=f"{cls}-{name}")
            for cls in tables for name, build, words in TABLES[cls]]


def _cli(argv, tmp_path, capsys):
    before = set(os.listdir(tmp_path))
    rc = main(argv + ([] if "-floatfile" in argv else OUT))
    captured = capsys.readouterr()
    return rc, captured.err, before


def _skip_if_gpu(words):
    if "cuda:99" in words:
        import torch
        if torch.cuda.device_count() > 99:
            pytest.skip("this machine has a cuda:99")


@pytest.mark.parametrize("cls,build,words", _cases(TABLES))
def test_command_line_refuses_with_one_line(cls, build, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _skip_if_gpu(words)
    argv = build(tmp_path)
    rc, err, before = _cli(argv, tmp_path, capsys)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX)
    assert words in lines[0]
    assert "Traceback" not in err
    assert set(os.listdir(tmp_path)) == before  # nothing written, nothing half-written


@pytest.mark.parametrize("cls,build,words", _cases([c for c in TABLES if c not in NOT_API]))
def test_api_raises_the_same_message(cls, build, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _skip_if_gpu(words)
    argv = build(tmp_path)
    _, err, _ = _cli(argv, tmp_path, capsys)
    with pytest.raises(ValueError) as exc:
        torchbragg.Simulator.from_args(argv)
    assert isinstance(exc.value, InputError)
    assert str(exc.value) == err.strip()[len(PREFIX):]
    assert words in str(exc.value)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


@pytest.mark.parametrize("section,attr,value,words", [
    ("beam", "wavelength", -1.0, "wavelength must be positive"),
    ("beam", "wavelength", math.inf, "-lambda must be a finite number"),
    ("detector", "distance", math.nan, "-distance must be a finite number"),
    ("detector", "fpixels", 10**6, "more than this machine"),
    ("crystal", "phisteps", 0, COUNT_WORDS),
    ("beam", "beam_vector", (0.0, 0.0, 0.0), "-beam_vector 0 0 0 is a zero-length vector"),
    ("detector", "twotheta", 135.0, "behind the sample"),
])
def test_api_from_config_validates_like_the_command_line(section, attr, value, words):
    cfg = torchbragg.parse_args(GOOD)
    setattr(getattr(cfg, section), attr, value)
    if attr == "fpixels":
        cfg.detector.spixels = value
    if attr == "beam_vector":
        cfg.detector.convention = "CUSTOM"
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        torchbragg.Simulator.from_config(cfg)


# ----------------------------------------------------------------------------- accepted extremes

ACCEPTED = [
    ("oversample_0_automatic", ["-oversample", "0"]),
    ("xds_detector_at_135", ["-xds", "-twotheta", "135"]),
    ("twotheta_80", ["-twotheta", "80"]),
    ("default_F_1e18", ["-default_F", "1e18"]),
    ("fluence_0", ["-fluence", "0"]),
    ("mosaic_90", ["-mosaic", "90", "-mosaic_dom", "3"]),
    ("one_pixel", ["-detpixels", "1"]),
    ("distance_1mm", ["-distance", "1"]),
    ("lambda_0.01", ["-lambda", "0.01"]),
    ("five_number_cell", ["-cell", "100", "100", "100", "90", "90"]),
]


@pytest.mark.parametrize("extra", [pytest.param(e, id=i) for i, e in ACCEPTED])
def test_accepted_extremes_give_a_finite_non_negative_image(extra, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(GOOD + extra + OUT)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert all(line.startswith("WARNING") for line in err.splitlines())  # only warnings, no error
    image = np.fromfile(tmp_path / "out.bin", "<f4")
    assert image.size and np.isfinite(image).all() and (image >= 0).all()


# ----------------------------------------------------------------------------- outputs (class 8)

def test_outputs_write_through_devices_and_follow_symlinks(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink("real.bin", tmp_path / "link.bin")  # dangling until written
    os.symlink("real.img", tmp_path / "img_link")
    (tmp_path / "real.img").write_bytes(b"old")
    assert main(GOOD + ["-floatfile", "link.bin", "-intfile", "img_link"]) == 0
    assert os.path.islink(tmp_path / "link.bin") and os.path.islink(tmp_path / "img_link")
    assert (tmp_path / "real.bin").stat().st_size == 16 * 16 * 4
    assert (tmp_path / "real.img").read_bytes()[:1] == b"{"
    assert main(GOOD + ["-floatfile", "/dev/null", "-intfile", "/dev/null"]) == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_atomic_write_cleans_up_on_failure(tmp_path):
    from torchbragg.io.atomic import atomic_open, atomic_write
    for bad in ("", str(tmp_path) + "/", str(tmp_path / "missing" / "x")):
        with pytest.raises(InputError, match="cannot write"):
            atomic_write(bad, b"x")
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "x.bin") as fh:
            fh.write(b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- -dumpfile (class 15)

@pytest.mark.parametrize("dump", ["/dev/null/Fdump.bin", "no/such/folder/Fdump.bin", ""])
def test_unwritable_dumpfile_is_a_warning(dump, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hkl = _write(tmp_path, "p.hkl", "0 0 0 10\n1 0 0 5\n")
    rc = main(GOOD + ["-hkl", hkl, "-dumpfile", dump] + OUT)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "WARNING: unable to open dump file" in captured.err
    assert "WARNING" not in captured.out
    assert np.isfinite(np.fromfile(tmp_path / "out.bin", "<f4")).all()


# ----------------------------------------------------------------------------- demo and nb-compare (16, 17)

@pytest.mark.parametrize("out", ["/dev/null/x", "/proc/version/demo"])
def test_demo_into_an_impossible_folder(out, capsys):
    from torchbragg.commands.tool import main as tool
    assert tool(["demo", "--out", out]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot create the folder" in err and "Traceback" not in err


STAND_IN = """#!{python}
import sys
import numpy as np
args = sys.argv[1:]
out = args[args.index("-floatfile") + 1]
np.full((8, 8), {value}, dtype="<f4").tofile(out)
"""


def _stand_in(tmp_path, name, value):
    path = tmp_path / name
    path.write_text(STAND_IN.format(python=sys.executable, value=value))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


ARGS8 = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "1", "-detpixels", "8"]


@pytest.mark.parametrize("opts,words", [
    (["--py-cmd", "'unterminated"], "--py-cmd \"'unterminated\" cannot be split into words"),
    (["--py-cmd", ""], "--py-cmd is empty"),
    (["--py-cmd", "   "], "--py-cmd is empty"),
    (["--py-bin", ""], "--py-bin is empty"),
])
def test_compare_bad_py_cmd_is_one_line(opts, words, tmp_path, capsys, monkeypatch):
    from torchbragg.commands import compare
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NB_PY_BIN", raising=False)
    c = _stand_in(tmp_path, "c_prog", "1.0")
    assert compare.main(["--c-bin", c] + opts + ["--"] + ARGS8) == compare.EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err


@pytest.mark.parametrize("c_value,py_value", [("1.0", "np.nan"), ("np.nan", "1.0"), ("1.0", "np.inf"),
                                              ("np.nan", "np.nan")])
def test_compare_refuses_non_finite_images(c_value, py_value, tmp_path, capsys, monkeypatch):
    from torchbragg.commands import compare
    monkeypatch.chdir(tmp_path)
    c, py = _stand_in(tmp_path, "c_prog", c_value), _stand_in(tmp_path, "py_prog", py_value)
    rc = compare.main(["--outdir", str(tmp_path / "o"), "--c-bin", c, "--py-bin", py, "--"] + ARGS8)
    assert rc == compare.EXIT_NONFINITE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "NaN or infinite" in err


# ----------------------------------------------------------------------------- -h and the count rule (11)

def test_help_states_the_count_rule(capsys):
    assert main(["-h"]) == 0
    assert COUNT_WORDS in capsys.readouterr().out


# ----------------------------------------------------------------------------- warnings and notes (19, 20, 21)

@pytest.mark.parametrize("cell,words", [(["100", "100", "100", "90", "90"], "gamma stays 90"),
                                        (["100", "100", "100", "90"], "beta and gamma stay 90")])
def test_short_cell_warns(cell, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["-cell", *cell] + NO_CELL + OUT) == 0
    captured = capsys.readouterr()
    assert f"WARNING: -cell got {len(cell)} numbers; {words}" in captured.err
    assert "WARNING" not in captured.out


@pytest.mark.parametrize("extra,note", [
    (["-misset_seed", "12345", "-floatfile", "out.bin", "-intfile", "out.img"],
     "reads '-misset_seed 12345 -floatfile out.bin' as '-misset 12345 0 0'"),
    (["-misset_seed", "3", "-Xbeam", "10", "-floatfile", "out.bin", "-intfile", "out.img"],
     "as '-misset 3 0 10' (substring flag matching); add -misset 3 0 10 to reproduce it"),
    (["-twotheta_axis", "0", "1", "0"] + OUT, "reads '-twotheta_axis 0 1 0' as '-twotheta 0'"),
    (["-twotheta_axis", "5", "1", "0"] + OUT, "add -twotheta 5 to reproduce it"),
])
def test_substring_readings_of_the_original_are_noted(extra, note, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(GOOD + extra) == 0
    err = capsys.readouterr().err
    assert len([l for l in err.splitlines() if note in l]) == 1


def test_no_note_where_the_original_reads_the_same(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(GOOD + OUT + ["-misset_seed", "5"]) == 0  # too few values follow for the original's -misset
    captured = capsys.readouterr()
    assert "substring" not in captured.out + captured.err


@pytest.mark.parametrize("line,words", [("0.5 0 0 10", "h=0.5"), ("0 -1.5 0 10", "k=-1.5"),
                                        ("1 0 0.25 10", "l=0.25")])
def test_fractional_hkl_index_is_skipped_with_a_warning(line, words, tmp_path, capsys, monkeypatch):
    from torchbragg.io.hkl import read_hkl
    monkeypatch.chdir(tmp_path)
    hkl = _write(tmp_path, "f.hkl", f"0 0 0 7\n1 0 0 3\n{line}\n")
    table = read_hkl(hkl)
    assert table.count == 2 and table.grid[1, 0, 0] == 3 and table.grid[0, 0, 0] == 7
    assert main(GOOD + ["-hkl", hkl] + OUT) == 0
    assert f"f.hkl:3: non-integer index {words}; line skipped" in capsys.readouterr().err


# ----------------------------------------------------------------------------- SMV headers

def test_smv_header_sizes_are_checked_before_reading(tmp_path):
    from torchbragg.io.smv import read_smv
    path = smv(tmp_path, "big.img", (100000, 100000), body=b"\0" * 1000)
    with pytest.raises(InputError, match="is truncated"):
        read_smv(path)
    head = struct.pack("<4H", 1, 2, 3, 4)
    header, data = read_smv(smv(tmp_path, "ok.img", (2, 2), body=head))
    assert data.tolist() == [[1, 2], [3, 4]]
