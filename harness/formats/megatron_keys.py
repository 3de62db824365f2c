"""The Megatron key grammar, both directions, in one place.

A *canonical* key names one logical tensor of the unwrapped, unsharded model:

* per layer: ``decoder.layers.<i>.…``;
* per expert, with *global* expert numbers: ``decoder.layers.<i>.mlp.experts.<e>.linear_fc1.weight``;
* SwiGLU ``linear_fc1`` fused as ``[W; V]`` along dim 0;
* GDN ``in_proj.weight`` fused as query|key|value|z|beta|alpha and ``conv1d`` as query|key|value;
* no wrapper prefixes (``model.``, ``module.``); norms under the names torch_dist uses;
* optimizer state of a parameter: ``optimizer.state.<moment>.<canonical param key>`` (the order
  torch_dist uses), one per moment (``exp_avg``, ``exp_avg_sq``).

How the two DCP formats store a canonical tensor:

* **torch_dist** (MCore dist_checkpointing) stacks layers along dim 0
  (``decoder.layers.mlp.linear_fc1.weight`` is ``[L, 2F, H]``) and experts along dim 1
  (``decoder.layers.mlp.experts.experts.linear_fc1.weight`` is ``[L, E, 2F, H]``);
* **fsdp_dtensor** (Megatron-FSDP) stores one entry per parameter under ``model.`` plus wrapper
  prefixes; SwiGLU fc1 as ``<key>_w`` / ``<key>_v``; GDN projections as ``<key>.<part>``; experts
  as GroupedMLP ``…experts.linear_fc1.weight<e>`` or SequentialMLP ``…experts.local_experts.<e>.…``
  with global ``e``; optimizer moments under ``optimizer.state.<wrappers><param>.exp_avg``,
  the param split and numbered as its model key is.
* torch_dist keeps a distributed optimizer's moments under ``optimizer.state.<moment>.<stacked key>``.

Renamings other than wrappers, split parts and stacking (expert numbering, norm names) are rows of
one table (``KeyRow``: a stored and a canonical template), each read and written both ways.

Conventions follow ``megatron/core/transformer/fsdp_dtensor_checkpoint.py`` and
``megatron/core/dist_checkpointing`` (megatron-core 0.19.2). The readers
(``harness.formats.megatron``), the writer (``harness.formats.fsdp_writer``), the layout audit
(``harness.checks.fsdp_layout``), the key contract (``harness.checks.key_contract``) and the seeded
faults (``harness.regression.faults``) all speak through this module. No torch import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

WRAPPERS = ("model", "module")
SWIGLU_PARTS = ("w", "v")  # fc1 = [W; V]: W the gate (activated) half, V the linear half
GDN_IN_PROJ_PARTS = ("query", "key", "value", "z", "beta", "alpha")
GDN_CONV1D_PARTS = ("query", "key", "value")

FSDP_MODEL_PREFIX = "model."
# Wrapper prefixes on model keys: the FSDP adapter's state dict (``model.module.<param>``, as real
# Megatron-FSDP checkpoints store it; tests/integration/test_fsdp_checkpoints.py reads one).
FSDP_MODEL_DEPTH = 1
FSDP_OPTIMIZER_PREFIX = "optimizer."
FSDP_OPTIMIZER_STATE = "optimizer.state."
FSDP_GROUP_META = "optimizer.param_to_group_meta."  # + <wrappers><param>.<param-group field>
OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq")
# Wrapper prefixes on optimizer keys (FSDP adapter -> MegatronFSDP [-> Float16Module]) -> param.
OPTIMIZER_DEPTH = {"bf16": 3, "fp16": 3, "fp32": 2}


# ------------------------------------------------------------------------------- renaming rows
# Where one tensor has two names that differ by more than wrappers and split parts, the grammar is
# a table of rows: a stored and a canonical template over named fields, each read and written
# through the same row, in either direction. (The idea of Megatron-Bridge's MegatronMappingRegistry,
# megatron/bridge/models/conversion/mapping_registry.py, whose HF <-> Megatron mappings are
# wildcard patterns resolved both ways; no code of it here.)

# The regex each ``{field}`` of a template stands for.
_FIELDS = {"pre": r".*", "fc": r"linear_fc[12]", "kind": r"weight|bias", "e": r"\d+", "rest": r".+"}


def _template_regex(template: str) -> re.Pattern[str]:
    pieces = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("^" + "".join(
        f"(?P<{piece}>{_FIELDS[piece]})" if i % 2 else re.escape(piece) for i, piece in enumerate(pieces)) + "$")


@dataclass(frozen=True)
class KeyRow:
    """One tensor's stored and canonical names, as templates (``{e}`` an expert number, ...)."""

    stored: str
    canonical: str
    stored_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    canonical_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stored_re", _template_regex(self.stored))
        object.__setattr__(self, "canonical_re", _template_regex(self.canonical))

    def to_canonical(self, key: str) -> str | None:
        """The canonical name of a stored ``key`` this row reads; None if it does not read it."""
        m = self.stored_re.match(key)
        return self.canonical.format(**m.groupdict()) if m else None

    def to_stored(self, key: str, **fields: Any) -> str | None:
        """The stored name of a canonical ``key`` this row reads (``fields`` override what the key
        says, e.g. another expert number); None if it does not read it."""
        m = self.canonical_re.match(key)
        return self.stored.format(**{**m.groupdict(), **fields}) if m else None


