"""HKL text, the Fdump cache, MOSFLM matrices and source files."""

import math
import sys

import numpy as np
import pytest

import golden
from torchbragg.errors import InputError
from torchbragg.io.hkl import HKLTable, fdump_bytes, read_fdump, read_hkl, write_fdump
from torchbragg.io.matrix import read_mosflm_matrix
from torchbragg.io.sources import read_sources, read_text_columns, source_defaults

CASE = golden.GOLDEN / "hkl_table"


@pytest.mark.skipif(sys.byteorder != "little", reason="the reference cache is little-endian")
def test_fdump_byte_identical(tmp_path):
    table = read_hkl(CASE / "P1.hkl")
    assert (table.h_min, table.h_max, table.k_min, table.k_max, table.l_min, table.l_max) == (-6, 6, -6, 6, -6, 6)
    assert table.count == 2197  # "2197 initialized hkls" in the original's output
    assert "2197 initialized hkls" in golden.stdout("hkl_table")
    ref = golden.reference("hkl_table", "Fdump.bin")
    assert fdump_bytes(table) == ref
    write_fdump(tmp_path / "Fdump.bin", table)
    assert (tmp_path / "Fdump.bin").read_bytes() == ref
    back = read_fdump(tmp_path / "Fdump.bin")
    assert np.array_equal(back.grid, table.grid)
    assert (back.h_min, back.k_min, back.l_min) == (-6, -6, -6)


def test_hkl_values_and_defaults(tmp_path):
    table = read_hkl(CASE / "P1.hkl")
    first = (CASE / "P1.hkl").read_text().split("\n")[0].split()
    h, k, l, F = int(first[0]), int(first[1]), int(first[2]), float(first[3])
    assert table.grid[h - table.h_min, k - table.k_min, l - table.l_min] == F

    path = tmp_path / "sparse.hkl"
    path.write_text("1 0 0 10.5\n\n  -1 2 3 7  \n1 0 0 11\n")
    for default, fill in ((0.0, 0.0), (3.5, 3.5)):
        t = read_hkl(path, default_F=default)
        assert t.grid.shape == (3, 3, 4)
        assert t.grid[1 - t.h_min, 0 - t.k_min, 0 - t.l_min] == 11.0  # later line wins
        assert t.grid[-1 - t.h_min, 2 - t.k_min, 3 - t.l_min] == 7.0
        assert t.grid[0 - t.h_min, 1 - t.k_min, 1 - t.l_min] == fill
        assert t.count == 3 and t.warnings == ()


def test_fdump_round_trip_and_padding(tmp_path):
    rs = np.random.default_rng(3)
    table = HKLTable(rs.random((3, 4, 5)) * 100, -1, 0, -2, count=60)
    raw = fdump_bytes(table)
    assert raw.startswith(b"-1 1 0 3 -2 2\n\f")
    body = np.frombuffer(raw[len(b"-1 1 0 3 -2 2\n\f"):], "=f8").reshape(4, 5, 6)
    assert np.array_equal(body[:3, :4, :5], table.grid)
    assert not body[3].any() and not body[:, 4].any() and not body[:, :, 5].any()
    write_fdump(tmp_path / "d.bin", table)
    back = read_fdump(tmp_path / "d.bin")
    assert np.array_equal(back.grid, table.grid) and (back.h_max, back.k_max, back.l_max) == (1, 3, 2)


def test_non_integer_index_warns_and_skips_the_line(tmp_path):
    path = tmp_path / "odd.hkl"
    path.write_text("0 0 0 1\n1 0 0 3\n1.5 0 -0.7 2\n")
    t = read_hkl(path)
    assert t.warnings == (f"WARNING: {path}:3: non-integer index h=1.5 l=-0.7; line skipped",)
    assert (t.h_min, t.h_max, t.l_min, t.l_max) == (0, 1, 0, 0)
    assert t.grid[1, 0, 0] == 3.0  # not overwritten by the truncated 1 0 0 line
    assert t.count == 2


