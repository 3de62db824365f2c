"""Cases are data: ``cases/*.yaml`` declare families x layouts x paths; this module expands them.

A case ID is ``<model>/<layout>/<format>/<kind>``, e.g. ``qwen3-moe/tp2-ep2/torch_dist/roundtrip``
or ``llama/tp2-to-tp1/torch_dist/reshard``. Every part comes from the YAML and canonical
formatting (``Layout.id``), never from list positions, so IDs are stable when files are edited.

Schema of one file (unknown keys are errors that name the file and the field)::

    description: free text
    matrix:
      - families: [llama, qwen2]          # zoo family names, or family@variant (zoo variants);
                                          #   ['*'] = every family (a case named elsewhere wins),
                                          #   ['*@bf16'] = every family at a variant all have
        where: moe                        # optional, with ['*'] only: moe | dense
        variants:                         # optional: named per-case overrides of the tiny config;
          mqa: {num_key_value_heads: 1}   #   each becomes model ID family@name (stable, readable)
        sweep: square                     # optional: generated variants (harness.matrix.coincidences)
        layouts: [tp1, tp2, tp2-to-tp1]   # "A-to-B" only for reshard paths
        paths: [memory/roundtrip, torch_dist/roundtrip]
        sets: [default]                   # default (CI; implies full) or full (nightly only)
        expect: invalid                   # optional: the layouts must be refused (shown, not run)
        timeout_s: 300                    # optional, per case
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from harness import workspace
from harness.errors import InputError, load_yaml
from harness.matrix import zoo
from harness.matrix.coincidences import SWEEPS
from harness.matrix.layouts import Layout, LayoutError
from harness.matrix import lanes as lane_rules

# format/kind -> description. The format is what sits on disk between the conversions.
PATHS: dict[str, str] = {
    "memory/roundtrip": "HF -> Megatron (in memory, load_hf_weights) -> HF (export_hf_weights)",
    "torch_dist/roundtrip": "HF -> Megatron -> torch_dist (save_megatron_model) -> Megatron (load_megatron_model) -> HF",
    "torch_dist/reshard": "HF -> Megatron at A -> torch_dist -> Megatron at B -> HF",
    "fsdp_dtensor/roundtrip": "HF -> Megatron-FSDP -> fsdp_dtensor -> Megatron-FSDP (other seed, strict load) -> HF",
    "fsdp_dtensor/reshard": "HF -> Megatron-FSDP at A -> fsdp_dtensor -> Megatron-FSDP at B (strict load) -> HF",
    "fsdp_dtensor/from-torch_dist": "HF -> Megatron -> torch_dist -> Megatron -> HF -> Megatron-FSDP -> fsdp_dtensor -> HF",
    "fsdp_dtensor/to-torch_dist": "HF -> Megatron-FSDP -> fsdp_dtensor -> Megatron-FSDP -> HF -> Megatron -> torch_dist -> HF",
    "fsdp_dtensor/checkpoint-inspector": "HF -> Megatron -> torch_dist -> Megatron-LM's checkpoint_inspector.py "
                                         "-> fsdp_dtensor -> Megatron-FSDP (strict load) -> HF (needs a Megatron-LM tree)",
    "fsdp_dtensor/key-contract": "the imported SwiGLU/GDN fsdp_dtensor handlers resolve every key to its own parameter (CPU)",
}
SETS = ("default", "full")
LANES = lane_rules.LANES
DEFAULT_TIMEOUT_S = 300.0

_VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_ENTRY_FIELDS = {"families", "where", "variants", "sweep", "layouts", "paths", "sets", "timeout_s", "expect"}
# `families: ['*']`: every family of the zoo, i.e. every text LM the Bridge in use registers
# (harness.matrix.bridge_registry), so a new upstream bridge brings its cases with it. `where`
# narrows it; layouts an architecture does not allow (EP without experts) are left out.
ALL_FAMILIES = "*"
FAMILY_FILTERS = {
    "moe": lambda m: m.is_moe,
    "dense": lambda m: not m.is_moe,
}
_FILE_FIELDS = {"description", "matrix"}


class CaseFileError(InputError, ValueError):
    """A case file that does not follow the schema; the message names file and field."""


class UnknownCaseError(InputError, KeyError):
    def __init__(self, case_id: str, known: Iterable[str]):
        close = difflib.get_close_matches(case_id, list(known), n=3, cutoff=0.4)
        hint = f"; closest: {', '.join(close)}" if close else "; run `harness list` to see all IDs"
        super().__init__(f"unknown case ID {case_id!r}{hint}")
        self.message = f"unknown case ID {case_id!r}{hint}"

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Case:
    """One runnable case: a model, where it is split, and which conversion path it takes."""

    model: zoo.ModelSpec
    layout: Layout
    path: str  # key of PATHS
    sets: frozenset[str]
    timeout_s: float = DEFAULT_TIMEOUT_S
    source: str = ""  # file the case came from, for error messages
    load_layout: Layout | None = None  # reshard target
    tag: str = ""  # "+<tag>" suffix: a variant of the case, e.g. with a seeded fault (selftest)
    invalid_reason: str = ""  # declared `expect: invalid`: the rule the layout breaks; never run
    from_every_family: bool = False  # from a `families: ['*']` entry: a case declared by name wins over it

    @property
    def model_id(self) -> str:
        return self.model.id

    @property
    def layout_id(self) -> str:
        if self.load_layout is not None:
            return f"{self.layout.id}-to-{self.load_layout.id}"
        return self.layout.id

    @property
    def id(self) -> str:
        base = f"{self.model_id}/{self.layout_id}/{self.path}"
        return f"{base}+{self.tag}" if self.tag else base

    @property
    def format(self) -> str:
        return self.path.split("/")[0]

    @property
    def kind(self) -> str:
        return self.path.split("/")[1]

    def tagged(self, tag: str) -> "Case":
        return replace(self, tag=tag)

    @property
    def world_size(self) -> int:
        sizes = [self.layout.world_size]
        if self.load_layout is not None:
            sizes.append(self.load_layout.world_size)
        return max(sizes)

    @property
    def family(self) -> zoo.Family:
        return zoo.get_family(self.model.family)

    @property
    def lanes(self) -> tuple[str, ...]:
        """The lanes this case can run on (the rules: harness.matrix.lanes)."""
        return lane_rules.lanes_for(self)


@dataclass
class CaseSet:
    cases: list[Case] = field(default_factory=list)

    def ids(self) -> list[str]:
        return [c.id for c in self.cases]

    def get(self, case_id: str) -> Case:
        base, _, tag = case_id.partition("+")
        for case in self.cases:
            if case.id == base:
                return case.tagged(tag) if tag else case
        raise UnknownCaseError(case_id, self.ids())

    def select(self, *, expr: str | None = None, lane: str | None = None, set_name: str | None = None) -> list[Case]:
        chosen = self.cases
        if set_name:
            chosen = [c for c in chosen if set_name in c.sets]
        if lane:
            chosen = [c for c in chosen if lane in c.lanes]
        if expr:
            chosen = [c for c in chosen if matches(c.id, expr)]
        return chosen


@dataclass(frozen=True)
class CaseKey:
    """A case ID taken apart: ``<family>[@<variant>]/<layout>/<format>/<kind>[+<fault>]`` (the
    ``+fault`` tag of selftest runs names a seeded regression). Here, beside ``Case.id`` which
    builds IDs, so the report grid and the gate's root causes split them the same way."""

    case_id: str
    family: str
    variant: str
    layout: str
    format: str
    kind: str
    fault: str

    @property
    def model(self) -> str:
        return f"{self.family}@{self.variant}" if self.variant else self.family

    @property
    def path(self) -> str:
        """The conversion path (a key of ``PATHS``): the report grid's panel."""
        return f"{self.format}/{self.kind}"