# fsdp_dtensor experts (global numbers): GroupedMLP, then SequentialMLP.
GROUPED_EXPERT = KeyRow("{pre}.mlp.experts.{fc}.{kind}{e}", "{pre}.mlp.experts.{e}.{fc}.{kind}")
SEQUENTIAL_EXPERT = KeyRow("{pre}.mlp.experts.local_experts.{e}.{rest}", "{pre}.mlp.experts.{e}.{rest}")
EXPERT_ROWS = (GROUPED_EXPERT, SEQUENTIAL_EXPERT)
# Local-spec norm names -> the fused (TE) names that torch_dist saves them under.
NORM_ROWS = (
    KeyRow("{pre}.input_layernorm.weight", "{pre}.self_attention.linear_qkv.layer_norm_weight"),
    KeyRow("{pre}.pre_mlp_layernorm.weight", "{pre}.mlp.linear_fc1.layer_norm_weight"),
)


def _to_canonical(rows: tuple[KeyRow, ...], key: str) -> str:
    """The first of ``rows`` that reads ``key`` renames it; a key none reads is already canonical."""
    return next((found for row in rows if (found := row.to_canonical(key)) is not None), key)


# ------------------------------------------------------------------------------- patterns
# What is not a one-to-one renaming (layer numbers, split parts, torch_dist stacking) stays a regex.
_LAYER = re.compile(r"^(?P<layer>.*decoder\.layers\.\d+)\.")
_LAYER_NUMBER = re.compile(r"\.layers\.(?P<n>\d+)\.")

# SwiGLU fc1 parameters (weight or bias) in stored naming: dense, GroupedMLP / SequentialMLP expert
# and shared expert, with the split part (the patterns of handle_swiglu_in_state_dict's
# is_swiglu_key), and in canonical naming.
_FC1 = re.compile(
    r"^(?P<base>(?:.*\.)?mlp\.(?:experts\.linear_fc1\.(?:weight|bias)\d+|experts\.local_experts\.\d+\."
    r"linear_fc1\.(?:weight|bias)|shared_experts\.linear_fc1\.(?:weight|bias)|linear_fc1\.(?:weight|bias)))"
    r"(?:_(?P<part>[wv]))?$"
)
_CANONICAL_FC1 = re.compile(r"(?:^|\.)mlp\.(?:experts\.\d+\.|shared_experts\.)?linear_fc1\.(?:weight|bias)$")
_GDN = re.compile(
    r"^(?P<base>.*\.(?P<proj>in_proj|conv1d)\.(?:weight|bias))(?:\.(?P<part>" + "|".join(GDN_IN_PROJ_PARTS) + r"))?$"
)

# torch_dist: a stacked key has no layer number after ``decoder.layers``.
_STACKED = re.compile(r"^(?P<pre>(?:.*\.)?decoder\.layers)\.(?P<rest>(?!\d+\.).+)$")
_STACKED_EXPERTS = "mlp.experts.experts."


# ------------------------------------------------------------------------------- canonical


