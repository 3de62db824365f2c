"""Seeded regressions, injected at run time by patching Megatron-Bridge / Megatron-Core functions.

A fault is a named context manager. While it is active, one upstream function behaves the way a
real regression would; on exit the original is restored. Faults are applied inside the worker
processes (every rank) around each case, so they exercise the same code paths as a real bug.
Installed files are never edited.

``harness run CASE --inject NAME`` and ``harness selftest`` use this registry.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import os
import time
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


def parse(spec: str) -> tuple[str, str]:
    """``NAME`` or ``NAME@CASE_GLOB`` (the fault applies only to matching case IDs)."""
    name, _, pattern = spec.partition("@")
    if name not in FAULTS:
        raise KeyError(f"unknown fault {name!r} (known: {', '.join(sorted(FAULTS))})")
    return name, pattern or "*"


@contextlib.contextmanager
def active(specs: list[str], case_id: str = "") -> Iterator[None]:
    """Apply every fault in ``specs`` whose case pattern matches ``case_id``."""
    with contextlib.ExitStack() as stack:
        for spec in specs:
            name, pattern = parse(spec)
            if fnmatch.fnmatchcase(case_id, pattern):
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


# ------------------------------------------------------------------- faults of the harness itself
# Not conversion regressions: they make a rank hang or die, to prove the launcher copes.


@fault("launcher-hang", "every rank sleeps forever while loading HF weights")
def _hang():
    def sleep_forever(*_args, **_kwargs):
        while True:
            time.sleep(60)

    with patched("harness.convert", "load_hf", sleep_forever):
        yield


@fault("launcher-crash", "the highest rank dies abruptly (exit 9) while loading HF weights")
def _crash():
    from harness import convert

    original = convert.load_hf

    def die_on_last_rank(*args, **kwargs):
        if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
            os._exit(9)
        return original(*args, **kwargs)

    with patched("harness.convert", "load_hf", die_on_last_rank):
        yield
