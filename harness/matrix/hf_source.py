"""Facts about installed transformers config classes, read from their source without importing
transformers (importing it imports torch: ~3 s and ~640 MB, too much for ``harness list``).

A transformers 5 config class is a dataclass-style class: its constructor fields are the
annotated, non-``ClassVar`` names of its body and of its config base classes
(``PreTrainedConfig`` included). ``config_fields`` collects them with ``ast``;
tests/unit/test_zoo.py checks the result against ``inspect.signature`` of the real class.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path

_CLASS = re.compile(r"^class (\w+)\(", re.M)


@functools.lru_cache(maxsize=1)
def transformers_root() -> Path:
    spec = importlib.util.find_spec("transformers")  # a top-level find_spec imports nothing
    if spec is None or spec.origin is None:
        raise ImportError("transformers is not installed")
    return Path(spec.origin).parent


@functools.lru_cache(maxsize=1)
def _class_files() -> dict[str, Path]:
    """Config class name -> the file that defines it."""
    root = transformers_root()
    out = {"PreTrainedConfig": root / "configuration_utils.py"}
    for file in sorted(root.glob("models/*/configuration_*.py")):
        for name in _CLASS.findall(file.read_text(errors="replace")):
            out.setdefault(name, file)
    return out


@functools.lru_cache(maxsize=None)
def _parsed(file: Path) -> ast.Module:
    return ast.parse(file.read_text(errors="replace"))


def _is_classvar(annotation: ast.expr) -> bool:
    node = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return (isinstance(node, ast.Name) and node.id == "ClassVar") or (
        isinstance(node, ast.Attribute) and node.attr == "ClassVar")


def _class_node(class_name: str) -> ast.ClassDef:
    file = _class_files().get(class_name)
    if file is None:
        raise KeyError(f"transformers has no config class {class_name!r}")
    node = next((n for n in _parsed(file).body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if node is None:
        raise KeyError(f"{file}: no class {class_name}")
    return node


def _config_bases(node: ast.ClassDef) -> list[str]:
    """The config classes ``node`` derives from (``PreTrainedConfig`` included)."""
    names = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases]
    return [name for name in names if name in _class_files() and name != node.name]


@functools.lru_cache(maxsize=None)
def config_fields(class_name: str) -> frozenset[str]:
    """Constructor fields of a transformers config class (its own and its config bases')."""
    node = _class_node(class_name)
    fields: set[str] = set()
    for base in _config_bases(node):
        fields |= config_fields(base)
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and not _is_classvar(stmt.annotation):
            fields.add(stmt.target.id)
    return frozenset(fields)


# ----------------------------------------------------------------- auto mappings and defaults


def transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def _ordered_dict_literal(file: Path, name: str) -> dict[str, str]:
    """``NAME = OrderedDict([("a", "B"), ...])`` at module level of ``file``, as a dict."""
    for stmt in _parsed(file).body:
        if (isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets)
                and isinstance(stmt.value, ast.Call) and stmt.value.args):
            return dict(ast.literal_eval(stmt.value.args[0]))
    raise KeyError(f"{file}: no {name} = OrderedDict([...])")


@functools.lru_cache(maxsize=1)
def causal_lm_model_types() -> dict[str, str]:
    """Causal-LM class name -> its model_type (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``)."""
    mapping = _ordered_dict_literal(transformers_root() / "models/auto/modeling_auto.py",
                                    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    return {cls: model_type for model_type, cls in mapping.items()}


@functools.lru_cache(maxsize=1)
def config_class_names() -> dict[str, str]:
    """model_type -> config class name (``CONFIG_MAPPING_NAMES``)."""
    return _ordered_dict_literal(transformers_root() / "models/auto/auto_mappings.py", "CONFIG_MAPPING_NAMES")


@functools.lru_cache(maxsize=1)
def _model_classes() -> frozenset[str]:
    root = transformers_root()
    return frozenset(name for file in root.glob("models/*/modeling_*.py")
                     for name in _CLASS.findall(file.read_text(errors="replace")))


def model_class_exists(name: str) -> bool:
    """transformers defines a model class of this name."""
    return name in _model_classes()


@functools.lru_cache(maxsize=None)
def config_defaults(class_name: str) -> dict[str, object]:
    """The literal defaults of a config class's fields (its bases' first); a field whose default
    is computed (``interval(...)(default=...)``, a factory) or absent is left out."""
    node = _class_node(class_name)
    out: dict[str, object] = {}
    for base in _config_bases(node):
        out.update(config_defaults(base))
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            try:
                out[stmt.target.id] = ast.literal_eval(stmt.value)
            except ValueError:
                out.pop(stmt.target.id, None)
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:  # class constants such as default_theta
                out[stmt.targets[0].id] = ast.literal_eval(stmt.value)
            except ValueError:
                pass
    return out
