"""Reading a checkpoint runs no code (issue 25): the DCP metadata unpickler and its allow-list, and
every check of a file from outside (DCP ``.metadata``, ``.distcp`` ranges, safetensors header and
index, ``metadata.json``) fed the bad input it exists for: one line, ``InputError``.

Small checkpoints are written here with torch DCP and safetensors; the real ones of every format
the harness writes (torch_dist by the bridge, fsdp_dtensor with optimizer state by Megatron-FSDP)
are read in tests/integration/test_formats.py and test_fsdp_checkpoints.py, and the fuzz test is
tests/unit/test_reader_fuzz.py.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import os
import pickle
import shlex
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from harness import workspace
from harness.errors import InputError
from harness.formats import dcp, fsdp_writer, hf
from harness.formats.base import TensorSpec
from harness.formats.detect import detect, open_checkpoint

pytestmark = pytest.mark.cpu


# ------------------------------------------------------------------------------------ builders


def small_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"embedding.word_embeddings.weight": torch.randn(8, 4, generator=gen),
            "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(6, 4, generator=gen),
            "decoder.final_layernorm.weight": torch.randn(4, generator=gen)}


def write_fsdp(path: Path) -> Path:
    """An fsdp_dtensor checkpoint with optimizer state (the harness's own writer)."""
    return fsdp_writer.write_fsdp_dtensor(path, small_state())


def write_torch_dist(path: Path) -> Path:
    """A torch_dist-shaped DCP folder: a stacked entry, a byte entry, ``metadata.json``, and the local
    save plans Megatron-Core keeps in the metadata (``all_local_plans``)."""
    import torch.distributed.checkpoint as tdcp
    from torch.distributed.checkpoint.default_planner import create_default_local_save_plan

    flat = {"embedding.word_embeddings.weight": torch.arange(32.0).reshape(8, 4),
            "decoder.layers.mlp.linear_fc2.weight": torch.ones(2, 4, 3, dtype=torch.bfloat16),
            "decoder.layers.self_attention.linear_proj._extra_state/shard_0_2": io.BytesIO(b"te extra state")}
    tdcp.save(flat, storage_writer=tdcp.FileSystemWriter(str(path)), no_dist=True)
    edit_metadata(path, lambda md: setattr(md, "all_local_plans", [create_default_local_save_plan(flat, True)]))
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    return path


def edit_metadata(path: Path, edit) -> Path:
    """Rewrite a folder's (trusted, just written) ``.metadata`` after ``edit(metadata)``."""
    metadata = pickle.loads((path / ".metadata").read_bytes())
    edit(metadata)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    return path


def write_hf(path: Path, tensors=None, metadata=None) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors or {"a.weight": torch.arange(12.0).reshape(3, 4), "b.bias": torch.ones(5, dtype=torch.bfloat16)},
              path / "model.safetensors", metadata=metadata or {"format": "pt"})
    return path


class Payload:
    """What a crafted pickle carries: a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text, text
    return text


# ------------------------------------------------------------------- the restricted unpickler


def test_the_payload_is_live(tmp_path):
    """The payload the tests below refuse does run under plain pickle (so they can fail)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def _at_top(marker):
    return pickle.dumps(Payload(marker))


def _inside_real_metadata(tmp, marker):
    """A genuine Metadata whose planner_data carries the payload: the allowed objects before it are
    built, the payload's global is refused when reached."""
    path = write_fsdp(tmp / "ckpt")
    metadata = pickle.loads((path / ".metadata").read_bytes())
    metadata.planner_data = {"x": Payload(marker)}
    return pickle.dumps(metadata)


def _protocol_0(marker):
    return pickle.dumps(Payload(marker), protocol=0)  # GLOBAL by text line, not STACK_GLOBAL


def _torch_function(marker):
    class TorchLoad:
        def __reduce__(self):
            return torch.load, (str(marker),)

    return pickle.dumps(TorchLoad())


def _dotted_attribute(marker):
    """STACK_GLOBAL with a dotted name: a plain find_class walks it to any attribute of an object."""
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    return b"\x80\x04" + text("torch.distributed.checkpoint.metadata") + text("Metadata.__init__.__globals__") + b"\x93."


