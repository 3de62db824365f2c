"""What every checkpoint reader offers.

A reader exposes *canonical* keys (HF keys as saved; for torch_dist and fsdp_dtensor the grammar
of ``harness.formats.megatron_keys``) so that two checkpoints of different formats line up tensor
by tensor, and yields tensors one at a time so that comparing two checkpoints never holds two
whole models in memory. Readers never write to their input.
"""

from __future__ import annotations

import contextlib
import errno
import os
import reprlib
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Protocol

import numpy as np

from harness.errors import InputError


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


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading, if it is a regular file (a symlink to one is fine); otherwise
    ``InputError``. A FIFO or a device (a link to /dev/zero, say) would block or never end: it is
    opened non-blocking and refused by what the open file is, so swapping it in after a check is
    refused too."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(why_unreadable(path)) from None
    except OSError as err:
        reason = why_unreadable(path) if err.errno == errno.ELOOP else f"{path}: cannot be read ({err.strerror})"
        raise InputError(reason) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise InputError(f"{path}: {kind}, not a regular file; point it at the checkpoint's file")
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def read_regular_file(path: Path, limit: int, what: str) -> bytes:
    """The whole of ``path`` (a regular file, see ``open_regular``) if it holds at most ``limit``
    bytes: a file from outside is read into memory only up to a size its kind can really have."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise InputError(f"{path}: {max(size, len(data))} bytes, more than a {what} can be ({limit}); "
                         "the file is damaged or not what it is named")
    return data


_REPR = reprlib.Repr(maxlevel=3, maxlist=4, maxtuple=4, maxdict=4, maxset=4, maxstring=100, maxother=100)


def quote(value, limit: int = 120) -> str:
    """A value taken from a file, fit for a one-line error: a bounded repr (line breaks escaped,
    nesting and length cut; a file can hold a list nested too deep for ``repr``)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def plain_file_name(name) -> bool:
    """A name of a file directly in the folder: not a path that leads elsewhere (``../x``, ``/etc/x``)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)
