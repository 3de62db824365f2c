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

from harness import workspace
from harness.matrix.tokenizer import save_tokenizer

# Every parameter is re-drawn from N(mean, STD). HF's own init leaves norms at exactly 1 and
# biases at 0, which hides any swap between two of them. 1-D norm weights are centred on 1 so
# activations stay O(1) and the logits are far from uniform (a near-uniform softmax would make
# KL and top-1 blind); they are still all distinct.
INIT_STD = 0.1
DEFAULT_SEED = 1234


@dataclass(frozen=True)
class Variant:
    """A named deviation from a family's tiny model: HF config fields and/or Megatron provider
    fields (e.g. ``should_pad_vocab``, which changes the Megatron layout but not the HF side)."""

    hf: Mapping[str, Any] = field(default_factory=dict)
    provider: Mapping[str, Any] = field(default_factory=dict)


# bf16 end to end: HF weights saved in bf16, Megatron in bf16 (Float16Module where it applies).
BF16 = Variant(
    hf={"dtype": "bfloat16"},
    provider={"bf16": True, "params_dtype": "bfloat16", "pipeline_dtype": "bfloat16"},
)


@dataclass(frozen=True)
class Family:
    """A model family the harness knows how to build tiny.

    ``provider`` holds Megatron provider settings the family needs on *every* lane (e.g. a MoE
    dispatcher choice); lane-specific settings live in the runtimes (``harness.runtimes``), and
    why a family cannot run on a lane in ``harness.runtimes.lanes``.
    """

    name: str
    hf_architecture: str  # transformers class name, e.g. "LlamaForCausalLM"
    hf_config_class: str  # e.g. "LlamaConfig"
    config: Mapping[str, Any]
    description: str = ""
    provider: Mapping[str, Any] = field(default_factory=dict)
    # Named variants, addressed as "<family>@<variant>" in case files and IDs.
    variants: Mapping[str, Variant] = field(default_factory=dict)
    tokenizer: str = "wordlevel"  # harness.matrix.tokenizer.KINDS: the kind the family's tokenizer class reads


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} registered twice")
    FAMILIES[family.name] = family
    return family


def rope(theta: float) -> dict[str, Any]:
    """RoPE settings in transformers-5 form. The zoo uses a non-default theta on purpose: a
    bridge that drops it falls back to Megatron's 10000 and only a non-default value shows it."""
    return {"rope_type": "default", "rope_theta": theta}