@pytest.mark.parametrize("make,named", [
    (lambda tmp, m: _at_top(m), "'posix.system'"),
    (_inside_real_metadata, "'posix.system'"),
    (lambda tmp, m: _protocol_0(m), "'posix.system'"),
    (lambda tmp, m: _torch_function(m), "'torch.serialization.load'"),
    (lambda tmp, m: _dotted_attribute(m), "'torch.distributed.checkpoint.metadata.Metadata.__init__.__globals__'"),
], ids=["top-level", "inside-a-real-metadata", "protocol-0", "a-torch-function", "dotted-name"])
def test_a_crafted_metadata_is_refused_by_name_and_runs_nothing(tmp_path, make, named):
    marker = tmp_path / "ran"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / ".metadata").write_bytes(make(tmp_path, marker))
    with pytest.raises(InputError) as err:
        dcp.read_metadata(folder)
    assert named in one_line(err) and "refused before anything in it ran" in str(err.value)
    assert not marker.exists(), "the pickle's payload ran"


def test_the_allow_list_is_torch_metadata_classes_and_values_only():
    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed = dcp.allowed_globals()
    for cls in (metadata.Metadata, metadata.TensorStorageMetadata, metadata.ChunkStorageMetadata,
                metadata.TensorProperties, metadata.BytesStorageMetadata, metadata.MetadataIndex,
                metadata.StorageMeta, metadata._MEM_FORMAT_ENCODING, filesystem._StorageInfo, planner.SavePlan,
                planner.WriteItem, planner.WriteItemType, torch.Size):
        assert allowed[(cls.__module__, cls.__qualname__)] is cls
    assert allowed[("torch", "bfloat16")] is torch.bfloat16 and allowed[("torch", "contiguous_format")] is torch.contiguous_format
    assert allowed[("torch.serialization", "_get_layout")] is dcp._layout_named  # a stand-in, not torch's function
    functions = [k for k, v in allowed.items() if not isinstance(v, (type, torch.dtype, torch.memory_format))]
    assert functions == [("torch.serialization", "_get_layout")]
    modules = {m for m, _ in allowed}
    assert modules <= {"torch", "torch.serialization", "pathlib", metadata.__name__, planner.__name__, filesystem.__name__}
    assert ("builtins", "eval") not in allowed and ("torch", "load") not in allowed


def test_a_field_type_without_a_rule_stops_the_derivation(monkeypatch):
    """A torch upgrade that gives a metadata dataclass a new kind of field must be looked at."""
    import collections

    from torch.distributed.checkpoint import metadata

    monkeypatch.setattr(metadata, "Metadata", dataclasses.make_dataclass("Newer", [("queue", collections.deque)]))
    with pytest.raises(TypeError, match="no rule in harness.formats.dcp.allowed_globals"):
        dcp.allowed_globals.__wrapped__()


def test_the_layout_stand_in_looks_up_and_refuses():
    assert dcp._layout_named("torch.strided") is torch.strided
    with pytest.raises(ValueError, match="no torch layout"):
        dcp._layout_named("os.system")


class Recorder(pickle.Unpickler):
    """Plain unpickling (trusted files only) that notes every global the file names."""

    def __init__(self, fh):
        super().__init__(fh)
        self.names: set[tuple[str, str]] = set()

    def find_class(self, module, name):
        self.names.add((module, name))
        return super().find_class(module, name)


def globals_named(file: Path) -> set[tuple[str, str]]:
    recorder = Recorder(io.BytesIO(file.read_bytes()))
    recorder.load()
    return recorder.names


@pytest.mark.parametrize("write", [write_fsdp, write_torch_dist], ids=["fsdp_dtensor+optimizer", "torch_dist-like"])
def test_small_checkpoints_name_only_allowed_globals_and_read_back(tmp_path, write):
    path = write(tmp_path / "ckpt")
    assert globals_named(path / ".metadata") <= set(dcp.allowed_globals())
    ckpt = open_checkpoint(path)
    assert dict(ckpt.tensors(list(ckpt.specs())))


# -------------------------------------------------------------------- DCP metadata, checked


def _set_tensor(key, **changes):
    def edit(md):
        md.state_dict_metadata[key] = replace(md.state_dict_metadata[key], **changes)
    return edit


