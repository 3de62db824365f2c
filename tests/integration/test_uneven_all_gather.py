"""The CPU lane's all_gather of unequal sizes returns what NCCL returns (two real gloo ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.cpu


def _rank(rank: int, init_file: str, results) -> None:
    from harness.runtimes.cpu import CpuRuntime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mine = torch.arange(3 + 4 * rank, dtype=torch.bfloat16) + 100 * rank  # 3 and 7 elements
        outputs = [torch.full((3,), float("nan"), dtype=torch.bfloat16), torch.full((7,), float("nan"), dtype=torch.bfloat16)]
        try:
            dist.all_gather([o.clone() for o in outputs], mine)
            plain = "accepted"
        except RuntimeError as err:
            plain = str(err).splitlines()[0]
        with CpuRuntime():
            dist.all_gather(outputs, mine)
            equal = [torch.empty(2), torch.empty(2)]
            dist.all_gather(equal, torch.full((2,), float(rank)))  # equal sizes: the original collective
        results[rank] = (plain, [o.tolist() for o in outputs], [e.tolist() for e in equal])
    finally:
        dist.destroy_process_group()


def test_unequal_sizes_gather_whole_into_each_slot_and_gloo_alone_refuses(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in (0, 1):
        plain, outputs, equal = results[rank]
        assert plain != "accepted", "gloo took unequal sizes: the redirect would not be needed"
        assert outputs == [[0.0, 1.0, 2.0], [100.0 + i for i in range(7)]]
        assert equal == [[0.0, 0.0], [1.0, 1.0]]
