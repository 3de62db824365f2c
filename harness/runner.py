"""Execute one case inside a rank: build, convert, compare. Collective over the world.

Every rank runs the same steps (Megatron is SPMD); rank 0 owns the comparisons and the result.
Seeded faults for tests and ``harness selftest`` enter through ``Hooks``, never by editing code.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from harness import checks, convert, forward, zoo
from harness.cases import Case
from harness.checks import CheckResult
from harness.formats import hf as hf_format

PASS, FAIL, ERROR, TIMEOUT, SKIP = "pass", "fail", "error", "timeout", "skip"


@dataclass
class Hooks:
    """Points where a test may inject a fault into a real run (all optional)."""

    after_export: Callable[[convert.Export], None] | None = None
    before_forward: Callable[[convert.MegatronModel], None] | None = None


@dataclass
class CaseResult:
    case_id: str
    status: str
    checks: list[CheckResult] = field(default_factory=list)
    duration_s: float = 0.0
    error: str = ""
    world_size: int = 1
    lane: str = "cpu"

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"{self.case_id}: no check named {name!r} (have {[c.name for c in self.checks]})")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checks"] = [c.to_dict() for c in self.checks]
        out["failed_checks"] = self.failed_checks
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CaseResult":
        data = dict(data)
        data.pop("failed_checks", None)
        data["checks"] = [CheckResult(**c) for c in data.get("checks", [])]
        return cls(**data)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def materialize_model(spec: zoo.ModelSpec):
    """Rank 0 builds the tiny checkpoint (once, cached); the others wait for it."""
    if _rank() == 0:
        path = zoo.materialize(spec)
    _barrier()
    if _rank() != 0:
        path = zoo.materialize(spec)  # already there: returns the path without building
    return path


def merge_over_ranks(result: CheckResult) -> CheckResult:
    """Combine a per-rank check (each rank holds its own shard) into one on rank 0."""
    if _world() == 1:
        return result
    gathered: list[CheckResult | None] = [None] * _world()
    dist.all_gather_object(gathered, result)
    failing = [(r, c) for r, c in enumerate(gathered) if c is not None and not c.passed]
    if not failing:
        total = sum(c.metrics.get("params", 0) for c in gathered if c)
        return CheckResult(result.name, True, f"{total}/{total} Megatron params written by the load (all ranks)",
                           metrics={"params": total, "unloaded": []})
    rank, first = failing[0]
    return CheckResult(result.name, False, f"rank {rank}: {first.summary}",
                       metrics={"failing_ranks": [r for r, _ in failing], **first.metrics})


def gather_logits(local: torch.Tensor | None) -> torch.Tensor:
    """The logits live on the last pipeline stage; bring one copy to every rank."""
    if _world() == 1:
        assert local is not None
        return local
    gathered: list[torch.Tensor | None] = [None] * _world()
    dist.all_gather_object(gathered, local)
    return next(t for t in gathered if t is not None)


def run_memory_roundtrip(case: Case, runtime, hooks: Hooks) -> list[CheckResult]:
    """HF -> Megatron (load_hf_weights) -> HF (export_hf_weights), plus logit parity."""
    hf_dir = materialize_model(case.model)
    hf_config = case.model.hf_config
    bridge = convert.open_bridge(hf_dir)
    model = convert.build_model(bridge, case.family, case.layout, runtime, hf_config)
    convert.load_hf(model)
    results = [merge_over_ranks(convert.check_fully_loaded(model))]

    exported = convert.export_hf(model, keep=_rank() == 0)
    if hooks.after_export:
        hooks.after_export(exported)
    if _rank() == 0:
        results.append(
            checks.compare_tensors(hf_format.iter_tensors(hf_dir), exported.tensors, duplicates=exported.duplicates)
        )
    del exported

    if hooks.before_forward:
        hooks.before_forward(model)
    batch = forward.fixed_batch(hf_config["vocab_size"])
    logits = gather_logits(forward.megatron_logits(model.chunks, batch, hf_config["vocab_size"], runtime.device))
    if _rank() == 0:
        results.append(checks.logit_parity(forward.hf_logits(hf_dir, batch), logits, name="logits-hf-vs-megatron"))
    return results


PATH_RUNNERS: dict[str, Callable[[Case, Any, Hooks], list[CheckResult]]] = {
    "memory/roundtrip": run_memory_roundtrip,
}


def run_case(case: Case, runtime, hooks: Hooks | None = None) -> CaseResult:
    """Run ``case`` on this rank. Exceptions propagate (the worker decides what to do)."""
    start = time.monotonic()
    results = PATH_RUNNERS[case.path](case, runtime, hooks or Hooks())
    status = PASS if all(r.passed for r in results) else FAIL
    return CaseResult(
        case_id=case.id,
        status=status,
        checks=results,
        duration_s=round(time.monotonic() - start, 3),
        world_size=_world(),
        lane=case.lane,
    )


def error_result(case: Case, exc: BaseException, started: float) -> CaseResult:
    return CaseResult(
        case_id=case.id,
        status=ERROR,
        duration_s=round(time.monotonic() - started, 3),
        error="".join(traceback.format_exception(exc)),
        world_size=_world(),
        lane=case.lane,
    )