def _set_props(key, **changes):
    def edit(md):
        meta = md.state_dict_metadata[key]
        md.state_dict_metadata[key] = replace(meta, properties=replace(meta.properties, **changes))
    return edit


def _set_chunk(key, **changes):
    def edit(md):
        meta = md.state_dict_metadata[key]
        md.state_dict_metadata[key] = replace(meta, chunks=[replace(meta.chunks[0], **changes)])
    return edit


def _set_storage(key, **changes):
    def edit(md):
        index = next(i for i in md.storage_data if i.fqn == key)
        md.storage_data[index] = replace(md.storage_data[index], **changes) if changes else "not storage info"
    return edit


def _drop_storage(key):
    def edit(md):
        del md.storage_data[next(i for i in md.storage_data if i.fqn == key)]
    return edit


def _same_range_twice(md):
    first, second = list(md.storage_data)[:2]
    md.storage_data[second] = replace(md.storage_data[second], offset=md.storage_data[first].offset)


EMB = "embedding.word_embeddings.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"


@pytest.mark.parametrize("edit,words", [
    (lambda md: None, None),
    (lambda md: md.state_dict_metadata.update({7: md.state_dict_metadata[EMB]}), "a key that is a int, not a str"),
    (lambda md: md.state_dict_metadata.update({EMB: "a tensor"}), "is described by a str"),
    (_set_props(EMB, dtype="float32"), "has no dtype"),
    (_set_props(EMB, dtype=torch.complex64), "complex64, a dtype the harness does not compare"),
    (_set_tensor(EMB, size=(8, -4)), "has no valid size or chunk list"),
    (_set_chunk(EMB, sizes="84"), "has a chunk that is not offsets and sizes of rank 2"),
    (_set_chunk(EMB, offsets=torch.Size([0])), "has a chunk that is not offsets and sizes of rank 2"),
    (_set_storage(EMB, relative_path="../elsewhere.distcp"), "is stored in '../elsewhere.distcp', not in a file of this folder"),
    (_set_storage(EMB, relative_path="/etc/hostname"), "not in a file of this folder"),
    (_set_storage(EMB, offset=-8), "has byte range (-8,"),
    (_set_storage(EMB, length=1.5), "has byte range"),
    (_set_storage(EMB, transform_descriptors=["zstd"]), "is stored through transforms ['zstd']"),
    (_set_storage(EMB), "is stored as a str"),
    (_set_storage(EMB, length=2**62), "truncated"),
    (_same_range_twice, "overlap; the metadata is corrupt"),
    (_set_storage(EMB, length=16), "needs 128 bytes and has 16 stored bytes"),
    (_drop_storage(EMB), "has no stored bytes"),
    # A claim far beyond the folder's bytes is refused, not allocated.
    (lambda md: (_set_tensor(EMB, size=torch.Size([2**40, 2**20]))(md),
                 _set_chunk(EMB, sizes=torch.Size([2**40, 2**20]))(md)), "needs 4611686018427387904 bytes"),
    (_set_chunk(EMB, offsets=torch.Size([1, 0])), "lies outside [8, 4]"),
    (lambda md: setattr(md, "storage_data", [1]), "its state_dict_metadata or storage_data is not a dict"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_metadata_check_refuses_what_it_is_for(tmp_path, edit, words):
    path = edit_metadata(write_torch_dist(tmp_path / "ckpt"), edit)
    if words is None:
        assert set(open_checkpoint(path).specs()) >= {EMB, "decoder.layers.1.mlp.linear_fc2.weight"}
        return
    with pytest.raises(InputError) as err:
        open_checkpoint(path)
    assert words in one_line(err)


def test_not_a_metadata_object(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"a": [1, 2]}))
    with pytest.raises(InputError) as err:
        dcp.read_metadata(tmp_path)
    assert "corrupt DCP metadata: it holds a dict, not a Metadata" in one_line(err)


def test_a_truncated_metadata_is_unreadable(tmp_path):
    path = write_fsdp(tmp_path / "ckpt")
    (path / ".metadata").write_bytes((path / ".metadata").read_bytes()[:300])
    with pytest.raises(InputError) as err:
        dcp.read_metadata(path)
    assert "unreadable DCP metadata (UnpicklingError" in one_line(err)


@pytest.mark.parametrize("how,words", [
    ("fifo", "a FIFO, not a regular file"),
    ("device", "a device or socket, not a regular file"),
    ("folder", "a folder, not a regular file"),
    ("dangling", "a dangling symlink to"),
    ("loop", "a symlink loop"),
])
def test_metadata_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, how, words):
    path = write_fsdp(tmp_path / "ckpt")
    meta = path / ".metadata"
    meta.unlink()
    if how == "fifo":
        os.mkfifo(meta)  # reading would wait for a writer forever
    elif how == "device":
        meta.symlink_to("/dev/zero")  # reading would never end
    elif how == "folder":
        meta.mkdir()
    else:
        meta.symlink_to(tmp_path / "gone" if how == "dangling" else meta.name)
    with pytest.raises(InputError) as err:
        open_checkpoint(path)
    assert words in one_line(err)


