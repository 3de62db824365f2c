"""End to end: ``harness mutants`` mutates a copy of the installed Megatron-Bridge (never the
installed files), runs the mutant on the memory round trip that covers it, and reports it killed
by the check that saw it: gate and up concatenated in the wrong order at TP1 are caught by the
bitwise tensor comparison, naming gate_proj."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu
GATE_UP_SWAP = "models/conversion/param_mapping.py:swap-concat:7e857df52c"  # GatedMLPMapping.hf_to_megatron


def test_a_mutant_is_run_on_a_copy_and_killed_by_the_check_that_sees_it(tmp_path):
    from harness.regression import mutants

    installed = mutants.bridge_package(None) / "models" / "conversion" / "param_mapping.py"
    digest = hashlib.sha256(installed.read_bytes()).hexdigest()
    listed = subprocess.run([sys.executable, "-m", "harness", "mutants", "--list", "--file",
                             "models/conversion/param_mapping.py", "--per-file", "5000", "-k", "llama/tp1/memory"],
                            capture_output=True, text=True, timeout=300)
    assert GATE_UP_SWAP in listed.stdout, "param_mapping.py changed upstream: pick the gate/up concat mutant again"
    env = dict(os.environ, HARNESS_REPORTS=str(tmp_path / "reports"))
    r = subprocess.run([sys.executable, "-m", "harness", "mutants", "--file", "models/conversion/param_mapping.py",
                        "-k", "llama/tp1/memory/roundtrip", "--id", GATE_UP_SWAP],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| `models/conversion/param_mapping.py` | 1 | 1 (100%) | 1 | 1 | 0 | 0 | 0 | 100% |" in r.stdout
    (run,) = [p for p in (tmp_path / "reports").iterdir() if p.name.endswith("-mutants")]
    (result,) = json.loads((run / "mutants.json").read_text())["results"]
    assert result["status"] == "killed" and "gate_proj" in result["killed_by"][0]
    assert result["cases"] == ["llama/tp1/memory/roundtrip"]  # the case that executes GatedMLPMapping.hf_to_megatron
    (baseline,) = list((run / "coverage").glob("*.json"))  # what the unmutated copy's case ran
    (ran,) = json.loads(baseline.read_text())
    assert "models/conversion/param_mapping.py" in ran["lines"] and "decoder.layers.0.mlp.linear_fc1.weight" in ran["resolved"]
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == digest  # the installed Bridge is untouched
