"""Readers, canonical keys, `harness diff` and the fsdp_dtensor layout audit.

Fixtures: real torch_dist checkpoints written by Megatron-Bridge on CPU, and fsdp_dtensor
checkpoints written from them with the real fsdp_dtensor key conventions (harness/fsdp_writer.py;
CPU cannot run Megatron-FSDP). Committed GPU-made fixtures, when present, are in golden/fixtures.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from unittest import mock

import pytest
import torch

from harness.checks import checkpoint_diff
from harness.checks import fsdp_layout
from harness.formats import fsdp_writer, megatron_keys
from harness.matrix import checkpoint_builder, model_spec
from harness.errors import InputError
from harness.formats.detect import detect, open_checkpoint
from harness.matrix.layouts import Layout

pytestmark = pytest.mark.cpu
MODEL_ONLY = fsdp_writer.Conventions(with_optimizer=False)  # as the model-only torch_dist it is compared with


@pytest.fixture(scope="session")
def torch_dist_ckpts(gloo_world, tmp_path_factory):
    """llama and qwen3-moe saved as torch_dist by the real bridge (TP1, CPU)."""
    from harness.conversion import bridge_calls
    from harness.runtimes.cpu import CpuRuntime

    out = {}
    with mock.patch.dict(os.environ), CpuRuntime() as runtime:  # Megatron sets NVTE_* (conftest)
        for family in ("llama", "qwen3-moe"):
            spec = model_spec.ModelSpec.parse(family)
            model = bridge_calls.build_model(bridge_calls.open_bridge(checkpoint_builder.materialize(spec)), spec, Layout(), runtime)
            bridge_calls.load_hf(model)
            root = tmp_path_factory.mktemp(f"td-{family}")
            bridge_calls.save_torch_dist(model, root)
            out[family] = root / "iter_0000000"
    return out


def canonical_state(ckpt):
    return dict(ckpt.tensors(list(ckpt.specs())))


def write_fsdp(tmp_path, family, td, name="fsdp", **conventions):
    state = canonical_state(open_checkpoint(td))
    return fsdp_writer.write_fsdp_dtensor(tmp_path / name, state, fsdp_writer.Conventions(**conventions),
                                        model_spec.ModelSpec.parse(family).hf_config)


def test_detects_each_format(torch_dist_ckpts, tmp_path):
    td = torch_dist_ckpts["llama"]
    assert detect(td) == "torch_dist"
    assert detect(write_fsdp(tmp_path, "llama", td)) == "fsdp_dtensor"
    assert detect(checkpoint_builder.materialize(model_spec.ModelSpec("llama"))) == "hf"


def test_torch_dist_is_unstacked_into_per_layer_canonical_keys(torch_dist_ckpts):
    ckpt = open_checkpoint(torch_dist_ckpts["qwen3-moe"])
    specs = ckpt.specs()
    assert specs["decoder.layers.1.mlp.experts.3.linear_fc1.weight"].shape == (80, 64)  # [2 x moe F, H]
    assert specs["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (128, 64)
    assert not [k for k in specs if "_extra_state" in k or k.startswith("decoder.layers.mlp")]
    tensors = canonical_state(ckpt)
    assert set(tensors) == set(specs)
    assert all(tuple(t.shape) == specs[k].shape for k, t in tensors.items())


def globals_named(file):
    """Every global a (trusted) pickle names, by plain unpickling it."""
    import io
    import pickle

    named = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    return named, Recorder(io.BytesIO(file.read_bytes())).load()


def test_real_metadata_reads_through_the_restricted_unpickler(torch_dist_ckpts, tmp_path):
    """What the bridge saves as torch_dist (Megatron-Core adds its save plans) and the fsdp_dtensor
    writer saves with optimizer state name only allowed globals, and read as plain pickle reads them."""
    from harness.formats import dcp

    written = [*torch_dist_ckpts.values(), write_fsdp(tmp_path, "qwen3-moe", torch_dist_ckpts["qwen3-moe"])]
    for path in written:
        named, plain = globals_named(path / ".metadata")
        assert named <= set(dcp.allowed_globals()), (path, named - set(dcp.allowed_globals()))
        checked = dcp.read_metadata(path)
        assert checked.state_dict_metadata == plain.state_dict_metadata and checked.storage_data == plain.storage_data
    assert all(hasattr(dcp.read_metadata(p), "all_local_plans") for p in torch_dist_ckpts.values())


@pytest.mark.parametrize("family", ["llama", "qwen3-moe"])
def test_fsdp_dtensor_and_torch_dist_of_one_model_are_equal(torch_dist_ckpts, tmp_path, family):
    td = open_checkpoint(torch_dist_ckpts[family])
    fsdp = open_checkpoint(write_fsdp(tmp_path, family, torch_dist_ckpts[family], with_optimizer=False))
    assert any("linear_fc1.weight" in k and k.endswith("_w") for k in fsdp.model_keys())
    result, _ = checkpoint_diff.diff(td, fsdp)
    assert result.passed, result.summary
    assert result.metrics["compared"] == len(td.specs())


def test_diff_catches_swapped_gate_and_up(torch_dist_ckpts, tmp_path):
    td = torch_dist_ckpts["llama"]
    state = canonical_state(open_checkpoint(td))
    key = "decoder.layers.1.mlp.linear_fc1.weight"
    w, v = torch.chunk(state[key], 2)
    state[key] = torch.cat([v, w])
    broken = open_checkpoint(fsdp_writer.write_fsdp_dtensor(tmp_path / "swapped", state, MODEL_ONLY))
    result, _ = checkpoint_diff.diff(open_checkpoint(td), broken)
    assert not result.passed and [r["key"] for r in result.details] == [key]


def test_diff_catches_a_lost_expert_and_a_nudged_element(torch_dist_ckpts, tmp_path):
    td = torch_dist_ckpts["qwen3-moe"]
    state = canonical_state(open_checkpoint(td))
    del state["decoder.layers.0.mlp.experts.2.linear_fc2.weight"]
    state["decoder.layers.1.self_attention.linear_proj.weight"][3, 4] += 1e-3
    result, _ = checkpoint_diff.diff(open_checkpoint(td), open_checkpoint(fsdp_writer.write_fsdp_dtensor(tmp_path / "b", state,
                                                                                                   MODEL_ONLY)))
    assert not result.passed
    assert result.metrics["missing"] == ["decoder.layers.0.mlp.experts.2.linear_fc2.weight"]  # only in A
    assert result.metrics["max_abs_diff"] == pytest.approx(1e-3, rel=1e-2)


def test_diff_of_hf_checkpoints_is_bitwise_and_names_the_tensor(tmp_path):
    a = checkpoint_builder.build(model_spec.ModelSpec("llama"), tmp_path / "a")
    b = checkpoint_builder.build(model_spec.ModelSpec("llama"), tmp_path / "b")
    result, stats = checkpoint_diff.diff(open_checkpoint(a), open_checkpoint(b))
    assert result.passed and stats.bytes_compared > 0
    from safetensors.torch import load_file, save_file

    sd = load_file(b / "model.safetensors")
    sd["model.norm.weight"][0] = torch.nextafter(sd["model.norm.weight"][0], torch.tensor(9.0))
    save_file(sd, b / "model.safetensors", metadata={"format": "pt"})
    result, _ = checkpoint_diff.diff(open_checkpoint(a), open_checkpoint(b))
    assert not result.passed and result.details[0]["key"] == "model.norm.weight"
    assert 0 < result.metrics["max_abs_diff"] < 1e-6


def test_hf_vs_megatron_is_refused(torch_dist_ckpts):
    with pytest.raises(InputError, match="export the Megatron side to HF first"):
        checkpoint_diff.diff(open_checkpoint(checkpoint_builder.materialize(model_spec.ModelSpec("llama"))), open_checkpoint(torch_dist_ckpts["llama"]))


# ----------------------------------------------------------------------------------- audit

LLAMA = model_spec.ModelSpec("llama").hf_config
MOE = model_spec.ModelSpec("qwen3-moe").hf_config


@pytest.mark.parametrize("family", ["llama", "qwen3-moe"])
def test_audit_passes_on_the_real_conventions(torch_dist_ckpts, tmp_path, family):
    ckpt = open_checkpoint(write_fsdp(tmp_path, family, torch_dist_ckpts[family]))
    result = fsdp_layout.audit_fsdp_dtensor(ckpt, model_spec.ModelSpec.parse(family).hf_config, optimizer_depth=3)
    assert result.passed, result.summary


def test_audit_flags_an_unsplit_fc1(torch_dist_ckpts, tmp_path):
    ckpt = open_checkpoint(write_fsdp(tmp_path, "llama", torch_dist_ckpts["llama"], split_swiglu=False))
    result = fsdp_layout.audit_fsdp_dtensor(ckpt, LLAMA)
    assert not result.passed and "unsplit SwiGLU fc1" in result.summary


def test_audit_flags_a_missing_v_half(torch_dist_ckpts, tmp_path):
    import torch.distributed.checkpoint as dcp

    path = write_fsdp(tmp_path, "llama", torch_dist_ckpts["llama"], with_optimizer=False)
    flat = {k: torch.empty(s.shape) for k, s in open_checkpoint(path).stored.items() if not k.endswith("layers.0.mlp.linear_fc1.weight_v")}
    dcp.load(flat, checkpoint_id=str(path), no_dist=True)
    dcp.save(flat, storage_writer=dcp.FileSystemWriter(str(tmp_path / "no_v")), no_dist=True)
    result = fsdp_layout.audit_fsdp_dtensor(open_checkpoint(tmp_path / "no_v"), LLAMA)
    assert not result.passed and "missing _v" in result.summary


def test_audit_flags_local_expert_indices(torch_dist_ckpts, tmp_path):
    ckpt = open_checkpoint(write_fsdp(tmp_path, "qwen3-moe", torch_dist_ckpts["qwen3-moe"], local_experts=2))
    result = fsdp_layout.audit_fsdp_dtensor(ckpt, MOE)
    assert not result.passed and "local instead of global expert indices" in result.summary


def test_audit_flags_the_wrong_optimizer_prefix_depth(torch_dist_ckpts, tmp_path):
    ckpt = open_checkpoint(write_fsdp(tmp_path, "llama", torch_dist_ckpts["llama"], optimizer_wrappers=1))
    result = fsdp_layout.audit_fsdp_dtensor(ckpt, LLAMA, optimizer_depth=3)
    assert not result.passed and "expected 3" in result.summary


NEXT = model_spec.ModelSpec("qwen3-next").hf_config


def gdn_state(sizes_from=NEXT):
    """A canonical GDN state (2 layers) with the fused shapes the config implies."""
    in_proj, conv = megatron_keys.gdn_split_sizes(sizes_from)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(2):
        pre = f"decoder.layers.{i}.self_attention"
        state[f"{pre}.in_proj.weight"] = torch.randn(sum(in_proj), 64, generator=gen)
        state[f"{pre}.conv1d.weight"] = torch.randn(sum(conv), 1, 4, generator=gen)
    return state


def test_audit_passes_gdn_splits_and_reader_rejoins_them(tmp_path):
    state = gdn_state()
    ckpt = open_checkpoint(fsdp_writer.write_fsdp_dtensor(tmp_path / "gdn", state, hf_config=NEXT))
    assert any(k.endswith("in_proj.weight.beta") for k in ckpt.model_keys())
    assert fsdp_layout.audit_fsdp_dtensor(ckpt, NEXT).passed
    rejoined = dict(ckpt.tensors(list(ckpt.specs())))
    assert all(torch.equal(rejoined[k], v) for k, v in state.items())


def test_audit_flags_wrong_gdn_split_sizes(tmp_path):
    # Same totals as the right split (200 and 128 rows), cut at the wrong places.
    wrong = ([40, 40, 56, 56, 4, 4], [40, 40, 48])
    assert [sum(x) for x in wrong] == [sum(x) for x in megatron_keys.gdn_split_sizes(NEXT)]
    ckpt = open_checkpoint(fsdp_writer.write_fsdp_dtensor(tmp_path / "gdn", gdn_state(), gdn_sizes=wrong))
    result = fsdp_layout.audit_fsdp_dtensor(ckpt, NEXT)
    assert not result.passed and "GDN split sizes" in result.summary


# ----------------------------------------------------------------------------------- bad input


def harness_diff(a, b, *extra):
    return subprocess.run([sys.executable, "-m", "harness", *extra, "diff", str(a), str(b)], capture_output=True, text=True)


def digest_tree(path):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def good_hf(tmp_path):
    return checkpoint_builder.build(model_spec.ModelSpec("llama"), tmp_path / "good")


def truncate(file, keep):
    data = file.read_bytes()
    file.write_bytes(data[:keep] if keep >= 0 else data[:keep])


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda tmp, td: tmp / "nope", "no such file or directory"),
        (lambda tmp, td: (tmp / "empty").mkdir() or tmp / "empty", "not a known checkpoint format"),
        (lambda tmp, td: _truncated_safetensors(tmp), "truncated safetensors file"),
        (lambda tmp, td: _corrupt_header(tmp), "corrupt safetensors header"),
        (lambda tmp, td: _no_metadata(tmp, td), "the async save is probably incomplete"),
        (lambda tmp, td: td.parent, "a run folder, not a checkpoint; pass an iter_* folder, e.g."),
        (lambda tmp, td: _truncated_distcp(tmp, td), "truncated"),
    ],
    ids=["missing", "unknown-folder", "truncated-safetensors", "corrupt-header", "no-metadata", "run-folder", "truncated-distcp"],
)
def test_bad_input_is_one_line_exit_2_and_untouched(torch_dist_ckpts, tmp_path, good_hf, make, words):
    bad = make(tmp_path, torch_dist_ckpts["llama"])
    before = digest_tree(bad) if bad.exists() and bad.is_dir() else None
    other = good_hf if "safetensors" in words or words.startswith("no such") or "known" in words else torch_dist_ckpts["llama"]
    r = harness_diff(bad, other)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and words in r.stderr and "Traceback" not in r.stderr
    if before is not None:
        assert digest_tree(bad) == before, "an input was written to"
    debug = harness_diff(bad, other, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def _truncated_safetensors(tmp):
    path = checkpoint_builder.build(model_spec.ModelSpec("llama"), tmp / "trunc")
    truncate(path / "model.safetensors", -100)
    return path


def _corrupt_header(tmp):
    path = checkpoint_builder.build(model_spec.ModelSpec("llama"), tmp / "corrupt")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:20] = b"\x00garbage!!\x01\x02"
    (path / "model.safetensors").write_bytes(bytes(data))
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _no_metadata(tmp, td):
    run = tmp / "run"
    good = _copy(td, run / "iter_0000001")
    half = _copy(td, run / "iter_0000002")
    (half / ".metadata").unlink()
    return half


def _truncated_distcp(tmp, td):
    path = _copy(td, tmp / "iter_0000003")
    truncate(next(path.glob("*.distcp")), 200)
    return path


def test_raw_diff_decodes_bf16_and_counts_elements(tmp_path):
    a = checkpoint_builder.build(model_spec.ModelSpec.parse("llama@bf16"), tmp_path / "a")
    b = checkpoint_builder.build(model_spec.ModelSpec.parse("llama@bf16"), tmp_path / "b")
    from safetensors.torch import load_file, save_file

    sd = load_file(b / "model.safetensors")
    assert sd["lm_head.weight"].dtype == torch.bfloat16
    before = sd["lm_head.weight"][5, 6].float().item()
    sd["lm_head.weight"][5, 6] += 0.25
    sd["lm_head.weight"][9, 1] += 0.25
    after = sd["lm_head.weight"][5, 6].float().item()
    save_file(sd, b / "model.safetensors", metadata={"format": "pt"})
    result, _ = checkpoint_diff.diff(open_checkpoint(a), open_checkpoint(b))
    (row,) = result.details
    assert row["key"] == "lm_head.weight" and row["status"].startswith("values differ in 2/")
    assert row["max_abs_diff"] >= abs(after - before) - 1e-6


# ------------------------------------------------------------------------ broken links, bad index


def _hf_with_broken_shard(tmp, how):
    """A sharded HF checkpoint whose second shard is a symlink loop or a dangling link."""
    from safetensors.torch import load_file, save_file

    src = checkpoint_builder.build(model_spec.ModelSpec("llama"), tmp / "src")
    sd = load_file(src / "model.safetensors")
    keys = sorted(sd)
    out = tmp / how
    out.mkdir()
    save_file({k: sd[k] for k in keys[:5]}, out / "model-00001-of-00002.safetensors")
    second = out / "model-00002-of-00002.safetensors"
    if how == "loop":
        second.symlink_to(second.name)
    else:
        second.symlink_to(tmp / "gone.safetensors")
    index = {"metadata": {}, "weight_map": {k: ("model-00001-of-00002.safetensors" if i < 5 else second.name)
                                              for i, k in enumerate(keys)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("how,words", [("loop", "a symlink loop"), ("dangling", "a dangling symlink to")])
def test_a_broken_shard_link_is_one_line_exit_2(tmp_path, good_hf, how, words):
    bad = _hf_with_broken_shard(tmp_path, how)
    r = harness_diff(bad, good_hf)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and words in r.stderr and "model-00002-of-00002" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("how,words", [("loop", "a symlink loop"), ("dangling", "a dangling symlink to")])
def test_a_broken_link_as_the_argument_is_named_as_such(tmp_path, good_hf, how, words):
    link = tmp_path / "ckpt"
    link.symlink_to(link.name if how == "loop" else tmp_path / "nowhere")
    r = harness_diff(link, good_hf)
    assert r.returncode == 2 and words in r.stderr and "no such file" not in r.stderr, r.stderr


def test_an_index_naming_a_tensor_no_shard_holds_is_reported_not_equal(tmp_path, good_hf):
    """The loader trusts the index: a tensor it names that no shard holds is a broken checkpoint,
    even when every tensor the shards hold is bitwise equal to the other side."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(good_hf, broken)
    weight_map = {k: "model.safetensors" for k in zoo_keys(good_hf)}
    weight_map["model.layers.9.mlp.up_proj.weight"] = "model.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    r = harness_diff(broken, good_hf)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "names 1 tensor(s) that no shard holds" in r.stderr and "model.layers.9.mlp.up_proj.weight" in r.stderr


def zoo_keys(path):
    from harness.formats.hf import HfCheckpoint

    return list(HfCheckpoint(path).specs())