def wrapper_prefix(depth: int) -> str:
    """The ``module.`` prefixes ``depth`` wrappers put on a parameter name (``''`` for 0)."""
    return "module." * depth


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
    return _to_canonical(EXPERT_ROWS, key)


def canonical_norm(key: str) -> str:
    return _to_canonical(NORM_ROWS, key)


def canonical(key: str) -> str:
    """Wrapper-free stored naming -> canonical naming (experts and norms)."""
    return canonical_norm(canonical_expert(key))


def is_gated_fc1(canonical_key: str) -> bool:
    """A SwiGLU fc1 weight or bias (dense, expert or shared expert) in canonical naming."""
    return bool(_CANONICAL_FC1.search(canonical_key))


# ------------------------------------------------------------------------------- layer and expert numbers
# In parameter names as a model's ``named_parameters`` gives them (wrappers allowed): the numbers
# Megatron-Bridge turns from rank-local to global (``_megatron_local_name_to_global`` in
# megatron/bridge/models/conversion/model_bridge.py, megatron-bridge 0.6.2).


def layer_number(key: str) -> int | None:
    """The number of the first ``.layers.<i>.`` segment of a key; None if it has none."""
    m = _LAYER_NUMBER.search(key)
    return int(m["n"]) if m else None


def renumber_layer(key: str, number: int) -> str:
    """The key with the number of its first ``.layers.<i>.`` segment replaced (unchanged if it has none)."""
    m = _LAYER_NUMBER.search(key)
    return f"{key[:m.start('n')]}{number}{key[m.end('n'):]}" if m else key


def _stored_expert(key: str) -> re.Match[str] | None:
    return next((m for row in EXPERT_ROWS if (m := row.stored_re.match(key))), None)


def expert_number(key: str) -> int | None:
    """The expert number a GroupedMLP (``…mlp.experts.linear_fc1.weight<e>``) or SequentialMLP
    (``…mlp.experts.local_experts.<e>.…``) key spells, local or global as the key has it; None for
    any other key (canonical ``…mlp.experts.<e>.…`` included)."""
    m = _stored_expert(key)
    return int(m["e"]) if m else None


def renumber_expert(key: str, number: int) -> str:
    """The GroupedMLP / SequentialMLP key with its expert number replaced (any other key unchanged)."""
    m = _stored_expert(key)
    return f"{key[:m.start('e')]}{number}{key[m.end('e'):]}" if m else key


# ------------------------------------------------------------------------------- torch_dist


@dataclass(frozen=True)
class Unstacked:
    """One canonical tensor inside a stacked torch_dist tensor."""

    key: str
    index: tuple[int, ...]  # leading indices into the stored tensor
    shape: tuple[int, ...]


def stacked_dims(stored: str) -> int:
    """How many leading dims of a torch_dist entry index the tensors it stacks: 0 (not stacked),
    1 (layers) or 2 (layers x experts)."""
    m = _STACKED.match(stored)
    return 0 if not m else 2 if m["rest"].startswith(_STACKED_EXPERTS) else 1


def unstack_torch_dist(stored: str, shape: tuple[int, ...]) -> list[Unstacked]:
    """The canonical tensors a torch_dist entry holds (itself, if it is not stacked)."""
    m = _STACKED.match(stored)
    if not m:
        return [Unstacked(stored, (), tuple(shape))]
    pre, rest = m["pre"], m["rest"]
    if stacked_dims(stored) == 2:
        tail = rest[len(_STACKED_EXPERTS):]
        return [
            Unstacked(canonical_norm(f"{pre}.{i}.mlp.experts.{e}.{tail}"), (i, e), tuple(shape[2:]))
            for i in range(shape[0]) for e in range(shape[1])
        ]
    return [Unstacked(canonical_norm(f"{pre}.{i}.{rest}"), (i,), tuple(shape[1:])) for i in range(shape[0])]


# ------------------------------------------------------------------------------- fsdp_dtensor


def part_suffix(part: str) -> str:
    """How a split part is appended to its key: ``_w`` for SwiGLU, ``.query`` for GDN."""
    return f"_{part}" if part in SWIGLU_PARTS else f".{part}"


SWIGLU_SUFFIXES = tuple(part_suffix(part) for part in SWIGLU_PARTS)  # ("_w", "_v"): the stored fc1 halves


