"""Structure factors from MTZ files and atomic models (-mtz, -model): the same
images as the equivalent P1 HKL text, symmetry expansion checked against an
independent expansion, anomalous pairs, model amplitudes against gemmi's
direct summation, and bad input as one line. All data are made here with gemmi."""

import io
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

gemmi = pytest.importorskip("gemmi")

from torchbragg import Simulator  # noqa: E402
from torchbragg.commands.nanobragg import main  # noqa: E402
from torchbragg.io.structure_factors import model_structure_factors, read_mtz  # noqa: E402

CELLS = {"P 1": (20, 22, 24, 80, 85, 95), "P 21 21 21": (20, 22, 24, 90, 90, 90), "P 4 3 2": (22, 22, 22, 90, 90, 90),
         "C 1 2 1": (30, 20, 24, 90, 100, 90)}
D_MIN = 3.0


def geometry(cell):
    return (["-cell", *map(str, cell), "-lambda", "1.0", "-distance", "40", "-detpixels", "40", "-pixel", "0.5",
             "-N", "2", "-misset", "10", "20", "30", "-oversample", "1", "-nonoise", "-nopgm", "-dtype", "float64"])


def render(argv):
    sim = Simulator.from_args(argv, dtype=torch.float64)
    with torch.no_grad():
        return sim.render()[0].cpu().numpy()


def box(cell, d_min):
    """Every (h, k, l) with d >= d_min."""
    uc = gemmi.UnitCell(*cell)
    n = [int(np.ceil(x / d_min)) + 1 for x in (uc.a, uc.b, uc.c)]
    out = []
    for h in range(-n[0], n[0] + 1):
        for k in range(-n[1], n[1] + 1):
            for l in range(-n[2], n[2] + 1):
                if (h, k, l) != (0, 0, 0) and uc.calculate_d([h, k, l]) >= d_min:
                    out.append((h, k, l))
    return out


def f32(x):
    return float(np.float32(x))  # MTZ stores float32: keep both files exactly equal


def write_hkl(path, table):
    with open(path, "w") as fh:
        for (h, k, l), f in table.items():
            fh.write(f"{h} {k} {l} {f!r}\n")
    return str(path)


def write_mtz(path, sg, cell, rows, columns):
    """rows: (h, k, l, v1, v2, ...); columns: [(label, type)] after H K L."""
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup(sg)
    mtz.set_cell_for_all(gemmi.UnitCell(*cell))
    mtz.add_dataset("sim")
    for label, kind in columns:
        mtz.add_column(label, kind)
    mtz.set_data(np.asarray(rows, dtype=np.float32))
    mtz.write_to_file(str(path))
    return str(path)


def tiny_structure(sg, cell):
    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(*cell)
    st.spacegroup_hm = sg
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    rng = np.random.default_rng(7)
    for i, el in enumerate(["C", "N", "O", "S", "Fe", "C"]):
        res = gemmi.Residue()
        res.name = "LIG"
        res.seqid = gemmi.SeqId(i + 1, " ")
        atom = gemmi.Atom()
        atom.name = el.upper()
        atom.element = gemmi.Element(el)
        atom.pos = st.cell.orthogonalize(gemmi.Fractional(*rng.uniform(0, 1, 3)))
        atom.b_iso = float(rng.uniform(8, 30))
        atom.occ = 1.0
        res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    return st


def exact_amplitudes(st, hkls):
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    return {h: abs(calc.calculate_sf_from_model(st[0], list(h))) for h in hkls}


# ----------------------------------------------------------------------------- MTZ in P1

