"""The tests' own fixtures: an in-process gloo world, the CPU runtime, the repository's cases.
The matrix's options, markers and fixtures come from the plugin (top-level conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def gloo_world():
    """A one-rank gloo process group for in-process Megatron tests (one per xdist worker)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        store = dist.HashStore()  # a world of one needs no TCP port
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture
def cpu_runtime(gloo_world):
    """The CPU runtime, active for one test only (it is restored between tests)."""
    from harness.runtimes.cpu import CpuRuntime

    with CpuRuntime() as runtime:
        yield runtime


@pytest.fixture(scope="session")
def case_set():
    from harness.matrix.cases import load_cases

    return load_cases()
