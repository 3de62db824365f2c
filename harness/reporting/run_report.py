"""What a finished run says, for machines and people: ``results.json`` (``run_document``),
``junit.xml``, ``summary.md``, ``index.html`` (``reporting.html.run_page``) and the terminal tables.

Every file is written atomically; ``reports/latest`` is moved last.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from harness import workspace
from harness.execution.run_dir import RunDir
from harness.matrix.cases import load_cases_once
from harness.regression.root_causes import RootCause
from harness.reporting import architecture_table, run_document
from harness.reporting.html import rendering, run_page
from harness.results import CRASHED, FAIL, FIXED, INCOMPATIBLE, PASS, REGRESSED, SKIP, CaseResult, status_counts

# summary.md is posted as a PR comment; GitHub refuses a body over 65536 characters. The reserve
# is left for what CI appends (the link to the workflow run that holds the HTML report).
COMMENT_LIMIT = 65536
COMMENT_RESERVE = 1024
SUMMARY_LIMIT = COMMENT_LIMIT - COMMENT_RESERVE

if TYPE_CHECKING:
    from harness.execution.run_service import RunOutcome


def write_outcome(outcome: "RunOutcome", **gate: Any) -> Path:
    """The run folder of a finished ``run_service.run_selection``: every caller that runs a selection
    writes it with this (execution returns results, the floor above it reports them). ``gate``:
    ``write_run``'s verdict arguments."""
    return write_run(outcome.run, outcome.results, outcome.meta.to_dict(), **gate)


def write_run(run: RunDir, results: Iterable[CaseResult], meta: dict[str, Any],
              verdicts: dict[str, str] | None = None, verdict_order: dict[str, int] | None = None,
              root_causes: Sequence[RootCause] = ()) -> Path:
    """All the run-level files, each written atomically, then the ``latest`` pointer. ``verdicts``
    (case_id -> gate verdict, sorted by ``verdict_order``) and ``root_causes`` (the REGRESSED
    cases grouped) make it a gate run's files."""
    results = list(results)
    run_document.write_results(run, results, meta)
    workspace.atomic_write_text(run.junit_file, junit_xml(results, run.name))
    workspace.atomic_write_text(run.summary_file, summary_markdown(results, meta, run.name, verdicts, verdict_order,
                                                                   root_causes))
    run_page.write_run_page(run, results, meta, verdicts, root_causes)
    run.point_latest()
    return run.results_file


# ------------------------------------------------------------------------------------ JUnit


def junit_xml(results: list[CaseResult], suite: str) -> str:
    import xml.etree.ElementTree as ET

    failures = sum(r.status == FAIL for r in results)
    errors = sum(r.status in CRASHED for r in results)
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=f"harness.{suite}", tests=str(len(results)),
                       failures=str(failures), errors=str(errors),
                       time=f"{sum(r.duration_s for r in results):.3f}")
    for r in results:
        tc = ET.SubElement(ts, "testcase", classname=f"harness.{r.lane}", name=r.case_id, time=f"{r.duration_s:.3f}")
        if r.status == FAIL and r.first_failing_check is not None:
            ET.SubElement(tc, "failure", message=r.headline[:1000]).text = check_table(r)
        elif r.status in CRASHED:
            ET.SubElement(tc, "error", message=(r.headline or r.status)[:1000]).text = r.error
        elif r.status == SKIP:
            ET.SubElement(tc, "skipped", message=r.error[:1000])
        props = ET.SubElement(tc, "properties")
        for c in r.unchecked:  # a pass with these is partial: say what was not checked
            ET.SubElement(props, "property", name=f"not-checked.{c.name}", value=c.summary.removeprefix("skipped: "))
        for c in r.checks:
            if "max_abs_diff" in c.metrics:
                ET.SubElement(props, "property", name=f"{c.name}.max_abs_diff", value=repr(c.metrics["max_abs_diff"]))
        ET.SubElement(tc, "system-out").text = check_table(r) if r.checks else ""
    return ET.tostring(root, encoding="unicode") + "\n"


# --------------------------------------------------------------------------------- Markdown


