"""Real fsdp_dtensor checkpoints, written on CPU by Megatron-FSDP and the DistributedOptimizer: the
readers, the optimizer-state rule and `harness diff` on them, and what a damaged one gives (one
line, exit 2, nothing written)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace

from unittest import mock

import pytest
import torch

from harness import workspace
from harness.checks import optimizer_state
from harness.formats.detect import open_checkpoint
from harness.formats.megatron import FsdpDtensorCheckpoint
from harness.matrix import checkpoint_builder, model_spec
from harness.matrix.layouts import Layout

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def training_ckpt(gloo_world, tmp_path_factory):
    """llama@bf16 through Megatron-FSDP at world size 1: a training checkpoint (model + optimizer)."""
    from harness.conversion import bridge_calls, megatron_fsdp
    from harness.runtimes.cpu import CpuRuntime

    spec = model_spec.ModelSpec.parse("llama@bf16")
    root = tmp_path_factory.mktemp("fsdp")
    with mock.patch.dict(os.environ), CpuRuntime() as runtime:  # Megatron sets NVTE_* (conftest)
        hf_dir = checkpoint_builder.materialize(spec)
        model = megatron_fsdp.build_fsdp_model(bridge_calls.open_bridge(hf_dir), spec, Layout(), runtime)
        bridge_calls.load_hf(model, hf_dir)
        optimizer = megatron_fsdp.build_optimizer(model)
        optimizer_state.set_known_states(optimizer)
        megatron_fsdp.save_training_checkpoint(model, optimizer, root)
    return root / "iter_0000000"


def harness_diff(a, b):
    return subprocess.run([sys.executable, "-m", "harness", "diff", str(a), str(b)], capture_output=True, text=True,
                          cwd=workspace.REPO_ROOT)


def test_a_real_training_checkpoint_reads_in_canonical_space_and_keeps_the_optimizer_rule(training_ckpt):
    ckpt = open_checkpoint(training_ckpt)
    assert isinstance(ckpt, FsdpDtensorCheckpoint)
    specs = ckpt.specs()
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    assert specs[fc1].shape == (192, 64) and specs[f"optimizer.state.exp_avg.{fc1}"].shape == (192, 64)  # _w + _v
    assert optimizer_state.check_on_disk(ckpt, ckpt.optimized_params()).passed
    r = harness_diff(training_ckpt, training_ckpt)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_real_training_checkpoint_names_only_allowed_globals(training_ckpt):
    """Megatron-FSDP's metadata (model, optimizer state, param groups as byte entries) passes the
    restricted unpickler and reads as plain pickle reads it."""
    import io

    from harness.formats import dcp

    named = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    plain = Recorder(io.BytesIO((training_ckpt / ".metadata").read_bytes())).load()
    assert named <= set(dcp.allowed_globals()), named - set(dcp.allowed_globals())
    checked = dcp.read_metadata(training_ckpt)
    assert checked.state_dict_metadata == plain.state_dict_metadata and checked.storage_data == plain.storage_data
    assert any(k.startswith("optimizer.state.") for k in checked.state_dict_metadata)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _resaved(tmp, src, edit):
    """The checkpoint's tensors read back whole (no process group), edited, saved as a new DCP."""
    import torch.distributed.checkpoint as dcp

    from harness.formats import dcp as harness_dcp

    specs = harness_dcp.tensor_specs(harness_dcp.read_metadata(src))
    state = dict(harness_dcp.load(src, list(specs), specs))
    edit(state)
    out = tmp / "resaved" / "iter_0000000"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(out)), no_dist=True)
    return out


def _edited_metadata(tmp, src, edit, name):
    """A copy whose .metadata has one tensor's chunk list edited (what a corrupt save leaves)."""
    out = _copy(src, tmp / name / "iter_0000000")
    metadata = pickle.loads((out / ".metadata").read_bytes())
    fqn = "model.module.decoder.layers.1.self_attention.linear_proj.weight"
    meta = metadata.state_dict_metadata[fqn]
    metadata.state_dict_metadata[fqn] = replace(meta, chunks=edit(meta.chunks))
    (out / ".metadata").write_bytes(pickle.dumps(metadata))
    return out


def _gap(chunks):
    (chunk,) = chunks
    return [replace(chunk, sizes=torch.Size([chunk.sizes[0] - 1, *chunk.sizes[1:]]))]


def _no_optimizer_match(state):
    key = next(k for k in state if k.startswith("optimizer.state.") and k.endswith("linear_proj.weight.exp_avg"))
    state[key] = state[key][:-1].clone()


@pytest.mark.parametrize("make,words", [
    (lambda tmp, src: (lambda p: (next(p.glob("*.distcp")).write_bytes(next(p.glob("*.distcp")).read_bytes()[:500]), p)[1])(
        _copy(src, tmp / "t" / "iter_0000000")), "truncated"),
    (lambda tmp, src: (lambda p: ((p / ".metadata").unlink(), p)[1])(_copy(src, tmp / "m" / "iter_0000000")),
     "the async save is probably incomplete"),
    (lambda tmp, src: _resaved(tmp, src, _no_optimizer_match), "the optimizer state does not match the model"),
    (lambda tmp, src: _edited_metadata(tmp, src, lambda c: list(c) + list(c), "twice"), "overlap (a shard written twice)"),
    (lambda tmp, src: _edited_metadata(tmp, src, _gap, "gap"), "(a shard dropped)"),
], ids=["truncated-distcp", "no-metadata", "optimizer-not-the-model's", "chunk-twice", "chunk-dropped"])
def test_a_damaged_fsdp_dtensor_checkpoint_is_one_line_exit_2(training_ckpt, tmp_path, make, words):
    bad = make(tmp_path, training_ckpt)
    before = {p: p.read_bytes() for p in bad.rglob("*") if p.is_file()}
    r = harness_diff(bad, training_ckpt)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in bad.rglob("*") if p.is_file()} == before, "an input was written to"


def test_a_rank_that_dies_mid_save_leaves_no_checkpoint_taken_as_complete(tmp_path):
    """Two ranks; the last one dies while DCP writes. The folder left behind has shards but no
    .metadata: the harness's readers, and the bridge's loader, refuse it."""
    from harness.formats import dcp

    case = "llama@bf16/tp1-dp2/fsdp_dtensor/roundtrip"
    r = subprocess.run([sys.executable, "-m", "harness", "run", case, "--inject", f"rank-dies-mid-save@{case}"],
                       capture_output=True, text=True, cwd=workspace.REPO_ROOT, timeout=600,
                       env={**__import__("os").environ, "HARNESS_REPORTS": str(tmp_path)})
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    (run,) = [p for p in tmp_path.iterdir() if not p.is_symlink()]
    (saved,) = run.glob("scratch/*/fsdp_dtensor")
    assert dcp.newest_complete_iter(saved) is None
    assert not (saved / "latest_checkpointed_iteration.txt").exists(), "the bridge would resume from it"
    left = harness_diff(saved / "iter_0000000", saved / "iter_0000000")
    assert left.returncode == 2 and "incomplete" in left.stderr
