"""The model families the harness builds tiny: one per text-LM architecture of the Bridge in use.

The families come from ``bridge_registry`` (not a hand-typed list), shrunk by ``shrink``'s rules;
``families.yaml`` holds only the exceptions: a family's name, config overrides, provider settings,
variants and the parallel dimensions its bridge refuses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from harness.errors import InputError, load_yaml
from harness.matrix import bridge_registry
from harness.matrix.bridge_registry import RegisteredArchitecture


@dataclass(frozen=True)
class Variant:
    """A named deviation from a family's tiny model: HF config fields and/or Megatron provider
    fields (e.g. ``should_pad_vocab``, which changes the Megatron layout but not the HF side)."""

    hf: Mapping[str, Any] = field(default_factory=dict)
    provider: Mapping[str, Any] = field(default_factory=dict)
    # How the HF files are written beyond what transformers saves (CHECKPOINT_EXTRAS): formats
    # real checkpoints still carry, for code in the bridge that only they reach.
    checkpoint: Mapping[str, Any] = field(default_factory=dict)


# Variant ``checkpoint:`` keys, each written by harness.matrix.checkpoint_builder.
CHECKPOINT_EXTRAS = {
    # Per-layer ``model.layers.<i>.self_attn.rotary_emb.inv_freq`` buffers, as checkpoints saved by
    # transformers before 4.31 carry them (persistent buffers then). llama_bridge.py's
    # maybe_modify_converted_hf_weight copies them into the export; only such a checkpoint runs it.
    "legacy_inv_freq",
    # ``lm_head.weight`` written beside ``model.embed_tokens.weight`` (the same values) in a model
    # with tied embeddings, as checkpoints saved by other tools carry both. model_bridge.py's
    # stream_weights_megatron_to_hf then emits the output weight too (emit_output_weight, a clone
    # of the embedding); a checkpoint without it never runs that branch.
    "stored_tied_lm_head",
}


@dataclass(frozen=True)
class Family:
    """A registered architecture the harness builds tiny: the shrink rules plus its entry in
    ``families.yaml``.

    ``provider`` holds Megatron provider settings the family needs on *every* lane (e.g. a MoE
    dispatcher choice); lane-specific settings live in the runtimes (``harness.runtimes``), and
    why a family cannot run on a lane in ``harness.matrix.lanes``.
    """

    name: str
    architecture: RegisteredArchitecture
    config: Mapping[str, Any]  # the tiny HF config (rules, then the family's overrides)
    description: str = ""
    provider: Mapping[str, Any] = field(default_factory=dict)
    # Named variants, addressed as "<family>@<variant>" in case files and IDs.
    variants: Mapping[str, Variant] = field(default_factory=dict)
    tokenizer: str = "wordlevel"  # harness.matrix.tokenizer.KINDS: the kind the family's tokenizer class reads
    # DeepSeek-style multi-token-prediction weights the checkpoint builder writes itself
    # (``checkpoint_builder._add_mtp_layers``): real checkpoints carry them, transformers neither
    # builds nor saves them.
    writes_mtp_layers: bool = False
    # Parallel dimensions the family's bridge refuses by design: dimension (tp, pp, ep, ...) -> why.
    unsupported_parallelism: Mapping[str, str] = field(default_factory=dict)

    @property
    def hf_architecture(self) -> str:
        """transformers model class name, e.g. ``LlamaForCausalLM``."""
        return self.architecture.architecture

    @property
    def hf_config_class(self) -> str:
        return self.architecture.hf_config_class


FAMILIES_FILE = Path(__file__).with_name("families.yaml")
_ENTRY_FIELDS = {"name", "description", "tokenizer", "config", "extra_config", "provider", "variants",
                 "unsupported_parallelism", "writes_mtp_layers"}


def family_name(arch: RegisteredArchitecture) -> str:
    """The default family ID: the model_type, ``_`` -> ``-``, without a ``-text`` suffix."""
    return arch.model_type.replace("_", "-").removesuffix("-text")


def _variants(doc: Mapping[str, Any] | None) -> dict[str, Variant]:
    for name, v in (doc or {}).items():
        unknown = sorted(set(v.get("checkpoint") or {}) - CHECKPOINT_EXTRAS)
        if unknown:
            raise InputError(f"{FAMILIES_FILE.name}: variant {name}: checkpoint.{unknown[0]}: unknown "
                             f"(known: {', '.join(sorted(CHECKPOINT_EXTRAS))})")
    return {name: Variant(hf=dict(v.get("hf") or {}), provider=dict(v.get("provider") or {}),
                          checkpoint=dict(v.get("checkpoint") or {}))
            for name, v in (doc or {}).items()}


def every_family_variants(path: Path = FAMILIES_FILE) -> dict[str, Variant]:
    """Variants every family has (``families.yaml`` ``every_family_variants``), e.g. ``bf16``."""
    return _variants((load_yaml(path) or {}).get("every_family_variants"))


def family_entries(path: Path = FAMILIES_FILE) -> dict[str, dict[str, Any]]:
    """architecture -> its entry in ``families.yaml`` (schema errors name the file and field)."""
    doc = load_yaml(path) or {}
    entries = doc.get("families") or {}
    for arch, entry in entries.items():
        unknown = sorted(set(entry or {}) - _ENTRY_FIELDS)
        if unknown:
            raise InputError(f"{path.name}: families.{arch}.{unknown[0]}: unknown field "
                             f"(known: {', '.join(sorted(_ENTRY_FIELDS))})")
    return {arch: dict(entry or {}) for arch, entry in entries.items()}


def _family(arch: RegisteredArchitecture, entry: dict[str, Any]) -> Family:
    from harness.matrix import hf_source, shrink

    overrides = {**(entry.get("config") or {}), **(entry.get("extra_config") or {})}
    config = shrink.tiny_config(hf_source.config_fields(arch.hf_config_class),
                                hf_source.config_defaults(arch.hf_config_class), overrides)
    variants = {**every_family_variants(), **_variants(entry.get("variants"))}
    return Family(name=entry.get("name") or family_name(arch), architecture=arch, config=config,
                  description=entry.get("description", ""), provider=dict(entry.get("provider") or {}),
                  variants=variants, tokenizer=entry.get("tokenizer", "wordlevel"),
                  unsupported_parallelism=dict(entry.get("unsupported_parallelism") or {}),
                  writes_mtp_layers=bool(entry.get("writes_mtp_layers", False)))


@functools.lru_cache(maxsize=4)
def _families(bridge_models: Path) -> dict[str, Family]:
    entries = family_entries()
    out: dict[str, Family] = {}
    for arch in bridge_registry.text_lms(bridge_models):
        family = _family(arch, entries.get(arch.architecture, {}))
        if family.name in out:
            raise ValueError(f"family {family.name!r} for both {out[family.name].hf_architecture} and "
                             f"{arch.architecture}: give one a name in {FAMILIES_FILE.name}")
        out[family.name] = family
    return dict(sorted(out.items()))


def families() -> dict[str, Family]:
    """Every text-LM architecture of the Bridge in use, as a family, by name."""
    return _families(bridge_registry.bridge_models_root())


def get_family(name: str) -> Family:
    try:
        return families()[name]
    except KeyError:
        known = ", ".join(families())
        raise KeyError(f"unknown family {name!r} (known: {known})") from None
