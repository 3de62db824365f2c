"""Hugging Face safetensors checkpoints (one file, or shards with an index), streamed.

The safetensors header is parsed here (8-byte length + JSON) rather than through ``safe_open``
so that (a) a truncated file or corrupt header is reported as such before any data is read, and
(b) tensor bytes can be visited in bounded windows: ``windows()`` maps one window of the file at
a time (zero-copy from the page cache) and unmaps it before the next, so comparing two multi-GB
checkpoints holds two windows, not two models (a whole-file mmap would count every touched page
towards the process RSS).

The header comes from outside, so it is held to the format's own rules (safetensors
``Metadata::validate`` in safetensors/src/tensor.rs) before any tensor byte is used: a bounded
length, one JSON object without repeated keys, known dtypes, non-negative integer shapes and
offsets, byte counts that match the shapes, and offsets that cover the data exactly once, up to
the end of the file. A header that claims more than the file holds is an error, never an allocation.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from harness.errors import InputError
from harness.formats.base import (DTYPE_SIZES, TensorSpec, open_regular, plain_file_name, quote, read_regular_file,
                                  why_unreadable)

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


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object without repeated keys: ``json`` keeps the last of two, so a second entry for
    one tensor could silently replace the first."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def parse_json(raw: bytes, file: Path, what: str):
    """``raw`` as JSON, or an InputError that says why, in one line."""
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys)
    except _RepeatedKey as err:
        raise InputError(f"{file}: {what}: key {quote(err.args[0])} appears twice; re-copy or re-export it") from None
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a number too long, nested too deep
        raise InputError(f"{file}: {what} (not JSON); re-copy or re-export it") from None


def read_index(hf_dir: Path) -> dict[str, str] | None:
    """The index's tensor -> shard file map, or None for a checkpoint without an index. Each shard
    must be a file of this folder (a name like ``../x`` or ``/x`` is refused, not followed)."""
    index = hf_dir / INDEX_NAME
    if not os.path.lexists(index):
        return None
    doc = parse_json(read_regular_file(index, MAX_HEADER, "safetensors index"), index, "not a valid safetensors index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index}: not a valid safetensors index (no weight_map from tensor names to shard "
                         "files); re-export the checkpoint")
    outside = sorted(v for v in set(weight_map.values()) if not plain_file_name(v))
    if outside:
        raise InputError(f"{index}: names a shard outside the checkpoint folder ({quote(outside[0])}); "
                         "re-export the checkpoint")
    return weight_map


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
    """The tensors of one safetensors file, checked as the module docstring says."""
    def corrupt(what: str) -> InputError:
        return InputError(f"{file}: corrupt safetensors header: {what}; re-copy or re-export it")

    with open_regular(file) as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(8)
        if len(raw) < 8:
            raise InputError(f"{file}: truncated safetensors file ({size} bytes, no header); re-copy or re-export it")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER or 8 + length > size:
            raise InputError(f"{file}: corrupt safetensors header (claims {length} bytes, file has {size}); re-copy or re-export it")
        text = fh.read(length)
    if len(text) != length:
        raise InputError(f"{file}: truncated safetensors file (shorter than its header says); re-copy or re-export it")
    header = parse_json(text, file, "corrupt safetensors header")
    if not isinstance(header, dict):
        raise corrupt(f"a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise corrupt("__metadata__ is not a map of strings")
    base = 8 + length
    entries = {key: _entry(file, key, info, base, size) for key, info in header.items()}
    pos, previous = base, None
    for start, end, key in sorted((e.start, e.end, k) for k, e in entries.items()):
        if start < pos:
            raise corrupt(f"{quote(key)} (bytes {start - base}-{end - base}) overlaps {quote(previous)}")
        if start > pos:
            raise corrupt(f"bytes {pos - base}-{start - base} of the data belong to no tensor")
        pos, previous = end, key
    if pos != size:
        raise corrupt(f"the last {size - pos} bytes of the file belong to no tensor")
    return entries


def _entry(file: Path, key: str, info, base: int, size: int) -> Entry:
    def corrupt(what: str) -> InputError:
        return InputError(f"{file}: corrupt safetensors header entry {quote(key)}: {what}; re-copy or re-export it")

    if not isinstance(info, dict):
        raise corrupt(f"a JSON {type(info).__name__}, not an object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise InputError(f"{file}: {quote(key)} has dtype {quote(dtype)}, which the harness does not read "
                         f"(it reads {', '.join(SAFETENSORS_DTYPES)})")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not _counts(shape):
        raise corrupt(f"shape {quote(shape)} is not a list of non-negative integers")
    if not (_counts(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise corrupt(f"data_offsets {quote(offsets)} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if base + end > size:
        raise InputError(
            f"{file}: truncated safetensors file: {key!r} ends at byte {base + end}, file has {size}; "
            "re-copy or re-export it"
        )
    spec = TensorSpec(tuple(shape), SAFETENSORS_DTYPES[dtype])
    if end - begin != math.prod(shape) * DTYPE_SIZES[spec.dtype]:
        raise InputError(f"{file}: corrupt safetensors header: {key!r} has {end - begin} bytes for {spec}")
    return Entry(spec=spec, file=file, start=base + begin, end=base + end)


def _counts(value) -> bool:
    """A JSON list of integers that fit an int64 and are not negative (``true`` is not 1 here)."""
    return isinstance(value, list) and all(type(v) is int and 0 <= v < 2**63 for v in value)


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
