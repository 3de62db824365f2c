"""Which HF architectures the Megatron-Bridge in use registers, read from its source.

The zoo's families come from here, not from a list typed by hand: a bridge added upstream
(``@MegatronModelBridge.register_bridge(source=..., target=...)`` under
``megatron/bridge/models/``) shows up as a new family, and so as new cases, with no change here.

Read with ``ast``, without importing megatron.bridge (~10 s and torch), because ``harness list``
and case loading must stay light. tests/integration/test_bridge_registry.py checks the result
against ``AutoBridge.list_supported_models()`` of the imported package, so the reading cannot
drift from what Bridge really dispatches.

Each architecture is classified with transformers' own auto mappings (also read from source):
a *text LM* is a registered ``...ForCausalLM`` that transformers knows as a causal LM; the rest
are listed with the reason they are not covered (vision-language, audio, or an architecture
whose model code only ships with its checkpoints, which nothing here may download).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from harness.matrix import hf_source

TEXT_LM, MULTIMODAL, REMOTE_CODE = "text-lm", "multimodal", "remote-code"


@dataclass(frozen=True)
class RegisteredArchitecture:
    """One ``register_bridge`` call of Megatron-Bridge, and what transformers makes of it."""

    architecture: str  # the HF class name it is registered for, e.g. "Qwen3MoeForCausalLM"
    bridge_class: str  # e.g. "Qwen3MoEBridge"
    module: str  # source file, relative to megatron/bridge/models/
    target: str  # Megatron model class, e.g. "GPTModel", "HybridModel"
    model_type: str  # transformers model_type ("" when transformers does not know the class)
    hf_config_class: str  # transformers config class ("" likewise)
    kind: str  # TEXT_LM, MULTIMODAL or REMOTE_CODE

    @property
    def why_not_covered(self) -> str:
        """'' for a text LM; otherwise the reason the zoo has no family for it."""
        if self.kind == MULTIMODAL:
            return ("not a text LM (vision-language or audio: its Megatron target is not a text decoder); listed, "
                    "not yet covered")
        if self.kind == REMOTE_CODE:
            return (f"no such class in transformers {hf_source.transformers_version()}: the model code ships with "
                    "the checkpoint (trust_remote_code) and nothing may be downloaded here, so no tiny HF model can "
                    "be built")
        return ""


def bridge_models_root() -> Path:
    """``megatron/bridge/models`` of the Bridge in use: ``HARNESS_MEGATRON_BRIDGE``'s tree if
    set (as the worker would import it), else the installed package."""
    tree = os.environ.get("HARNESS_MEGATRON_BRIDGE")
    if tree:
        for candidate in (Path(tree) / "src" / "megatron" / "bridge", Path(tree) / "megatron" / "bridge"):
            if candidate.is_dir():
                return candidate / "models"
        raise FileNotFoundError(f"HARNESS_MEGATRON_BRIDGE={tree}: no megatron/bridge package in it")
    spec = importlib.util.find_spec("megatron")  # a namespace package: finding it imports nothing heavy
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "bridge" / "models").is_dir():
            return Path(location) / "bridge" / "models"
    raise ImportError("megatron-bridge is not installed (run scripts/bootstrap.sh)")


def _string_constants(module: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` assignments (some bridges register a class-name constant)."""
    out = {}
    for stmt in module.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            out.update({t.id: stmt.value.value for t in stmt.targets if isinstance(t, ast.Name)})
    return out


def _name_of(node: ast.expr | None, constants: dict[str, str]) -> str:
    """A class given as a string, a (transformers) class name, an attribute, or a string constant."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _registrations(file: Path) -> list[tuple[str, str, str, str]]:
    """(source, bridge class, target, model_type) of every ``register_bridge(...)`` call in
    ``file``: as a class decorator, or applied by hand (``register_bridge(...)(Cls)``)."""
    text = file.read_text(errors="replace")
    if "register_bridge" not in text:
        return []
    module = ast.parse(text)
    constants = _string_constants(module)
    found = []

    def kwargs(call: ast.Call) -> dict[str, ast.expr]:
        return {k.arg: k.value for k in call.keywords if k.arg}

    def is_registration(node: ast.AST) -> bool:
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "register_bridge" and "source" in kwargs(node))

    for node in ast.walk(module):
        if isinstance(node, ast.ClassDef):
            pairs = [(d, node.name) for d in node.decorator_list if is_registration(d)]
        elif isinstance(node, ast.Call) and is_registration(node.func) and node.args:
            pairs = [(node.func, _name_of(node.args[0], {}))]
        else:
            continue
        for call, bridge in pairs:
            kw = kwargs(call)
            found.append((_name_of(kw["source"], constants), bridge, _name_of(kw.get("target"), constants),
                          _name_of(kw.get("model_type"), constants)))
    return found


def classify(architecture: str) -> tuple[str, str, str]:
    """(kind, model_type, config class) of a registered architecture, from transformers' auto
    mappings: a causal LM it knows, a class it knows that is not a causal LM, or none at all."""
    causal = hf_source.causal_lm_model_types()
    # transformers also lists some vision-language classes (Gemma3ForConditionalGeneration) as causal LMs.
    if architecture in causal and architecture.endswith("ForCausalLM"):
        model_type = causal[architecture]
        return TEXT_LM, model_type, hf_source.config_class_names().get(model_type, "")
    if hf_source.model_class_exists(architecture):
        return MULTIMODAL, "", ""
    return REMOTE_CODE, "", ""


@functools.lru_cache(maxsize=4)
def _registered(root: Path) -> tuple[RegisteredArchitecture, ...]:
    out: dict[str, RegisteredArchitecture] = {}
    files = sorted(Path(folder) / name for folder, _, names in os.walk(root, followlinks=True)
                   for name in names if name.endswith(".py"))
    for file in files:
        if file.relative_to(root).parts[0] == "conversion":  # the dispatch machinery and its docstring examples
            continue
        for source, bridge, target, _ in _registrations(file):
            kind, model_type, config_class = classify(source)
            out.setdefault(source, RegisteredArchitecture(source, bridge, str(file.relative_to(root)), target,
                                                          model_type, config_class, kind))
    return tuple(sorted(out.values(), key=lambda a: a.architecture))


def registered_architectures(root: Path | None = None) -> tuple[RegisteredArchitecture, ...]:
    """Every architecture the Bridge at ``root`` (default: the one in use) registers, by name."""
    return _registered(root or bridge_models_root())


def text_lms(root: Path | None = None) -> tuple[RegisteredArchitecture, ...]:
    return tuple(a for a in registered_architectures(root) if a.kind == TEXT_LM)