def parse_case_id(case_id: str) -> CaseKey:
    """The one place a case ID is taken apart. A malformed ID still splits (its missing parts are
    empty), so a report never fails to render on a surprising result."""
    base, _, fault = case_id.partition("+")
    model, layout, fmt, kind = (base.split("/", 3) + ["", "", ""])[:4]
    family, _, variant = model.partition("@")
    return CaseKey(case_id, family, variant, layout, fmt, kind, fault)


def matches(case_id: str, expr: str) -> bool:
    """``-k`` semantics: a glob if it has wildcards, else a substring; ``a or b``, ``not a``."""
    expr = expr.strip()
    if " or " in expr:
        return any(matches(case_id, part) for part in expr.split(" or "))
    if " and " in expr:
        return all(matches(case_id, part) for part in expr.split(" and "))
    if expr.startswith("not "):
        return not matches(case_id, expr[4:])
    if any(ch in expr for ch in "*?["):
        return fnmatch.fnmatchcase(case_id, expr)
    return expr in case_id


def _field_error(source: str, where: str, message: str) -> CaseFileError:
    return CaseFileError(f"{source}: {where}: {message}")


def _as_list(value: Any, source: str, where: str) -> list[Any]:
    if isinstance(value, (str, int)):
        return [value]
    if not isinstance(value, list) or not value:
        raise _field_error(source, where, f"expected a non-empty list, got {value!r}")
    return value


