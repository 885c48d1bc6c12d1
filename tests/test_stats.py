"""End-of-run statistics and the integer/PGM scalings against the original."""

import dataclasses
import re

import numpy as np
import pytest

import golden
from torchbragg import stats


def _case_setup(case):
    out = golden.stdout(case)
    m = golden.MANIFEST[case]
    px = float(re.search(r"pixel=(\S+) meters", out).group(1))
    oversample = int(re.search(r"(\d+)x\d+ pixel oversample steps", out).group(1))
    roi = tuple(int(v) for v in re.search(r"roi: (-?\d+) < x < (-?\d+) && (-?\d+) < y < (-?\d+)", out).groups())
    mask = None
    if "-mask" in m["args"]:
        raw = golden.reference(case, "mask.img")
        mask = np.frombuffer(raw[512:512 + 2 * m["fpixels"] * m["spixels"]], "<u2").reshape(m["spixels"], m["fpixels"])
    scale = 0.0
    found = re.search(r"-scale (\S+)", m["args"])
    if found:
        scale = float(found.group(1))
    return out, px, oversample, roi, mask, scale


@pytest.mark.parametrize("case", golden.cases())
def test_report_lines_match_original(case):
    out, px, oversample, roi, mask, scale = _case_setup(case)
    st = stats.image_statistics(golden.float_image(case), roi, mask, px, oversample, omp_threads=2)
    lines = stats.format_report(st, stats.intfile_scale(scale, st.max_I))
    expected = [line for line in out.splitlines()
                if line.startswith(("max_I = ", "mean= ", "intfile_scale = "))]
    assert lines == expected


def test_maximum_tie_serial_and_threaded():
    # four pixels share the maximum; the reference (2 threads) reports the
    # one the second thread meets first, a serial run the first row-major one
    out, px, oversample, roi, mask, _ = _case_setup("pivot_sample_override")
    img = golden.float_image("pivot_sample_override")
    assert (img == img.max()).sum() == 4
    serial = stats.image_statistics(img, roi, mask, px, oversample)
    assert stats.format_report(serial)[0] == "max_I = 133.995  at 0.00795 0.00665"
    threaded = stats.image_statistics(img, roi, mask, px, oversample, omp_threads=2)
    assert stats.format_report(threaded)[0] in out


def test_statistics_guards_and_masks():
    img = np.zeros((4, 5), np.float32)
    st = stats.image_statistics(img, None, None, 1e-4, 1)
    assert (st.max_I, st.max_I_x, st.max_I_y, st.mean, st.rms, st.rmsd) == (0, 0, 0, 0, 0, 0)
    img[2, 3] = 8.0
    img[0, 0] = 9.0
    mask = np.ones_like(img)
    mask[0, 0] = 0
    st = stats.image_statistics(img, None, mask, 1e-4, 2)
    assert st.max_I == 8.0
    assert (st.max_I_x, st.max_I_y) == pytest.approx((3 * 1e-4 + 0.75e-4, 2 * 1e-4 + 0.75e-4))
    assert st.n_pixels == 19
    assert st.mean == pytest.approx(8.0 / 19)
    assert st.rms == pytest.approx(np.sqrt(64.0 / 18))
    # rmsd runs over masked pixels too
    dev = img.astype(np.float64).ravel() - 8.0 / 19
    assert st.rmsd == pytest.approx(np.sqrt((dev * dev).sum() / 19))
    one = stats.image_statistics(img, (3, 3, 2, 2), None, 1e-4, 1)
    assert (one.mean, one.rms, one.rmsd) == (8.0, pytest.approx(8.0), 0.0)


@pytest.mark.parametrize("case,adc", [("outputs_int_noise_pgm", 40.0), ("outputs_scaled", 10.0)])
def test_int_and_pgm_pixels_match_original(case, adc):
    out, px, oversample, roi, mask, scale = _case_setup(case)
    img = golden.float_image(case)
    st = stats.image_statistics(img, roi, mask, px, oversample, omp_threads=2)
    isc = stats.intfile_scale(scale, st.max_I)
    ints = stats.int_image(img, isc, adc, roi=roi, max_I=st.max_I)
    ref = np.frombuffer(golden.reference(case, "int.img")[512:], "<u2").reshape(img.shape)
    assert np.array_equal(ints, ref)
    found = re.search(r"-pgmscale (\S+)", golden.MANIFEST[case]["args"])
    psc = stats.pgm_scale(float(found.group(1)) if found else 0.0, isc, st.rmsd)
    assert f"pgm_scale = {stats.c_g(psc)}" in out.splitlines()
    pgm = golden.reference(case, "image.pgm")
    assert np.array_equal(stats.pgm_bytes(img, psc, roi), np.frombuffer(pgm[-img.size:], np.uint8).reshape(img.shape))


