"""Detection power, measured: small mutants of Megatron-Bridge's conversion code, run through the
matrix (``harness mutants``).

The seeded faults (``faults``) are regressions someone imagined. Mutants ask the other question:
of all the small ways the conversion code could be wrong, what fraction does the matrix catch?
Each mutant is one edit of one Bridge file, made with ``ast`` in a throw-away copy of the tree
(mutmut and cosmic-ray mutate a project run by its own test runner; this tree is a third party's,
run through the harness's launcher with ``--megatron-bridge``, so the edit is made here):

    swap-concat     torch.cat([a, b]) -> torch.cat([b, a])     (gate/up, q/k/v order)
    swap-args       f(a, b) -> f(b, a)
    off-by-one      x[a:b] -> x[a:b + 1], range(n) -> range(n + 1)
    flip-bool       True <-> False, not x -> x, == <-> !=, in <-> not in, is <-> is not
    drop-transpose  w.t() / w.transpose(0, 1) / w.T -> w
    change-constant an int n -> n + 1 (dim=0 -> dim=1, a split count)
    delete-mapping  one ``...Mapping(...)`` entry left out of a mapping list

The cases that cover a file are a family's own memory round trips and config exports (for its
bridge and provider files); for the shared conversion code (``models/conversion/``), those of the
fewest families whose bridges use every mapping class any CPU-runnable family uses (a greedy
cover, read from the bridges' source). The unmutated copy runs every selected case on those paths
first, recording what of the Bridge each executes (``RunSpec.line_coverage``). A mutant then runs
only on the cases that execute its lines (and, for a deleted mapping row, resolve a
parameter through it): its file's cover first, and a survivor there on every other reaching case
(``escalation``), torch_dist round trips included (``ESCALATION_PATHS``).
A mutant no case reaches is *not reached*: code the matrix never runs (quantised or PEFT export,
a layer kind no tiny model has), or a provider field the lane sets itself (the CPU lane's kernel,
dtype and MoE dispatch flags, recorded in the rank provenance), which no case on it can show. It is listed by function, apart from the kill rate, because no
case kills it and no reason makes it equivalent; sampling (``--per-file``) draws from the reached
ones. A mutant is *killed* when a case that passes on the unmutated copy does not pass with it,
or one that fails there (a pinned upstream failure: its other checks still bite) fails
differently (``shows_mutant``). A survivor is a gap in the matrix, or an equivalent mutant (a change
no conversion can show); ``golden/mutants/equivalent.yaml`` records the latter with the reason,
so a later run lists only new survivors. Mutant IDs hash the edited source and its function, not
line numbers, so they survive unrelated edits of the file.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import yaml

from harness import workspace
from harness.execution import run_service
from harness.execution.run_dir import CaseCoverage
from harness.execution.source_trees import validate
from harness.matrix.cases import Case
from harness.reporting import run_report
from harness.regression import golden
from harness.results import ERROR, FAIL, PASS, CaseResult
from harness.run_spec import RunSpec, SourceTree

EQUIVALENT_FILE = workspace.REPO_ROOT / "golden" / "mutants" / "equivalent.yaml"
CONVERSION_DIR = "models/conversion/"
DEFAULT_FILES = ("models/conversion/param_mapping.py", "models/conversion/model_bridge.py")
KILLED, SURVIVED, EQUIVALENT, NOT_RUN, NOT_REACHED = "killed", "survived", "equivalent", "not-run", "not-reached"

_CONCAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_TRANSPOSE = {"t", "transpose", "permute"}
_NO_SWAP = {"isinstance", "issubclass", "getattr", "setattr", "hasattr", "print", "format", "join", "get", "setdefault",
            "replace", "startswith", "endswith", "split", "rsplit", "warn", "warning", "info", "debug", "error",
            "append", "extend", "update", "register_bridge", "sub", "match", "search", "fullmatch"}
_FLIPPED_OPS = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot,
                ast.IsNot: ast.Is}
_QUIET_CALLS = {"warn", "warning", "info", "debug", "error", "exception", "print", "print_rank_0", "log"}


@dataclass(frozen=True)
class Mutant:
    """One edit of one file: ``original`` (a source segment at ``span``) becomes ``replacement``."""

    id: str  # "<file>:<operator>:<hash>": stable across unrelated edits of the file
    file: str  # relative to the megatron/bridge package
    operator: str
    line: int
    function: str  # the enclosing function ("<module>" at top level)
    original: str
    replacement: str
    span: tuple[int, int]  # character offsets of ``original`` in the file
    end_line: int = 0  # the last line of ``original`` (``line`` when 0)
    mapping_row: str = ""  # delete-mapping: the deleted row's megatron_param pattern
    provider_field: str = ""  # the mutant is in ``provider.<field> = ...``: that field

    @property
    def lines(self) -> range:
        return range(self.line, max(self.line, self.end_line) + 1)

    def apply(self, source: str) -> str:
        start, end = self.span
        if source[start:end] != self.original:
            raise ValueError(f"{self.id}: the file no longer has {self.original!r} at line {self.line}")
        return source[:start] + self.replacement + source[end:]

    @property
    def diff(self) -> str:
        """A one-hunk diff a reviewer reads: where, then the line before and after."""
        before = self.original.strip().splitlines() or [""]
        after = self.replacement.strip().splitlines() or ["(deleted)"]
        return "\n".join([f"--- {self.file}:{self.line} in {self.function}() [{self.operator}]",
                          *(f"- {line}" for line in before), *(f"+ {line}" for line in after)])


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _plus_one(node: ast.expr) -> ast.expr:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return ast.Constant(node.value + 1)
    return ast.BinOp(left=node, op=ast.Add(), right=ast.Constant(1))


def _mutations(node: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    """(operator, replacement node) for each mutant of ``node`` itself (not of its children)."""
    if isinstance(node, ast.Call):
        callee = _callee(node)
        args = node.args
        if callee in _CONCAT and args and isinstance(args[0], (ast.List, ast.Tuple)) and len(args[0].elts) >= 2:
            new = copy.deepcopy(node)
            new.args[0].elts[0], new.args[0].elts[1] = new.args[0].elts[1], new.args[0].elts[0]
            yield "swap-concat", new
        elif (len(args) >= 2 and callee not in _NO_SWAP and not any(isinstance(a, ast.Starred) for a in args[:2])
              and not all(isinstance(a, ast.Constant) for a in args[:2]) and ast.dump(args[0]) != ast.dump(args[1])):
            new = copy.deepcopy(node)
            new.args[0], new.args[1] = new.args[1], new.args[0]
            yield "swap-args", new
        if isinstance(node.func, ast.Attribute) and callee in _TRANSPOSE:
            yield "drop-transpose", node.func.value
        if callee == "range" and args:
            new = copy.deepcopy(node)
            new.args[-1 if len(args) < 3 else 1] = _plus_one(new.args[-1 if len(args) < 3 else 1])
            yield "off-by-one", new
    elif isinstance(node, ast.Attribute) and node.attr in ("T", "mT") and isinstance(node.ctx, ast.Load):
        yield "drop-transpose", node.value
    elif isinstance(node, ast.Slice):
        for bound in ("lower", "upper"):
            value = getattr(node, bound)
            if value is not None:
                yield "off-by-one", replace_field(node, bound, _plus_one(copy.deepcopy(value)))
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        yield "flip-bool", ast.Constant(not node.value)
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        yield "change-constant", ast.Constant(node.value + 1)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "flip-bool", node.operand
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _FLIPPED_OPS:
        new = copy.deepcopy(node)
        new.ops = [_FLIPPED_OPS[type(node.ops[0])]()]
        yield "flip-bool", new


def _megatron_param(mapping: ast.Call) -> str:
    """A mapping row's Megatron pattern: its ``megatron_param=`` or first argument, when a literal."""
    arg = next((k.value for k in mapping.keywords if k.arg == "megatron_param"), mapping.args[0] if mapping.args else None)
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else ""


