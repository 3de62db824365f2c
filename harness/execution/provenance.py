"""What a run really tested: installed versions, where Megatron was imported from, and the
decisions a runtime took. Recorded per run (CLI side) and per rank group (worker side).

Versions come from package metadata, never from a package's own ``__version__`` logic:
megatron-core's ``package_info`` asks ``git`` in the *current directory* for a SHA, which names
whatever repository the harness runs in, not megatron-core. A source tree's SHA is read from
that tree (``harness.execution.source_trees``).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

STACK_PACKAGES = (
    "torch", "megatron-core", "megatron-bridge", "megatron-fsdp", "transformers",
    "transformer-engine", "transformer-engine-torch", "safetensors",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the stack under test, from package metadata (no imports)."""
    out = {}
    for name in STACK_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def rank_group(imported_from_trees: dict[str, str], runtime: Any) -> dict[str, Any]:
    """Provenance of one rank group, after Megatron was imported (in a worker)."""
    import megatron.core

    return {
        "megatron.core": str(Path(megatron.core.__file__).parent),
        "imported_from_trees": imported_from_trees,
        "installed": package_versions(),
        "runtime": runtime.provenance(),
    }