def _parse_layouts(text: str, path: str, source: str, where: str) -> tuple[Layout, Layout | None]:
    try:
        if "-to-" in text:
            if not path.endswith("/reshard"):
                raise _field_error(source, where, f"{text!r}: 'A-to-B' layouts are only for */reshard paths")
            save, load = text.split("-to-", 1)
            return Layout.parse(save), Layout.parse(load)
        if path.endswith("/reshard"):
            raise _field_error(source, where, f"{text!r}: reshard paths need an 'A-to-B' layout")
        return Layout.parse(text), None
    except LayoutError as err:
        raise _field_error(source, where, str(err)) from None


def expand_entry(entry: Any, source: str, index: int) -> list[Case]:
    where = f"matrix[{index}]"
    if not isinstance(entry, dict):
        raise _field_error(source, where, f"expected a mapping, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _ENTRY_FIELDS)
    if unknown:
        raise _field_error(source, f"{where}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(_ENTRY_FIELDS))})")
    for required in ("families", "layouts", "paths"):
        if required not in entry:
            raise _field_error(source, f"{where}.{required}", "required field is missing")

    families = _as_list(entry["families"], source, f"{where}.families")
    every_family = len(families) == 1 and str(families[0]).partition("@")[0] == ALL_FAMILIES
    if every_family:
        variant = str(families[0]).partition("@")[2]  # '*@bf16': every family at its bf16 variant
        families = [f"{name}@{variant}" if variant else name for name in zoo.families()]
    elif "where" in entry:
        raise _field_error(source, f"{where}.where", f"only for families: ['{ALL_FAMILIES}']")
    models = []
    for name in families:
        try:
            models.append(zoo.ModelSpec.parse(str(name)))
        except KeyError as err:
            raise _field_error(source, f"{where}.families", str(err).strip('"')) from None
    if "where" in entry:
        kind = entry["where"]
        if kind not in FAMILY_FILTERS:
            raise _field_error(source, f"{where}.where", f"unknown value {kind!r} (known: {', '.join(FAMILY_FILTERS)})")
        models = [m for m in models if FAMILY_FILTERS[kind](m)]
    if "variants" in entry:
        models = _with_variants(models, entry["variants"], source, f"{where}.variants")
    if "sweep" in entry:
        models = _with_sweep(models, entry["sweep"], source, f"{where}.sweep")
    expect = entry.get("expect")
    if expect not in (None, "invalid"):
        raise _field_error(source, f"{where}.expect", f"unknown value {expect!r} (the only one is 'invalid')")
    path_names = _as_list(entry["paths"], source, f"{where}.paths")
    for p in path_names:
        if p not in PATHS:
            raise _field_error(source, f"{where}.paths", f"unknown path {p!r} (known: {', '.join(PATHS)})")
    sets = _as_list(entry.get("sets", ["default"]), source, f"{where}.sets")
    for s in sets:
        if s not in SETS:
            raise _field_error(source, f"{where}.sets", f"unknown set {s!r} (known: {', '.join(SETS)})")
    set_names = frozenset(sets) | {"full"}  # the full (nightly) set contains the default set
    timeout = entry.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise _field_error(source, f"{where}.timeout_s", f"expected a positive number, got {timeout!r}")
    layouts = _as_list(entry["layouts"], source, f"{where}.layouts")

    cases = []
    for model in models:
        for layout_text in layouts:
            for path in path_names:
                layout, load_layout = _parse_layouts(str(layout_text), path, source, f"{where}.layouts")
                problems = [
                    f"{model.id} cannot be split as {each.id}: {'; '.join(p)}"
                    for each in filter(None, (layout, load_layout))
                    if (p := each.violations(model.hf_config, vocab_padded=model.vocab_padded)
                        + _refused_by_the_bridge(model, each) + each.format_violations(path.split("/")[0]))
                ]
                if problems and every_family and expect != "invalid":
                    continue  # a layout this architecture does not allow: not a case
                if problems and expect != "invalid":
                    raise _field_error(source, f"{where}.layouts", problems[0])
                if expect == "invalid" and not problems:
                    raise _field_error(source, f"{where}.expect",
                                       f"{model.id} at {layout_text} is valid, but the entry expects it to be refused")
                cases.append(
                    Case(
                        model=model,
                        layout=layout,
                        load_layout=load_layout,
                        path=path,
                        sets=set_names,
                        timeout_s=float(timeout),
                        source=source,
                        invalid_reason="; ".join(problems),
                        from_every_family=every_family,
                    )
                )
    return cases


def _refused_by_the_bridge(model: zoo.ModelSpec, layout: Layout) -> list[str]:
    """Parallel dimensions the family's bridge (or megatron-core for it) refuses by design
    (``families.yaml``); expert TP counts as TP where the layout leaves it unset."""
    def size(dim: str) -> int:
        value = getattr(layout, dim)
        return layout.tp if dim == "etp" and value is None else value

    return [f"{dim}{size(dim)}: {why}" for dim, why in model.family_def.unsupported_parallelism.items() if size(dim) > 1]


def _with_variants(models: list[zoo.ModelSpec], variants: Any, source: str, where: str) -> list[zoo.ModelSpec]:
    """family x named override sets -> ModelSpecs ``family@name``, each validated against the
    family's HF config class (an unknown field or a rejected value names file and field)."""
    if not isinstance(variants, dict) or not variants:
        raise _field_error(source, where, "expected a mapping of variant name -> {field: value}")
    out = []
    for model in models:
        if model.variant:
            raise _field_error(source, where, f"{model.id} already names a variant; list the plain family")
        for name, overrides in variants.items():
            if not isinstance(overrides, dict) or not _VARIANT_NAME.match(str(name)):
                raise _field_error(source, f"{where}.{name}", "expected a name [a-z0-9_-]+ mapping to {field: value}")
            if str(name) in zoo.get_family(model.family).variants:
                raise _field_error(source, f"{where}.{name}", f"clashes with the zoo variant {model.family}@{name}")
            spec = zoo.ModelSpec(family=model.family, variant=str(name), overrides=tuple(sorted(overrides.items())))
            try:
                zoo.validate_overrides(spec)
            except ValueError as err:
                raise _field_error(source, f"{where}.{name}", str(err)) from None
            out.append(spec)
    return out


def _with_sweep(models: list[zoo.ModelSpec], sweep: Any, source: str, where: str) -> list[zoo.ModelSpec]:
    """family x generated variants (``harness.matrix.coincidences``): ``family@<coincidence>``."""
    if sweep not in SWEEPS:
        raise _field_error(source, where, f"unknown sweep {sweep!r} (known: {', '.join(SWEEPS)})")
    out = []
    for model in models:
        if model.variant:
            raise _field_error(source, where, f"{model.id} already names a variant; list the plain family")
        for name, overrides in SWEEPS[sweep](model.hf_config).items():
            spec = zoo.ModelSpec(family=model.family, variant=name, overrides=tuple(sorted(overrides.items())))
            zoo.validate_overrides(spec)  # a generated variant that breaks the rules is a harness bug: raise
            out.append(spec)
    return out


def load_file(path: Path) -> list[Case]:
    source = str(path.relative_to(workspace.REPO_ROOT)) if path.is_relative_to(workspace.REPO_ROOT) else str(path)
    doc = load_yaml(path, source, CaseFileError)
    if not isinstance(doc, dict):
        raise CaseFileError(f"{source}: expected a mapping with a 'matrix' list at the top level")
    unknown = sorted(set(doc) - _FILE_FIELDS)
    if unknown:
        raise _field_error(source, unknown[0], f"unknown field (known: {', '.join(sorted(_FILE_FIELDS))})")
    matrix = doc.get("matrix")
    if not isinstance(matrix, list) or not matrix:
        raise _field_error(source, "matrix", "expected a non-empty list of entries")
    cases: list[Case] = []
    for i, entry in enumerate(matrix):
        cases.extend(expand_entry(entry, source, i))
    return cases


def load_cases(directory: Path | None = None) -> CaseSet:
    """All cases from ``cases/*.yaml``; duplicate IDs across entries or files are an error."""
    directory = directory or workspace.CASES_DIR
    merged: dict[str, Case] = {}
    for file in sorted(directory.glob("*.yaml")):
        for case in load_file(file):
            other = merged.get(case.id)
            if other is not None and not (case.from_every_family or other.from_every_family):
                raise CaseFileError(f"{case.source}: case {case.id} is also declared in {other.source}")
            if other is None or other.from_every_family:
                merged[case.id] = case
    return CaseSet(cases=list(merged.values()))