def summary_markdown(results: list[CaseResult], meta: dict[str, Any], run_name: str,
                     verdicts: dict[str, str] | None = None, verdict_order: dict[str, int] | None = None,
                     root_causes: Sequence[RootCause] = (), limit: int = SUMMARY_LIMIT) -> str:
    """The PR comment. A gate run (``verdicts``) says its verdict first, then one row per root
    cause, the FIXED cases and the link to ``index.html``; every run then has one row per case
    (worst first; a gate run's sorted by ``verdict_order``) and the coverage table.

    To fit ``limit`` characters, per-case rows are left out from the end and a note says how many;
    a root-cause row is never left out and no row is cut (cells are clipped at words, never inside
    a number)."""
    if verdicts is not None:
        head = gate_head(results, meta, run_name, verdicts, verdict_order or {}, root_causes)
        if results:  # an INCOMPATIBLE candidate ran none: no empty table
            head += ["", f"#### Every case ({len(results)})", "",
                     "| verdict | cause | case | failing check | key numbers |", "|---|---|---|---|---|"]
    else:
        counts = status_counts(results)
        partial = sum(r.label.endswith("*") for r in results)
        head = [f"### Conversion harness: `{run_name}`", "",
                ", ".join(f"**{n}** {s}" for s, n in sorted(counts.items())) + f" of {len(results)} cases"
                + (f" (PASS* = {partial} passed with a check that could not run: see 'not checked')" if partial else "")]
        head += provenance_lines(meta) + ["", "| status | case | failing check | key numbers |", "|---|---|---|---|"]
    order = verdict_order or {}
    cause_of = {case_id: i for i, c in enumerate(root_causes, 1) for case_id in c.case_ids}
    rows = sorted(results, key=lambda r: (order.get((verdicts or {}).get(r.case_id, ""), len(order)),
                                          cause_of.get(r.case_id, len(root_causes) + 1), r.status == PASS, r.case_id))
    case_rows = []
    for r in rows:
        bad = r.first_failing_check
        failing = f"`{bad.name}`: {clip(bad.summary, 120)}" if bad else (
            clip(r.headline, 120) if r.error else clip(r.unchecked_line, 120))
        label = (verdicts or {}).get(r.case_id, r.label)
        if verdicts and r.unchecked and r.status == PASS:
            label += "*"
        cause = f" {cause_of.get(r.case_id, '')} |" if verdicts is not None else ""
        case_rows.append(f"| {label} |{cause} `{r.case_id}` | {table_cell(failing)} | {table_cell(key_numbers(r))} |")
    return fit(head, case_rows, ["", coverage_section(results, meta)], limit)


def table_cell(text: str) -> str:
    """``text`` as one Markdown table cell (a ``|`` would end the cell)."""
    return text.replace("|", "¦")


