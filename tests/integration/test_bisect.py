"""End to end: bisect names the commit that seeds a real conversion regression.

The "Megatron-LM" repo is built at test time from the installed megatron-core package (never
committed): commit 1 is the installed code (good), then harmless commits, a commit that breaks
the import (must be skipped, exit 125), its fix, the regression, and more harmless commits.
The regression reverses the order in which torch_dist loading re-joins SwiGLU's W and V halves
(megatron/core/transformer/mlp.py), so a torch_dist round trip comes back with gate and up
swapped. The user's repo (its HEAD, branch, status) must be exactly as before.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu
CASE = "llama/tp1/torch_dist/roundtrip"


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def commit(repo, message):
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def fake_megatron_lm(tmp_path_factory):
    import megatron.core

    installed = Path(megatron.core.__file__).parent.parent  # .../site-packages/megatron
    repo = tmp_path_factory.mktemp("megatron-lm")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("core", "training"):
        shutil.copytree(installed / part, repo / "megatron" / part, ignore=ignore)
    git(repo, "init", "-q", "-b", "main")
    shas = {"good": commit(repo, "installed megatron-core")}
    (repo / "README.md").write_text("harmless 1\n")
    commit(repo, "docs: harmless")
    mlp = repo / "megatron" / "core" / "transformer" / "mlp.py"
    original = mlp.read_text()
    mlp.write_text(original + "\ndef broken(:\n")
    shas["unimportable"] = commit(repo, "wip: does not import")
    mlp.write_text(original)
    commit(repo, "fix the import")
    seeded = original.replace("        cat_with_oom_fallback,\n", "        lambda parts: cat_with_oom_fallback(parts[::-1]),\n")
    assert seeded != original, "mlp.py changed upstream: update the seeded regression"
    mlp.write_text(seeded)
    shas["regression"] = commit(repo, "refactor: tidy swiglu sharded factory")
    (repo / "README.md").write_text("harmless 2\n")
    commit(repo, "docs: harmless again")
    (repo / "NOTES").write_text("x\n")
    shas["bad"] = commit(repo, "chore: notes")
    return repo, shas


def test_bisect_names_the_seeded_commit_and_leaves_the_repo_alone(fake_megatron_lm, tmp_path):
    import os

    repo, shas = fake_megatron_lm
    (repo / "uncommitted.txt").write_text("user's work in progress\n")  # must survive untouched
    before = (git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain"), git(repo, "branch", "--show-current"))
    env = dict(os.environ, HARNESS_REPORTS=str(tmp_path / "reports"))
    r = subprocess.run(
        [sys.executable, "-m", "harness", "bisect", "--megatron-lm", str(repo), "--good", shas["good"],
         "--bad", shas["bad"], "--case", CASE],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"({shas['regression']})" in r.stdout
    assert "failing check:    tensors:" in r.stdout and "gate_proj" in r.stdout
    after = (git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain"), git(repo, "branch", "--show-current"))
    assert after == before
    assert git(repo, "worktree", "list").count("\n") == 0, "the bisect worktree was left behind"
    steps = (next((tmp_path / "reports").glob("*-bisect-llama_*")) / "steps.jsonl").read_text()
    assert '"exit": 125' in steps or shas["unimportable"] not in steps  # skipped if bisect visited it


def test_a_commit_that_does_not_import_is_a_skip(fake_megatron_lm, tmp_path):
    import os

    from harness.execution.source_trees import worktree

    repo, shas = fake_megatron_lm
    env = dict(os.environ, HARNESS_REPORTS=str(tmp_path / "reports"))
    with worktree(repo, shas["unimportable"]) as tree:
        r = subprocess.run(
            [sys.executable, "-m", "harness", "bisect-step", "--megatron-lm", str(tree), "--case", CASE,
             "--log", str(tmp_path / "steps.jsonl")],
            capture_output=True, text=True, env=env, timeout=600,
        )
    assert r.returncode == 125, r.stdout[-2000:] + r.stderr[-2000:]
    assert '"exit": 125' in (tmp_path / "steps.jsonl").read_text()


def test_bisect_step_exit_codes():
    from harness.regression.bisect import EXIT_BAD, EXIT_GOOD, EXIT_SKIP, step_exit_code
    from harness.results import IMPORT_ERROR, NO_CASE_STARTED

    assert step_exit_code("pass", "") == EXIT_GOOD
    assert step_exit_code("fail", "") == EXIT_BAD
    assert step_exit_code("error", IMPORT_ERROR) == EXIT_SKIP  # the case raised SyntaxError / ImportError
    assert step_exit_code("error", NO_CASE_STARTED) == EXIT_SKIP  # the ranks died before any case
    assert step_exit_code("error", "") == EXIT_BAD  # e.g. RuntimeError: boom in the middle of a case


def test_gate_against_a_candidate_tree(fake_megatron_lm, tmp_path):
    """gate: the good tree passes (exit 0, verdict PASS, SHA recorded); the tree with the seeded
    regression is REGRESSED against golden/ and the baseline run (exit 1, summary.md says so)."""
    import json
    import os

    from harness.execution.source_trees import worktree

    repo, shas = fake_megatron_lm
    env = dict(os.environ, HARNESS_REPORTS=str(tmp_path / "reports"))

    def gate(tree, *extra):
        return subprocess.run([sys.executable, "-m", "harness", "gate", "--megatron-lm", str(tree), "-k", CASE, *extra],
                              capture_output=True, text=True, env=env, timeout=600)

    with worktree(repo, shas["good"]) as good:
        ok = gate(good, "--label", "good")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    assert "PASS" in ok.stdout and "REGRESSED" not in ok.stdout.split("\n\n")[0]
    good_run = next(p for p in (tmp_path / "reports").iterdir() if p.name.endswith("-good"))
    trees = json.loads((good_run / "results.json").read_text())["meta"]["source_trees"]
    assert trees[0]["sha"] == shas["good"] and trees[0]["kind"] == "megatron-lm"
    provenance = json.loads(next((good_run / "provenance").iterdir()).read_text())
    assert provenance["megatron.core"].startswith(str(tmp_path.parent)) or "harness-worktree" in provenance["megatron.core"]

    with worktree(repo, shas["regression"]) as bad:
        r = gate(bad, "--baseline", good_run.name, "--label", "bad")
    assert r.returncode == 1, r.stdout[-3000:]
    assert "REGRESSED" in r.stdout and CASE in r.stdout
    bad_run = next(p for p in (tmp_path / "reports").iterdir() if p.name.endswith("-bad"))
    summary = (bad_run / "summary.md").read_text()
    assert summary.startswith("### Gate: **REGRESSED**: 1 of 1 cases regressed, from 1 root cause")
    assert "| REGRESSED | 1 | `llama/tp1/torch_dist/roundtrip` |" in summary  # the row names its root cause


# ------------------------------------------------------------------ the gate finds the commits


def harness_cli(*args: str, reports: Path, timeout: int = 1500) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, HARNESS_REPORTS=str(reports))
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def cause_rows(summary: str) -> list[str]:
    import re

    return [line for line in summary.splitlines() if re.match(r"\| \d+ \| \*\*", line)]


def only_run(reports: Path, label: str) -> Path:
    (run,) = [p for p in reports.iterdir() if p.name.endswith(f"-{label}")]
    return run


def test_gate_with_a_git_baseline_names_the_first_bad_commit_of_its_root_cause(fake_megatron_lm, tmp_path):
    """One command: the candidate (HEAD, six commits after the baseline) regresses; the gate groups
    the regression into one root cause and bisects it to the seeded commit, skipping the commit
    that does not import if it lands on it."""
    repo, shas = fake_megatron_lm
    reports = tmp_path / "reports"
    r = harness_cli("gate", "--megatron-lm", str(repo), "-k", CASE, "--baseline", shas["good"], "--label", "bump",
                    reports=reports)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    regression = shas["regression"][:12]
    summary = (only_run(reports, "bump") / "summary.md").read_text()
    assert summary.startswith("### Gate: **REGRESSED**: 1 of 1 cases regressed, from 1 root cause")
    (row,) = cause_rows(summary)
    assert f"| {regression} refactor: tidy swiglu sharded factory (files: megatron/core/transformer/mlp.py) [" in row
    assert regression in r.stdout and "bisect step" in r.stderr  # the table says it; progress went to stderr
    if shas["unimportable"] in r.stderr or shas["unimportable"][:12] in r.stderr:
        assert f"`{shas['unimportable'][:12]}`" in summary  # listed as skipped


def test_a_candidate_that_does_not_import_is_one_verdict_with_the_commit_that_broke_it(fake_megatron_lm, tmp_path):
    from harness.execution.source_trees import worktree

    repo, shas = fake_megatron_lm
    reports = tmp_path / "reports"
    with worktree(repo, shas["unimportable"]) as candidate:
        r = harness_cli("gate", "--megatron-lm", str(candidate), "-k", "llama/tp1", "--baseline", shas["good"],
                        "--label", "broken", reports=reports)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    first = r.stdout.splitlines()[0]
    assert first.startswith("Gate: INCOMPATIBLE: the candidate cannot start: `SyntaxError:"), first
    assert f"first bad commit: {shas['unimportable'][:12]} wip: does not import" in first
    run = only_run(reports, "broken")
    assert (run / "summary.md").read_text().startswith("### Gate: **INCOMPATIBLE**")
    assert json.loads((run / "results.json").read_text())["cases"] == []  # no wall of per-case errors


@pytest.fixture(scope="module")
def fake_bridge_checkout(fake_megatron_lm, tmp_path_factory):
    """A Megatron-Bridge checkout built from the installed package, vendoring the fake Megatron-LM
    as its 3rdparty/Megatron-LM submodule: the baseline; a submodule bump (harmless); the seeded
    mapping bug (GatedMLPMapping concatenates up before gate at TP1); a harmless commit."""
    import megatron.bridge

    mlm, mlm_shas = fake_megatron_lm
    repo = tmp_path_factory.mktemp("megatron-bridge")
    shutil.copytree(Path(megatron.bridge.__file__).parent, repo / "src" / "megatron" / "bridge",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(mlm), "3rdparty/Megatron-LM")
    sub = repo / "3rdparty" / "Megatron-LM"
    git(sub, "checkout", "-q", mlm_shas["good"])
    shas = {"good": commit(repo, "bridge, pinning Megatron-LM at the installed megatron-core")}
    git(sub, "checkout", "-q", git(mlm, "rev-list", "--reverse", f"{mlm_shas['good']}..main").split()[0])
    shas["bump"] = commit(repo, "bump 3rdparty/Megatron-LM (docs only)")
    mapping = repo / "src" / "megatron" / "bridge" / "models" / "conversion" / "param_mapping.py"
    original = mapping.read_text()
    good = 'return torch.cat([hf_weights["gate"], hf_weights["up"]], dim=0)'
    assert original.count(good) == 1, "param_mapping.py changed upstream: update the seeded mapping bug"
    mapping.write_text(original.replace(good, 'return torch.cat([hf_weights["up"], hf_weights["gate"]], dim=0)'))
    shas["regression"] = commit(repo, "refactor: gated MLP mapping")
    (repo / "README.md").write_text("harmless\n")
    shas["head"] = commit(repo, "docs: readme")
    return repo, shas


def test_a_bridge_checkout_walks_the_bridge_history_with_its_submodule_and_records_both_shas(fake_bridge_checkout,
                                                                                            tmp_path):
    repo, shas = fake_bridge_checkout
    reports = tmp_path / "reports"
    r = harness_cli("gate", "--bridge-checkout", str(repo), "-k", CASE, "--baseline", shas["good"], "--label", "both",
                    reports=reports)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    run = only_run(reports, "both")
    (row,) = cause_rows((run / "summary.md").read_text())
    assert f"| {shas['regression'][:12]} refactor: gated MLP mapping (files: " in row and "param_mapping.py" in row
    trees = {t["kind"]: t for t in json.loads((run / "results.json").read_text())["meta"]["source_trees"]}
    sub_sha = git(repo / "3rdparty" / "Megatron-LM", "rev-parse", "HEAD")
    assert trees["megatron-bridge"]["sha"] == shas["head"]
    assert trees["megatron-lm"]["sha"] == sub_sha == trees["megatron-lm"]["pinned_by_bridge"]
    provenance = json.loads(next((run / "provenance").iterdir()).read_text())
    assert provenance["imported_from_trees"]["megatron.bridge"].startswith(str(repo / "src"))
    assert provenance["imported_from_trees"]["megatron.core"].startswith(str(repo / "3rdparty" / "Megatron-LM"))


def test_bridge_checkout_without_its_submodule_is_a_one_line_error(tmp_path):
    import megatron.bridge

    (tmp_path / "src" / "megatron").mkdir(parents=True)
    (tmp_path / "src" / "megatron" / "bridge").symlink_to(Path(megatron.bridge.__file__).parent)
    r = harness_cli("gate", "--bridge-checkout", str(tmp_path), reports=tmp_path / "reports", timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "3rdparty/Megatron-LM is empty" in r.stderr and not (tmp_path / "reports").exists()


def test_sigterm_cleans_up_the_worktree_as_ctrl_c_does(fake_megatron_lm, tmp_path):
    """A cancelled CI job sends SIGTERM: the bisection's worktree must still be removed."""
    import os
    import signal
    import time

    repo, shas = fake_megatron_lm
    env = dict(os.environ, HARNESS_REPORTS=str(tmp_path / "reports"))
    proc = subprocess.Popen([sys.executable, "-m", "harness", "bisect", "--megatron-lm", str(repo), "--good", shas["good"],
                             "--bad", shas["bad"], "--case", CASE], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while git(repo, "worktree", "list").count("\n") == 0 and time.monotonic() < deadline:
        time.sleep(0.5)  # until the bisection's worktree exists
    assert git(repo, "worktree", "list").count("\n") == 1, "the bisection never started"
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole session, as a CI runner cancels a job
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    git(repo, "worktree", "prune")
    assert git(repo, "worktree", "list").count("\n") == 0, "SIGTERM left the bisection's worktree behind"
