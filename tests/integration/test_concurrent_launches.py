"""``--jobs N``: one world size's cases dealt over N concurrent launches, each its own process group
with its own logs and progress files, every result where it belongs."""

from __future__ import annotations

import pytest

from harness.execution import rank_launcher
from harness.execution.run_dir import ProgressEvent, RunDir
from harness.matrix.cases import load_cases
from harness.results import PASS
from harness.run_spec import RunSpec

pytestmark = pytest.mark.cpu

CASES = "matrix:\n  - families: [llama, qwen2]\n    layouts: [tp1]\n    paths: [memory/roundtrip]\n"


def test_cases_are_dealt_round_robin_and_no_launch_is_empty():
    assert rank_launcher.split_round_robin(list("abcde"), 2) == [list("ace"), list("bd")]
    assert rank_launcher.split_round_robin(list("ab"), 4) == [["a"], ["b"]]
    assert rank_launcher.split_round_robin(list("ab"), 1) == [list("ab")]


def test_two_launches_run_at_once_and_each_case_passes_in_its_own_group(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "c.yaml").write_text(CASES)
    selected = load_cases(folder).cases
    assert len(selected) == 2 and all(c.world_size == 1 for c in selected)
    run = RunDir(tmp_path / "run")
    seen = []
    results = rank_launcher.run_cases(RunSpec(cases=selected, cases_dir=folder, jobs=2), run, on_result=seen.append)
    assert [r.status for r in results] == [PASS, PASS], [r.headline for r in results]
    assert sorted(r.case_id for r in seen) == sorted(c.id for c in selected), "each result reported once"
    spans = {}
    for group in ("ws1j0-1", "ws1j1-1"):
        events = list(run.progress(group, 1))
        assert [e.event for e in events] == [ProgressEvent.START, ProgressEvent.END], group
        # From the worker's start (it records its process group first thing) to its case's end:
        # the import dominates and its length varies on a busy machine, while a case takes ~0.5 s,
        # so the cases alone need not overlap even when the launches do.
        started = run.log_dir(group).joinpath("rank0.pgid").stat().st_mtime
        spans[group] = (started, events[1].t)
        assert run.rank_log(group, 0).exists()
    (a0, a1), (b0, b1) = spans.values()
    assert a0 < b1 and b0 < a1, f"the two launches did not run at the same time: {spans}"


def test_concurrent_launches_share_the_cores_and_a_thread_count_given_is_kept(monkeypatch):
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert rank_launcher.launch_environment(RunSpec(jobs=4), 1)["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in rank_launcher.launch_environment(RunSpec(jobs=1), 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert rank_launcher.launch_environment(RunSpec(jobs=4), 1)["OMP_NUM_THREADS"] == "2"
