"""Provider parity: the model a case builds at a parallel layout is the model it builds at TP1.

Some checks cannot run at every layout (no Megatron forward for MoE at TP > 1 on CPU, for
example), so a provider bug that only shows at TP > 1 would pass there unseen. This check closes
that hole: every field of the finalized provider must equal the field of the same model's
provider at TP1 (where the logit check does run), except the parallelism fields themselves.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from harness.results import CheckResult

NAME = "provider-vs-tp1"

# Fields that say how the model is split, not what it computes; and those finalize() derives
# from them (microbatch_group_size_per_vp_stage defaults to the VPP size). Private fields
# (``_pg_collection``: the process groups provide_distributed_model attaches) are run-time state
# and are not compared either.
PARALLEL_FIELDS = frozenset({
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "context_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size", "sequence_parallel",
    "microbatch_group_size_per_vp_stage", "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
})


def _comparable(value: Any) -> Any:
    """A value two providers can be compared on: functions by name, partials by their parts."""
    if isinstance(value, functools.partial):
        return ("partial", _comparable(value.func), tuple(_comparable(a) for a in value.args),
                tuple(sorted((k, _comparable(v)) for k, v in value.keywords.items())))
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if isinstance(value, (list, tuple)):
        return type(value)(_comparable(v) for v in value)
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    return value


def snapshot(provider: Any) -> dict[str, Any]:
    """Every dataclass field of a finalized provider, comparable across two builds."""
    return {f.name: _comparable(getattr(provider, f.name)) for f in dataclasses.fields(provider)}


def compare(reference: dict[str, Any], candidate: dict[str, Any], *, layout: str, name: str = NAME) -> CheckResult:
    """``candidate`` (built at ``layout``) against ``reference`` (built at TP1)."""
    differ = []
    for key in sorted(set(reference) | set(candidate)):
        if key in PARALLEL_FIELDS or key.startswith("_"):
            continue
        want, got = reference.get(key, "<absent>"), candidate.get(key, "<absent>")
        try:
            same = bool(want == got)
        except Exception:  # noqa: BLE001 - values whose == does not give a bool (tensors)
            same = repr(want) == repr(got)
        if not same:
            differ.append(f"{key} = {got!r} at {layout}, {want!r} at tp1")
    compared = len([k for k in set(reference) - PARALLEL_FIELDS if not k.startswith("_")])
    if differ:
        return CheckResult(name, False, f"{len(differ)}/{compared} provider fields differ from TP1 (first: {differ[0]})",
                           metrics={"differ": differ[:50], "compared": compared})
    return CheckResult(name, True, f"{compared}/{compared} provider fields as at TP1 (parallelism fields aside)",
                       metrics={"differ": [], "compared": compared})
