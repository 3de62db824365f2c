"""Conversion routes: what one case *does*, as a short sequence of real Megatron-Bridge calls.

Each route returns the list of checks it ran. All of them are collective (every rank calls the
same steps); comparisons happen on rank 0 only. ``ROUTES`` maps each path of
``harness.matrix.cases.PATHS`` to its route:

    memory/roundtrip              HF -> Megatron(A) -> HF                               (in memory)
    torch_dist/roundtrip          HF -> Megatron(A) -> torch_dist -> Megatron(A) -> HF
    torch_dist/reshard            HF -> Megatron(A) -> torch_dist -> Megatron(B) -> HF
    fsdp_dtensor/roundtrip        HF -> Megatron-FSDP(A) + optimizer -> fsdp_dtensor training checkpoint
                                  -> fresh Megatron-FSDP(A) + optimizer -> HF
    fsdp_dtensor/reshard          the same, reloaded at B
    fsdp_dtensor/from-torch_dist  HF -> Megatron(A) -> torch_dist -> Megatron(A) -> HF -> Megatron-FSDP
                                  -> fsdp_dtensor (model only, the conversion recipe) -> fresh Megatron-FSDP -> HF
    fsdp_dtensor/to-torch_dist    HF -> Megatron-FSDP(A) -> fsdp_dtensor -> fresh Megatron-FSDP(A) -> HF -> Megatron(A)
                                  -> torch_dist -> Megatron(A) -> HF
    fsdp_dtensor/checkpoint-inspector  HF -> Megatron(A) -> torch_dist -> Megatron-LM's checkpoint_inspector.py
                                  -> fsdp_dtensor -> fresh Megatron-FSDP(A) -> HF (needs a Megatron-LM tree)
    fsdp_dtensor/key-contract     the imported SwiGLU / GDN fsdp_dtensor handlers resolve every key to
                                  its own parameter (CPU too: harness.checks.key_contract)
    hf/config-export              HF config -> provider -> HF config from the provider alone (no
                                  model built: harness.checks.config_export)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from harness.checks import config_export, generation, load_coverage, logits, provider_parity, tensors
from harness.conversion import bridge_calls, forward
from harness.formats import hf as hf_format
from harness.matrix import checkpoint_builder
from harness.matrix.cases import Case
from harness.matrix.layouts import Layout
from harness.matrix.model_spec import ModelSpec
from harness.results import CheckResult
from harness.matrix import lanes
from harness.runtimes.base import Runtime


@dataclass
class Hooks:
    """Points where a test may inject a fault into a real run (all optional)."""

    after_export: Callable[[bridge_calls.Export], None] | None = None
    before_forward: Callable[[bridge_calls.MegatronModel], None] | None = None
    after_hf_save: Callable[[Path], None] | None = None  # the exported HF folder, before reloading


@dataclass
class Context:
    """What a route needs besides the case: the lane's runtime, hooks and a scratch folder.
    Routes fill ``fingerprint`` (rank 0) with what golden/ pins: per-format tensor digests."""

    runtime: Runtime
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


def materialize_model(spec: ModelSpec) -> Path:
    """Rank 0 builds the tiny checkpoint (once, cached); the others wait for it."""
    if rank() == 0:
        checkpoint_builder.materialize(spec)
    barrier()
    return checkpoint_builder.materialize(spec)  # already built: returns the path


def gather_logits(local: torch.Tensor | None) -> torch.Tensor:
    """The logits live on the last pipeline stage; bring one copy to every rank."""
    if world() == 1:
        assert local is not None, "single rank produced no logits"
        return local
    gathered: list[torch.Tensor | None] = [None] * world()
    dist.all_gather_object(gathered, local)
    return next(t for t in gathered if t is not None)


# ------------------------------------------------------------------------------- shared steps


def import_hf(case: Case, ctx: Context, layout: Layout) -> tuple[Path, bridge_calls.MegatronModel, list[CheckResult]]:
    """HF -> Megatron at ``layout`` with load coverage checked (and the provider against TP1)."""
    hf_dir = materialize_model(case.model)
    bridge = bridge_calls.open_bridge(hf_dir)
    model = bridge_calls.build_model(bridge, case.model, layout, ctx.runtime)
    bridge_calls.load_hf(model)
    results = [load_coverage.merge_over_ranks(load_coverage.check_fully_loaded(model.named_parameters()))]
    return hf_dir, model, results + provider_vs_tp1(case, model, ctx)


def provider_vs_tp1(case: Case, model: bridge_calls.MegatronModel, ctx: Context) -> list[CheckResult]:
    """The provider at a parallel layout must be the TP1 provider but for parallelism: checks
    that cannot run at this layout (a forward pass, say) then still vouch for it at TP1."""
    if rank() != 0 or not model.layout.splits_model:
        return []
    reference = bridge_calls.make_provider(model.bridge, case.model, Layout(), ctx.runtime)
    return [provider_parity.compare(provider_parity.snapshot(reference), provider_parity.snapshot(model.provider),
                                    layout=model.layout.id)]


REPEATED_EXPORT = "export-repeatable"


def export_and_compare(case: Case, model: bridge_calls.MegatronModel, hf_dir: Path, ctx: Context) -> list[CheckResult]:
    """Megatron -> HF, then bitwise against the source safetensors (streamed), plus the tie; then
    a second export, which must be bitwise the first: a mapping that changes a live weight in place
    while exporting passes one export (issue 21: repeated export)."""
    exported = bridge_calls.export_hf(model, keep=rank() == 0)
    if ctx.hooks.after_export:
        ctx.hooks.after_export(exported)
    again = bridge_calls.export_hf(model, keep=rank() == 0)
    if rank() != 0:
        return []
    ctx.fingerprint["hf-export"] = tensors.fingerprint(exported.tensors.items())
    return [
        tensors.compare_tensors(hf_format.iter_tensors(hf_dir), exported.tensors, duplicates=exported.duplicates,
                                widening_ok=case.model.bf16),
        tensors.tied_embeddings(case.model.tied_embeddings, model.shares_embeddings, exported.tensors),
        tensors.compare_tensors(exported.tensors, again.tensors, name=REPEATED_EXPORT, duplicates=again.duplicates),
    ]


def logits_vs_hf(case: Case, model: bridge_calls.MegatronModel, hf_dir: Path, ctx: Context) -> list[CheckResult]:
    name = "logits-hf-vs-megatron"
    blocker = lanes.forward_blocker(case.model, model.layout, ctx.runtime.lane)
    if blocker:
        return [CheckResult.skip(name, f"no Megatron forward on the {ctx.runtime.lane} lane: {blocker}")] if rank() == 0 else []
    if ctx.hooks.before_forward:
        ctx.hooks.before_forward(model)
    vocab = case.model.hf_config["vocab_size"]
    batch = forward.fixed_batch(vocab)
    megatron = gather_logits(forward.megatron_logits(model.chunks, batch, vocab, ctx.runtime.device))
    if rank() != 0:
        return []
    try:
        reference = forward.hf_logits(hf_dir, batch)
    except Exception as err:  # noqa: BLE001 - transformers' own model on the source checkpoint
        return [reference_raised(name, err)]
    tolerance = logits.logit_tolerance(case.model, ctx.runtime.lane)
    result = logits.logit_parity(reference, megatron, name=name, tolerance=tolerance)
    ctx.fingerprint["logits"] = result.metrics
    return [result]


def fingerprint_saved(ctx: Context, fmt: str, folder: Path) -> None:
    """Digest every canonical tensor of a checkpoint this case wrote (rank 0, streamed). A
    checkpoint that does not read back gets no digest; the check that reads it says why."""
    if rank() != 0:
        return
    from harness.errors import InputError
    from harness.formats import dcp
    from harness.formats.detect import open_checkpoint

    try:
        ckpt = open_checkpoint(dcp.newest_complete_iter(folder) or folder)
    except InputError:
        return
    ctx.fingerprint[fmt] = tensors.fingerprint(ckpt.tensors(list(ckpt.specs())))


def generation_vs_original(case: Case, model: bridge_calls.MegatronModel, hf_dir: Path, ctx: Context) -> list[CheckResult]:
    """save_hf_pretrained to disk, reload it with from_pretrained (config.json + tokenizer too),
    greedy-decode, compare with the original checkpoint's tokens."""
    out = shared_dir(ctx, "hf_export")
    try:
        model.bridge.save_hf_pretrained(model.chunks, str(out), show_progress=False)
        saved = None
    except Exception as err:  # noqa: BLE001 - e.g. a strict save refusing an incomplete export
        if world() > 1:
            # Only the rank that checks the save raises, after its peers left the save's last
            # collective: the ranks are out of step, and a barrier here would pair with the wrong
            # call and hang the next case. The case errors instead and the group is restarted.
            raise
        saved = f"save_hf_pretrained failed: {_one_line(err)}"
    barrier()
    if rank() != 0:
        return []
    if saved is not None:
        return [CheckResult("generation", False, saved)]
    if ctx.hooks.after_hf_save:
        ctx.hooks.after_hf_save(out)
    from harness.matrix.tokenizer import PROMPTS

    prompts = PROMPTS[case.family.tokenizer]
    try:
        reference = forward.greedy_tokens(hf_dir, prompts)
    except Exception as err:  # noqa: BLE001 - transformers' own model on the source checkpoint
        return [reference_raised("generation", err)]
    try:
        exported = forward.greedy_tokens(out, prompts)
    except Exception as err:  # noqa: BLE001 - an export that does not reload is a failed check
        return [CheckResult("generation", False, f"the exported checkpoint does not reload: {_one_line(err)}")]
    return [generation.generation_parity(reference, exported)]


