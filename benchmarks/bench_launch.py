"""Launch amortisation benchmark (issue: the matrix on the CPU lane).

Measures, in one run:
  1. the default CPU matrix, as `harness matrix` runs it (grouped launches);
  2. the world-size-1 cases of that set in one launch: amortised seconds per case;
  3. the same world-size-1 cases the naive way, one `torchrun --nproc_per_node=1` per case
     (how Megatron-Bridge's functional tests launch each conversion);
  4. with ``--jobs N``: the world-size-1 cases over N concurrent launches (``harness --jobs``).
Writes reports/<stamp>-bench-launch/bench.json and prints a table.

    .venv/bin/python benchmarks/bench_launch.py [--naive-limit N] [--jobs N] [--skip-matrix]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from tabulate import tabulate

from harness import workspace
from harness.execution import rank_launcher
from harness.execution.run_dir import Plan, RunDir
from harness.matrix.cases import load_cases
from harness.run_spec import RunSpec


def timed(fn):
    start = time.monotonic()
    out = fn()
    return out, time.monotonic() - start


def naive_one(case, run: RunDir) -> tuple[str, float]:
    """One torchrun per case, exactly one case in its plan."""
    group = f"naive-{workspace.slug(case.id)}"
    plan = run.write_plan(Plan(spec=RunSpec(cases=[case], lane="cpu"), run_dir=str(run.path), group=group,
                               collective_timeout_s=case.timeout_s + 60))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "harness.execution.rank_worker", "--plan", str(plan)]
    start = time.monotonic()
    subprocess.run(cmd, check=False, capture_output=True, cwd=workspace.REPO_ROOT)
    elapsed = time.monotonic() - start
    result = run.read_case_result(case.id)
    return (result.status if result else "missing"), elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--naive-limit", type=int, default=0, help="time only the first N cases the naive way (0 = all)")
    parser.add_argument("--jobs", type=int, default=0, help="also time the world-size-1 cases over N concurrent launches")
    parser.add_argument("--skip-matrix", action="store_true", help="do not time the whole default matrix")
    args = parser.parse_args()
    cases = load_cases().select(set_name="default", lane="cpu")
    ws1 = [c for c in cases if c.world_size == 1]
    run = RunDir.create("bench-launch")
    spec = RunSpec(lane="cpu")

    matrix, matrix_s = ([], 0.0) if args.skip_matrix else timed(
        lambda: rank_launcher.run_cases(spec.with_cases(cases), RunDir(run / "matrix")))
    grouped, grouped_s = timed(lambda: rank_launcher.run_cases(spec.with_cases(ws1), RunDir(run / "ws1-grouped")))
    naive_cases = ws1[: args.naive_limit] if args.naive_limit else ws1
    naive = [naive_one(c, RunDir(run / "ws1-naive")) for c in naive_cases]
    naive_s = sum(t for _, t in naive)

    per_grouped = grouped_s / len(ws1)
    per_naive = naive_s / len(naive)
    if args.jobs:
        concurrent_spec = RunSpec(cases=ws1, lane="cpu", jobs=args.jobs)
        concurrent, concurrent_s = timed(lambda: rank_launcher.run_cases(concurrent_spec, RunDir(run / "ws1-jobs")))
    doc = {
        **({} if args.skip_matrix else {"default_cpu_matrix": {"cases": len(cases), "wall_s": round(matrix_s, 1),
                                                               "passed": sum(r.status == "pass" for r in matrix)}}),
        "ws1_grouped": {"cases": len(ws1), "wall_s": round(grouped_s, 1), "per_case_s": round(per_grouped, 2),
                        "passed": sum(r.status == "pass" for r in grouped)},
        "ws1_naive_one_torchrun_per_case": {"cases": len(naive), "wall_s": round(naive_s, 1),
                                            "per_case_s": round(per_naive, 2),
                                            "passed": sum(s == "pass" for s, _ in naive)},
        "speedup": round(per_naive / per_grouped, 1),
    }
    if args.jobs:
        doc[f"ws1_jobs_{args.jobs}"] = {"cases": len(ws1), "wall_s": round(concurrent_s, 1),
                                        "per_case_s": round(concurrent_s / len(ws1), 2),
                                        "passed": sum(r.status == "pass" for r in concurrent),
                                        "speedup_over_one_launch": round(grouped_s / concurrent_s, 2)}
    workspace.atomic_write_json(run / "bench.json", doc)
    rows = [] if args.skip_matrix else [
        ["default CPU matrix (grouped)", len(cases), f"{matrix_s:.1f}", f"{matrix_s / len(cases):.2f}"]]
    rows += [
        ["world size 1, one launch", len(ws1), f"{grouped_s:.1f}", f"{per_grouped:.2f}"],
        ["world size 1, one torchrun per case", len(naive), f"{naive_s:.1f}", f"{per_naive:.2f}"],
    ]
    if args.jobs:
        rows.append([f"world size 1, {args.jobs} launches at once", len(ws1), f"{concurrent_s:.1f}",
                     f"{concurrent_s / len(ws1):.2f}"])
    print(tabulate(rows, headers=["what", "cases", "wall s", "s / case"], tablefmt="simple"))
    print(f"\namortised speed-up at world size 1: {doc['speedup']}x   ({run / 'bench.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
