"""`torchbragg gradcheck` on one fast check: the bundle is complete, its
checksums verify, an existing bundle is never overwritten, and the audit runs
from an installed package (no source checkout, no tests/ folder)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from torchbragg.commands import gradcheck as gradaudit

CHECKS = "torchbragg/checks/gradients.py"
ONE = f"{CHECKS}::test_gradcheck[detector.panels.0.frame.distance]"
FILES = ("report.md", "gradcheck.log", "collect_only.log", "commands.txt", "env.json", "sha256.txt")
PACKAGE = Path(gradaudit.__file__).resolve().parent.parent


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _verify_checksums(out):
    listed = {}
    for line in (out / "sha256.txt").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    assert set(listed) == {p.name for p in out.iterdir()} - {"sha256.txt"}
    for name, digest in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name


def test_bundle_is_complete_and_never_overwritten(tmp_path):
    out = tmp_path / "bundle"
    assert gradaudit.main(["--out", str(out), "--tests", ONE]) == 0
    for name in FILES:
        assert (out / name).is_file(), name
    _verify_checksums(out)

    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if f"`{ONE}`" in line)
    assert "| passed |" in row and f"{CHECKS}:" in row
    assert "CUDA" in report and "TORCHBRAGG_COMPILE" in report and "Reproduce" in report
    env = json.loads((out / "env.json").read_text())
    assert {"python", "torch", "numpy", "cuda_available", "git_commit", "platform", "compile"} <= set(env)
    assert env["checks_file"] == str(PACKAGE / "checks" / "gradients.py")
    commands = (out / "commands.txt").read_text()
    assert "--collect-only" in commands and "exit=0" in commands and "seconds=" in commands
    assert ONE in (out / "collect_only.log").read_text()

    before = _snapshot(out)
    assert gradaudit.main(["--out", str(out), "--tests", ONE]) != 0
    assert _snapshot(out) == before


def test_failing_check_still_writes_the_bundle(tmp_path):
    out = tmp_path / "bundle"
    assert gradaudit.main(["--out", str(out), "--tests", f"{CHECKS}::test_no_such_check"]) != 0
    for name in FILES:
        assert (out / name).is_file(), name
    assert "FAIL" in (out / "report.md").read_text()


def test_default_bundle_names_get_a_suffix(tmp_path):
    first = gradaudit.claim_bundle_dir(tmp_path, "20260101T000000Z")
    (first / "report.md").write_text("earlier bundle")
    second = gradaudit.claim_bundle_dir(tmp_path, "20260101T000000Z")
    assert first.name == "20260101T000000Z" and second.name == "20260101T000000Z-2"
    assert (first / "report.md").read_text() == "earlier bundle"


def test_audit_runs_from_an_installed_package(tmp_path):
    """The package alone, laid out as an install puts it (site/torchbragg, no
    src/, pyproject.toml or tests/ anywhere), run from an unrelated directory:
    the audit finds its checks inside the package."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "torchbragg", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHBRAGG_", "PYTEST_"))}
    env["PYTHONPATH"] = str(site)
    out = work / "bundle"
    cmd = [sys.executable, "-c", "import sys; from torchbragg.commands.tool import main; sys.exit(main())",
           "gradcheck", "--out", str(out), "--tests", "test_gradcheck[beam.wavelength]"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in FILES:
        assert (out / name).is_file(), name
    _verify_checksums(out)

    env_json = json.loads((out / "env.json").read_text())
    assert env_json["package_dir"] == str(site / "torchbragg")
    assert env_json["checkout"] is None
    report = (out / "report.md").read_text()
    assert "**PASS**" in report and "installed package" in report
    row = next(line for line in report.splitlines() if f"`{CHECKS}::test_gradcheck[beam.wavelength]`" in line)
    assert "| passed |" in row
    commands = (out / "commands.txt").read_text()
    assert str(site / "torchbragg" / "checks" / "gradients.py") in commands
    assert "tests/" not in commands
    assert not any(line.split()[:1] == ["git"] for line in commands.splitlines())  # no checkout, no git
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert records and all(r["passed"] and r["file"] == CHECKS for r in records)


def test_without_pytest_the_audit_asks_for_the_extra(tmp_path, capsys, monkeypatch):
    """pytest is not a runtime dependency: without it `torchbragg gradcheck`
    says which extra to install, exits 2 and writes nothing."""
    from torchbragg.commands.tool import main as tool
    monkeypatch.setitem(sys.modules, "pytest", None)  # `import pytest` now raises ImportError
    out = tmp_path / "bundle"
    assert tool(["gradcheck", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "torchbragg gradcheck needs pytest: pip install 'torchbragg[audit]'\n"
    assert not out.exists()
