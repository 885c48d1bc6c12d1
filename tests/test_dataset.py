"""Whole datasets: sweeps and still series in one run, against single
nanoBragg runs, with per-image seeds, resume, workers and spectra."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout

import numpy as np
import pytest

import golden
from torchbragg import dataset as ds
from torchbragg.io.dials import read_experiments
from torchbragg.commands.simulate import run

GEOMETRY = ["-cell", "70", "80", "90", "75", "85", "95", "-lambda", "1.2", "-distance", "100", "-detpixels", "64",
            "-misset", "10", "20", "30", "-pixel", "0.2"]
PHYSICS = ["-N", "4", "-default_F", "100", "-phisteps", "2"]
OSC = 1.0


def simulate(argv, cwd):
    old = os.getcwd()
    try:
        os.chdir(cwd)
        with redirect_stdout(io.StringIO()) as buf:
            rc = run(argv)
    finally:
        os.chdir(old)
    assert rc == 0
    return buf.getvalue()


@pytest.fixture
def sweep(tmp_path):
    """A 10-image sweep of 1-degree images, written from a nanoBragg run's experiment."""
    rc, text = golden.run_cli(GEOMETRY + PHYSICS + ["-phi", "0", "-osc", str(OSC), "-floatfile", "x.bin",
                                                     "-nonoise", "-nopgm", "-write_expt", "one.expt"], tmp_path)
    assert rc == 0, text
    doc = json.loads((tmp_path / "one.expt").read_text())
    scan = doc["scan"][0]
    start = scan["properties"]["oscillation"][0]  # half a step before -phi: the experiment path samples mid-step
    assert start == pytest.approx(-OSC / 4)  # -phisteps 2
    scan["image_range"] = [1, 10]
    scan["properties"] = {"oscillation": [start + OSC * i for i in range(10)], "exposure_time": [1.0] * 10,
                          "epochs": [float(i) for i in range(10)]}
    (tmp_path / "sweep.expt").write_text(json.dumps(doc))
    return tmp_path


def test_sweep_equals_single_nanobragg_runs(sweep):
    """Image k of a 10-image sweep is the nanoBragg run at -phi (k-1)*osc: the
    same float image (float64) and the same noise image given -seed S+k-1."""
    simulate(["sweep.expt", "--out", "f", "--quiet", *PHYSICS, "-dtype", "float64"], sweep)
    simulate(["sweep.expt", "--out", "n", "--quiet", "--format", "smv", *PHYSICS, "-dtype", "float64",
              "-seed", "7"], sweep)
    for k in range(1, 11):
        rc, _ = golden.run_cli(GEOMETRY + PHYSICS + ["-phi", str(OSC * (k - 1)), "-osc", str(OSC), "-seed",
                                                     str(7 + k - 1), "-floatfile", f"c{k}.bin", "-noisefile",
                                                     f"c{k}.img", "-nopgm", "-dtype", "float64"], sweep)
        assert rc == 0
        single = np.fromfile(sweep / f"c{k}.bin", "<f4")
        assert np.array_equal(np.load(sweep / f"f_{k:05d}.npy").reshape(-1), single), k
        ours, theirs = (sweep / f"n_{k:05d}.img").read_bytes(), (sweep / f"c{k}.img").read_bytes()
        assert ours[512:] == theirs[512:], k  # pixels; the headers differ in phi
    truth = read_experiments(str(sweep / "n.expt"))
    assert truth[0].scan.image_range == (1, 10)


