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
from pathlib import Path
from typing import Any, Sequence

import harness
from harness import cases as cases_mod
from harness import launch, paths, report

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def source_trees(args: argparse.Namespace) -> list:
    from harness import sourcetree

    return sourcetree.resolve(getattr(args, "megatron_lm", None), getattr(args, "megatron_bridge", None))


def run_meta(args: argparse.Namespace, label: str, trees: list | None = None) -> dict[str, Any]:
    return {
        "source_trees": [t.to_dict() for t in trees or []],
        "label": label,
        "command": " ".join(sys.argv),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "python": platform.python_version(),
        "lane": getattr(args, "lane", None) or "cpu",
        "injected_faults": list(getattr(args, "inject", None) or []),
        "versions": report.package_versions(),
    }


def _load(args: argparse.Namespace) -> cases_mod.CaseSet:
    try:
        return cases_mod.load_cases(Path(args.cases_dir) if args.cases_dir else None)
    except cases_mod.CaseFileError as err:
        raise UsageError(str(err)) from err


def run_selected(selected: list[cases_mod.Case], args: argparse.Namespace, label: str, trees: list | None = None):
    """Run ``selected`` into a new run folder; returns (run_dir, results, meta)."""
    trees = source_trees(args) if trees is None else trees
    run_dir = report.new_run_dir(label)
    meta = run_meta(args, label, trees)
    print(f"harness: {len(selected)} case(s) -> {run_dir}", file=sys.stderr, flush=True)
    for tree in trees:
        print(f"harness: using {tree.kind} {tree.path} @ {tree.sha[:12]}{' (dirty)' if tree.dirty else ''}",
              file=sys.stderr, flush=True)
    progress = launch.Progress(len(selected))
    options = launch.LaunchOptions(
        lane=args.lane,
        cases_dir=Path(args.cases_dir) if args.cases_dir else paths.CASES_DIR,
        faults=list(getattr(args, "inject", None) or []),
        source_trees=trees,
    )
    if options.faults:
        print(f"harness: INJECTING seeded faults {options.faults}: results do not describe the real stack",
              file=sys.stderr)
    started = time.monotonic()
    results = launch.run_cases(selected, run_dir, options, on_result=progress.update)
    meta["wall_s"] = round(time.monotonic() - started, 2)
    report.write_run(run_dir, results, meta)
    return run_dir, results, meta


def execute(selected: list[cases_mod.Case], args: argparse.Namespace, label: str) -> int:
    """Run ``selected``, print the table, return the exit code."""
    run_dir, results, meta = run_selected(selected, args, label)
    target = run_dir / report.RESULTS_NAME
    print(report.table(results))
    if len(results) == 1:
        print()
        print(report.check_table(results[0]))
        if results[0].error:
            print(results[0].error.rstrip())
    from harness.results import OK_STATUSES

    bad = [r for r in results if r.status not in OK_STATUSES]
    print(f"\n{len(results) - len(bad)}/{len(results)} passed in {meta['wall_s']:.1f}s; report: {target}")
    return EXIT_FAIL if bad else EXIT_OK


def _check_faults(specs: list[str] | None) -> None:
    from harness import faults

    for spec in specs or []:
        try:
            faults.parse(spec)
        except KeyError as err:
            raise UsageError(f"--inject: {err.args[0]}") from None


def _case(args: argparse.Namespace, case_id: str, case_set: cases_mod.CaseSet | None = None) -> cases_mod.Case:
    try:
        return (case_set or _load(args)).get(case_id)
    except cases_mod.UnknownCaseError as err:
        raise UsageError(str(err)) from None


def cmd_run(args: argparse.Namespace) -> int:
    _check_faults(args.inject)
    case_set = _load(args)
    selected = [_case(args, case_id, case_set) for case_id in args.case_ids]
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