def provenance_lines(meta: dict[str, Any]) -> list[str]:
    """The trees, stack and lane a run tested, one Markdown bullet each."""
    lines = []
    for t in meta.get("source_trees") or []:
        lines.append(f"- `{t['kind']}`: `{t['path']}` @ `{t['sha'][:12]}`{' (dirty)' if t['dirty'] else ''}")
    versions = meta.get("versions") or {}
    if versions:
        lines.append("- stack: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v != "not installed"))
    if meta.get("lane"):
        lines.append(f"- lane: **{meta['lane']}**" + (f"; not tested on this lane: {'; '.join(meta['not_tested'])}"
                                                       if meta.get("not_tested") else ""))
    return lines


def verdict_line(verdicts: dict[str, str], root_causes: Sequence[RootCause]) -> str:
    """The gate's answer, first: may this bump go in?"""
    incompatible = next((c for c in root_causes if c.verdict == INCOMPATIBLE), None)
    if incompatible is not None:
        return (f"### Gate: **{INCOMPATIBLE}**: the candidate cannot start: `{table_cell(incompatible.detail)}`; "
                f"first bad commit: {incompatible.commit_text}")
    regressed = sum(v == REGRESSED for v in verdicts.values())
    if regressed:
        n = sum(c.verdict == REGRESSED for c in root_causes)
        return f"### Gate: **{REGRESSED}**: {regressed} of {len(verdicts)} cases regressed, from {n} root cause{'' if n == 1 else 's'}"
    return f"### Gate: **PASS**: nothing regressed in {len(verdicts)} cases"


def root_cause_rows(root_causes: Sequence[RootCause]) -> list[str]:
    """One Markdown table row per root cause, most cases first, numbered for the per-case rows'
    ``cause`` column (plain numbers: ``#1`` would link issue 1 in a PR comment)."""
    rows = ["| cause | cases | failing check | first failing tensor | representative's failure | families | layouts "
            "| rerun | first bad commit |", "|---|---|---|---|---|---|---|---|---|"]
    for i, c in enumerate(root_causes, 1):
        if c.verdict != REGRESSED:
            continue
        rows.append(" | ".join([
            f"| {i}", f"**{c.count}**", f"`{c.check}`", f"`{c.tensor}`" if c.tensor else "-", table_cell(clip(c.detail, 160)),
            table_cell(", ".join(c.families)), table_cell(", ".join(c.layouts)), f"`{table_cell(c.rerun)}`",
            table_cell(c.commit_text)]) + " |")
    return rows


def fixed_lines(results: list[CaseResult], verdicts: dict[str, str], root_causes: Sequence[RootCause]) -> list[str]:
    """The FIXED list: one bullet per fix (its cases grouped by how they failed in the baseline,
    with the first good commit), then FIXED cases no baseline run tells apart."""
    lines = []
    grouped: set[str] = set()
    for i, c in enumerate(root_causes, 1):
        if c.verdict == FIXED:
            grouped.update(c.case_ids)
            lines.append(f"- cause {i}: **{c.count}** case(s) that failed `{c.check}`"
                         f"{f' on `{c.tensor}`' if c.tensor else ''} now pass (e.g. `{c.representative}`); "
                         f"first good commit: {table_cell(c.commit_text)}")
    lines += [f"- `{r.case_id}`: passes now, failed in every reference" for r in results
              if verdicts.get(r.case_id) == FIXED and r.case_id not in grouped]
    return lines or ["None."]


def gate_head(results: list[CaseResult], meta: dict[str, Any], run_name: str, verdicts: dict[str, str],
              order: dict[str, int], root_causes: Sequence[RootCause]) -> list[str]:
    """A gate summary up to its per-case rows: verdict, counts, provenance, root causes with their
    first bad commits, FIXED with first good commits, link."""
    counts = {v: n for v in sorted(set(verdicts.values()), key=lambda v: order.get(v, len(order)))
              if (n := sum(x == v for x in verdicts.values()))}
    lines = [verdict_line(verdicts, root_causes), ""]
    incompatible = next((c for c in root_causes if c.verdict == INCOMPATIBLE), None)
    if incompatible is not None:
        lines += [f"Run `{run_name}`: no case ran ({incompatible.count} selected): a rank could not import the "
                  "stack with the candidate's trees, so every case would fail the same way."]
        lines += provenance_lines(meta) + bisection_lines(incompatible)
        return lines
    lines += [f"Run `{run_name}`: " + ", ".join(f"**{n}** {v}" for v, n in counts.items()) + f" of {len(results)} cases"]
    lines += provenance_lines(meta)
    regressed = [c for c in root_causes if c.verdict == REGRESSED]
    lines += ["", f"#### Root causes ({len(regressed)})", ""]
    if regressed:
        lines += root_cause_rows(root_causes)
        for i, c in enumerate(root_causes, 1):
            if c.verdict == REGRESSED and c.bisection is not None and c.bisection.skipped:
                lines += [f"", f"Cause {i}: skipped {len(c.bisection.skipped)} commit(s) that do not import: "
                          + ", ".join(f"`{k.sha[:12]}`" for k in c.bisection.skipped)]
    elif REGRESSED in verdicts.values():  # a caller that did not group them
        lines.append("Not grouped: every regressed case is in the table below.")
    else:
        lines.append("None: nothing regressed.")
    n_fixed = sum(v == FIXED for v in verdicts.values())
    lines += ["", f"#### {FIXED} ({n_fixed})", ""] + fixed_lines(results, verdicts, root_causes)
    lines += ["", f"Full report: [{rendering.INDEX_NAME}]({rendering.INDEX_NAME}) in the run folder `{run_name}` "
                  "(every case's checks, numbers, failing tensors and log tails)."]
    return lines


def bisection_lines(cause: RootCause) -> list[str]:
    """Where a bisection looked and what it skipped, for the cause a summary leads with."""
    b = cause.bisection
    if b is None or b.status == b.NOT_TRIED:
        return []
    lines = ["", f"Bisected in {b.steps} step(s) between `{b.range[0][:12]}` and `{b.range[1][:12]}`."]
    if b.skipped:
        lines.append("Skipped (does not import): " + ", ".join(f"`{k.sha[:12]}`" for k in b.skipped))
    return lines


def fit(head: list[str], rows: list[str], tail: list[str], limit: int) -> str:
    """``head``, then as many of ``rows`` as fit in ``limit`` characters (the first ones, whole)
    and a note on those left out, then ``tail``. Only ``rows`` shrink: a head over the limit is
    kept whole (its rows are what must be read)."""
    def text(lines: list[str]) -> str:
        return "\n".join(lines) + "\n"

    if len(text(head + rows + tail)) <= limit:
        return text(head + rows + tail)
    note = (f"*{{}} of {len(rows)} per-case rows left out to stay within GitHub's {COMMENT_LIMIT}-character "
            f"comment limit: every case is in [{rendering.INDEX_NAME}]({rendering.INDEX_NAME}).*")
    room = limit - len(text(head + ["", note.format(len(rows))] + tail))
    kept = 0
    while kept < len(rows) and room >= len(rows[kept]) + 1:
        room -= len(rows[kept]) + 1
        kept += 1
    return text(head + rows[:kept] + ["", note.format(len(rows) - kept)] + tail)


def coverage_section(results: list[CaseResult], meta: dict[str, Any]) -> str:
    """Every registered architecture's status per lane (this run's outcomes over golden/)."""
    cases_dir = Path(meta["cases_dir"]) if meta.get("cases_dir") else None
    rows = architecture_table.coverage(load_cases_once(cases_dir), architecture_table.outcomes_for(results))
    red = sum(s.status in architecture_table.RED for r in rows for s in r.lanes)
    return (f"<details><summary>Coverage: {sum(bool(r.family) for r in rows)} of {len(rows)} registered "
            f"architectures have a family; {red} lane(s) failing beyond golden/</summary>\n\n"
            f"{architecture_table.markdown(rows)}\n</details>")


# ----------------------------------------------------------------------------------- tables


def key_numbers(result: CaseResult) -> str:
    """The one or two numbers that say how close a case was."""
    bits = []
    for check in result.checks:
        m = check.metrics
        if check.name == "tensors" and "compared" in m:
            bits.append(f"{m['compared'] - m['mismatched']}/{m['compared']} equal")
        elif check.name.endswith("key-contract") and "model_keys" in m:
            bits.append(f"{check.name.removesuffix('-key-contract')} {m['model_keys']}+{m['optimizer_keys']} keys")
        elif check.name.startswith("logits") and "max_abs_diff" in m:
            bits.append(f"{check.name.removeprefix('logits-')} max|d|={m['max_abs_diff']:.1e}")
    return ", ".join(bits)


def table(results: Iterable[CaseResult]) -> str:
    from tabulate import tabulate

    rows = []
    for r in results:
        failing = r.headline if (r.first_failing_check or r.error) else r.unchecked_line
        rows.append([r.label, r.case_id, clip(failing, 90), key_numbers(r), f"{r.duration_s:.1f}s"])
    return tabulate(rows, headers=["status", "case", "failing check", "key numbers", "time"], tablefmt="simple")


def root_cause_table(root_causes: Sequence[RootCause]) -> str:
    """The gate's terminal table of root causes: one row per cause, most cases first."""
    from tabulate import tabulate

    rows = [[i, c.verdict, c.count, c.check, c.tensor or "-", clip(c.detail, 70), ", ".join(c.families),
             ", ".join(c.layouts), c.rerun, clip(c.commit_text, 90)] for i, c in enumerate(root_causes, 1)]
    return tabulate(rows, headers=["cause", "verdict", "cases", "failing check", "first failing tensor",
                                   "representative's failure", "families", "layouts", "rerun",
                                   "first bad (FIXED: first good) commit"], tablefmt="simple")


def check_table(result: CaseResult) -> str:
    from tabulate import tabulate

    rows = [["SKIP" if c.skipped else ("PASS" if c.passed else "FAIL"), c.name, clip(c.summary, 110)] for c in result.checks]
    return tabulate(rows, headers=["", "check", "summary"], tablefmt="simple")


def clip(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters if that is possible without cutting a
    number. A token with a digit (a number, a tensor key, a shape) is never cut or dropped; words
    are dropped from the end (each run of them becomes ``…``). A line whose numbers alone do not
    fit is returned whole: a wide cell is better than a wrong number."""
    tokens = text.split()

    def fits() -> bool:
        return len(" ".join(tokens)) <= width

    def is_word(token: str) -> bool:
        return not any(ch.isdigit() for ch in token) and token != "…"

    if fits() or sum(len(t) + 1 for t in tokens if not is_word(t)) > width:
        return " ".join(tokens)
    for i in range(len(tokens) - 1, 0, -1):
        if fits():
            break
        if is_word(tokens[i]):
            tokens[i] = "…"
            if i + 1 < len(tokens) and tokens[i + 1] == "…":
                del tokens[i + 1]
    return " ".join(tokens)
