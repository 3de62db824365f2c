"""What of the Bridge each case ran, recorded in the ranks when a run asks for it
(``RunSpec.line_coverage``): the source lines of the traced folders, and the names the Bridge's
mapping registry resolved. ``harness mutants`` reads it to run a mutant only on the cases that
execute the mutated line, and to set apart mutants no case can reach (code the matrix never
runs, which no case can kill and no reason makes equivalent).

Lines come from coverage.py with one dynamic context per case (``switch_context``). Its ``sysmon``
core is not used: it records a line once per process, so a line shared by two cases would be
credited to the first only (coverage's ``no-sysmon-context`` warning); the C tracer is.

Line coverage cannot tell the rows of a mapping list apart: ``mapping_registry()`` builds every
row on every call. A deleted row is reachable only if some parameter resolves through it, so the
registry's two lookups are observed as well (``_observed_lookups``): the call goes through
unchanged and the resolved Megatron name is noted. Only runs that ask for coverage (the mutants'
baseline) install either; nothing converted, saved or loaded changes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator
from unittest import mock

from harness.execution.run_dir import CaseCoverage

# coverage.py's context for lines run outside any case (imports, the first build of a class body).
_NO_CASE = ""


class CoverageRecorder:
    """One rank's recorder: ``start`` before the stack's imports, ``case(id)`` around each case,
    ``finish`` for the records (import-time lines are credited to every case of the launch)."""

    def __init__(self, roots: list[str]):
        import coverage

        self.roots = [Path(r).resolve() for r in roots]
        self._cov = coverage.Coverage(data_file=None, config_file=False, include=[f"{r}/*" for r in self.roots])
        self._resolved: dict[str, set[str]] = {}

    def start(self) -> None:
        self._cov.start()

    @contextlib.contextmanager
    def case(self, case_id: str) -> Iterator[None]:
        names = self._resolved.setdefault(case_id, set())
        self._cov.switch_context(case_id)
        try:
            with _observed_lookups(names):
                yield
        finally:
            self._cov.switch_context(_NO_CASE)

    def finish(self) -> list[CaseCoverage]:
        self._cov.stop()
        data = self._cov.get_data()
        lines: dict[str, dict[str, set[int]]] = {case_id: {} for case_id in self._resolved}
        for measured in data.measured_files():
            rel = self._relative(Path(measured))
            if rel is None:
                continue
            for line, contexts in data.contexts_by_lineno(measured).items():
                for case_id in (self._resolved if _NO_CASE in contexts else contexts):
                    if case_id in lines:
                        lines[case_id].setdefault(rel, set()).add(line)
        return [CaseCoverage(case_id, {f: sorted(ls) for f, ls in sorted(lines[case_id].items())},
                             sorted(self._resolved[case_id])) for case_id in sorted(lines)]

    def _relative(self, file: Path) -> str | None:
        file = file.resolve()
        return next((file.relative_to(root).as_posix() for root in self.roots if file.is_relative_to(root)), None)


@contextlib.contextmanager
def _observed_lookups(names: set[str]) -> Iterator[None]:
    """Note the Megatron name of every mapping the registry resolves, then return it unchanged.
    Upstream: ``MegatronMappingRegistry.megatron_to_hf_lookup`` / ``hf_to_megatron_lookup``
    (megatron/bridge/models/conversion/mapping_registry.py), through which every conversion task
    finds its mapping row."""
    from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry

    def observing(lookup):
        def observed(self, name):
            mapping = lookup(self, name)
            if mapping is not None:
                names.add(str(mapping.megatron_param))
            return mapping
        return observed

    with contextlib.ExitStack() as stack:
        for method in ("megatron_to_hf_lookup", "hf_to_megatron_lookup"):
            stack.enter_context(mock.patch.object(MegatronMappingRegistry, method,
                                                  observing(getattr(MegatronMappingRegistry, method))))
        yield
