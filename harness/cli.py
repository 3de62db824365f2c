"""``harness`` command line: parsing and printing only; the work is done by the services it calls.

Exit codes: 0 pass, 1 a check failed (or a case crashed), 2 usage or input error (one line on
stderr; ``--debug`` adds the traceback, the exit code stays 2), 3 infrastructure errors only.

The CLI process stays light (no torch, no Megatron): cases run in worker process groups.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from harness import workspace
from harness.errors import InputError
from harness.execution import run_service
from harness.matrix import cases as cases_mod
from harness.reporting import run_document, run_report
from harness.results import INFRA_ERROR, OK_STATUSES, SKIP, CaseResult
from harness.run_spec import RunSpec, SourceTree

# 0 every case passed (or was skipped / declared invalid); 1 a case failed, crashed or timed out;
# 2 bad input; 3 no case failed, but the machine kept some from running (infrastructure errors).
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3


def exit_code(results: list[CaseResult]) -> int:
    """A verdict on the code under test: infrastructure errors never count as case failures."""
    if any(r.status not in OK_STATUSES and r.status != INFRA_ERROR for r in results):
        return EXIT_FAIL
    return EXIT_INFRA if any(r.status == INFRA_ERROR for r in results) else EXIT_OK


def _source_trees(args: argparse.Namespace) -> list[SourceTree]:
    from harness.execution import source_trees

    return source_trees.resolve(getattr(args, "megatron_lm", None), getattr(args, "megatron_bridge", None))


def _cases_dir(args: argparse.Namespace) -> Path:
    return Path(args.cases_dir) if args.cases_dir else workspace.CASES_DIR


def _load(args: argparse.Namespace) -> cases_mod.CaseSet:
    return cases_mod.load_cases_once(_cases_dir(args))


def _select(args: argparse.Namespace) -> list[cases_mod.Case]:
    selected = _load(args).select(expr=args.k, lane=args.lane, set_name=args.set)
    if not selected:
        raise InputError(f"no {args.lane} cases in set {args.set!r} match -k {args.k!r}")
    return selected


def _check_faults(specs: list[str] | None) -> list[str]:
    from harness.regression import faults

    for spec in specs or []:
        try:
            faults.parse(spec)
        except KeyError as err:
            raise InputError(f"--inject: {err.args[0]}") from None
    return list(specs or [])


def _placement(args: argparse.Namespace):
    from harness.matrix import lanes

    return lanes.placement(getattr(args, "ranks_per_gpu", 1), args.lane)


def _jobs(args: argparse.Namespace) -> int:
    jobs = getattr(args, "jobs", 1)
    if jobs < 1:
        raise InputError(f"--jobs must be at least 1, not {jobs}")
    return jobs


def _spec(args: argparse.Namespace, selected: list[cases_mod.Case], label: str,
          trees: list[SourceTree] | None = None) -> RunSpec:
    from harness.regression import faults

    return RunSpec(
        cases=selected, lane=args.lane, label=label, faults=_check_faults(getattr(args, "inject", None)),
        fault_provider=faults.PROVIDER,
        source_trees=_source_trees(args) if trees is None else trees, cases_dir=_cases_dir(args),
        placement=_placement(args), jobs=_jobs(args),
    )


def _execute(spec: RunSpec, raw_exit: bool = False) -> int:
    """Run a spec, print the table, return the exit code: judged against golden/ as pytest
    judges the matrix (a failure pinned there is expected, anything new is not), or with
    ``raw_exit`` from the statuses alone."""
    from harness.regression import golden

    outcome = run_service.run_selection(spec)
    run_report.write_outcome(outcome)
    results = outcome.results
    print(run_report.table(results))
    if len(results) == 1:
        print()
        print(run_report.check_table(results[0]))
        if results[0].error:
            print(results[0].error.rstrip())
    verdict = golden.judge_run(results)
    for case_id, judgement in verdict.unexpected.items():
        print(f"UNEXPECTED {case_id}: {run_report.clip(judgement.why, 300)}")
    if verdict.known_by_upstream:
        print("known upstream failures, pinned in golden/ (each with its diagnosis in golden/known_failures.yaml): "
              + ", ".join(f"{upstream} x{n}" for upstream, n in verdict.known_by_upstream.items()))
    infra = sum(r.status == INFRA_ERROR for r in results)
    skipped = sum(r.status == SKIP for r in results)
    print(f"\n{verdict.line(len(results))}"
          f"{f' ({skipped} skipped: not runnable on this machine)' if skipped else ''} in {outcome.meta.wall_s:.1f}s"
          f"{f'; {infra} not run because of infrastructure errors (exit {EXIT_INFRA})' if infra else ''}; "
          f"report: {outcome.run.results_file}")
    if raw_exit:
        return exit_code(results)
    if verdict.unexpected:
        return EXIT_FAIL
    return EXIT_INFRA if infra else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    case_set = _load(args)
    selected = [case_set.get(case_id) for case_id in args.case_ids]
    return _execute(_spec(args, selected, args.label or selected[0].id.replace("/", "_")), args.raw_exit)


def cmd_matrix(args: argparse.Namespace) -> int:
    return _execute(_spec(args, _select(args), args.label or f"matrix-{args.set}-{args.lane}"), args.raw_exit)


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from harness.matrix import lanes

    selected = _load(args).select(expr=args.k, lane=args.lane, set_name=args.set)
    if args.ids_only:
        for case in selected:
            print(case.id)
        return EXIT_OK
    rows = [[c.id, ",".join(c.lanes), c.world_size, ",".join(sorted(c.sets)), lanes.note(c, args.lane or lanes.CPU)]
            for c in selected]
    print(tabulate(rows, headers=["case", "lanes", "ranks", "sets", "note"], tablefmt="simple",
                   maxcolwidths=[None, None, None, None, 70]))
    print(f"\n{len(selected)} case(s)")
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from harness.checks import checkpoint_diff
    from harness.formats.detect import open_checkpoint

    a, b = open_checkpoint(Path(args.a)), open_checkpoint(Path(args.b))
    started = time.monotonic()
    result, stats = checkpoint_diff.diff(a, b)
    elapsed = time.monotonic() - started
    print(f"A: {a.path} ({a.format})\nB: {b.path} ({b.format})")
    rows = [[r["key"], r["status"], f"{r['max_abs_diff']:.3g}" if "max_abs_diff" in r else ""] for r in result.details]
    rows += [[k, "only in A", ""] for k in result.metrics["missing"]]
    rows += [[k, "only in B", ""] for k in result.metrics["extra"]]
    if rows:
        shown = rows[: args.max_rows]
        print(tabulate(shown, headers=["key", "problem", "max|d|"], tablefmt="simple"))
        if len(rows) > len(shown):
            print(f"... {len(rows) - len(shown)} more (--max-rows)")
    print(f"{'EQUAL' if result.passed else 'DIFFERENT'}: {result.summary}  "
          f"[{stats.bytes_compared / 1e6:.0f} MB compared in {elapsed:.1f}s]")
    if args.json:
        workspace.atomic_write_json(Path(args.json), result.to_dict())
    return EXIT_OK if result.passed else EXIT_FAIL


def cmd_golden(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from harness.regression import golden

    try:
        doc, results = run_document.load_run(args.run)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from None
    reviews = golden.review_run(results, args.k)
    not_run = len(golden.not_run_here(results, args.k))
    if not reviews:
        raise InputError(f"run {args.run} ran no case{f' matching -k {args.k!r}' if args.k else ''} on its machine"
                         f"{f' ({not_run} skipped or infrastructure errors: nothing to compare)' if not_run else ''}")
    if not_run:
        print(f"harness: {not_run} case(s) of run {args.run} did not run on its machine (skip, infra-error): "
              "neither compared nor written", file=sys.stderr)
    if args.action == "check":
        rows = [[r.label, r.case_id, run_report.clip("; ".join(r.differences), 150)] for r in reviews]
        print(tabulate(rows, headers=["golden", "case", "differences"], tablefmt="simple"))
        bad = sum(r.kind != golden.SAME for r in reviews)
        print(f"\n{len(reviews) - bad}/{len(reviews)} match golden/ (run {doc['run']})")
        if bad:
            print("to accept a change on purpose: harness golden update --run RUN -k EXPR", file=sys.stderr)
        return EXIT_FAIL if bad else EXIT_OK
    changed = [r for r in reviews if r.kind != golden.SAME]
    rows = [[r.kind, r.case_id, run_report.clip("; ".join(r.differences), 150)] for r in changed]
    print(tabulate(rows, headers=["golden", "case", "differences"], tablefmt="simple") if rows else "no changes")
    if args.dry_run:
        return EXIT_OK
    written = golden.update_from_run(doc, results, changed)
    print(f"\nwrote {len(written)} golden file(s) under {workspace.golden_root()}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from harness.reporting.html import history_page, run_page

    if args.history is not None:
        root = Path(args.history)
        if not root.is_dir():
            raise InputError(f"--history {root}: not a folder of runs")
        if args.last < 1:
            raise InputError(f"--last {args.last}: the history needs at least one run")
        history = history_page.build_history(root, args.last)
        if not history.runs:
            raise InputError(f"--history {root}: no run folder with a results.json")
        path = history_page.write_history(root, history)
        red = sum(r.red_since is not None for r in history.rows)
        print(f"{path}: {len(history.rows)} case(s) over {len(history.runs)} run(s), {red} red now"
              + (f"; {len(history.unreadable)} unreadable run folder(s)" if history.unreadable else ""))
        return EXIT_OK
    try:
        run = run_document.resolve_run(args.run)
        doc, results = run_document.load_run(run.path)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from None
    path = run_page.write_run_page(run, list(results.values()), doc.get("meta") or {})
    print(path)
    return EXIT_OK


def cmd_coverage(args: argparse.Namespace) -> int:
    from harness.reporting import architecture_table

    results: list[CaseResult] = []
    if args.run:
        try:
            results = list(run_document.load_run(args.run)[1].values())
        except (FileNotFoundError, ValueError) as err:
            raise InputError(str(err)) from None
    rows = architecture_table.coverage(_load(args), architecture_table.outcomes_for(results))
    if args.markdown:
        print(architecture_table.markdown(rows), end="")
        return EXIT_OK
    from tabulate import tabulate

    table = [[r.architecture, r.family or "-", *(run_report.clip(s.text, args.width) for s in r.lanes),
              r.classes_text] for r in rows]
    print(tabulate(table, headers=["architecture", "family", *(f"{lane} lane" for lane in architecture_table.lanes.LANES),
                                   "case classes"],
                   tablefmt="simple"))
    covered = sum(bool(r.family) for r in rows)
    red = sum(s.status in architecture_table.RED for r in rows for s in r.lanes)
    print(f"\n{len(rows)} registered architectures, {covered} covered by a family; {red} lane(s) failing "
          f"in a way golden/ does not pin (source: golden/{f' + run {args.run}' if args.run else ''})")
    return EXIT_FAIL if red else EXIT_OK


def cmd_gate(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from harness.regression import gate

    trees = _source_trees(args)
    label = args.label or (f"gate-{trees[0].sha[:12]}" if trees else "gate")
    outcome = gate.run_gate(_spec(args, _select(args), label, trees), args.baseline, stream=sys.stderr,
                            bisect_budget_s=args.bisect_budget)
    summary = outcome.run.run.summary_file
    if outcome.incompatible is not None:
        print(run_report.verdict_line({}, outcome.root_causes).removeprefix("### ").replace("**", ""))
        print(f"PR comment: {summary}")
        return EXIT_FAIL
    if outcome.root_causes:
        print(run_report.root_cause_table(outcome.root_causes) + "\n")
    rows = [[v.label, v.case_id, run_report.clip("; ".join(v.reasons), 110)]
            for v in sorted(outcome.verdicts, key=lambda v: (gate.ORDER[v.verdict], v.case_id))]
    print(tabulate(rows, headers=["verdict", "case", "why"], tablefmt="simple"))
    counts = outcome.counts()
    n_regressed = sum(c.verdict == gate.REGRESSED for c in outcome.root_causes)
    print("\n" + ", ".join(f"{n} {k}" for k, n in counts.items())
          + (f" ({n_regressed} root cause(s))" if n_regressed else "") + f"; PR comment: {summary}")
    if outcome.regressed:
        return EXIT_FAIL
    return EXIT_INFRA if outcome.infra_errors else EXIT_OK


def cmd_bisect(args: argparse.Namespace) -> int:
    from harness.execution import source_trees
    from harness.execution.run_dir import RunDir
    from harness.regression import bisect

    history = source_trees.history(_source_trees(args))
    if history is None:
        raise InputError("bisect needs a repository: --megatron-lm PATH, --megatron-bridge PATH or --bridge-checkout PATH")
    case = _load(args).get(args.case)
    log = RunDir.create(f"bisect-{args.case.replace('/', '_')}") / "steps.jsonl"
    print(f"harness: bisecting {args.case} in a worktree of {history.repo} ({args.good[:12]}..{args.bad[:12]})",
          file=sys.stderr)
    outcome, failing = bisect.run_bisect(history, args.good, args.bad, _spec(args, [case], "bisect", trees=[]), log,
                                         stream=sys.stderr)
    if outcome.commit is None:
        print(f"harness: bisect did not name a first bad commit: {outcome.reason}", file=sys.stderr)
        return EXIT_FAIL
    print(f"first bad commit: {outcome.commit.sha[:12]} {outcome.commit.subject} ({outcome.commit.sha})")
    print(f"files touched:    {', '.join(outcome.commit.files)}" + (f" and {outcome.commit.more_files} more"
                                                                     if outcome.commit.more_files else ""))
    print(f"failing check:    {failing}")
    if outcome.skipped:
        print(f"skipped:          {', '.join(k.sha[:12] for k in outcome.skipped)} (do not import)")
    print(f"steps log:        {log}")
    return EXIT_OK


def cmd_bisect_step(args: argparse.Namespace) -> int:
    """One `git bisect run` step: 0 good, 1 bad, 125 skip (see harness.regression.bisect)."""
    from harness.execution import source_trees
    from harness.regression import bisect

    trees = _source_trees(args)
    step = bisect.case_step(_spec(args, [_load(args).get(args.case)], "bisect-step", trees=[]))(trees)
    step = replace(step, sha="-".join(t.sha for t in trees))
    step.append_to(args.log)
    print(f"bisect-step {step.sha[:12]}: {step.status} -> exit {step.exit} {step.failing}")
    return step.exit


def cmd_mutants(args: argparse.Namespace) -> int:
    """Mutate Megatron-Bridge's conversion code; kill rate per file and every new survivor."""
    from harness.regression import mutants
    from harness.workspace import atomic_write_json, atomic_write_text

    trees = _source_trees(args)
    bridge = next((t for t in trees if t.kind == "megatron-bridge"), None)
    package = mutants.bridge_package(bridge)
    selected = [c for c in _load(args).select(expr=args.k, lane=args.lane, set_name=args.set)
                if not c.invalid_reason and not run_service.not_runnable_here(c, args.lane)]
    files = args.file or [*mutants.DEFAULT_FILES, *sorted({f"models/{c.model.family_def.architecture.module}"
                                                            for c in selected})]
    generated = []
    for rel in files:
        path = package / rel
        if not path.is_file():
            raise InputError(f"--file {rel}: no such file in {package}")
        generated += mutants.generate(path.read_text(), rel)
    chosen = [m for m in generated if m.id in set(args.id)] if args.id else generated
    if args.id and len(chosen) != len(set(args.id)):
        missing = sorted(set(args.id) - {m.id for m in chosen})
        raise InputError(f"--id: no such mutant: {missing[0]} (harness mutants --list prints them)")
    if args.list:  # what a run draws from; which of them a case reaches, only a run knows
        for m in chosen:
            print(f"{m.id}\n{m.diff}\n")
        print(f"{len(chosen)} of {len(generated)} mutants in {len(files)} file(s)")
        return EXIT_OK
    print(f"harness: {len(generated)} mutants in {len(files)} file(s), on {len(selected)} selected case(s); "
          + (f"running {len(chosen)} by ID" if args.id else f"drawing {args.per_file} per file from those a case reaches"),
          file=sys.stderr)
    outcome = mutants.run_mutants(chosen, selected, args.lane, bridge, trees, args.budget, mutants.load_equivalent(),
                                  per_file=None if args.id else args.per_file, seed=args.seed,
                                  say=lambda text: print(text, file=sys.stderr, flush=True))
    run = outcome.baseline.run
    atomic_write_json(run / "mutants.json", mutants.document(outcome))
    atomic_write_text(run / "mutants.md", mutants.markdown(outcome))
    atomic_write_text(run / "mutants.html", mutants.html(outcome, run.name))
    print(mutants.markdown(outcome))
    print(f"written: {run / 'mutants.md'}")
    return EXIT_FAIL if outcome.new_survivors else EXIT_OK


