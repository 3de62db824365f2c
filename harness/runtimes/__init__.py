"""Lanes and their runtimes: where Megatron runs (CPU/gloo or GPU/nccl) and what each lane can run.

* ``lanes``: every rule that says a case (or one of its checks) cannot run on a lane, and why;
* ``base``: the ``Runtime`` protocol the conversion code talks to;
* ``cpu`` / ``gpu``: the two runtimes.

Importing this package (or ``lanes``) does not import torch: the CLI lists cases with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.runtimes.base import Runtime
    from harness.runtimes.lanes import Placement


def make_runtime(lane: str, placement: "Placement | None" = None) -> "Runtime":
    """The runtime of ``lane`` (not yet entered); ``placement`` says how GPU ranks share devices."""
    if lane == "cpu":
        from harness.runtimes.cpu import CpuRuntime

        return CpuRuntime()
    if lane == "gpu":
        from harness.runtimes.gpu import GpuRuntime

        return GpuRuntime(placement=placement) if placement is not None else GpuRuntime()
    raise ValueError(f"unknown lane {lane!r}")