def cmd_golden(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from harness import golden

    try:
        doc, results = report.load_run(args.run)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    chosen = [r for cid, r in results.items() if not args.k or cases_mod.matches(cid, args.k)]
    if not chosen:
        raise UsageError(f"run {args.run} has no case matching -k {args.k!r}")
    rows, bad = [], 0
    for r in chosen:
        kind, diffs = golden.changes(r)
        if args.action == "check":
            ok = kind == "same"
            bad += not ok
            label = "match" if ok else ("NO GOLDEN" if kind == "new" else "MISMATCH")
            rows.append([label, r.case_id, "; ".join(diffs)[:150]])
        elif kind != "same":
            rows.append([kind, r.case_id, "; ".join(diffs)[:150]])
    print(tabulate(rows, headers=["golden", "case", "differences"], tablefmt="simple") if rows else "no changes")
    if args.action == "check":
        print(f"\n{len(chosen) - bad}/{len(chosen)} match golden/ (run {doc['run']})")
        if bad:
            print("to accept a change on purpose: harness golden update --run RUN -k EXPR", file=sys.stderr)
        return EXIT_FAIL if bad else EXIT_OK
    if args.dry_run:
        return EXIT_OK
    provenance = {"run": doc["run"], "versions": doc["meta"].get("versions"),
                  "source_trees": doc["meta"].get("source_trees", []), "harness": harness.__version__}
    for kind, case_id, _ in rows:
        golden.write(results[case_id], provenance)
    print(f"\nwrote {len(rows)} golden file(s) under {paths.golden_root()}")
    return EXIT_OK


def cmd_gate(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from harness import gate

    trees = source_trees(args)
    if not any(t.kind == "megatron-lm" for t in trees) and not any(t.kind == "megatron-bridge" for t in trees):
        raise UsageError("gate needs a candidate: --megatron-lm PATH (or --megatron-bridge PATH)")
    selected = _load(args).select(expr=args.k, lane=args.lane, set_name=args.set)
    if not selected:
        raise UsageError(f"no {args.lane} cases in set {args.set!r} match -k {args.k!r}")
    baseline = None
    if args.baseline:
        baseline = _baseline(args, selected, trees)
    sha = trees[0].sha[:12]
    run_dir, results, meta = run_selected(selected, args, args.label or f"gate-{sha}", trees)
    verdicts = gate.judge_all(results, baseline)
    by_case = {v.case_id: v.verdict for v in verdicts}
    summary = report.summary_markdown(results, meta, run_dir.name, verdicts=by_case)
    report.atomic_write_text(run_dir / "summary.md", summary)
    rows = [[v.verdict, v.case_id, "; ".join(v.reasons)[:110]] for v in verdicts]
    order = {gate.REGRESSED: 0, gate.STILL_FAILING: 1, gate.FIXED: 2, gate.PASS: 3}
    print(tabulate(sorted(rows, key=lambda r: (order[r[0]], r[1])), headers=["verdict", "case", "why"], tablefmt="simple"))
    counts = {k: sum(v.verdict == k for v in verdicts) for k in order}
    print("\n" + ", ".join(f"{n} {k}" for k, n in counts.items()) + f"; PR comment: {run_dir / 'summary.md'}")
    return EXIT_FAIL if counts[gate.REGRESSED] else EXIT_OK


def _baseline(args: argparse.Namespace, selected, trees) -> dict:
    """A finished run (path, name or 'latest'), or a git ref of the candidate Megatron-LM repo."""
    from harness import gate, sourcetree

    try:
        return report.load_run(args.baseline)[1]
    except FileNotFoundError:
        pass
    repo = next((t for t in trees if t.kind == "megatron-lm"), None)
    if repo is None:
        raise UsageError(f"--baseline {args.baseline}: no such run, and no --megatron-lm repo to resolve it as a git ref")
    with gate.worktree(Path(repo.path), args.baseline) as tree:
        base_trees = [sourcetree.validate("megatron-lm", tree)] + [t for t in trees if t.kind != "megatron-lm"]
        _, results, _ = run_selected(selected, args, f"baseline-{args.baseline}", base_trees)
    return {r.case_id: r for r in results}


def cmd_bisect(args: argparse.Namespace) -> int:
    from harness import bisect, sourcetree

    tree = sourcetree.validate("megatron-lm", args.megatron_lm)
    _case(args, args.case)
    log = report.new_run_dir(f"bisect-{args.case.replace('/', '_')}") / "steps.jsonl"
    extra = ["--cases-dir", args.cases_dir] if args.cases_dir else []
    print(f"harness: bisecting {args.case} in a worktree of {tree.path} ({args.good[:12]}..{args.bad[:12]})", file=sys.stderr)
    outcome = bisect.run_bisect(Path(tree.path), args.good, args.bad, args.case, args.lane, log, extra)
    if outcome.first_bad is None:
        print(outcome.transcript[-3000:])
        print("harness: bisect did not name a first bad commit (see the transcript above)", file=sys.stderr)
        return EXIT_FAIL
    print(f"first bad commit: {outcome.subject} ({outcome.first_bad})")
    print(f"failing check:    {outcome.failing}")
    print(f"steps log:        {log}")
    return EXIT_OK


def cmd_bisect_step(args: argparse.Namespace) -> int:
    """One `git bisect run` step: 0 good, 1 bad, 125 skip (see harness.bisect)."""
    import json

    from harness import bisect, sourcetree

    tree = sourcetree.validate("megatron-lm", args.megatron_lm)
    case = _case(args, args.case)
    _, results, _ = run_selected([case], args, f"bisect-step-{tree.sha[:12]}", [tree])
    result = results[0]
    code = bisect.step_exit_code(result.status, result.error)
    first = next((c for c in result.checks if not c.passed), None)
    failing = f"{first.name}: {first.summary}" if first else (result.error.strip().splitlines() or [""])[0]
    with open(args.log, "a") as fh:
        fh.write(json.dumps({"sha": tree.sha, "status": result.status, "exit": code, "failing": failing}) + "\n")
    print(f"bisect-step {tree.sha[:12]}: {result.status} -> exit {code} {failing}")
    return code


def cmd_selftest(args: argparse.Namespace) -> int:
    import json

    from harness import selftest

    if args.lane == "gpu":
        from harness.pytest_matrix import gpu_skip_reason

        reason = gpu_skip_reason(1)
        if reason:
            print(f"harness selftest: {reason}; nothing run", file=sys.stderr)
            return EXIT_OK
    case_set = _load(args)
    only = args.only or None
    selected, specs = selftest.plan(case_set, args.lane, only)
    args.inject = specs
    run_dir, results, _ = run_selected(selected, args, args.label or f"selftest-{args.lane}")
    rows, clean_bad = selftest.evaluate({r.case_id: r for r in results}, args.lane, only)
    report.atomic_write_json(run_dir / "selftest.json", selftest.document(rows, clean_bad, args.lane))
    report.atomic_write_text(run_dir / "selftest.md", selftest.markdown(rows, clean_bad, args.lane))
    print(selftest.table(rows))
    missed = [r.regression for r in rows if r.detected != "yes"]
    detected = len(rows) - len(missed)
    print(f"\n{detected}/{len(rows)} regressions detected; {len(clean_bad)} false positive(s) on the clean stack"
          f"{': ' + ', '.join(clean_bad) if clean_bad else ''}; report: {run_dir / 'selftest.md'}")
    return EXIT_FAIL if missed or clean_bad else EXIT_OK


def _add_trees(p: argparse.ArgumentParser) -> None:
    p.add_argument("--megatron-lm", default=None, metavar="PATH",
                   help="Megatron-LM source tree to test instead of the installed megatron-core (env HARNESS_MEGATRON_LM)")
    p.add_argument("--megatron-bridge", default=None, metavar="PATH",
                   help="Megatron-Bridge source tree (env HARNESS_MEGATRON_BRIDGE)")


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
    _add_trees(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("matrix", help="run a case set (the main CPU job)")
    p.add_argument("--set", default="default", choices=cases_mod.SETS)
    p.add_argument("--lane", default="cpu", choices=cases_mod.LANES)
    p.add_argument("-k", default=None, metavar="EXPR", help="substring/glob filter on case IDs")
    p.add_argument("--label", default=None)
    p.add_argument("--inject", action="append", metavar="FAULT[@CASE_GLOB]", help=argparse.SUPPRESS)
    _add_trees(p)
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser("golden", help="compare a run with golden/ expectations, or update them explicitly")
    p.add_argument("action", choices=["check", "update"])
    p.add_argument("--run", default="latest", help="run folder, its name under reports/, or 'latest'")
    p.add_argument("-k", default=None, metavar="EXPR")
    p.add_argument("--dry-run", action="store_true", help="update: only print what would change")
    p.set_defaults(func=cmd_golden)

    p = sub.add_parser("gate", help="run the matrix against a candidate tree; verdicts vs golden/ and a baseline")
    _add_trees(p)
    p.add_argument("--baseline", default=None, metavar="RUN_OR_REF", help="a finished run, or a git ref of --megatron-lm")
    p.add_argument("--set", default="default", choices=cases_mod.SETS)
    p.add_argument("--lane", default="cpu", choices=cases_mod.LANES)
    p.add_argument("-k", default=None, metavar="EXPR")
    p.add_argument("--label", default=None)
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("bisect", help="find the first Megatron-LM commit that breaks a case (git bisect run)")
    p.add_argument("--megatron-lm", required=True, metavar="PATH")
    p.add_argument("--good", required=True, metavar="SHA")
    p.add_argument("--bad", required=True, metavar="SHA")
    p.add_argument("--case", required=True, metavar="ID")
    p.add_argument("--lane", default="cpu", choices=cases_mod.LANES)
    p.set_defaults(func=cmd_bisect)

    p = sub.add_parser("selftest", help="seed realistic regressions into the real stack; report what the checks catch")
    p.add_argument("--lane", default="cpu", choices=cases_mod.LANES)
    p.add_argument("--only", action="append", metavar="FAULT", help="run only these regressions")
    p.add_argument("--label", default=None)
    _add_trees(p)
    p.set_defaults(func=cmd_selftest)

    p = sub.add_parser("bisect-step", help="(internal) one `git bisect run` step: exit 0 good, 1 bad, 125 skip")
    p.add_argument("--megatron-lm", required=True)
    p.add_argument("--case", required=True)
    p.add_argument("--lane", default="cpu", choices=cases_mod.LANES)
    p.add_argument("--log", required=True, type=Path)
    p.set_defaults(func=cmd_bisect_step)

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
        if getattr(args, "lane", None) is None:
            args.lane = "cpu"
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