def cmd_selftest(args: argparse.Namespace) -> int:
    from harness.regression import selftest

    outcome = selftest.run_selftest(_load(args), _spec(args, [], args.label or f"selftest-{args.lane}"),
                                    args.only or None, stream=sys.stderr)
    print(selftest.table(outcome.rows))
    fps = outcome.false_positives
    detected = sum(r.detected == selftest.YES for r in outcome.rows)
    not_run = [r for r in outcome.rows if r.detected not in (selftest.YES, selftest.NO)]
    print(f"\n{detected}/{len(outcome.rows)} regressions detected"
          f"{f', {len(not_run)} not run on this machine' if not_run else ''}; "
          f"{len(fps)} false positive(s) on the clean stack{': ' + ', '.join(fps) if fps else ''}; "
          f"report: {outcome.run.run / 'selftest.md'}")
    if not outcome.passed:
        return EXIT_FAIL
    return EXIT_INFRA if any(r.status == INFRA_ERROR for r in outcome.run.results) else EXIT_OK


def _add_trees(p: argparse.ArgumentParser) -> None:
    p.add_argument("--megatron-lm", default=None, metavar="PATH",
                   help="Megatron-LM source tree to test instead of the installed megatron-core (env HARNESS_MEGATRON_LM)")
    p.add_argument("--megatron-bridge", default=None, metavar="PATH",
                   help="Megatron-Bridge source tree (env HARNESS_MEGATRON_BRIDGE)")
    p.add_argument("--bridge-checkout", default=None, metavar="PATH",
                   help="a Megatron-Bridge checkout with its 3rdparty/Megatron-LM submodule: both trees under test "
                        "(--baseline and bisect then walk the Bridge's history, the submodule following each commit)")


