"""The Megatron key grammar (harness.formats.megatron_keys) on hand-written keys, right and wrong."""

from __future__ import annotations

import pytest

from harness.formats import megatron_keys as keys

pytestmark = pytest.mark.cpu

GROUPED = "module.decoder.layers.3.mlp.experts.linear_fc1.weight5"
SEQUENTIAL = "module.module.decoder.layers.3.mlp.experts.local_experts.5.linear_fc2.weight"


# ------------------------------------------------------------------------------- layer and expert numbers


@pytest.mark.parametrize("key, number", [
    ("decoder.layers.3.self_attention.linear_qkv.weight", 3),
    ("module.decoder.layers.12.mlp.linear_fc1.weight", 12),
    ("mtp.layers.0.transformer_layer.mlp.linear_fc1.weight", 0),
    # The first ``.layers.<i>.`` counts: 3, not the 7 further on.
    ("decoder.layers.3.block.layers.7.weight", 3),
    ("embedding.word_embeddings.weight", None),
    ("decoder.final_layernorm.weight", None),
    ("decoder.layers.mlp.linear_fc1.weight", None),  # a stacked torch_dist key has no layer number
    ("layers.3.weight", None),  # no segment before ``layers``
])
def test_layer_number(key, number):
    assert keys.layer_number(key) == number


def test_renumber_layer_replaces_the_first_layer_number_only():
    assert keys.renumber_layer("module.decoder.layers.3.mlp.experts.linear_fc1.weight3", 4) == \
        "module.decoder.layers.4.mlp.experts.linear_fc1.weight3"
    assert keys.renumber_layer("decoder.layers.9.block.layers.9.weight", 10) == "decoder.layers.10.block.layers.9.weight"
    assert keys.renumber_layer("decoder.final_layernorm.weight", 4) == "decoder.final_layernorm.weight"
    # A wrong layer number stays visible: renumbering is not a no-op on a numbered key.
    assert keys.renumber_layer("decoder.layers.1.mlp.linear_fc1.weight", 2) != "decoder.layers.1.mlp.linear_fc1.weight"


@pytest.mark.parametrize("key, number", [
    (GROUPED, 5),
    ("decoder.layers.0.mlp.experts.linear_fc2.bias13", 13),
    (SEQUENTIAL, 5),
    ("decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight", 0),
    ("decoder.layers.3.mlp.experts.5.linear_fc1.weight", None),  # canonical naming, not stored
    ("decoder.layers.3.mlp.shared_experts.linear_fc1.weight", None),
    ("decoder.layers.3.mlp.linear_fc1.weight", None),
    ("decoder.layers.3.mlp.router.weight", None),
    ("decoder.layers.3.mlp.experts.linear_fc1.weight", None),  # grouped, but no expert number
])
def test_expert_number(key, number):
    assert keys.expert_number(key) == number


def test_renumber_expert_touches_the_expert_number_and_nothing_else():
    assert keys.renumber_expert(GROUPED, 1) == "module.decoder.layers.3.mlp.experts.linear_fc1.weight1"
    assert keys.renumber_expert(SEQUENTIAL, 13) == \
        "module.module.decoder.layers.3.mlp.experts.local_experts.13.linear_fc2.weight"
    # The layer number (3, as is the expert's number in this seeded key) is left alone.
    assert keys.renumber_expert("decoder.layers.3.mlp.experts.linear_fc1.weight3", 0) == \
        "decoder.layers.3.mlp.experts.linear_fc1.weight0"
    assert keys.renumber_expert("decoder.layers.3.mlp.experts.local_experts.3.linear_fc1.weight", 0) == \
        "decoder.layers.3.mlp.experts.local_experts.0.linear_fc1.weight"
    for other in ("decoder.layers.3.mlp.linear_fc1.weight", "decoder.layers.3.mlp.experts.3.linear_fc1.weight"):
        assert keys.renumber_expert(other, 0) == other


def test_expert_numbers_round_trip_through_the_fsdp_key_parse():
    parsed = keys.parse_fsdp_key("model.module.decoder.layers.1.mlp.experts.linear_fc1.weight7_w")
    assert parsed.expert == keys.expert_number(parsed.base) == 7
    assert keys.canonical(keys.renumber_expert(parsed.base, 2)) == "decoder.layers.1.mlp.experts.2.linear_fc1.weight"


# ------------------------------------------------------------------------------- split parts


def test_swiglu_suffixes_are_how_the_halves_are_stored():
    assert keys.SWIGLU_SUFFIXES == ("_w", "_v")
    w, v = keys.SWIGLU_SUFFIXES
    for half, part in ((w, "w"), (v, "v")):
        parsed = keys.parse_fsdp_key(f"model.module.decoder.layers.0.mlp.linear_fc1.weight{half}")
        assert parsed.part == part and parsed.base == "decoder.layers.0.mlp.linear_fc1.weight"
    # A seeded wrong suffix is not a half: the key stays whole.
    assert keys.parse_fsdp_key("model.module.decoder.layers.0.mlp.linear_fc1.weight_x").part == ""


