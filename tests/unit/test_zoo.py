"""Tiny models are deterministic to the byte and initialised so that bugs show."""

import hashlib
from unittest import mock

import pytest
import torch

from harness.matrix import checkpoint_builder, family_registry, model_spec
from harness.formats import hf as hf_format

pytestmark = pytest.mark.cpu


def digest_dir(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("family", sorted(family_registry.families()))
def test_same_seed_gives_byte_identical_files(family, tmp_path):
    spec = model_spec.ModelSpec(family=family)
    a = digest_dir(checkpoint_builder.build(spec, tmp_path / "a"))
    b = digest_dir(checkpoint_builder.build(spec, tmp_path / "b"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(a)
    assert a == b


def test_different_seed_gives_different_weights(tmp_path):
    a = checkpoint_builder.build(model_spec.ModelSpec(family="llama", seed=1), tmp_path / "a")
    b = checkpoint_builder.build(model_spec.ModelSpec(family="llama", seed=2), tmp_path / "b")
    assert digest_dir(a)["model.safetensors"] != digest_dir(b)["model.safetensors"]
    assert digest_dir(a)["config.json"] == digest_dir(b)["config.json"]


@pytest.mark.parametrize("family", sorted(family_registry.families()))
def test_every_parameter_is_redrawn(family, tmp_path):
    """No norm left at 1, no bias left at 0, no two tensors equal: a swap between any two shows."""
    path = checkpoint_builder.build(model_spec.ModelSpec(family=family), tmp_path / "m")
    seen = []
    for key, tensor in hf_format.iter_tensors(path):
        assert not torch.all(tensor == 1), f"{key} is all ones"
        assert not torch.all(tensor == 0), f"{key} is all zeros"
        if tensor.numel() >= 16:
            assert tensor.float().std() > 0.05, f"{key} is nearly constant"
        else:  # a handful of N(0, 0.1) draws can have a small sample std; they must still all differ
            assert tensor.float().unique().numel() == tensor.numel(), f"{key} repeats a value"
        if tensor.dim() >= 1 and tensor.shape[0] > 1:
            assert not torch.equal(tensor[0], tensor[1]), f"{key} has two equal rows"
        for other_key, other in seen:
            if other.shape == tensor.shape:
                assert not torch.equal(other, tensor), f"{key} equals {other_key}"
        seen.append((key, tensor))


def test_llama_shapes_expose_layout_bugs():
    cfg = model_spec.ModelSpec(family="llama").hf_config
    assert cfg["vocab_size"] % 128, "vocab must not be a multiple of Megatron's padding"
    assert cfg["num_attention_heads"] > cfg["num_key_value_heads"], "GQA"
    assert cfg["intermediate_size"] != cfg["hidden_size"], "gate/up orientation must show"
    assert model_spec.ModelSpec(family="llama").tied_embeddings is False


def test_materialize_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    spec = model_spec.ModelSpec(family="llama")
    first = checkpoint_builder.materialize(spec)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    second = checkpoint_builder.materialize(spec)
    assert first == second and (second / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_tokenizer_is_local_and_matches_vocab(tmp_path):
    from transformers import AutoTokenizer

    path = checkpoint_builder.build(model_spec.ModelSpec(family="llama"), tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(str(path))
    assert len(tok) == model_spec.ModelSpec(family="llama").hf_config["vocab_size"]
    assert tok("w10 w11").input_ids == [10, 11]


@pytest.mark.parametrize("family", sorted(family_registry.families()))
def test_config_fields_read_from_source_match_the_real_signature(family):
    """hf_source reads constructor fields without importing transformers; it must agree with
    the class itself, or case-file validation would refuse good fields or accept typos."""
    import inspect

    import transformers

    from harness.matrix.hf_source import config_fields

    name = family_registry.get_family(family).hf_config_class
    real = set(inspect.signature(getattr(transformers, name).__init__).parameters) - {"self"}
    assert config_fields(name) == real


def test_every_repository_model_is_accepted_by_its_config_class(case_set):
    """Case loading checks field names and shape rules torch-free; the config class judges the
    values at build time. The repository's own case files must pass that judgement too."""
    for model in {c.model for c in case_set.cases}:
        model_spec.hf_config_object(model)


def test_a_value_the_config_class_rejects_names_the_model():
    spec = model_spec.ModelSpec(family="llama", variant="bad", overrides=(("rope_parameters", "fast"),))
    with pytest.raises(ValueError, match="llama@bad: LlamaConfig rejects it"):
        model_spec.hf_config_object(spec)


def test_config_has_gdn_is_the_one_decision_the_spec_the_audit_and_the_writer_share():
    gdn = {family for family in family_registry.families() if model_spec.config_has_gdn(model_spec.ModelSpec(family).hf_config)}
    assert "qwen3-next" in gdn and not {"llama", "qwen3-moe", "deepseek-v3"} & gdn
    assert all(model_spec.ModelSpec(family).has_gdn == (family in gdn) for family in family_registry.families())
    # Seeded wrong configs: the GDN fields decide, not the family.
    llama = dict(model_spec.ModelSpec("llama").hf_config)
    assert not model_spec.config_has_gdn(llama) and model_spec.config_has_gdn({**llama, "linear_num_key_heads": 2})
    nxt = {k: v for k, v in model_spec.ModelSpec("qwen3-next").hf_config.items() if k != "linear_num_key_heads"}
    assert not model_spec.config_has_gdn(nxt)


def test_a_legacy_inv_freq_checkpoint_carries_the_models_own_buffers_and_a_new_cache_key(tmp_path):
    """llama@inv-freq: one rotary inv_freq per layer, equal to the model's, in fp32; the plain
    llama checkpoint has none and keeps its cache key."""
    spec = model_spec.ModelSpec.parse("llama@inv-freq")
    plain = model_spec.ModelSpec.parse("llama")
    assert checkpoint_builder.checkpoint_digest(spec) != checkpoint_builder.checkpoint_digest(plain)
    tensors = dict(hf_format.iter_tensors(checkpoint_builder.build(spec, tmp_path / "m")))
    keys = sorted(k for k in tensors if k.endswith("rotary_emb.inv_freq"))
    layers = spec.hf_config.get("num_hidden_layers", 2)
    assert keys == [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(layers)]
    head_dim = spec.setting("hidden_size") // spec.setting("num_attention_heads")
    theta = spec.setting("rope_parameters", {}).get("rope_theta", 10000.0)
    expected = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    assert tensors[keys[0]].dtype == torch.float32 and torch.allclose(tensors[keys[0]], expected)
    assert not any("inv_freq" in k for k in dict(hf_format.iter_tensors(checkpoint_builder.build(plain, tmp_path / "p"))))


def test_a_stored_tied_lm_head_equals_the_embedding_and_needs_tied_embeddings(tmp_path):
    """qwen2@tied-stored: lm_head.weight beside the tied embedding, the same values in their own
    storage; qwen2@tied keeps transformers' save (no lm_head) and its cache key; an untied model
    with the extra is refused with its reason."""
    spec = model_spec.ModelSpec.parse("qwen2@tied-stored")
    plain = model_spec.ModelSpec.parse("qwen2@tied")
    assert checkpoint_builder.checkpoint_digest(spec) != checkpoint_builder.checkpoint_digest(plain)
    tensors = dict(hf_format.iter_tensors(checkpoint_builder.build(spec, tmp_path / "m")))
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert "lm_head.weight" not in dict(hf_format.iter_tensors(checkpoint_builder.build(plain, tmp_path / "p")))
    with mock.patch.object(model_spec.ModelSpec, "checkpoint_extras", new_callable=mock.PropertyMock,
                           return_value={"stored_tied_lm_head": True}):
        with pytest.raises(ValueError, match="needs tie_word_embeddings"):
            checkpoint_builder.build(model_spec.ModelSpec.parse("qwen2"), tmp_path / "u")


def test_an_unknown_checkpoint_extra_is_refused_with_its_name():
    with pytest.raises(Exception, match="checkpoint.inv_freq_please: unknown"):
        family_registry._variants({"x": {"checkpoint": {"inv_freq_please": True}}})
