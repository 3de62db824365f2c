"""CI workflow files parse, and every command they run exists (files, harness subcommands, flags)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from harness import workspace
from harness.cli import build_parser

pytestmark = pytest.mark.cpu
WORKFLOWS = sorted((workspace.REPO_ROOT / ".github" / "workflows").glob("*.yml"))
EXPECTED = {"pr-cpu.yml", "nightly-gpu.yml", "gate.yml"}


def run_lines(doc):
    for job in doc["jobs"].values():
        for step in job["steps"]:
            for line in str(step.get("run", "")).splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line


def commands(line: str):
    """Split a shell line on && / ; / | and drop `VAR=value` prefixes and ${{ }} expressions."""
    line = re.sub(r"\$\{\{[^}]*\}\}", "X", line)
    for part in re.split(r"&&|;|\|\|?", line):
        tokens = shlex.split(part, posix=True) if part.strip() else []
        while tokens and re.match(r"^[A-Za-z_]+=", tokens[0]):
            tokens = tokens[1:]
        if tokens:
            yield tokens


def test_the_three_workflows_exist():
    assert {w.name for w in WORKFLOWS} >= EXPECTED


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_parses_and_references_real_commands(workflow):
    doc = yaml.safe_load(workflow.read_text())
    assert doc.get("jobs"), "no jobs"
    assert True in doc or "on" in doc, "no trigger"  # YAML 1.1 reads `on:` as True
    parser = build_parser()
    harness_calls = 0
    for line in run_lines(doc):
        for tokens in commands(line):
            exe = tokens[0]
            if exe.startswith(("scripts/", ".ci/")):
                assert (workspace.REPO_ROOT / exe).exists(), f"{workflow.name}: {exe} does not exist"
            if exe.endswith("bin/harness"):
                harness_calls += 1
                parser.parse_args(tokens[1:])  # SystemExit (unknown subcommand or flag) fails the test
            if exe.endswith("bin/python") and tokens[1:3] == ["-m", "pytest"]:
                from _pytest.config import get_config  # noqa: F401 - pytest itself is importable
    if workflow.name != "gate.yml":
        assert harness_calls or ".ci/run" in workflow.read_text()


def test_pr_lane_runs_ci_script_and_caches_the_te_wheel():
    doc = yaml.safe_load((workspace.REPO_ROOT / ".github/workflows/pr-cpu.yml").read_text())
    steps = doc["jobs"]["cpu"]["steps"]
    assert any(s.get("run") == ".ci/run" for s in steps)
    cache = next(s for s in steps if str(s.get("uses", "")).startswith("actions/cache"))
    assert cache["with"]["path"] == "~/.cache/harness/wheels"


def test_gpu_lane_selects_gpu_marker():
    text = (workspace.REPO_ROOT / ".github/workflows/nightly-gpu.yml").read_text()
    assert "pytest -m gpu" in text and "self-hosted" in text


def test_gate_posts_summary_md_as_one_sticky_pr_comment():
    """The gate's verdict reaches the PR: summary.md (or a line saying there is none) is the body of
    one comment, updated on every run, posted even when the gate step failed (it exits 1 on a
    regression)."""
    from harness.reporting import run_report

    steps = yaml.safe_load((workspace.REPO_ROOT / ".github/workflows/gate.yml").read_text())["jobs"]["gate"]["steps"]
    body = next(s for s in steps if s.get("name") == "PR comment body")
    post = next(s for s in steps if str(s.get("uses", "")).startswith("marocchino/sticky-pull-request-comment@"))
    assert "cp reports/latest/summary.md gate-comment.md" in body["run"]
    assert post["with"] == {"header": "harness-gate", "path": "gate-comment.md"}
    for step in (body, post):
        assert step["if"] == "always() && github.event_name == 'pull_request'"
    assert steps.index(body) < steps.index(post)
    appended = [line for line in body["run"].splitlines() if ">> gate-comment.md" in line]
    assert sum(len(line) for line in appended) < run_report.COMMENT_RESERVE  # room the summary leaves
