"""Point the harness at a Megatron-LM or Megatron-Bridge *source checkout* instead of the wheels.

``--megatron-lm PATH`` / ``--megatron-bridge PATH`` (or ``HARNESS_MEGATRON_LM`` /
``HARNESS_MEGATRON_BRIDGE``) put the tree ahead of the installed packages on every rank's
``PYTHONPATH``. ``megatron`` is a namespace package (no ``megatron/__init__.py`` in the wheels),
so ``megatron.core`` comes from the first path entry that has ``megatron/core``. Each worker
checks at start-up that the modules really came from the tree (a typo must not silently test the
wheel), and every report records the tree's git SHA and whether it was dirty.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from harness.errors import InputError

ENV = {"megatron-lm": "HARNESS_MEGATRON_LM", "megatron-bridge": "HARNESS_MEGATRON_BRIDGE"}
MODULE = {"megatron-lm": "megatron.core", "megatron-bridge": "megatron.bridge"}


@dataclass(frozen=True)
class SourceTree:
    kind: str  # "megatron-lm" | "megatron-bridge"
    path: str
    import_root: str  # the entry to put on PYTHONPATH
    sha: str
    dirty: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _git(path: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(path: Path) -> tuple[str, bool]:
    sha = _git(path, "rev-parse", "HEAD") or "not-a-git-checkout"
    status = _git(path, "status", "--porcelain", "--untracked-files=no")
    return sha, bool(status)


def validate(kind: str, path: str | Path) -> SourceTree:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"--{kind} {path}: no such directory")
    if kind == "megatron-lm":
        import_root = root
        marker = root / "megatron" / "core" / "package_info.py"
        hint = "a Megatron-LM checkout has megatron/core/package_info.py at its top level"
    else:
        import_root = root / "src"
        marker = import_root / "megatron" / "bridge" / "__init__.py"
        hint = "a Megatron-Bridge checkout has src/megatron/bridge/__init__.py"
    if not marker.exists():
        raise InputError(f"--{kind} {path}: not a {kind} source tree ({hint})")
    sha, dirty = git_state(root)
    return SourceTree(kind=kind, path=str(root), import_root=str(import_root), sha=sha, dirty=dirty)


def select(megatron_lm: str | None = None, megatron_bridge: str | None = None) -> None:
    """Make the given trees the ones in use for this process and its children, as if set in the
    environment: case loading (the Bridge's registry, megatron-core feature checks) and every rank
    then read the same trees as the ranks import."""
    for kind, given in (("megatron-lm", megatron_lm), ("megatron-bridge", megatron_bridge)):
        if given:
            os.environ[ENV[kind]] = str(Path(given).resolve())


def resolve(megatron_lm: str | None = None, megatron_bridge: str | None = None) -> list[SourceTree]:
    """Trees from explicit arguments, falling back to the environment variables."""
    trees = []
    for kind, given in (("megatron-lm", megatron_lm), ("megatron-bridge", megatron_bridge)):
        path = given or os.environ.get(ENV[kind])
        if path:
            trees.append(validate(kind, path))
    return trees


def pythonpath(trees: list[SourceTree], existing: str = "") -> str:
    return os.pathsep.join([t.import_root for t in trees] + ([existing] if existing else []))


def verify_imports(trees: list[SourceTree]) -> dict[str, str]:
    """Import each tree's package and check it came from the tree; returns module -> file."""
    import importlib
    import pkgutil

    if trees:
        import megatron

        # A tree whose megatron/ has an __init__.py would hide the wheels' megatron.* portions
        # (megatron.bridge, megatron.energon); keep them reachable as a namespace would.
        megatron.__path__ = pkgutil.extend_path(list(megatron.__path__), "megatron")
    found = {}
    for tree in trees:
        module = importlib.import_module(MODULE[tree.kind])
        location = str(Path(module.__file__).resolve())
        found[MODULE[tree.kind]] = location
        if not location.startswith(tree.import_root + os.sep):
            raise RuntimeError(f"{MODULE[tree.kind]} was imported from {location}, not from --{tree.kind} {tree.path}")
    return found


@contextlib.contextmanager
def worktree(repo: Path, ref: str) -> Iterator[Path]:
    """A detached, throw-away worktree of ``repo`` at ``ref``; the user's checkout is untouched
    and the worktree is removed on exit (including Ctrl-C)."""
    tmp = Path(tempfile.mkdtemp(prefix="harness-worktree-"))
    path = tmp / "tree"
    try:
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "--quiet", str(path), ref],
                       check=True, capture_output=True, text=True)
        yield path
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(path)], capture_output=True)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