def test_p1_mtz_renders_as_hkl_text(tmp_path):
    """A Friedel-symmetric P1 table as HKL text (every reflection) and as an
    MTZ (one half of it): the same image, exactly."""
    cell = CELLS["P 1"]
    rng = np.random.default_rng(1)
    asu = gemmi.ReciprocalAsu(gemmi.SpaceGroup("P 1"))
    full, half = {}, []
    for h in box(cell, D_MIN):
        if asu.is_in(h):
            f = f32(rng.uniform(1, 200))
            full[h] = full[tuple(-x for x in h)] = f
            half.append((*h, f, 1.0))
    hkl = write_hkl(tmp_path / "p1.hkl", full)
    mtz = write_mtz(tmp_path / "p1.mtz", "P 1", cell, half, [("FP", "F"), ("SIGFP", "Q")])
    a = render(geometry(cell) + ["-hkl", hkl])
    b = render(geometry(cell) + ["-mtz", mtz])
    assert a.sum() > 0 and np.count_nonzero(a) > 100
    np.testing.assert_array_equal(a, b)
    # the comparison can tell tables apart
    other = write_mtz(tmp_path / "q.mtz", "P 1", cell, [(*r[:3], r[3] * (1.5 if i % 3 == 0 else 1), 1.0)
                                                       for i, r in enumerate(half)], [("FP", "F"), ("SIGFP", "Q")])
    assert not np.array_equal(a, render(geometry(cell) + ["-mtz", other]))


def test_intensity_column_becomes_amplitude(tmp_path):
    cell = CELLS["P 1"]
    rows = [(1, 2, 3, 400.0, 25.0), (2, 0, 1, -9.0, 1.0), (0, 1, 1, float("nan"), 1.0)]
    mtz = write_mtz(tmp_path / "i.mtz", "P 1", cell, rows, [("IMEAN", "J"), ("SIGIMEAN", "Q")])
    t = read_mtz(mtz, default_F=7.0)  # default column: the first J when no F
    at = lambda h, k, l: t.grid[h - t.h_min, k - t.k_min, l - t.l_min]  # noqa: E731
    assert at(1, 2, 3) == 20.0 and at(-1, -2, -3) == 20.0
    assert at(2, 0, 1) == 0.0 and at(-2, 0, -1) == 0.0
    assert at(0, 1, 1) == 7.0 and at(1, 0, 0) == 7.0  # missing value, reflection not in the file
    assert t.count == 4


# ----------------------------------------------------------------------------- space groups

@pytest.mark.parametrize("sg", ["P 21 21 21", "P 4 3 2", "C 1 2 1"])
def test_asymmetric_unit_expands_like_explicit_p1(tmp_path, sg):
    """Amplitudes of a small model in the asymmetric unit (MTZ) render as the
    P1 table expanded here reflection by reflection through gemmi's ASU
    mapping (HKL text)."""
    cell = CELLS[sg]
    group = gemmi.SpaceGroup(sg)
    ops = group.operations()
    asu = gemmi.ReciprocalAsu(group)
    st = tiny_structure(sg, cell)
    everything = [h for h in box(cell, D_MIN) if not ops.is_systematically_absent(list(h))]
    unique = [h for h in everything if asu.is_in(list(h))]
    amp = {h: f32(f) for h, f in exact_amplitudes(st, unique).items()}
    mtz = write_mtz(tmp_path / "asu.mtz", sg, cell, [(*h, amp[h], 1.0) for h in unique], [("F", "F"), ("SIGF", "Q")])

    p1 = {}
    for h in everything:
        rep, _ = asu.to_asu(list(h), ops)
        p1[h] = amp[tuple(rep)]
    assert len(p1) > 3 * len(unique)
    hkl = write_hkl(tmp_path / "p1.hkl", p1)
    a = render(geometry(cell) + ["-hkl", hkl])
    b = render(geometry(cell) + ["-mtz", mtz])
    assert a.sum() > 0
    np.testing.assert_array_equal(a, b)

    t = read_mtz(mtz)
    assert t.count == len(p1) and t.read == len(unique)


# ----------------------------------------------------------------------------- anomalous pairs

