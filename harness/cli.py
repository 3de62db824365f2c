"""``harness`` command line. Exit codes: 0 pass, 1 a check failed (or a case crashed), 2 usage
or input error (one line on stderr; ``--debug`` adds the traceback).

The CLI process stays light (no torch, no Megatron): cases run in worker process groups.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from harness import cases as cases_mod
from harness import launch, paths, report

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
STACK_PACKAGES = (
    "torch", "megatron-core", "megatron-bridge", "megatron-fsdp", "transformers",
    "transformer-engine", "transformer-engine-torch", "safetensors",
)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def package_versions() -> dict[str, str]:
    out = {}
    for name in STACK_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_meta(args: argparse.Namespace, label: str) -> dict[str, Any]:
    return {
        "label": label,
        "command": " ".join(sys.argv),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "python": platform.python_version(),
        "lane": getattr(args, "lane", None) or "cpu",
        "injected_faults": list(getattr(args, "inject", None) or []),
        "versions": package_versions(),
    }


def _load(args: argparse.Namespace) -> cases_mod.CaseSet:
    try:
        return cases_mod.load_cases(Path(args.cases_dir) if args.cases_dir else None)
    except cases_mod.CaseFileError as err:
        raise UsageError(str(err)) from err


def execute(selected: list[cases_mod.Case], args: argparse.Namespace, label: str) -> int:
    """Run ``selected`` into a new run folder, print the table, return the exit code."""
    run_dir = report.new_run_dir(label)
    meta = run_meta(args, label)
    print(f"harness: {len(selected)} case(s) -> {run_dir}", file=sys.stderr, flush=True)
    progress = launch.Progress(len(selected))
    options = launch.LaunchOptions(
        lane=args.lane,
        cases_dir=Path(args.cases_dir) if args.cases_dir else paths.CASES_DIR,
        faults=list(getattr(args, "inject", None) or []),
    )
    if options.faults:
        print(f"harness: INJECTING seeded faults {options.faults}: results do not describe the real stack",
              file=sys.stderr)
    started = time.monotonic()
    results = launch.run_cases(selected, run_dir, options, on_result=progress.update)
    meta["wall_s"] = round(time.monotonic() - started, 2)
    target = report.write_run(run_dir, results, meta)
    print(report.table(results))
    if len(results) == 1:
        print()
        print(report.check_table(results[0]))
        if results[0].error:
            print(results[0].error.rstrip())
    bad = [r for r in results if r.status not in ("pass", "skip")]
    print(f"\n{len(results) - len(bad)}/{len(results)} passed in {meta['wall_s']:.1f}s; report: {target}")
    return EXIT_FAIL if bad else EXIT_OK


def _check_faults(specs: list[str] | None) -> None:
    from harness import faults

    for spec in specs or []:
        try:
            faults.parse(spec)
        except KeyError as err:
            raise UsageError(f"--inject: {err.args[0]}") from None


def cmd_run(args: argparse.Namespace) -> int:
    _check_faults(args.inject)
    case_set = _load(args)
    selected = []
    for case_id in args.case_ids:
        try:
            selected.append(case_set.get(case_id))
        except cases_mod.UnknownCaseError as err:
            raise UsageError(str(err)) from err
    return execute(selected, args, args.label or selected[0].id.replace("/", "_"))


def cmd_matrix(args: argparse.Namespace) -> int:
    _check_faults(args.inject)
    selected = _load(args).select(expr=args.k, lane=args.lane, set_name=args.set)
    if not selected:
        raise UsageError(f"no {args.lane} cases in set {args.set!r} match -k {args.k!r}")
    return execute(selected, args, args.label or f"matrix-{args.set}-{args.lane}")


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    selected = _load(args).select(expr=args.k, lane=args.lane, set_name=args.set)
    if args.ids_only:
        for case in selected:
            print(case.id)
        return EXIT_OK
    rows = [[c.id, ",".join(c.lanes), c.world_size, ",".join(sorted(c.sets)), c.note(args.lane or "cpu")] for c in selected]
    print(tabulate(rows, headers=["case", "lanes", "ranks", "sets", "note"], tablefmt="simple",
                   maxcolwidths=[None, None, None, None, 70]))
    print(f"\n{len(selected)} case(s)")
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from harness import diff as diff_mod
    from harness.formats.detect import open_checkpoint

    a, b = open_checkpoint(Path(args.a)), open_checkpoint(Path(args.b))
    started = time.monotonic()
    result, stats = diff_mod.diff(a, b)
    elapsed = time.monotonic() - started
    print(f"A: {a.path} ({a.format})\nB: {b.path} ({b.format})")
    rows = [[r["key"], r["status"], f"{r['max_abs_diff']:.3g}" if "max_abs_diff" in r else ""] for r in result.details]
    rows += [[k, "only in A", ""] for k in result.metrics["only_in_a"]]
    rows += [[k, "only in B", ""] for k in result.metrics["only_in_b"]]
    if rows:
        shown = rows[: args.max_rows]
        print(tabulate(shown, headers=["key", "problem", "max|d|"], tablefmt="simple"))
        if len(rows) > len(shown):
            print(f"... {len(rows) - len(shown)} more (--max-rows)")
    print(f"{'EQUAL' if result.passed else 'DIFFERENT'}: {result.summary}  "
          f"[{stats.bytes_compared / 1e6:.0f} MB compared in {elapsed:.1f}s]")
    if args.json:
        report.atomic_write_json(Path(args.json), result.to_dict())
    return EXIT_OK if result.passed else EXIT_FAIL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    parser.add_argument("--cases-dir", default=None, help="read cases from this folder instead of cases/")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one or more cases by ID")
    p.add_argument("case_ids", nargs="+", metavar="CASE_ID")
    p.add_argument("--label", default=None, help="suffix of the run folder name")
    p.add_argument("--lane", default="cpu", choices=cases_mod.LANES)
    p.add_argument("--inject", action="append", metavar="FAULT[@CASE_GLOB]",
                   help="apply a seeded fault from harness.faults (for testing the harness)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("matrix", help="run a case set (the main CPU job)")
    p.add_argument("--set", default="default", choices=cases_mod.SETS)
    p.add_argument("--lane", default="cpu", choices=cases_mod.LANES)
    p.add_argument("-k", default=None, metavar="EXPR", help="substring/glob filter on case IDs")
    p.add_argument("--label", default=None)
    p.add_argument("--inject", action="append", metavar="FAULT[@CASE_GLOB]", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser("diff", help="compare two checkpoints (HF, torch_dist, fsdp_dtensor) tensor by tensor")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--max-rows", type=int, default=50)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the full result as JSON")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("list", help="list cases")
    p.add_argument("-k", default=None, metavar="EXPR")
    p.add_argument("--lane", default=None, choices=cases_mod.LANES)
    p.add_argument("--set", default=None, choices=cases_mod.SETS)
    p.add_argument("--ids-only", action="store_true")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from harness.formats.base import InputError

    try:
        return args.func(args)
    except (UsageError, InputError) as err:
        if args.debug:
            raise
        print(f"harness: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