def test_a_distcp_that_is_not_a_regular_file_is_refused(tmp_path):
    path = write_fsdp(tmp_path / "ckpt")
    shard = next(path.glob("*.distcp"))
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(InputError) as err:
        open_checkpoint(path)
    assert "not a regular file" in one_line(err)


def test_metadata_larger_than_a_metadata_can_be_is_not_read(tmp_path, monkeypatch):
    path = write_fsdp(tmp_path / "ckpt")
    monkeypatch.setattr(dcp, "MAX_METADATA", 100)
    with pytest.raises(InputError) as err:
        dcp.read_metadata(path)
    assert "more than a DCP .metadata can be (100)" in one_line(err)


def test_a_damaged_distcp_is_one_line(tmp_path):
    """Bytes inside a checked range that torch.load(weights_only=True) cannot decode."""
    path = write_fsdp(tmp_path / "ckpt")
    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[:64] = b"\xff" * 64  # the first tensor's zip header
    shard.write_bytes(bytes(data))
    ckpt = open_checkpoint(path)
    with pytest.raises(InputError) as err:
        dict(ckpt.tensors(list(ckpt.specs())))
    assert "does not read back" in one_line(err) and "the .distcp is damaged" in str(err.value)


def test_byte_entries_are_never_unpickled(tmp_path):
    """A DCP byte entry is a torch.save pickle that torch's default planner loads with
    torch.load(weights_only=False); the harness's planner refuses it (and no reader asks for one)."""
    import torch.distributed.checkpoint as tdcp
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    marker = tmp_path / "ran"
    path = tmp_path / "ckpt"
    tdcp.save({"w": torch.ones(2), "blob": io.BytesIO(b"x")}, storage_writer=tdcp.FileSystemWriter(str(path)), no_dist=True)
    crafted = io.BytesIO()
    torch.save(Payload(marker), crafted)
    (path / "blob.distcp").write_bytes(crafted.getvalue())
    edit_metadata(path, lambda md: md.storage_data.update(
        {i: _StorageInfo("blob.distcp", 0, len(crafted.getvalue())) for i in md.storage_data if i.fqn == "blob"}))
    with pytest.raises(InputError) as err:
        next(dcp.load(path, ["blob"], {"blob": TensorSpec((1,), "uint8")}))
    assert "is a pickled byte entry; the harness does not unpickle those" in one_line(err)
    assert not marker.exists()
    with contextlib.suppress(Exception, tdcp.CheckpointException):  # torch's own planner
        tdcp.load({"blob": io.BytesIO()}, checkpoint_id=str(path), no_dist=True)
    assert marker.exists(), "the byte entry was not live: the refusal above proves nothing"


def test_stacked_entries_are_counted_before_they_are_listed(tmp_path):
    path = edit_metadata(write_torch_dist(tmp_path / "ckpt"), lambda md: (
        _set_tensor(FC2, size=torch.Size([2**40, 0, 3]))(md), _set_chunk(FC2, sizes=torch.Size([2**40, 0, 3]))(md)))
    with pytest.raises(InputError) as err:
        open_checkpoint(path)
    assert "the stacked entries claim more than 4194304 tensors" in one_line(err)