def row_pattern(megatron_param: str) -> re.Pattern:
    """A mapping row's wildcards as the registry reads them: ``**`` any text, ``*`` a number
    (``MegatronMappingRegistry._convert_pattern_to_regex``, models/conversion/mapping_registry.py)."""
    return re.compile(re.escape(megatron_param).replace(r"\*\*", "(.*)").replace(r"\*", r"(\d+)"))


def reaching(mutant: Mutant, cases: list[Case], coverage: dict[str, CaseCoverage],
             lane_sets: frozenset[str] = frozenset()) -> list[Case]:
    """The cases that execute a line of the mutant; for a deleted mapping row, only those whose
    conversion resolved some parameter through that row (every row is built on every call). None
    for an edit of a provider field the lane sets itself (``lane_sets``: a CPU kernel or dtype
    flag, replaced in every case before the model is built)."""
    if mutant.provider_field and mutant.provider_field in lane_sets:
        return []
    row = row_pattern(mutant.mapping_row) if mutant.mapping_row else None
    out = []
    for case in cases:
        ran = coverage.get(case.id)
        if ran is None or not set(ran.lines.get(mutant.file, ())).intersection(mutant.lines):
            continue
        if row is not None and not any(row.fullmatch(n) for n in ran.resolved):
            continue
        out.append(case)
    return out


