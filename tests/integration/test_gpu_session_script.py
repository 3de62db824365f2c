"""scripts/gpu/session.sh, the prepared GPU session, runs its plumbing here: on a machine without a
GPU its run phases skip every case, the golden phase pins none of them, and $OUT still gets the log
and the artifacts (what a device call brings back)."""

from __future__ import annotations

import os
import subprocess
import sys
import re
import tarfile

import pytest

from harness import workspace

pytestmark = pytest.mark.cpu


def test_the_session_skips_what_this_machine_cannot_run_and_still_returns_its_artifacts(tmp_path):
    out, art, gold = tmp_path / "out", tmp_path / "art", tmp_path / "golden"
    env = dict(os.environ, OUT=str(out), ART=str(art), HARNESS_GOLDEN=str(gold), PY=sys.executable,
               HARNESS_GPUS="0", DEADLINE_S="300")
    r = subprocess.run(["bash", "scripts/gpu/session.sh", "shared", "golden", "nonsense"], capture_output=True,
                       text=True, env=env, cwd=workspace.REPO_ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    log = (out / "session.log").read_text()
    assert "shared-ws2: exit 0" in log and "shared-ws4: exit 0" in log, log
    assert re.search(r"\n0/(\d+) passed, 0 failed exactly as pinned, 0 unexpected \(\1 skipped: not runnable on this "
                     r"machine\)", log), log[-2000:]
    assert "nothing to compare" in log, "every case skipped, none compared"
    assert "unknown phase nonsense" in log
    assert not (gold / "gpu").exists(), "a case this machine did not run must never be pinned"
    with tarfile.open(out / "artifacts.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("shared-ws2/results.json") for n in names), names
    assert not any("/scratch" in n for n in names)


def test_a_phase_past_the_deadline_is_skipped_and_says_so(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), ART=str(tmp_path / "art"), PY=sys.executable, DEADLINE_S="10")
    r = subprocess.run(["bash", "scripts/gpu/session.sh", "ws1"], capture_output=True, text=True, env=env,
                       cwd=workspace.REPO_ROOT, timeout=60)
    assert r.returncode == 0 and "ws1: SKIPPED" in r.stdout
    assert (tmp_path / "out" / "artifacts.tar.gz").exists()
