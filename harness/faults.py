"""Seeded regressions, injected at run time by patching Megatron-Bridge / Megatron-Core functions.

A fault is a named context manager. While it is active, one upstream function behaves the way a
real regression would; on exit the original is restored. Faults are applied inside the worker
processes (every rank) around each case, so they exercise the same code paths as a real bug.
Installed files are never edited.

``harness run CASE --inject NAME`` and ``harness selftest`` use this registry.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    apply: Callable[[], contextlib.AbstractContextManager]


FAULTS: dict[str, Fault] = {}


def fault(name: str, description: str):
    def register(fn: Callable[[], Iterator[None]]):
        FAULTS[name] = Fault(name=name, description=description, apply=contextlib.contextmanager(fn))
        return fn

    return register


@contextlib.contextmanager
def patched(target: str, attribute: str, replacement: Any) -> Iterator[Any]:
    """Replace ``module_or_class.attribute`` for the block; yields the original."""
    module_path, _, class_name = target.partition(":")
    owner: Any = importlib.import_module(module_path)
    if class_name:
        owner = getattr(owner, class_name)
    original = getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    try:
        yield original
    finally:
        setattr(owner, attribute, original)


@contextlib.contextmanager
def active(names: list[str]) -> Iterator[None]:
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise KeyError(f"unknown fault(s) {unknown}; known: {sorted(FAULTS)}")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(FAULTS[name].apply())
        yield


# --------------------------------------------------------------------------------------------
_BRIDGE = "megatron.bridge.models.conversion.model_bridge:MegatronModelBridge"


@fault("export-drops-final-norm", "export_hf_weights silently omits model.norm.weight")
def _export_drops_final_norm():
    from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge

    original = MegatronModelBridge.stream_weights_megatron_to_hf

    def stream(self, *args, **kwargs):
        for item in original(self, *args, **kwargs):
            if item[0] != "model.norm.weight":
                yield item

    with patched(_BRIDGE, "stream_weights_megatron_to_hf", stream):
        yield