def test_int_image_rounding_clipping_and_roi():
    img = np.array([[0.0, 1.2, 2.5, -7.0], [1e9, 3.49999, np.nan, 0.5]], np.float32)
    got = stats.int_image(img, 1.0, 0.0)
    assert got.tolist() == [[0, 1, 3, 0], [65535, 3, 0, 1]]
    # floorf: x + 0.5 is rounded to float before the floor
    # 99.4999999 + 0.5 becomes float 100.0, so the C writes 100, not 99
    assert stats.int_image(np.ones((1, 1), np.float32), 99.4999999, 0.0)[0, 0] == 100
    roi = stats.int_image(np.ones((3, 3), np.float32), 2.0, 40.0, roi=(1, 1, 0, 1))
    assert roi.tolist() == [[0, 42, 0], [0, 42, 0], [0, 0, 0]]
    auto = stats.int_image(np.array([[0.0, 2.0]], np.float32), 0.0, 0.0)
    assert auto.tolist() == [[0, 55000]]


def test_scales_and_formatting():
    assert stats.intfile_scale(0.0, 0.0) == 1.0
    assert stats.intfile_scale(-1.0, 110.0) == 500.0
    assert stats.intfile_scale(3.0, 110.0) == 3.0
    assert stats.pgm_scale(0.0, 7.0, 0.0) == 7.0
    assert stats.pgm_scale(0.0, 7.0, 10.0) == 5.0
    assert stats.pgm_bytes(np.array([[1.0, 300.0, 2.9]], np.float32), 1.0).tolist() == [[1, 255, 2]]
    for x, s in [(118.83001, "118.83"), (0.006575, "0.006575"), (1e-300, "1e-300"), (123456789.0, "1.23457e+08"),
                 (0.0001, "0.0001"), (0.00001, "1e-05"), (-0.0, "-0"), (float("inf"), "inf"), (100000.0, "100000"),
                 (1e6, "1e+06")]:
        assert stats.c_g(x) == s
    assert stats.format_report(photons=38259.4, overloads=0) == ["38259 photons on noise image (0 overloads)"]


def test_compiled_and_python_helpers_agree(monkeypatch):
    """The fused multiply-add and running sum give the same bits with or
    without the compiled helpers."""
    import torchbragg.noise as noise_mod
    from torchbragg import stats as st
    if noise_mod.LIBRARY is None:
        pytest.skip("compiled helpers not built")
    rng = np.random.default_rng(3)
    vals = np.concatenate([rng.exponential(50.0, 20000), [0.0, 1e-300, 65534.5, 1e30]])
    fast_fma = st._fma_np(vals, 462.846, 40.0)
    fast_sum = st._seq_sum(vals)
    monkeypatch.setattr(noise_mod, "LIBRARY", None)
    np.testing.assert_array_equal(st._fma_np(vals, 462.846, 40.0), fast_fma)
    assert st._seq_sum(vals) == fast_sum


@pytest.mark.parametrize("fma", [True, False])
def test_compiled_and_python_int_image_and_statistics_agree(monkeypatch, fma):
    """The integer image and the statistics give the same bits with or
    without the compiled loops, on ties, overflows, NaN, ROI and mask."""
    import torchbragg.noise as noise_mod
    if noise_mod.LIBRARY is None:
        pytest.skip("compiled helpers not built")
    rng = np.random.default_rng(5)
    img = rng.exponential(30.0, (61, 83)).astype(np.float32)
    img[0, :6] = [np.nan, np.inf, -np.inf, -3.0, 1e30, 3e38]
    img[1, :4] = [0.5, 1.5, 2.4999998, 65535.0]
    img[5, 7] = img.max()  # a tie for the maximum
    mask = (rng.random(img.shape) > 0.3).astype(np.uint16)
    cases = [dict(), dict(roi=(3, 70, 2, 50)), dict(mask=mask), dict(roi=(1, 60, 0, 40), mask=mask)]

    finite = rng.exponential(30.0, (61, 83)).astype(np.float32)
    finite[2, 3] = finite[40, 1] = 9e19  # its square overflows float

    def everything():
        out = [stats.image_statistics(finite, omp_threads=2, mask=mask), stats.image_statistics(finite[:, :50])]
        for kw in cases:
            out.append(stats.image_statistics(img, omp_threads=2, **kw))
            out.append(stats.int_image(img, 462.846, 40.0, roi=kw.get("roi"), fma=fma).tobytes())
            out.append(stats.int_image(img, 0.0, 1.0, roi=kw.get("roi"), fma=fma).tobytes())
        return out
    fast = everything()
    monkeypatch.setattr(noise_mod, "LIBRARY", None)
    slow = everything()
    for a, b in zip(fast, slow):
        if isinstance(a, stats.ImageStats):
            a, b = np.array(dataclasses.astuple(a), float), np.array(dataclasses.astuple(b), float)
            np.testing.assert_array_equal(a, b)  # NaN where NaN
        else:
            assert a == b
