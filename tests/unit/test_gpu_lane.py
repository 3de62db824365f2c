"""The GPU lane's harness-side fixes, tested where the logic runs without a GPU
(../shared/notes/gpu-lane-findings.md, items 1-12)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from harness.matrix import model_spec
from harness.runtimes import gpu as gpu_runtime
from harness.matrix.lanes import GPU, capacity_blocker, rank_environment
from harness.results import CaseResult, error_headline

pytestmark = pytest.mark.cpu


@dataclass
class Provider:
    """The provider fields the GPU runtime adjusts, with the values upstream bridges set."""

    bf16: bool = True  # gpt_oss_bridge.py forces bf16 whatever the checkpoint is
    fp16: bool = False
    params_dtype: torch.dtype = torch.bfloat16
    pipeline_dtype: torch.dtype | None = None
    autocast_dtype: torch.dtype = torch.bfloat16  # qwen3_moe_bridge.py and others force this
    gradient_accumulation_fusion: bool = True  # the fusions default when TE imports
    attention_backend: object = None


def configured(model: str, monkeypatch, apex: bool = False, flash_attn: bool = False, **fields):
    monkeypatch.setattr(gpu_runtime, "apex_weight_grad_fusion_available", lambda: apex)
    monkeypatch.setattr(gpu_runtime, "flash_attn_installed", lambda: flash_attn)
    runtime, provider = gpu_runtime.GpuRuntime(), Provider(**fields)
    runtime.configure_provider(provider, model_spec.ModelSpec.parse(model))
    return runtime, provider


def test_fp32_cases_run_in_fp32_even_where_the_bridge_forces_bf16(monkeypatch):
    runtime, provider = configured("gpt-oss", monkeypatch)
    assert (provider.params_dtype, provider.pipeline_dtype, provider.autocast_dtype) == (torch.float32,) * 3
    assert provider.bf16 is False and runtime.provenance()["provider_decisions"]["dtype"] == "float32"
    _, provider = configured("llama@bf16", monkeypatch, bf16=False, params_dtype=torch.float32)
    assert provider.bf16 is True and provider.params_dtype == provider.pipeline_dtype == torch.bfloat16


def test_gradient_accumulation_fusion_is_off_without_apex_and_the_decision_is_recorded(monkeypatch):
    runtime, provider = configured("llama", monkeypatch, apex=False)
    assert provider.gradient_accumulation_fusion is False
    assert "APEX" in runtime.provenance()["provider_decisions"]["gradient_accumulation_fusion"]
    runtime, provider = configured("llama", monkeypatch, apex=True)
    assert provider.gradient_accumulation_fusion is True
    assert "gradient_accumulation_fusion" not in runtime.provenance()["provider_decisions"]


def test_a_hard_coded_flash_backend_becomes_auto_where_flash_cannot_run(monkeypatch):
    from megatron.core.transformer.enums import AttnBackend

    runtime, provider = configured("gemma3", monkeypatch, attention_backend=AttnBackend.flash)
    assert provider.attention_backend == AttnBackend.auto
    assert "fp32" in runtime.provenance()["provider_decisions"]["attention_backend"]
    _, provider = configured("llama@bf16", monkeypatch, flash_attn=True, attention_backend=AttnBackend.flash)
    assert provider.attention_backend == AttnBackend.flash  # bf16 with flash-attn installed: left alone


def test_every_gpu_rank_starts_with_tf32_off(tmp_path, monkeypatch):
    """TE's GEMMs read NVIDIA_TF32_OVERRIDE when CUDA starts: it must be in the rank's environment."""
    from harness.execution import rank_launcher
    from harness.execution.run_dir import RunDir
    from harness.matrix.cases import load_cases
    from harness.run_spec import RunSpec

    seen = {}

    class Captured(Exception):
        pass

    def popen(cmd, env, **_kwargs):
        seen["env"] = env
        raise Captured

    monkeypatch.setattr(rank_launcher.subprocess, "Popen", popen)
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "c.yaml").write_text("matrix:\n  - families: [llama]\n    layouts: [tp2]\n    paths: [memory/roundtrip]\n")
    with pytest.raises(Captured):
        rank_launcher.run_cases(RunSpec(cases=load_cases(folder).cases, lane=GPU, cases_dir=folder), RunDir(tmp_path / "run"))
    assert seen["env"]["NVIDIA_TF32_OVERRIDE"] == "0"
    assert rank_environment("cpu") == {}


def test_the_gpu_runtime_refuses_to_start_with_tf32_possible(monkeypatch):
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    with pytest.raises(RuntimeError, match="NVIDIA_TF32_OVERRIDE"):
        gpu_runtime.GpuRuntime().__enter__()


def test_re_initialising_gpu_parallel_state_releases_the_old_layouts_process_groups(gloo_world, monkeypatch):
    """megatron-core's destroy_model_parallel only forgets its groups: without the release the CPU
    runtime has (harness.runtimes.base.release_process_groups), every layout change on the GPU lane
    left the old layout's groups alive in each rank. The real initialize_model_parallel runs here
    on the one-rank gloo world; only the CUDA RNG seeding is replaced."""
    from megatron.core import parallel_state, tensor_parallel
    from torch.distributed import distributed_c10d

    from harness.matrix.layouts import Layout
    from harness.runtimes.base import release_process_groups

    seeds = []
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", seeds.append)  # needs CUDA
    runtime = gpu_runtime.GpuRuntime()
    try:
        runtime.init_model_parallel(Layout())
        first = len(distributed_c10d._world.pg_map)
        for _ in range(3):
            runtime.init_model_parallel(Layout(), seed=7)
        assert len(distributed_c10d._world.pg_map) == first, "each re-initialisation left the old groups alive"
        assert first > 1 and seeds == [gpu_runtime.DEFAULT_SEED, 7, 7, 7]
    finally:
        parallel_state.destroy_model_parallel()
        release_process_groups()


def test_the_strict_reload_sets_up_and_restores_the_num_microbatches_calculator():
    from megatron.core import num_microbatches_calculator as calculators

    from harness.conversion.megatron_fsdp import num_microbatches_calculator

    before = calculators._GLOBAL_NUM_MICROBATCHES_CALCULATOR
    with num_microbatches_calculator(data_parallel_size=2):
        calculators.update_num_microbatches(0)  # what load_checkpoint calls; raises without one
        assert calculators.get_num_microbatches() == 1
    assert calculators._GLOBAL_NUM_MICROBATCHES_CALCULATOR is before
    with pytest.raises(ZeroDivisionError):
        with num_microbatches_calculator(data_parallel_size=1):
            1 / 0
    assert calculators._GLOBAL_NUM_MICROBATCHES_CALCULATOR is before


@pytest.mark.parametrize("world,gpus,reason", [
    (1, 1, ""), (2, 1, "GPU lane: needs 2 GPUs, this machine has 1"), (1, 0, "GPU lane: no CUDA GPU on this machine"),
])
def test_cases_needing_more_gpus_than_the_machine_has_are_skipped_with_a_reason(world, gpus, reason):
    assert capacity_blocker(world, GPU, gpus) == reason
    assert capacity_blocker(8, "cpu", 0) == ""


def test_gpu_count_honours_harness_gpus_and_cuda_visible_devices(monkeypatch):
    from harness.matrix import lanes

    monkeypatch.setenv("HARNESS_GPUS", "1")
    assert lanes.gpu_count() == 1
    monkeypatch.delenv("HARNESS_GPUS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert lanes.gpu_count() == 0


def test_selftest_on_a_one_gpu_machine_reports_two_rank_targets_as_not_run_not_as_false_positives():
    from harness.regression import selftest

    skip = "GPU lane: needs 2 GPUs, this machine has 1"
    reg = next(r for r in selftest.REGRESSIONS if r.fault == "expert-offset-local")  # targets need 2 ranks
    results = {}
    for case_id in selftest.targets(reg, GPU):
        results[case_id] = CaseResult(case_id, "skip", error=skip)
        results[f"{case_id}+{reg.fault}"] = CaseResult(f"{case_id}+{reg.fault}", "skip", error=skip)
    rows, false_positives = selftest.evaluate(results, GPU, only=[reg.fault])
    assert false_positives == [] and rows[0].detected.startswith("not run: ") and skip in rows[0].detected


def test_a_crash_headline_is_the_exception_line_not_traceback():
    error = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    f()\n"
             "AttributeError: 'GPTModel' object has no attribute 'module'\n"
             "--- process group exited with code 1; log tail ---\n==> rank0.log <==\nsome log line")
    assert error_headline(error) == "AttributeError: 'GPTModel' object has no attribute 'module'"
    result = CaseResult("llama/tp1/fsdp_dtensor/roundtrip", "error", error=error)
    assert result.headline == "AttributeError: 'GPTModel' object has no attribute 'module'"
    assert error_headline("case ran past its 25s timeout\n--- log tail ---\nTraceback (most recent call last):") == \
        "case ran past its 25s timeout"


def test_a_message_over_several_lines_is_one_headline_and_a_chained_crash_names_the_last_exception():
    error = ("Traceback (most recent call last):\n  File \"a.py\", line 3, in f\n    g()\n"
             "KeyError: 'x'\n\nDuring handling of the above exception, another exception occurred:\n\n"
             "Traceback (most recent call last):\n  File \"b.py\", line 9, in load\n    raise ValueError(msg)\n"
             "ValueError: Shape mismatch for megatron param embedding.word_embeddings.weight:\n"
             "  Expected shape: torch.Size([256, 64])\n  Got shape: torch.Size([250, 64])\n"
             "  HF mapping: model.embed_tokens.weight\n")
    assert error_headline(error) == (
        "ValueError: Shape mismatch for megatron param embedding.word_embeddings.weight: Expected shape: "
        "torch.Size([256, 64]) Got shape: torch.Size([250, 64]) HF mapping: model.embed_tokens.weight")


def test_the_hf_reference_is_built_on_pure_torch_paths_even_where_fla_is_installed(monkeypatch):
    """On the H100, transformers bound flash-linear-attention's Triton kernels for Qwen3-Next and
    the CPU reference crashed in them; inside pure_torch_reference the module takes torch's."""
    import transformers
    import transformers.models.qwen3_next.modeling_qwen3_next as qwen3_next

    from harness.matrix.hf_reference import pure_torch_reference

    def triton_kernel(*_args, **_kwargs):
        raise ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")

    monkeypatch.setattr(qwen3_next, "chunk_gated_delta_rule", triton_kernel)  # as if fla were installed
    config = transformers.Qwen3NextConfig(**{k: v for k, v in model_spec.ModelSpec("qwen3-next").hf_config.items()})
    with pure_torch_reference():
        layer = qwen3_next.Qwen3NextGatedDeltaNet(config, layer_idx=0)
    assert layer.chunk_gated_delta_rule is qwen3_next.torch_chunk_gated_delta_rule
    assert qwen3_next.chunk_gated_delta_rule is triton_kernel, "restored on exit"
    assert qwen3_next.Qwen3NextGatedDeltaNet(config, layer_idx=0).chunk_gated_delta_rule is triton_kernel


