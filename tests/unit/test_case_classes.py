"""The issue-21 case classes: variants generated from the Bridge's tables and the HF config class."""

from harness.matrix import case_classes, family_registry, model_spec
from harness.matrix.cases import CaseSet, load_cases_once


def test_the_bridge_tables_are_read_from_its_source():
    mapping = dict(case_classes.bridge_config_mapping())
    assert mapping["tie_word_embeddings"] == "share_embeddings_and_output_weights"
    assert {"silu", "gelu", "relu2", "quick_gelu"} <= set(case_classes.activations())
    assert "fast_gelu" not in case_classes.activations()  # Megatron's name only: HF has no such activation


def test_every_mapped_boolean_flips_and_every_activation_appears_once():
    llama = model_spec.ModelSpec(family="llama")
    variants = case_classes.switch_variants(llama.hf_config, "LlamaConfig")
    assert variants["tie-word-embeddings-on"] == {"tie_word_embeddings": True}
    assert variants["attention-bias-on"] == {"attention_bias": True}
    assert variants["mlp-bias-on"] == {"mlp_bias": True}
    assert "act-silu" not in variants  # llama's own activation is the base case
    assert {f"act-{a}" for a in case_classes.activations() if a != "silu"} <= set(variants)


def test_the_other_value_is_generated_when_the_family_sets_a_switch():
    gpt_oss = model_spec.ModelSpec(family="gpt-oss")
    assert case_classes.switch_variants(gpt_oss.hf_config, "GptOssConfig")["attention-bias-off"] == {"attention_bias": False}


def test_a_short_window_is_generated_only_where_missing_and_is_active():
    assert case_classes.window_variants({"sliding_window": 16}, "MistralConfig") == {}
    assert case_classes.window_variants({}, "LlamaConfig") == {}  # no window field
    qwen2 = case_classes.window_variants({}, "Qwen2Config")["win-short"]
    assert qwen2["sliding_window"] < case_classes.TEST_SEQUENCE
    assert qwen2["use_sliding_window"] is True and qwen2["max_window_layers"] == 1


def test_every_class_has_cases_and_the_default_set_one_per_class():
    cases = load_cases_once()
    seen = {c.key: set() for c in case_classes.CLASSES}
    for case in cases.cases:
        for klass in case_classes.classes_of(case):
            seen[klass.key] |= case.sets
    missing = {key for key, sets in seen.items() if "default" not in sets}
    assert not missing, missing


def test_case_ids_of_generated_variants_are_stable():
    ids = set(load_cases_once().ids())
    assert "llama@act-gelu/tp1/memory/roundtrip" in ids
    assert "qwen2@win-short/tp1/memory/roundtrip" in ids
    assert "llama/tp1/hf/config-export" in ids


def test_the_run_page_counts_a_runs_cases_per_family_and_class():
    from harness.reporting.html.run_page import class_rows
    from harness.results import CaseResult

    cases = load_cases_once()
    results = [CaseResult("llama@act-gelu/tp1/memory/roundtrip", "pass"),
               CaseResult("llama/tp1/hf/config-export", "fail"),
               CaseResult("gone@nowhere/tp1/memory/roundtrip", "pass")]  # no longer declared: left out
    (llama,) = class_rows(results, cases)
    by_key = dict(zip((k.key for k in case_classes.CLASSES), llama.cells))
    assert (by_key["switches"].cases, by_key["switches"].passed) == (1, 1)
    assert (by_key["config-export"].cases, by_key["config-export"].passed) == (1, 0)
    assert by_key["repeated-export"].text == "1/1" and by_key["rope"].text == ""


def test_rope_types_come_from_the_bridge_and_need_plain_rope():
    llama = family_registry.get_family("llama")
    assert case_classes.bridge_rope_types(llama.architecture.module) >= {"yarn", "llama3", "linear"}
    variants = case_classes.rope_variants(model_spec.ModelSpec(family="llama").hf_config, "LlamaConfig", llama.architecture.module)
    assert variants["rope-llama3"]["rope_parameters"]["rope_type"] == "llama3"
    assert variants["rope-yarn"]["rope_parameters"]["original_max_position_embeddings"] == 64
    assert variants["rope-partial"]["rope_parameters"]["partial_rotary_factor"] == case_classes.PARTIAL_ROTARY
    gpt_oss = family_registry.get_family("gpt-oss")  # already YaRN: no further variants
    assert case_classes.rope_variants(model_spec.ModelSpec(family="gpt-oss").hf_config, "GptOssConfig", gpt_oss.architecture.module) == {}


def test_uneven_stages_are_part_of_the_layout_id_and_follow_megatron_core_rules():
    from harness.matrix.layouts import Layout, LayoutError

    first = Layout.parse("tp1-pp2-first1")
    assert first.id == "tp1-pp2-first1" and first.first == 1 and first.last is None
    assert first.violations({"num_hidden_layers": 3}) == []
    assert Layout.parse("tp1-pp2").violations({"num_hidden_layers": 3})  # 3 layers need an uneven split
    assert Layout.parse("tp1-pp2-vpp2-first2").violations({"num_hidden_layers": 3})  # 1 middle layer, vpp2
    assert Layout.parse("tp1-pp2-first3").violations({"num_hidden_layers": 3})  # nothing left for the last stage
    assert first.pipeline_split_kwargs() == {"num_layers_in_first_pipeline_stage": 1,
                                             "num_layers_in_last_pipeline_stage": None}
    assert "num_layers_in_first_pipeline_stage" not in first.megatron_kwargs()  # not a process-group size
    try:
        Layout.parse("tp1-first1")
    except LayoutError:
        pass
    else:
        raise AssertionError("a stage layer count without PP must be refused")


def test_hybrid_patterns_use_the_familys_two_layer_kinds():
    cfg = model_spec.ModelSpec(family="qwen3-next").hf_config
    variants = case_classes.hybrid_variants(cfg, "Qwen3NextConfig")
    assert variants["hyb-pairs"]["layer_types"] == ["linear_attention"] * 2 + ["full_attention"] * 2
    odd = variants["hyb-odd"]
    assert odd["num_hidden_layers"] % 3 and len(odd["layer_types"]) == odd["num_hidden_layers"]
    assert case_classes.hybrid_variants(model_spec.ModelSpec(family="llama").hf_config, "LlamaConfig") == {}