def reference_raised(name: str, err: BaseException) -> CheckResult:
    """The check ``name`` fails, unable to judge: transformers' own model raised on the *source*
    checkpoint (the zoo's, never a conversion's output), e.g. DeepSeek-V2's group-limited routing in
    transformers 5.12.1. A failed check, not a case error: an error would discard the weight checks
    already made, and a conversion bug in that family could never show (harness mutants found it)."""
    return CheckResult(name, False, f"the HF reference forward raised, nothing to compare with: {_one_line(err)}")


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


def through_torch_dist(model: bridge_calls.MegatronModel, layout: Layout, ctx: Context) -> bridge_calls.MegatronModel:
    """save_megatron_model (torch_dist), fingerprint it, load_megatron_model at ``layout``."""
    ckpt = shared_dir(ctx, "torch_dist")
    bridge_calls.save_torch_dist(model, ckpt)
    fingerprint_saved(ctx, "torch_dist", ckpt)
    return bridge_calls.load_torch_dist(model.bridge, ckpt, layout, ctx.runtime)


def torch_dist_roundtrip(case: Case, ctx: Context) -> list[CheckResult]:
    """Save at the case layout, load at ``load_layout`` (the same one unless resharding)."""
    hf_dir, model, results = import_hf(case, ctx, case.layout)
    loaded = through_torch_dist(model, case.load_layout or case.layout, ctx)
    del model
    results += export_and_compare(case, loaded, hf_dir, ctx)
    results += logits_vs_hf(case, loaded, hf_dir, ctx)
    results += generation_vs_original(case, loaded, hf_dir, ctx)
    return results