# Shared shapes: hidden 64, 4 heads of 16 (GQA 4:2), dense FFN 96, vocab 250 (Megatron pads it
# to 256 at TP1/TP2: the export must cut the padding off). Every value the bridge maps into the
# provider differs from the provider's default (tests/integration/test_zoo_mapping.py); MoE
# families route top-3 of 4 experts (Megatron's default top-k is 2).
_COMMON = dict(
    vocab_size=250,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-3,  # not Megatron's 1e-5: a bridge that drops the mapping must show (zoo_audit)
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

register(
    Family(
        name="llama",
        hf_architecture="LlamaForCausalLM",
        hf_config_class="LlamaConfig",
        description="dense SwiGLU, GQA, untied embeddings",
        config=dict(
            _COMMON,
            intermediate_size=96,  # gate/up are [96, 64]: differs from hidden so orientation shows
            head_dim=16,
            rope_parameters=rope(50000.0),
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
        ),
        variants={
            # 4 layers: enough for PP2 x VPP2 (one layer per virtual stage) and PP4.
            "deep": Variant(hf={"num_hidden_layers": 4}),
            # Megatron pads the vocab (250 -> 128 x TP multiple); export must cut the padding off.
            "padded": Variant(provider={"should_pad_vocab": True}),
            "bf16": BF16,
        },
    )
)

register(
    Family(
        name="qwen2",
        tokenizer="bytelevel-bpe",
        hf_architecture="Qwen2ForCausalLM",
        hf_config_class="Qwen2Config",
        description="QKV bias (interleaved per query group like the weights)",
        config=dict(_COMMON, intermediate_size=96, rope_parameters=rope(1000000.0), hidden_act="silu"),
        variants={"tied": Variant(hf={"tie_word_embeddings": True})},
    )
)

register(
    Family(
        name="qwen3",
        tokenizer="bytelevel-bpe",
        hf_architecture="Qwen3ForCausalLM",
        hf_config_class="Qwen3Config",
        description="per-head q/k RMSNorm, head_dim decoupled from hidden/heads",
        config=dict(
            _COMMON, intermediate_size=96, head_dim=24, rope_parameters=rope(1000000.0),
            attention_bias=False, hidden_act="silu",
        ),
    )
)

register(
    Family(
        name="qwen3-moe",
        tokenizer="bytelevel-bpe",
        hf_architecture="Qwen3MoeForCausalLM",
        hf_config_class="Qwen3MoeConfig",
        description="4 experts, top-3 router, q/k norm",
        config=dict(
            _COMMON, intermediate_size=96, moe_intermediate_size=40, head_dim=16, num_experts=4,
            num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            rope_parameters=rope(1000000.0), attention_bias=False, hidden_act="silu",
        ),
        variants={"bf16": BF16},
    )
)

register(
    Family(
        name="deepseek-v3",
        hf_architecture="DeepseekV3ForCausalLM",
        hf_config_class="DeepseekV3Config",
        description="MLA, shared expert, grouped top-k with e_score_correction_bias, first layer dense",
        config=dict(
            _COMMON, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=40,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
            first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            num_nextn_predict_layers=1,  # an MTP layer, as real DeepSeek-V3 checkpoints carry (zoo._add_mtp_layers)
            kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
            rope_parameters=rope(10000.0 * 5), rope_interleave=True, attention_bias=False, hidden_act="silu",
        ),
    )
)

register(
    Family(
        name="qwen3-next",
        tokenizer="bytelevel-bpe",
        hf_architecture="Qwen3NextForCausalLM",
        hf_config_class="Qwen3NextConfig",
        description="Gated DeltaNet + gated full attention (1:1), MoE with shared expert",
        config=dict(
            _COMMON, intermediate_size=96, head_dim=16, moe_intermediate_size=40,
            shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=3,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=4,
            layer_types=["linear_attention", "full_attention"],
            rope_parameters=dict(rope(1000000.0), partial_rotary_factor=0.25),
            attention_bias=False, hidden_act="silu",
        ),
        variants={"bf16": BF16},
    )
)

register(
    Family(
        name="gemma2",
        hf_architecture="Gemma2ForCausalLM",
        hf_config_class="Gemma2Config",
        description="GeGLU (gelu-tanh gate), (1 + w) norms, logit soft-capping, sliding window",
        config=dict(
            _COMMON, tie_word_embeddings=True, intermediate_size=96, head_dim=16,
            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, sliding_window=16,
            final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rope_parameters=rope(10000.0 * 2),
            attention_bias=False,
        ),
    )
)

register(
    Family(
        name="gemma3",
        hf_architecture="Gemma3ForCausalLM",
        hf_config_class="Gemma3TextConfig",
        description="GeGLU, (1 + w) norms incl. q/k norm, local/global RoPE",
        config=dict(
            _COMMON, tie_word_embeddings=True, intermediate_size=96, head_dim=16,
            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"], attention_bias=False,
        ),
    )
)

register(
    Family(
        name="gpt-oss",
        hf_architecture="GptOssForCausalLM",
        hf_config_class="GptOssConfig",
        description="MoE with expert biases, clamped SwiGLU, attention sinks, sliding window",
        config=dict(
            _COMMON, intermediate_size=40, head_dim=16, num_local_experts=4, num_experts_per_tok=3,
            sliding_window=16, layer_types=["sliding_attention", "full_attention"],
            # YaRN as in the released GPT-OSS checkpoints: megatron-bridge 0.6.2 hard-codes factor 32
            # and original length 4096 whatever the config says (cases/moe.yaml: gpt-oss@yarn2).
            rope_parameters=dict(rope(150000.0), rope_type="yarn", factor=32.0, beta_fast=32.0,
                                 beta_slow=1.0, original_max_position_embeddings=4096, truncate=False),
            attention_bias=True,
        ),
    )
)


@dataclass(frozen=True)
class ModelSpec:
    """A family plus per-case overrides and a seed: everything that determines the weights."""

    family: str
    variant: str = ""
    overrides: tuple[tuple[str, Any], ...] = ()
    seed: int = DEFAULT_SEED

    def __hash__(self) -> int:  # override values may be dicts (e.g. rope_parameters)
        return hash((self.family, self.variant, json.dumps(self.overrides, sort_keys=True, default=str), self.seed))

    @property
    def id(self) -> str:
        return f"{self.family}@{self.variant}" if self.variant else self.family

    def _variant(self) -> Variant:
        family = get_family(self.family)
        if not self.variant or (self.overrides and self.variant not in family.variants):
            return Variant()  # plain family, or a case-file variant (its fields are `overrides`)
        if self.variant not in family.variants:
            raise KeyError(f"family {self.family!r} has no variant {self.variant!r} (has: {sorted(family.variants)})")
        return family.variants[self.variant]

    @property
    def hf_config(self) -> dict[str, Any]:
        cfg = dict(get_family(self.family).config)
        cfg.update(self._variant().hf)
        cfg.update(dict(self.overrides))
        return cfg

    @property
    def provider_overrides(self) -> dict[str, Any]:
        """Megatron provider fields this model needs on every lane (family, then variant)."""
        return {**get_family(self.family).provider, **self._variant().provider}

    @property
    def vocab_padded(self) -> bool:
        return bool(self.provider_overrides.get("should_pad_vocab", False))

    # -- model facts, read from the config in one place --------------------------------------

    @property
    def family_def(self) -> "Family":
        return get_family(self.family)

    @property
    def num_experts(self) -> int:
        return config_num_experts(self.hf_config)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def has_gdn(self) -> bool:
        """Gated DeltaNet layers (Qwen3-Next): their fsdp_dtensor projections are split in parts."""
        return "linear_num_key_heads" in self.hf_config

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU MLPs: fc1 holds [gate; up], which fsdp_dtensor stores as ``_w`` / ``_v``."""
        cfg = self.hf_config
        return cfg.get("hidden_act", cfg.get("hidden_activation", "silu")) == "silu"

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.hf_config.get("tie_word_embeddings", False))

    @property
    def bf16(self) -> bool:
        """Megatron runs this model in bf16 (a ``@bf16`` variant); otherwise fp32."""
        return bool(self.provider_overrides.get("bf16", False))

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``family`` or ``family@variant``."""
        family, _, variant = text.partition("@")
        get_family(family)
        spec = cls(family=family, variant=variant)
        spec.hf_config  # validates the variant
        return spec

    @property
    def digest(self) -> str:
        blob = json.dumps(
            # Only what determines the HF files: provider-only variants share a checkpoint.
            {"family": self.family, "config": self.hf_config, "seed": self.seed, "std": INIT_STD,
             "tokenizer": get_family(self.family).tokenizer},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def config_num_experts(cfg: Mapping[str, Any]) -> int:
    """Routed experts of an HF config dict (0 for a dense model); each family names the field its own way."""
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise KeyError(f"unknown family {name!r} (known: {known})") from None


def validate_overrides(spec: ModelSpec) -> None:
    """Raise ValueError naming the field, for an unknown field or a value the harness's shape
    rules reject. Torch-free (field names come from the config class's source); the config class
    itself judges the values when the checkpoint is built (``build``)."""
    from harness.matrix.hf_source import config_fields

    family = get_family(spec.family)
    known = config_fields(family.hf_config_class) | set(family.config)
    for key, _ in spec.overrides:
        if key not in known:
            raise ValueError(f"{key}: not a field of {family.hf_config_class}")
    cfg = dict(spec.hf_config)
    cfg.pop("dtype", None)
    for key, value in spec.overrides:
        if key.endswith(("_size", "_heads", "_layers", "head_dim", "num_experts", "_per_tok")) and (
            not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{key}: {value!r} must be a positive integer")
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ValueError(f"num_key_value_heads: {kv} does not divide num_attention_heads {heads}")
    experts = config_num_experts(cfg)
    if experts and cfg.get("num_experts_per_tok", 1) > experts:
        raise ValueError(f"num_experts_per_tok: {cfg['num_experts_per_tok']} exceeds the {experts} experts")
    if cfg.get("vocab_size", 5) <= 4:
        raise ValueError(f"vocab_size: {cfg['vocab_size']} leaves no room for ordinary tokens")


def hf_config_object(spec: ModelSpec):
    """The transformers config of ``spec`` (imports transformers); a value the config class
    rejects is a ValueError naming the model."""
    import transformers

    family = get_family(spec.family)
    config_cls = getattr(transformers, family.hf_config_class)
    cfg = dict(spec.hf_config)
    cfg.pop("dtype", None)
    try:
        config = config_cls(**cfg)
    except Exception as err:  # noqa: BLE001 - whatever the config class rejects
        raise ValueError(f"{spec.id}: {family.hf_config_class} rejects it: {err}") from None
    config.architectures = [family.hf_architecture]
    return config


def _draw(name: str, shape, generator):
    """One seeded tensor: N(0, INIT_STD), or N(1, INIT_STD) for a 1-D norm weight."""
    import torch

    mean = 1.0 if (len(shape) == 1 and "norm" in name) else 0.0
    return torch.empty(tuple(shape), dtype=torch.float32).normal_(mean, INIT_STD, generator=generator)


def redraw_parameters(model, seed: int) -> None:
    """Overwrite every saved floating tensor with seeded noise, in a fixed (name-sorted) order.

    "Saved" = the state dict: parameters *and* persistent buffers such as DeepSeek's
    ``e_score_correction_bias``, which HF initialises to zeros.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if tensor.is_floating_point():
                tensor.copy_(_draw(name, tensor.shape, gen).to(tensor.dtype))


def build(spec: ModelSpec, out_dir: Path) -> Path:
    """Build the tiny checkpoint into ``out_dir`` (which must not exist)."""
    import torch
    import transformers

    from harness.runtimes.hf_reference import pure_torch_reference

    family = get_family(spec.family)
    model_cls = getattr(transformers, family.hf_architecture)
    dtype = getattr(torch, spec.hf_config.get("dtype", "float32"))
    config = hf_config_object(spec)
    torch.manual_seed(spec.seed)
    with pure_torch_reference():  # CPU modules even where CUDA-only kernels are installed
        model = model_cls(config).to(torch.float32)
    redraw_parameters(model, spec.seed)  # drawn in fp32, then cast: bf16 = rounded fp32 draws
    model = model.to(dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    if getattr(config, "num_nextn_predict_layers", 0):
        _add_mtp_layers(out_dir, model_cls, config, spec.seed, dtype)
    save_tokenizer(out_dir, vocab_size=config.vocab_size, kind=family.tokenizer)
    return out_dir


def _add_mtp_layers(out_dir: Path, model_cls, config, seed: int, dtype) -> None:
    """DeepSeek-V3's multi-token-prediction layers, which real checkpoints carry and transformers
    neither builds nor saves: layer ``N + i`` (N = num_hidden_layers) is a full decoder layer plus
    ``enorm``, ``hnorm``, ``eh_proj`` ([H, 2H]) and ``shared_head.norm``, the HF names the bridge
    maps to ``mtp.layers.<i>`` (megatron/bridge/models/deepseek/common.py). Without them the
    provider's MTP parameters would never be written (a false load-coverage failure) and their
    conversion would go untested. ``embed_tokens`` / ``shared_head.head`` are left out: Megatron
    shares the main ones, and the bridge maps neither.

    The decoder layer comes from a model with ``N + k`` layers saved by transformers (so the
    on-disk names, e.g. per-expert ``gate_proj``, are transformers' own), drawn from its own seed
    so the main weights stay as they were."""
    import copy
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    from harness.runtimes.hf_reference import pure_torch_reference

    n, k = config.num_hidden_layers, config.num_nextn_predict_layers
    deeper = copy.deepcopy(config)
    deeper.num_hidden_layers = n + k
    with pure_torch_reference():
        donor = model_cls(deeper).to(torch.float32)
    redraw_parameters(donor, seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        donor.to(dtype).save_pretrained(tmp, safe_serialization=True)
        donated = load_file(f"{tmp}/model.safetensors")
    mtp = [f"model.layers.{n + i}." for i in range(k)]
    extra = {key: t for key, t in donated.items() if key.startswith(tuple(mtp))}
    hidden = config.hidden_size
    shapes = {f"{p}{name}": shape for p in mtp for name, shape in (
        ("enorm.weight", (hidden,)), ("hnorm.weight", (hidden,)), ("eh_proj.weight", (hidden, 2 * hidden)),
        ("shared_head.norm.weight", (hidden,)))}
    gen = torch.Generator().manual_seed(seed + 2)
    extra.update({name: _draw(name, shape, gen).to(dtype) for name, shape in sorted(shapes.items())})
    file = out_dir / "model.safetensors"
    weights = load_file(file)
    weights.update(extra)
    save_file(weights, file, metadata={"format": "pt"})


def materialize(spec: ModelSpec) -> Path:
    """Return the directory of the checkpoint for ``spec``, building it once (atomically).

    Several processes (ranks, xdist workers) may race here: each builds into a private temp dir
    and renames it into place; the loser discards its copy. A reader never sees a partial dir.
    """
    final = workspace.zoo_root() / f"{spec.family}-{spec.digest}"
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
