"""Rank entry point: run many cases in one process group so the ~12 s import is paid once.

Launched by ``harness.execution.rank_launcher`` (under ``torch.distributed.run`` for world size > 1) with
a ``Plan``: the run's ``RunSpec`` with this launch's cases, whole, so a rank never reads or expands
``cases/`` (the entry point did, once). Everything it tells the launcher goes through the run folder (``RunDir``), so a
crashed rank cannot corrupt it: progress events, case results (rank 0), a non-zero rank's own
error, its log.

A Python exception in a case is recorded as an ``error`` result. With one rank the worker goes on
to the next case; with several it exits, because the other ranks may be stuck in a collective
the failed rank will never join. The launcher then relaunches the group for the remaining cases.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from harness.execution.run_dir import EXIT_CASE_ERROR, Plan, ProgressEvent, RunDir
from harness.run_spec import RunSpec

if TYPE_CHECKING:
    from harness.execution.case_coverage import CoverageRecorder


def _kill_children() -> None:
    """Before a hard exit: the children this rank started (megatron-core's async checkpoint writer
    runs a multiprocessing Manager, ~570 MB, filesystem_async.py) would outlive it, reparented."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()


def _redirect_output(log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def import_stack(trees: list, lane: str):
    """What a rank imports and installs before its first case: the harness's conversion code, the
    Bridge's API it calls, the source trees' packages (verified to come from the trees) and the
    lane's runtime redirects, entered and left once. Returns (case_executor, runtime, imported). The
    gate's preflight (``--probe``) runs exactly this, so a tree that breaks any of it is named
    once, before any case starts."""
    import importlib

    import torch.distributed  # noqa: F401 - the collectives every case uses

    from harness.conversion import case_executor
    from harness.execution import source_trees
    from harness.runtimes import make_runtime

    imported = source_trees.verify_imports(trees)  # raises (-> every case errors) on a wrong import
    for module in BRIDGE_API:
        importlib.import_module(module)
    runtime = make_runtime(lane)
    if lane == "cpu":  # every CPU redirect's upstream target must still exist (the GPU lane has none)
        with runtime:
            pass
    return case_executor, runtime, imported


# The Bridge modules the harness calls into (harness.conversion.bridge_calls, megatron_fsdp).
BRIDGE_API = ("megatron.bridge", "megatron.bridge.models", "megatron.bridge.training.checkpointing",
              "megatron.bridge.training.model_load_save", "megatron.bridge.training.config",
              "megatron.bridge.training.state")


def faults_for(spec: RunSpec, case_id: str):
    """The run's seeded faults around one case: the ``active(specs, case_id)`` context manager of
    the module the spec names (``RunSpec.fault_provider``), imported by name only when there are
    faults; a no-op context otherwise."""
    import contextlib
    import importlib

    if not spec.faults:
        return contextlib.nullcontext()
    return importlib.import_module(spec.fault_provider).active(spec.faults, case_id)


def probe(trees_json: str, lane: str) -> int:
    """``--probe``: import the stack as a rank would; exit 0, or print the traceback and exit 1."""
    import json
    import traceback

    from harness.run_spec import SourceTree

    try:
        import_stack([SourceTree(**t) for t in json.loads(trees_json)], lane)
    except BaseException:  # noqa: BLE001 - whatever the tree breaks is the answer
        traceback.print_exc()
        return 1
    return 0


def run_plan(plan: Plan, run: RunDir, executor, runtime, rank: int = 0, world: int = 1,
             recorder: "CoverageRecorder | None" = None) -> int:
    """Run the plan's cases in order inside ``runtime`` (the process group is up): progress events,
    results (rank 0), a non-zero rank's own error. Returns 0, or ``EXIT_CASE_ERROR`` when a case
    failed in a world of several (the peers may be stuck in a collective: stop here). A
    ``CoverageRecorder`` (``RunSpec.line_coverage``) notes what each case ran."""
    spec = plan.spec
    with runtime:
        for case in spec.cases:
            run.append_progress(plan.group, ProgressEvent(case.id, ProgressEvent.START, time.time(), rank))
            started = time.monotonic()
            try:
                with faults_for(spec, case.id), (recorder.case(case.id) if recorder else contextlib.nullcontext()):
                    result = executor.run_case(case, runtime, workdir=run.scratch(case.id))
            except BaseException as exc:  # noqa: BLE001 - every failure becomes a recorded result
                # BaseException: torch DCP's CheckpointException (a failed save or load plan) derives
                # from it, not from Exception (torch/distributed/checkpoint/api.py).
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                result = executor.error_result(case, exc, started, lane=spec.lane)
                print(result.error, file=sys.stderr, flush=True)
                if rank == 0 or world == 1:
                    run.write_case_result(result)
                else:
                    run.write_rank_error(case.id, rank, result.error, result.cause)
                run.append_progress(plan.group, ProgressEvent(case.id, ProgressEvent.END, time.time(), rank))
                if world > 1:
                    return EXIT_CASE_ERROR
                continue
            if rank == 0:
                run.write_case_result(result)
            run.append_progress(plan.group, ProgressEvent(case.id, ProgressEvent.END, time.time(), rank))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness.execution.rank_worker")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--plan", type=Path)
    mode.add_argument("--probe", metavar="TREES_JSON", help="import the stack with these source trees, run no case")
    parser.add_argument("--lane", default="cpu", help="with --probe: the lane whose runtime to install")
    args = parser.parse_args(argv)
    if args.probe is not None:
        return probe(args.probe, args.lane)
    plan: Plan = RunDir.read_plan(args.plan)
    spec = plan.spec
    run = RunDir(plan.run_dir)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _redirect_output(run.rank_log(plan.group, rank))
    run.write_rank_process_group(plan.group, rank, os.getpgrp())
    print(f"[worker] rank {rank}/{world} lane={spec.lane} cases={len(spec.cases)}", flush=True)

    # Heavy imports only here, after the log redirect, so their warnings land in the rank log.
    import torch.distributed as dist

    from harness.execution import provenance
    from harness.runtimes import make_runtime

    recorder = None
    if spec.line_coverage:  # started before the stack's imports: class bodies run there
        from harness.execution.case_coverage import CoverageRecorder

        recorder = CoverageRecorder(list(spec.line_coverage))
        recorder.start()
    executor, _, imported = import_stack(spec.source_trees, spec.lane)
    runtime = make_runtime(spec.lane, spec.placement)
    if rank == 0:
        run.write_provenance(plan.group, provenance.rank_group(imported, runtime))

    timeout = timedelta(seconds=plan.collective_timeout_s)
    if world == 1:  # no peers: an in-memory store, no TCP port to race for
        dist.init_process_group(backend=runtime.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:  # torchrun --standalone: the agent's store, on a port its own process bound
        dist.init_process_group(backend=runtime.backend, timeout=timeout)
    exit_code = run_plan(plan, run, executor, runtime, rank, world, recorder)
    if recorder is not None:
        run.write_coverage(plan.group, rank, recorder.finish())
    if rank == 0:  # again, now with what the runtime decided while building the models
        run.write_provenance(plan.group, provenance.rank_group(imported, runtime))
    if exit_code:
        sys.stdout.flush()
        sys.stderr.flush()
        _kill_children()
        os._exit(exit_code)  # peers may be blocked in a collective; do not wait for teardown
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
