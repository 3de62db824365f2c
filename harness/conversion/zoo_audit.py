"""Does the zoo exercise every config mapping of the bridge? (imports megatron.bridge: tests only)

A tiny config value equal to the default Megatron would fall back to, if the bridge dropped the
mapping, makes that mapping untestable: ``rms_norm_eps`` 1e-5 in HF and ``layernorm_epsilon``
1e-5 by default in Megatron means a bridge that stopped mapping eps passes every case. The mapped
fields come from the bridge's own tables (``CONFIG_MAPPING``, the ``rope_theta`` fallback of
``hf_config_to_provider_kwargs`` for transformers-5 ``rope_parameters``, and
``YARN_ROPE_SCALING_MAPPING`` for YaRN RoPE; megatron/bridge/models/conversion/model_bridge.py),
the defaults from the bridge's provider dataclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from harness.matrix.model_spec import ModelSpec

# Mapped fields no check can observe, whatever their value: weights are loaded, never drawn
# from the initialiser; dropout is off in eval mode; auxiliary losses exist only in training.
UNOBSERVABLE: dict[str, str] = {
    "initializer_range": "weights are loaded, never initialised from it",
    "attention_dropout": "dropout is off in the eval-mode forward",
    "hidden_dropout": "dropout is off in the eval-mode forward",
    "aux_loss_alpha": "auxiliary loss: training only",
    "router_aux_loss_coef": "auxiliary loss: training only",
}
# Architecture switches (bias or not, tied or not): one family cannot hold both values, so the
# zoo must hold the other value in another family (computed across the zoo, see below).
ARCHITECTURE_FLAGS = ("attention_bias", "mlp_bias", "tie_word_embeddings", "use_qk_norm")


@dataclass(frozen=True)
class MappedField:
    model: str  # ModelSpec.id
    hf_name: str
    megatron_name: str
    value: Any
    default: Any

    @property
    def at_default(self) -> bool:
        return self.value == self.default


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def mapped_fields(spec: ModelSpec, hf_dir) -> list[MappedField]:
    """Every HF config field of ``spec`` that its bridge maps into a provider field, with the
    zoo's value and the provider's default."""
    from harness.conversion.bridge_calls import open_bridge

    bridge = open_bridge(hf_dir)
    model_bridge = bridge._model_bridge
    provider_cls = type(model_bridge).PROVIDER_CLASS
    if provider_cls is None:
        from megatron.bridge.models.gpt_provider import GPTModelProvider as provider_cls
    fields = {f.name: f for f in dataclasses.fields(provider_cls)}
    config = bridge.hf_pretrained.config
    pairs = [(getattr(config, hf), hf, meg) for hf, meg in type(model_bridge).CONFIG_MAPPING if hasattr(config, hf)]
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "rope_theta" in rope and not any(meg == "rotary_base" for _, _, meg in pairs):
        pairs.append((rope["rope_theta"], "rope_parameters.rope_theta", "rotary_base"))  # rope_theta_from_hf
    if rope.get("rope_type") == "yarn":
        pairs += [(rope[key], f"rope_parameters.{key}", meg)
                  for key, meg in type(model_bridge).YARN_ROPE_SCALING_MAPPING if key in rope]
    out = []
    for value, hf_name, meg in pairs:
        if meg in fields and _default(fields[meg]) is not dataclasses.MISSING:
            out.append(MappedField(spec.id, hf_name, meg, value, _default(fields[meg])))
    return out


def untestable(all_fields: list[MappedField]) -> list[str]:
    """Mapped fields held at the provider default, that no exemption covers: each one a mapping
    the zoo cannot test. ``all_fields`` spans the zoo, so an architecture flag at its default in
    one family is fine when another family holds the other value."""
    flipped = {(f.hf_name, f.megatron_name) for f in all_fields if not f.at_default}
    problems = []
    for f in all_fields:
        if not f.at_default or f.hf_name in UNOBSERVABLE:
            continue
        if f.hf_name in ARCHITECTURE_FLAGS and (f.hf_name, f.megatron_name) in flipped:
            continue
        problems.append(f"{f.model}: {f.hf_name}={f.value!r} equals the default of {f.megatron_name}; "
                        f"a bridge that dropped this mapping would pass")
    return problems
