"""scripts/gpu/probe_collectives.py, the several-ranks-per-GPU probe, runs here on CPU tensors, so
the GPU session only has to read its table; and a transport that returns wrong data fails it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from harness import workspace

pytestmark = pytest.mark.cpu

PROBE = workspace.REPO_ROOT / "scripts" / "gpu" / "probe_collectives.py"


def load_probe():
    spec = importlib.util.spec_from_file_location("probe_collectives", PROBE)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_collective_megatron_fsdp_needs_is_probed_and_passes_on_two_gloo_ranks(tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(PROBE), "--backend", "gloo", "--device", "cpu", "--json", str(out)],
                       capture_output=True, text=True, timeout=180, cwd=workspace.REPO_ROOT)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    rows = json.loads(out.read_text())
    ops = {row["op"] for row in rows}
    assert {"init", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single_uneven",
            "async_all_gather_on_a_side_stream", "all_gather_object"} <= ops
    assert all(row["ok"] for row in rows), rows
    assert {row["dtype"] for row in rows} == {"", "float32", "bfloat16"}


class DroppingTransport:
    """torch.distributed, but its reduce-scatter returns without writing the output."""

    def __init__(self, dist):
        self._dist = dist

    def __getattr__(self, name):
        return getattr(self._dist, name)

    def reduce_scatter_tensor(self, out, inp, *args, **kwargs):
        return None


def test_a_collective_that_returns_wrong_data_is_a_failure_not_a_pass(gloo_world):
    import torch
    import torch.distributed as dist

    probe = load_probe()
    good = probe.probes(dist, torch, torch.device("cpu"), 0, 1, torch.float32)
    assert all(call() for call in good.values())
    bad = probe.probes(DroppingTransport(dist), torch, torch.device("cpu"), 0, 1, torch.float32)
    assert bad["reduce_scatter_tensor"]() is False


def test_nccls_reason_is_taken_from_its_last_error_line():
    probe = load_probe()
    exc = RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1727, invalid usage\nncclInvalidUsage: ...\n"
                       "Last error:\nDuplicate GPU detected : rank 1 and rank 0 both on CUDA device 1000")
    assert probe._first_line(exc) == ("NCCL error in: ProcessGroupNCCL.cpp:1727, invalid usage "
                                      "(Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1000)")
