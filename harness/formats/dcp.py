"""PyTorch DCP folders (``.metadata`` + ``__*_*.distcp``), read on CPU in one process.

Both Megatron formats are DCP on disk; this module reads their metadata and individual tensors
without a process group (``no_dist=True``) and checks, before reading, that every byte range the
metadata points at exists (a truncated ``.distcp`` is reported, not half-loaded).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator

from harness.errors import InputError
from harness.formats.base import TensorSpec

METADATA = ".metadata"


def newest_complete_iter(folder: Path) -> Path | None:
    """The highest-numbered ``iter_*`` subfolder that has a ``.metadata`` file."""
    complete = [p for p in folder.glob("iter_*") if p.is_dir() and (p / METADATA).exists()]

    def number(p: Path) -> int:
        try:
            return int(p.name.removeprefix("iter_"))
        except ValueError:
            return -1

    return max(complete, key=number) if complete else None


def read_metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / METADATA).exists():
        newest = newest_complete_iter(path.parent)
        hint = f" (newest complete one here: {newest})" if newest and newest != path else ""
        raise InputError(
            f"{path}: DCP shards but no .metadata: the async save is probably incomplete; "
            f"pick a complete iter_* folder{hint}"
        )
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any unpickling error means a corrupt file
        raise InputError(f"{path / METADATA}: unreadable DCP metadata ({type(err).__name__}); pick another iter_* folder") from None
    check_storage(path, metadata)
    if problems := chunk_problems(metadata):
        raise InputError(f"{path}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                         + "; the save is corrupt, pick another iter_* folder")
    return metadata


def check_storage(path: Path, metadata) -> None:
    """Every (file, offset, length) named by the metadata must lie inside an existing file."""
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        name = info.relative_path
        if name not in sizes:
            file = path / name
            if not file.exists():
                raise InputError(f"{path}: {name} is missing; the save is incomplete, pick another iter_* folder")
            sizes[name] = file.stat().st_size
        if info.offset + info.length > sizes[name]:
            raise InputError(
                f"{path / name}: truncated ({sizes[name]} bytes, {index.fqn!r} needs "
                f"{info.offset + info.length}); re-copy it or pick another iter_* folder"
            )


def chunk_problems(metadata) -> list[str]:
    """Tensors whose saved chunks do not tile them exactly: a chunk out of bounds, two chunks that
    overlap (a shard written twice, or at another rank's offset), or elements no chunk covers (a
    shard dropped). A DCP load fills a gap with whatever the target held and lets overlapping
    chunks overwrite each other, silently, so this is checked before anything is read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    problems = []
    for fqn, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        size, chunks = tuple(meta.size), [(tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks]
        for offsets, sizes in chunks:
            if any(o < 0 or o + n > d for o, n, d in zip(offsets, sizes, size)):
                problems.append(f"{fqn}: chunk at {list(offsets)} of {list(sizes)} lies outside {list(size)}")
        overlapping = [(a, b) for i, a in enumerate(chunks) for b in chunks[i + 1:]
                       if all(ao < bo + bn and bo < ao + an for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1]))]
        if overlapping:
            (a, _), (b, _) = overlapping[0]
            problems.append(f"{fqn}: chunks at {list(a)} and {list(b)} overlap (a shard written twice)")
            continue
        covered = sum(math.prod(sizes) for _, sizes in chunks)
        if covered != math.prod(size):
            problems.append(f"{fqn}: chunks cover {covered} of {math.prod(size)} elements (a shard dropped)")
    return problems


def tensor_specs(metadata) -> dict[str, TensorSpec]:
    """Stored key -> spec for tensor entries (byte blobs such as ``_extra_state`` are skipped)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {}
    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            dtype = str(meta.properties.dtype).removeprefix("torch.")
            out[key] = TensorSpec(tuple(meta.size), dtype)
    return out


def load(path: Path, keys: Iterable[str], specs: dict[str, TensorSpec]) -> Iterator[tuple[str, "object"]]:
    """Read stored tensors one at a time (each DCP load call reads only that key's bytes)."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path))
    for key in keys:
        spec = specs[key]
        holder = {key: torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(holder, storage_reader=reader, no_dist=True)
        yield key, holder[key]
