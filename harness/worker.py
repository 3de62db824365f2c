"""Rank entry point: run many cases in one process group so the ~12 s import is paid once.

Launched by ``harness.launch`` (under ``torch.distributed.run`` for world size > 1). Protocol with
the launcher, all through files in the run directory so a crashed rank cannot corrupt it:

* ``progress/rank<R>.jsonl``: one ``{"case", "event": "start"|"end", "t"}`` line per step, so
  the launcher knows which case a hung or dead rank was in, and since when;
* ``cases/<slug>.json``: the case result, written atomically by rank 0;
* ``logs/<group>/rank<R>.log``: this rank's stdout and stderr.

A Python exception in a case is recorded as an ``error`` result. With one rank the worker goes on
to the next case; with several it exits, because the other ranks may be stuck in a collective
the failed rank will never join. The launcher then relaunches the group for the remaining cases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

EXIT_CASE_ERROR = 3


def _redirect_output(log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _progress(run_dir: Path, rank: int, case_id: str, event: str) -> None:
    line = json.dumps({"case": case_id, "event": event, "t": time.time()})
    with open(run_dir / "progress" / f"rank{rank}.jsonl", "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness.worker")
    parser.add_argument("--plan", type=Path, required=True)
    args = parser.parse_args(argv)
    plan = json.loads(args.plan.read_text())
    run_dir = Path(plan["run_dir"])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _redirect_output(run_dir / "logs" / plan["group"] / f"rank{rank}.log")
    (run_dir / "progress").mkdir(parents=True, exist_ok=True)
    print(f"[worker] rank {rank}/{world} lane={plan['lane']} cases={len(plan['cases'])}", flush=True)

    # Heavy imports only here, after the log redirect, so their warnings land in the rank log.
    import torch.distributed as dist

    from harness import faults, report, runner, sourcetree
    from harness.cases import load_cases

    trees = plan.get("source_trees", [])
    imported = sourcetree.verify_imports(trees)  # raises (-> every case errors) on a wrong import
    if rank == 0:
        report.write_provenance(run_dir, plan["group"], imported)

    runtime = _make_runtime(plan["lane"])
    dist.init_process_group(backend=runtime.backend, timeout=timedelta(seconds=float(plan["collective_timeout_s"])))
    case_set = load_cases(Path(plan["cases_dir"]))
    exit_code = 0
    with runtime:
        for case_id in plan["cases"]:
            case = case_set.get(case_id)
            _progress(run_dir, rank, case_id, "start")
            started = time.monotonic()
            try:
                with faults.active(plan.get("faults", []), case_id):
                    result = runner.run_case(
                        case, runtime, workdir=run_dir / "scratch" / report.slug(case_id), lane=plan["lane"]
                    )
            except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded result
                result = runner.error_result(case, exc, started, lane=plan["lane"])
                print(result.error, file=sys.stderr, flush=True)
                if rank == 0 or world == 1:
                    report.write_case_result(run_dir, result)
                else:
                    report.write_rank_error(run_dir, case_id, rank, result.error)
                _progress(run_dir, rank, case_id, "end")
                if world > 1:
                    exit_code = EXIT_CASE_ERROR
                    break
                continue
            if rank == 0:
                report.write_case_result(run_dir, result)
            _progress(run_dir, rank, case_id, "end")
    if exit_code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)  # peers may be blocked in a collective; do not wait for teardown
    dist.destroy_process_group()
    return 0


def _make_runtime(lane: str):
    if lane == "cpu":
        from harness.cpu_runtime import CpuRuntime

        return CpuRuntime()
    from harness.gpu_runtime import GpuRuntime

    return GpuRuntime()


if __name__ == "__main__":
    sys.exit(main())
