"""Canonical Megatron key space, shared by the torch_dist and fsdp_dtensor readers.

A canonical key names one logical tensor of the *unwrapped, unsharded* model:

* per layer: ``decoder.layers.<i>.…`` (torch_dist stacks layers along dim 0; unstacked here);
* per expert, with *global* expert numbers: ``decoder.layers.<i>.mlp.experts.<e>.linear_fc1.weight``
  (torch_dist: ``…mlp.experts.experts.linear_fc1.weight[L, E, …]``; fsdp_dtensor: GroupedMLP
  ``…experts.linear_fc1.weight<e>`` or SequentialMLP ``…experts.local_experts.<e>.…``);
* SwiGLU ``linear_fc1`` fused as ``[W; V]`` along dim 0 (fsdp_dtensor stores ``_w`` and ``_v``);
* GDN ``in_proj.weight`` fused as query|key|value|z|beta|alpha and ``conv1d`` as
  query|key|value (fsdp_dtensor stores the parts);
* no wrapper prefixes (``model.``, ``module.``); norms under the names torch_dist uses.
"""

from __future__ import annotations

import re

WRAPPERS = ("model", "module")
GDN_IN_PROJ_PARTS = ("query", "key", "value", "z", "beta", "alpha")
GDN_CONV1D_PARTS = ("query", "key", "value")

# Local-spec norm names -> the fused (TE) names that torch_dist saves them under.
NORM_ALIASES = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
}

_GROUPED_EXPERT = re.compile(r"^(?P<pre>.*\.mlp\.experts)\.(?P<fc>linear_fc[12])\.(?P<kind>weight|bias)(?P<e>\d+)$")
_SEQUENTIAL_EXPERT = re.compile(r"^(?P<pre>.*\.mlp\.experts)\.local_experts\.(?P<e>\d+)\.(?P<rest>.+)$")
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def strip_wrappers(key: str) -> tuple[str, int]:
    """Drop leading ``model.``/``module.`` segments; returns the key and how many were dropped."""
    parts = key.split(".")
    depth = 0
    while parts and parts[0] in WRAPPERS:
        parts = parts[1:]
        depth += 1
    return ".".join(parts), depth


def canonical_expert(key: str) -> str:
    """GroupedMLP / SequentialMLP expert naming -> ``…mlp.experts.<e>.<module>.<param>``."""
    m = _GROUPED_EXPERT.match(key)
    if m:
        return f"{m['pre']}.{m['e']}.{m['fc']}.{m['kind']}"
    m = _SEQUENTIAL_EXPERT.match(key)
    if m:
        return f"{m['pre']}.{m['e']}.{m['rest']}"
    return key


def canonical_norm(key: str) -> str:
    for local, fused in NORM_ALIASES.items():
        if key.endswith(local):
            return key[: -len(local)] + fused
    return key


def expert_index(key: str) -> int | None:
    m = _EXPERT.search(key)
    return int(m.group(1)) if m else None
