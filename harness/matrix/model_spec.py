"""What a model is (``ModelSpec``: a family, a variant, overrides, a seed) and the facts the
harness reads off its HF config (experts, MLA, Mamba, GDN, ...), each decided in one place.

Torch-free except ``hf_config_object``, which imports transformers.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Mapping

from harness.matrix.family_registry import Family, Variant, get_family

DEFAULT_SEED = 1234

# Megatron model classes of hybrid Mamba architectures (bridge_registry's ``target``).
MAMBA_TARGETS = ("HybridModel", "MambaModel", "FalconH1Model")


@dataclass(frozen=True)
class ModelSpec:
    """A family plus per-case overrides and a seed: everything that determines the weights."""

    family: str
    variant: str = ""
    overrides: tuple[tuple[str, Any], ...] = ()
    seed: int = DEFAULT_SEED

    def __hash__(self) -> int:  # override values may be dicts (e.g. rope_parameters)
        return hash((self.family, self.variant, json.dumps(self.overrides, sort_keys=True, default=str), self.seed))

    @property
    def id(self) -> str:
        return f"{self.family}@{self.variant}" if self.variant else self.family

    def to_dict(self) -> dict[str, Any]:
        """As JSON data (override values are YAML scalars, lists and mappings)."""
        return {"family": self.family, "variant": self.variant, "overrides": [[k, v] for k, v in self.overrides],
                "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """The inverse of ``to_dict``; looks nothing up (no family is loaded)."""
        return cls(family=data["family"], variant=data.get("variant", ""),
                   overrides=tuple((k, v) for k, v in data.get("overrides", ())), seed=data.get("seed", DEFAULT_SEED))

    def _variant(self) -> Variant:
        family = get_family(self.family)
        if not self.variant or (self.overrides and self.variant not in family.variants):
            return Variant()  # plain family, or a case-file variant (its fields are `overrides`)
        if self.variant not in family.variants:
            raise KeyError(f"family {self.family!r} has no variant {self.variant!r} (has: {sorted(family.variants)})")
        return family.variants[self.variant]

    @property
    def hf_config(self) -> dict[str, Any]:
        cfg = dict(get_family(self.family).config)
        cfg.update(self._variant().hf)
        cfg.update(dict(self.overrides))
        return cfg

    @property
    def provider_overrides(self) -> dict[str, Any]:
        """Megatron provider fields this model needs on every lane (family, then variant)."""
        return {**get_family(self.family).provider, **self._variant().provider}

    @property
    def checkpoint_extras(self) -> dict[str, Any]:
        """What the HF files carry beyond transformers' own save (``family_registry.CHECKPOINT_EXTRAS``)."""
        return dict(self._variant().checkpoint)

    @property
    def vocab_padded(self) -> bool:
        return bool(self.provider_overrides.get("should_pad_vocab", False))

    # -- model facts, read from the config in one place --------------------------------------

    @property
    def family_def(self) -> "Family":
        return get_family(self.family)

    def setting(self, name: str, default: Any = None) -> Any:
        """An HF config value of this model: the tiny config's, else the config class's default."""
        from harness.matrix.hf_source import config_defaults

        cfg = self.hf_config
        if name in cfg:
            return cfg[name]
        return config_defaults(self.family_def.hf_config_class).get(name, default)

    @property
    def num_experts(self) -> int:
        return config_num_experts(self.hf_config)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def has_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek V2/V3, GLM-4.7-Flash, GLM-5): low-rank q/kv."""
        return "kv_lora_rank" in self.hf_config

    @property
    def has_mamba(self) -> bool:
        """Mamba (SSM) layers (Nemotron-H, Falcon-H1): Megatron builds them from mamba-ssm."""
        return self.family_def.architecture.target in MAMBA_TARGETS

    @property
    def has_gdn(self) -> bool:
        """Gated DeltaNet layers (Qwen3-Next): their fsdp_dtensor projections are split in parts."""
        return config_has_gdn(self.hf_config)

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU MLPs: fc1 holds [gate; up], which fsdp_dtensor stores as ``_w`` / ``_v``."""
        return (self.setting("hidden_act") or self.setting("hidden_activation")) == "silu"

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.setting("tie_word_embeddings", False))

    @property
    def local_spec(self) -> bool:
        """Megatron builds megatron-core's local (non-TE) layer spec (a ``@local`` variant); otherwise
        the TE layer spec, as users run it."""
        return self.provider_overrides.get("transformer_impl") == "local"

    @property
    def bf16(self) -> bool:
        """Megatron runs this model in bf16 (a ``@bf16`` variant); otherwise fp32."""
        return bool(self.provider_overrides.get("bf16", False))

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``family`` or ``family@variant``."""
        family, _, variant = text.partition("@")
        get_family(family)
        spec = cls(family=family, variant=variant)
        spec.hf_config  # validates the variant
        return spec


def config_num_experts(cfg: Mapping[str, Any]) -> int:
    """Routed experts of an HF config dict (0 for a dense model); each family names the field its own way."""
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
               or cfg.get("moe_num_experts") or 0)


def config_has_gdn(cfg: Mapping[str, Any]) -> bool:
    """Gated DeltaNet (linear attention) layers in an HF config dict (Qwen3-Next, Qwen3.5): the one
    place that decides it (the layout audit and the fsdp_dtensor writer ask here too)."""
    return "linear_num_key_heads" in cfg


def validate_overrides(spec: ModelSpec) -> None:
    """Raise ValueError naming the field, for an unknown field or a value the harness's shape
    rules reject. Torch-free (field names come from the config class's source); the config class
    itself judges the values when the checkpoint is built (``checkpoint_builder.build``)."""
    from harness.matrix.hf_source import config_fields

    family = get_family(spec.family)
    known = config_fields(family.hf_config_class) | set(family.config)
    for key, _ in spec.overrides:
        if key not in known:
            raise ValueError(f"{key}: not a field of {family.hf_config_class}")
    cfg = dict(spec.hf_config)
    cfg.pop("dtype", None)
    for key, value in spec.overrides:
        if key.endswith(("_size", "_heads", "_layers", "head_dim", "num_experts", "_per_tok")) and (
            not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{key}: {value!r} must be a positive integer")
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ValueError(f"num_key_value_heads: {kv} does not divide num_attention_heads {heads}")
    experts = config_num_experts(cfg)
    if experts and cfg.get("num_experts_per_tok", 1) > experts:
        raise ValueError(f"num_experts_per_tok: {cfg['num_experts_per_tok']} exceeds the {experts} experts")
    if cfg.get("vocab_size", 5) <= 4:
        raise ValueError(f"vocab_size: {cfg['vocab_size']} leaves no room for ordinary tokens")


def hf_config_object(spec: ModelSpec):
    """The transformers config of ``spec`` (imports transformers); a value the config class
    rejects is a ValueError naming the model."""
    import transformers

    family = get_family(spec.family)
    config_cls = getattr(transformers, family.hf_config_class)
    cfg = copy.deepcopy(spec.hf_config)  # transformers rewrites rope_parameters in place
    cfg.pop("dtype", None)
    try:
        config = config_cls(**cfg)
    except Exception as err:  # noqa: BLE001 - whatever the config class rejects
        raise ValueError(f"{spec.id}: {family.hf_config_class} rejects it: {err}") from None
    config.architectures = [family.hf_architecture]
    return config
