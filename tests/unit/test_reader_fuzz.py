"""Fuzz the checkpoint readers with malformed copies of valid checkpoints (issue 25).

Every example copies one small valid checkpoint (HF single-file, HF sharded with an index,
fsdp_dtensor with optimizer state, torch_dist with a byte entry and Megatron-Core's saved plans),
damages it (truncation, flipped bytes in headers and metadata, wrong offsets, huge lengths, repeated
keys, symlinks to odd places), and runs what ``harness diff`` runs on it, in-process: open, then
compare with the intact copy, reading every tensor. The only acceptable outcomes are a result or an
``InputError`` of one line, with nothing written; anything else (another exception, a hang past the
alarm, a file appearing) fails the example, and hypothesis shrinks it. The same through the CLI
(exit 2, one line) is tests/integration/test_untrusted_checkpoints.py.

Bounded for CI: ``derandomize`` (the same examples every run), no example database, and
``EXAMPLES`` per test (360 in all); the file runs in about 15 s on a busy 2-core machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from harness.checks import checkpoint_diff
from harness.errors import InputError
from harness.formats import fsdp_writer, hf
from harness.formats.detect import open_checkpoint

pytestmark = pytest.mark.cpu

# Hypothesis caches the constants of the source it sees in ./.hypothesis (even without an example
# database), from collection on: set here, at import, to keep that out of the checkout.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "harness-hypothesis")

EXAMPLES = {"safetensors": 150, "dcp": 150, "symlinks": 60}
ALARM_S = 20  # one example reads a few KB: anything near this is a hang
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------- the seeds


def _hf_single(path: Path) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"model.embed_tokens.weight": torch.arange(24.0).reshape(6, 4),
               "model.norm.weight": torch.ones(4, dtype=torch.bfloat16),
               "lm_head.bias": torch.zeros(0)}, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _hf_sharded(path: Path) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": {"a.weight": torch.arange(8.0).reshape(2, 4)},
              "model-00002-of-00002.safetensors": {"b.weight": torch.ones(3, 2, dtype=torch.float16),
                                                   "c.bias": torch.arange(3, dtype=torch.int64)}}
    for name, tensors in shards.items():
        save_file(tensors, path / name, metadata={"format": "pt"})
    weight_map = {key: name for name, tensors in shards.items() for key in tensors}
    (path / hf.INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 60}, "weight_map": weight_map}))
    return path


def _fsdp_dtensor(path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    return fsdp_writer.write_fsdp_dtensor(path, {
        "embedding.word_embeddings.weight": torch.randn(8, 4, generator=gen),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(6, 4, generator=gen),
        "decoder.final_layernorm.weight": torch.randn(4, generator=gen)})


def _torch_dist(path: Path) -> Path:
    import torch.distributed.checkpoint as tdcp
    from torch.distributed.checkpoint.default_planner import create_default_local_save_plan

    flat = {"embedding.word_embeddings.weight": torch.arange(32.0).reshape(8, 4),
            "decoder.layers.mlp.linear_fc2.weight": torch.ones(2, 4, 3, dtype=torch.bfloat16),
            "decoder.layers.self_attention.linear_proj._extra_state/shard_0_2": io.BytesIO(b"te extra state")}
    tdcp.save(flat, storage_writer=tdcp.FileSystemWriter(str(path)), no_dist=True)
    metadata = pickle.loads((path / ".metadata").read_bytes())
    metadata.all_local_plans = [create_default_local_save_plan(flat, True)]  # as Megatron-Core saves it
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    return path


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    built = {"hf": _hf_single(root / "hf"), "hf-sharded": _hf_sharded(root / "hf-sharded"),
             "fsdp_dtensor": _fsdp_dtensor(root / "fsdp_dtensor"), "torch_dist": _torch_dist(root / "torch_dist")}
    for path in built.values():  # every seed is valid and compares equal to itself
        result, _ = checkpoint_diff.diff(open_checkpoint(path), open_checkpoint(path))
        assert result.passed, (path, result.summary)
    return built


@pytest.fixture(scope="module")
def work_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------------------ the property


class Hang(BaseException):
    """Not an Exception: the readers' ``except Exception`` must not turn a hang into an error line."""


