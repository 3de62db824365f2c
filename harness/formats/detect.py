"""Recognise a checkpoint on disk and open the right reader, or say exactly what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

from harness.formats import dcp
from harness.errors import InputError
from harness.formats.base import Checkpoint, why_unreadable
from harness.formats.hf import HfCheckpoint
from harness.formats.megatron import FsdpDtensorCheckpoint, TorchDistCheckpoint

FORMATS = ("hf", "torch_dist", "fsdp_dtensor")


def detect(path: Path) -> str:
    """The format name of ``path``; raises InputError (one actionable line) otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(why_unreadable(path))
    if path.is_file():
        if path.suffix == ".safetensors":
            return "hf"
        raise InputError(f"{path}: not a checkpoint folder; pass the folder that holds it")
    if (path / dcp.METADATA).exists():
        meta = path / "metadata.json"
        if meta.exists():
            try:
                backend = json.loads(meta.read_text()).get("sharded_backend")
            except json.JSONDecodeError:
                raise InputError(f"{meta}: not valid JSON; the checkpoint is damaged") from None
            if backend != "torch_dist":
                raise InputError(f"{path}: sharded_backend {backend!r} is not supported (only torch_dist)")
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


def open_checkpoint(path: Path) -> Checkpoint:
    kind = detect(path)
    if kind == "hf":
        return HfCheckpoint(path)
    if kind == "torch_dist":
        return TorchDistCheckpoint(path)
    return FsdpDtensorCheckpoint(path)
