"""nb-compare against small stand-in programs (no original nanoBragg needed)."""

import json
import stat
import struct
import sys
import zlib

import numpy as np
import pytest

from torchbragg.commands import compare
from torchbragg.io.png import PNG_SIGNATURE, diff_preview, encode_png, preview, write_png

ARGS = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-detpixels", "8"]

STAND_IN = """\
#!{python}
import os, sys
import numpy as np
args = sys.argv[1:]
def val(name, default=None):
    out = default
    for i, a in enumerate(args[:-1]):
        if a == name:
            out = args[i + 1]
    return out
if {fail}:
    print("stand-in failing on purpose", file=sys.stderr)
    sys.exit({fail})
need = val("-hkl")
if need is not None and not os.path.isfile(need):
    print("no such hkl file: " + need, file=sys.stderr)
    sys.exit(7)
n = int(val("-detpixels", "4"))
ns = int(val("-detpixels_y", n)); nf = int(val("-detpixels_x", n))
shape = {shape} or (ns, nf)
s, f = np.mgrid[0:shape[0], 0:shape[1]]
img = ((s * 7 + f * 3) % 11).astype(np.float64) * {scale}
if {flip}:
    img = img[::-1, ::-1]
print("stand-in writing", val("-floatfile"))
img.astype("<f4").tofile(val("-floatfile"))
open("intimage.img", "wb").close()
"""


def make_prog(tmp_path, name, fail=0, scale=1.0, flip=False, shape=None):
    path = tmp_path / name
    path.write_text(STAND_IN.format(python=sys.executable, fail=fail, scale=scale,
                                    flip=flip, shape=shape))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


