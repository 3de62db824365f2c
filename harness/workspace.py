"""Where the harness reads and writes on disk, and how it writes (atomically).

Everything the harness generates lives under two roots so that a user can see (and delete) it at a
glance: ``reports/`` for run results and ``.cache/`` for rebuildable artefacts (tiny models,
scratch checkpoints). Both can be redirected with environment variables, e.g. to a fast local disk
on a GPU node.

Every file the harness writes goes to a temp file in the same folder followed by ``os.replace``,
so a run interrupted at any point leaves either the old file or the new one, never half a JSON
document.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CASES_DIR = REPO_ROOT / "cases"


def reports_root() -> Path:
    return Path(os.environ.get("HARNESS_REPORTS", REPO_ROOT / "reports"))


def cache_root() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", REPO_ROOT / ".cache"))


def zoo_root() -> Path:
    """Tiny seeded HF checkpoints, keyed by a hash of their full spec (safe to share across runs)."""
    return cache_root() / "zoo"


def golden_root() -> Path:
    """Golden expectations; ``HARNESS_GOLDEN`` points elsewhere (tests, or a team's own set)."""
    return Path(os.environ.get("HARNESS_GOLDEN", REPO_ROOT / "golden"))


def slug(case_id: str) -> str:
    """A case ID as a file name (the one spelling used by run folders and golden/)."""
    return case_id.replace("/", "__")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
