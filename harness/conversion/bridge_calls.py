"""Conversion steps through the real Megatron-Bridge API, one function per step.

The harness never re-implements a mapping: HF -> Megatron is ``AutoBridge.load_hf_weights`` and
Megatron -> HF is ``AutoBridge.export_hf_weights``, exactly what users call. What the harness adds
is a *sentinel* fill before loading: every Megatron parameter starts as NaN, so a parameter the
loader silently skipped cannot masquerade as loaded (``harness.checks.load_coverage`` looks for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from harness.matrix.layouts import Layout
from harness.matrix.model_spec import ModelSpec
from harness.runtimes.base import Runtime

SENTINEL = float("nan")


@dataclass
class MegatronModel:
    """A built Megatron model (one chunk per virtual pipeline stage) and the bridge that made it."""

    bridge: Any  # megatron.bridge.AutoBridge
    chunks: list[torch.nn.Module]
    layout: Layout
    provider: Any = None  # the finalized provider that built it (None: built by load_megatron_model)

    @property
    def shares_embeddings(self) -> bool:
        return bool(unwrap(self.chunks[0]).share_embeddings_and_output_weights)

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for i, chunk in enumerate(self.chunks):
            prefix = f"chunk{i}." if len(self.chunks) > 1 else ""
            for name, param in chunk.named_parameters():
                yield prefix + name, param


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip wrapper modules (Float16Module, DDP, FSDP) down to the GPTModel."""
    while hasattr(module, "module"):
        module = module.module
    return module


def open_bridge(hf_dir: Path):
    """The bridge for a checkpoint, loading its weights in the dtype they are stored in."""
    import json

    from megatron.bridge import AutoBridge

    stored = json.loads((Path(hf_dir) / "config.json").read_text()).get("dtype") or "float32"
    return AutoBridge.from_hf_pretrained(str(hf_dir), torch_dtype=getattr(torch, stored))


def make_provider(bridge, spec: ModelSpec, layout: Layout, runtime: Runtime):
    """The bridge's provider for ``spec`` at ``layout``, adjusted by the lane, finalized."""
    provider = bridge.to_megatron_provider(load_weights=False)
    for key, value in layout.provider_kwargs().items():
        setattr(provider, key, value)
    # Megatron refuses MoE + TP without sequence parallelism (moe_layer.py raises in forward).
    provider.sequence_parallel = layout.tp > 1 and spec.is_moe
    _apply_variant(provider, spec)
    runtime.configure_provider(provider, spec)
    provider.finalize()
    return provider


def _apply_variant(provider, spec: ModelSpec) -> None:
    for key, value in spec.provider_overrides.items():
        if key.endswith("_dtype") and isinstance(value, str):
            value = getattr(torch, value)  # zoo variants name dtypes as strings
        setattr(provider, key, value)


def bridge_provider(bridge, spec: ModelSpec):
    """The provider as the bridge makes it for ``spec`` (its variant applied), finalized, with no
    lane setting: what a user's Megatron checkpoint records. The lane's dtype and kernel choices
    (``Runtime.configure_provider``) are how the harness runs a model, not what is converted."""
    provider = bridge.to_megatron_provider(load_weights=False)
    _apply_variant(provider, spec)
    provider.finalize()
    return provider


def export_config_only(bridge, provider) -> tuple[dict[str, Any], dict[str, Any]]:
    """The HF config the bridge writes from ``provider`` alone: (the dict ``megatron_to_hf_config``
    returns, that dict built by the model's HF config class, as a dict).

    Steps 2-3 of ``AutoBridge.from_auto_config`` (megatron/bridge/models/conversion/auto_bridge.py),
    without its ``conform_config_to_reference``: that fills every field the bridge dropped from a
    reference config, which a pruned or resized model does not have right.
    """
    from megatron.bridge.models.conversion.auto_bridge import _drop_readonly_config_properties

    config_cls = type(bridge.hf_pretrained.config)
    written = type(bridge._model_bridge).megatron_to_hf_config(provider)
    built = config_cls(**_drop_readonly_config_properties(dict(written), config_cls))
    return written, built.to_dict()


def build_model(bridge, spec: ModelSpec, layout: Layout, runtime: Runtime) -> MegatronModel:
    """An empty (sentinel-filled) Megatron model at ``layout``; parallel state is (re)initialised."""
    runtime.init_model_parallel(layout)
    provider = make_provider(bridge, spec, layout, runtime)
    chunks = provider.provide_distributed_model(
        wrap_with_ddp=False,
        use_cpu_initialization=runtime.use_cpu_initialization,
        mixed_precision_wrapper=None,
    )
    model = MegatronModel(bridge=bridge, chunks=list(chunks), layout=layout, provider=provider)
    fill_sentinel(model)
    return model


def fill_sentinel(model: MegatronModel) -> None:
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.fill_(SENTINEL)


def load_hf(model: MegatronModel, hf_dir: Path | None = None) -> None:
    model.bridge.load_hf_weights(model.chunks, hf_path=str(hf_dir) if hf_dir else None)


@dataclass
class Export:
    """What ``export_hf_weights`` yielded. A name yielded twice is a bug (e.g. every expert
    overwriting one fused tensor), so duplicates are kept for the tensor check to report."""

    tensors: dict[str, torch.Tensor]
    duplicates: list[str]


def export_hf(model: MegatronModel, keep: bool = True) -> Export:
    """All exported HF tensors (full, gathered). Collective: every rank must call it.

    Ranks that do not compare (``keep=False``) still drive the generator so the gathers inside
    it line up, but drop each tensor immediately to keep memory flat.
    """
    out = Export(tensors={}, duplicates=[])
    for name, tensor in model.bridge.export_hf_weights(model.chunks, cpu=True, show_progress=False):
        if keep:
            if name in out.tensors:
                out.duplicates.append(name)
            out.tensors[name] = tensor.detach().clone()
    return out


def save_torch_dist(model: MegatronModel, path: Path) -> None:
    """``AutoBridge.save_megatron_model``: always the torch_dist format, no optimizer state."""
    model.bridge.save_megatron_model(model.chunks, str(path))


def load_torch_dist(bridge, path: Path, layout: Layout, runtime: Runtime) -> MegatronModel:
    """``AutoBridge.load_megatron_model`` at ``layout`` (resharding if it differs from the save).

    The process group already exists, so the bridge skips its temporary one and builds the model
    on the current Megatron parallel state: initialise it for ``layout`` first, and pass the same
    sizes as ``mp_overrides`` (the bridge resets parallel sizes to 1 before applying them).
    """
    runtime.init_model_parallel(layout)
    overrides = {**{k: v for k, v in layout.megatron_kwargs().items() if v is not None}, **layout.pipeline_split_kwargs()}
    chunks = bridge.load_megatron_model(str(path), mp_overrides=overrides)
    return MegatronModel(bridge=bridge, chunks=list(chunks), layout=layout)
