"""Can several ranks share one GPU? Try each collective Megatron, Megatron-FSDP and DCP use.

Run by torchrun, one process per rank, with the ranks placed as ``--ranks-per-gpu`` says (the
placement of ``harness.matrix.lanes.Placement``)::

    python3 -m torch.distributed.run --standalone --nproc_per_node 2 scripts/gpu/probe_collectives.py \
        --backend gloo --ranks-per-gpu 2 --json $OUT/probe-gloo.json

Rank 0 prints one line per collective (``ok`` or the first line of the error) and, with ``--json``,
writes them as a list of ``{"op", "dtype", "ok", "detail"}``. Every result is checked against
the value it must have (integers in float tensors, so sums are exact under any order): a
transport that returns wrong data is a failure, not a pass. Exit 0 if every collective worked.
A backend that cannot even form the group (NCCL with two ranks on one GPU: "Duplicate GPU
detected") is reported as the ``init`` row. ``--device cpu`` runs the same probe without a GPU
(tests/integration/test_collective_probe.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Callable


UNTYPED = ("all_gather_object", "barrier")  # no tensor dtype: probed once


@dataclass(frozen=True)
class Row:
    op: str
    dtype: str
    ok: bool
    detail: str = ""


def probes(dist, torch, device, rank: int, world: int, dtype) -> dict[str, Callable[[], bool]]:
    """op -> a call that returns whether its result is exactly right on this rank."""

    def full(value, n=4):
        return torch.full((n,), float(value), dtype=dtype, device=device)

    def unset(n):  # an output a transport that writes nothing leaves NaN, never right by chance
        return full(float("nan"), n)

    def all_reduce():
        t = full(rank + 1)
        dist.all_reduce(t)
        return bool((t == world * (world + 1) / 2).all())

    def all_gather_into_tensor():  # Megatron-FSDP's parameter unshard; TE's sequence-parallel gather
        out = unset(4 * world)
        dist.all_gather_into_tensor(out, full(rank))
        return bool((out.view(world, 4) == torch.arange(world, device=device, dtype=dtype)[:, None]).all())

    def reduce_scatter_tensor():  # Megatron-FSDP's gradient reduce; sequence parallelism
        inp = torch.arange(4 * world, dtype=dtype, device=device)
        out = unset(4)
        dist.reduce_scatter_tensor(out, inp)
        return bool((out == world * torch.arange(4 * rank, 4 * rank + 4, dtype=dtype, device=device)).all())

    def broadcast():
        t = full(7 if rank == 0 else -1)
        dist.broadcast(t, 0)
        return bool((t == 7).all())

    def all_to_all_single_uneven():  # the alltoall MoE token dispatcher
        send = [r + 1 for r in range(world)]  # to rank r: r + 1 elements
        recv = [rank + 1] * world
        inp = torch.cat([torch.full((n,), float(rank), dtype=dtype, device=device) for n in send])
        out = unset(sum(recv))
        dist.all_to_all_single(out, inp, recv, send)
        expect = torch.cat([torch.full((rank + 1,), float(src), dtype=dtype, device=device) for src in range(world)])
        return bool((out == expect).all())

    def async_all_gather_on_a_side_stream():  # Megatron-FSDP overlaps its gathers on its own stream
        out = unset(4 * world)
        src = full(rank)
        if device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                work = dist.all_gather_into_tensor(out, src, async_op=True)
            work.wait()
            torch.cuda.current_stream().wait_stream(side)
        else:
            dist.all_gather_into_tensor(out, src, async_op=True).wait()
        return bool((out.view(world, 4)[:, 0] == torch.arange(world, dtype=dtype, device=device)).all())

    def all_gather_object():  # DCP's save and load plans
        got = [None] * world
        dist.all_gather_object(got, {"rank": rank})
        return got == [{"rank": r} for r in range(world)]

    def subgroup_all_reduce():  # parallel_state's TP/DP groups are subgroups
        group = dist.new_group(ranks=list(range(world)))
        t = full(1)
        dist.all_reduce(t, group=group)
        return bool((t == world).all())

    def barrier():
        dist.barrier()
        return True

    return {f.__name__: f for f in (all_reduce, all_gather_into_tensor, reduce_scatter_tensor, broadcast,
                                    all_to_all_single_uneven, async_all_gather_on_a_side_stream,
                                    all_gather_object, subgroup_all_reduce, barrier)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=["gloo", "nccl"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--ranks-per-gpu", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", local // args.ranks_per_gpu)  # lanes.Placement.device_index
        torch.cuda.set_device(device)
    rows: list[Row] = []
    try:
        dist.init_process_group(args.backend, timeout=timedelta(seconds=60),
                                **({"device_id": device} if args.backend == "nccl" else {}))
        dist.barrier()  # NCCL forms its communicator here at the latest
        rows.append(Row("init", "", True, f"{args.backend}, {world} ranks, rank {rank} on {device}"))
    except Exception as exc:  # noqa: BLE001 - the probe reports, it does not crash
        rows.append(Row("init", "", False, f"{type(exc).__name__}: {_first_line(exc)}"))
    if rows[0].ok:
        for dtype in (torch.float32, torch.bfloat16):
            for op, call in probes(dist, torch, device, rank, world, dtype).items():
                if op in UNTYPED and dtype != torch.float32:
                    continue
                try:
                    ok = call()
                    rows.append(Row(op, str(dtype).removeprefix("torch."), ok, "" if ok else "wrong result"))
                except Exception as exc:  # noqa: BLE001
                    rows.append(Row(op, str(dtype).removeprefix("torch."), False, f"{type(exc).__name__}: {_first_line(exc)}"))
        if device.type == "cuda":
            torch.cuda.synchronize()
    if rank == 0:
        for row in rows:
            print(f"{args.backend:5} {row.op:36} {row.dtype:9} {'ok' if row.ok else 'FAIL'}  {row.detail}", flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump([asdict(r) for r in rows], fh, indent=1)
    if rows[0].ok:
        dist.destroy_process_group()
    return 0 if all(r.ok for r in rows) else 1


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    # NCCL's reason sits on its "Last error:" line, not on the first.
    last = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("Last error")), "")
    return (lines[0] if lines else "") + (f" ({last.strip()})" if last else "")


if __name__ == "__main__":
    sys.exit(main())