def gdn_projection(key: str) -> str:
    """``in_proj`` or ``conv1d`` for the weight or bias of a GDN fused projection (with or without
    a split part, in any naming), else ``''``."""
    m = _GDN.match(key)
    return m["proj"] if m else ""


@dataclass(frozen=True)
class FsdpKey:
    """One fsdp_dtensor model key (``model.…``), parsed."""

    stored: str
    base: str  # wrappers and split part removed; stored expert naming
    part: str  # "" (not split), "w" / "v" (SwiGLU), or a GDN part name
    depth: int  # wrapper prefixes dropped

    @property
    def canonical(self) -> str:
        return canonical(self.base)

    @property
    def projection(self) -> str:
        """``fc1`` (a SwiGLU fc1 weight or bias), ``in_proj`` / ``conv1d`` (GDN), or ``''``."""
        return "fc1" if _FC1.match(self.base) else gdn_projection(self.base)

    @property
    def fc1_kind(self) -> str:
        """Which intermediate size an fc1 half has: ``dense``, ``expert`` or ``shared``."""
        return "shared" if "shared_experts" in self.base else "expert" if ".experts." in self.base else "dense"

    @property
    def layer(self) -> str:
        m = _LAYER.match(self.base)
        return m["layer"] if m else ""

    @property
    def expert(self) -> int | None:
        """The (global, as stored) expert number, or None for a non-expert key."""
        return expert_number(self.base)


def parse_fsdp_key(stored: str) -> FsdpKey:
    key, depth = strip_wrappers(stored)
    if (m := _GDN.match(key)) and m["part"]:
        return FsdpKey(stored, m["base"], m["part"], depth)
    if (m := _FC1.match(key)) and m["part"]:
        return FsdpKey(stored, m["base"], m["part"], depth)
    return FsdpKey(stored, key, "", depth)


def join_order(canonical_key: str) -> tuple[str, ...]:
    """The order in which split parts are concatenated (dim 0) back into the canonical tensor."""
    return {"in_proj": GDN_IN_PROJ_PARTS, "conv1d": GDN_CONV1D_PARTS}.get(gdn_projection(canonical_key), SWIGLU_PARTS)