@pytest.mark.parametrize("key, projection", [
    ("decoder.layers.0.self_attention.in_proj.weight", "in_proj"),
    ("decoder.layers.0.self_attention.in_proj.weight.beta", "in_proj"),
    ("optimizer.state.exp_avg.decoder.layers.0.self_attention.in_proj.weight", "in_proj"),
    ("decoder.layers.0.self_attention.conv1d.weight", "conv1d"),
    ("decoder.layers.0.self_attention.conv1d.bias.value", "conv1d"),
    ("decoder.layers.0.self_attention.in_proj.layer_norm_weight", ""),  # a norm fused into in_proj: not split
    ("decoder.layers.0.self_attention.in_proj.weight.gamma", ""),  # no such GDN part
    ("decoder.layers.0.self_attention.linear_qkv.weight", ""),
    ("decoder.layers.0.mlp.linear_fc1.weight_w", ""),
])
def test_gdn_projection(key, projection):
    assert keys.gdn_projection(key) == projection


def test_join_order_follows_the_projection():
    assert keys.join_order("decoder.layers.0.self_attention.in_proj.weight") == keys.GDN_IN_PROJ_PARTS
    assert keys.join_order("optimizer.state.exp_avg_sq.decoder.layers.0.self_attention.conv1d.bias") == \
        keys.GDN_CONV1D_PARTS
    assert keys.join_order("decoder.layers.0.mlp.experts.3.linear_fc1.weight") == keys.SWIGLU_PARTS


# ------------------------------------------------------------------------------- wrapper prefixes


def test_fsdp_model_key_is_what_the_parser_reads_back():
    stored = keys.fsdp_model_key("decoder.layers.0.mlp.linear_fc1.weight_w")
    assert stored == "model.module.decoder.layers.0.mlp.linear_fc1.weight_w"  # as real Megatron-FSDP saves
    parsed = keys.parse_fsdp_key(stored)
    assert parsed.depth == 1 + keys.FSDP_MODEL_DEPTH and parsed.part == "w"
    assert keys.fsdp_model_key("decoder.final_layernorm.weight", 0) == "model.decoder.final_layernorm.weight"
    # A seeded extra wrapper is seen as one: the depth is counted, not assumed.
    assert keys.parse_fsdp_key(keys.fsdp_model_key("decoder.final_layernorm.weight", 2)).depth == 3


def test_wrapper_prefix_matches_strip_wrappers_and_the_optimizer_depth():
    assert keys.wrapper_prefix(0) == ""
    for depth in (1, 2, 3):
        assert keys.strip_wrappers(keys.wrapper_prefix(depth) + "decoder.final_layernorm.weight") == (
            "decoder.final_layernorm.weight", depth)
        assert keys.optimizer_key_depth(keys.fsdp_optimizer_key("decoder.final_layernorm.weight", depth, "exp_avg")) == depth


# ------------------------------------------------------------------------------- renaming rows


@pytest.mark.parametrize("row, stored, canonical", [
    (keys.GROUPED_EXPERT, "decoder.layers.1.mlp.experts.linear_fc1.weight7",
     "decoder.layers.1.mlp.experts.7.linear_fc1.weight"),
    (keys.GROUPED_EXPERT, "decoder.layers.1.mlp.experts.linear_fc2.bias0", "decoder.layers.1.mlp.experts.0.linear_fc2.bias"),
    (keys.SEQUENTIAL_EXPERT, "decoder.layers.1.mlp.experts.local_experts.7.linear_fc1.weight",
     "decoder.layers.1.mlp.experts.7.linear_fc1.weight"),
    (keys.NORM_ROWS[0], "decoder.layers.2.input_layernorm.weight", "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"),
    (keys.NORM_ROWS[1], "decoder.layers.2.pre_mlp_layernorm.weight", "decoder.layers.2.mlp.linear_fc1.layer_norm_weight"),
])
def test_a_row_reads_and_writes_both_ways(row, stored, canonical):
    assert row.to_canonical(stored) == canonical
    assert row.to_stored(canonical) == stored


def test_rows_read_only_their_own_keys():
    # Seeded wrong keys: canonical naming on the stored side, an fc3, a missing expert number.
    for wrong in ("decoder.layers.1.mlp.experts.7.linear_fc1.weight", "decoder.layers.1.mlp.experts.linear_fc3.weight7",
                  "decoder.layers.1.mlp.experts.linear_fc1.weight", "decoder.layers.1.mlp.shared_experts.linear_fc1.weight3"):
        assert keys.GROUPED_EXPERT.to_canonical(wrong) is None, wrong
        assert keys.canonical_expert(wrong) == wrong
    assert keys.GROUPED_EXPERT.to_stored("decoder.layers.1.mlp.experts.linear_fc1.weight7") is None
    assert keys.NORM_ROWS[0].to_canonical("decoder.layers.2.input_layernorm.bias") is None
    # A field can be overridden on the way (the wrong, EP-local numbering the writer can produce).
    assert keys.GROUPED_EXPERT.to_stored("decoder.layers.1.mlp.experts.7.linear_fc1.weight", e=1) == \
        "decoder.layers.1.mlp.experts.linear_fc1.weight1"
    assert keys.fsdp_stored_name("decoder.layers.1.mlp.experts.7.linear_fc1.weight", "v", local_experts=4) == \
        "decoder.layers.1.mlp.experts.linear_fc1.weight3_v"
