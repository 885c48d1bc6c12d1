"""scripts/bench.py: options and case list only (no timing runs here);
scripts/bench_refine.py: options and one tiny run (its table and JSON)."""

import importlib.util
import json
import subprocess
import sys

import pytest
from golden import ROOT

SCRIPT = ROOT / "scripts" / "bench.py"


def load():
    spec = importlib.util.spec_from_file_location("tb_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_help():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    for opt in ("--cases", "--repeat", "--dtype", "--json"):
        assert opt in r.stdout


def test_list_cases():
    r = subprocess.run([sys.executable, str(SCRIPT), "--list", "--cases", "1,3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "-detpixels 1024" in r.stdout and "-mosaic_dom 5" in r.stdout
    assert "2463" not in r.stdout


def test_case_list_parses(tmp_path):
    bench = load()
    assert sorted(bench.CASES) == [1, 2, 3, 4]
    assert bench.parse_cases("1,3") == [1, 3]
    assert bench.parse_cases("2-4") == [2, 3, 4]
    with pytest.raises(ValueError):
        bench.parse_cases("5")
    for case in bench.CASES:
        argv = bench.case_argv(case, str(tmp_path / "P1.hkl"))
        assert argv and all(isinstance(a, str) and a for a in argv)
        assert "{hkl}" not in argv
        assert "-floatfile" not in argv  # the script adds its own
        for flag in ("-cell",):
            i = argv.index(flag)
            assert [float(x) for x in argv[i + 1:i + 7]]
    pilatus = bench.case_argv(4, "t.hkl")
    assert pilatus[pilatus.index("-detpixels_x") + 1] == "2463"
    assert pilatus[pilatus.index("-detpixels_y") + 1] == "2527"
    assert pilatus[pilatus.index("-hkl") + 1] == "t.hkl"


def test_hkl_table(tmp_path):
    bench = load()
    path = tmp_path / "P1.hkl"
    bench.write_hkl(path, hmax=2)
    rows = [line.split() for line in path.read_text().splitlines()]
    assert len(rows) == 5 ** 3
    assert all(len(r) == 4 and float(r[3]) > 0 for r in rows)


# ----------------------------------------------------------------------------- scripts/bench_refine.py

REFINE_SCRIPT = SCRIPT.parent / "bench_refine.py"


def test_refine_bench_help_and_bad_option():
    r = subprocess.run([sys.executable, str(REFINE_SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for opt in ("--stills", "--detpixels", "--device", "--json", "--max-iter"):
        assert opt in r.stdout
    r = subprocess.run([sys.executable, str(REFINE_SCRIPT), "--stills", "0"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--stills must be at least 1" in r.stderr


def test_refine_bench_tiny_run(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REFINE_SCRIPT), "--stills", "1", "--detpixels", "48", "--max-iter", "2",
                        "--threads", "1", "--repeat", "1", "--json", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for columns in (["still", "s", "fit renders", "hessian renders", "misorientation deg", "success"],
                    ["stills", "device", "s/still", "fit renders/still", "hessian renders/still", "fwd+bwd ROI s",
                     "fwd full s", "fwd+bwd full s", "fwd+bwd/fwd", "success", "shots/s"]):
        header = next(line for line in lines if line.startswith(columns[0] + "  "))
        assert [c for c in columns if c not in header] == []
    summary = lines[lines.index(next(line for line in lines if line.startswith("stills  "))) + 2].split()
    assert summary[:2] == ["1", "cpu"] and summary[-2] in ("0/1", "1/1") and float(summary[-1]) > 0
    doc = json.loads(out.read_text())
    assert doc["summary"]["stills"] == 1 and doc["stills"][0]["renders"] > 0
    assert doc["stills"][0]["render_roi_s"]["min"] > 0 and doc["stills"][0]["render_full_s"]["min"] > 0
    assert doc["stills"][0]["forward_full_s"]["min"] > 0 and doc["summary"]["backward_ratio"] > 0
    assert "-detpixels" in doc["case"] and doc["case"][doc["case"].index("-detpixels") + 1] == "48"


# ----------------------------------------------------------------------------- scripts/bench_device.py

DEVICE_SCRIPT = SCRIPT.parent / "bench_device.py"


def test_device_bench_bad_options():
    for args, message in ((["--rows", "nope"], "--rows"), (["--dtypes", "float16"], "--dtypes"),
                          (["--images", "0"], "at least 1"), (["--device", "tpu"], "use cpu or cuda")):
        r = subprocess.run([sys.executable, str(DEVICE_SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_device_bench_tiny_run(tmp_path):
    out = tmp_path / "device.json"
    r = subprocess.run([sys.executable, str(DEVICE_SCRIPT), "--device", "cpu", "--images", "1", "--repeat", "1",
                        "--dtypes", "float32", "--rows", "series,fwd,fwd+bwd", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "fwd+bwd / fwd:" in r.stdout and "series" in r.stdout
    doc = json.loads(out.read_text())
    s = doc["seconds"]["float32"]
    assert set(s) == {"series", "fwd", "fwd+bwd"} and all(v > 0 for v in s.values())


def test_refine_bench_levels_refuses_unknown_level():
    r = subprocess.run([sys.executable, str(REFINE_SCRIPT), "--levels", "medium,blinding"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "unknown blinding" in r.stderr
