"""The config-only export check (harness.checks.config_export) catches each kind of wrong field."""

from harness.checks import config_export

SOURCE = {"hidden_size": 64, "rms_norm_eps": 1e-5, "layer_types": ["sliding_attention", "full_attention"],
          "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
          "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "5.12.1"}


def test_identical_configs_pass_and_extra_fields_are_listed_not_failed():
    exported = dict(SOURCE, num_experts=None, transformers_version="other")
    result = config_export.compare(SOURCE, exported, written={"hidden_size": 64})
    assert result.passed, result.summary
    assert result.metrics["added"] == ["num_experts"]
    assert config_export.fingerprint(result) == {}


def test_a_dropped_field_falls_back_to_a_default_and_fails():
    exported = dict(SOURCE, rms_norm_eps=1e-6)
    result = config_export.compare(SOURCE, exported, written={})
    assert not result.passed
    assert "rms_norm_eps: exported 1e-06, source 1e-05" in result.summary
    assert list(config_export.fingerprint(result)) == ["rms_norm_eps"]


def test_nested_rope_fields_are_compared_field_by_field():
    exported = dict(SOURCE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})
    result = config_export.compare(SOURCE, exported, written={})
    assert [d["field"] for d in result.details] == ["rope_parameters.rope_theta"]


def test_a_wrong_layer_pattern_fails():
    exported = dict(SOURCE, layer_types=["sliding_attention", "sliding_attention"])
    assert [d["field"] for d in config_export.compare(SOURCE, exported, written={}).details] == ["layer_types"]


def test_token_ids_count_only_when_the_bridge_writes_them():
    exported = dict(SOURCE, bos_token_id=None, eos_token_id=200020)
    result = config_export.compare(SOURCE, exported, written={"eos_token_id": 200020})
    assert [d["field"] for d in result.details] == ["eos_token_id"]
    assert "bos_token_id" in result.metrics["not_compared"]


def test_the_fingerprint_changes_with_what_was_exported():
    one = config_export.compare(SOURCE, dict(SOURCE, hidden_size=32), written={})
    two = config_export.compare(SOURCE, dict(SOURCE, hidden_size=16), written={})
    assert config_export.fingerprint(one) != config_export.fingerprint(two)