def anomalous_mtz(tmp_path, sg="P 21 21 21", labels=("F(+)", "SIGF(+)", "F(-)", "SIGF(-)"), kinds="GLGL"):
    cell = CELLS[sg]
    ops = gemmi.SpaceGroup(sg).operations()
    asu = gemmi.ReciprocalAsu(gemmi.SpaceGroup(sg))
    unique = [h for h in box(cell, 4.0) if asu.is_in(list(h)) and not ops.is_systematically_absent(list(h))]
    rng = np.random.default_rng(3)
    rows = {}
    for h in unique:
        fp = f32(rng.uniform(10, 100))
        fm = f32(fp + rng.uniform(1, 5)) if not ops.is_reflection_centric(list(h)) else fp
        rows[h] = (fp, fm)
    data = [(*h, fp, 1.0, fm, 1.0) for h, (fp, fm) in rows.items()]
    return write_mtz(tmp_path / "ano.mtz", sg, cell, data, list(zip(labels, kinds))), rows, ops


def test_anomalous_pair_lands_on_h_and_minus_h(tmp_path):
    path, rows, ops = anomalous_mtz(tmp_path)
    t = read_mtz(path, "F(+)")
    assert t.anomalous and t.columns == ("F(+)", "F(-)")
    at = lambda h: t.grid[h[0] - t.h_min, h[1] - t.k_min, h[2] - t.l_min]  # noqa: E731
    acentric = 0
    for h, (fp, fm) in rows.items():
        for op in ops.sym_ops:
            g = op.apply_to_hkl(list(h))
            assert at(g) == fp, (h, g)
            assert at([-x for x in g]) == fm, (h, g)
        acentric += fp != fm
    assert acentric > 20
    # naming the minus half, the default choice (first G pair) and an explicit pair agree
    for column in ("F(-)", None, "F(+),F(-)"):
        np.testing.assert_array_equal(read_mtz(path, column).grid, t.grid)
    # swapping the pair swaps h and -h
    swapped = read_mtz(path, "F(-),F(+)")
    h = next(h for h, (fp, fm) in rows.items() if fp != fm)
    assert swapped.grid[h[0] - swapped.h_min, h[1] - swapped.k_min, h[2] - swapped.l_min] == rows[h][1]


def test_anomalous_intensities_and_pairs_by_position(tmp_path):
    path, rows, _ = anomalous_mtz(tmp_path, labels=("Iplus_x", "SIGIp", "Iminus_y", "SIGIm"), kinds="KMKM")
    t = read_mtz(path, "Iminus_y")  # no name rule matches: the pair is the K columns in order
    assert t.columns == ("Iplus_x", "Iminus_y")
    h = next(h for h, (fp, fm) in rows.items() if fp != fm)
    assert t.grid[h[0] - t.h_min, h[1] - t.k_min, h[2] - t.l_min] == pytest.approx(np.sqrt(rows[h][0]))
    assert t.grid[-h[0] - t.h_min, -h[1] - t.k_min, -h[2] - t.l_min] == pytest.approx(np.sqrt(rows[h][1]))


def test_anomalous_image_through_cli(tmp_path, monkeypatch):
    """The pair reaches the image: F(+)/F(-) renders differently from F(+) alone
    on both mates, and the report counts the P1 reflections."""
    monkeypatch.chdir(tmp_path)
    path, rows, _ = anomalous_mtz(tmp_path)
    cell = CELLS["P 21 21 21"]
    a = render(geometry(cell) + ["-mtz", path])
    b = render(geometry(cell) + ["-mtz", path, "-mtz_column", "F(+),F(+)"])
    assert not np.array_equal(a, b)
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(geometry(cell) + ["-mtz", path, "-floatfile", "a.bin"])
    assert rc == 0
    text = out.getvalue()
    assert "F(+)/F(-) (anomalous pair)" in text and "space group P 21 21 21" in text
    assert "writing dump file for next time: Fdump.bin" in text
    # the cache replays the expanded table without -mtz
    with redirect_stdout(io.StringIO()):
        assert main(geometry(cell) + ["-floatfile", "b.bin"]) == 0
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


