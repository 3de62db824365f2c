"""``harness diff A B``: compare two checkpoints tensor by tensor, in bounded memory.

Keys are the readers' canonical keys, so a torch_dist and an fsdp_dtensor checkpoint of the same
model compare directly. HF and Megatron checkpoints use different names and layouts (QKV
interleaving, fused gate/up): comparing across them needs a conversion, which is what the case
matrix does; ``diff`` refuses that pair with a clear message.

Memory: tensors are streamed in lockstep from both sides (one at a time). Two HF checkpoints are
compared on raw bytes, window by window (two mapped windows at a time, zero-copy), which is
bitwise-exact and runs at page-cache speed; a window whose bytes differ is decoded with numpy to
count differing elements and their max abs diff. This path never imports torch (whose import
alone costs ~640 MB RSS with the CUDA build).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.errors import InputError
from harness.formats.base import Checkpoint
from harness.formats.hf import HfCheckpoint
from harness.results import CheckResult, TensorSetComparison

CHUNK_BYTES = 64 * 1024 * 1024


@dataclass
class DiffStats:
    tensors: int = 0
    bytes_compared: int = 0


def comparable(a: Checkpoint, b: Checkpoint) -> None:
    if (a.format == "hf") != (b.format == "hf"):
        raise InputError(
            f"cannot diff {a.format} against {b.format} tensor by tensor: HF and Megatron names and layouts "
            "differ (QKV interleaving, fused gate/up); export the Megatron side to HF first, or run a case"
        )


def _as_float(window, dtype: str):
    """A window's values as a float64-comparable numpy array (None for dtypes numpy lacks)."""
    import numpy as np

    if dtype == "bfloat16":  # bf16 = the high half of an fp32
        return (np.frombuffer(window, np.uint16).astype(np.uint32) << 16).view(np.float32)
    kinds = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "int64": np.int64,
             "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
    return np.frombuffer(window, kinds[dtype]) if dtype in kinds else None


def compare_raw(a: HfCheckpoint, b: HfCheckpoint, key: str) -> dict[str, Any]:
    """Bitwise comparison of one tensor's bytes; decodes only windows that differ."""
    import numpy as np

    spec = a.entry(key).spec
    differing, worst, decodable = 0, 0.0, True
    for wa, wb in zip(a.windows(key, CHUNK_BYTES), b.windows(key, CHUNK_BYTES)):
        words = len(wa) // 8 * 8
        same = np.array_equal(np.frombuffer(wa[:words], np.uint64), np.frombuffer(wb[:words], np.uint64))
        if same and wa[words:] == wb[words:]:
            continue
        va, vb = _as_float(wa, spec.dtype), _as_float(wb, spec.dtype)
        if va is None:
            decodable = False
            differing += int(np.count_nonzero(np.frombuffer(wa, np.uint8) != np.frombuffer(wb, np.uint8)))
        else:
            ne = va != vb
            if np.issubdtype(va.dtype, np.floating):
                ne |= np.isnan(va) != np.isnan(vb)
            differing += int(np.count_nonzero(ne))
            with np.errstate(invalid="ignore", over="ignore"):  # decode only the differing elements
                delta = np.abs(va[ne].astype(np.float64) - vb[ne].astype(np.float64))
            if delta.size:
                worst = float("inf") if np.isnan(delta).any() else max(worst, float(delta.max()))
            del delta, ne
        del va, vb
    row: dict[str, Any] = {"key": key, "shape": list(spec.shape), "dtype": spec.dtype, "status": "ok"}
    if differing:
        unit = "elements" if decodable else "bytes"
        total = int(np.prod(spec.shape)) if decodable else spec.nbytes
        row["status"] = f"values differ in {differing}/{total} {unit}"
        if decodable:
            row["max_abs_diff"] = worst
    else:
        row["max_abs_diff"] = 0.0
    return row


def diff(a: Checkpoint, b: Checkpoint, *, name: str = "diff") -> tuple[CheckResult, DiffStats]:
    """A (the reference) against B, tensor by tensor: ``missing`` keys are only in A, ``extra``
    keys only in B (the same result shape as the ``tensors`` check)."""
    comparable(a, b)
    specs_a, specs_b = a.specs(), b.specs()
    common = [k for k in specs_a if k in specs_b]
    result = TensorSetComparison(
        compared=len(common),
        missing=sorted(set(specs_a) - set(specs_b)),
        extra=sorted(set(specs_b) - set(specs_a)),
        missing_label="only in A",
        extra_label="only in B",
    )
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
            result.rows.append({"key": key, "shape": list(sa.shape), "dtype": sa.dtype, "status": "; ".join(problems)})

    if isinstance(a, HfCheckpoint) and isinstance(b, HfCheckpoint):
        for key in same_layout:
            stats.tensors += 1
            stats.bytes_compared += 2 * specs_a[key].nbytes
            row = compare_raw(a, b, key)
            if row["status"] != "ok":
                result.rows.append(row)
    elif same_layout:
        from harness.checks.tensors import tensor_row  # DCP formats decode through torch anyway

        for (ka, ta), (kb, tb) in zip(a.tensors(same_layout), b.tensors(same_layout)):
            assert ka == kb
            stats.tensors += 1
            stats.bytes_compared += 2 * specs_a[ka].nbytes
            row = tensor_row(ka, ta, tb)
            if row["status"] != "ok":
                result.rows.append(row)
            del ta, tb
    return result.check(name, bytes_compared=stats.bytes_compared), stats
