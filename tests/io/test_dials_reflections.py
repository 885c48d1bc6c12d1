"""Structure factors from DIALS reflection tables: the msgpack .refl file
(written here column by column, as DIALS lays it out) and its JSON export
(DIALS's integrated reflections of the measured L-cysteine sweep)."""

from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from torchbragg.errors import InputError
from torchbragg.io.structure_factors import read_dials_reflections
from torchbragg.simulator import Simulator
from golden import DATA

DATA = DATA / "lcys_02"


def write_refl(path, hkl, intensity, header="dials::af::reflection_table"):
    hkl = np.asarray(hkl, dtype="<i4")
    intensity = np.asarray(intensity, dtype="<f8")
    n = len(hkl)
    data = {"miller_index": ["cctbx::miller::index<>", [n, hkl.tobytes()]],
            "intensity.sum.value": ["double", [n, intensity.tobytes()]],
            "xyzobs.px.value": ["vec3<double>", [n, np.zeros((n, 3), "<f8").tobytes()]]}
    Path(path).write_bytes(msgpack.packb([header, 1, {"identifiers": {}, "nrows": n, "data": data}]))


def value(table, h, k, l):
    return table.grid[h - table.h_min, k - table.k_min, l - table.l_min]


def test_refl_mean_intensity_friedel_mates_and_default(tmp_path):
    path = tmp_path / "integrated.refl"
    write_refl(path, [[1, 2, 3], [1, 2, 3], [0, 1, -2], [2, 0, 0], [0, 0, 0]], [90.0, 110.0, -5.0, 16.0, 1e6])
    t = read_dials_reflections(path, default_F=7.0)
    assert value(t, 1, 2, 3) == pytest.approx(10.0)  # sqrt of the mean of 90 and 110
    assert value(t, -1, -2, -3) == pytest.approx(10.0)
    assert value(t, 0, 1, -2) == 0.0  # a negative mean intensity
    assert value(t, 2, 0, 0) == pytest.approx(4.0)
    assert value(t, 1, 0, 0) == 7.0  # not measured
    assert t.read == 4 and t.columns == ("intensity.sum.value",)
    sym = read_dials_reflections(path, space_group="P 2 2 2")
    assert value(sym, -1, 2, 3) == pytest.approx(10.0) and value(sym, 1, -2, 3) == pytest.approx(10.0)


def test_refl_refusals(tmp_path):
    bad = tmp_path / "other.refl"
    write_refl(bad, [[1, 0, 0]], [1.0], header="something else")
    with pytest.raises(InputError, match="not a DIALS reflection table"):
        read_dials_reflections(bad)
    junk = tmp_path / "junk.refl"
    junk.write_bytes(b"\xc1\xc1not msgpack")
    with pytest.raises(InputError, match="cannot read DIALS reflection table"):
        read_dials_reflections(junk)
    with pytest.raises(InputError):
        read_dials_reflections(tmp_path / "missing.refl")


def test_json_export_of_the_measured_sweep():
    t = read_dials_reflections(DATA / "23_integrated_refl.json", space_group="P 2 2 2")
    import json
    rows = json.loads((DATA / "23_integrated_refl.json").read_text())["reflections"]
    h, k, l = rows[1]["hkl"]
    # P 2 2 2 with Friedel mates: every sign change is the same reflection, averaged over its observations
    same = [r["I"] for r in rows if [abs(v) for v in r["hkl"]] == [abs(h), abs(k), abs(l)]]
    assert value(t, h, k, l) == pytest.approx(np.sqrt(max(np.mean(same), 0.0)))
    assert value(t, -h, k, l) == value(t, h, k, l)  # a mirror of P 2 2 2


def test_symmetry_mates_are_averaged_and_the_experiment_gives_the_group(tmp_path):
    path = tmp_path / "integrated.refl"
    # two observations of one P 2 2 2 reflection under different indices (and one negative)
    write_refl(path, [[1, 2, 3], [-1, 2, -3], [0, 1, 1], [0, -1, -1]], [4.0, 16.0, 9.0, -1.0])
    for symbol in ("P 2 2 2", " P 2 2"):  # a name, or a Hall symbol as experiment lists hold it
        t = read_dials_reflections(path, space_group=symbol)
        for hkl in ([1, 2, 3], [-1, 2, -3], [1, -2, -3], [-1, -2, 3], [-1, -2, -3]):
            assert value(t, *hkl) == pytest.approx(np.sqrt(10.0))
        assert value(t, 0, 1, 1) == pytest.approx(2.0) and value(t, 0, -1, 1) == pytest.approx(2.0)
    with pytest.raises(InputError, match="unknown space group"):
        read_dials_reflections(path, space_group="Q 9 9")
    # the experiment's crystal symmetry expands the table, so its reflections refine as one each
    from torchbragg.build.experiment import build_from_experiment, parse_experiment_flags
    from torchbragg.io.dials import read_experiments
    from torchbragg.refine.parameters import StructureFactorGroup
    e = read_experiments(str(DATA / "23_integrated.expt"))[0]
    sim = build_from_experiment(e, parse_experiment_flags(["-hkl", str(DATA / "23_integrated_refl.json"),
                                                           "-default_F", "0"]), dtype=torch.float64)[0]
    group = StructureFactorGroup().bind(sim)
    assert len(group.reflections) > 20


def test_hkl_flag_reads_a_reflection_table(tmp_path):
    path = tmp_path / "integrated.refl"
    write_refl(path, [[1, 2, 3], [2, 0, 0]], [100.0, 16.0])
    sim = Simulator.from_args(f"-cell 50 60 70 90 90 90 -hkl {path} -default_F 1 -detpixels 8 -nointerpolate "
                              f"-nopgm -nonoise".split() + ["-floatfile", str(tmp_path / "f.bin")],
                              dtype=torch.float64)
    f = sim.crystal.structure_factors
    amp = f.amplitude_sq(torch.tensor([[1.0, 2.0, 3.0], [2.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert amp.reshape(-1).tolist() == pytest.approx([100.0, 16.0, 1.0])
