"""Cases are data: ``cases/*.yaml`` declare families x layouts x paths; this module expands them.

A case ID is ``<model>/<layout>/<format>/<kind>``, e.g. ``qwen3-moe/tp2-ep2/torch_dist/roundtrip``
or ``llama/tp2-to-tp1/torch_dist/reshard``. Every part comes from the YAML and canonical
formatting (``Layout.id``), never from list positions, so IDs are stable when files are edited.

Schema of one file (``CaseFile``, ``CaseEntry``; unknown keys are errors that name the file and the field)::

    description: free text
    matrix:
      - families: [llama, qwen2]          # zoo family names, or family@variant (zoo variants);
                                          #   ['*'] = every family (a case named elsewhere wins),
                                          #   ['*@bf16'] = every family at a variant all have
        where: moe                        # optional, with ['*'] only: moe | dense
        variants:                         # optional: named per-case overrides of the tiny config;
          mqa: {num_key_value_heads: 1}   #   each becomes model ID family@name (stable, readable)
        sweep: square                     # optional: generated variants (harness.matrix.case_classes.SWEEPS:
                                          #   square, switches, window, rope, hybrid)
        layouts: [tp1, tp2, tp2-to-tp1]   # "A-to-B" only for reshard paths
        paths: [memory/roundtrip, torch_dist/roundtrip]
        sets: [default]                   # default (CI; implies full) or full (nightly only)
        expect: invalid                   # optional: the layouts must be refused (shown, not run)
        timeout_s: 300                    # optional, per case
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, ValidationInfo, field_validator

from harness import workspace
from harness.errors import InputError, load_yaml
from harness.matrix import bridge_registry, family_registry
from harness.matrix.case_classes import SWEEPS, FamilyFacts
from harness.matrix.family_registry import Family, get_family
from harness.matrix.model_spec import ModelSpec, validate_overrides
from harness.matrix.layouts import Layout
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
    "hf/config-export": "HF config -> Megatron provider -> HF config written from the provider alone "
                        "(megatron_to_hf_config, no source config.json), every source field compared",
}
SETS = ("default", "full")
LANES = lane_rules.LANES
DEFAULT_TIMEOUT_S = 300.0

_VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_VARIANT_SHAPE = "expected a name [a-z0-9_-]+ mapping to {field: value}"
# `families: ['*']`: every family of the zoo, i.e. every text LM the Bridge in use registers
# (harness.matrix.bridge_registry), so a new upstream bridge brings its cases with it. `where`
# narrows it; layouts an architecture does not allow (EP without experts) are left out.
ALL_FAMILIES = "*"
FAMILY_FILTERS = {
    "moe": lambda m: m.is_moe,
    "dense": lambda m: not m.is_moe,
}


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

    model: ModelSpec
    layout: Layout
    path: str  # key of PATHS
    sets: frozenset[str]
    timeout_s: float = DEFAULT_TIMEOUT_S
    source: str = ""  # file the case came from, for error messages
    load_layout: Layout | None = None  # reshard target
    tag: str = ""  # "+<tag>" suffix: a variant of the case, e.g. with a seeded fault (selftest)
    invalid_reason: str = ""  # declared `expect: invalid`: the rule the layout breaks; never run
    from_every_family: bool = False  # from a `families: ['*']` entry: a case declared by name wins over it
    sweep: str = ""  # the generated-variant sweep the model came from (harness.matrix.case_classes)

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

    def to_dict(self) -> dict[str, Any]:
        """The whole case as JSON data: it crosses the process boundary in the run plan, so a rank
        never expands ``cases/`` again (``from_dict`` is its inverse)."""
        return {"model": self.model.to_dict(), "layout": self.layout.to_dict(), "path": self.path,
                "sets": sorted(self.sets), "timeout_s": self.timeout_s, "source": self.source,
                "load_layout": self.load_layout.to_dict() if self.load_layout is not None else None,
                "tag": self.tag, "invalid_reason": self.invalid_reason, "from_every_family": self.from_every_family,
                "sweep": self.sweep}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Case":
        load = data.get("load_layout")
        return cls(model=ModelSpec.from_dict(data["model"]), layout=Layout.from_dict(data["layout"]),
                   path=data["path"], sets=frozenset(data["sets"]), timeout_s=float(data["timeout_s"]),
                   source=data.get("source", ""), load_layout=Layout.from_dict(load) if load is not None else None,
                   tag=data.get("tag", ""), invalid_reason=data.get("invalid_reason", ""),
                   from_every_family=data.get("from_every_family", False), sweep=data.get("sweep", ""))

    @property
    def builds_model(self) -> bool:
        """A config-export case builds no model: it says nothing of whether a lane can convert one."""
        return self.kind != "config-export"

    @property
    def exports_weights(self) -> bool:
        """The route exports HF weights (and so checks a repeated export)."""
        return self.builds_model and self.kind != "key-contract"

    @property
    def world_size(self) -> int:
        sizes = [self.layout.world_size]
        if self.load_layout is not None:
            sizes.append(self.load_layout.world_size)
        return max(sizes)

    @property
    def family(self) -> Family:
        return get_family(self.model.family)

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


# ------------------------------------------------------------------------ the case-file schema
# Shape and vocabulary are declared here (pydantic) and checked before anything is expanded; what
# needs the zoo (family names, a variant's overrides, whether a model can be split as a layout) is
# checked while expanding. Either way the error is one line that names the file and the field.


def _listed(value: Any) -> list[Any]:
    """One value stands for a list of it; otherwise a non-empty list."""
    if isinstance(value, (str, int)):
        return [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list, got {value!r}")
    return value


def _texts(value: Any) -> list[str]:
    return [str(item) for item in _listed(value)]


def _known(names: Iterable[str], noun: str, value: Any) -> Any:
    names = list(names)
    if value not in names:
        raise ValueError(f"unknown {noun} {value!r} (known: {', '.join(names)})")
    return value


def _one_of(names: Iterable[str], noun: str) -> BeforeValidator:
    return BeforeValidator(lambda value: _known(names, noun, value))


def _list_of(names: Iterable[str], noun: str) -> BeforeValidator:
    return BeforeValidator(lambda value: [_known(names, noun, item) for item in _listed(value)])


def _must(ok: Callable[[Any], Any], message: str | Callable[[Any], str]) -> BeforeValidator:
    """A value ``ok`` accepts, else ``message`` (or ``message(value)``) as the field's error."""
    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(message(value) if callable(message) else message)
        return value
    return BeforeValidator(check)


