"""Bad input: one clear line on stderr, a non-zero status, no traceback and
no output file left behind."""

import os
import subprocess
import sys

import pytest

from torchbragg.commands.nanobragg import main

GOOD = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "10", "-N", "2", "-detpixels", "16",
        "-nonoise", "-nopgm"]
OUT = ["-floatfile", "out.bin", "-intfile", "out.img"]


def _write(tmp, name, data):
    p = tmp / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


def smv(width=4, height=4, body=None, header=None):
    head = header or f"{{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\nSIZE1={width};\nSIZE2={height};\n}}\f"
    head = head.encode().ljust(512, b" ")
    return head + (body if body is not None else b"\x01\x00" * width * height)


CASES = [
    # (id, argv builder(tmp) -> argv, words expected in the message)
    ("unknown flag", lambda t: GOOD + ["-frobnicate", "3"], "unknown flag '-frobnicate'"),
    ("substring of a flag", lambda t: GOOD + ["-dist", "100"], "unknown flag '-dist'"),
    ("missing value", lambda t: GOOD + ["-distance"], "-distance expects"),
    ("not a number", lambda t: GOOD + ["-distance", "far"], "-distance expects a number"),
    ("not an integer", lambda t: GOOD + ["-detpixels", "12.5"], "-detpixels expects an integer"),
    ("stray value", lambda t: GOOD + ["42"], "unexpected argument '42'"),
    ("misset too short", lambda t: GOOD + ["-misset", "1", "2"], "-misset expects"),
    ("bad pivot", lambda t: GOOD + ["-pivot", "middle"], "-pivot takes"),
    ("bad dtype", lambda t: GOOD + ["-dtype", "float16"], "-dtype takes"),
    ("zero pixels", lambda t: GOOD + ["-detpixels", "0"], "positive number of pixels"),
    ("negative pixels", lambda t: GOOD + ["-detpixels_x", "-5"], "positive number of pixels"),
    ("zero pixel size", lambda t: GOOD + ["-pixel", "0"], "-pixel must be positive"),
    ("negative wavelength", lambda t: GOOD + ["-lambda", "-1"], "wavelength must be positive"),
    ("zero energy", lambda t: GOOD + ["-energy", "0"], "-energy must be positive"),
    ("negative distance", lambda t: GOOD + ["-distance", "-100"], "-distance must be positive"),
    ("impossible cell", lambda t: ["-cell", "100", "100", "100", "120", "120", "120"] + GOOD[7:],
     "impossible unit cell"),
    ("negative cell length", lambda t: ["-cell", "-100", "100", "100", "90", "90", "90"] + GOOD[7:],
     "cell length a must be positive"),
    ("no cell", lambda t: GOOD[7:], "no unit cell"),
    ("no structure factors", lambda t: GOOD[:7] + GOOD[9:], "no structure factors"),
    ("empty roi", lambda t: GOOD + ["-roi", "10", "2", "0", "15"], "-roi 10 2 0 15 is empty"),
    ("detector too large", lambda t: GOOD + ["-detpixels", "2000000"], "more than this machine"),
    ("beam in detector plane", lambda t: GOOD + ["-detector_roty", "90"], "detector plane contains the beam"),
    ("missing hkl", lambda t: GOOD + ["-hkl", str(t / "nope.hkl")], "does not exist"),
    ("garbage hkl", lambda t: GOOD + ["-hkl", _write(t, "bad.hkl", "1 2 3 10\n1 2 x 5\n")], "bad.hkl:2"),
    ("short hkl line", lambda t: GOOD + ["-hkl", _write(t, "short.hkl", "1 2 3\n")], "four numbers"),
    ("missing matrix", lambda t: ["-mat", str(t / "A.mat")] + GOOD[7:], "does not exist"),
    ("short matrix", lambda t: ["-mat", _write(t, "A.mat", "0.01 0 0\n0 0.01 0\n")] + GOOD[7:],
     "expected a 3x3 matrix"),
    ("singular matrix", lambda t: ["-mat", _write(t, "S.mat", "0.01 0.01 0\n0 0 0\n0 0 0\n")] + GOOD[7:],
     "singular"),
    ("not an SMV image", lambda t: GOOD + ["-img", _write(t, "x.img", "hello world")], "is not an SMV image"),
    ("SMV without size", lambda t: GOOD + ["-img", _write(t, "n.img", smv(header="{\nHEADER_BYTES=512;\nDIM=2;\n}\f"))],
     "no SIZE1/SIZE2"),
    ("truncated SMV", lambda t: GOOD + ["-mask", _write(t, "t.img", smv(8, 8, body=b"\x01\x00" * 10))],
     "is truncated"),
    ("bad source file", lambda t: GOOD + ["-sourcefile", _write(t, "s.txt", "-10 0 0 1 1e-10\n-10 a 0\n")],
     "is not a number"),
    ("output folder missing", lambda t: GOOD + ["-floatfile", str(t / "no" / "such" / "x.bin")],
     "does not exist"),
    ("no cuda", lambda t: GOOD + ["-device", "cuda:7"], "CUDA"),
]


@pytest.mark.parametrize("name,build,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(name, build, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = build(tmp_path)
    if name == "no cuda":
        import torch
        if torch.cuda.is_available() and torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    before = set(os.listdir(tmp_path))
    rc = main(argv + (OUT if "-floatfile" not in argv else []))
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert words in lines[0]
    assert "Traceback" not in err
    assert set(os.listdir(tmp_path)) == before  # nothing written, nothing half-written


def test_help_lists_every_flag(capsys):
    from torchbragg.flags import FLAGS
    assert main(["-h"]) == 0
    text = capsys.readouterr().out
    for f in FLAGS:
        for n in f.names:
            assert n in text


def test_help_and_errors_do_not_import_torch():
    """A fresh process answers -h, a bad flag and a missing file without
    importing torch (what keeps them fast; scripts/bench.py times them)."""
    code = ("import sys; from torchbragg.commands.nanobragg import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    for argv, status in ((["-h"], 0), (["-cell", "1", "-oops"], 2),
                         (["-cell", "1", "-default_F", "1", "-hkl", "/no/such.hkl"], 2)):
        p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        assert p.returncode == status, p.stderr
        assert "Traceback" not in p.stderr
        assert p.stdout.strip().splitlines()[-1] == "False"
