"""Forward-pass logit parity: two implementations of the same weights (HF vs Megatron).

Here arithmetic does happen, so a tolerance is allowed; each one below is justified by the
measured noise floor of its lane and dtype, with the margin over it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from harness.matrix.model_spec import ModelSpec
from harness.results import CheckResult
from harness.matrix.lanes import GPU


@dataclass(frozen=True)
class LogitTolerance:
    """Bounds for logit parity between two implementations of the same weights. ``None``: the
    number is reported but does not gate (see the bf16 MoE tolerance for why)."""

    max_abs: float | None
    kl: float
    mean_abs: float | None = None

    def gates(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# CPU lane, fp32 (gloo, local spec). Measured floor (zoo models, batch 3 x 24, the 41 forward-pass
# cases of the full CPU set): max|d| exactly 0 at TP1 dense (same accumulation order as HF),
# 1.2e-6 for MoE, 1.4e-6 for gpt-oss, up to 2.5e-6 at TP>1 (partial sums reduced across ranks in
# another order): ~10 fp32 ulps at logit magnitude ~2. KL(HF || Megatron) (nats, mean over tokens)
# <= 1.0e-13. Tolerance: max|d| 1e-5 (4x the worst floor), KL 1e-11 (100x). A +1e-3 change to one
# weight element moves the logits by ~4e-4 (40x the tolerance) and KL to ~9e-10 (90x):
# tests/integration/test_seeded_faults.py.
FP32_LOGITS = LogitTolerance(max_abs=1e-5, kl=1e-11)
# CPU lane, fp32, Gated DeltaNet layers (Qwen3-Next, Qwen3.5): the chunked delta rule accumulates
# exponentiated gate sums and a triangular solve per chunk, in another order in megatron-core's
# torch_chunk_gated_delta_rule than in HF's torch fallback. Measured floor (TE spec, tp1, batch 3 x
# 24): qwen3-next 1.25e-5, qwen3-5-moe 9.4e-6, qwen3-5 6.0e-6; KL <= 1.1e-12. Tolerance: max|d|
# 5e-5 (4x the worst), KL 1e-10 (~100x).
FP32_GDN_LOGITS = LogitTolerance(max_abs=5e-5, kl=1e-10)


def _gpu_fp32(floor: float, margin: float) -> LogitTolerance:
    """max|d| = floor x margin. KL was not measured apart on the GPU: KL <= Var(d)/2 <= 2 max|d|^2
    for small d (second-order expansion of KL between softmaxes), so 2 x tol^2 is the KL the
    max|d| bound already implies; it gates only a gross distribution shift with small max|d|."""
    tol = floor * margin
    return LogitTolerance(max_abs=tol, kl=2 * tol * tol)


# GPU lane, fp32, TF32 off (NVIDIA_TF32_OVERRIDE=0), TE layer spec, world size 1. Floors measured
# on one H100 80GB with megatron-core 0.19.2, TE 2.20.2 and torch 2.11.0+cu130 (with TF32 left on,
# every family sat at 2.7e-3 to 5.0e-3: harness/runtimes/gpu.py, item 2): llama 2.4e-6, qwen2
# 2.0e-6, qwen3 2.1e-6, qwen3-moe 2.3e-6, gemma2 1.2e-5 (soft-capping, (1 + w) norms), deepseek-v3
# 5.1e-5 (MLA: ~20x dense, its absorbed low-rank projections reorder the sums). Margin 4x, as on CPU.
GPU_FP32_LOGITS: dict[str, LogitTolerance] = {
    "llama": _gpu_fp32(2.5e-6, 4), "qwen2": _gpu_fp32(2.5e-6, 4), "qwen3": _gpu_fp32(2.5e-6, 4),
    "qwen3-moe": _gpu_fp32(2.5e-6, 4), "gemma2": _gpu_fp32(1.2e-5, 4), "deepseek-v3": _gpu_fp32(5.1e-5, 4),
    # NOT MEASURED on a GPU yet (these families never ran a forward there); each assumes the floor
    # of its nearest measured relative and must be replaced by a measurement:
    "gpt-oss": _gpu_fp32(2.5e-6, 4),  # dense-attention MoE like qwen3-moe (CPU floor 1.4e-6)
    "gemma3": _gpu_fp32(1.2e-5, 4),  # gemma2's norms and GeGLU
    # flash-linear-attention's Triton kernels run their dots in TF32 whatever the environment says
    # (fla/ops/gated_delta_rule/chunk_fwd.py): the TF32 floor measured for dense models, 5.0e-3.
    "qwen3-next": _gpu_fp32(5.0e-3, 4),
}
GPU_FP32_DEFAULT = _gpu_fp32(2.5e-6, 4)

# bf16 (Megatron in bf16, HF reference in fp32 on the same bf16 weights). Floor measured as HF
# bf16 vs HF fp32 on CPU, 40 batches (llama@bf16: max|d| 0.069, mean 0.0067, KL 3.8e-5), to be
# re-measured on the GPU lane. Dense: max|d| 0.15 and KL 1e-4, ~2x the floor; top-1 is reported
# but not gated (it dips to 0.93 from bf16 noise alone).
BF16_LOGITS = LogitTolerance(max_abs=0.15, kl=1e-4)
# bf16 MoE: bf16 noise in the hidden state flips near-tied router decisions (qwen3-moe@bf16: 0.47%
# of top-k decisions over 40 batches; one flip alone gives max|d| 0.73, KL 7.2e-4, which is what
# the H100 run saw: 0.74, 7.6e-4). A flip moves max|d| without being a bug, so max|d| does not
# gate; mean|d| and KL do, half-way (log scale) between the worst flip batch (mean 0.023, KL
# 2.8e-3) and the smallest gross bug measured (router rows swapped: mean 0.086, KL 8.4e-3).
# Subtler bugs are left to the fp32 cases and the bitwise tensor check.
BF16_MOE_LOGITS = LogitTolerance(max_abs=None, mean_abs=0.045, kl=5e-3)


# bf16 floors that exceed the ones above, per family: benchmarks/bench_bf16_floor.py, HF's forward in
# bf16 vs in fp32 on the family's @bf16 weights, worst of 40 batches (CPU): (max|d|, mean|d|, KL).
# (1 + w) norms, soft-capping and sqrt(hidden) embedding scales (Gemma, Nemotron) and Gated
# DeltaNet's recurrence (Qwen3.5, Qwen3-Next) carry bf16 rounding further than a Llama does
# (llama: 0.060, 0.0071, 4.3e-5). Such a family's tolerance is twice its floor, the margin the
# defaults above keep over theirs.
BF16_FLOORS: dict[str, tuple[float, float, float]] = {
    "gemma": (0.197, 0.0174, 2.59e-4), "gemma2": (0.353, 0.0213, 4.29e-4), "nemotron": (0.214, 0.0144, 2.09e-4),
    "qwen3-5": (0.500, 0.0234, 6.47e-4), "qwen3-5-moe": (4.58, 0.0765, 1.80e-2), "qwen3-next": (2.53, 0.0514, 6.28e-3),
}


def _bf16(model: ModelSpec) -> LogitTolerance:
    base = BF16_MOE_LOGITS if model.is_moe else BF16_LOGITS
    if model.family not in BF16_FLOORS:
        return base
    top, mean, kl = (2 * v for v in BF16_FLOORS[model.family])
    if model.is_moe:
        return LogitTolerance(max_abs=None, mean_abs=max(base.mean_abs, mean), kl=max(base.kl, kl))
    return LogitTolerance(max_abs=max(base.max_abs, top), kl=max(base.kl, kl))


def logit_tolerance(model: ModelSpec, lane: str) -> LogitTolerance:
    """The tolerance of ``model`` on ``lane`` (each justified above)."""
    if model.bf16:
        return _bf16(model)
    if lane == GPU:
        return GPU_FP32_LOGITS.get(model.family, GPU_FP32_DEFAULT)
    return FP32_GDN_LOGITS if model.has_gdn else FP32_LOGITS


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
    measured = {"max_abs": m["max_abs_diff"], "mean_abs": m["mean_abs_diff"], "kl": m["kl"]}
    passed = finite and all(measured[k] <= bound for k, bound in tolerance.gates().items())

    def bound(key: str) -> str:
        value = getattr(tolerance, key)
        return f" (tol {value:.2g})" if value is not None else " (not gated)"

    summary = (
        f"max|d|={m['max_abs_diff']:.2e}{bound('max_abs')} "
        f"mean|d|={m['mean_abs_diff']:.2e}{bound('mean_abs') if tolerance.mean_abs is not None else ''} "
        f"top1={m['top1_agreement']:.3f} KL={m['kl']:.2e}{bound('kl')}"
    )
    metrics: dict[str, Any] = dict(m)
    metrics["tolerance"] = tolerance.gates()
    return CheckResult(name=name, passed=passed, summary=summary, metrics=metrics)
