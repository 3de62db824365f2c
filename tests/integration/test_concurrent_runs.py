"""Two harness runs on one machine do not interfere: ports, the zoo cache, run folders, latest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import workspace

pytestmark = pytest.mark.cpu

# One single-rank and one two-rank case each: the two-rank launch used to race for a port.
CASES = """
matrix:
  - families: [llama]
    layouts: [tp1, tp2]
    paths: [memory/roundtrip]
"""


def test_two_matrices_at_once_both_pass_in_their_own_folders(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "c.yaml").write_text(CASES)
    reports, cache = tmp_path / "reports", tmp_path / "cache"  # shared by both runs; the zoo starts empty
    env = dict(os.environ, HARNESS_REPORTS=str(reports), HARNESS_CACHE=str(cache))
    procs = [
        subprocess.Popen([sys.executable, "-m", "harness", "--cases-dir", str(cases), "matrix", "--label", label],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workspace.REPO_ROOT)
        for label in ("first", "second")
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
    runs = sorted(p for p in reports.iterdir() if p.is_dir() and not p.is_symlink())
    # Each run has its own folder. Their timestamps say which started first, and that is up to the OS.
    assert sorted(r.name.split("-", 1)[1] for r in runs) == ["first", "second"]
    for run in runs:
        doc = json.loads((run / "results.json").read_text())
        assert doc["counts"] == {"pass": 2}, doc["counts"]
    assert (reports / "latest").resolve() in [r.resolve() for r in runs]
    built = [p.name for p in (cache / "zoo").iterdir()]
    assert len(built) == 1 and built[0].startswith("llama-"), built  # one model, built once, no temp left
