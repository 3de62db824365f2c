"""The mutant generator (``harness.regression.mutants``): each operator makes the edit it names,
every mutant of the real Bridge files still compiles, IDs survive unrelated edits, and nothing is
mutated where no conversion could show it. The mutants' runs are tests/integration/test_mutants_run.py."""

from __future__ import annotations

import ast
import textwrap

import pytest

from harness.regression import mutants

SOURCE = textwrap.dedent('''
    """Module docstring: never mutated."""
    import torch


    def split(w, n: int = 2):
        """Docstring."""
        if w is None:
            raise ValueError("bad shape 3")
        logger.warning("tp size %d", 4)
        gate, up = torch.chunk(w, 2, dim=0)
        both = torch.cat([gate, up], dim=0)
        head = both[0:n]
        for i in range(n):
            pass
        return both.t(), head.T, not True


    MAPPINGS = [
        AutoMapping("a", "b"),
        GatedMLPMapping("c", gate="g", up="u"),
    ]
''')


def by_operator(ms):
    out = {}
    for m in ms:
        out.setdefault(m.operator, []).append(m)
    return out


def test_each_operator_makes_the_edit_it_names():
    ms = mutants.generate(SOURCE, "models/x.py")
    ops = by_operator(ms)
    applied = {m.id: m.apply(SOURCE) for m in ms}
    assert {"swap-concat", "swap-args", "off-by-one", "flip-bool", "drop-transpose", "change-constant",
            "delete-mapping"} <= set(ops)
    (concat,) = ops["swap-concat"]
    assert "torch.cat([up, gate], dim=0)" in applied[concat.id]
    assert any("torch.chunk(2, w, dim=0)" in applied[m.id] for m in ops["swap-args"])
    assert any("both[0:n + 1]" in applied[m.id] for m in ops["off-by-one"])
    assert any("range(n + 1)" in applied[m.id] for m in ops["off-by-one"])
    assert any("return (both, head.T, not True)" in applied[m.id].replace("return both, head.T", "return (both, head.T")
               or "return both, head.T, not True" in applied[m.id] for m in ops["drop-transpose"])
    assert any("return both.t(), head, not True" in applied[m.id] for m in ops["drop-transpose"])
    assert any("torch.chunk(w, 2, dim=1)" in applied[m.id] for m in ops["change-constant"])
    assert any("w is not None" in applied[m.id] for m in ops["flip-bool"])
    deleted = [applied[m.id] for m in ops["delete-mapping"]]
    assert len(deleted) == 2 and all(ast.parse(text) for text in deleted)
    tree = ast.parse(deleted[1])
    (assign,) = [n for n in tree.body if isinstance(n, ast.Assign)]
    assert [ast.unparse(e.func) for e in assign.value.elts] == ["AutoMapping"]  # the second entry is gone, comma too
    for m in ms:
        ast.parse(applied[m.id])  # every mutant is still Python
        assert applied[m.id] != SOURCE


def test_nothing_is_mutated_where_no_conversion_can_show_it():
    ms = mutants.generate(SOURCE, "models/x.py")
    lines = {m.line for m in ms}
    src = SOURCE.splitlines()
    assert not any('"""' in src[line - 1] or "raise" in src[line - 1] or "logger" in src[line - 1] for line in lines)
    assert not any("n: int = 2" in m.original for m in ms)  # signatures and defaults


def test_ids_survive_unrelated_edits_and_a_moved_file_is_refused():
    before = {m.id: m for m in mutants.generate(SOURCE, "models/x.py")}
    shifted = "# a new comment\n\n" + SOURCE
    after = {m.id: m for m in mutants.generate(shifted, "models/x.py")}
    assert set(before) == set(after) and len(before) == len(mutants.generate(SOURCE, "models/x.py"))
    some = next(iter(before.values()))
    with pytest.raises(ValueError, match="no longer has"):
        some.apply(shifted)  # offsets of the old text: refused, never a wrong edit
    assert after[some.id].apply(shifted) != shifted


def test_every_mutant_of_the_real_conversion_code_compiles():
    package = mutants.bridge_package(None)
    for rel in mutants.DEFAULT_FILES:
        source = (package / rel).read_text()
        ms = mutants.generate(source, rel)
        assert len(ms) > 100 and len({m.id for m in ms}) == len(ms)
        for m in mutants.sample(ms, 40, seed=1):
            compile(m.apply(source), rel, "exec")


