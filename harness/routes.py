"""Conversion routes: what one case *does*, as a short sequence of real Megatron-Bridge calls.

Each route returns the list of checks it ran. All of them are collective (every rank calls the
same steps); comparisons happen on rank 0 only.

    memory/roundtrip     HF -> Megatron(A) -> HF                               (in memory)
    torch_dist/roundtrip HF -> Megatron(A) -> torch_dist -> Megatron(A) -> HF
    torch_dist/reshard   HF -> Megatron(A) -> torch_dist -> Megatron(B) -> HF
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from harness import checks, convert, forward, zoo
from harness.cases import Case
from harness.results import CheckResult
from harness.formats import hf as hf_format
from harness.layouts import Layout


@dataclass
class Hooks:
    """Points where a test may inject a fault into a real run (all optional)."""

    after_export: Callable[[convert.Export], None] | None = None
    before_forward: Callable[[convert.MegatronModel], None] | None = None
    after_hf_save: Callable[[Path], None] | None = None  # the exported HF folder, before reloading


@dataclass
class Context:
    """What a route needs besides the case: the lane's runtime, hooks and a scratch folder.
    Routes fill ``fingerprint`` (rank 0) with what golden/ pins: per-format tensor digests."""

    runtime: Any
    workdir: Path
    hooks: Hooks = field(default_factory=Hooks)
    fingerprint: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- rank helpers


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def materialize_model(spec: zoo.ModelSpec) -> Path:
    """Rank 0 builds the tiny checkpoint (once, cached); the others wait for it."""
    if rank() == 0:
        zoo.materialize(spec)
    barrier()
    return zoo.materialize(spec)  # already built: returns the path


def merge_over_ranks(result: CheckResult) -> CheckResult:
    """Combine a per-rank check (each rank holds its own shard) into one result on rank 0."""
    if world() == 1:
        return result
    gathered: list[CheckResult | None] = [None] * world()
    dist.all_gather_object(gathered, result)
    failing = [(r, c) for r, c in enumerate(gathered) if c is not None and not c.passed]
    if not failing:
        total = sum(c.metrics.get("params", 0) for c in gathered if c)
        return CheckResult(result.name, True, f"{total}/{total} Megatron params written by the load (all ranks)",
                           metrics={"params": total, "unloaded": []})
    first_rank, first = failing[0]
    return CheckResult(result.name, False, f"rank {first_rank}: {first.summary}",
                       metrics={**first.metrics, "failing_ranks": [r for r, _ in failing]})


def gather_logits(local: torch.Tensor | None) -> torch.Tensor:
    """The logits live on the last pipeline stage; bring one copy to every rank."""
    if world() == 1:
        assert local is not None, "single rank produced no logits"
        return local
    gathered: list[torch.Tensor | None] = [None] * world()
    dist.all_gather_object(gathered, local)
    return next(t for t in gathered if t is not None)


# ------------------------------------------------------------------------------- shared steps


def import_hf(case: Case, ctx: Context, layout: Layout) -> tuple[Path, convert.MegatronModel, list[CheckResult]]:
    """HF -> Megatron at ``layout`` with load coverage checked."""
    hf_dir = materialize_model(case.model)
    bridge = convert.open_bridge(hf_dir)
    model = convert.build_model(bridge, case.model, layout, ctx.runtime)
    convert.load_hf(model)
    return hf_dir, model, [merge_over_ranks(convert.check_fully_loaded(model))]


def export_and_compare(case: Case, model: convert.MegatronModel, hf_dir: Path, ctx: Context) -> list[CheckResult]:
    """Megatron -> HF, then bitwise against the source safetensors (streamed), plus the tie."""
    exported = convert.export_hf(model, keep=rank() == 0)
    if ctx.hooks.after_export:
        ctx.hooks.after_export(exported)
    if rank() != 0:
        return []
    tied = bool(case.model.hf_config.get("tie_word_embeddings", False))
    ctx.fingerprint["hf-export"] = checks.fingerprint(exported.tensors.items())
    return [
        checks.compare_tensors(hf_format.iter_tensors(hf_dir), exported.tensors, duplicates=exported.duplicates),
        checks.tied_embeddings(tied, model.shares_embeddings, exported.tensors),
    ]


def logits_vs_hf(case: Case, model: convert.MegatronModel, hf_dir: Path, ctx: Context) -> list[CheckResult]:
    name = "logits-hf-vs-megatron"
    blocker = ctx.runtime.forward_blocker(model.layout, case.family, convert.is_moe(case.model.hf_config))
    if blocker:
        lane = "CPU" if ctx.runtime.backend == "gloo" else "this lane"
        return [CheckResult.skip(name, f"no Megatron forward on {lane}: {blocker}")] if rank() == 0 else []
    if ctx.hooks.before_forward:
        ctx.hooks.before_forward(model)
    vocab = case.model.hf_config["vocab_size"]
    batch = forward.fixed_batch(vocab)
    logits = gather_logits(forward.megatron_logits(model.chunks, batch, vocab, ctx.runtime.device))
    if rank() != 0:
        return []
    tolerance = checks.logit_tolerance(
        gpu=ctx.runtime.backend != "gloo", bf16=bool(case.model.provider_overrides.get("bf16"))
    )
    result = checks.logit_parity(forward.hf_logits(hf_dir, batch), logits, name=name, tolerance=tolerance)
    ctx.fingerprint["logits"] = result.metrics
    return [result]


def fingerprint_saved(ctx: Context, fmt: str, folder: Path) -> None:
    """Digest every canonical tensor of a checkpoint this case wrote (rank 0, streamed)."""
    if rank() != 0:
        return
    from harness.formats import dcp
    from harness.formats.detect import open_checkpoint

    ckpt = open_checkpoint(dcp.newest_complete_iter(folder) or folder)
    ctx.fingerprint[fmt] = checks.fingerprint(ckpt.tensors(list(ckpt.specs())))


def generation_vs_original(case: Case, model: convert.MegatronModel, hf_dir: Path, ctx: Context) -> list[CheckResult]:
    """save_hf_pretrained to disk, reload it with from_pretrained (config.json + tokenizer too),
    greedy-decode, compare with the original checkpoint's tokens."""
    out = shared_dir(ctx, "hf_export")
    try:
        model.bridge.save_hf_pretrained(model.chunks, str(out), show_progress=False)
        saved = None
    except Exception as err:  # noqa: BLE001 - e.g. a strict save refusing an incomplete export
        saved = f"save_hf_pretrained failed: {_one_line(err)}"
    barrier()
    if rank() != 0:
        return []
    if saved is not None:
        return [CheckResult("generation", False, saved)]
    if ctx.hooks.after_hf_save:
        ctx.hooks.after_hf_save(out)
    from harness.tokenizer import PROMPTS

    prompts = PROMPTS[case.family.tokenizer]
    reference = forward.greedy_tokens(hf_dir, prompts)
    try:
        exported = forward.greedy_tokens(out, prompts)
    except Exception as err:  # noqa: BLE001 - an export that does not reload is a failed check
        return [CheckResult("generation", False, f"the exported checkpoint does not reload: {_one_line(err)}")]
    return [checks.generation_parity(reference, exported)]


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0][:200]