@contextmanager
def alarm(seconds: int):
    def ring(signum, frame):
        raise Hang(f"no answer in {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``path`` (links not followed): name -> (size, mtime)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            st_ = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), path)] = (st_.st_size, st_.st_mtime_ns)
    return out


def diff_in_process(damaged: Path, intact: Path) -> None:
    """What ``harness diff DAMAGED INTACT`` does, short of printing: a result or one InputError line."""
    try:
        result, _ = checkpoint_diff.diff(open_checkpoint(damaged), open_checkpoint(intact))
    except InputError as err:
        text = str(err)
        assert text and "\n" not in text and "\r" not in text, repr(text)


def check(seed: Path, damage, work_root: Path) -> None:
    with tempfile.TemporaryDirectory(dir=work_root) as run:
        run = Path(run)
        copy = run / "ckpt"
        shutil.copytree(seed, copy, symlinks=True)
        damage(copy, run)
        before = tree(run)
        with alarm(ALARM_S), contextlib.chdir(run):  # the run folder is also the working directory
            diff_in_process(copy, seed)
        assert tree(run) == before, "the reader wrote to its input, beside it or to the working directory"


# ------------------------------------------------------------------------------ byte damage


def header_end(file: Path) -> int:
    """Where a safetensors file's header ends (its 8-byte length + JSON), or the whole file."""
    data = file.read_bytes()
    if file.suffix == ".safetensors" and len(data) >= 8:
        return min(len(data), 8 + struct.unpack("<Q", data[:8])[0])
    return len(data)


@st.composite
def byte_damage(draw, files: list[str], sizes: dict[str, int], ends: dict[str, int]):
    """A change to one file's bytes: cut it short, flip bytes in its header (all of it for
    metadata, JSON and .distcp), or write a huge length into it."""
    name = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(["truncate", "flip", "huge", "empty"]))
    if kind == "empty" or sizes[name] == 0:
        return name, "truncate", 0, b""
    if kind == "truncate":
        return name, kind, draw(st.integers(0, sizes[name] - 1)), b""
    pos = draw(st.integers(0, max(0, ends[name] - 1)))
    if kind == "flip":
        return name, kind, pos, bytes(draw(st.lists(st.integers(1, 255), min_size=1, max_size=4)))
    width = draw(st.sampled_from([1, 2, 4, 8]))
    value = draw(st.sampled_from([2 ** (8 * width) - 1, 2 ** (8 * width - 1), 2 ** (8 * width - 1) - 1]))
    return name, kind, pos, value.to_bytes(width, "little")


def apply_bytes(copy: Path, change) -> None:
    name, kind, pos, payload = change
    file = copy / name
    data = bytearray(file.read_bytes())
    if kind == "truncate":
        data = data[:pos]
    elif kind == "flip":
        for i, x in enumerate(payload):
            if pos + i < len(data):
                data[pos + i] ^= x
    else:
        data[pos:pos + len(payload)] = payload
    file.write_bytes(bytes(data))


def files_of(seed: Path) -> list[str]:
    return sorted(p.name for p in seed.iterdir() if p.is_file())


# ----------------------------------------------------------------------- safetensors headers


@st.composite
def header_edit(draw, keys: list[str]):
    """A change to one entry of a safetensors header, written back with a correct length prefix."""
    key = draw(st.sampled_from(keys))
    ints = st.one_of(st.integers(-16, 256), st.integers(-2**70, 2**70), st.sampled_from([2**63 - 1, 2**64, -1]))
    field = draw(st.sampled_from(["data_offsets", "shape", "dtype", "repeat", "drop", "json-type", "metadata"]))
    if field == "data_offsets":
        value = draw(st.one_of(st.lists(ints, min_size=0, max_size=3), st.just("0,8"), st.just([0.0, 8.0])))
    elif field == "shape":
        value = draw(st.one_of(st.lists(ints, max_size=4), st.just([True, 2]), st.just(["4"])))
    elif field == "dtype":
        value = draw(st.one_of(st.sampled_from(["F32", "BF16", "F16", "I64", "F64", "U8", "BOOL", "F8_E4M3", "F4",
                                                "C64", "U64", "", "f32"]), st.text(max_size=6), st.just(None)))
    elif field == "json-type":
        value = draw(st.sampled_from([[], "x", 3, None, True]))
    else:
        value = None
    return key, field, value


