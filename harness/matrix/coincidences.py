"""Square-coincidence shape variants, generated from a model's dimensions.

Orientation bugs hide where two different dimensions are equal: a transposed copy of a square
weight keeps its shape, so only the values can tell. The tiny configs are deliberately
non-square (``harness.matrix.shrink``); this module makes, for every weight whose two axes come
from different config fields, the variant where they are equal, for every family that has the
fields (MoE experts, shared experts, MLA and GDN projections included).

A coincidence is generated only where the base config does not already have it (qwen3's
decoupled head_dim gets ``hd-eq``; llama, where heads x head_dim already is hidden, does not) and
only where the variant is a valid model (kv heads must divide the heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from harness.matrix.model_spec import config_num_experts

Config = Mapping[str, Any]


@dataclass(frozen=True)
class Coincidence:
    """Make ``weight`` square: set ``field`` so that ``axis(cfg)`` equals the hidden size."""

    name: str  # the variant name: <family>@<name>
    weight: str  # which weight becomes square (for a reader of the case list)
    field: str
    axis: Callable[[Config], int]  # the dimension that must equal hidden
    value: Callable[[Config], int]  # the value of ``field`` that makes it so

    mla: bool = True  # also for multi-head latent attention (whose q/k/v are not [heads x head_dim, hidden])
    experts: bool = False  # an expert weight: only for a model that has routed experts

    def applies(self, cfg: Config) -> bool:
        if not self.mla and "kv_lora_rank" in cfg:
            return False
        if self.experts and not config_num_experts(cfg):
            return False
        return self.field in cfg and self.axis(cfg) != cfg["hidden_size"] and self.value(cfg) >= 1


def _head_dim(cfg: Config) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


COINCIDENCES: tuple[Coincidence, ...] = (
    Coincidence("sq-ffn", "dense MLP gate/up/down [ffn, hidden]", "intermediate_size",
                lambda c: c["intermediate_size"], lambda c: c["hidden_size"]),
    Coincidence("sq-fc1", "fused [gate; up] fc1 [2 x ffn, hidden]", "intermediate_size",
                lambda c: 2 * c["intermediate_size"], lambda c: c["hidden_size"] // 2),
    Coincidence("sq-expert", "expert gate/up/down [moe_ffn, hidden]", "moe_intermediate_size",
                lambda c: c["moe_intermediate_size"], lambda c: c["hidden_size"], experts=True),
    Coincidence("sq-expert-fc1", "fused expert fc1 [2 x moe_ffn, hidden]", "moe_intermediate_size",
                lambda c: 2 * c["moe_intermediate_size"], lambda c: c["hidden_size"] // 2, experts=True),
    Coincidence("sq-shared", "shared expert [shared_ffn, hidden]", "shared_expert_intermediate_size",
                lambda c: c["shared_expert_intermediate_size"], lambda c: c["hidden_size"], experts=True),
    Coincidence("sq-q", "q / o projections [heads x head_dim, hidden]", "head_dim",
                lambda c: c["num_attention_heads"] * _head_dim(c), lambda c: c["hidden_size"] // c["num_attention_heads"], mla=False),
    Coincidence("sq-kv", "k / v projections [kv_heads x head_dim, hidden]", "num_key_value_heads",
                lambda c: c["num_key_value_heads"] * _head_dim(c), lambda c: c["hidden_size"] // _head_dim(c), mla=False),
    Coincidence("sq-q-lora", "MLA q_a_proj [q_lora_rank, hidden]", "q_lora_rank",
                lambda c: c["q_lora_rank"], lambda c: c["hidden_size"]),
    Coincidence("sq-kv-lora", "MLA kv_b_proj input / kv_a_proj [kv_lora_rank, hidden]", "kv_lora_rank",
                lambda c: c["kv_lora_rank"], lambda c: c["hidden_size"]),
    Coincidence("sq-gdn-k", "GDN key projection [k_heads x k_head_dim, hidden]", "linear_num_key_heads",
                lambda c: c["linear_num_key_heads"] * c["linear_key_head_dim"],
                lambda c: c["hidden_size"] // c["linear_key_head_dim"]),
)


def _valid(cfg: Config) -> bool:
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads and kv and (kv > heads or heads % kv):
        return False
    k, v = cfg.get("linear_num_key_heads"), cfg.get("linear_num_value_heads")
    return not (k and v and (k > v or v % k))


def square_variants(cfg: Config) -> dict[str, dict[str, Any]]:
    """variant name -> overrides, for every coincidence the config ``cfg`` allows and lacks."""
    out = {}
    for c in COINCIDENCES:
        if c.applies(cfg):
            overrides = {c.field: c.value(cfg)}
            if _valid({**cfg, **overrides}) and c.axis({**cfg, **overrides}) == cfg["hidden_size"]:
                out[c.name] = overrides
    return out


SWEEPS: dict[str, Callable[[Config], dict[str, dict[str, Any]]]] = {"square": square_variants}