def shared_dir(ctx: Context, name: str) -> Path:
    """A scratch folder every rank agrees on (rank 0 creates it fresh)."""
    path = ctx.workdir / name
    if rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    barrier()
    return path


# ------------------------------------------------------------------------------------ routes


def memory_roundtrip(case: Case, ctx: Context) -> list[CheckResult]:
    hf_dir, model, results = import_hf(case, ctx, case.layout)
    results += export_and_compare(case, model, hf_dir, ctx)
    results += logits_vs_hf(case, model, hf_dir, ctx)
    results += generation_vs_original(case, model, hf_dir, ctx)
    return results


def through_torch_dist(model: convert.MegatronModel, layout: Layout, ctx: Context) -> convert.MegatronModel:
    """save_megatron_model (torch_dist), fingerprint it, load_megatron_model at ``layout``."""
    ckpt = shared_dir(ctx, "torch_dist")
    convert.save_torch_dist(model, ckpt)
    fingerprint_saved(ctx, "torch_dist", ckpt)
    return convert.load_torch_dist(model.bridge, ckpt, layout, ctx.runtime)


def torch_dist_roundtrip(case: Case, ctx: Context) -> list[CheckResult]:
    """Save at the case layout, load at ``load_layout`` (the same one unless resharding)."""
    hf_dir, model, results = import_hf(case, ctx, case.layout)
    loaded = through_torch_dist(model, case.load_layout or case.layout, ctx)
    del model
    results += export_and_compare(case, loaded, hf_dir, ctx)
    results += logits_vs_hf(case, loaded, hf_dir, ctx)
    results += generation_vs_original(case, loaded, hf_dir, ctx)
    return results


