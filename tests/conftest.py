"""The tests' own fixtures: an in-process gloo world, the CPU runtime, the repository's cases.
The matrix's options, markers and fixtures come from the plugin (top-level conftest.py)."""

from __future__ import annotations

import os
from unittest import mock

import pytest


@pytest.fixture(autouse=True)
def environ_restored():
    """Megatron sets NVTE_FLASH_ATTN / NVTE_FUSED_ATTN / NVTE_UNFUSED_ATTN while building a model
    (language_module.py _set_attention_backend), and asserts when they disagree with the next
    model's backend. A test that builds one in-process must not leave them to later tests, nor to
    the matrix's workers, which inherit this process's environment (a llama build, backend auto,
    set NVTE_FUSED_ATTN=1; every gemma case, backend flash, then crashed). The worker restores the
    environment after each case itself (case_executor.restored_environ); module- and session-scoped
    fixtures that build models keep it themselves (they set up outside this fixture)."""
    with mock.patch.dict(os.environ):
        yield


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
    from harness.matrix.cases import load_cases_once

    return load_cases_once()