# ---------------------------------------------------------------- several ranks on one GPU


@pytest.mark.parametrize("world,gpus,ranks_per_gpu,reason", [
    (2, 1, 2, ""),
    (4, 1, 4, ""),
    (4, 1, 2, "GPU lane: needs 2 GPUs at 2 ranks per GPU, this machine has 1"),
    (8, 4, 2, ""),
    (3, 1, 2, "GPU lane: needs 2 GPUs at 2 ranks per GPU, this machine has 1"),
])
def test_ranks_per_gpu_fits_multi_rank_cases_on_fewer_gpus_and_refuses_what_still_does_not_fit(
        world, gpus, ranks_per_gpu, reason):
    assert capacity_blocker(world, GPU, gpus, ranks_per_gpu) == reason


def test_ranks_sharing_a_gpu_use_gloo_and_consecutive_ranks_share_a_device():
    from harness.matrix.lanes import Placement

    shared = Placement(2)
    assert [shared.device_index(r) for r in range(4)] == [0, 0, 1, 1]
    assert shared.backend(2) == "gloo", "NCCL refuses two ranks on one GPU"
    assert shared.backend(1) == "nccl", "a world of one shares nothing: it runs exactly as without the option"
    assert Placement().backend(8) == "nccl" and [Placement().device_index(r) for r in range(2)] == [0, 1]
    with pytest.raises(ValueError):
        Placement(0)


