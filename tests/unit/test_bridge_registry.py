"""Families come from the Bridge's registry: a bridge added upstream is a new family with cases,
with no change to the harness; every registered architecture is either a family or says why not."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from harness.matrix import bridge_registry, cases, family_registry, hf_source, model_spec, shrink

pytestmark = pytest.mark.cpu

NEW_BRIDGE = '''
from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge
from megatron.core.models.gpt.gpt_model import GPTModel

_NAME = "Qwen2MoeForCausalLM"


@MegatronModelBridge.register_bridge(source=_NAME, target=GPTModel, model_type="qwen2_moe")
class TomorrowsBridge(MegatronModelBridge):
    pass
'''


@pytest.fixture
def bridge_tree_with_a_new_bridge(tmp_path, monkeypatch):
    """A Megatron-Bridge source tree: the installed models, plus one bridge upstream added today
    (for an architecture transformers has and the pinned Bridge does not register)."""
    installed = bridge_registry.bridge_models_root()
    models = tmp_path / "Megatron-Bridge" / "src" / "megatron" / "bridge" / "models"
    models.mkdir(parents=True)
    for child in installed.iterdir():
        if child.name != "__pycache__":
            (models / child.name).symlink_to(child)
    (models / "tomorrow").mkdir()
    (models / "tomorrow" / "tomorrow_bridge.py").write_text(NEW_BRIDGE)
    monkeypatch.setenv("HARNESS_MEGATRON_BRIDGE", str(tmp_path / "Megatron-Bridge"))
    yield models
    monkeypatch.delenv("HARNESS_MEGATRON_BRIDGE")


def test_a_bridge_added_upstream_is_a_new_family_with_cases(bridge_tree_with_a_new_bridge):
    assert "Qwen2MoeForCausalLM" not in {a.architecture for a in bridge_registry._registered(
        Path(os.path.realpath(bridge_tree_with_a_new_bridge / "llama")).parent)}
    arch = next(a for a in bridge_registry.registered_architectures() if a.architecture == "Qwen2MoeForCausalLM")
    assert (arch.bridge_class, arch.target, arch.kind, arch.hf_config_class) == (
        "TomorrowsBridge", "GPTModel", bridge_registry.TEXT_LM, "Qwen2MoeConfig")
    family = family_registry.families()["qwen2-moe"]
    assert family.hf_architecture == "Qwen2MoeForCausalLM"
    cfg = family.config
    assert cfg["num_experts"] > cfg["num_experts_per_tok"] > 2 and cfg["hidden_size"] == 64
    ids = cases.load_cases().ids()
    assert {"qwen2-moe/tp1/memory/roundtrip", "qwen2-moe/tp1/torch_dist/roundtrip", "qwen2-moe/tp1-ep2/memory/roundtrip",
            "qwen2-moe@sq-expert/tp1/memory/roundtrip"} <= set(ids)


def test_without_the_new_bridge_there_is_no_such_family():
    assert "qwen2-moe" not in family_registry.families()


def test_the_registry_reads_decorators_calls_and_string_constants(tmp_path):
    file = tmp_path / "b.py"
    file.write_text(textwrap.dedent('''
        NAME = "FooForCausalLM"
        @MegatronModelBridge.register_bridge(source=NAME, target=GPTModel, model_type="foo")
        class FooBridge: pass
        @MegatronModelBridge.register_bridge(source=BarForCausalLM, target=HybridModel)
        class BarBridge: pass
        try:
            Baz = MegatronModelBridge.register_bridge(source="BazForConditionalGeneration", target=BazModel)(BazBridge)
        except Exception:
            pass
        """@MegatronModelBridge.register_bridge(source=InADocstring, target=GPTModel)"""
    '''))
    assert sorted(bridge_registry._registrations(file)) == [
        ("BarForCausalLM", "BarBridge", "HybridModel", ""),
        ("BazForConditionalGeneration", "BazBridge", "BazModel", ""),
        ("FooForCausalLM", "FooBridge", "GPTModel", "foo"),
    ]


def test_every_registered_architecture_is_a_family_or_says_why_not():
    families = {f.hf_architecture for f in family_registry.families().values()}
    for arch in bridge_registry.registered_architectures():
        if arch.kind == bridge_registry.TEXT_LM:
            assert arch.architecture in families and not arch.why_not_covered
        else:
            assert arch.architecture not in families and arch.why_not_covered
    kinds = {a.architecture: a.kind for a in bridge_registry.registered_architectures()}
    assert kinds["LlamaForCausalLM"] == bridge_registry.TEXT_LM
    assert kinds["Gemma3ForConditionalGeneration"] == bridge_registry.MULTIMODAL  # a causal LM to transformers, a VLM here
    assert kinds["KimiK2ForCausalLM"] == bridge_registry.REMOTE_CODE


def test_family_overrides_name_registered_architectures_and_real_fields():
    """families.yaml holds only exceptions: for an architecture the Bridge registers, in fields its
    config class has (a typo would silently be an extra attribute)."""
    registered = {a.architecture: a for a in bridge_registry.text_lms()}
    for arch, entry in family_registry.family_entries().items():
        assert arch in registered, f"families.yaml: {arch} is not registered by the Bridge"
        fields = hf_source.config_fields(registered[arch].hf_config_class)
        for name in entry.get("config") or {}:
            assert name in fields, f"families.yaml: {arch}.config.{name} is not a field of its config class"
        for name in entry.get("extra_config") or {}:
            assert name not in fields, f"families.yaml: {arch}.extra_config.{name} is a field: put it under config"


@pytest.mark.parametrize("family", sorted(family_registry.families()))
def test_the_shrink_rules_make_bugs_visible_in_every_family(family):
    spec = model_spec.ModelSpec(family)
    cfg = spec.hf_config
    assert cfg["vocab_size"] % 128, "vocab must not be a multiple of Megatron's padding"
    assert cfg["hidden_size"] == shrink.RULES["hidden_size"] and cfg.get("intermediate_size", 0) != cfg["hidden_size"]
    if not spec.has_mla:
        assert cfg["num_attention_heads"] > cfg["num_key_value_heads"], "GQA: heads > kv heads"
    if spec.is_moe:
        top_k = cfg.get("num_experts_per_tok") or cfg.get("moe_k") or cfg.get("top_k_experts") or 0
        assert spec.num_experts > top_k > 2, "experts > top-k > 2"
        assert cfg.get("moe_intermediate_size", 0) != cfg["hidden_size"]


def test_the_megatron_bridge_flag_selects_the_tree_whose_families_are_listed(bridge_tree_with_a_new_bridge, capsys,
                                                                           monkeypatch):
    from harness.cli import main

    tree = os.environ["HARNESS_MEGATRON_BRIDGE"]
    monkeypatch.delenv("HARNESS_MEGATRON_BRIDGE")
    assert main(["list", "--ids-only", "-k", "qwen2-moe/tp1/memory"]) == 0
    assert capsys.readouterr().out == ""  # the installed Bridge has no such family
    assert main(["list", "--ids-only", "-k", "qwen2-moe/tp1/memory", "--megatron-bridge", tree]) == 0
    assert capsys.readouterr().out.split() == ["qwen2-moe/tp1/memory/roundtrip"]
    assert os.environ["HARNESS_MEGATRON_BRIDGE"] == tree  # and every rank it launches reads the same tree
