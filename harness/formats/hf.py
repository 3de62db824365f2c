"""Hugging Face safetensors checkpoints (single file or sharded with an index), streamed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def shard_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in a stable order."""
    index = hf_dir / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    single = hf_dir / SINGLE_NAME
    if single.exists():
        return [single]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors files")
    return files


def iter_tensors(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, sorted by key within each shard, one at a time."""
    from safetensors import safe_open

    for file in shard_files(hf_dir):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in sorted(handle.keys()):
                yield key, handle.get_tensor(key)


def keys(hf_dir: Path) -> list[str]:
    from safetensors import safe_open

    out: list[str] = []
    for file in shard_files(hf_dir):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            out.extend(handle.keys())
    return sorted(out)
