"""Unit tests of the comparisons on synthetic tensors: each check must catch its seeded fault."""

import pytest
import torch

from harness.checks.logits import FP32_LOGITS, logit_parity
from harness.checks.tensors import compare_tensors

pytestmark = pytest.mark.cpu


@pytest.fixture
def reference():
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 4, generator=gen),
        "mlp.gate_up.weight": torch.randn(6, 4, generator=gen),
        "norm.weight": 1 + 0.1 * torch.randn(4, generator=gen),
    }


def clone(sd):
    return {k: v.clone() for k, v in sd.items()}


def test_identical_passes(reference):
    result = compare_tensors(reference, clone(reference))
    assert result.passed, result.summary
    assert result.metrics["compared"] == 3 and result.metrics["max_abs_diff"] == 0.0


def test_swapped_rows_fail(reference):
    actual = clone(reference)
    actual["mlp.gate_up.weight"][[0, 3]] = actual["mlp.gate_up.weight"][[3, 0]]
    result = compare_tensors(reference, actual)
    assert not result.passed
    assert "mlp.gate_up.weight" in result.summary
    assert result.metrics["mismatched"] == 1 and result.metrics["max_abs_diff"] > 0


def test_dropped_key_fails_and_is_named(reference):
    actual = clone(reference)
    del actual["norm.weight"]
    result = compare_tensors(reference, actual)
    assert not result.passed
    assert result.metrics["missing"] == ["norm.weight"]


def test_extra_key_fails_and_is_named(reference):
    actual = clone(reference)
    actual["lm_head.weight"] = actual["embed.weight"].clone()
    result = compare_tensors(reference, actual)
    assert not result.passed and result.metrics["extra"] == ["lm_head.weight"]