def apply_header(copy: Path, shard: str, edit) -> None:
    key, field, value = edit
    file = copy / shard
    data = file.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + length]), data[8 + length:]
    if field in ("data_offsets", "shape", "dtype"):
        header[key][field] = value
        text = json.dumps(header)
    elif field == "drop":
        del header[key]
        text = json.dumps(header)
    elif field == "json-type":
        header[key] = value
        text = json.dumps(header)
    elif field == "metadata":
        header["__metadata__"] = {"format": 1}
        text = json.dumps(header)
    else:  # the same key twice: JSON allows it, json.loads would keep the last
        text = json.dumps(header)[:-1] + f", {json.dumps(key)}: {json.dumps(header[key])}}}"
    raw = text.encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def header_keys(file: Path) -> list[str]:
    data = file.read_bytes()
    return sorted(k for k in json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]]) if k != "__metadata__")



@settings(FUZZ, max_examples=EXAMPLES["safetensors"])
@given(data=st.data())
def test_fuzz_safetensors(seeds, work_root, data):
    name = data.draw(st.sampled_from(["hf", "hf-sharded"]), label="seed")
    seed = seeds[name]
    files = files_of(seed)
    shards = [f for f in files if f.endswith(".safetensors")]
    if data.draw(st.booleans(), label="semantic"):
        shard = data.draw(st.sampled_from(shards), label="shard")
        edit = data.draw(header_edit(header_keys(seed / shard)), label="edit")
        check(seed, lambda copy, run: apply_header(copy, shard, edit), work_root)
    else:
        sizes = {f: (seed / f).stat().st_size for f in files}
        change = data.draw(byte_damage(files, sizes, {f: header_end(seed / f) for f in files}), label="bytes")
        check(seed, lambda copy, run: apply_bytes(copy, change), work_root)


# ------------------------------------------------------------------------------ DCP metadata


def _size(values: list[int]):
    """A torch.Size where torch can hold the values, else the tuple a crafted file could carry."""
    try:
        return torch.Size(values)
    except (ValueError, RuntimeError, OverflowError):
        return tuple(values)


@st.composite
def metadata_edit(draw, fqns: list[str]):
    """A change to one field of a (seed's, trusted) unpickled Metadata, pickled back."""
    fqn = draw(st.sampled_from(fqns))
    ints = st.one_of(st.integers(-8, 300), st.integers(-2**65, 2**65), st.sampled_from([2**62, 2**63 - 1]))
    field = draw(st.sampled_from(["offset", "length", "relative_path", "chunk_offsets", "chunk_sizes", "size",
                                  "dtype", "drop_storage", "repeat_chunk", "no_chunks"]))
    if field in ("offset", "length"):
        value = draw(ints)
    elif field == "relative_path":
        value = draw(st.sampled_from(["../x.distcp", "/etc/hostname", "missing.distcp", "", ".", "metadata.json",
                                      ".metadata", "a/b.distcp"]))
    elif field in ("chunk_offsets", "chunk_sizes", "size"):
        value = draw(st.lists(ints, max_size=4))
    elif field == "dtype":
        value = draw(st.sampled_from([torch.float64, torch.float16, torch.int8, torch.bool, torch.complex64,
                                      torch.uint16, torch.float8_e4m3fn]))
    else:
        value = None
    return fqn, field, value


