"""`harness diff` on checkpoints nobody here wrote (issue 25), end to end through the CLI.

A crafted ``.metadata`` whose pickle runs a shell command gives exit 2 and one line naming the
class it asked for, and the command never runs; a crafted ``common.pt`` is never read; a few
representative damaged inputs from the fuzz test (tests/unit/test_reader_fuzz.py) give exit 2 and
one line, write nothing, and the run folder (also the working directory) is left as it was.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import workspace
from harness.formats import fsdp_writer

pytestmark = pytest.mark.cpu


class Payload:
    """A pickle that runs a shell command when loaded: it leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_fsdp(path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    return fsdp_writer.write_fsdp_dtensor(path, {"embedding.word_embeddings.weight": torch.randn(8, 4, generator=gen),
                                                 "decoder.final_layernorm.weight": torch.randn(4, generator=gen)})


def write_hf(path: Path) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"a.weight": torch.arange(12.0).reshape(3, 4), "b.bias": torch.ones(5)}, path / "model.safetensors",
              metadata={"format": "pt"})
    return path


def tree(path: Path) -> dict[str, bytes | str]:
    """Every entry under ``path``, links not followed: its bytes, or where a link points."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            out[str(full.relative_to(path))] = (os.readlink(full) if full.is_symlink()
                                                else b"" if full.is_dir() or not full.is_file() else full.read_bytes())
    return out


def harness_diff(run: Path, a: Path, b: Path) -> subprocess.CompletedProcess:
    """``harness diff A B`` with the run folder as the working directory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(workspace.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "harness", "diff", str(a), str(b)], capture_output=True, text=True,
                          cwd=run, env=env, timeout=120)


def assert_one_line_exit_2(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("harness: error: ") and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_crafted_metadata_runs_nothing_and_is_one_line_exit_2(tmp_path):
    """The issue's report: this ran the command, then said "unreadable DCP metadata (AttributeError)".
    (The payload inside a genuine metadata, and other forms: tests/unit/test_safe_readers.py.)"""
    marker = tmp_path / "the-command-ran"
    run = tmp_path / "run"
    evil = write_fsdp(run / "evil")
    (evil / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    before = tree(run)
    r = harness_diff(run, evil, evil)
    assert not marker.exists(), "the command in the pickle ran"
    assert_one_line_exit_2(r, "refers to 'posix.system', which no DCP metadata holds")
    assert tree(run) == before, "something was written to the run folder"


def test_a_crafted_common_pt_is_never_read(tmp_path):
    """torch_dist folders carry ``common.pt`` (a torch.save pickle); diff compares tensors without it."""
    import torch.distributed.checkpoint as tdcp

    marker = tmp_path / "the-command-ran"
    run = tmp_path / "run"
    ckpt = run / "iter_0000001"
    tdcp.save({"embedding.word_embeddings.weight": torch.ones(4, 2), "decoder.layers.mlp.linear_fc2.weight": torch.ones(2, 3, 2),
               "decoder.layers.self_attention.linear_proj._extra_state/shard_0_2": io.BytesIO(b"state")},
              storage_writer=tdcp.FileSystemWriter(str(ckpt)), no_dist=True)
    (ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "common_backend": "torch"}))
    (ckpt / "common.pt").write_bytes(pickle.dumps(Payload(marker)))
    r = harness_diff(run, ckpt, ckpt)
    assert r.returncode == 0 and "EQUAL: 3/3 tensors bitwise equal" in r.stdout, r.stdout + r.stderr
    assert not marker.exists(), "common.pt was unpickled"


def _flip_metadata(ckpt: Path, run: Path) -> None:
    data = bytearray((ckpt / ".metadata").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / ".metadata").write_bytes(bytes(data))


def _huge_header_length(ckpt: Path, run: Path) -> None:
    file = ckpt / "model.safetensors"
    file.write_bytes(struct.pack("<Q", 2**64 - 1) + file.read_bytes()[8:])


def _repeated_key(ckpt: Path, run: Path) -> None:
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    text = (json.dumps(header)[:-1] + ', "a.weight": ' + json.dumps(header["a.weight"]) + "}").encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def _metadata_to_fifo(ckpt: Path, run: Path) -> None:
    (ckpt / ".metadata").unlink()
    os.mkfifo(run / "fifo")
    (ckpt / ".metadata").symlink_to(run / "fifo")


@pytest.mark.parametrize("make,damage,words", [
    (write_fsdp, _flip_metadata, "DCP metadata"),
    (write_hf, _huge_header_length, "corrupt safetensors header (claims 18446744073709551615 bytes"),
    (write_hf, _repeated_key, "key 'a.weight' appears twice"),
    (write_fsdp, _metadata_to_fifo, "a FIFO, not a regular file"),
], ids=["flipped-metadata-byte", "huge-header-length", "repeated-key", "metadata-links-to-a-fifo"])
def test_representative_damage_is_one_line_exit_2_and_writes_nothing(tmp_path, make, damage, words):
    run = tmp_path / "run"
    ckpt = make(run / "ckpt")
    intact = make(tmp_path / "intact")
    damage(ckpt, run)
    before = tree(run)
    r = harness_diff(run, ckpt, intact)
    assert_one_line_exit_2(r, words)
    assert tree(run) == before, "the input or the run folder was written to"
