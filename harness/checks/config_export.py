"""Config-only export (issue 21, class 6): the HF config the bridge writes from the Megatron side alone.

Exports in the other paths copy the source ``config.json`` next to the weights, so the config a
bridge *synthesises* (``megatron_to_hf_config``, what ``AutoBridge.from_auto_config`` uses for a
pruned or custom-sized model) is never read there. This check takes that synthesised config, as
the HF config class builds it, and compares every field of the source config with it. A field the
bridge drops falls back to the class default and shows here as a difference.

Fields the synthesised config adds that the source does not have (the bridge writes every
``CONFIG_MAPPING`` name, MoE and MLA ones included, into every family's dict) are listed in the
metrics, not failed: the HF config class stores them, the model class never reads them.

Special token ids belong to the tokenizer, which a provider does not hold: ``from_auto_config``
takes them from its reference config, rightly, since resizing a model keeps its tokenizer. They
are compared only where the bridge writes them itself (then its value wins over the reference).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from harness.results import CheckResult

NAME = "config-export"

# Bookkeeping, not the model: which transformers wrote the file, and where it was loaded from.
NOT_MODEL = frozenset({"transformers_version", "_name_or_path"})
TOKENIZER_FIELDS = frozenset({"bos_token_id", "eos_token_id", "pad_token_id"})


@dataclass(frozen=True)
class FieldDifference:
    """One source config field the synthesised config gets wrong (``exported`` is what it holds;
    a nested field is named with dots, e.g. ``rope_parameters.rope_theta``)."""

    field: str
    source: Any
    exported: Any

    def line(self) -> str:
        return f"{self.field}: exported {self.exported!r}, source {self.source!r}"


_ABSENT = "<absent>"


def not_compared(written: Mapping[str, Any]) -> frozenset[str]:
    """Top-level fields left out: bookkeeping, and the tokenizer's ids the bridge did not write."""
    return NOT_MODEL | (TOKENIZER_FIELDS - set(written))


def differences(source: Mapping[str, Any], exported: Mapping[str, Any], skip: frozenset[str] = NOT_MODEL,
                prefix: str = "") -> list[FieldDifference]:
    """Every field of ``source`` (recursively into dicts) whose value ``exported`` does not hold."""
    out: list[FieldDifference] = []
    for key in sorted(source):
        if not prefix and key in skip:
            continue
        want, got = source[key], exported.get(key, _ABSENT)
        if isinstance(want, Mapping) and isinstance(got, Mapping):
            out += differences(want, got, skip, f"{prefix}{key}.")
        elif want != got:
            out.append(FieldDifference(f"{prefix}{key}", want, got))
    return out


def added_fields(source: Mapping[str, Any], exported: Mapping[str, Any]) -> list[str]:
    return sorted(set(exported) - set(source) - NOT_MODEL)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()


def fingerprint(result: CheckResult) -> dict[str, list[Any]]:
    """What golden/ pins for a config export: each wrong field with a digest of what was exported,
    so a pinned failure that starts getting *another* field wrong (or the same one differently)
    is a change, not the same old failure (``harness.regression.golden.compare``)."""
    return {d["field"]: [[], "config-field", _digest(d["exported"])] for d in result.details}


def compare(source: Mapping[str, Any], exported: Mapping[str, Any], written: Mapping[str, Any],
            name: str = NAME) -> CheckResult:
    """``exported``: the synthesised config as the HF class builds it; ``written``: the dict the
    bridge returned (which fields it claims)."""
    skip = not_compared(written)
    found = differences(source, exported, skip)
    added = added_fields(source, exported)
    metrics = {"fields": sum(1 for k in source if k not in skip), "wrong": len(found), "added": added,
               "not_compared": sorted(skip & set(source))}
    details = [{"field": d.field, "source": repr(d.source), "exported": repr(d.exported)} for d in found]
    if not found:
        return CheckResult(name, True, f"all {metrics['fields']} source fields exported as they were "
                                       f"({len(added)} extra field(s) the model never reads)", metrics, details)
    shown = "; ".join(d.line() for d in found[:4])
    more = f" (+{len(found) - 4} more)" if len(found) > 4 else ""
    return CheckResult(name, False, f"{len(found)}/{metrics['fields']} field(s) wrong: {shown}{more}", metrics, details)
