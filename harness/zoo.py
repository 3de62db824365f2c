"""Tiny, seeded Hugging Face checkpoints, one per model family.

Each family is a tiny HF config chosen to make conversion bugs visible (gate != up, heads > kv
heads, vocab not a multiple of the Megatron padding). ``materialize`` builds the checkpoint on disk
deterministically: the same spec always produces byte-identical files, so a golden fingerprint can
hash them. Nothing is downloaded: the tokenizer is built locally too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from harness import paths
from harness.tokenizer import save_tokenizer

# Every parameter is re-drawn from N(mean, STD). HF's own init leaves norms at exactly 1 and
# biases at 0, which hides any swap between two of them. 1-D norm weights are centred on 1 so
# activations stay O(1) and the logits are far from uniform (a near-uniform softmax would make
# KL and top-1 blind); they are still all distinct.
INIT_STD = 0.1
DEFAULT_SEED = 1234


@dataclass(frozen=True)
class Family:
    """A model family the harness knows how to build tiny.

    ``provider`` holds Megatron provider settings the family needs on *every* lane (e.g. a MoE
    dispatcher choice); CPU-only settings live in ``harness.cpu_runtime``.
    """

    name: str
    hf_architecture: str  # transformers class name, e.g. "LlamaForCausalLM"
    hf_config_class: str  # e.g. "LlamaConfig"
    config: Mapping[str, Any]
    description: str = ""
    provider: Mapping[str, Any] = field(default_factory=dict)
    # Why the family cannot run a given stage on CPU; empty means it can.
    cpu_convert_blocker: str = ""
    cpu_forward_blocker: str = ""


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} registered twice")
    FAMILIES[family.name] = family
    return family


register(
    Family(
        name="llama",
        hf_architecture="LlamaForCausalLM",
        hf_config_class="LlamaConfig",
        description="dense SwiGLU, GQA, untied embeddings",
        config=dict(
            vocab_size=250,  # not a multiple of 128: Megatron pads, export must truncate
            hidden_size=64,
            intermediate_size=96,  # gate/up are [96, 64]: differs from hidden so orientation shows
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # GQA: QKV interleaving per group matters
            head_dim=16,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    )
)


@dataclass(frozen=True)
class ModelSpec:
    """A family plus per-case overrides and a seed: everything that determines the weights."""

    family: str
    overrides: tuple[tuple[str, Any], ...] = ()
    seed: int = DEFAULT_SEED

    @property
    def hf_config(self) -> dict[str, Any]:
        cfg = dict(get_family(self.family).config)
        cfg.update(dict(self.overrides))
        return cfg

    @property
    def digest(self) -> str:
        blob = json.dumps(
            {"family": self.family, "config": self.hf_config, "seed": self.seed, "std": INIT_STD},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise KeyError(f"unknown model family {name!r} (known: {known})") from None


def redraw_parameters(model, seed: int) -> None:
    """Overwrite every parameter with seeded noise, in a fixed (name-sorted) order."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            mean = 1.0 if (param.dim() == 1 and "norm" in name) else 0.0
            noise = torch.empty(param.shape, dtype=torch.float32).normal_(mean, INIT_STD, generator=gen)
            param.copy_(noise.to(param.dtype))


def build(spec: ModelSpec, out_dir: Path) -> Path:
    """Build the tiny checkpoint into ``out_dir`` (which must not exist)."""
    import torch
    import transformers

    family = get_family(spec.family)
    config_cls = getattr(transformers, family.hf_config_class)
    model_cls = getattr(transformers, family.hf_architecture)
    config = config_cls(**spec.hf_config)
    config.architectures = [family.hf_architecture]
    torch.manual_seed(spec.seed)
    model = model_cls(config).to(torch.float32)
    redraw_parameters(model, spec.seed)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(out_dir, vocab_size=config.vocab_size)
    return out_dir


def materialize(spec: ModelSpec) -> Path:
    """Return the directory of the checkpoint for ``spec``, building it once (atomically).

    Several processes (ranks, xdist workers) may race here: each builds into a private temp dir
    and renames it into place; the loser discards its copy. A reader never sees a partial dir.
    """
    final = paths.zoo_root() / f"{spec.family}-{spec.digest}"
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(spec, tmp / "model")
        try:
            os.rename(tmp / "model", final)
        except OSError:
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
