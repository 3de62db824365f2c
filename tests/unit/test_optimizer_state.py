"""The optimizer-state checks and the optimizer half of the key grammar, on hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from harness.checks import optimizer_state
from harness.formats import megatron_keys as keys

pytestmark = pytest.mark.cpu

FC1 = "decoder.layers.0.mlp.linear_fc1.weight"
NORM = "decoder.final_layernorm.weight"


class Reader:
    """A canonical-key reader over a dict, as harness.formats readers present a checkpoint."""

    def __init__(self, tensors):
        self.tensors_ = tensors

    def specs(self):
        return {k: (tuple(v.shape), str(v.dtype)) for k, v in self.tensors_.items()}

    def tensors(self, wanted):
        for key in wanted:
            yield key, self.tensors_[key]


def saved_state():
    gen = torch.Generator().manual_seed(3)
    params = {FC1: torch.randn(8, 4, generator=gen), NORM: torch.randn(4, generator=gen)}
    out = dict(params)
    for name, value in params.items():
        for moment, rule in optimizer_state.KNOWN_MOMENTS.items():
            out[keys.canonical_optimizer_key(moment, name)] = rule(value)
    return out


def test_a_checkpoint_that_keeps_the_rule_passes():
    result = optimizer_state.check_on_disk(Reader(saved_state()), {FC1, NORM})
    assert result.passed, result.summary


def test_halves_swapped_in_one_moment_only_fail():
    state = saved_state()
    key = keys.canonical_optimizer_key("exp_avg", FC1)
    w, v = state[key].chunk(2)
    state[key] = torch.cat([v, w])  # the model's halves are right; the optimizer's are not
    result = optimizer_state.check_on_disk(Reader(state), {FC1, NORM})
    assert not result.passed and "optimizer.state.exp_avg.decoder.layers.0.mlp.linear_fc1.weight: 32/32" in result.summary


def test_a_missing_an_extra_and_a_stale_moment_each_fail():
    for mutate, words in (
        (lambda s: s.pop(keys.canonical_optimizer_key("exp_avg_sq", NORM)), "exp_avg_sq.decoder.final_layernorm.weight: missing"),
        (lambda s: s.__setitem__(keys.canonical_optimizer_key("exp_avg", "decoder.ghost.weight"), torch.zeros(1)),
         "a moment of no parameter"),
        (lambda s: s[keys.canonical_optimizer_key("exp_avg", NORM)].zero_(), "4/4 elements differ"),
    ):
        state = saved_state()
        mutate(state)
        result = optimizer_state.check_on_disk(Reader(state), {FC1, NORM})
        assert not result.passed and words in result.summary, result.summary


def test_a_buffer_without_optimizer_state_is_not_asked_for_but_a_recorded_parameter_is():
    state = saved_state()
    state["decoder.layers.0.mlp.router.expert_bias"] = torch.zeros(4)  # a buffer: saved, not optimized
    assert optimizer_state.check_on_disk(Reader(state), {FC1, NORM}).passed
    result = optimizer_state.check_on_disk(Reader(state), {FC1, NORM, "decoder.layers.0.mlp.router.weight"})
    assert not result.passed and "the checkpoint has no such parameter" in result.summary


def test_optimizer_keys_go_through_the_same_grammar_as_model_keys():
    moment, parsed = keys.parse_fsdp_optimizer_key(
        "optimizer.state.module.module.module.decoder.layers.1.mlp.experts.linear_fc1.weight3_v.exp_avg_sq")
    assert moment == "exp_avg_sq" and parsed.part == "v" and parsed.depth == 3
    assert parsed.canonical == "decoder.layers.1.mlp.experts.3.linear_fc1.weight"
    assert keys.parse_fsdp_optimizer_key("optimizer.param_to_group_meta.module.x.weight.lr") is None
    assert keys.split_canonical_optimizer_key(keys.canonical_optimizer_key("exp_avg", FC1)) == ("exp_avg", FC1)
    assert keys.split_canonical_optimizer_key(FC1) is None
    assert keys.split_torch_dist_optimizer_key("optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight") == (
        "exp_avg", "decoder.layers.mlp.linear_fc1.weight")


@pytest.mark.parametrize("stored, param", [
    ("optimizer.param_to_group_meta.module.module.module.decoder.layers.1.mlp.router.weight.weight_decay",
     "decoder.layers.1.mlp.router.weight"),
    ("optimizer.param_to_group_meta.module.module.decoder.layers.0.self_attention.core_attention.softmax_offset.lr",
     "decoder.layers.0.self_attention.core_attention.softmax_offset"),
    ("optimizer.param_to_group_meta.module.decoder.layers.1.mlp.experts.linear_fc1.weight3.betas",
     "decoder.layers.1.mlp.experts.linear_fc1.weight3"),
])
def test_group_meta_names_the_parameter_by_the_longest_model_name(stored, param):
    params = {"decoder.layers.1.mlp.router.weight", "decoder.layers.0.self_attention.core_attention.softmax_offset",
              "decoder.layers.1.mlp.experts.linear_fc1.weight3", "decoder.layers.1.mlp.experts.linear_fc1.weight"}
    assert keys.fsdp_group_meta_param(stored, params) == param
