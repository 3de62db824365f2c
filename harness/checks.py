"""The comparisons the harness trusts, and nothing else.

* ``compare_tensors``: key set, shape, dtype and *bitwise* value equality of two named tensor
  collections. Weight round trips do no arithmetic, so any tolerance here would hide real bugs
  (a row swap between two N(0, 0.1) rows easily passes ``allclose(atol=1e-1)``).
* ``logit_parity``: two forward passes of the same weights through different code (HF vs
  Megatron). Here arithmetic does happen, so a tolerance is allowed and justified below.

Every check returns a ``CheckResult``; tests/test_checks*.py seed a fault for each one and assert
that it fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Mapping

import torch

from harness.results import CheckResult, tensor_set_summary

# How many per-tensor rows a CheckResult keeps in full; the rest are summarised in counts.
MAX_DETAIL_ROWS = 2000


# --------------------------------------------------------------------------- tensor equality


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| in float64 (0.0 for empty tensors); only defined for equal shapes."""
    if a.numel() == 0:
        return 0.0
    return float((a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max())


def tensor_row(name: str, expected: torch.Tensor, actual: torch.Tensor) -> dict[str, Any]:
    """Compare one tensor pair; the row says what is wrong, or ``ok``."""
    row: dict[str, Any] = {
        "key": name,
        "shape": list(expected.shape),
        "dtype": str(expected.dtype).removeprefix("torch."),
    }
    problems = []
    if tuple(expected.shape) != tuple(actual.shape):
        problems.append(f"shape {list(actual.shape)} != {list(expected.shape)}")
    if expected.dtype != actual.dtype:
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
) -> CheckResult:
    """Bitwise comparison of ``actual`` against ``expected``.

    ``expected`` may be a lazy iterator (e.g. streamed from safetensors), so only one expected
    tensor is materialised at a time; ``actual`` is what the conversion produced.
    """
    items: Iterator[tuple[str, torch.Tensor]] = iter(
        expected.items() if isinstance(expected, Mapping) else expected
    )
    seen: set[str] = set()
    missing: list[str] = []
    rows: list[dict[str, Any]] = []
    bad = 0
    worst = 0.0
    naive_ok = True
    for key, exp in items:
        seen.add(key)
        if key not in actual:
            missing.append(key)
            continue
        naive_ok = naive_ok and naive_bridge_close(exp, actual[key])
        row = tensor_row(key, exp, actual[key])
        diff = row.get("max_abs_diff")
        if diff is not None:
            worst = max(worst, diff if diff == diff else float("inf"))  # NaN counts as worst
        if row["status"] != "ok":
            bad += 1
        if row["status"] != "ok" or len(rows) < MAX_DETAIL_ROWS:
            rows.append(row)
    extra = sorted(set(actual) - seen)
    missing.sort()
    duplicates = sorted(set(duplicates))
    compared = len(seen) - len(missing)
    passed, summary = tensor_set_summary(compared, [r for r in rows if r["status"] != "ok"], missing, extra, duplicates)
    return CheckResult(
        name=name,
        passed=passed,
        summary=summary,
        metrics={
            "compared": compared,
            "mismatched": bad,
            "missing": missing,
            "extra": extra,
            "duplicates": duplicates,
            "max_abs_diff": worst,
            # What Megatron-Bridge's round-trip example would have said (for comparison only).
            "naive_bridge_check": "pass" if naive_ok and not extra else "fail",
        },
        details=rows,
    )


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
    import hashlib

    flat = tensor.detach().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return [list(tensor.shape), str(tensor.dtype).removeprefix("torch."), hashlib.sha256(data).hexdigest()]


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list[Any]]:
    return {key: tensor_digest(t) for key, t in sorted(tensors, key=lambda kv: kv[0])}


def generation_parity(reference: list[list[int]], candidate: list[list[int]]) -> CheckResult:
    """Greedy continuations of the original and of the exported checkpoint must be identical.
    (Bitwise weights make this redundant for the tensors; it is here for what the tensors do not
    cover: the exported config.json and tokenizer, as a deployment engineer would check them.)"""
    for i, (ref, cand) in enumerate(zip(reference, candidate)):
        if ref != cand:
            step = next((j for j, (a, b) in enumerate(zip(ref, cand)) if a != b), min(len(ref), len(cand)))
            return CheckResult(
                name="generation", passed=False,
                summary=f"prompt {i}: greedy tokens diverge at step {step} (original {ref[step:step + 3]}, "
                        f"exported {cand[step:step + 3]})",
                metrics={"reference": reference, "candidate": candidate, "prompt": i, "step": step},
            )
    if len(reference) != len(candidate):
        return CheckResult("generation", False, f"{len(candidate)} continuations for {len(reference)} prompts")
    n = sum(len(r) for r in reference)
    return CheckResult(name="generation", passed=True,
                       summary=f"{n}/{n} greedy tokens identical ({len(reference)} prompts, exported checkpoint reloaded)",
                       metrics={"reference": reference, "candidate": candidate})