def _through_fsdp_dtensor(case: Case, ctx: Context, hf_dir: Path, bridge, *, training: bool
                          ) -> tuple[list[CheckResult], bridge_calls.MegatronModel]:
    """HF -> Megatron-FSDP -> fsdp_dtensor (audited) -> fresh Megatron-FSDP (strict load), which
    it returns with the checks so far.

    ``training``: a training checkpoint (the bridge's ``save_checkpoint``, with a real
    DistributedOptimizer given known states, reloaded into a fresh optimizer too); otherwise the
    conversion recipe's model-only ``save_megatron_model``.
    """
    from harness.checks import optimizer_state
    from harness.conversion import megatron_fsdp

    model = megatron_fsdp.build_fsdp_model(bridge, case.model, case.layout, ctx.runtime)
    bridge_calls.fill_sentinel(model)
    bridge_calls.load_hf(model, hf_dir)
    results = [load_coverage.merge_over_ranks(load_coverage.check_fully_loaded(model.named_parameters()))]
    results += provider_vs_tp1(case, model, ctx)
    saved = shared_dir(ctx, "fsdp_dtensor")
    if training:
        optimizer = megatron_fsdp.build_optimizer(model)
        optimizer_state.set_known_states(optimizer)
        megatron_fsdp.save_training_checkpoint(model, optimizer, saved)
        del optimizer
    else:
        megatron_fsdp.save_fsdp_dtensor(model, saved)
    if rank() == 0:
        results += megatron_fsdp.audit_saved(saved, case.model, model.provider)
    fingerprint_saved(ctx, "fsdp_dtensor", saved)
    del model
    loaded, optimizer = megatron_fsdp.reload_fresh(bridge, case.model, case.load_layout or case.layout, ctx.runtime,
                                                   saved, with_optimizer=training)
    results.append(load_coverage.merge_over_ranks(load_coverage.check_fully_loaded(loaded.named_parameters(), name="reload-coverage")))
    if optimizer is not None:
        results.append(load_coverage.merge_over_ranks(optimizer_state.check_in_memory(optimizer, optimizer._param_name)))
    return results, loaded


