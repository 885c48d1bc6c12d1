"""`torchbragg gradcheck` on one fast check: the bundle is complete, its
checksums verify, and an existing bundle is never overwritten."""

import hashlib
import json

from torchbragg import gradaudit

ONE = "tests/test_gradients.py::test_gradcheck[detector.distance]"
FILES = ("report.md", "gradcheck.log", "collect_only.log", "commands.txt", "env.json", "sha256.txt")


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_bundle_is_complete_and_never_overwritten(tmp_path):
    out = tmp_path / "bundle"
    assert gradaudit.main(["--out", str(out), "--tests", ONE]) == 0
    for name in FILES:
        assert (out / name).is_file(), name

    listed = {}
    for line in (out / "sha256.txt").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    assert set(listed) == {p.name for p in out.iterdir()} - {"sha256.txt"}
    for name, digest in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name

    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if f"`{ONE}`" in line)
    assert "| passed |" in row and "tests/test_gradients.py:" in row
    assert "CUDA" in report and "TORCHBRAGG_COMPILE" in report and "Reproduce" in report
    env = json.loads((out / "env.json").read_text())
    assert {"python", "torch", "numpy", "cuda_available", "git_commit", "platform", "compile"} <= set(env)
    commands = (out / "commands.txt").read_text()
    assert "--collect-only" in commands and "exit=0" in commands and "seconds=" in commands
    assert ONE in (out / "collect_only.log").read_text()

    before = _snapshot(out)
    assert gradaudit.main(["--out", str(out), "--tests", ONE]) != 0
    assert _snapshot(out) == before


def test_failing_check_still_writes_the_bundle(tmp_path):
    out = tmp_path / "bundle"
    assert gradaudit.main(["--out", str(out), "--tests", "tests/test_gradients.py::test_no_such_check"]) != 0
    for name in FILES:
        assert (out / name).is_file(), name
    assert "FAIL" in (out / "report.md").read_text()


def test_default_bundle_names_get_a_suffix(tmp_path):
    first = gradaudit.claim_bundle_dir(tmp_path, "20260101T000000Z")
    (first / "report.md").write_text("earlier bundle")
    second = gradaudit.claim_bundle_dir(tmp_path, "20260101T000000Z")
    assert first.name == "20260101T000000Z" and second.name == "20260101T000000Z-2"
    assert (first / "report.md").read_text() == "earlier bundle"