# ----------------------------------------------------------------------------- atomic models

@pytest.mark.parametrize("fmt", ["pdb", "cif"])
def test_model_amplitudes_match_direct_summation(tmp_path, fmt):
    sg = "P 21 21 21"
    st = tiny_structure(sg, CELLS[sg])
    path = tmp_path / f"tiny.{fmt}"
    if fmt == "pdb":
        st.write_pdb(str(path))
    else:
        st.make_mmcif_document().write_file(str(path))
    ref = gemmi.read_structure(str(path))  # coordinates as written
    t = model_structure_factors(path, 2.0, default_F=-1.0)
    assert t.space_group == "P 21 21 21" and t.d_min == 2.0
    everything = box(CELLS[sg], 2.0)
    rng = np.random.default_rng(5)
    sample = [everything[i] for i in rng.choice(len(everything), 300, replace=False)]
    exact = exact_amplitudes(ref, sample)
    absent = ref.find_spacegroup().operations()
    checked = 0
    for h, f in exact.items():
        got = t.grid[h[0] - t.h_min, h[1] - t.k_min, h[2] - t.l_min]
        if absent.is_systematically_absent(list(h)):
            assert f < 1e-3 * max(exact.values()) and got in (-1.0, pytest.approx(0, abs=1e-3))
            continue
        assert got == pytest.approx(f, rel=1e-3), h
        checked += 1
    assert checked > 250
    # beyond d_min and F(000): default_F
    assert t.grid[-t.h_min, -t.k_min, -t.l_min] == -1.0
    corner = [t.h_max, t.k_max, t.l_max]
    assert gemmi.UnitCell(*CELLS[sg]).calculate_d(corner) < 2.0 and t.grid[-1, -1, -1] == -1.0


def test_model_renders_and_resolution_default(tmp_path):
    sg = "P 21 21 21"
    st = tiny_structure(sg, CELLS[sg])
    path = str(tmp_path / "tiny.pdb")
    st.write_pdb(path)
    image = render(geometry(CELLS[sg]) + ["-model", path])
    assert np.isfinite(image).all() and image.sum() > 0
    from torchbragg.build.nanobragg import models_from_args
    _, info = models_from_args(geometry(CELLS[sg]) + ["-model", path, "-dmin", "4"])
    assert any("to 4 A" in m for m in info.messages)
    _, info = models_from_args(geometry(CELLS[sg]) + ["-model", path, "-model_dmin", "3.5"])
    assert any("to 3.5 A" in m for m in info.messages)


# ----------------------------------------------------------------------------- torchbragg simulate

def test_simulate_reads_mtz(tmp_path, monkeypatch):
    from torchbragg.commands.simulate import run
    monkeypatch.chdir(tmp_path)
    path, rows, _ = anomalous_mtz(tmp_path)
    cell = CELLS["P 21 21 21"]
    flags = [a for a in geometry(cell) if a not in ("-nopgm",)]
    with redirect_stdout(io.StringIO()):
        assert main(flags + ["-mtz", path, "-floatfile", "one.bin", "-write_expt", "one.expt",
                             "-dumpfile", "F.bin"]) == 0
        assert run(["one.expt", "--out", "s", "--quiet", "-N", "2", "-oversample", "1", "-dtype", "float64",
                    "-nonoise", "-mtz", path]) == 0
    img = np.load(next(tmp_path.glob("s*.npy")))
    ref = np.fromfile(tmp_path / "one.bin", dtype=np.float32).reshape(img.shape[-2:])
    np.testing.assert_allclose(img.reshape(ref.shape), ref, rtol=1e-5, atol=1e-6 * ref.max())


# ----------------------------------------------------------------------------- bad input

def cli_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanoBragg: error: "), err
    return lines[0]