def test_a_family_file_runs_its_family_and_the_shared_code_a_cover_of_families():
    from harness.execution import run_service
    from harness.matrix.cases import load_cases

    cases = [c for c in load_cases().select(lane="cpu", set_name="default")
             if not c.invalid_reason and not run_service.not_runnable_here(c, "cpu")]
    package = mutants.bridge_package(None)
    llama = mutants.covering_cases("models/llama/llama_bridge.py", cases, package)
    assert llama and {c.model.family for c in llama} == {"llama"} and all(c.path in mutants.COVERING_PATHS for c in llama)
    assert {c.path for c in llama} == set(mutants.COVERING_PATHS)  # the config export runs the bridge too
    shared = mutants.covering_cases("models/conversion/param_mapping.py", cases, package)
    families = {c.model.family for c in shared}
    used = set().union(*(mutants.mapping_classes(package / "models" / c.model.family_def.architecture.module)
                         for c in cases if c.path in mutants.COVERING_PATHS))
    covered = set().union(*(mutants.mapping_classes(package / "models" / c.model.family_def.architecture.module)
                            for c in shared))
    assert covered == used and 1 < len(families) < len({c.model.family for c in cases})


def test_the_kill_rate_counts_only_mutants_that_ran_and_are_not_equivalent():
    m = mutants.generate(SOURCE, "models/x.py")[:6]
    results = [mutants.MutantResult(m[0], mutants.KILLED), mutants.MutantResult(m[1], mutants.KILLED),
               mutants.MutantResult(m[2], mutants.SURVIVED), mutants.MutantResult(m[3], mutants.EQUIVALENT, why="x"),
               mutants.MutantResult(m[4], mutants.NOT_RUN, why="budget"),
               mutants.MutantResult(m[5], mutants.NOT_REACHED, why="no passing case runs line 9")]
    outcome = mutants.MutantsOutcome(baseline=None, results=results, candidates={"models/x.py": 20},
                                     reached={"models/x.py": 15})
    (score,) = outcome.scores
    assert (score.candidates, score.reached, score.not_reached, score.sampled) == (20, 15, 5, 5)
    assert (score.killed, score.survived, score.equivalent, score.not_run) == (2, 1, 1, 1)
    assert score.kill_rate == pytest.approx(2 / 3) and score.reach == pytest.approx(0.75)
    md = mutants.markdown(outcome)
    assert "| `models/x.py` | 20 | 15 (75%) | 5 | 2 | 1 | 1 | 1 | 67% |" in md and "#### Survivors (1)" in md and m[2].diff in md
    assert f"- `models/x.py` `{m[5].function}`: 1" in md  # the code no case runs, by function


def test_a_mutant_reaches_only_the_cases_that_run_its_line_and_a_deleted_row_only_where_a_name_resolves():
    from harness.execution.run_dir import CaseCoverage

    ms = mutants.generate(SOURCE, "models/x.py")
    head = next(m for m in ms if m.operator == "off-by-one" and m.original == "0:n")
    row = next(m for m in ms if m.operator == "delete-mapping" and "AutoMapping" in m.original)
    assert row.mapping_row == "a" and row.lines == range(row.line, row.line + 1)
    case = type("C", (), {})
    a, b = case(), case()
    a.id, b.id = "a/tp1/memory/roundtrip", "b/tp1/memory/roundtrip"
    coverage = {a.id: CaseCoverage(a.id, {"models/x.py": [head.line, row.line]}, ["a"]),
                b.id: CaseCoverage(b.id, {"models/x.py": [row.line]}, ["decoder.layers.0.x"])}
    assert mutants.reaching(head, [a, b], coverage) == [a]  # b never runs the slice
    assert mutants.reaching(row, [a, b], coverage) == [a]  # b builds the row but resolves nothing through it
    assert mutants.row_pattern("decoder.layers.*.mlp.**").fullmatch("decoder.layers.12.mlp.experts.local_experts.3.w")
    assert not mutants.row_pattern("decoder.layers.*.mlp").fullmatch("decoder.layers.x.mlp")
    assert mutants.reaching(head, [a, b], {}) == []  # no record: not reached, never assumed


def test_the_html_page_shows_the_rate_and_survivors_first_with_their_diffs():
    m = mutants.generate(SOURCE, "models/x.py")[:3]
    outcome = mutants.MutantsOutcome(baseline=None, results=[
        mutants.MutantResult(m[0], mutants.KILLED, killed_by=("a/tp1/memory/roundtrip: tensors: 1/2 differ",)),
        mutants.MutantResult(m[1], mutants.SURVIVED, cases=("a/tp1/memory/roundtrip",)),
        mutants.MutantResult(m[2], mutants.NOT_REACHED, why="no passing case runs line 9")])
    page = mutants.html(outcome, "20261202T000000Z-mutants")
    assert "<td>50%</td>" in page and page.index(m[1].id) < page.index(m[0].id)  # the survivor leads
    assert "killed by: a/tp1/memory/roundtrip: tensors: 1/2 differ" in page
    assert m[2].id not in page and f"{m[2].function}</td><td>1</td>" in page  # not reached: by function only