def _fsdp_save_reload(case: Case, ctx: Context, hf_dir: Path, bridge) -> list[CheckResult]:
    """HF -> Megatron-FSDP -> fsdp_dtensor (audited) -> fresh Megatron-FSDP -> HF + logits."""
    from harness import fsdp_lane

    model = fsdp_lane.build_fsdp_model(bridge, case.model, case.layout, ctx.runtime)
    convert.fill_sentinel(model)
    convert.load_hf(model, hf_dir)
    results = [merge_over_ranks(convert.check_fully_loaded(model))]
    saved = shared_dir(ctx, "fsdp_dtensor")
    fsdp_lane.save_fsdp_dtensor(model, saved)
    fingerprint_saved(ctx, "fsdp_dtensor", saved)
    bf16 = bool(case.model.provider_overrides.get("bf16"))
    if rank() == 0:
        results.append(fsdp_lane.audit_saved(saved, case.model, bf16))
    del model
    loaded = fsdp_lane.reload_fresh(bridge, case.model, case.load_layout or case.layout, ctx.runtime, saved)
    results.append(merge_over_ranks(convert.check_fully_loaded(loaded)))
    results[-1].name = "reload-coverage"
    results += export_and_compare(case, loaded, hf_dir, ctx)
    results += logits_vs_hf(case, loaded, hf_dir, ctx)
    return results


def fsdp_dtensor_roundtrip(case: Case, ctx: Context) -> list[CheckResult]:
    hf_dir = materialize_model(case.model)
    return _fsdp_save_reload(case, ctx, hf_dir, convert.open_bridge(hf_dir))


def fsdp_dtensor_from_torch_dist(case: Case, ctx: Context) -> list[CheckResult]:
    """torch_dist first (plain Megatron), then its export goes through the fsdp_dtensor leg."""
    hf_dir, model, results = import_hf(case, ctx, case.layout)
    loaded = through_torch_dist(model, case.layout, ctx)
    bridge = loaded.bridge
    del model
    via = shared_dir(ctx, "hf_from_torch_dist")
    bridge.save_hf_pretrained(loaded.chunks, str(via))
    del loaded
    results += _fsdp_save_reload(case, ctx, via, bridge)
    # The checks above compare against `via`; it must itself equal the original HF checkpoint.
    if rank() == 0:
        exported = dict(hf_format.iter_tensors(via))
        results.append(checks.compare_tensors(hf_format.iter_tensors(hf_dir), exported, name="torch_dist-export"))
    return results


def fsdp_key_contract(case: Case, ctx: Context) -> list[CheckResult]:
    """The wrapped-key contract (harness.contracts) for this family's fsdp_dtensor handlers."""
    import megatron.core.transformer.fsdp_dtensor_checkpoint as handlers

    from harness import contracts

    cfg = case.model.hf_config
    blocker = case.family.cpu_convert_blocker if ctx.runtime.backend == "gloo" else ""
    results = []
    if cfg.get("hidden_act", cfg.get("hidden_activation", "silu")) == "silu" and not blocker:
        hf_dir = materialize_model(case.model)
        model = convert.build_model(convert.open_bridge(hf_dir), case.model, case.layout, ctx.runtime)
        stack = contracts.save_path_stack(model.chunks[0], bf16=True)
        results.append(contracts.check_handler(handlers.handle_swiglu_in_state_dict, stack, name="swiglu-key-contract"))
    elif blocker:
        results.append(CheckResult.skip("swiglu-key-contract", f"the model cannot be built on CPU: {blocker}"))
    if "linear_num_key_heads" in cfg:
        stack = contracts.gdn_stack_from_config(cfg)
        results.append(contracts.check_handler(handlers.handle_gdn_in_state_dict, stack, name="gdn-key-contract"))
    return results if rank() == 0 else []


ROUTES: dict[str, Callable[[Case, Context], list[CheckResult]]] = {
    "memory/roundtrip": memory_roundtrip,
    "torch_dist/roundtrip": torch_dist_roundtrip,
    "torch_dist/reshard": torch_dist_roundtrip,
    "fsdp_dtensor/roundtrip": fsdp_dtensor_roundtrip,
    "fsdp_dtensor/reshard": fsdp_dtensor_roundtrip,
    "fsdp_dtensor/from-torch_dist": fsdp_dtensor_from_torch_dist,
    "fsdp_dtensor/key-contract": fsdp_key_contract,
}
