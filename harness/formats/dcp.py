"""PyTorch DCP folders (``.metadata`` + ``__*_*.distcp``), read on CPU in one process.

Both Megatron formats are DCP on disk; this module reads their metadata and individual tensors
without a process group (``no_dist=True``) and checks, before reading, that every byte range the
metadata points at exists (a truncated ``.distcp`` is reported, not half-loaded).

A ``.metadata`` file is a pickle, and ``harness diff`` is pointed at folders nobody here wrote, so
it is never given to ``pickle.load`` (which is what torch's own reader does:
torch/distributed/checkpoint/filesystem.py ``FileSystemReader.read_metadata``). ``read_metadata``
unpickles it with ``MetadataUnpickler``, which hands out only the classes a DCP metadata holds
(``allowed_globals``, derived from the installed torch) and refuses anything else by name before it
is looked up, let alone called. Everything else here reads that validated metadata, never the file.
"""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
import stat
from pathlib import Path
from typing import Iterable, Iterator

from harness.errors import InputError
from harness.formats.base import DTYPE_SIZES, TensorSpec, plain_file_name, quote, read_regular_file, why_unreadable

METADATA = ".metadata"
MAX_METADATA = 2 * 1024**3  # far above any real one (a 70B torch_dist .metadata is tens of MB)


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
    """The folder's DCP ``Metadata``, unpickled with only DCP metadata classes allowed, then checked:
    its structure, that every byte range lies in a regular file of the folder, and that the saved
    chunks tile each tensor. Any flaw is an ``InputError`` (one line, exit 2)."""
    file = path / METADATA
    if not os.path.lexists(file):
        newest = newest_complete_iter(path.parent)
        hint = f" (newest complete one here: {newest})" if newest and newest != path else ""
        raise InputError(
            f"{path}: DCP shards but no .metadata: the async save is probably incomplete; "
            f"pick a complete iter_* folder{hint}"
        )
    metadata = unpickle_metadata(read_regular_file(file, MAX_METADATA, "DCP .metadata"), file)
    check_structure(file, metadata)
    check_storage(path, metadata)
    if problems := chunk_problems(metadata):
        raise InputError(f"{path}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                         + "; the save is corrupt, pick another iter_* folder")
    check_chunk_storage(path, metadata)
    return metadata


def unpickle_metadata(raw: bytes, file: Path):
    """``raw`` unpickled by ``MetadataUnpickler``; a refused class keeps its own message, any other
    failure (a flipped or missing byte) is "unreadable". From memory, not the file: a length in the
    pickle that claims more than the file holds then fails as truncated instead of being allocated."""
    try:
        return MetadataUnpickler(io.BytesIO(raw), file).load()
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any unpickling error means a corrupt file
        raise InputError(f"{file}: unreadable DCP metadata ({_why(err)}); pick another iter_* folder") from None


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``allowed_globals()``.

    ``find_class`` is the one way a pickle reaches code: GLOBAL, STACK_GLOBAL, INST and OBJ go
    through it (EXT codes name only extensions registered with copyreg in this process, and nothing
    here registers one), and REDUCE, NEWOBJ and BUILD can only call or set up what it returned (the
    "Restricting Globals" recipe of the pickle docs). So a crafted file is refused, by the name it
    asks for, before that name is even imported. There is no ``persistent_load``: a metadata has no
    persistent ids, and one is an unpickling error.
    """

    def __init__(self, fh, file: Path):
        super().__init__(fh)
        self.file = file

    def find_class(self, module, name):
        found = allowed_globals().get((module, name))
        if found is None:
            what = quote(f"{module}.{name}")
            raise InputError(f"{self.file}: refers to {what}, which no DCP metadata holds: refused before anything "
                             "in it ran (a crafted or foreign file)")
        return found


@functools.cache
def allowed_globals() -> dict[tuple[str, str], object]:
    """``(module, name) -> object`` for every global a DCP metadata pickle may name, derived from the
    installed torch: the classes reachable from four roots through their declared field types.

    Roots: ``Metadata`` (torch/distributed/checkpoint/metadata.py); ``_StorageInfo``, the value of
    ``Metadata.storage_data`` (typed ``Any``) as filesystem.py's writers fill it; ``SavePlan`` and
    its ``storage_data``, ``_StoragePrefix``, which Megatron-Core adds to the metadata as
    ``all_local_plans`` (megatron/core/dist_checkpointing/strategies/state_dict_saver.py); and the
    enums of metadata.py (``TensorProperties.__getstate__`` pickles the memory format as one).
    Field types map to globals: dataclasses and enums to themselves, ``torch.Size``, every
    ``torch.dtype`` and ``torch.memory_format`` object by name, ``torch.layout`` to a name lookup
    standing in for the function torch's copyreg reducer names, ``os.PathLike`` to the POSIX path
    classes. Plain values (str, int, bool, None, list, dict, tuple) are pickle opcodes, not globals.
    A field type without a rule raises: a torch upgrade that adds one must be looked at, not
    silently allowed or silently refused.
    """
    import collections.abc
    import copyreg
    import dataclasses
    import enum
    import pathlib
    import types
    import typing

    import torch
    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed: dict[tuple[str, str], object] = {}

    def named(objects_of: type) -> None:
        for name, value in vars(torch).items():
            if isinstance(value, objects_of):
                allowed[("torch", name)] = value

    def walk(hint) -> None:
        origin = typing.get_origin(hint)
        if origin is not None:
            if origin not in (list, dict, tuple, collections.abc.Sequence, typing.Union, types.UnionType):
                raise TypeError(f"DCP metadata field type {hint!r}: no rule in harness.formats.dcp.allowed_globals")
            for arg in typing.get_args(hint):
                walk(arg)
        elif hint is typing.Any or hint in (type(None), bool, int, float, str, bytes):
            pass  # Any: see the roots; the others need no global
        elif isinstance(hint, type) and (dataclasses.is_dataclass(hint) or issubclass(hint, enum.Enum)):
            key = (hint.__module__, hint.__qualname__)
            if key not in allowed:
                allowed[key] = hint
                if dataclasses.is_dataclass(hint):
                    hints = typing.get_type_hints(hint)
                    for field in dataclasses.fields(hint):
                        walk(hints[field.name])
        elif hint is torch.Size:
            allowed[("torch", "Size")] = torch.Size
        elif hint is torch.dtype:
            named(torch.dtype)
        elif hint is torch.memory_format:
            named(torch.memory_format)
        elif hint is torch.layout:
            reducer, _ = copyreg.dispatch_table[torch.layout](torch.strided)
            allowed[(reducer.__module__, reducer.__name__)] = _layout_named
        elif hint is os.PathLike:  # StorageMeta.checkpoint_id: a Path pickles as its concrete class
            allowed.update({("pathlib", c.__name__): c for c in (pathlib.PurePosixPath, pathlib.PosixPath)})
        else:
            raise TypeError(f"DCP metadata field type {hint!r}: no rule in harness.formats.dcp.allowed_globals")

    enums = [v for v in vars(metadata).values()
             if isinstance(v, type) and issubclass(v, enum.Enum) and v.__module__ == metadata.__name__]
    for root in (metadata.Metadata, filesystem._StorageInfo, planner.SavePlan, filesystem._StoragePrefix, *enums):
        walk(root)
    return allowed


def _layout_named(name):
    """Stands in for ``torch.serialization._get_layout``, which torch's copyreg reducer for
    ``torch.layout`` names (torch/serialization.py): the same lookup by name, and nothing else."""
    import torch

    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if not isinstance(name, str) or name not in layouts:
        raise ValueError(f"no torch layout {quote(name)}")
    return layouts[name]


def _why(err: BaseException) -> str:
    message = str(err).splitlines()[0] if str(err) else ""
    return type(err).__name__ + (f": {quote(message, 80)}" if message else "")


def _dims(value, rank: int | None = None) -> bool:
    """A shape or an offset: a tuple (``torch.Size`` is one) of non-negative ints, of ``rank`` entries."""
    return (isinstance(value, tuple) and (rank is None or len(value) == rank)
            and all(type(d) is int and 0 <= d < 2**63 for d in value))


def _count(value) -> bool:
    return type(value) is int and value >= 0


def check_structure(file: Path, metadata) -> None:
    """The unpickled object has the shape the code below relies on: a ``Metadata`` whose entries have
    the field types torch declares (a flipped byte can leave a str where a size belongs, which would
    otherwise surface as a traceback deep inside a load), in dtypes the harness compares."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, TensorProperties, TensorStorageMetadata)

    def corrupt(what: str) -> InputError:
        return InputError(f"{file}: corrupt DCP metadata: {what}; pick another iter_* folder")

    if not isinstance(metadata, Metadata):
        raise corrupt(f"it holds a {type(metadata).__name__}, not a Metadata")
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        raise corrupt("its state_dict_metadata or storage_data is not a dict")
    for fqn, meta in metadata.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise corrupt(f"a key that is a {type(fqn).__name__}, not a str")
        if isinstance(meta, BytesStorageMetadata):
            continue
        if not isinstance(meta, TensorStorageMetadata):
            raise corrupt(f"{quote(fqn)} is described by a {type(meta).__name__}")
        props = meta.properties
        if not isinstance(props, TensorProperties) or not isinstance(props.dtype, torch.dtype):
            raise corrupt(f"{quote(fqn)} has no dtype")
        dtype = str(props.dtype).removeprefix("torch.")
        if dtype not in DTYPE_SIZES:
            raise InputError(f"{file}: {quote(fqn)} is {dtype}, a dtype the harness does not compare "
                             f"(it reads {', '.join(DTYPE_SIZES)})")
        if not _dims(meta.size) or not isinstance(meta.chunks, list):
            raise corrupt(f"{quote(fqn)} has no valid size or chunk list")
        for chunk in meta.chunks:
            if not (isinstance(chunk, ChunkStorageMetadata) and _dims(chunk.offsets, len(meta.size))
                    and _dims(chunk.sizes, len(meta.size))):
                raise corrupt(f"{quote(fqn)} has a chunk that is not offsets and sizes of rank {len(meta.size)}")
    for index, info in metadata.storage_data.items():
        if not (isinstance(index, MetadataIndex) and isinstance(index.fqn, str)
                and (index.offset is None or _dims(index.offset))):
            raise corrupt(f"a storage key that is not a MetadataIndex ({quote(index)})")
        if not isinstance(info, _StorageInfo):
            raise corrupt(f"{quote(index.fqn)} is stored as a {type(info).__name__}")
        if not plain_file_name(info.relative_path):
            raise corrupt(f"{quote(index.fqn)} is stored in {quote(info.relative_path)}, "
                          "not in a file of this folder")
        if not _count(info.offset) or not _count(info.length):
            raise corrupt(f"{quote(index.fqn)} has byte range {quote((info.offset, info.length))}")
        if info.transform_descriptors:
            raise InputError(f"{file}: {quote(index.fqn)} is stored through transforms "
                             f"{quote(info.transform_descriptors)}, which the harness does not read")


def check_storage(path: Path, metadata) -> None:
    """Every (file, offset, length) the metadata names lies inside a regular file of the folder, and
    the ranges of one file do not overlap (DCP writes them one after another)."""
    sizes: dict[str, int] = {}
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for index, info in metadata.storage_data.items():
        name = info.relative_path
        if name not in sizes:
            file = path / name
            if not os.path.lexists(file):
                raise InputError(f"{path}: {name} is missing; the save is incomplete, pick another iter_* folder")
            try:
                st = os.stat(file)
            except OSError:
                raise InputError(why_unreadable(file)) from None
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{file}: not a regular file; the checkpoint is damaged, pick another iter_* folder")
            sizes[name] = st.st_size
        if info.offset + info.length > sizes[name]:
            raise InputError(
                f"{path / name}: truncated ({sizes[name]} bytes, {index.fqn!r} needs "
                f"{info.offset + info.length}); re-copy it or pick another iter_* folder"
            )
        spans.setdefault(name, []).append((info.offset, info.offset + info.length, index.fqn))
    for name, ranges in spans.items():
        ranges.sort()
        for (s0, e0, a), (s1, e1, b) in zip(ranges, ranges[1:]):
            if s1 < e0:
                raise InputError(f"{path / name}: {quote(a)} (bytes {s0}-{e0}) and {quote(b)} (bytes "
                                 f"{s1}-{e1}) overlap; the metadata is corrupt, pick another iter_* folder")


def check_chunk_storage(path: Path, metadata) -> None:
    """Every tensor chunk has a stored range of at least its bytes. With ``check_storage`` and the
    chunks tiling each tensor, a later read never allocates more than the folder holds: a metadata
    that claims a 10^12-element tensor is refused here, not allocated."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = {(i.fqn, None if i.offset is None else tuple(i.offset)): info for i, info in metadata.storage_data.items()}
    for fqn, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        for chunk in meta.chunks:
            info = stored.get((fqn, tuple(chunk.offsets)))
            need = math.prod(chunk.sizes) * meta.properties.dtype.itemsize
            if info is None or info.length < need:
                has = "no stored bytes" if info is None else f"{info.length} stored bytes"
                raise InputError(f"{path}: {quote(fqn)}: the chunk at {list(chunk.offsets)} of "
                                 f"{list(chunk.sizes)} needs {need} bytes and has {has}; the metadata is corrupt, "
                                 "pick another iter_* folder")


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
                problems.append(f"{quote(fqn)}: chunk at {list(offsets)} of {list(sizes)} lies outside {list(size)}")
        if overlap := first_overlap(chunks):
            a, b = overlap
            problems.append(f"{quote(fqn)}: chunks at {list(a)} and {list(b)} overlap (a shard written twice)")
            continue
        covered = sum(math.prod(sizes) for _, sizes in chunks)
        if covered != math.prod(size):
            problems.append(f"{quote(fqn)}: chunks cover {covered} of {math.prod(size)} elements (a shard dropped)")
    return problems


def first_overlap(chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[tuple, tuple] | None:
    """The offsets of two ``(offsets, sizes)`` boxes that share an element, or None.

    A sweep along the dimension with the most distinct offsets compares only boxes whose ranges
    there meet: about linear for the rank grids DCP saves, where comparing all pairs would take
    minutes for thousands of ranks (and a crafted metadata can list millions of chunks)."""
    if len(chunks) < 2:
        return None
    rank = len(chunks[0][0])
    if rank == 0:  # scalars: any two chunks are the same element
        return chunks[0][0], chunks[1][0]
    dim = max(range(rank), key=lambda d: len({offsets[d] for offsets, _ in chunks}))
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for box in sorted(chunks, key=lambda c: c[0][dim]):
        start = box[0][dim]
        active = [a for a in active if a[0][dim] + a[1][dim] > start]
        for a in active:
            if all(ao < bo + bn and bo < ao + an for ao, an, bo, bn in zip(a[0], a[1], box[0], box[1])):
                return a[0], box[0]
        active.append(box)
    return None


def tensor_specs(metadata) -> dict[str, TensorSpec]:
    """Stored key -> spec for tensor entries (byte blobs such as ``_extra_state`` are skipped)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {}
    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            dtype = str(meta.properties.dtype).removeprefix("torch.")
            out[key] = TensorSpec(tuple(meta.size), dtype)
    return out


def load(path: Path, keys: Iterable[str], specs: dict[str, TensorSpec], metadata=None) -> Iterator[tuple[str, "object"]]:
    """Read stored tensors one at a time (each DCP load call reads only that key's bytes).

    DCP is handed ``metadata`` (the checked one; read here if not given) rather than left to
    unpickle ``.metadata`` itself, which it would do with ``pickle.load``, and on failure again
    from a per-rank ``__<rank>.metadata`` (torch/distributed/checkpoint/state_dict_loader.py).
    Tensor bytes are read by torch.load(weights_only=True) (filesystem.py read_data); byte entries,
    which default_planner.py load_bytes would give to torch.load(weights_only=False), are never
    requested, and the planner refuses them should one be. A damaged ``.distcp`` is an InputError."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    if metadata is None:
        metadata = read_metadata(path)
    reader_class, planner_class = _reader_and_planner()
    for key in keys:
        spec = specs[key]
        holder = {key: torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(holder, storage_reader=reader_class(path, metadata), planner=planner_class(), no_dist=True)
        except (Exception, dcp.CheckpointException) as err:  # noqa: BLE001 - a checked range did not decode
            raise InputError(f"{path}: {quote(key)} does not read back ({_why(_cause(err))}); the .distcp is "
                             "damaged, re-copy it or pick another iter_* folder") from None
        yield key, holder[key]


@functools.cache
def _reader_and_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    class CheckedMetadataReader(FileSystemReader):
        """A FileSystemReader whose metadata is the one ``read_metadata`` returned."""

        def __init__(self, path: Path, metadata):
            super().__init__(str(path))
            self._checked = metadata

        def read_metadata(self, *args, **kwargs):
            return self._checked

    class TensorOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise InputError(f"{quote(read_item.dest_index.fqn)} is a pickled byte entry; the harness does not unpickle those")

    return CheckedMetadataReader, TensorOnlyPlanner


def _cause(err: BaseException) -> BaseException:
    """What a rank raised, out of DCP's CheckpointException (torch/distributed/checkpoint/api.py)."""
    for failure in (getattr(err, "failures", None) or {}).values():
        if isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
            return failure[0]
    return err
