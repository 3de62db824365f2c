"""Load coverage: every Megatron parameter was written by the load.

The harness fills every Megatron parameter with a NaN *sentinel* before loading
(``harness.conversion.bridge.fill_sentinel``), so a parameter the loader silently skipped cannot
masquerade as loaded: a partial load would otherwise keep random-init values that look
perfectly plausible. Each rank checks its own shards; ``merge_over_ranks`` combines them.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from harness.results import CheckResult

NAME = "load-coverage"


def _preview(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", +{len(names) - 3} more" if len(names) > 3 else "")


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: a Megatron-FSDP DTensor's local shard (each element lives
    on exactly one rank; a whole-tensor op would redistribute it), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_fully_loaded(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], *, name: str = NAME) -> CheckResult:
    """Every parameter on this rank was overwritten by the load (no sentinel left)."""
    untouched = []
    total = 0
    for pname, param in named_parameters:
        total += 1
        if torch.isnan(local_shard(param)).any():
            untouched.append(pname)
    if untouched:
        return CheckResult(
            name=name,
            passed=False,
            summary=f"{len(untouched)}/{total} Megatron params never written by the load: {_preview(untouched)}",
            metrics={"unloaded": untouched, "params": total},
        )
    return CheckResult(
        name=name,
        passed=True,
        summary=f"{total}/{total} Megatron params written by the load",
        metrics={"unloaded": [], "params": total},
    )


def merge_over_ranks(result: CheckResult) -> CheckResult:
    """Combine a per-rank coverage result (each rank holds its own shards) into one on rank 0."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return result
    gathered: list[CheckResult | None] = [None] * world
    dist.all_gather_object(gathered, result)
    failing = [(r, c) for r, c in enumerate(gathered) if c is not None and not c.passed]
    if not failing:
        total = sum(c.metrics.get("params", 0) for c in gathered if c)
        return CheckResult(result.name, True, f"{total}/{total} Megatron params written by the load (all ranks)",
                           metrics={"params": total, "unloaded": []})
    first_rank, first = failing[0]
    return CheckResult(result.name, False, f"rank {first_rank}: {first.summary}",
                       metrics={**first.metrics, "failing_ranks": [r for r, _ in failing]})
