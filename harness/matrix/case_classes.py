"""The case classes conversion bugs hide in (issue 21), and the generated variants that fill them.

Each generator reads the family's HF config class (its fields and defaults, from transformers'
source) and the Bridge's own tables (``CONFIG_MAPPING`` of ``MegatronModelBridge`` and
``ACTIVATION_FUNC_MAP``, from the Bridge's source), never a list typed here, so a field the
Bridge starts mapping brings its variants with it. Read by AST: expanding ``cases/`` imports no
torch.

``SWEEPS`` is what ``cases/*.yaml`` name in ``sweep:``; ``classes_of`` says which classes a case
belongs to, for ``harness coverage`` and the HTML report.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from harness.matrix import bridge_registry, hf_source
from harness.matrix.coincidences import square_variants

if TYPE_CHECKING:
    from harness.matrix.cases import Case

Config = Mapping[str, Any]
# The logit check's sequence length (harness.conversion.forward.fixed_batch uses it; it lives here,
# on the bottom floor, because the window generator needs it): a window must be shorter than this
# for an off-by-one in it to change any logit.
TEST_SEQUENCE = 24
SHORT_WINDOW = 7  # odd and well inside the sequence: a window of w vs w +- 1 differs at many positions


@dataclass(frozen=True)
class CaseClass:
    key: str
    title: str


SWITCHES = CaseClass("switches", "every setting of a mapped switch")
ROPE = CaseClass("rope", "RoPE scaling types")
PIPELINE = CaseClass("pipeline", "pipeline layouts users run (VPP, uneven stages)")
HYBRID = CaseClass("hybrid", "hybrid layer patterns")
WINDOW = CaseClass("window", "sliding windows shorter than the test sequence")
CONFIG_EXPORT = CaseClass("config-export", "config-only export")
REPEATED_EXPORT = CaseClass("repeated-export", "repeated export")
CLASSES = (SWITCHES, ROPE, PIPELINE, HYBRID, WINDOW, CONFIG_EXPORT, REPEATED_EXPORT)


# ------------------------------------------------------------------ the Bridge's tables (AST)


def _module(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


@functools.lru_cache(maxsize=1)
def bridge_config_mapping() -> tuple[tuple[str, str], ...]:
    """``MegatronModelBridge.CONFIG_MAPPING``: (hf field, provider field) pairs."""
    path = bridge_registry.bridge_models_root() / "conversion" / "model_bridge.py"
    for node in ast.walk(_module(path)):
        if isinstance(node, ast.ClassDef) and node.name == "MegatronModelBridge":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == "CONFIG_MAPPING" for t in stmt.targets):
                    return tuple(tuple(pair) for pair in ast.literal_eval(stmt.value))
    raise KeyError(f"{path}: no MegatronModelBridge.CONFIG_MAPPING")


def _dict_keys(path: Path, name: str) -> tuple[str, ...]:
    for stmt in _module(path).body:
        target = stmt.target if isinstance(stmt, ast.AnnAssign) else stmt.targets[0] if isinstance(stmt, ast.Assign) else None
        if getattr(target, "id", "") == name and isinstance(stmt.value, ast.Dict):
            return tuple(k.value for k in stmt.value.keys if isinstance(k, ast.Constant))
    raise KeyError(f"{path}: no {name} = {{...}}")


@functools.lru_cache(maxsize=1)
def activations() -> tuple[str, ...]:
    """Activation names both sides accept: the Bridge's ``ACTIVATION_FUNC_MAP`` short names that
    transformers' ``ACT2CLS`` knows too (``fast_gelu`` is Megatron's name only, for example)."""
    bridge = _dict_keys(bridge_registry.bridge_models_root().parent / "utils" / "activation_map.py", "ACTIVATION_FUNC_MAP")
    hf = set(_dict_keys(hf_source.transformers_root() / "activations.py", "ACT2CLS"))
    return tuple(name for name in bridge if "." not in name and name in hf)


# The values Megatron's router accepts for the one enumerated MoE field the Bridge maps.
ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")


# ------------------------------------------------------------------------------- generators


def _bridge_maps(hf_name: str) -> bool:
    return any(hf == hf_name for hf, _ in bridge_config_mapping())


def _value(cfg: Config, config_class: str, name: str) -> Any:
    return cfg[name] if name in cfg else hf_source.config_defaults(config_class).get(name)


def switch_variants(cfg: Config, config_class: str) -> dict[str, dict[str, Any]]:
    """Every mapped boolean at its other value, every accepted activation, every router score
    function: one variant each, where the family's config class has the field."""
    fields = hf_source.config_fields(config_class)
    out: dict[str, dict[str, Any]] = {}
    for hf_name, _ in bridge_config_mapping():
        value = _value(cfg, config_class, hf_name)
        if hf_name in fields and isinstance(value, bool):
            out[f"{hf_name.replace('_', '-')}-{'off' if value else 'on'}"] = {hf_name: not value}
    act_field = next((f for f in ("hidden_act", "hidden_activation") if f in fields), None)
    if act_field:
        current = _value(cfg, config_class, act_field)
        out.update({f"act-{name}": {act_field: name} for name in activations() if name != current})
    if "scoring_func" in fields and _bridge_maps("scoring_func"):
        current = _value(cfg, config_class, "scoring_func")
        out.update({f"score-{name}": {"scoring_func": name} for name in ROUTER_SCORE_FUNCTIONS if name != current})
    return out