def _variant_name(name: Any) -> str:
    if not _VARIANT_NAME.match(str(name)):
        raise ValueError(_VARIANT_SHAPE)
    return str(name)


def _split_layout(text: str) -> tuple[Layout, Layout | None]:
    """``A`` -> (A, None); ``A-to-B`` (reshard: save at A, load at B) -> (A, B). LayoutError if malformed."""
    if "-to-" in text:
        save, load = text.split("-to-", 1)
        return Layout.parse(save), Layout.parse(load)
    return Layout.parse(text), None


class CaseEntry(BaseModel):
    """One entry of ``matrix`` (the module docstring shows each field)."""

    model_config = ConfigDict(extra="forbid")

    families: Annotated[list[str], BeforeValidator(_texts)]
    where: str | None = None
    variants: Annotated[dict[Annotated[str, BeforeValidator(_variant_name)],
                             Annotated[dict[Any, Any], _must(lambda o: isinstance(o, dict), _VARIANT_SHAPE)]] | None,
                        _must(lambda v: isinstance(v, dict) and v,
                              "expected a mapping of variant name -> {field: value}")] = None
    sweep: Annotated[str | None, _one_of(SWEEPS, "sweep")] = None
    paths: Annotated[list[str], _list_of(PATHS, "path")]
    layouts: list[str]
    sets: Annotated[list[str], _list_of(SETS, "set")] = ["default"]
    expect: Annotated[str | None, _must(lambda e: e in (None, "invalid"),
                                        lambda e: f"unknown value {e!r} (the only one is 'invalid')")] = None
    timeout_s: Annotated[float, _must(lambda t: isinstance(t, (int, float)) and t > 0,
                                      lambda t: f"expected a positive number, got {t!r}")] = DEFAULT_TIMEOUT_S

    @property
    def every_family(self) -> bool:
        return _every_family(self.families)

    @field_validator("where", mode="before")
    @classmethod
    def _where(cls, value: Any, info: ValidationInfo) -> Any:
        if "families" in info.data and not _every_family(info.data["families"]):
            raise ValueError(f"only for families: ['{ALL_FAMILIES}']")
        return _known(FAMILY_FILTERS, "value", value)

    @field_validator("layouts", mode="before")
    @classmethod
    def _layouts(cls, value: Any, info: ValidationInfo) -> list[str]:
        """Each parses; "A-to-B" goes with */reshard paths only, and they need it."""
        texts = _texts(value)
        for text in texts:
            for path in info.data.get("paths", ()):
                if "-to-" in text and not path.endswith("/reshard"):
                    raise ValueError(f"{text!r}: 'A-to-B' layouts are only for */reshard paths")
                if "-to-" not in text and path.endswith("/reshard"):
                    raise ValueError(f"{text!r}: reshard paths need an 'A-to-B' layout")
            _split_layout(text)  # a LayoutError is a ValueError: reported as this field's error
        return texts


class CaseFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: Any = None
    matrix: Annotated[list[CaseEntry],
                      _must(lambda m: isinstance(m, list) and m, "expected a non-empty list of entries")]


def _every_family(families: list[str]) -> bool:
    return len(families) == 1 and families[0].partition("@")[0] == ALL_FAMILIES


def _schema_error(source: str, err: ValidationError) -> CaseFileError:
    """The first problem, as one line (in an entry, unknown and missing fields come first)."""
    def rank(e: Any) -> tuple[int, int]:
        entry = e["loc"][1] if len(e["loc"]) > 1 and e["loc"][0] == "matrix" else -1
        return entry, {"extra_forbidden": 0, "missing": 1}.get(e["type"], 2)

    first = min(err.errors(), key=rank)
    loc = [part for part in first["loc"] if part != "[key]"]  # a variant name's own error
    if first["type"] == "invalid_key":  # a key that is not text: an unknown field all the same
        loc[-1], first["type"] = str(loc[-1]), "extra_forbidden"
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if first["type"] == "value_error":
        message = str(first["ctx"]["error"])
    elif first["type"] == "missing":
        message = "required field is missing"
    elif first["type"] == "extra_forbidden":
        known = CaseFile.model_fields if len(loc) == 1 else CaseEntry.model_fields
        message = f"unknown field (known: {', '.join(sorted(known))})"
    elif first["type"] == "model_type":
        message = (f"expected a mapping, got {type(first['input']).__name__}" if loc
                   else "expected a mapping with a 'matrix' list at the top level")
    else:
        message = first["msg"]
    line = f"{source}: {where}: {message}" if where else f"{source}: {message}"
    return CaseFileError(" ".join(line.splitlines()))


def _field_error(source: str, where: str, message: str) -> CaseFileError:
    return CaseFileError(f"{source}: {where}: {message}")


def expand_entry(entry: CaseEntry, source: str, index: int) -> list[Case]:
    """A validated entry -> its cases; a family, variant or layout the zoo refuses names its field."""
    where = f"matrix[{index}]"
    families = entry.families
    every_family = entry.every_family
    if every_family:
        variant = families[0].partition("@")[2]  # '*@bf16': every family at its bf16 variant
        families = [f"{name}@{variant}" if variant else name for name in family_registry.families()]
    models = []
    for name in families:
        try:
            models.append(ModelSpec.parse(name))
        except KeyError as err:
            raise _field_error(source, f"{where}.families", str(err).strip('"')) from None
    if entry.where is not None:
        models = [m for m in models if FAMILY_FILTERS[entry.where](m)]
    if entry.variants is not None:
        models = _with_variants(models, entry.variants, source, f"{where}.variants")
    if entry.sweep is not None:
        models = _with_sweep(models, entry.sweep, source, f"{where}.sweep")
    expect = entry.expect
    set_names = frozenset(entry.sets) | {"full"}  # the full (nightly) set contains the default set

    cases = []
    for model in models:
        for layout_text in entry.layouts:
            for path in entry.paths:
                layout, load_layout = _split_layout(layout_text)
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
                        timeout_s=float(entry.timeout_s),
                        source=source,
                        invalid_reason="; ".join(problems),
                        from_every_family=every_family,
                        sweep=entry.sweep or "",
                    )
                )
    return cases


