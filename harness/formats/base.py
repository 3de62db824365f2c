"""What every checkpoint reader offers.

A reader exposes *canonical* keys (see ``harness.formats.canonical``) so that two checkpoints of
different formats line up tensor by tensor, and yields tensors one at a time so that comparing
two checkpoints never holds two whole models in memory. Readers never write to their input.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32", "bfloat16"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPE_SIZES[self.dtype]


DTYPE_SIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
    "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}


class Checkpoint(Protocol):
    format: str
    path: Path

    def specs(self) -> dict[str, TensorSpec]:
        """Canonical key -> shape and dtype, from metadata only (no tensor data read)."""

    def tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, "object"]]:
        """Yield ``(canonical key, torch.Tensor)`` for ``keys``, in that order, one at a time."""


def why_unreadable(path: Path) -> str:
    """Why ``path`` cannot be opened, in words: a missing path, a symlink loop or a dangling
    symlink (``Path.exists`` says False for all three)."""
    if not os.path.islink(path):
        return f"{path}: no such file or directory"
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{path}: a symlink loop ({path} -> {os.readlink(path)} -> ...); point it at a real file"
        return f"{path}: a dangling symlink to {os.readlink(path)} (which does not exist)"
    return f"{path}: cannot be opened"
