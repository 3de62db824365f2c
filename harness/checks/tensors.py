"""Bitwise tensor equality: the check of every weight round trip.

``compare_tensors``: key set, shape, dtype and *bitwise* value equality of two named tensor
collections. Weight round trips do no arithmetic, so any tolerance here would hide real bugs (a
row swap between two N(0, 0.1) rows easily passes ``allclose(atol=1e-1)``). Also here: the tie
check (a tied model must stay tied, an untied one keep its head) and the per-tensor digests that
golden/ pins.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Iterator, Mapping

import torch

from harness.results import CheckResult, TensorSetComparison

# How many per-tensor rows a CheckResult keeps in full; the rest are summarised in counts.
MAX_DETAIL_ROWS = 2000


# --------------------------------------------------------------------------- tensor equality


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| in float64 (0.0 for empty tensors); only defined for equal shapes."""
    if a.numel() == 0:
        return 0.0
    return float((a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max())


def exactly_widened(expected: torch.Tensor, actual: torch.Tensor) -> bool:
    """``actual`` is ``expected`` in a wider floating dtype, value for value (an exact upcast)."""
    return (expected.is_floating_point() and actual.is_floating_point()
            and actual.element_size() > expected.element_size() and tuple(expected.shape) == tuple(actual.shape)
            and torch.equal(expected.to(actual.dtype), actual))


def tensor_row(name: str, expected: torch.Tensor, actual: torch.Tensor, *, widening_ok: bool = False) -> dict[str, Any]:
    """Compare one tensor pair; the row says what is wrong, or ``ok``.

    ``widening_ok`` (the bf16 contract): an export in a wider float dtype whose values are exactly
    the source's is ``ok``, and the row records ``widened_to``. Any value change still fails.
    """
    row: dict[str, Any] = {
        "key": name,
        "shape": list(expected.shape),
        "dtype": str(expected.dtype).removeprefix("torch."),
    }
    problems = []
    if tuple(expected.shape) != tuple(actual.shape):
        problems.append(f"shape {list(actual.shape)} != {list(expected.shape)}")
    if expected.dtype != actual.dtype:
        if widening_ok and exactly_widened(expected, actual):
            row["widened_to"] = str(actual.dtype).removeprefix("torch.")
            row.update(max_abs_diff=0.0, status="ok")
            return row
        problems.append(f"dtype {str(actual.dtype).removeprefix('torch.')} != {row['dtype']}")
    if not problems:
        # Bitwise: same dtype and shape, so torch.equal compares every element exactly.
        # (NaN != NaN, so a NaN anywhere is reported as a value mismatch, as it should be.)
        equal = torch.equal(expected, actual)
        row["max_abs_diff"] = 0.0 if equal else max_abs_diff(expected, actual)
        if not equal:
            ne = (expected != actual) | torch.isnan(actual)
            problems.append(f"values differ in {int(ne.sum())}/{expected.numel()} elements")
    elif tuple(expected.shape) == tuple(actual.shape):
        row["max_abs_diff"] = max_abs_diff(expected, actual)
    row["status"] = "ok" if not problems else "; ".join(problems)
    return row


NAIVE_ATOL, NAIVE_RTOL = 1e-1, 1e-5


def naive_bridge_close(expected: torch.Tensor, actual: torch.Tensor) -> bool:
    """The check of examples/conversion/hf_megatron_roundtrip_multi_gpu.py: allclose(atol=0.1,
    rtol=1e-5) on each exported tensor, in fp32. It iterates the *exported* names, so a missing
    tensor goes unnoticed; an extra one raises (KeyError) and counts as caught. Never gates."""
    if tuple(expected.shape) != tuple(actual.shape):
        return False
    return bool(torch.allclose(expected.float(), actual.float(), atol=NAIVE_ATOL, rtol=NAIVE_RTOL))


def compare_tensors(
    expected: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    actual: Mapping[str, torch.Tensor],
    *,
    name: str = "tensors",
    duplicates: Iterable[str] = (),
    widening_ok: bool = False,
) -> CheckResult:
    """Bitwise comparison of ``actual`` against ``expected``.

    ``expected`` may be a lazy iterator (e.g. streamed from safetensors), so only one expected
    tensor is materialised at a time; ``actual`` is what the conversion produced.

    ``widening_ok`` is the bf16 contract of ``@bf16`` cases: the source checkpoint is bf16 and every
    exported value must be bitwise that bf16 value; an export in a wider dtype (Megatron-FSDP
    keeps fp32 main weights) is reported (``widened``, and in the summary), not failed.
    """
    items: Iterator[tuple[str, torch.Tensor]] = iter(
        expected.items() if isinstance(expected, Mapping) else expected
    )
    seen: set[str] = set()
    result = TensorSetComparison()
    naive_ok = True
    for key, exp in items:
        seen.add(key)
        if key not in actual:
            result.missing.append(key)
            continue
        naive_ok = naive_ok and naive_bridge_close(exp, actual[key])
        row = tensor_row(key, exp, actual[key], widening_ok=widening_ok)
        if row["status"] != "ok" or len(result.rows) < MAX_DETAIL_ROWS:
            result.rows.append(row)
    result.extra = sorted(set(actual) - seen)
    result.missing.sort()
    result.duplicates = sorted(set(duplicates))
    result.compared = len(seen) - len(result.missing)
    widened = sorted({r["widened_to"] for r in result.rows if "widened_to" in r})
    check = result.check(name, naive_bridge_check="pass" if naive_ok and not result.extra else "fail",
                         widened=[r["key"] for r in result.rows if "widened_to" in r])
    if widened and check.passed:
        check.summary += f" (exported as {', '.join(widened)}: {len(check.metrics['widened'])} tensors, values exactly the source's)"
    # naive_bridge_check: what Megatron-Bridge's round-trip example would have said (comparison only).
    return check


def tied_embeddings(
    tied_in_hf: bool,
    megatron_shares: bool,
    exported: Mapping[str, torch.Tensor],
    *,
    embed_key: str = "model.embed_tokens.weight",
    head_key: str = "lm_head.weight",
) -> CheckResult:
    """The tie itself, not just the tensors: a tied model must stay tied through Megatron and
    export (HF writes no ``lm_head`` for it), and an untied one must keep its own head."""
    problems = []
    if tied_in_hf != megatron_shares:
        problems.append(
            f"HF tie_word_embeddings={tied_in_hf} but Megatron share_embeddings_and_output_weights={megatron_shares}"
        )
    if tied_in_hf and head_key in exported and embed_key in exported:
        if not torch.equal(exported[head_key], exported[embed_key]):
            problems.append(f"tied model exported a {head_key} that differs from {embed_key}")
    if not tied_in_hf and head_key not in exported:
        problems.append(f"untied model exported without {head_key}")
    state = "tied" if tied_in_hf else "untied"
    return CheckResult(
        name="tied-embeddings",
        passed=not problems,
        summary="; ".join(problems) if problems else f"{state} in HF, Megatron and the export",
        metrics={"tied_in_hf": tied_in_hf, "megatron_shares": megatron_shares},
    )


def tensor_digest(tensor: torch.Tensor) -> list[Any]:
    """``[shape, dtype, sha256]`` of a tensor's bytes: the golden fingerprint of one tensor."""
    flat = tensor.detach().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return [list(tensor.shape), str(tensor.dtype).removeprefix("torch."), hashlib.sha256(data).hexdigest()]


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list[Any]]:
    return {key: tensor_digest(t) for key, t in sorted(tensors, key=lambda kv: kv[0])}


