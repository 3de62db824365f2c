"""Point the harness at a Megatron-LM or Megatron-Bridge *source checkout* instead of the wheels.

``--megatron-lm PATH`` / ``--megatron-bridge PATH`` (or ``HARNESS_MEGATRON_LM`` /
``HARNESS_MEGATRON_BRIDGE``) put the tree ahead of the installed packages on every rank's
``PYTHONPATH``; ``--bridge-checkout PATH`` is both, a Megatron-Bridge checkout and the
``3rdparty/Megatron-LM`` submodule it vendors. ``megatron`` is a namespace package (no ``megatron/__init__.py`` in the wheels),
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from harness.errors import InputError
from harness.run_spec import SourceTree

ENV = {"megatron-lm": "HARNESS_MEGATRON_LM", "megatron-bridge": "HARNESS_MEGATRON_BRIDGE"}
MODULE = {"megatron-lm": "megatron.core", "megatron-bridge": "megatron.bridge"}


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


SUBMODULE = Path("3rdparty") / "Megatron-LM"


def bridge_checkout(path: str | Path) -> tuple[str, str]:
    """(Megatron-LM, Megatron-Bridge) paths of a Bridge checkout whose ``3rdparty/Megatron-LM``
    submodule is the Megatron-LM under test (a bump of both at once); one-line errors otherwise."""
    bridge = validate("megatron-bridge", path)
    sub = Path(bridge.path) / SUBMODULE
    if not (sub / "megatron" / "core").is_dir():
        raise InputError(f"--bridge-checkout {path}: {SUBMODULE} is empty (run `git -C {bridge.path} submodule "
                         f"update --init {SUBMODULE}`), or give --megatron-bridge alone to test the installed megatron-core")
    return validate("megatron-lm", sub).path, bridge.path


def _with_pin(trees: list[SourceTree]) -> list[SourceTree]:
    """A Megatron-LM tree that is the ``3rdparty/Megatron-LM`` of the Bridge tree records the
    commit the Bridge pins there."""
    bridge = next((t for t in trees if t.kind == "megatron-bridge"), None)
    if bridge is None:
        return trees
    return [replace(t, pinned_by_bridge=gitlink(Path(bridge.path), "HEAD") or "")
            if t.kind == "megatron-lm" and Path(t.path) == Path(bridge.path) / SUBMODULE else t for t in trees]


def gitlink(bridge_repo: Path, ref: str) -> str | None:
    """The Megatron-LM commit ``ref`` of a Bridge repository pins in ``3rdparty/Megatron-LM``."""
    out = _git(bridge_repo, "ls-tree", ref, str(SUBMODULE))  # "160000 commit <sha>\t3rdparty/Megatron-LM"
    parts = out.split() if out else []
    return parts[2] if len(parts) >= 3 and parts[1] == "commit" else None


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
    return _with_pin(trees)


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


@dataclass(frozen=True)
class History:
    """The repository whose commits a gate's ``--baseline REF`` and its bisections walk.

    It is the Megatron-LM tree when one is given, else the Megatron-Bridge tree. For a Bridge
    checkout (``--bridge-checkout``), it is the Bridge, and each of its commits is tested with the
    Megatron-LM commit that commit pins in ``3rdparty/Megatron-LM``. Trees not walked stay fixed.
    """

    walked: SourceTree
    fixed: tuple[SourceTree, ...]
    follows_submodule: bool

    @property
    def repo(self) -> Path:
        return Path(self.walked.path)

    def commit(self, ref: str) -> str | None:
        """The full SHA of ``ref`` in the walked repository, or None if it names no commit."""
        return _git(self.repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")

    @contextlib.contextmanager
    def trees_at(self, ref: str) -> Iterator[list[SourceTree]]:
        """The trees under test with the walked repository at ``ref`` (throw-away worktrees)."""
        with worktree(self.repo, ref) as path, self.trees_in(path) as trees:
            yield trees

    @contextlib.contextmanager
    def trees_in(self, path: Path) -> Iterator[list[SourceTree]]:
        """The trees under test with the walked repository checked out at ``path`` (e.g. a
        bisection's worktree); a Bridge's submodule is checked out at the commit it pins there.
        Raises InputError when a tree there is not one (an old commit of another layout)."""
        walked = validate(self.walked.kind, path)
        if not self.follows_submodule:
            yield [walked, *self.fixed]
            return
        pin = _git(path, "rev-parse", f"HEAD:{SUBMODULE}")
        if not pin:
            raise InputError(f"{walked.sha[:12]} of {self.repo} pins no {SUBMODULE}")
        with worktree(self.repo / SUBMODULE, pin) as sub:
            yield [replace(validate("megatron-lm", sub), pinned_by_bridge=pin), walked]


def history(trees: list[SourceTree]) -> History | None:
    """The repository a gate walks for ``trees`` (see ``History``); None without a source tree."""
    by_kind = {t.kind: t for t in trees}
    bridge, mlm = by_kind.get("megatron-bridge"), by_kind.get("megatron-lm")
    if bridge and mlm and mlm.pinned_by_bridge:  # a Bridge checkout: walk the Bridge, the submodule follows
        return History(walked=bridge, fixed=(), follows_submodule=True)
    walked = mlm or bridge
    if walked is None:
        return None
    return History(walked=walked, fixed=tuple(t for t in trees if t is not walked), follows_submodule=False)