def _refused_by_the_bridge(model: ModelSpec, layout: Layout) -> list[str]:
    """Parallel dimensions the family's bridge (or megatron-core for it) refuses by design
    (``families.yaml``); expert TP counts as TP where the layout leaves it unset."""
    def size(dim: str) -> int:
        value = getattr(layout, dim)
        return layout.tp if dim == "etp" and value is None else value

    return [f"{dim}{size(dim)}: {why}" for dim, why in model.family_def.unsupported_parallelism.items() if size(dim) > 1]


def _with_variants(models: list[ModelSpec], variants: dict[str, dict[Any, Any]], source: str,
                   where: str) -> list[ModelSpec]:
    """family x named override sets -> ModelSpecs ``family@name``, each validated against the
    family's HF config class (an unknown field or a rejected value names file and field)."""
    return _expand(models, lambda model: variants, source, where, declared=True)


def _with_sweep(models: list[ModelSpec], sweep: str, source: str, where: str) -> list[ModelSpec]:
    """family x generated variants (``harness.matrix.case_classes.SWEEPS``): ``family@<variant>``."""
    def generated(model: ModelSpec) -> dict[str, dict[str, Any]]:
        family = model.family_def
        return SWEEPS[sweep][1](FamilyFacts(model.hf_config, family.hf_config_class, family.architecture.module))

    return _expand(models, generated, source, where, declared=False)


def _expand(models: list[ModelSpec], variants_of: Callable[[ModelSpec], dict[str, dict[Any, Any]]], source: str,
            where: str, *, declared: bool) -> list[ModelSpec]:
    out = []
    for model in models:
        if model.variant:
            raise _field_error(source, where, f"{model.id} already names a variant; list the plain family")
        for name, overrides in variants_of(model).items():
            if declared and name in get_family(model.family).variants:
                raise _field_error(source, f"{where}.{name}", f"clashes with the zoo variant {model.family}@{name}")
            spec = ModelSpec(family=model.family, variant=name, overrides=tuple(sorted(overrides.items())))
            try:
                validate_overrides(spec)
            except ValueError as err:
                if not declared:
                    raise  # a generated variant that breaks the rules is a harness bug
                raise _field_error(source, f"{where}.{name}", str(err)) from None
            out.append(spec)
    return out


def load_file(path: Path) -> list[Case]:
    source = str(path.relative_to(workspace.REPO_ROOT)) if path.is_relative_to(workspace.REPO_ROOT) else str(path)
    try:
        doc = CaseFile.model_validate(load_yaml(path, source, CaseFileError))
    except ValidationError as err:
        raise _schema_error(source, err) from None
    cases: list[Case] = []
    for i, entry in enumerate(doc.matrix):
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


# (folder, its case files' contents, the Bridge in use) -> the cases: one expansion per process.
_EXPANDED: dict[tuple[str, tuple[tuple[str, str], ...], str], list[Case]] = {}


def load_cases_once(directory: Path | None = None) -> CaseSet:
    """``load_cases``, expanded once per process: the CLI's selection and its run's summary
    (the coverage section), the pytest plugin and every gate report share one expansion. Keyed on
    the folder, the text of its files and the Bridge in use (``family_registry.families``), so an edited file
    or another Bridge expands again; an error is never kept. Each call gets its own ``CaseSet``
    (the ``Case`` objects, frozen, are shared)."""
    directory = directory or workspace.CASES_DIR
    files = tuple((f.name, hashlib.sha256(f.read_bytes()).hexdigest()) for f in sorted(directory.glob("*.yaml")))
    try:
        bridge = str(bridge_registry.bridge_models_root())
    except (ImportError, FileNotFoundError):  # no Bridge: load_cases says so, if it needs one
        bridge = ""
    key = (str(directory.resolve()), files, bridge)
    if key not in _EXPANDED:
        _EXPANDED[key] = load_cases(directory).cases
    return CaseSet(cases=list(_EXPANDED[key]))
