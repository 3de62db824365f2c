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
def _transformers_root() -> Path:
    spec = importlib.util.find_spec("transformers")  # a top-level find_spec imports nothing
    if spec is None or spec.origin is None:
        raise ImportError("transformers is not installed")
    return Path(spec.origin).parent


@functools.lru_cache(maxsize=1)
def _class_files() -> dict[str, Path]:
    """Config class name -> the file that defines it."""
    root = _transformers_root()
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


@functools.lru_cache(maxsize=None)
def config_fields(class_name: str) -> frozenset[str]:
    """Constructor fields of a transformers config class (its own and its config bases')."""
    file = _class_files().get(class_name)
    if file is None:
        raise KeyError(f"transformers has no config class {class_name!r}")
    node = next((n for n in _parsed(file).body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if node is None:
        raise KeyError(f"{file}: no class {class_name}")
    fields: set[str] = set()
    for base in node.bases:
        name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
        if name in _class_files() and name != class_name:
            fields |= config_fields(name)
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and not _is_classvar(stmt.annotation):
            fields.add(stmt.target.id)
    return frozenset(fields)
