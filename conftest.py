"""Shared pytest fixtures. (The case matrix is parametrized in tests/test_matrix.py.)"""

from __future__ import annotations

import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gloo_world():
    """A one-rank gloo process group for in-process Megatron tests (one per xdist worker)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture
def cpu_runtime(gloo_world):
    """The CPU runtime, active for one test only (it is restored between tests)."""
    from harness.cpu_runtime import CpuRuntime

    with CpuRuntime() as runtime:
        yield runtime


@pytest.fixture(scope="session")
def case_set():
    from harness.cases import load_cases

    return load_cases()


# ----------------------------------------------------------------------------- the case matrix


def pytest_generate_tests(metafunc):
    from harness import pytest_matrix

    if pytest_matrix.PARAM in metafunc.fixturenames:
        from harness.cases import load_cases

        metafunc.parametrize(pytest_matrix.PARAM, pytest_matrix.params(load_cases()))


@pytest.fixture(scope="session")
def matrix_runner(request):
    from harness.pytest_matrix import MatrixRunner

    return MatrixRunner(session=request.session)
