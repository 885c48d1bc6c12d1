"""The examples run as documented and do what they say."""

import os
import re
import subprocess
import sys
from golden import ROOT

ROOT = str(ROOT)


def test_refine_distance_recovers_the_true_distance():
    proc = subprocess.run([sys.executable, os.path.join("examples", "refine_distance.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    values = dict(re.findall(r"^(start|final|true) distance:\s+([-\d.]+) mm", proc.stdout, re.M))
    assert set(values) == {"start", "final", "true"}, proc.stdout
    start, final, true = (float(values[k]) for k in ("start", "final", "true"))
    assert abs(start - true) > 1.0
    assert abs(final - true) < 1e-4, proc.stdout
