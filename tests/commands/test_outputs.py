"""Files and report of a whole run against the original's, byte for byte."""


import numpy as np
import pytest

import golden

OUTPUT_CASES = ["outputs_int_noise_pgm", "outputs_scaled", "noise_high_counts"]
REPORT_PREFIXES = ("max_I =", "mean=", "intfile_scale =", "pgm_scale =", "photons on noise image")


def _run(case, tmp_path, extra=()):
    folder = golden.materialize(case, tmp_path / case)
    argv = golden.args(case) + ["-floatfile", "float.bin", *extra]  # the default: float64
    if "-pgmfile" not in argv:
        argv.append("-nopgm")  # as the reference runs were made
    rc, text = golden.run_cli(argv, folder)
    assert rc == 0, text
    return folder, text


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_smv_pgm_and_noise_files_identical(case, tmp_path):
    folder, _ = _run(case, tmp_path)
    names = [n for n in ("int.img", "noise.img", "image.pgm") if (golden.GOLDEN / case / (n + ".gz")).exists()]
    assert names
    for name in names:
        assert (folder / name).read_bytes() == golden.reference(case, name), name


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_end_of_run_report_matches(case, tmp_path):
    _, text = _run(case, tmp_path)
    ref = golden.stdout(case)
    for prefix in REPORT_PREFIXES:
        want = [l for l in ref.splitlines() if prefix in l]
        got = [l for l in text.splitlines() if prefix in l]
        assert got == want, prefix


def test_fdump_written_like_the_original_and_read_back(tmp_path):
    folder, _ = _run("hkl_table", tmp_path, ["-nopgm", "-nonoise"])
    assert (folder / "Fdump.bin").read_bytes() == golden.reference("hkl_table", "Fdump.bin")
    # without -hkl the cache is read and says so
    args = [a for a in golden.args("hkl_table") if a not in ("-hkl", "P1.hkl")]
    rc, text = golden.run_cli(args + ["-floatfile", "again.bin", "-nopgm", "-nonoise"], folder)
    assert rc == 0
    assert "reading Fs from Fdump.bin" in text
    again = np.fromfile(folder / "again.bin", "<f4")
    first = np.fromfile(folder / "float.bin", "<f4")
    np.testing.assert_array_equal(again, first)


def test_default_output_names(tmp_path):
    folder, text = _run("outputs_int_noise_pgm", tmp_path)
    rc, text = golden.run_cli(["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "10", "-N", "2",
                               "-detpixels", "32", "-seed", "3"], folder)
    assert rc == 0
    for name in ("floatimage.bin", "intimage.img", "image.pgm", "noiseimage.img"):
        assert (folder / name).exists(), name


def test_printout_pixel_reports_that_pixel(tmp_path):
    rc, text = golden.run_cli(["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "10", "-N", "2",
                               "-detpixels", "8", "-nonoise", "-nopgm", "-floatfile", "f.bin",
                               "-printout_pixel", "3", "5"], tmp_path)
    assert rc == 0
    image = np.fromfile(tmp_path / "f.bin", "<f4").reshape(8, 8)
    line = [l for l in text.splitlines() if l.startswith("   3    5 : pixel")]
    assert len(line) == 1
    assert float(line[0].split()[-1]) == pytest.approx(float(image[5, 3]), rel=1e-6)
    rc, text = golden.run_cli(["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "10", "-N", "2",
                               "-detpixels", "8", "-nonoise", "-nopgm", "-floatfile", "f.bin", "-printout",
                               "-roi", "1", "2", "3", "4"], tmp_path)
    assert sum(": pixel" in l for l in text.splitlines()) == 4


def test_progress_meter_counts_to_100(tmp_path):
    rc, text = golden.run_cli(["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "10", "-N", "2",
                               "-detpixels", "64", "-nonoise", "-nopgm", "-floatfile", "f.bin", "-progress"], tmp_path)
    assert rc == 0
    done = [int(l.split("%")[0]) for l in text.splitlines() if l.endswith("% done")]
    assert done and done[-1] == 100 and done == sorted(done)
