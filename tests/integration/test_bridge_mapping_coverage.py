"""Every tensor of every family's tiny HF checkpoint is claimed by a mapping of its bridge.

A checkpoint tensor no mapping names is silently left behind on import. This static check needs no
Megatron model, so it covers the families no CPU case can build (MLA, GDN, Mamba, TE-only specs)
as well: it is the CPU lane's only word on them until a GPU lane runs their load-coverage check.
Known gaps of the pinned stack are pinned below with their diagnosis; the test fails when a family
gains a gap, and when a pinned gap closes (then drop the entry).
"""

from __future__ import annotations

import fnmatch

import pytest

from harness.formats import hf as hf_format
from harness.matrix import checkpoint_builder, family_registry, model_spec

pytestmark = pytest.mark.cpu

# family -> (how many tensors no mapping claims, why), found with megatron-bridge 0.6.2 and transformers 5.12.1.
KNOWN_UNCLAIMED = {
    "deepseek-v4": (79, "deepseek_v4_bridge.py maps the original DeepSeek-V4 release's names (embed.weight, "
                        "layers.*.attn.compressor.*, hc_head_*), not the names transformers' DeepseekV4ForCausalLM "
                        "saves (model.embed_tokens.weight, model.layers.*.self_attn.*, model.hc_head.*): of 80 "
                        "tensors only head.weight is claimed"),
    "nemotron-h": (3, "nemotron_h_bridge.py maps backbone.embeddings.weight (the released checkpoints' name), "
                      "but transformers 5.12.1's NemotronHForCausalLM saves backbone.embedding.weight; and with "
                      "use_bias the Mamba mixer's in_proj.bias / out_proj.bias have no mapping"),
    "falcon-h1": (2, "with projectors_bias (mapped to add_bias_linear) the Mamba mixer's out_proj.bias has no "
                     "mapping in falconh1_bridge.py: it would be silently dropped on import"),
}


def unclaimed_tensors(family: str) -> list[str]:
    from harness.conversion.bridge_calls import open_bridge

    path = checkpoint_builder.materialize(model_spec.ModelSpec(family))
    patterns = []
    for mapping in open_bridge(path)._model_bridge.mapping_registry().mappings:
        hf = mapping.hf_param
        patterns += list(hf.values()) if isinstance(hf, dict) else [hf]
    keys = [key for shard in hf_format.shard_files(path) for key in hf_format.read_header(shard)]
    return [key for key in keys if not any(fnmatch.fnmatchcase(key, p) for p in patterns)]


@pytest.mark.parametrize("family", sorted(family_registry.families()))
def test_every_checkpoint_tensor_is_claimed_by_a_bridge_mapping(family):
    unclaimed = unclaimed_tensors(family)
    if family in KNOWN_UNCLAIMED:
        count, why = KNOWN_UNCLAIMED[family]
        assert len(unclaimed) == count, f"{family}: the pinned gap changed ({len(unclaimed)} unclaimed now): {why}"
    else:
        assert unclaimed == [], f"{family}: no bridge mapping claims {unclaimed[:5]} ({len(unclaimed)} tensors)"


def test_a_dropped_mapping_leaves_a_tensor_unclaimed(monkeypatch):
    """The seeded case: a bridge that lost its final-norm mapping."""
    from megatron.bridge.models.llama.llama_bridge import LlamaBridge

    original = LlamaBridge.mapping_registry

    def without_final_norm(self):
        registry = original(self)
        registry.mappings = [m for m in registry.mappings if m.hf_param != "model.norm.weight"]
        return registry

    monkeypatch.setattr(LlamaBridge, "mapping_registry", without_final_norm)
    assert unclaimed_tensors("llama") == ["model.norm.weight"]
