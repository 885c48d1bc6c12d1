"""SMV and PGM files byte for byte against the original's."""

import re
import sys

import numpy as np
import pytest

import golden
from torchbragg.errors import InputError
from torchbragg.io import smv
from torchbragg.io.atomic import atomic_open, atomic_write
from torchbragg.io.pgm import pgm_file_bytes, read_pgm, write_pgm

CASES = ["outputs_int_noise_pgm", "outputs_scaled"]
little = pytest.mark.skipif(sys.byteorder != "little", reason="reference files are little-endian")


def geometry_from_stdout(case):
    """The header inputs, from the geometry the original printed."""
    out = golden.stdout(case)
    m = golden.MANIFEST[case]

    def num(name):
        return float(re.search(name + r"=(\S+)", out).group(1))

    px = float(re.search(r"pixel=(\S+) meters", out).group(1))
    dials = tuple(float(v) for v in re.search(r"dials origin= (\S+) (\S+) (\S+)", out).groups())
    return smv.SMVGeometry(
        fpixels=m["fpixels"], spixels=m["spixels"], pixel_size=px, distance=num("distance"),
        wavelength=float(re.search(r"wave=(\S+) meters", out).group(1)),
        Xbeam=num("Xbeam"), Ybeam=num("Ybeam"), Fbeam=num("Fbeam"), Sbeam=num("Sbeam"),
        detsize_s=float(re.search(r"detsize=\S+x(\S+)", out).group(1)), dials_origin=dials,
        ORGX=num("Fclose") / px + 0.5, ORGY=num("Sclose") / px + 0.5, close_distance=num("distance"),
        phi0=0.0, osc=0.0, twotheta=0.0)


@little
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name,sign", [("int.img", -1.0), ("noise.img", 1.0)])
def test_smv_files_byte_identical(case, name, sign, tmp_path):
    ref = golden.reference(case, name)
    geom = geometry_from_stdout(case)
    pixels = np.frombuffer(ref[512:], "<u2").reshape(geom.spixels, geom.fpixels)
    assert smv.smv_bytes(pixels, smv.header_text(geom, sign)) == ref
    path = tmp_path / name
    smv.write_smv(path, pixels, geom, denzo_sign=sign)
    assert path.read_bytes() == ref
    header, data = smv.read_smv(path)
    assert np.array_equal(data, pixels)
    assert header["SIZE1"] == str(geom.fpixels)
    assert header["DIALS_ORIGIN"] == "%g,%g,%g" % geom.dials_origin  # no trailing ';'


def test_denzo_sign_only_shows_for_negative_zero():
    geom = geometry_from_stdout("outputs_scaled")
    assert smv.header_text(geom, -1.0) == smv.header_text(geom, 1.0)
    geom.Sbeam = -0.0
    minus, plus = smv.header_text(geom, -1.0), smv.header_text(geom, 1.0)
    assert "DENZO_X_BEAM=-0;" in minus and "DENZO_X_BEAM=0;" in plus


@pytest.mark.parametrize("case", CASES)
def test_pgm_byte_identical(case, tmp_path):
    ref = golden.reference(case, "image.pgm")
    scale = float(re.search(rb"# pixels scaled by (\S+)", ref).group(1))
    m = golden.MANIFEST[case]
    pixels = np.frombuffer(ref[-m["fpixels"] * m["spixels"]:], np.uint8).reshape(m["spixels"], m["fpixels"])
    assert pgm_file_bytes(pixels, scale) == ref
    path = tmp_path / "x.pgm"
    write_pgm(path, pixels, scale)
    assert path.read_bytes() == ref
    assert np.array_equal(read_pgm(path), pixels)


def test_read_smv_both_byte_orders_and_types(tmp_path):
    data = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 4099)
    for order, code in (("little_endian", "<u2"), ("big_endian", ">u2")):
        head = ("{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=%s;\nTYPE=unsigned_short;\nSIZE1=4;\nSIZE2=3;\n}\f" % order)
        path = tmp_path / f"{order}.img"
        path.write_bytes(head.encode().ljust(512) + data.astype(code).tobytes())
        header, got = smv.read_smv(path)
        assert np.array_equal(got, data) and header["BYTE_ORDER"] == order
    fdata = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    head = "{\nHEADER_BYTES=1024;\nBYTE_ORDER=big_endian;\nTYPE=float;\nSIZE1=4;\nSIZE2=3;\n}"
    path = tmp_path / "f.img"
    path.write_bytes(head.encode().ljust(1024) + fdata.astype(">f4").tobytes())
    assert np.array_equal(smv.read_smv(path)[1], fdata)


def test_read_smv_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        smv.read_smv(tmp_path / "missing.img")
    (tmp_path / "text.img").write_text("hello world\n")
    with pytest.raises(InputError, match="not an SMV image"):
        smv.read_smv(tmp_path / "text.img")
    (tmp_path / "nosize.img").write_bytes(b"{\nHEADER_BYTES=512;\nDIM=2;\n}".ljust(512) + b"\0" * 8)
    with pytest.raises(InputError, match="SIZE1/SIZE2"):
        smv.read_smv(tmp_path / "nosize.img")
    (tmp_path / "short.img").write_bytes(b"{\nHEADER_BYTES=512;\nSIZE1=4;\nSIZE2=4;\n}".ljust(512) + b"\0" * 8)
    with pytest.raises(InputError, match="truncated"):
        smv.read_smv(tmp_path / "short.img")
    (tmp_path / "type.img").write_bytes(b"{\nHEADER_BYTES=512;\nTYPE=complex;\nSIZE1=1;\nSIZE2=1;\n}".ljust(514))
    with pytest.raises(InputError, match="pixel type"):
        smv.read_smv(tmp_path / "type.img")


def test_value_of_mimics_original_lookup():
    text = golden.reference("outputs_scaled", "int.img")[:512].decode("latin-1")
    assert smv.value_of(text, "DISTANCE") == 80.0           # last match: CLOSE_DISTANCE
    assert smv.value_of(text, "ORGX") == 49.5               # matches XDS_ORGX
    assert smv.value_of(text, "BEAM_CENTER_Y") == 4.85
    assert np.isnan(smv.value_of(text, "NOT_THERE"))


def test_fabio_reads_our_files(tmp_path):
    fabio = pytest.importorskip("fabio")
    geom = geometry_from_stdout("outputs_scaled")
    pixels = (np.arange(geom.fpixels * geom.spixels) % 65536).astype(np.uint16).reshape(geom.spixels, geom.fpixels)
    path = tmp_path / "fab.img"
    smv.write_smv(path, pixels, geom)
    img = fabio.open(str(path))
    assert np.array_equal(np.asarray(img.data), pixels)
    assert float(img.header["PIXEL_SIZE"]) == 0.1
    assert int(img.header["SIZE1"]) == geom.fpixels


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write(b"partial")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with pytest.raises(InputError, match="cannot write"):
        atomic_write(tmp_path / "no" / "such" / "dir.bin", b"x")


def test_overlong_header_gets_a_larger_block(tmp_path):
    v = -1.234567e-5
    geom = smv.SMVGeometry(99999, 2, v, v, v, v, v, v, v, v, (v, v, v), v, v, v, v, v, v)
    text = smv.header_text(geom)
    assert "HEADER_BYTES=1024;" in text and 512 < len(text) <= 1024
    pixels = np.arange(2 * 99999, dtype=np.uint16).reshape(2, 99999)
    smv.write_smv(tmp_path / "long.img", pixels, geom)
    header, data = smv.read_smv(tmp_path / "long.img")
    assert header["HEADER_BYTES"] == "1024" and np.array_equal(data, pixels)