def replace_field(node: ast.AST, name: str, value: ast.AST) -> ast.AST:
    new = copy.deepcopy(node)
    setattr(new, name, value)
    return new


class _Source:
    """Offsets in a file's text from ``ast``'s (line, UTF-8 byte column) positions."""

    def __init__(self, text: str):
        self.text = text
        self.starts = [0]
        for line in text.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))
        self.lines = text.splitlines(keepends=True)

    def offset(self, line: int, byte_col: int) -> int:
        return self.starts[line - 1] + len(self.lines[line - 1].encode()[:byte_col].decode(errors="ignore"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)


def _skipped_subtrees(tree: ast.Module) -> set[int]:
    """Nodes no mutant touches: annotations, f-strings, docstrings, raise / assert statements and
    logging calls (a mutant there changes a message or a guard's wording, not a conversion)."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mark(node.returns)
            for a in (*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs, node.args.vararg, node.args.kwarg):
                if a is not None:
                    mark(a.annotation)
            mark(node.args)  # default values are signatures, not conversion logic
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        elif isinstance(node, (ast.JoinedStr, ast.Raise, ast.Assert)):
            mark(node)
        elif isinstance(node, ast.Call) and _callee(node) in _QUIET_CALLS:
            mark(node)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            mark(node)  # docstrings
    return skip


def generate(source: str, file: str) -> list[Mutant]:
    """Every mutant of one file, in source order."""
    tree = ast.parse(source)
    text = _Source(source)
    skip = _skipped_subtrees(tree)
    functions: dict[int, str] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(fn):
                functions[id(n)] = fn.name  # the innermost wins: walked after its outer function
    out: list[Mutant] = []
    seen: dict[str, int] = {}

    provider_fields: dict[int, str] = {}  # node -> the provider field its statement assigns
    for stmt in ast.walk(tree):
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Attribute)
                and isinstance(stmt.targets[0].value, ast.Name) and stmt.targets[0].value.id == "provider"):
            provider_fields.update((id(n), stmt.targets[0].attr) for n in ast.walk(stmt.value))

    def add(operator: str, node: ast.AST, span: tuple[int, int], replacement: str, row: str = "") -> None:
        original = source[span[0]:span[1]]
        function = functions.get(id(node), "<module>")
        key = f"{operator}|{function}|{original}|{replacement}"
        seen[key] = seen.get(key, 0) + 1  # the n-th identical edit in one function
        digest = hashlib.sha1(f"{key}|{seen[key]}".encode()).hexdigest()[:10]
        out.append(Mutant(id=f"{file}:{operator}:{digest}", file=file, operator=operator, line=node.lineno,
                          function=function, original=original, replacement=replacement, span=span,
                          end_line=getattr(node, "end_lineno", node.lineno), mapping_row=row,
                          provider_field=provider_fields.get(id(node), "")))

    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        if isinstance(node, ast.List) and len(node.elts) >= 2:
            for elt in node.elts:
                if isinstance(elt, ast.Call) and _callee(elt).endswith("Mapping"):
                    start, end = text.span(elt)
                    rest = source[end:]
                    end += len(rest) - len(rest.lstrip(" \t")) + (1 if rest.lstrip(" \t").startswith(",") else 0)
                    add("delete-mapping", elt, (start, end), "", row=_megatron_param(elt))
        for operator, new in _mutations(node):
            add(operator, node, text.span(node), ast.unparse(new))
    out.sort(key=lambda m: (m.span, m.operator))
    return out


# -------------------------------------------------------------------------------- the cases


def bridge_package(tree: SourceTree | None) -> Path:
    """The megatron/bridge package to mutate: a given Bridge tree's, else the installed one."""
    if tree is not None:
        return Path(tree.import_root) / "megatron" / "bridge"
    import importlib.util

    spec = importlib.util.find_spec("megatron.bridge")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("megatron.bridge is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def mapping_classes(module_file: Path) -> frozenset[str]:
    """The ``...Mapping`` classes a bridge module names (what of the shared code it exercises)."""
    tree = ast.parse(module_file.read_text())
    return frozenset(n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id.endswith("Mapping"))


# The cheapest paths that run a family's whole bridge: its weight mappings both ways (and the
# logits), and its config export (megatron_to_hf_config, which no weight path calls).
COVERING_PATHS = ("memory/roundtrip", "hf/config-export")
# Where a survivor of those goes on: also the torch_dist round trips, which run what only a saved
# checkpoint shows (the provider's dist-checkpoint settings, sharded state dicts) at a higher cost.
ESCALATION_PATHS = (*COVERING_PATHS, "torch_dist/roundtrip")


def covering_cases(file: str, cases: list[Case], package: Path) -> list[Case]:
    """The memory round trips and config-only exports that run ``file``: its family's (a family's
    own bridge or provider file), or for the shared conversion code those of the fewest families
    whose bridges use every mapping class any of the given cases' families uses."""
    trips = [c for c in cases if c.path in COVERING_PATHS]
    by_family: dict[str, list[Case]] = {}
    for c in trips:
        by_family.setdefault(c.model.family, []).append(c)
    modules = {fam: c[0].model.family_def.architecture.module for fam, c in by_family.items()}
    if not file.startswith(CONVERSION_DIR):
        own = [c for fam, cs in by_family.items() if f"models/{modules[fam]}" == file for c in cs]
        if own:  # a family's bridge module: that family's cases
            return own
        folder = file.removeprefix("models/").split("/", 1)[0] + "/"  # a provider or helper: its folder's families
        return [c for fam, cs in by_family.items() if modules[fam].startswith(folder) for c in cs]
    uses = {fam: mapping_classes(package / "models" / module) for fam, module in modules.items()}
    needed = frozenset().union(*uses.values()) if uses else frozenset()
    chosen: list[str] = []
    covered: frozenset[str] = frozenset()
    while covered != needed:
        fam = max(sorted(uses), key=lambda f: (len(uses[f] - covered), -len(by_family[f])))
        if not uses[fam] - covered:
            break
        chosen.append(fam)
        covered |= uses[fam]
    return [c for fam in chosen for c in by_family[fam]]


# ------------------------------------------------------------------------------ the verdicts


@dataclass(frozen=True)
class MutantResult:
    mutant: Mutant
    status: str  # KILLED / SURVIVED / EQUIVALENT / NOT_RUN / NOT_REACHED
    killed_by: tuple[str, ...] = ()  # "<case ID>: <why it shows the mutant>" (shows_mutant)
    why: str = ""  # an equivalent mutant's reason, or why it did not run
    cases: tuple[str, ...] = ()
    seconds: float = 0.0
    lane_set: bool = False  # NOT_REACHED because the lane sets the edited provider field itself


@dataclass
class FileScore:
    file: str
    candidates: int = 0  # every mutant of the file
    reached: int = 0  # of those, the ones some case that ran unmutated executes (the rest: not_reached)
    killed: int = 0
    survived: int = 0
    equivalent: int = 0
    not_run: int = 0

    @property
    def not_reached(self) -> int:
        return self.candidates - self.reached

    @property
    def sampled(self) -> int:
        return self.killed + self.survived + self.equivalent + self.not_run

    @property
    def kill_rate(self) -> float | None:
        """Killed over non-equivalent mutants that ran; None if none ran."""
        ran = self.killed + self.survived
        return self.killed / ran if ran else None

    @property
    def reach(self) -> float | None:
        """The share of the file's mutants some case executes."""
        return self.reached / self.candidates if self.candidates else None


def scores(results: list[MutantResult], candidates: dict[str, int] | None = None,
           reached: dict[str, int] | None = None) -> list[FileScore]:
    """Per file. ``candidates`` / ``reached`` count every mutant of a file and those a case
    executes, sampled or not; without them, the results are all the candidates there were."""
    by_file: dict[str, FileScore] = {}
    for r in results:
        s = by_file.setdefault(r.mutant.file, FileScore(r.mutant.file))
        if r.status != NOT_REACHED:
            setattr(s, r.status.replace("-", "_"), getattr(s, r.status.replace("-", "_")) + 1)
    for file, s in by_file.items():
        mine = [r for r in results if r.mutant.file == file]
        s.candidates = (candidates or {}).get(file, len(mine))
        s.reached = (reached or {}).get(file, sum(r.status != NOT_REACHED for r in mine))
    return list(by_file.values())


def load_equivalent(path: Path = EQUIVALENT_FILE) -> dict[str, str]:
    """Mutant ID -> why no conversion can show it."""
    if not path.exists():
        return {}
    doc = yaml.safe_load(path.read_text()) or {}
    return {str(e["id"]): str(e["why"]) for e in doc.get("equivalent", [])}


def sample(mutants: list[Mutant], per_file: int | None, seed: int) -> list[Mutant]:
    """Up to ``per_file`` mutants of each file, drawn with ``seed`` (all with None)."""
    if per_file is None:
        return mutants
    rng = random.Random(seed)
    by_file: dict[str, list[Mutant]] = {}
    for m in mutants:
        by_file.setdefault(m.file, []).append(m)
    out = []
    for file, ms in by_file.items():
        out += sorted(rng.sample(ms, min(per_file, len(ms))), key=lambda m: m.span)
    return out


@dataclass
class MutantsOutcome:
    baseline: run_service.RunOutcome
    results: list[MutantResult] = field(default_factory=list)
    candidates: dict[str, int] = field(default_factory=dict)  # file -> every mutant of it
    reached: dict[str, int] = field(default_factory=dict)  # file -> those some case that ran unmutated executes

    @property
    def new_survivors(self) -> list[MutantResult]:
        return [r for r in self.results if r.status == SURVIVED]

    @property
    def scores(self) -> list[FileScore]:
        return scores(self.results, self.candidates or None, self.reached or None)

    def not_reached_by_function(self) -> list[tuple[str, str, int]]:
        """(file, where, mutants) for the code no case runs, largest first: ``where`` is the
        function, with the provider field for an edit the lane overrides."""
        counts: dict[tuple[str, str], int] = {}
        for r in self.results:
            if r.status == NOT_REACHED:
                where = (f"{r.mutant.function}: provider.{r.mutant.provider_field}, set by the lane" if r.lane_set
                         else r.mutant.function)
                counts[(r.mutant.file, where)] = counts.get((r.mutant.file, where), 0) + 1
        return sorted(((f, fn, n) for (f, fn), n in counts.items()), key=lambda t: (-t[2], t[0], t[1]))


def _forget_bytecode(file: Path) -> None:
    """A rewritten file of the same size in the same second would pass Python's pyc check."""
    for pyc in (file.parent / "__pycache__").glob(f"{file.stem}.*.pyc"):
        pyc.unlink(missing_ok=True)


def run_mutants(candidates: list[Mutant], cases: list[Case], lane: str, bridge: SourceTree | None,
                other_trees: list[SourceTree], budget_s: float, equivalent: dict[str, str],
                per_file: int | None = None, seed: int = 0,
                say: Callable[[str], None] = lambda text: None) -> MutantsOutcome:
    """Copy the Bridge package once, run the unmutated copy on every covering case recording what
    each executes (the baseline), draw ``per_file`` of each file's reached mutants (all with None),
    then run each on the cases that reach it; ``budget_s`` stops it between mutants."""
    package = bridge_package(bridge)
    files = sorted({m.file for m in candidates})
    cover = {f: covering_cases(f, cases, package) for f in files}  # where each file's mutants run first
    cover_families = {f: {c.model.family for c in cover[f]} for f in files}
    scope = {f: [c for c in cases if c.path in ESCALATION_PATHS
                 and (f.startswith(CONVERSION_DIR) or c.model.family in cover_families[f])]
             for f in files}  # and where they may run if they survive there
    union = list({c.id: c for cs in scope.values() for c in cs}.values())
    with tempfile.TemporaryDirectory(prefix="harness-mutants-") as tmp:
        copy_root = Path(tmp) / "src" / "megatron" / "bridge"
        shutil.copytree(package, copy_root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        tree = validate("megatron-bridge", tmp)
        trees = [t for t in other_trees if t.kind != "megatron-bridge"] + [tree]
        say(f"harness: baseline: the unmutated Bridge copy on {len(union)} case(s), recording the lines each runs")
        baseline = run_service.run_selection(RunSpec(cases=union, lane=lane, label="mutants", source_trees=trees,
                                                     line_coverage=(str(copy_root),)))
        run_report.write_outcome(baseline)
        # A case that failed or errored unmutated (a pinned upstream failure) still shows a mutant
        # that changes its outcome: mistral@rope-yarn errors in the provider, and a mutant that
        # skips the YaRN branch lets it run (a survivor while errored cases were left out).
        unmutated = {r.case_id: r for r in baseline.results if r.status in (PASS, FAIL, ERROR)}
        ran = baseline.run.coverage()
        lane_sets = frozenset(f for doc in baseline.run.provenance().values()
                              for f in doc.get("runtime", {}).get("provider_fields_set", []))
        reach = {m.id: reaching(m, [c for c in scope[m.file] if c.id in unmutated], ran, lane_sets)
                 for m in candidates}
        outcome = MutantsOutcome(baseline=baseline)
        for m in candidates:
            outcome.candidates[m.file] = outcome.candidates.get(m.file, 0) + 1
            outcome.reached[m.file] = outcome.reached.get(m.file, 0) + bool(reach[m.id])
        outcome.results += [MutantResult(m, NOT_REACHED, why=_unreached_why(m, lane, lane_sets),
                                         lane_set=m.provider_field in lane_sets)
                            for m in candidates if not reach[m.id]]
        chosen = sample([m for m in candidates if reach[m.id]], per_file, seed)
        say(f"harness: {sum(outcome.reached.values())} of {len(candidates)} mutants lie on code a case runs; "
            f"running {len(chosen)}")
        deadline = time.monotonic() + budget_s
        for i, m in enumerate(chosen, 1):
            on = reach[m.id]
            if m.id in equivalent:
                outcome.results.append(MutantResult(m, EQUIVALENT, why=equivalent[m.id]))
                continue
            if time.monotonic() >= deadline:
                outcome.results.append(MutantResult(m, NOT_RUN, why=f"budget ({budget_s:.0f} s) spent"))
                continue
            target = copy_root / m.file
            original = target.read_text()
            target.write_text(m.apply(original))
            _forget_bytecode(target)
            started = time.monotonic()
            killers: tuple[str, ...] = ()
            try:
                for stage in escalation(on, {c.id for c in cover[m.file]}):
                    if not killers:
                        run = run_service.run_selection(RunSpec(cases=stage, lane=lane, label=f"mutant-{i}",
                                                                source_trees=trees), stream=None)
                        run_report.write_outcome(run)  # a killer's or a survivor's run, to read
                        killers = tuple(f"{r.case_id}: {why}" for r in run.results
                                        if (why := shows_mutant(unmutated[r.case_id], r)))
            finally:
                target.write_text(original)
                _forget_bytecode(target)
            result = MutantResult(m, KILLED if killers else SURVIVED, killed_by=killers,
                                  cases=tuple(c.id for c in on), seconds=round(time.monotonic() - started, 1))
            outcome.results.append(result)
            say(f"[{i}/{len(chosen)}] {result.status.upper():8} {m.id} ({result.seconds:.0f}s)"
                + (f"  {killers[0][:100]}" if killers else f"\n{m.diff}"))
    return outcome


def shows_mutant(unmutated: CaseResult, mutated: CaseResult) -> str:
    """Why ``mutated`` shows the mutant ('' when it does not): a case that passed unmutated no
    longer passes, or one that failed unmutated fails differently, judged as ``golden`` judges a
    pinned failure (other failing checks, other tensor bytes or keys; ``golden.compare``)."""
    if unmutated.status == PASS:
        return "" if mutated.status == PASS else mutated.headline
    differences = golden.compare(golden.document(unmutated, provenance={}), mutated)
    why = differences[0] if differences else logits_moved(unmutated.fingerprint.get("logits"),
                                                           mutated.fingerprint.get("logits"))
    return f"fails differently than unmutated: {why}" if why else ""


# A pinned logit failure (e.g. gemma2's norm eps, max|d| 8.6e-3) must not hide a mutant that breaks
# the forward further (gemma2's zero-centred gamma flipped: a survivor before this). golden.compare
# leaves logits out, since they differ across machines and builds; the baseline and the mutant run
# on one machine with one build, where the CPU forward repeats to the bit, so a distance past twice
# the unmutated one (and past the check's own gate) is the mutant's doing, not noise.
LOGITS_MOVED = 2.0


def logits_moved(unmutated: dict | None, mutated: dict | None) -> str:
    """Why the mutated case's logits are further from HF's than the unmutated ones ('' if not)."""
    if not unmutated or not mutated:
        return ""
    gates = unmutated.get("tolerance", {})
    for metric, gate in (("max_abs_diff", "max_abs"), ("kl", "kl")):
        was, now = unmutated.get(metric), mutated.get(metric)
        if was is not None and now is not None and now > max(LOGITS_MOVED * was, gates.get(gate, 0.0)):
            return f"logits moved, {metric} {now:.2e} (unmutated {was:.2e})"
    return ""


def escalation(reaching_cases: list[Case], first: set[str]) -> list[list[Case]]:
    """The launches a mutant runs, cheapest first, stopping at the first kill: the reaching cases of
    its file's cover (``first``) at one rank, then at several; only a survivor goes on to every
    other reaching case (a shared helper's branch that only another family's layout runs, e.g.
    tied embeddings under PP), again one rank first."""
    mine = [c for c in reaching_cases if c.id in first]
    rest = [c for c in reaching_cases if c.id not in first]
    return [stage for group in (mine, rest) for stage in ([c for c in group if c.world_size == 1],
                                                          [c for c in group if c.world_size > 1]) if stage]


def _unreached_why(m: Mutant, lane: str = "", lane_sets: frozenset[str] = frozenset()) -> str:
    if m.provider_field in lane_sets:
        return f"the {lane} lane sets provider.{m.provider_field} itself (harness/runtimes/{lane}.py)"
    if m.mapping_row:
        return f"no case resolves a parameter through the row {m.mapping_row}"
    return f"no case runs line {m.line}" + (f"-{m.end_line}" if m.end_line > m.line else "")


# ------------------------------------------------------------------------------- the report


def markdown(outcome: MutantsOutcome) -> str:
    """Kill rate per file, every survivor with its diff (what a new case must kill), then the
    functions no case reaches."""
    lines = ["### Mutants of Megatron-Bridge's conversion code", "",
             "| file | mutants | reached | sampled | killed | survived | equivalent | not run | kill rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in outcome.scores:
        rate = f"{100 * s.kill_rate:.0f}%" if s.kill_rate is not None else "-"
        reach = f" ({100 * s.reach:.0f}%)" if s.reach is not None else ""
        lines.append(f"| `{s.file}` | {s.candidates} | {s.reached}{reach} | {s.sampled} | {s.killed} | {s.survived} "
                     f"| {s.equivalent} | {s.not_run} | {rate} |")
    survivors = outcome.new_survivors
    lines += ["", f"#### Survivors ({len(survivors)})", ""]
    lines += [f"```diff\n{r.mutant.diff}\n```\n`{r.mutant.id}` ran on {', '.join(r.cases)}" for r in survivors] or ["None."]
    unreached = outcome.not_reached_by_function()
    lines += ["", f"#### Not reached: functions no case runs ({sum(n for *_, n in unreached)} mutants)", ""]
    lines += [f"- `{file}` `{function}`: {n}" for file, function, n in unreached] or ["None."]
    return "\n".join(lines) + "\n"


def document(outcome: MutantsOutcome) -> dict:
    return {"scores": [{**asdict(s), "not_reached": s.not_reached, "kill_rate": s.kill_rate, "reach": s.reach}
                       for s in outcome.scores],
            "results": [{**asdict(r), "diff": r.mutant.diff} for r in outcome.results]}


def html(outcome: MutantsOutcome, run_name: str) -> str:
    """``mutants.html``: the same numbers as ``markdown``, every mutant with its diff, survivors first."""
    from harness.reporting.html.rendering import templates

    order = {SURVIVED: 0, KILLED: 1, EQUIVALENT: 2, NOT_RUN: 3}
    results = sorted((r for r in outcome.results if r.status != NOT_REACHED),
                     key=lambda r: (order[r.status], r.mutant.file, r.mutant.span))
    return templates().get_template("mutants.html.j2").render(run_name=run_name, scores=outcome.scores, results=results,
                                                              not_reached=outcome.not_reached_by_function())