def test_bad_inputs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cell = CELLS["P 1"]
    base = geometry(cell) + ["-floatfile", "x.bin"]
    mtz = write_mtz(tmp_path / "ok.mtz", "P 1", cell, [(1, 2, 3, 10.0, 1.0, 5.0)],
                    [("FP", "F"), ("SIGFP", "Q"), ("FC", "F")])
    hkl = write_hkl(tmp_path / "ok.hkl", {(1, 2, 3): 10.0})
    st = tiny_structure("P 1", cell)
    model = str(tmp_path / "m.pdb")
    st.write_pdb(model)

    msg = cli_error(capsys, base + ["-mtz", mtz, "-mtz_column", "FOBS"])
    assert "no column 'FOBS'" in msg and "FP (F)" in msg and "FC (F)" in msg
    msg = cli_error(capsys, base + ["-mtz", mtz, "-mtz_column", "SIGFP"])
    assert "type Q" in msg and "FP (F)" in msg
    msg = cli_error(capsys, base + ["-hkl", hkl, "-mtz", mtz])
    assert "one source of structure factors" in msg and "-hkl and -mtz" in msg
    msg = cli_error(capsys, base + ["-mtz", mtz, "-model", model])
    assert "-mtz and -model" in msg
    assert "no such file" in cli_error(capsys, base + ["-mtz", str(tmp_path / "nope.mtz")])
    assert "no such file" in cli_error(capsys, base + ["-model", str(tmp_path / "nope.cif")])
    (tmp_path / "junk.mtz").write_bytes(b"MTZ \x00garbage" * 10)
    assert "is damaged" in cli_error(capsys, base + ["-mtz", str(tmp_path / "junk.mtz")])
    (tmp_path / "short.mtz").write_bytes((tmp_path / "ok.mtz").read_bytes()[:100])
    assert "short.mtz" in cli_error(capsys, base + ["-mtz", str(tmp_path / "short.mtz")])
    (tmp_path / "text.mtz").write_text("1 2 3 10\n")
    assert "not an MTZ file" in cli_error(capsys, base + ["-mtz", str(tmp_path / "text.mtz")])
    (tmp_path / "junk.cif").write_text("data_x\n_cell.length_a 10\n")
    assert "junk.cif" in cli_error(capsys, base + ["-model", str(tmp_path / "junk.cif")])
    (tmp_path / "nocell.pdb").write_text("ATOM      1  C   LIG A   1       1.000   2.000   3.000  1.00 10.00           C\n")
    assert "no unit cell" in cli_error(capsys, base + ["-model", str(tmp_path / "nocell.pdb")])
    assert "give -mtz" in cli_error(capsys, base + ["-hkl", hkl, "-mtz_column", "FP"])
    assert "-model_dmin" in cli_error(capsys, base + ["-model", model, "-model_dmin", "0"])
    assert not (tmp_path / "x.bin").exists()


def test_given_reflections_win_over_derived_ones(tmp_path):
    """A reflection in the file keeps its value even where a Friedel mate or a
    symmetry equivalent of another row would set it."""
    cell = CELLS["P 21 21 21"]
    rows = [(1, 2, 3, 10.0, 1.0), (-1, -2, -3, 20.0, 1.0), (2, 1, 1, 30.0, 1.0), (-2, 1, 1, 40.0, 1.0)]
    t = read_mtz(write_mtz(tmp_path / "w.mtz", "P 21 21 21", cell, rows, [("F", "F"), ("SIGF", "Q")]))
    at = lambda h, k, l: t.grid[h - t.h_min, k - t.k_min, l - t.l_min]  # noqa: E731
    assert (at(1, 2, 3), at(-1, -2, -3), at(2, 1, 1), at(-2, 1, 1)) == (10.0, 20.0, 30.0, 40.0)
    assert at(1, -2, -3) == 10.0 and at(2, -1, -1) == 30.0  # equivalents by 2-fold about a