def window_variants(cfg: Config, config_class: str) -> dict[str, dict[str, Any]]:
    """A sliding window shorter than the test sequence, where the config has a window field and
    the tiny model's is not already that short."""
    fields = hf_source.config_fields(config_class)
    if "sliding_window" not in fields:
        return {}
    window = _value(cfg, config_class, "sliding_window")
    if isinstance(window, int) and window < TEST_SEQUENCE:
        return {}
    extra: dict[str, Any] = {}
    if "use_sliding_window" in fields:  # Qwen2-style: a window only when switched on ...
        extra["use_sliding_window"] = True
    if "max_window_layers" in fields:  # ... and only from layer max_window_layers on: layer 0 full,
        extra["max_window_layers"] = 1  # the rest sliding (a mixed pattern, both kinds exercised)
    return {"win-short": {"sliding_window": SHORT_WINDOW, **extra}}


# RoPE scaling types transformers accepts, with the parameters each needs beyond rope_theta
# (sizes relative to the tiny model's max_position_embeddings; longrope's per-frequency factors
# are filled in per model).
ROPE_TYPES: dict[str, dict[str, Any]] = {
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 2.0},
    "llama3": {"factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "longrope": {},
}
PARTIAL_ROTARY = 0.5


@functools.lru_cache(maxsize=None)
def bridge_rope_types(bridge_module: str) -> frozenset[str]:
    """The RoPE types a family's bridge claims: YaRN for every bridge (``YARN_ROPE_SCALING_MAPPING``
    of ``MegatronModelBridge``), plus each type its own module names as a string constant
    (``LlamaBridge``: ``"llama3"``, ``"linear"``)."""
    tree = _module(bridge_registry.bridge_models_root() / bridge_module)
    named = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return frozenset({"yarn"} | (named & set(ROPE_TYPES)))


def _rotary_half(cfg: Config, config_class: str) -> int:
    head_dim = _value(cfg, config_class, "head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return head_dim // 2


def rope_variants(cfg: Config, config_class: str, bridge_module: str) -> dict[str, dict[str, Any]]:
    """Each RoPE scaling type the bridge claims, and partial rotary (``CONFIG_MAPPING`` maps
    ``partial_rotary_factor``), on a family whose tiny model has plain RoPE."""
    if "rope_parameters" not in hf_source.config_fields(config_class):
        return {}
    base = dict(cfg.get("rope_parameters") or {})
    if base.get("rope_type", "default") != "default" or any(isinstance(v, Mapping) for v in base.values()):
        return {}  # already scaled, or per-attention-type RoPE (gemma3/4): its own variants
    original = max(1, _value(cfg, config_class, "max_position_embeddings") // 2)
    out: dict[str, dict[str, Any]] = {}
    for rope_type in sorted(bridge_rope_types(bridge_module)):
        params = {**base, "rope_type": rope_type, **ROPE_TYPES[rope_type]}
        if rope_type in ("yarn", "llama3", "longrope"):
            params["original_max_position_embeddings"] = original
        if rope_type == "longrope":
            half = _rotary_half(cfg, config_class)
            params["short_factor"] = [1.0 + i / half for i in range(half)]
            params["long_factor"] = [2.0 + i / half for i in range(half)]
        out[f"rope-{rope_type}"] = {"rope_parameters": params}
    if _bridge_maps("partial_rotary_factor"):
        out["rope-partial"] = {"rope_parameters": {**base, "partial_rotary_factor": PARTIAL_ROTARY}}
    return out


def hybrid_variants(cfg: Config, config_class: str) -> dict[str, dict[str, Any]]:
    """Layer patterns of a family whose tiny model mixes two layer kinds (``layer_types``: sliding
    and full attention, linear and full attention): two consecutive layers of each kind, and a
    period-3 pattern over 5 layers (the period does not divide the layer count; a PP2 split after
    layer 2 cuts it, see cases/case_classes.yaml)."""
    kinds = list(dict.fromkeys(cfg.get("layer_types") or ()))
    if "layer_types" not in hf_source.config_fields(config_class) or len(kinds) != 2:
        return {}
    a, b = kinds
    return {
        "hyb-pairs": {"num_hidden_layers": 4, "layer_types": [a, a, b, b]},
        "hyb-odd": {"num_hidden_layers": 5, "layer_types": [a, a, b, a, a]},
    }


@dataclass(frozen=True)
class FamilyFacts:
    """What a generator may read of a family: its tiny config, its HF config class, its bridge's module."""

    config: Config
    config_class: str
    bridge_module: str


# sweep name -> (the class its variants fill, or None; generator).
SWEEPS: dict[str, tuple[CaseClass | None, Callable[[FamilyFacts], dict[str, dict[str, Any]]]]] = {
    "square": (None, lambda f: square_variants(f.config)),
    "switches": (SWITCHES, lambda f: switch_variants(f.config, f.config_class)),
    "window": (WINDOW, lambda f: window_variants(f.config, f.config_class)),
    "rope": (ROPE, lambda f: rope_variants(f.config, f.config_class, f.bridge_module)),
    "hybrid": (HYBRID, lambda f: hybrid_variants(f.config, f.config_class)),
}


# ------------------------------------------------------------------------------ membership


def classes_of(case: "Case") -> tuple[CaseClass, ...]:
    """The classes ``case`` fills: its sweep's, its path's, its layout's."""
    out = []
    sweep = SWEEPS.get(case.sweep, (None, None))[0]
    if sweep is not None:
        out.append(sweep)
    layouts = [layout for layout in (case.layout, case.load_layout) if layout is not None]
    if any(layout.vpp > 1 or layout.uneven for layout in layouts):
        out.append(PIPELINE)
    if case.kind == "config-export":
        out.append(CONFIG_EXPORT)
    elif case.exports_weights:
        out.append(REPEATED_EXPORT)
    return tuple(out)