# --------------------------------------------------------------------------- logit parity


@dataclass(frozen=True)
class LogitTolerance:
    """Bounds for fp32 logit parity between two implementations of the same weights.

    Measured noise floor (this stack, fp32, CPU/gloo, zoo models, batch 3 x 24, 41 forward-pass
    cases of the full CPU set): max |d logit| is exactly 0 at TP1 dense (same accumulation order
    as HF), 1.2e-6 for MoE, and up to 2.5e-6 at TP>1 (partial sums reduced across ranks in a
    different order), i.e. ~10 fp32 ulps at logit magnitude ~2. KL(HF || Megatron) (nats, mean
    over tokens) stays <= 1.0e-13.

    Tolerances: max |d| <= 1e-5 (4x the worst floor) and KL <= 1e-11 (100x the worst floor).
    A +1e-3 change to a single weight element moves the logits by ~4e-4 (40x the tolerance) and
    KL to ~9e-10 (90x), see tests/test_seeded_faults.py.
    """

    max_abs: float = 1e-5
    kl: float = 1e-11


FP32_LOGITS = LogitTolerance()

# GPU lane, PROVISIONAL: no GPU was lent to the session that wrote these, so they are not yet
# measured. Reasoning: TE's fused fp32 kernels reorder accumulation like TP does on CPU, with
# TF32 disabled (GpuRuntime) the floor should stay within 10x of the CPU one -> 1e-4. bf16 has
# eps 7.8e-3; a bf16 forward against HF's fp32 one differs by ~1e-2 at logit magnitude ~2,
# torchtitan's bf16 shard comparison uses max|d| < 2e-2 -> 5e-2 and KL 1e-3. Replace with
# measured floors (x margin) the first time the GPU lane runs.
GPU_FP32_LOGITS = LogitTolerance(max_abs=1e-4, kl=1e-9)
BF16_LOGITS = LogitTolerance(max_abs=5e-2, kl=1e-3)


def logit_tolerance(*, gpu: bool, bf16: bool) -> LogitTolerance:
    if bf16:
        return BF16_LOGITS
    return GPU_FP32_LOGITS if gpu else FP32_LOGITS


def logit_metrics(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """KL, max/mean abs diff and top-1 agreement, torchtitan-style, over [batch, seq, vocab]."""
    ref = reference.detach().to(torch.float64)
    cand = candidate.detach().to(torch.float64)
    diff = (ref - cand).abs()
    log_p = torch.log_softmax(ref, dim=-1)
    log_q = torch.log_softmax(cand, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    top1 = (ref.argmax(-1) == cand.argmax(-1)).to(torch.float64).mean()
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float(top1),
        "kl": float(kl),
    }


def logit_parity(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    *,
    tolerance: LogitTolerance = FP32_LOGITS,
    name: str = "logits",
) -> CheckResult:
    if reference.shape != candidate.shape:
        return CheckResult(
            name=name,
            passed=False,
            summary=f"logit shapes differ: {list(candidate.shape)} vs {list(reference.shape)}",
        )
    m = logit_metrics(reference, candidate)
    finite = all(v == v for v in m.values())  # NaN-safe
    passed = finite and m["max_abs_diff"] <= tolerance.max_abs and m["kl"] <= tolerance.kl
    summary = (
        f"max|d|={m['max_abs_diff']:.2e} (tol {tolerance.max_abs:.0e}) "
        f"mean|d|={m['mean_abs_diff']:.2e} top1={m['top1_agreement']:.3f} "
        f"KL={m['kl']:.2e} (tol {tolerance.kl:.0e})"
    )
    metrics: dict[str, Any] = dict(m)
    metrics["tolerance"] = asdict(tolerance)
    return CheckResult(name=name, passed=passed, summary=summary, metrics=metrics)