def test_the_plan_carries_the_placement_to_the_rank_and_its_runtime_uses_it(tmp_path, monkeypatch):
    from harness.execution.run_dir import Plan, RunDir
    from harness.runtimes import make_runtime
    from harness.matrix.lanes import Placement
    from harness.run_spec import RunSpec

    run = RunDir(tmp_path)
    path = run.write_plan(Plan(spec=RunSpec(lane=GPU, placement=Placement(2)),
                               run_dir=str(tmp_path), group="ws2-1"))
    plan = RunDir.read_plan(path).spec
    assert plan.placement == Placement(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    runtime = make_runtime(plan.lane, plan.placement)
    assert (runtime.backend, runtime.device) == ("gloo", torch.device("cuda", 0))
    assert runtime.provenance()["backend"] == "gloo" and runtime.provenance()["ranks_per_gpu"] == 2
    one_per_gpu = make_runtime(GPU)
    assert (one_per_gpu.backend, one_per_gpu.device) == ("nccl", torch.device("cuda", 1))


def test_a_two_rank_case_on_a_one_gpu_machine_is_launched_only_with_two_ranks_per_gpu(case_set):
    from harness.execution import run_service
    from harness.matrix.lanes import Placement

    case = next(c for c in case_set.select(lane=GPU) if c.world_size == 2 and not c.invalid_reason)
    assert run_service.not_runnable_here(case, GPU, gpus=1) == "GPU lane: needs 2 GPUs, this machine has 1"
    assert run_service.not_runnable_here(case, GPU, gpus=1, placement=Placement(2)) == ""


@pytest.mark.parametrize("argv,message", [
    (["matrix", "--ranks-per-gpu", "2"], "--ranks-per-gpu 2 applies to the GPU lane only"),
    (["matrix", "--lane", "gpu", "--ranks-per-gpu", "0"], "--ranks-per-gpu must be at least 1, not 0"),
    (["matrix", "--jobs", "0"], "--jobs must be at least 1, not 0"),
])
def test_a_wrong_placement_is_a_one_line_input_error_before_anything_runs(argv, message, capsys, tmp_path, monkeypatch):
    from harness import cli

    monkeypatch.setenv("HARNESS_REPORTS", str(tmp_path))
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == f"harness: error: {message}" + (" (the CPU lane has no GPUs to share)" if "lane only" in message else "") + "\n"
    assert not any(tmp_path.iterdir()), "no run folder is created for a refused request"


@pytest.mark.parametrize("option,message", [("--ranks-per-gpu=0", "--ranks-per-gpu must be at least 1, not 0"),
                                            ("--harness-jobs=0", "--harness-jobs must be at least 1, not 0")])
def test_pytest_refuses_a_wrong_placement_before_collecting_anything(option, message):
    import subprocess
    import sys

    from harness import workspace

    r = subprocess.run([sys.executable, "-m", "pytest", option, "--co", "-q", "-p", "no:cacheprovider",
                        "tests/unit/test_layouts.py"], capture_output=True, text=True, cwd=workspace.REPO_ROOT, timeout=120)
    assert r.returncode == 4 and message in r.stderr, r.stdout + r.stderr