def gdn_split_sizes(hf_config: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """in_proj and conv1d part sizes along dim 0, as the GDN handler computes them (TP = 1), for
    a config with GDN layers (``harness.matrix.model_spec.config_has_gdn``)."""
    qk = hf_config["linear_num_key_heads"] * hf_config["linear_key_head_dim"]
    v = hf_config["linear_num_value_heads"] * hf_config["linear_value_head_dim"]
    nvh = hf_config["linear_num_value_heads"]
    return [qk, qk, v, v, nvh, nvh], [qk, qk, v]


def fsdp_split_plan(canonical_key: str, rows: int, *, split_swiglu: bool = True,
                    gdn_sizes: tuple[list[int], list[int]] | None = None) -> list[tuple[str, int]]:
    """``(part, rows)`` along dim 0 in which fsdp_dtensor stores a canonical tensor of ``rows``
    rows: ``[("", rows)]`` when it is not split."""
    if gdn_sizes and (canonical_key.endswith(".in_proj.weight") or ".conv1d." in canonical_key):
        in_proj = canonical_key.endswith(".in_proj.weight")
        return list(zip(GDN_IN_PROJ_PARTS if in_proj else GDN_CONV1D_PARTS, gdn_sizes[0] if in_proj else gdn_sizes[1]))
    if split_swiglu and is_gated_fc1(canonical_key):
        return [(p, rows // 2) for p in SWIGLU_PARTS]
    return [("", rows)]


def fsdp_stored_name(canonical_key: str, part: str = "", *, local_experts: int = 0) -> str:
    """The wrapper-free fsdp_dtensor name of one part of a canonical tensor, with GroupedMLP
    expert naming. ``local_experts`` > 0 numbers experts ``e % local_experts``, as one EP rank
    sees them (the *wrong* naming; tests write it to show the audit catching it)."""
    base = canonical_key
    if m := GROUPED_EXPERT.canonical_re.match(canonical_key):
        index = int(m["e"]) % local_experts if local_experts else int(m["e"])
        base = GROUPED_EXPERT.to_stored(canonical_key, e=index)
    return base + (part_suffix(part) if part else "")


def canonical_optimizer_key(moment: str, canonical_param: str) -> str:
    """The canonical key of one optimizer moment of a canonical parameter."""
    return f"{FSDP_OPTIMIZER_STATE}{moment}.{canonical_param}"


def split_canonical_optimizer_key(key: str) -> tuple[str, str] | None:
    """``(moment, canonical param)`` of a canonical optimizer key; None for a model key."""
    if not key.startswith(FSDP_OPTIMIZER_STATE):
        return None
    moment, _, param = key.removeprefix(FSDP_OPTIMIZER_STATE).partition(".")
    return (moment, param) if moment in OPTIMIZER_MOMENTS and param else None


def parse_fsdp_optimizer_key(stored: str) -> tuple[str, FsdpKey] | None:
    """``(moment, parsed param)`` of an fsdp_dtensor ``optimizer.state.<wrappers><param>.<moment>``
    key; None for any other key (param groups, step counters)."""
    if not stored.startswith(FSDP_OPTIMIZER_STATE):
        return None
    rest = stored.removeprefix(FSDP_OPTIMIZER_STATE)
    for moment in sorted(OPTIMIZER_MOMENTS, key=len, reverse=True):
        if rest.endswith(f".{moment}"):
            return moment, parse_fsdp_key(rest.removesuffix(f".{moment}"))
    return None


def fsdp_group_meta_param(stored: str, params: set[str]) -> str | None:
    """The wrapper-free parameter an ``optimizer.param_to_group_meta.<param>.<field>`` key
    describes (the optimizer's own record of which parameters it holds state for): the longest
    of ``params`` (wrapper-free, unsplit names) it starts with, else the key without its last
    segment. None for any other key."""
    if not stored.startswith(FSDP_GROUP_META):
        return None
    key = strip_wrappers(stored.removeprefix(FSDP_GROUP_META))[0]
    segments = key.split(".")
    for end in range(len(segments) - 1, 0, -1):
        if (candidate := ".".join(segments[:end])) in params:
            return candidate
    return key.rpartition(".")[0]


def split_torch_dist_optimizer_key(stored: str) -> tuple[str, str] | None:
    """``(moment, stored param key)`` of a torch_dist ``optimizer.state.<moment>.<param>`` key."""
    moment, _, param = stored.removeprefix(FSDP_OPTIMIZER_STATE).partition(".")
    if stored.startswith(FSDP_OPTIMIZER_STATE) and moment in OPTIMIZER_MOMENTS and param:
        return moment, param
    return None


def fsdp_model_key(stored_param: str, depth: int = FSDP_MODEL_DEPTH) -> str:
    """``model.<module. x depth><param>`` for a wrapper-free param name (split and numbered as stored)."""
    return f"{FSDP_MODEL_PREFIX}{wrapper_prefix(depth)}{stored_param}"


def fsdp_optimizer_key(stored_param: str, depth: int, moment: str) -> str:
    """``optimizer.state.<module. x depth><param>.<moment>`` for a wrapper-free param name."""
    return f"{FSDP_OPTIMIZER_STATE}{wrapper_prefix(depth)}{stored_param}.{moment}"


def optimizer_key_depth(key: str) -> int | None:
    """Wrapper depth of an ``optimizer.state.…`` key (None for other optimizer keys)."""
    if not key.startswith(FSDP_OPTIMIZER_STATE):
        return None
    return strip_wrappers(key.removeprefix(FSDP_OPTIMIZER_STATE))[1]


def source_param(split_key: str, params: Mapping[str, Any]) -> str:
    """The parameter a split state-dict key (``X_w``, ``X.query``, ``X_v.exp_avg`` ...) was
    derived from, among ``params`` (wrapper-free names)."""
    key = split_key
    for moment in sorted(OPTIMIZER_MOMENTS, key=len, reverse=True):
        key = key.removesuffix(f".{moment}")
    key = strip_wrappers(key)[0]
    for part in (*SWIGLU_PARTS, *GDN_IN_PROJ_PARTS):
        suffix = part_suffix(part)
        if key.endswith(suffix) and key[: -len(suffix)] in params:
            return key[: -len(suffix)]
    return key