def test_every_equivalent_mutant_listed_exists_and_says_why():
    """A stale entry (the Bridge moved on) would silently excuse nothing; an entry without a
    reason would excuse anything."""
    listed = mutants.load_equivalent()
    package = mutants.bridge_package(None)
    files = {i.split(":", 1)[0] for i in listed}
    generated = {m.id for f in files for m in mutants.generate((package / f).read_text(), f)}
    assert set(listed) <= generated, sorted(set(listed) - generated)
    assert all(len(why.split()) >= 8 for why in listed.values())


def test_a_mutant_runs_on_its_files_cover_first_and_on_the_other_reaching_cases_only_if_it_survives():
    class C:
        def __init__(self, id, world_size):
            self.id, self.world_size = id, world_size

    cover_1, cover_2 = C("q/tp1/memory/roundtrip", 1), C("q/tp2/memory/roundtrip", 2)
    other_1, other_2 = C("t@tied/tp1/memory/roundtrip", 1), C("t@tied/tp1-pp2/memory/roundtrip", 2)
    stages = mutants.escalation([other_2, cover_2, other_1, cover_1], {cover_1.id, cover_2.id})
    assert stages == [[cover_1], [cover_2], [other_1], [other_2]]
    assert mutants.escalation([other_2], {cover_1.id}) == [[other_2]]  # only another family reaches it


def test_a_pinned_failure_shows_a_mutant_only_when_it_fails_differently():
    from harness.results import CaseResult, CheckResult

    def result(status, failed=(), digest="a"):
        checks = [CheckResult(name, False, f"{name} failed") for name in failed]
        return CaseResult("d/tp1/memory/roundtrip", status, checks=checks,
                          fingerprint={"hf": {"w": [[2, 2], "float32", digest]}})

    pinned = result("fail", ["logits-hf-vs-megatron"])
    assert mutants.shows_mutant(pinned, result("fail", ["logits-hf-vs-megatron"])) == ""  # the same failure
    assert "different bytes" in mutants.shows_mutant(pinned, result("fail", ["logits-hf-vs-megatron"], digest="b"))
    assert "failing checks" in mutants.shows_mutant(pinned, result("fail", ["logits-hf-vs-megatron", "tensors"]))
    # A pinned logit failure: the same distance is no kill; twice as far (past the gate) is.
    logits = {"max_abs_diff": 8.6e-3, "kl": 8.4e-7, "tolerance": {"max_abs": 1e-5, "kl": 1e-11}}
    pinned.fingerprint["logits"] = logits
    same = result("fail", ["logits-hf-vs-megatron"])
    same.fingerprint["logits"] = dict(logits)
    assert mutants.shows_mutant(pinned, same) == ""
    same.fingerprint["logits"] = {**logits, "max_abs_diff": 1.5e-2}  # under 2x: not shown
    assert mutants.shows_mutant(pinned, same) == ""
    moved = result("fail", ["logits-hf-vs-megatron"])
    moved.fingerprint["logits"] = {**logits, "max_abs_diff": 3.1, "kl": 0.4}
    assert "logits moved, max_abs_diff 3.10e+00" in mutants.shows_mutant(pinned, moved)
    moved.fingerprint["logits"] = {**logits, "kl": 2e-6}
    assert "logits moved, kl" in mutants.shows_mutant(pinned, moved)
    # A pinned error (mistral@rope-yarn's provider crash): the same error is no kill; running is.
    errored = result("error")
    errored.fingerprint = {}
    same_error = result("error")
    same_error.fingerprint = {}
    assert mutants.shows_mutant(errored, same_error) == ""
    assert "status pass, golden error" in mutants.shows_mutant(errored, result("pass"))
    passed = result("pass")
    assert mutants.shows_mutant(passed, result("pass")) == ""
    assert mutants.shows_mutant(passed, result("fail", ["tensors"])) == "tensors: tensors failed"


def test_an_edit_of_a_provider_field_the_lane_sets_itself_reaches_no_case():
    source = textwrap.dedent('''
        def provider_bridge(self, hf):
            provider = make(hf)
            provider.bias_dropout_fusion = True
            provider.num_layers = hf.n + 0
            return provider
    ''')
    ms = mutants.generate(source, "models/y.py")
    fusion = next(m for m in ms if m.provider_field == "bias_dropout_fusion")
    layers = next(m for m in ms if m.provider_field == "num_layers")
    case = type("C", (), {"id": "y/tp1/memory/roundtrip"})()
    ran = {case.id: __import__("harness.execution.run_dir", fromlist=["CaseCoverage"]).CaseCoverage(
        case.id, {"models/y.py": [fusion.line, layers.line]}, [])}
    lane_sets = frozenset({"bias_dropout_fusion"})
    assert mutants.reaching(fusion, [case], ran, lane_sets) == []
    assert mutants.reaching(layers, [case], ran, lane_sets) == [case]
    assert mutants.reaching(fusion, [case], ran) == [case]  # a lane that leaves it alone
