"""The ``Runtime`` protocol: what the conversion code may ask of a lane, and nothing more.

A runtime is a context manager active for the whole life of a rank's process group. Routes,
bridge calls and the forward pass receive it and never look at which lane they are on except
through ``lane`` (for lane rules, ``harness.runtimes.lanes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from harness.matrix.layouts import Layout
    from harness.matrix.zoo import ModelSpec


class Runtime(Protocol):
    lane: str  # "cpu" | "gpu" (harness.runtimes.lanes.LANES)
    backend: str  # torch.distributed backend of the process group
    use_cpu_initialization: bool  # provide_distributed_model builds the weights on the CPU

    @property
    def device(self) -> "torch.device":
        """Where this rank's model and inputs live."""

    def __enter__(self) -> "Runtime": ...

    def __exit__(self, *exc: Any) -> None: ...

    def init_model_parallel(self, layout: "Layout", seed: int | None = None) -> None:
        """(Re)initialise Megatron's parallel state for ``layout`` on the existing process group;
        ``seed`` reseeds the model-parallel RNGs where the lane has them."""

    def configure_provider(self, provider: Any, model: "ModelSpec") -> None:
        """Adjust a bridge provider for this lane before ``finalize()`` (spec, dtypes, fusions)."""

    def provenance(self) -> dict[str, Any]:
        """Decisions this runtime took that a reader of the report must know (e.g. a fusion it
        turned off because its kernel is missing)."""