@pytest.mark.parametrize("text,match", [
    ("1 2 3\n", "four numbers"),
    ("1 2 3 4 5\n", "four numbers"),
    ("1 2 3 4\n# comment\n", r":2: '#' is not a number"),
    ("1 2 x 4\n", r":1: 'x' is not a number"),
    ("\n\n", "no reflections"),
    ("1 2 3 nan\n", "'nan' is not a number"),
])
def test_hkl_errors(tmp_path, text, match):
    path = tmp_path / "bad.hkl"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        read_hkl(path)


def test_hkl_and_fdump_missing_or_damaged(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_hkl(tmp_path / "none.hkl")
    with pytest.raises(InputError, match="no such file"):
        read_fdump(tmp_path / "none.bin")
    (tmp_path / "junk.bin").write_bytes(b"hello\n")
    with pytest.raises(InputError, match="bad header"):
        read_fdump(tmp_path / "junk.bin")
    good = fdump_bytes(HKLTable(np.ones((2, 2, 2)), 0, 0, 0))
    (tmp_path / "short.bin").write_bytes(good[:-8])
    with pytest.raises(InputError, match="truncated"):
        read_fdump(tmp_path / "short.bin")


def test_mosflm_matrix_layout(tmp_path):
    recip = read_mosflm_matrix(golden.GOLDEN / "matrix_file" / "A.mat")
    # the file's first column is a*: (x, y, z) down the three lines
    assert recip[0].tolist() == [0.0180864170, 0.0107983510, 0.0063495805]
    assert recip[:, 0].tolist() == [0.0180864170, -0.0102883421, 0.0002188335]
    # line breaks do not matter, trailing MOSFLM lines are ignored
    path = tmp_path / "m.mat"
    path.write_text("1 0 0 0 2\n0 0 0 3\n 0.0 0.0 0.0\n  1.0 2.0 3.0\nCELL junk\n")
    assert read_mosflm_matrix(path).tolist() == [[1, 0, 0], [0, 2, 0], [0, 0, 3]]


@pytest.mark.parametrize("text,match", [
    ("1 0 0\n0 1 0\n", "found 6"),
    ("1 0 0\n0 x 0\n0 0 1\n", "'x' is not a number"),
    ("1 0 0\n2 0 0\n0 0 1\n", "singular"),
    ("0 0 0\n0 0 0\n0 0 0\n", "singular"),
])
def test_mosflm_matrix_errors(tmp_path, text, match):
    path = tmp_path / "bad.mat"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        read_mosflm_matrix(path)
    with pytest.raises(InputError, match="no such file"):
        read_mosflm_matrix(tmp_path / "nope.mat")


def test_sources_file(tmp_path):
    rows = read_sources(golden.GOLDEN / "sourcefile_two" / "sources.txt")
    assert rows == [(-10.0, 0.0, 0.0, 1.0, 1e-10), (-10.0, 0.002, 0.001, 2.0, 1.1e-10)]
    path = tmp_path / "s.txt"
    path.write_text("-10,0;0 ! 2\n \t , \n-9 1\nnan nan nan 3 1.2e-10 99\n")
    rows = read_sources(path)
    assert len(rows) == 3
    assert rows[0] == (-10.0, 0.0, 0.0, 2.0, pytest.approx(math.nan, nan_ok=True))
    assert rows[1][:2] == (-9.0, 1.0) and all(math.isnan(v) for v in rows[1][2:])
    filled = source_defaults(rows, (1.0, 0.0, 0.0), 1e-10)
    assert filled[1] == (-9.0, 1.0, -0.0, 1.0, 1e-10)
    assert filled[2] == (-10.0, -0.0, -0.0, 3.0, 1.2e-10)


def test_sources_errors(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("# X Y Z\n-10 0 0\n")
    with pytest.raises(InputError, match=r":1: '#' is not a number"):
        read_sources(path)
    path.write_text("\n\n")
    with pytest.raises(InputError, match="no sources"):
        read_sources(path)
    with pytest.raises(InputError, match="no such file"):
        read_sources(tmp_path / "none.txt")
    assert read_text_columns(path, 2) == []