@pytest.fixture
def progs(tmp_path, monkeypatch):
    monkeypatch.delenv("NB_C_BIN", raising=False)
    monkeypatch.delenv("NB_PY_BIN", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    w, h, depth, ctype = struct.unpack(">IIBB", data[16:26])
    assert depth == 8
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return w, h, ctype


def run(argv):
    return compare.main([str(a) for a in argv])


def test_success_writes_bundle(progs, capsys):
    c = make_prog(progs, "c_prog")
    py = make_prog(progs, "py_prog")
    out = progs / "out"
    rc = run(["--outdir", out, "--c-bin", c, "--py-bin", py, "--threshold", "0.99",
              "--save-diff", "--"] + ARGS + ["-floatfile", "mine.bin"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "C runtime:" in text and "Py runtime:" in text and "correlation" in text
    s = json.loads((out / "summary.json").read_text())
    for key in ("args", "c_binary", "py_command", "roi", "resample", "runtime_c_ms",
                "runtime_py_ms", "correlation", "mse", "rmse", "max_abs_diff", "sum_c",
                "sum_py", "sum_ratio", "png_scale_method", "png_percentile"):
        assert key in s, key
    assert s["args"] == ARGS + ["-floatfile", "mine.bin"]
    assert s["correlation"] == pytest.approx(1.0)
    assert s["rmse"] == 0 and s["max_abs_diff"] == 0
    assert s["sum_ratio"] == pytest.approx(1.0)
    assert s["shape_c"] == [8, 8] and s["exit_code"] == 0
    assert s["c_binary"] == [c]
    expected_sum = float(sum(((i * 7 + j * 3) % 11) for i in range(8) for j in range(8)))
    assert s["sum_c"] == pytest.approx(expected_sum)
    for name in ("c.png", "py.png", "diff.png"):
        w, h, ctype = png_size(out / name)
        assert (w, h) == (8, 8)
    assert png_size(out / "diff.png")[2] == 2  # RGB heatmap
    for name in ("c_stdout.txt", "c_stderr.txt", "py_stdout.txt", "py_stderr.txt",
                 "c_float.bin", "py_float.bin", "diff.bin"):
        assert (out / name).is_file(), name
    assert "stand-in writing" in (out / "c_stdout.txt").read_text()
    # the caller's -floatfile is replaced, and nothing lands in the caller's folder
    assert not (progs / "mine.bin").exists() and not (progs / "intimage.img").exists()
    assert (out / "c_run" / "intimage.img").exists()


def test_threshold_failure(progs, capsys):
    c = make_prog(progs, "c_prog")
    py = make_prog(progs, "py_prog", flip=True)
    rc = run(["--outdir", progs / "o1", "--c-bin", c, "--py-bin", py, "--"] + ARGS)
    assert rc == 0  # no threshold given: report only
    rc = run(["--outdir", progs / "o2", "--c-bin", c, "--py-bin", py,
              "--threshold", "0.99", "--"] + ARGS)
    assert rc == 3
    s = json.loads((progs / "o2" / "summary.json").read_text())
    assert s["correlation"] < 0.99 and s["status"] == "below_threshold"
    assert (progs / "o2" / "c.png").is_file()
    assert "below the threshold" in capsys.readouterr().err


def test_scaled_image_correlates_but_sums_differ(progs):
    c = make_prog(progs, "c_prog")
    py = make_prog(progs, "py_prog", scale=2.0)
    rc = run(["--outdir", progs / "o", "--c-bin", c, "--py-bin", py,
              "--threshold", "0.999", "--"] + ARGS)
    assert rc == 0
    s = json.loads((progs / "o" / "summary.json").read_text())
    assert s["sum_ratio"] == pytest.approx(2.0)
    assert s["max_abs_diff"] == pytest.approx(10.0)


def test_failing_program(progs, capsys):
    c = make_prog(progs, "c_prog")
    py = make_prog(progs, "py_prog", fail=1)
    rc = run(["--outdir", progs / "o", "--c-bin", c, "--py-bin", py, "--"] + ARGS)
    assert rc == 2
    assert "torchbragg exited with status 1" in capsys.readouterr().err
    s = json.loads((progs / "o" / "summary.json").read_text())
    assert s["status"] == "runner_failure" and s["returncode_py"] == 1
    assert "failing on purpose" in (progs / "o" / "py_stderr.txt").read_text()


def test_missing_binary(progs, capsys):
    py = make_prog(progs, "py_prog")
    rc = run(["--py-bin", py, "--"] + ARGS)
    assert rc == 1
    assert "NB_C_BIN" in capsys.readouterr().err
    rc = run(["--c-bin", progs / "nope", "--py-bin", py, "--"] + ARGS)
    assert rc == 1
    assert "not found" in capsys.readouterr().err
    assert not (progs / "comparisons").exists()


def test_env_binaries_and_default_outdir(progs, monkeypatch):
    monkeypatch.setenv("NB_C_BIN", make_prog(progs, "c_prog"))
    monkeypatch.setenv("NB_PY_BIN", make_prog(progs, "py_prog"))
    assert run(["--"] + ARGS) == 0
    assert run(["--"] + ARGS) == 0
    dirs = sorted((progs / "comparisons").iterdir())
    assert len(dirs) == 2  # never overwritten
    for d in dirs:
        assert (d / "summary.json").is_file()


def test_usage_errors(progs, capsys):
    c = make_prog(progs, "c_prog")
    py = make_prog(progs, "py_prog")
    assert run(["--c-bin", c, "--py-bin", py] + ARGS) == 1  # no "--"
    assert run(["--c-bin", c, "--py-bin", py, "--"]) == 1
    assert run(["--bogus", "--c-bin", c, "--"] + ARGS) == 1
    assert run(["--roi", "5", "1", "0", "3", "--c-bin", c, "--py-bin", py, "--"] + ARGS) == 1
    (progs / "full").mkdir()
    (progs / "full" / "keep.txt").write_text("x")
    assert run(["--outdir", progs / "full", "--c-bin", c, "--py-bin", py, "--"] + ARGS) == 1
    assert (progs / "full" / "keep.txt").read_text() == "x"
    assert compare.main(["--help"]) == 0


def test_roi_and_input_files(progs):
    c = make_prog(progs, "c_prog")
    py = make_prog(progs, "py_prog")
    (progs / "P1.hkl").write_text("0 0 0 1\n")
    out = progs / "o"
    rc = run(["--outdir", out, "--c-bin", c, "--py-bin", py, "--roi", 1, 4, 2, 6,
              "--"] + ARGS + ["-hkl", "P1.hkl"])
    assert rc == 0  # programs run in their own folders yet find the hkl file
    s = json.loads((out / "summary.json").read_text())
    assert s["roi"] == [1, 4, 2, 6]
    assert png_size(out / "c.png")[:2] == (4, 5)
    s_idx, f_idx = np.mgrid[2:7, 1:5]
    assert s["sum_c"] == pytest.approx(float(((s_idx * 7 + f_idx * 3) % 11).sum()))


def test_rectangular_and_shape_errors(progs):
    c = make_prog(progs, "c_prog")
    py = make_prog(progs, "py_prog")
    rect = ["-default_F", "1", "-detpixels_x", "6", "-detpixels_y", "3"]
    assert run(["--outdir", progs / "r", "--c-bin", c, "--py-bin", py, "--"] + rect) == 0
    s = json.loads((progs / "r" / "summary.json").read_text())
    assert s["shape_c"] == [3, 6]
    assert png_size(progs / "r" / "py.png")[:2] == (6, 3)

    odd = make_prog(progs, "odd_prog", shape=(4, 4))
    assert run(["--outdir", progs / "m", "--c-bin", c, "--py-bin", odd, "--"] + ARGS) == 4
    assert run(["--outdir", progs / "m2", "--c-bin", c, "--py-bin", odd, "--resample",
                "--"] + ARGS) == 0
    assert json.loads((progs / "m2" / "summary.json").read_text())["resampled"] is True

    weird = make_prog(progs, "weird_prog", shape=(2, 5))
    assert run(["--outdir", progs / "w", "--c-bin", weird, "--py-bin", weird,
                "--"] + ARGS) == 5


def test_metrics():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    m = compare.metrics(a, a * 3 + 1)
    assert m["correlation"] == pytest.approx(1.0)
    assert m["sum_ratio"] == pytest.approx((3 * 66 + 12) / 66)
    m = compare.metrics(a, -a)
    assert m["correlation"] == pytest.approx(-1.0)
    z = np.zeros((2, 2), np.float32)
    assert compare.metrics(z, z)["correlation"] == 1.0
    assert np.isnan(compare.metrics(z, z + 1)["correlation"])


def test_expected_shape():
    assert compare.expected_shape(["-detpixels", "10"]) == (10, 10)
    assert compare.expected_shape(["-detpixels_x", "7", "-detpixels_y", "5"]) == (5, 7)
    assert compare.expected_shape([]) == (1024, 1024)
    assert compare.expected_shape(["-detsize", "20", "-pixel", "0.2"]) == (100, 100)
    assert compare.expected_shape(["-img", "x.img"]) is None


def _decode(path):
    data = open(path, "rb").read()
    w, h, _, ctype = struct.unpack(">IIBB", data[16:26])
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        if kind == b"IDAT":
            idat += body
        pos += 12 + n
    ch = 3 if ctype == 2 else 1
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w * ch + 1)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, ch).squeeze()


def test_png_roundtrip(tmp_path):
    img = (np.arange(35, dtype=np.uint8) * 7).reshape(5, 7)
    write_png(tmp_path / "g.png", img)
    assert (_decode(tmp_path / "g.png") == img).all()
    rgb = np.stack([img, img[::-1], 255 - img], axis=-1)
    write_png(tmp_path / "c.png", rgb)
    assert (_decode(tmp_path / "c.png") == rgb).all()
    with pytest.raises(TypeError):
        encode_png(img.astype(np.float32))


def test_preview_scaling():
    img = np.zeros((10, 10))
    img[0, 0] = 1e6  # a hot pixel must not wash everything out
    img[1:, :] = np.linspace(0, 10, 90).reshape(9, 10)
    p = preview(img)
    assert p.dtype == np.uint8 and p.max() == 255 and p[5, 5] > 0
    assert preview(np.zeros((3, 3))).max() == 0
    assert preview(np.array([[np.nan, 1.0]]))[0, 0] == 0
    d = diff_preview(np.array([[-1.0, 0.0, 1.0]]))
    assert tuple(d[0, 0]) == (0, 0, 255) and tuple(d[0, 1]) == (255, 255, 255)
    assert tuple(d[0, 2]) == (255, 0, 0)


def test_program_writes_no_image(progs, tmp_path):
    c = make_prog(progs, "c_prog")
    silent = tmp_path / "silent"
    silent.write_text(f"#!{sys.executable}\nprint('nothing')\n")
    silent.chmod(0o755)
    rc = run(["--outdir", progs / "o", "--c-bin", c, "--py-bin", silent, "--"] + ARGS)
    assert rc == 5
    assert json.loads((progs / "o" / "summary.json").read_text())["status"] == "io_error"