def test_a_stacked_entry_without_its_stacking_dim(tmp_path):
    import torch.distributed.checkpoint as tdcp

    path = tmp_path / "ckpt"
    tdcp.save({"decoder.layers.scale": torch.tensor(1.0)}, storage_writer=tdcp.FileSystemWriter(str(path)), no_dist=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    with pytest.raises(InputError) as err:
        open_checkpoint(path)
    assert "'decoder.layers.scale' stacks 1 dim(s) of tensors but has shape []" in one_line(err)


def test_chunk_overlap_sweep_matches_all_pairs():
    grid = [((r * 4, c * 3), (4, 3)) for r in range(5) for c in range(7)]
    assert dcp.first_overlap(grid) is None
    assert dcp.first_overlap(grid + [((2, 5), (1, 1))]) is not None
    assert dcp.first_overlap([((0,), (0,)), ((0,), (4,))]) is None  # an empty chunk overlaps nothing
    assert dcp.first_overlap([((), ()), ((), ())]) == ((), ())  # two chunks of one scalar
    many = [((i, 0), (1, 8)) for i in range(20000)]  # all pairs would be 2e8 comparisons
    assert dcp.first_overlap(many) is None


@pytest.mark.parametrize("text,words", [
    (b"[1, 2]", "a JSON list, not an object"),
    (b"\xff\xfe garbage", "not valid JSON"),
    (b"[" * 100000, "not valid JSON"),
])
def test_mcore_metadata_json_is_checked(tmp_path, text, words):
    path = write_torch_dist(tmp_path / "ckpt")
    (path / "metadata.json").write_bytes(text)
    with pytest.raises(InputError) as err:
        detect(path)
    assert words in one_line(err)


# ------------------------------------------------------------------------- safetensors header


def craft(path: Path, header, data: bytes = b"", length: int | None = None, raw: bytes | None = None) -> Path:
    """A safetensors file from a header (a dict, or raw JSON bytes) and data."""
    text = raw if raw is not None else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header,data,extra,words", [
    ({"a": F32}, bytes(8), {}, None),
    ({"a": F32}, bytes(8), {"length": hf.MAX_HEADER + 1}, "corrupt safetensors header (claims 104857601 bytes"),
    ({"a": F32}, bytes(8), {"length": 2**63}, "corrupt safetensors header (claims"),
    (None, bytes(8), {"raw": b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": '
                             b'{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'}, "key 'a' appears twice"),
    (None, bytes(8), {"raw": b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}'},
     "key 'dtype' appears twice"),
    ([1, 2], b"", {}, "a JSON list, not an object"),
    (None, b"", {"raw": b"[" * 100000}, "corrupt safetensors header (not JSON)"),
    (None, b"", {"raw": b'{"a": ' + b"9" * 5000 + b"}"}, "corrupt safetensors header (not JSON)"),
    ({"__metadata__": {"format": 1}, "a": F32}, bytes(8), {}, "__metadata__ is not a map of strings"),
    ({"a": "F32"}, bytes(8), {}, "entry 'a': a JSON str, not an object"),
    ({"a": {**F32, "dtype": "F4"}}, bytes(8), {}, "'a' has dtype 'F4', which the harness does not read"),
    ({"a": {**F32, "dtype": ["F32"]}}, bytes(8), {}, "has dtype ['F32']"),
    ({"a": {**F32, "shape": ["2"]}}, bytes(8), {}, "shape ['2'] is not a list of non-negative integers"),
    ({"a": {**F32, "shape": [True, 2]}}, bytes(8), {}, "is not a list of non-negative integers"),
    ({"a": {**F32, "shape": [-2]}}, bytes(8), {}, "is not a list of non-negative integers"),
    ({"a": {**F32, "data_offsets": [-8, 0]}}, bytes(8), {}, "data_offsets [-8, 0] is not [begin, end]"),
    ({"a": {**F32, "data_offsets": [8, 0]}}, bytes(8), {}, "is not [begin, end] with 0 <= begin <= end"),
    ({"a": {**F32, "data_offsets": ["0", "8"]}}, bytes(8), {}, "data_offsets ['0', '8']"),
    ({"a": {**F32, "data_offsets": [0, 8, 16]}}, bytes(8), {}, "data_offsets [0, 8, 16]"),
    ({"a": {**F32, "data_offsets": [0.0, 8.0]}}, bytes(8), {}, "data_offsets [0.0, 8.0]"),
    ({"a": {**F32, "data_offsets": [0, 2**40]}}, bytes(8), {}, "truncated safetensors file: 'a' ends at byte"),
    ({"a": {**F32, "shape": [3]}}, bytes(8), {}, "'a' has 8 bytes for"),
    # 2**32 x 2**32 x 4 bytes wraps to 0 in int64: an exact product is needed
    ({"a": {**F32, "shape": [2**32, 2**32], "data_offsets": [0, 0]}, "b": F32}, bytes(8), {}, "'a' has 0 bytes for"),
    ({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, bytes(12), {}, "'b' (bytes 4-12) overlaps 'a'"),
    ({"a": F32, "b": {**F32, "data_offsets": [12, 20]}}, bytes(20), {}, "bytes 8-12 of the data belong to no tensor"),
    ({"a": F32}, bytes(12), {}, "the last 4 bytes of the file belong to no tensor"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_safetensors_header_check_refuses_what_it_is_for(tmp_path, header, data, extra, words):
    file = craft(tmp_path / "model.safetensors", header, data, **extra)
    if words is None:
        assert set(hf.read_header(file)) == {"a"}
        return
    with pytest.raises(InputError) as err:
        hf.HfCheckpoint(tmp_path)
    assert words in one_line(err)


def test_a_safetensors_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "x.safetensors")
    with pytest.raises(InputError) as err:
        hf.read_header(tmp_path / "x.safetensors")
    assert "a FIFO, not a regular file" in one_line(err)


def _index(path: Path, doc) -> Path:
    write_hf(path)
    (path / hf.INDEX_NAME).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


@pytest.mark.parametrize("doc,words", [
    ({"weight_map": {"a.weight": "model.safetensors", "b.bias": "model.safetensors"}}, None),
    ('{"weight_map": {"a.weight": "model.safetensors"}, "weight_map": {}}', "key 'weight_map' appears twice"),
    ('{"weight_map": {"a.weight": "model.safetensors", "a.weight": "model.safetensors"}}', "key 'a.weight' appears twice"),
    ({"weight_map": ["model.safetensors"]}, "no weight_map from tensor names to shard files"),
    ({"weight_map": {"a.weight": 3}}, "no weight_map from tensor names to shard files"),
    ([], "no weight_map"),
    ({"weight_map": {"a.weight": "../model.safetensors"}}, "names a shard outside the checkpoint folder ('../model.safetensors')"),
    ({"weight_map": {"a.weight": "/etc/hostname"}}, "names a shard outside the checkpoint folder ('/etc/hostname')"),
    ("not json", "not a valid safetensors index (not JSON)"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_index_check_refuses_what_it_is_for(tmp_path, doc, words):
    path = _index(tmp_path / "ckpt", doc)
    if words is None:
        assert set(hf.HfCheckpoint(path).specs()) == {"a.weight", "b.bias"}
        return
    with pytest.raises(InputError) as err:
        hf.HfCheckpoint(path)
    assert words in one_line(err)


# ------------------------------------------------------------------------ no other unpickling


def unsafe_loads(source: str) -> list[str]:
    """Calls in ``source`` that could unpickle a file with code in it: pickle's loaders,
    torch.load without ``weights_only=True``, and a DCP reader's own ``read_metadata``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        name = node.func.attr
        weights_only = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
        if (owner == "pickle" and name in ("load", "loads", "Unpickler")
                or owner == "torch" and name == "load" and not weights_only
                or name == "read_metadata" and owner != "dcp"):
            found.append(f"line {node.lineno}: {ast.unparse(node.func)}")
    return found


def test_the_harness_unpickles_nothing_but_through_dcp():
    offenders = {str(p.relative_to(workspace.REPO_ROOT)): bad for p in sorted((workspace.REPO_ROOT / "harness").rglob("*.py"))
                 if (bad := unsafe_loads(p.read_text()))}
    assert offenders == {}


def test_the_unpickling_guard_can_fail():
    assert unsafe_loads("import pickle, torch\npickle.load(f)\ntorch.load(p)\nreader.read_metadata()\n"
                        "torch.load(p, weights_only=True)\ndcp.read_metadata(p)\n") == [
        "line 2: pickle.load", "line 3: torch.load", "line 4: reader.read_metadata"]
