"""One set of rules that shrinks any registered architecture's HF config to a tiny one where bugs show.

Every rule names a config field and applies only where the architecture's config class has that
field, so the same rules serve a dense Llama, an MLA MoE and a hybrid GDN model alike. What they
cannot know (a hybrid layer pattern, a group count that must divide the experts) lives in the
per-family override file (``families.yaml``) and wins over them.

Why these values (each makes a class of conversion bug visible):
- hidden 64 with dense FFN 96 and expert FFN 40: no weight is square, so a transposed or
  swapped-orientation copy changes a shape instead of hiding;
- 4 query heads over 2 kv heads (GQA), head_dim 16: QKV interleaving per query group shows;
- 4 routed experts, top-3: more experts than top-k, and a top-k that is not Megatron's default 2;
- vocab 250: not a multiple of Megatron's padding (128 x TP), so a kept padding shows;
- eps 1e-3, RoPE theta 50000: not Megatron's defaults (1e-5, 10000), so a dropped mapping shows
  (``harness.conversion.zoo_audit`` enforces this for every mapped field);
- 2 layers (the first dense where the family has dense-then-MoE layers): per-layer numbering and
  both MLP kinds are exercised.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

ROPE_THETA = 50000.0  # not Megatron's rotary_base default (10000)

# field -> tiny value. Applied in this order, to the fields the config class has.
RULES: dict[str, Any] = {
    "vocab_size": 250,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-3,
    "layer_norm_eps": 1e-3,
    "norm_eps": 1e-3,
    "layer_norm_epsilon": 1e-3,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
    # Mixture of experts (each family names the fields its own way).
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 3,
    "moe_k": 3,  # Ernie 4.5's top-k
    "moe_intermediate_size": 40,
    "shared_expert_intermediate_size": 48,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "first_k_dense_replace": 1,
    # Multi-head latent attention (DeepSeek, GLM-MoE-Lite/DSA, Kimi): low ranks, decoupled rope dims.
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "index_n_heads": 4,
    "index_head_dim": 16,
    # Gated DeltaNet (linear attention) heads: key heads != value heads.
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    # Mamba-2 mixers (Nemotron-H, Falcon-H1): 8 heads of 16 = expand 2 x hidden 64, 2 groups.
    "ssm_state_size": 16,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "n_groups": 2,
    "chunk_size": 16,
    "mamba_d_ssm": 128,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_n_groups": 2,
    "mamba_d_state": 16,
    "mamba_chunk_size": 16,
    # Local attention within the 24-token test batch.
    "sliding_window": 16,
    # Gemma's attention scale 1/sqrt(query_pre_attn_scalar): not head_dim (16), so that a dropped
    # mapping (Megatron's default scale is 1/sqrt(head_dim)) shows.
    "query_pre_attn_scalar": 24,
}

# MLA has no kv groups: its kv heads equal the query heads.
_MLA_FIELD = "kv_lora_rank"


def tiny_config(fields: Iterable[str], defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The tiny HF config dict of an architecture whose config class has ``fields`` (with the
    literal ``defaults`` read from its source): every rule that applies, then ``overrides``.

    The rules never switch a feature on: ``sliding_window`` is skipped where the class default is
    ``None`` (no local attention) or a ``use_sliding_window`` flag is off by default. Tied
    embeddings stay as the class has them (Gemma ties, Llama does not)."""
    fields = set(fields)
    cfg: dict[str, Any] = {}
    for name, value in RULES.items():
        if name not in fields:
            continue
        if name == "sliding_window" and (defaults.get(name, "absent") is None
                                         or defaults.get("use_sliding_window") is False):
            continue
        cfg[name] = copy.deepcopy(value)  # a config class may change a nested dict in place
    if _MLA_FIELD in fields and "num_key_value_heads" in fields:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    cfg.update(copy.deepcopy(overrides))
    return cfg