def _fsdp_save_reload(case: Case, ctx: Context, hf_dir: Path, bridge, *, training: bool) -> list[CheckResult]:
    """``_through_fsdp_dtensor``, then the reloaded model's HF export and logits."""
    results, loaded = _through_fsdp_dtensor(case, ctx, hf_dir, bridge, training=training)
    results += export_and_compare(case, loaded, hf_dir, ctx)
    results += logits_vs_hf(case, loaded, hf_dir, ctx)
    return results


def _hf_folder_of(model: bridge_calls.MegatronModel, ctx: Context, name: str) -> Path:
    """``save_hf_pretrained`` of a model into a scratch folder every rank agrees on."""
    out = shared_dir(ctx, name)
    model.bridge.save_hf_pretrained(model.chunks, str(out), show_progress=False)
    barrier()
    return out


def _same_as_source(hf_dir: Path, via: Path, name: str) -> list[CheckResult]:
    """An intermediate HF export the next leg starts from must itself equal the source (rank 0)."""
    if rank() != 0:
        return []
    return [tensors.compare_tensors(hf_format.iter_tensors(hf_dir), dict(hf_format.iter_tensors(via)), name=name,
                                    widening_ok=True)]


def fsdp_dtensor_roundtrip(case: Case, ctx: Context) -> list[CheckResult]:
    hf_dir = materialize_model(case.model)
    return _fsdp_save_reload(case, ctx, hf_dir, bridge_calls.open_bridge(hf_dir), training=True)


def fsdp_dtensor_from_torch_dist(case: Case, ctx: Context) -> list[CheckResult]:
    """torch_dist first (plain Megatron), then its export goes through the fsdp_dtensor leg."""
    hf_dir, model, results = import_hf(case, ctx, case.layout)
    loaded = through_torch_dist(model, case.layout, ctx)
    bridge = loaded.bridge
    del model
    via = _hf_folder_of(loaded, ctx, "hf_from_torch_dist")
    del loaded
    results += _fsdp_save_reload(case, ctx, via, bridge, training=False)
    # The checks above compare against `via`; it must itself equal the original HF checkpoint.
    return results + _same_as_source(hf_dir, via, "torch_dist-export")


def fsdp_dtensor_to_torch_dist(case: Case, ctx: Context) -> list[CheckResult]:
    """An fsdp_dtensor checkpoint (the conversion recipe's) to torch_dist, through the bridge:
    strict reload into Megatron-FSDP, its HF export imported into plain Megatron, torch_dist
    saved and loaded there, exported, and compared with the source."""
    hf_dir = materialize_model(case.model)
    bridge = bridge_calls.open_bridge(hf_dir)
    results, loaded = _through_fsdp_dtensor(case, ctx, hf_dir, bridge, training=False)
    via = _hf_folder_of(loaded, ctx, "hf_from_fsdp_dtensor")
    del loaded
    model = bridge_calls.build_model(bridge, case.model, case.layout, ctx.runtime)
    bridge_calls.load_hf(model, via)
    results.append(load_coverage.merge_over_ranks(load_coverage.check_fully_loaded(model.named_parameters(),
                                                                         name="torch_dist-load-coverage")))
    torch_dist = through_torch_dist(model, case.layout, ctx)
    del model
    results += export_and_compare(case, torch_dist, hf_dir, ctx)
    results += logits_vs_hf(case, torch_dist, hf_dir, ctx)
    return results + _same_as_source(hf_dir, via, "fsdp_dtensor-export")


