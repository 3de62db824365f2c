"""``harness diff A B``: compare two checkpoints tensor by tensor, in bounded memory.

Keys are the readers' canonical keys, so a torch_dist and an fsdp_dtensor checkpoint of the same
model compare directly. HF and Megatron checkpoints use different names and layouts (QKV
interleaving, fused gate/up): comparing across them needs a conversion, which is what the case
matrix does; ``diff`` refuses that pair with a clear message.

Memory: tensors are streamed in lockstep from both sides (one at a time). Two HF checkpoints are
compared on raw bytes in fixed-size chunks (``os.pread`` into two reused buffers), which is both
bitwise-exact and close to disk/page-cache read speed; values are decoded only for a tensor whose
bytes differ, to report its max abs diff.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.checks import CheckResult, tensor_row
from harness.formats.base import Checkpoint, InputError
from harness.formats.hf import HfCheckpoint

CHUNK_BYTES = 64 * 1024 * 1024
_MEGATRON = {"torch_dist", "fsdp_dtensor"}


@dataclass
class DiffStats:
    tensors: int = 0
    bytes_compared: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)


def comparable(a: Checkpoint, b: Checkpoint) -> None:
    if (a.format == "hf") != (b.format == "hf"):
        raise InputError(
            f"cannot diff {a.format} against {b.format} tensor by tensor: HF and Megatron names and layouts "
            "differ (QKV interleaving, fused gate/up); export the Megatron side to HF first, or run a case"
        )


def _bytes_equal(a: HfCheckpoint, b: HfCheckpoint, key: str, buffers: tuple[bytearray, bytearray]) -> bool:
    import numpy as np

    for ca, cb in zip(a.chunks(key, CHUNK_BYTES, buffers[0]), b.chunks(key, CHUNK_BYTES, buffers[1])):
        if len(ca) != len(cb):
            return False
        words = len(ca) // 8 * 8
        if words and not np.array_equal(np.frombuffer(ca[:words], np.uint64), np.frombuffer(cb[:words], np.uint64)):
            return False
        if ca[words:] != cb[words:]:
            return False
    return True


def diff(a: Checkpoint, b: Checkpoint, *, name: str = "diff") -> tuple[CheckResult, DiffStats]:
    comparable(a, b)
    specs_a, specs_b = a.specs(), b.specs()
    missing = sorted(set(specs_a) - set(specs_b))  # in A, not in B
    extra = sorted(set(specs_b) - set(specs_a))
    common = [k for k in specs_a if k in specs_b]
    stats = DiffStats()
    same_layout = [k for k in common if specs_a[k] == specs_b[k]]
    for key in common:
        if specs_a[key] != specs_b[key]:
            sa, sb = specs_a[key], specs_b[key]
            problems = []
            if sa.shape != sb.shape:
                problems.append(f"shape {list(sb.shape)} != {list(sa.shape)}")
            if sa.dtype != sb.dtype:
                problems.append(f"dtype {sb.dtype} != {sa.dtype}")
            stats.rows.append({"key": key, "shape": list(sa.shape), "dtype": sa.dtype, "status": "; ".join(problems)})

    if isinstance(a, HfCheckpoint) and isinstance(b, HfCheckpoint):
        buffers = (bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES))
        differing = []
        for key in same_layout:
            stats.tensors += 1
            stats.bytes_compared += 2 * specs_a[key].nbytes
            if not _bytes_equal(a, b, key, buffers):
                differing.append(key)
        del buffers
        value_keys = differing  # decode only what differs
    else:
        value_keys = same_layout
    for (ka, ta), (kb, tb) in zip(a.tensors(value_keys), b.tensors(value_keys)):
        assert ka == kb
        if not isinstance(a, HfCheckpoint):
            stats.tensors += 1
            stats.bytes_compared += 2 * specs_a[ka].nbytes
        row = tensor_row(ka, ta, tb)
        if row["status"] != "ok":
            stats.rows.append(row)
        del ta, tb

    bad = len(stats.rows)
    passed = not missing and not extra and bad == 0
    parts = []
    if missing:
        parts.append(f"{len(missing)} only in A ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})")
    if extra:
        parts.append(f"{len(extra)} only in B ({', '.join(extra[:3])}{', …' if len(extra) > 3 else ''})")
    if bad:
        first = stats.rows[0]
        parts.append(f"{bad}/{len(common)} differ (first: {first['key']}: {first['status']})")
    summary = "; ".join(parts) if parts else f"{len(common)}/{len(common)} tensors bitwise equal"
    worst = max((r.get("max_abs_diff", 0.0) for r in stats.rows), default=0.0)
    result = CheckResult(
        name=name, passed=passed, summary=summary,
        metrics={"compared": len(common), "mismatched": bad, "only_in_a": missing, "only_in_b": extra,
                 "max_abs_diff": worst, "bytes_compared": stats.bytes_compared},
        details=stats.rows,
    )
    return result, stats