def test_resume_after_a_kill_completes_the_set(sweep):
    argv = [sys.executable, "-m", "torchbragg.commands.tool", "simulate", "sweep.expt", "--out", "k", "--quiet",
            "--format", "smv", *PHYSICS, "-N", "12", "-oversample", "6"]
    proc = subprocess.Popen(argv, cwd=sweep, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not list(sweep.glob("k_000*.img")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sorted(p.name for p in sweep.glob("k_*.img"))
    assert 0 < len(written) < 10, written
    for p in sweep.glob("k_*.img"):  # every file there is a whole image
        assert p.stat().st_size == 512 + 64 * 64 * 2
    out = simulate(["sweep.expt", "--out", "k", "--resume", "--format", "smv", *PHYSICS, "-N", "12",
                    "-oversample", "6"], sweep)
    assert f"{len(written)} of 10 images already written" in out
    simulate(["sweep.expt", "--out", "whole", "--quiet", "--format", "smv", *PHYSICS, "-N", "12",
              "-oversample", "6"], sweep)
    for k in range(1, 11):
        assert (sweep / f"k_{k:05d}.img").read_bytes() == (sweep / f"whole_{k:05d}.img").read_bytes()
    assert not [p for p in os.listdir(sweep) if ".tmp" in p]


def test_workers_write_the_same_files(sweep):
    simulate(["sweep.expt", "--out", "serial", "--quiet", "--format", "smv", "--images", "1:4", *PHYSICS], sweep)
    simulate(["sweep.expt", "--out", "par", "--quiet", "--format", "smv", "--images", "1:4", "--workers", "2",
              *PHYSICS], sweep)
    for k in range(1, 5):
        assert (sweep / f"serial_{k:05d}.img").read_bytes() == (sweep / f"par_{k:05d}.img").read_bytes()
    assert not (sweep / "par_00005.img").exists()


def test_ray_cluster_writes_the_same_files(sweep):
    pytest.importorskip("ray")
    simulate(["sweep.expt", "--out", "serial", "--quiet", "--format", "npy", "--images", "1:8", *PHYSICS], sweep)
    simulate(["sweep.expt", "--out", "ray", "--quiet", "--format", "npy", "--images", "1:8", "--ray",
              "--workers", "2", *PHYSICS], sweep)
    for k in range(1, 9):
        assert (sweep / f"serial_{k:05d}.npy").read_bytes() == (sweep / f"ray_{k:05d}.npy").read_bytes()


def test_still_series_from_a_seed_and_its_truth(sweep):
    simulate(["sweep.expt", "--out", "st", "--quiet", "--stills", "3", "--orientation-seed", "5", *PHYSICS,
              "-dtype", "float64"], sweep)
    truth = read_experiments(str(sweep / "st.expt"))
    assert len(truth) == 3
    assert all(e.scan is None and e.goniometer is None for e in truth)
    u = [e.crystal.real_vectors().numpy() for e in truth]
    assert not np.allclose(u[0], u[1])
    # each truth experiment, rendered on its own, gives its image
    for k in range(3):
        images = list(ds.images(str(sweep / "st.expt"), PHYSICS + ["-dtype", "float64"], experiment=k))
        assert len(images) == 1
        assert np.array_equal(images[0][1], np.load(sweep / f"st_{k + 1:05d}.npy"))
    # the same seed draws the same orientations
    again = ds.random_rotations(3, 5)
    assert np.allclose(again @ np.transpose(again, (0, 2, 1)), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(again), 1.0)


def test_orientations_file_and_spectra_with_weights(sweep):
    (sweep / "orient.txt").write_text("0 0 0\n5 -3 20\n")
    e1, e2 = 10332.0, 10400.0
    (sweep / "spectra.txt").write_text(f"1 {e1} 1\n2 {e1} 3\n2 {e2} 1\n")
    simulate(["sweep.expt", "--out", "sp", "--quiet", "--orientations", "orient.txt", "--spectra", "spectra.txt",
              *PHYSICS, "-dtype", "float64"], sweep)
    for name, lines in (("e1", f"1 {e1} 1\n2 {e1} 1\n"), ("e2", f"1 {e2} 1\n2 {e2} 1\n")):
        (sweep / f"{name}.txt").write_text(lines)
        simulate(["sweep.expt", "--out", name, "--quiet", "--orientations", "orient.txt", "--spectra",
                  f"{name}.txt", *PHYSICS, "-dtype", "float64"], sweep)
    i1 = np.load(sweep / "e1_00002.npy")
    i2 = np.load(sweep / "e2_00002.npy")
    mixed = np.load(sweep / "sp_00002.npy")
    # the spectrum's weights are honoured: 3 parts e1, 1 part e2
    np.testing.assert_allclose(mixed, (3 * i1 + i2) / 4, rtol=1e-5, atol=1e-6 * i1.max())
    assert np.array_equal(np.load(sweep / "sp_00001.npy"), np.load(sweep / "e1_00001.npy"))
    assert not np.allclose(i1, i2)


def test_bad_dataset_options_are_one_line(sweep, capsys):
    from torchbragg.commands.simulate import main
    (sweep / "bad.txt").write_text("1 2\n")
    for argv, words in ((["--format", "tiff"], "unknown --format 'tiff'"),
                        (["--stills", "0"], "--stills expects"),
                        (["--orientations", str(sweep / "bad.txt")], "bad.txt:1: give 9 numbers"),
                        (["--spectra", str(sweep / "bad.txt")], "bad.txt:1: expected 'shot energy_eV weight'"),
                        (["--images", "3:20"], "outside the scan's images 1:10"),
                        (["--workers", "0"], "--workers expects"),
                        (["-distance", "100"], "-distance is held by the experiment file"),
                        (["-device", "tpu"], "-device takes cpu, cuda")):
        assert main([str(sweep / "sweep.expt"), "--out", str(sweep / "bad"), *argv, *PHYSICS]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)
        assert not list(sweep.glob("bad_*")) and not (sweep / "bad.expt").exists()


def test_cbf_images_hold_the_photon_counts(sweep):
    fabio = pytest.importorskip("fabio")
    simulate(["sweep.expt", "--out", "c", "--quiet", "--format", "cbf", "--images", "2:3", *PHYSICS, "-seed", "4"],
             sweep)
    simulate(["sweep.expt", "--out", "f", "--quiet", "--format", "npy", "--images", "2:3", *PHYSICS], sweep)
    for number in (2, 3):  # files and seeds follow the scan's image numbers
        expected = np.load(sweep / f"f_{number:05d}.npy")
        counts = fabio.open(str(sweep / f"c_{number:05d}.cbf")).data
        assert np.array_equal(counts, ds.photon_counts(expected, 4, number)[0])
        assert abs(counts.sum() - expected.sum()) < 5 * np.sqrt(expected.sum()) + 1


def test_nexus_file_holds_the_sweep(sweep):
    h5py = pytest.importorskip("h5py")
    import hdf5plugin  # noqa: F401  (registers the bitshuffle-LZ4 filter)
    simulate(["sweep.expt", "--out", "nx", "--quiet", "--format", "nxs", "--images", "3:5", *PHYSICS, "-seed", "2"],
             sweep)
    simulate(["sweep.expt", "--out", "f", "--quiet", "--format", "npy", "--images", "3:5", *PHYSICS], sweep)
    assert not (sweep / "nx_work").exists()
    with h5py.File(sweep / "nx.nxs", "r") as fh:
        data = fh["/entry/data/data"][()]
        assert data.shape == (3, 64, 64)
        omega = [k for k in fh["/entry/sample/transformations"] if not k.endswith(("_end", "_increment_set"))]
        angles = fh[f"/entry/sample/transformations/{omega[0]}"][()]
    np.testing.assert_allclose(angles, [1.75, 2.75, 3.75])  # the scan's starts of images 3..5
    for k, number in enumerate((3, 4, 5)):
        expected = ds.photon_counts(np.load(sweep / f"f_{number:05d}.npy"), 2, number)[0]
        assert np.array_equal(data[k], expected)
