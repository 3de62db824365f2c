"""Hugging Face safetensors checkpoints (one file, or shards with an index), streamed.

The safetensors header is parsed here (8-byte length + JSON) rather than through ``safe_open``
so that (a) a truncated file or corrupt header is reported as such before any data is read, and
(b) tensor bytes can be visited in bounded windows: ``windows()`` maps one window of the file at
a time (zero-copy from the page cache) and unmaps it before the next, so comparing two multi-GB
checkpoints holds two windows, not two models (a whole-file mmap would count every touched page
towards the process RSS).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from harness.errors import InputError
from harness.formats.base import TensorSpec, why_unreadable

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class Entry:
    spec: TensorSpec
    file: Path
    start: int  # absolute byte offset in the file
    end: int


def read_index(hf_dir: Path) -> dict[str, str] | None:
    """The index's tensor -> shard file map, or None for a checkpoint without an index."""
    index = hf_dir / INDEX_NAME
    if not index.exists():
        return None
    try:
        return json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{index}: not a valid safetensors index ({err}); re-export the checkpoint") from None


def shard_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in a stable order; each must be a readable file."""
    if hf_dir.is_file():
        return [hf_dir]
    weight_map = read_index(hf_dir)
    if weight_map is not None:
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists() and not os.path.islink(f)]
        if missing:
            raise InputError(f"{hf_dir}: the index names shards that are missing: {', '.join(missing[:3])}")
    elif (hf_dir / SINGLE_NAME).exists():
        files = [hf_dir / SINGLE_NAME]
    else:
        files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"{hf_dir}: no *.safetensors files")
    for file in files:
        if not file.is_file():
            raise InputError(why_unreadable(file) if not file.exists() else f"{file}: not a file")
    return files


def read_header(file: Path) -> dict[str, Entry]:
    size = file.stat().st_size
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise InputError(f"{file}: truncated safetensors file ({size} bytes, no header); re-copy or re-export it")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER or 8 + length > size:
            raise InputError(f"{file}: corrupt safetensors header (claims {length} bytes, file has {size}); re-copy or re-export it")
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{file}: corrupt safetensors header (not JSON); re-copy or re-export it") from None
    base = 8 + length
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            spec = TensorSpec(tuple(int(d) for d in info["shape"]), dtype)
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{file}: corrupt safetensors header entry {key!r}; re-copy or re-export it") from None
        if base + end > size:
            raise InputError(
                f"{file}: truncated safetensors file: {key!r} ends at byte {base + end}, file has {size}; "
                "re-copy or re-export it"
            )
        if end - begin != spec.nbytes:
            raise InputError(f"{file}: corrupt safetensors header: {key!r} has {end - begin} bytes for {spec}")
        entries[key] = Entry(spec=spec, file=file, start=base + begin, end=base + end)
    return entries


class HfCheckpoint:
    format = "hf"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[str, Entry] = {}
        for file in shard_files(self.path):
            for key, entry in read_header(file).items():
                if key in self._entries:
                    raise InputError(f"{self.path}: tensor {key!r} appears in two shards")
                self._entries[key] = entry
        weight_map = read_index(self.path) if self.path.is_dir() else None
        if weight_map is not None:
            self._check_index(weight_map)

    def _check_index(self, weight_map: dict[str, str]) -> None:
        """The index and the shards must name the same tensors, each in the shard the index says:
        a loader trusts the index, so a tensor it names that no shard holds is a broken checkpoint."""
        unheld = sorted(set(weight_map) - set(self._entries))
        if unheld:
            raise InputError(f"{self.path / INDEX_NAME}: names {len(unheld)} tensor(s) that no shard holds "
                             f"(first: {unheld[0]!r} in {weight_map[unheld[0]]}); re-export the checkpoint")
        unnamed = sorted(set(self._entries) - set(weight_map))
        if unnamed:
            raise InputError(f"{self.path / INDEX_NAME}: does not name {len(unnamed)} tensor(s) the shards hold "
                             f"(first: {unnamed[0]!r} in {self._entries[unnamed[0]].file.name}); re-export the checkpoint")
        moved = sorted(k for k, shard in weight_map.items() if self._entries[k].file.name != shard)
        if moved:
            raise InputError(f"{self.path / INDEX_NAME}: places {moved[0]!r} in {weight_map[moved[0]]}, but it is in "
                             f"{self._entries[moved[0]].file.name}; re-export the checkpoint")

    def specs(self) -> dict[str, TensorSpec]:
        return {k: e.spec for k, e in sorted(self._entries.items())}

    def entry(self, key: str) -> Entry:
        return self._entries[key]

    def windows(self, key: str, window_bytes: int) -> Iterator[memoryview]:
        """The tensor's raw bytes as consecutive read-only views of at most ``window_bytes``.

        Each view is a fresh mapping that is released and unmapped when the caller asks for the
        next one: callers must not keep references (e.g. numpy arrays) across iterations.
        """
        entry = self._entries[key]
        gran = mmap.ALLOCATIONGRANULARITY
        populate = getattr(mmap, "MAP_POPULATE", 0)
        with open(entry.file, "rb") as fh:
            pos = entry.start
            while pos < entry.end:
                n = min(window_bytes, entry.end - pos)
                base = pos - pos % gran
                mapped = mmap.mmap(fh.fileno(), pos - base + n, offset=base, flags=mmap.MAP_SHARED | populate,
                                   prot=mmap.PROT_READ)
                view = memoryview(mapped)[pos - base: pos - base + n]
                try:
                    yield view
                finally:
                    view.release()
                    with contextlib.suppress(BufferError):  # a caller kept a reference: let GC unmap
                        mapped.close()
                pos += n

    def tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, "object"]]:
        import torch

        for key in keys:
            entry = self._entries[key]
            data = bytearray(entry.end - entry.start)
            if data:
                fd = os.open(entry.file, os.O_RDONLY)
                try:
                    if os.preadv(fd, [memoryview(data)], entry.start) != len(data):
                        raise InputError(f"{entry.file}: short read for {key!r}")
                finally:
                    os.close(fd)
            dtype = getattr(torch, entry.spec.dtype)
            tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            yield key, tensor.reshape(entry.spec.shape)


def iter_tensors(hf_dir: Path) -> Iterator[tuple[str, "object"]]:
    """Every tensor of the checkpoint, sorted by key, one at a time."""
    ckpt = HfCheckpoint(hf_dir)
    return ckpt.tensors(ckpt.specs())