def fsdp_dtensor_checkpoint_inspector(case: Case, ctx: Context) -> list[CheckResult]:
    """Megatron-LM's own converter (tools/checkpoint/checkpoint_inspector.py
    convert-torch-dist-to-fsdp-dtensor, from the source tree in use) on a torch_dist checkpoint
    the bridge wrote; its output audited, compared with the source tensor by tensor in canonical
    space, strictly loaded into Megatron-FSDP, exported and compared with the HF source."""
    from harness.checks import checkpoint_diff
    from harness.conversion import checkpoint_inspector, megatron_fsdp
    from harness.formats import dcp
    from harness.formats.megatron import FsdpDtensorCheckpoint, TorchDistCheckpoint

    hf_dir, model, results = import_hf(case, ctx, case.layout)
    bridge, provider = model.bridge, model.provider
    source = shared_dir(ctx, "torch_dist")
    bridge_calls.save_torch_dist(model, source)
    del model
    converted = shared_dir(ctx, "fsdp_dtensor")
    outcome: list[object] = [None]
    if rank() == 0:
        # The converter writes a bare DCP folder; a user loading it puts it where a training run
        # looks (iter_0000000 and the tracker file), as done here.
        outcome[0] = checkpoint_inspector.convert(ctx.runtime.lane, dcp.newest_complete_iter(source),
                                                  converted / "iter_0000000", world_size=world(),
                                                  swiglu=megatron_fsdp.is_swiglu(provider))
        (converted / "latest_checkpointed_iteration.txt").write_text("0")
    if world() > 1:
        dist.broadcast_object_list(outcome, src=0)
    conversion: checkpoint_inspector.Conversion = outcome[0]  # type: ignore[assignment]
    if conversion.returncode != 0:
        raise RuntimeError(f"{lanes.CHECKPOINT_INSPECTOR} failed: {conversion.headline}")
    if rank() == 0:
        results += megatron_fsdp.audit_saved(converted, case.model, provider)
        results.append(checkpoint_diff.diff(TorchDistCheckpoint(dcp.newest_complete_iter(source)),
                                            FsdpDtensorCheckpoint(converted / "iter_0000000"), name="converted-vs-source")[0])
    loaded, _ = megatron_fsdp.reload_fresh(bridge, case.model, case.layout, ctx.runtime, converted, with_optimizer=False)
    results.append(load_coverage.merge_over_ranks(load_coverage.check_fully_loaded(loaded.named_parameters(), name="reload-coverage")))
    results += export_and_compare(case, loaded, hf_dir, ctx)
    results += logits_vs_hf(case, loaded, hf_dir, ctx)
    return results


def fsdp_key_contract(case: Case, ctx: Context) -> list[CheckResult]:
    """The wrapped-key contract (harness.checks.key_contract) for this family's fsdp_dtensor handlers."""
    import megatron.core.transformer.fsdp_dtensor_checkpoint as handlers

    from harness.checks import key_contract

    results = []
    blocker = lanes.model_blocker(case.model, ctx.runtime.lane)
    if case.model.gated_mlp and not blocker:
        hf_dir = materialize_model(case.model)
        model = bridge_calls.build_model(bridge_calls.open_bridge(hf_dir), case.model, case.layout, ctx.runtime)
        stack = key_contract.save_path_stack(model.chunks[0], bf16=True)
        results.append(key_contract.check_handler(handlers.handle_swiglu_in_state_dict, stack, name="swiglu-key-contract"))
    elif blocker:
        results.append(CheckResult.skip("swiglu-key-contract", f"the model cannot be built on the {ctx.runtime.lane} lane: {blocker}"))
    if case.model.has_gdn:
        stack = key_contract.gdn_stack_from_config(case.model.hf_config)
        results.append(key_contract.check_handler(handlers.handle_gdn_in_state_dict, stack, name="gdn-key-contract"))
    return results if rank() == 0 else []


def hf_config_export(case: Case, ctx: Context) -> list[CheckResult]:
    """The config a bridge synthesises from the provider alone, field by field against the source
    config (issue 21, class 6)."""
    if rank() != 0:
        return []
    import transformers

    hf_dir = materialize_model(case.model)
    bridge = bridge_calls.open_bridge(hf_dir)
    written, built = bridge_calls.export_config_only(bridge, bridge_calls.bridge_provider(bridge, case.model))
    source = transformers.AutoConfig.from_pretrained(hf_dir).to_dict()
    result = config_export.compare(source, built, written)
    ctx.fingerprint[config_export.NAME] = config_export.fingerprint(result)
    return [result]


ROUTES: dict[str, Callable[[Case, Context], list[CheckResult]]] = {
    "memory/roundtrip": memory_roundtrip,
    "torch_dist/roundtrip": torch_dist_roundtrip,
    "torch_dist/reshard": torch_dist_roundtrip,
    "fsdp_dtensor/roundtrip": fsdp_dtensor_roundtrip,
    "fsdp_dtensor/reshard": fsdp_dtensor_roundtrip,
    "fsdp_dtensor/from-torch_dist": fsdp_dtensor_from_torch_dist,
    "fsdp_dtensor/to-torch_dist": fsdp_dtensor_to_torch_dist,
    "fsdp_dtensor/checkpoint-inspector": fsdp_dtensor_checkpoint_inspector,
    "fsdp_dtensor/key-contract": fsdp_key_contract,
    "hf/config-export": hf_config_export,
}