def test_one_element_plus_1e3_fails(reference):
    actual = clone(reference)
    actual["embed.weight"][7, 2] += 1e-3
    result = compare_tensors(reference, actual)
    assert not result.passed
    assert result.metrics["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)


def test_one_ulp_fails(reference):
    """Bitwise means bitwise: the smallest representable change is caught."""
    actual = clone(reference)
    x = actual["norm.weight"]
    x[0] = torch.nextafter(x[0], torch.tensor(10.0))
    assert not compare_tensors(reference, actual).passed


def test_dtype_change_fails_even_if_values_round_trip(reference):
    actual = clone(reference)
    actual["norm.weight"] = actual["norm.weight"].to(torch.float64)
    result = compare_tensors(reference, actual)
    assert not result.passed and "dtype" in result.summary


def test_shape_change_fails(reference):
    actual = clone(reference)
    actual["embed.weight"] = actual["embed.weight"].t().contiguous()
    result = compare_tensors(reference, actual)
    assert not result.passed and "shape" in result.summary


def test_nan_fails(reference):
    actual = clone(reference)
    actual["embed.weight"][0, 0] = float("nan")
    assert not compare_tensors(reference, actual).passed


def test_duplicates_fail(reference):
    result = compare_tensors(reference, clone(reference), duplicates=["mlp.gate_up.weight"])
    assert not result.passed and "twice" in result.summary


def test_streamed_expected_is_accepted(reference):
    result = compare_tensors(iter(sorted(reference.items())), clone(reference))
    assert result.passed


def make_logits(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 250, generator=gen)


def test_logits_within_noise_floor_pass():
    ref = make_logits()
    noisy = ref + 1e-7 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    result = logit_parity(ref, noisy)
    assert result.passed, result.summary
    assert result.metrics["top1_agreement"] == 1.0


def test_logits_beyond_tolerance_fail():
    ref = make_logits()
    bad = ref.clone()
    bad[1, 3, 17] += 10 * FP32_LOGITS.max_abs
    result = logit_parity(ref, bad)
    assert not result.passed
    assert result.metrics["max_abs_diff"] == pytest.approx(10 * FP32_LOGITS.max_abs, rel=1e-3)


def test_logits_nan_fail():
    ref = make_logits()
    bad = ref.clone()
    bad[0, 0, 0] = float("nan")
    assert not logit_parity(ref, bad).passed


def test_logits_shape_mismatch_fails():
    ref = make_logits()
    assert not logit_parity(ref, ref[..., :-6]).passed


def test_kl_is_zero_for_identical_and_positive_otherwise():
    ref = make_logits()
    same = logit_parity(ref, ref.clone())
    assert same.metrics["kl"] == 0.0
    shifted = ref.clone()
    shifted[..., 0] += 1.0
    assert logit_parity(ref, shifted).metrics["kl"] > 1e-4


def test_tied_embeddings_consistent():
    from harness.checks.tensors import tied_embeddings

    e = torch.randn(10, 4)
    assert tied_embeddings(True, True, {"model.embed_tokens.weight": e}).passed
    assert tied_embeddings(True, True, {"model.embed_tokens.weight": e, "lm_head.weight": e.clone()}).passed
    assert tied_embeddings(False, False, {"model.embed_tokens.weight": e, "lm_head.weight": e + 1}).passed


@pytest.mark.parametrize(
    "tied,shares,keys,words",
    [
        (True, False, ["model.embed_tokens.weight"], "share_embeddings_and_output_weights=False"),
        (False, True, ["model.embed_tokens.weight", "lm_head.weight"], "tie_word_embeddings=False"),
        (False, False, ["model.embed_tokens.weight"], "without lm_head.weight"),
    ],
)
def test_tied_embeddings_broken(tied, shares, keys, words):
    from harness.checks.tensors import tied_embeddings

    exported = {k: torch.randn(10, 4) for k in keys}
    result = tied_embeddings(tied, shares, exported)
    assert not result.passed and words in result.summary


def test_tied_head_that_differs_fails():
    from harness.checks.tensors import tied_embeddings

    e = torch.randn(10, 4)
    head = e.clone()
    head[3, 1] += 1e-3
    result = tied_embeddings(True, True, {"model.embed_tokens.weight": e, "lm_head.weight": head})
    assert not result.passed and "differs" in result.summary


def test_each_lane_and_dtype_has_its_own_measured_tolerance():
    from harness.checks.logits import BF16_LOGITS, BF16_MOE_LOGITS, GPU_FP32_LOGITS, logit_tolerance
    from harness.matrix.model_spec import ModelSpec

    assert logit_tolerance(ModelSpec("llama"), "cpu") == FP32_LOGITS
    assert logit_tolerance(ModelSpec("llama"), "gpu").max_abs == pytest.approx(1e-5)
    assert logit_tolerance(ModelSpec("deepseek-v3"), "gpu").max_abs > 10 * logit_tolerance(ModelSpec("llama"), "gpu").max_abs
    assert logit_tolerance(ModelSpec.parse("llama@bf16"), "gpu") == BF16_LOGITS
    assert logit_tolerance(ModelSpec.parse("qwen3-moe@bf16"), "gpu") == BF16_MOE_LOGITS
    assert set(GPU_FP32_LOGITS) >= {"llama", "qwen2", "qwen3", "qwen3-moe", "gemma2", "deepseek-v3"}


def test_bf16_moe_parity_tolerates_a_routing_flip_but_not_a_shifted_distribution():
    """One flipped router decision moves a few logits a lot (max|d| ~0.7) and the rest not at all;
    a real bug (e.g. swapped router rows) moves them all (mean|d| ~0.09)."""
    from harness.checks.logits import BF16_LOGITS, BF16_MOE_LOGITS

    ref = make_logits()
    flip = ref.clone()
    flip[0, 5, :] += 0.25 * torch.randn(250, generator=torch.Generator().manual_seed(3))  # max|d| ~0.7
    assert logit_parity(ref, flip, tolerance=BF16_MOE_LOGITS).passed
    assert not logit_parity(ref, flip, tolerance=BF16_LOGITS).passed  # dense bf16 gates max|d|
    shifted = ref + 0.1 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    result = logit_parity(ref, shifted, tolerance=BF16_MOE_LOGITS)
    assert not result.passed and "max|d|" in result.summary and "(not gated)" in result.summary


def test_bf16_contract_a_wider_export_with_exactly_the_source_values_is_reported_not_failed(reference):
    bf16 = {k: v.to(torch.bfloat16) for k, v in reference.items()}
    widened = {k: v.to(torch.float32) for k, v in bf16.items()}
    assert not compare_tensors(bf16, widened).passed  # without the contract: dtype differs
    result = compare_tensors(bf16, widened, widening_ok=True)
    assert result.passed and "exported as float32" in result.summary and len(result.metrics["widened"]) == 3
    nudged = {k: v.clone() for k, v in widened.items()}
    nudged["norm.weight"][1] += 1e-3  # not a bf16 value any more: a real change
    result = compare_tensors(bf16, nudged, widening_ok=True)
    assert not result.passed and "norm.weight" in result.summary


def test_a_family_with_a_higher_bf16_floor_gets_twice_its_floor_and_no_more():
    import torch

    from harness.checks import logits
    from harness.matrix.model_spec import ModelSpec

    assert logits.logit_tolerance(ModelSpec.parse("llama@bf16"), "cpu") == logits.BF16_LOGITS
    gemma = logits.logit_tolerance(ModelSpec.parse("gemma@bf16"), "cpu")
    top, _, kl = logits.BF16_FLOORS["gemma"]
    assert gemma.max_abs == 2 * top and gemma.kl == 2 * kl
    ref = torch.randn(2, 5, 50)
    for scale, ok in ((1.5, True), (2.5, False)):  # a shift of 1.5x / 2.5x the floor on one logit
        cand = ref.clone()
        cand[0, 0, 0] += scale * top
        assert logits.logit_parity(ref, cand, tolerance=gemma).passed is ok
    moe = logits.logit_tolerance(ModelSpec.parse("qwen3-next@bf16"), "cpu")
    assert moe.max_abs is None and moe.kl == 2 * logits.BF16_FLOORS["qwen3-next"][2]
