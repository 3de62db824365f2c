"""Where the harness reads and writes on disk.

Everything the harness generates lives under two roots so that a user can see (and delete) it at a
glance: ``reports/`` for run results and ``.cache/`` for rebuildable artefacts (tiny models,
scratch checkpoints). Both can be redirected with environment variables, e.g. to a fast local disk
on a GPU node.
"""

from __future__ import annotations

import os
from pathlib import Path

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
