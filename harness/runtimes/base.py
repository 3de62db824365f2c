"""The ``Runtime`` protocol: what the conversion code may ask of a lane, and nothing more.

A runtime is a context manager active for the whole life of a rank's process group. Routes,
bridge calls and the forward pass receive it and never look at which lane they are on except
through ``lane`` (for lane rules, ``harness.matrix.lanes``).

Also here, shared by both runtimes: ``release_process_groups``, what ``init_model_parallel`` does
before it builds the next layout's groups. Importing this module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from harness.matrix.layouts import Layout
    from harness.matrix.model_spec import ModelSpec


class Runtime(Protocol):
    lane: str  # "cpu" | "gpu" (harness.matrix.lanes.LANES)
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


def release_process_groups() -> int:
    """Destroy every process group but the default one; returns how many.

    ``parallel_state.destroy_model_parallel`` only forgets its ~20 groups (megatron/core/
    parallel_state.py sets the globals to None), so each re-initialisation leaves them alive, each
    with its gloo threads (measured: 60 more threads per initialisation, in every rank). Over a
    rank group's cases that is thousands of threads and a load average in the hundreds on 2 cores.
    The GPU lane's groups (NCCL, or gloo where ranks share a GPU) stay alive the same way. Both
    runtimes call this from ``init_model_parallel``, between layouts, when no model of the old one
    is used any more (harness.conversion deletes it first); the default group, the rank group's
    own, stays.

    DTensor's sharding-propagation caches are cleared too: they key on the DeviceMesh, which
    compares equal by its rank layout alone, so a Megatron-FSDP model of the next layout would be
    handed output specs that still name the destroyed groups ("Could not resolve the process group
    registered under the name 2", seen on the first strict reload).
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    stale = [pg for pg in list(distributed_c10d._world.pg_map) if pg is not distributed_c10d.GroupMember.WORLD]
    for pg in stale:
        dist.destroy_process_group(pg)
    if stale:
        clear_dtensor_caches()
    return len(stale)


def clear_dtensor_caches() -> None:
    from torch.distributed.tensor import _redistribute
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    _redistribute._gen_transform_infos.cache_clear()
