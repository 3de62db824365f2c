"""What both pages share to render: their file names and the case anchors that link them, how a
value is written, and the Jinja2 environment over ``harness/reporting/templates``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jinja2

from harness import workspace

INDEX_NAME = "index.html"
HISTORY_NAME = "history.html"
TEMPLATES_DIR = Path(__file__).parent.parent / "templates"


def case_anchor(case_id: str) -> str:
    """The ``id`` of a case's drill-down in ``index.html`` (also linked from history.html)."""
    return f"case-{workspace.slug(case_id)}"


def format_value(value: Any) -> str:
    """A metric as text, whole: floats as their shortest exact ``repr``, never rounded to fit."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        if not value:
            return "none"
        return ", ".join(f"[{format_value(v)}]" if isinstance(v, (list, tuple)) else format_value(v) for v in value)
    return str(value)


@functools.cache
def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["case_anchor"] = case_anchor
    return env