def _add_raw_exit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw-exit", action="store_true",
                   help="exit 1 on any case that did not pass, pinned known failures included (default: exit 1 only "
                        "on what golden/ does not expect, as pytest's XFAIL / XPASS(strict))")


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks-per-gpu", type=int, default=1, metavar="N",
                   help="GPU lane: put N ranks on each GPU, so multi-rank cases fit on fewer GPUs; their process "
                        "group is then gloo with CUDA tensors, since NCCL refuses shared GPUs (default 1: NCCL)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run up to N launches of one world size at once (a GPU machine's spare cores; default 1)")


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
                   help="apply a seeded fault from harness.regression.faults (for testing the harness)")
    _add_trees(p)
    _add_placement(p)
    _add_raw_exit(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("matrix", help="run a case set (the main CPU job)")
    p.add_argument("--set", default="default", choices=cases_mod.SETS)
    p.add_argument("--lane", default="cpu", choices=cases_mod.LANES)
    p.add_argument("-k", default=None, metavar="EXPR", help="substring/glob filter on case IDs")
    p.add_argument("--label", default=None)
    p.add_argument("--inject", action="append", metavar="FAULT[@CASE_GLOB]", help=argparse.SUPPRESS)
    _add_trees(p)
    _add_placement(p)
    _add_raw_exit(p)
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser("golden", help="compare a run with golden/ expectations, or update them explicitly")
    p.add_argument("action", choices=["check", "update"])
    p.add_argument("--run", default="latest", help="run folder, its name under reports/, or 'latest'")
    p.add_argument("-k", default=None, metavar="EXPR")
    p.add_argument("--dry-run", action="store_true", help="update: only print what would change")
    p.set_defaults(func=cmd_golden)

    p = sub.add_parser("report", help="(re)write a run's index.html, or with --history the history page of a folder of runs")
    p.add_argument("run", nargs="?", default="latest", help="run folder, its name under reports/, or 'latest'")
    p.add_argument("--history", default=None, metavar="DIR", help="write DIR/history.html over the runs in DIR")
    p.add_argument("--last", type=int, default=20, metavar="N", help="with --history: the last N runs (default 20)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("coverage", help="every architecture the Bridge registers, and its status on each lane")
    p.add_argument("--run", default=None, help="take outcomes from this run (over golden/) for its lane")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (README, PR comments)")
    p.add_argument("--width", type=int, default=70, help="widest cell of the text table (words shorten, numbers never)")
    _add_trees(p)
    p.set_defaults(func=cmd_coverage)

    p = sub.add_parser("gate", help="run the matrix against a candidate tree; verdicts vs golden/ and a baseline")
    _add_trees(p)
    p.add_argument("--baseline", default=None, metavar="RUN_OR_REF",
                   help="a finished run, or a git ref of the repository under test (then each root cause is bisected)")
    p.add_argument("--bisect-budget", type=float, default=3600.0, metavar="SECONDS",
                   help="stop bisecting root causes after this long; the rest say 'not bisected' (default 3600)")
    p.add_argument("--set", default="default", choices=cases_mod.SETS)
    p.add_argument("--lane", default="cpu", choices=cases_mod.LANES)
    p.add_argument("-k", default=None, metavar="EXPR")
    p.add_argument("--label", default=None)
    _add_placement(p)
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("bisect", help="find the first Megatron-LM (or Bridge) commit that breaks a case (git bisect)")
    _add_trees(p)
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
    _add_placement(p)
    p.set_defaults(func=cmd_selftest)

    p = sub.add_parser("mutants", help="mutate Megatron-Bridge's conversion code; kill rate per file, survivors listed")
    p.add_argument("--file", action="append", metavar="REL", help="a file under megatron/bridge/ to mutate (default: "
                   "models/conversion/{param_mapping,model_bridge}.py and the bridge module of each selected family)")
    p.add_argument("--per-file", type=int, default=10, metavar="N", help="draw N of each file's reached mutants (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--id", action="append", metavar="MUTANT", help="run only these mutants (IDs from --list)")
    p.add_argument("--list", action="store_true", help="print the chosen mutants with their diffs; run nothing")
    p.add_argument("--budget", type=float, default=3600.0, metavar="SECONDS", help="stop starting mutants after this long")
    p.add_argument("--set", default="default", choices=cases_mod.SETS)
    p.add_argument("--lane", default="cpu", choices=cases_mod.LANES)
    p.add_argument("-k", default=None, metavar="EXPR", help="the cases (their families) whose memory round trips may run")
    _add_trees(p)
    p.set_defaults(func=cmd_mutants)

    p = sub.add_parser("bisect-step", help="one `git bisect run` step: exit 0 good, 1 bad, 125 skip, 128 abort")
    _add_trees(p)
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
    _add_trees(p)
    p.set_defaults(func=cmd_list)
    return parser


def entry_point() -> int:
    """The ``harness`` command and ``python -m harness``: ``main`` with SIGTERM handled as Ctrl-C.

    A cancelled CI job or ``kill`` sends SIGTERM, which by default ends Python without running any
    ``finally``: the throw-away worktrees of gate and bisect (``source_trees.worktree``) and a
    bisection's state would be left behind. As SystemExit they are cleaned up."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "lane", None) is None and args.command != "list":
            args.lane = "cpu"
        if getattr(args, "bridge_checkout", None):
            from harness.execution import source_trees

            if args.megatron_lm or args.megatron_bridge:
                raise InputError("--bridge-checkout names both trees: give it without --megatron-lm / --megatron-bridge")
            args.megatron_lm, args.megatron_bridge = source_trees.bridge_checkout(args.bridge_checkout)
        if getattr(args, "megatron_lm", None) or getattr(args, "megatron_bridge", None):
            from harness.execution import source_trees

            source_trees.select(getattr(args, "megatron_lm", None), getattr(args, "megatron_bridge", None))
        return args.func(args)
    except InputError as err:
        if args.debug:
            traceback.print_exc()
        print(f"harness: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
