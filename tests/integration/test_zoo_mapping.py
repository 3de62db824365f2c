"""Every HF config value the bridge maps into the provider differs, in the zoo, from the default
Megatron would fall back to: otherwise a bridge that dropped that mapping would pass every case."""

from __future__ import annotations

import pytest

from harness.conversion import zoo_audit
from harness.matrix import checkpoint_builder, family_registry, model_spec

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def zoo_fields():
    specs = [model_spec.ModelSpec(f) for f in sorted(family_registry.families())]
    specs += [model_spec.ModelSpec(f, v) for f in sorted(family_registry.families()) for v in family_registry.families()[f].variants]
    return [field for spec in specs for field in zoo_audit.mapped_fields(spec, checkpoint_builder.materialize(spec))]


def test_the_bridge_maps_what_the_audit_enumerates(zoo_fields):
    mapped = {(f.hf_name, f.megatron_name) for f in zoo_fields}
    assert {("rms_norm_eps", "layernorm_epsilon"), ("num_experts_per_tok", "moe_router_topk"),
            ("num_key_value_heads", "num_query_groups"), ("rope_parameters.rope_theta", "rotary_base")} <= mapped


def test_no_mapped_zoo_value_equals_the_provider_default(zoo_fields):
    assert zoo_audit.untestable(zoo_fields) == []


def test_a_value_at_the_default_is_caught():
    """The seeded case: the eps the zoo used to have (1e-5 = Megatron's default)."""
    spec = model_spec.ModelSpec("llama", "eps", overrides=(("rms_norm_eps", 1e-5),))
    problems = zoo_audit.untestable(zoo_audit.mapped_fields(spec, checkpoint_builder.materialize(spec)))
    assert any("rms_norm_eps=1e-05 equals the default of layernorm_epsilon" in p for p in problems), problems


def test_an_architecture_flag_at_its_default_is_fine_only_if_another_family_flips_it():
    field = zoo_audit.MappedField("llama", "attention_bias", "add_qkv_bias", False, False)
    flipped = zoo_audit.MappedField("qwen2", "attention_bias", "add_qkv_bias", True, False)
    assert zoo_audit.untestable([field, flipped]) == []
    assert zoo_audit.untestable([field]) != []