def apply_metadata(copy: Path, edit) -> None:
    fqn, field, value = edit
    md = pickle.loads((copy / ".metadata").read_bytes())
    indexes = [i for i in md.storage_data if i.fqn == fqn]
    meta = md.state_dict_metadata.get(fqn)
    chunked = hasattr(meta, "chunks") and meta.chunks
    if field in ("offset", "length", "relative_path") and indexes:
        md.storage_data[indexes[0]] = replace(md.storage_data[indexes[0]], **{field: value})
    elif field == "drop_storage" and indexes:
        del md.storage_data[indexes[0]]
    elif field in ("chunk_offsets", "chunk_sizes") and chunked:
        chunk = replace(meta.chunks[0], **{field.removeprefix("chunk_"): _size(value)})
        md.state_dict_metadata[fqn] = replace(meta, chunks=[chunk, *meta.chunks[1:]])
    elif field == "size" and chunked:
        md.state_dict_metadata[fqn] = replace(meta, size=_size(value))
    elif field == "dtype" and chunked:
        md.state_dict_metadata[fqn] = replace(meta, properties=replace(meta.properties, dtype=value))
    elif field == "repeat_chunk" and chunked:
        md.state_dict_metadata[fqn] = replace(meta, chunks=[*meta.chunks, meta.chunks[0]])
    elif field == "no_chunks" and chunked:
        md.state_dict_metadata[fqn] = replace(meta, chunks=[])
    (copy / ".metadata").write_bytes(pickle.dumps(md))



@settings(FUZZ, max_examples=EXAMPLES["dcp"])
@given(data=st.data())
def test_fuzz_dcp(seeds, work_root, data):
    name = data.draw(st.sampled_from(["fsdp_dtensor", "torch_dist"]), label="seed")
    seed = seeds[name]
    if data.draw(st.booleans(), label="semantic"):
        fqns = sorted(pickle.loads((seed / ".metadata").read_bytes()).state_dict_metadata)
        edit = data.draw(metadata_edit(fqns), label="edit")
        check(seed, lambda copy, run: apply_metadata(copy, edit), work_root)
    else:
        files = files_of(seed)
        sizes = {f: (seed / f).stat().st_size for f in files}
        change = data.draw(byte_damage(files, sizes, sizes), label="bytes")
        check(seed, lambda copy, run: apply_bytes(copy, change), work_root)


# ---------------------------------------------------------------------------------- symlinks


LINKS = ["loop", "dangling", "folder", "fifo", "/dev/zero", "sibling", "outside-copy", "parent"]


def apply_link(copy: Path, run: Path, seed: Path, name: str, kind: str) -> None:
    file = copy / name
    file.unlink()
    if kind == "loop":
        file.symlink_to(name)
    elif kind == "dangling":
        file.symlink_to(run / "gone")
    elif kind == "folder":
        file.symlink_to(copy)
    elif kind == "fifo":
        os.mkfifo(run / "fifo")  # a reader that opens it blocking would wait here for ever
        file.symlink_to(run / "fifo")
    elif kind == "/dev/zero":
        file.symlink_to("/dev/zero")  # a reader that reads it whole would never finish
    elif kind == "sibling":
        other = sorted(p.name for p in copy.iterdir() if p.name != name and not p.is_symlink())
        file.symlink_to(other[0] if other else name)
    elif kind == "outside-copy":  # the intact file, from outside the folder: reads as if it were there
        shutil.copy(seed / name, run / "elsewhere")
        file.symlink_to(run / "elsewhere")
    else:
        file.symlink_to("..")



@settings(FUZZ, max_examples=EXAMPLES["symlinks"])
@given(data=st.data())
def test_fuzz_symlinks(seeds, work_root, data):
    seed = seeds[data.draw(st.sampled_from(sorted(seeds)), label="seed")]
    name = data.draw(st.sampled_from(files_of(seed)), label="file")
    kind = data.draw(st.sampled_from(LINKS), label="link")
    check(seed, lambda copy, run: apply_link(copy, run, seed, name, kind), work_root)
