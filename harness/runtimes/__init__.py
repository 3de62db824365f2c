"""The lanes' runtimes: where Megatron runs (CPU/gloo or GPU/nccl).

* ``base``: the ``Runtime`` protocol the conversion code talks to;
* ``cpu`` / ``gpu``: the two runtimes.

What each lane can run, and why not, is a rule on cases: ``harness.matrix.lanes`` (the bottom
floor, which cases and the CLI use without any runtime). Importing this package does not import
torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.runtimes.base import Runtime
    from harness.matrix.lanes import Placement


def make_runtime(lane: str, placement: "Placement | None" = None) -> "Runtime":
    """The runtime of ``lane`` (not yet entered); ``placement`` says how GPU ranks share devices."""
    if lane == "cpu":
        from harness.runtimes.cpu import CpuRuntime

        return CpuRuntime()
    if lane == "gpu":
        from harness.runtimes.gpu import GpuRuntime

        return GpuRuntime(placement=placement) if placement is not None else GpuRuntime()
    raise ValueError(f"unknown lane {lane!r}")
