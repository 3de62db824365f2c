"""Recognise a checkpoint on disk and open the right reader, or say exactly what is wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness.formats import dcp
from harness.errors import InputError
from harness.formats.base import Checkpoint, quote, read_regular_file, why_unreadable
from harness.formats.hf import HfCheckpoint
from harness.formats.megatron import FsdpDtensorCheckpoint, TorchDistCheckpoint

MAX_MCORE_METADATA = 1024 * 1024


def detect(path: Path) -> str:
    """The format name of ``path``; raises InputError (one actionable line) otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(why_unreadable(path))
    if path.is_file():
        if path.suffix == ".safetensors":
            return "hf"
        raise InputError(f"{path}: not a checkpoint folder; pass the folder that holds it")
    if os.path.lexists(path / dcp.METADATA):  # a broken link too: read_metadata names it
        meta = path / "metadata.json"
        if os.path.lexists(meta):
            backend = mcore_metadata(meta).get("sharded_backend")
            if backend != "torch_dist":
                raise InputError(f"{path}: sharded_backend {quote(backend)} is not supported (only torch_dist)")
            return "torch_dist"
        return "fsdp_dtensor"
    if any(path.glob("*.distcp")):
        dcp.read_metadata(path)  # raises the "async save probably incomplete" message
    iters = [p for p in path.glob("iter_*") if p.is_dir()]
    if iters:
        newest = dcp.newest_complete_iter(path)
        if newest is None:
            raise InputError(f"{path}: a run folder with {len(iters)} iter_* folders, none complete (no .metadata)")
        raise InputError(f"{path}: a run folder, not a checkpoint; pass an iter_* folder, e.g. {newest} (newest complete)")
    if (path / "model.safetensors.index.json").exists() or any(path.glob("*.safetensors")):
        return "hf"
    raise InputError(
        f"{path}: not a known checkpoint format (expected HF safetensors, or a torch_dist / fsdp_dtensor "
        "folder with .metadata)"
    )


def mcore_metadata(meta: Path) -> dict:
    """Megatron-Core's ``metadata.json`` (a few dozen bytes: the backend names and versions)."""
    try:
        doc = json.loads(read_regular_file(meta, MAX_MCORE_METADATA, "metadata.json"))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
        raise InputError(f"{meta}: not valid JSON; the checkpoint is damaged") from None
    if not isinstance(doc, dict):
        raise InputError(f"{meta}: a JSON {type(doc).__name__}, not an object; the checkpoint is damaged")
    return doc


def open_checkpoint(path: Path) -> Checkpoint:
    kind = detect(path)
    if kind == "hf":
        return HfCheckpoint(path)
    if kind == "torch_dist":
        return TorchDistCheckpoint(path)
    return FsdpDtensorCheckpoint(path)
