"""Tiny, seeded Hugging Face checkpoints, one per model family.

Each family is a tiny HF config chosen to make conversion bugs visible (gate != up, heads > kv
heads, vocab not a multiple of the Megatron padding). ``materialize`` builds the checkpoint on disk
deterministically: the same spec always produces byte-identical files, so a golden fingerprint can
hash them. Nothing is downloaded: the tokenizer is built locally too.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from harness import workspace
from harness.errors import InputError, load_yaml
from harness.matrix import bridge_registry
from harness.matrix.bridge_registry import RegisteredArchitecture
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


@dataclass(frozen=True)
class Family:
    """A registered architecture the harness builds tiny: the shrink rules plus its entry in
    ``families.yaml``.

    ``provider`` holds Megatron provider settings the family needs on *every* lane (e.g. a MoE
    dispatcher choice); lane-specific settings live in the runtimes (``harness.runtimes``), and
    why a family cannot run on a lane in ``harness.matrix.lanes``.
    """

    name: str
    architecture: RegisteredArchitecture
    config: Mapping[str, Any]  # the tiny HF config (rules, then the family's overrides)
    description: str = ""
    provider: Mapping[str, Any] = field(default_factory=dict)
    # Named variants, addressed as "<family>@<variant>" in case files and IDs.
    variants: Mapping[str, Variant] = field(default_factory=dict)
    tokenizer: str = "wordlevel"  # harness.matrix.tokenizer.KINDS: the kind the family's tokenizer class reads
    # DeepSeek-style multi-token-prediction weights the zoo writes itself (``_add_mtp_layers``):
    # real checkpoints carry them, transformers neither builds nor saves them.
    writes_mtp_layers: bool = False
    # Parallel dimensions the family's bridge refuses by design: dimension (tp, pp, ep, ...) -> why.
    unsupported_parallelism: Mapping[str, str] = field(default_factory=dict)

    @property
    def hf_architecture(self) -> str:
        """transformers model class name, e.g. ``LlamaForCausalLM``."""
        return self.architecture.architecture

    @property
    def hf_config_class(self) -> str:
        return self.architecture.hf_config_class


FAMILIES_FILE = Path(__file__).with_name("families.yaml")
_ENTRY_FIELDS = {"name", "description", "tokenizer", "config", "extra_config", "provider", "variants",
                 "unsupported_parallelism", "writes_mtp_layers"}


def family_name(arch: RegisteredArchitecture) -> str:
    """The default family ID: the model_type, ``_`` -> ``-``, without a ``-text`` suffix."""
    return arch.model_type.replace("_", "-").removesuffix("-text")


def _variants(doc: Mapping[str, Any] | None) -> dict[str, Variant]:
    return {name: Variant(hf=dict(v.get("hf") or {}), provider=dict(v.get("provider") or {}))
            for name, v in (doc or {}).items()}


def every_family_variants(path: Path = FAMILIES_FILE) -> dict[str, Variant]:
    """Variants every family has (``families.yaml`` ``every_family_variants``), e.g. ``bf16``."""
    return _variants((load_yaml(path) or {}).get("every_family_variants"))


def family_entries(path: Path = FAMILIES_FILE) -> dict[str, dict[str, Any]]:
    """architecture -> its entry in ``families.yaml`` (schema errors name the file and field)."""
    doc = load_yaml(path) or {}
    entries = doc.get("families") or {}
    for arch, entry in entries.items():
        unknown = sorted(set(entry or {}) - _ENTRY_FIELDS)
        if unknown:
            raise InputError(f"{path.name}: families.{arch}.{unknown[0]}: unknown field "
                             f"(known: {', '.join(sorted(_ENTRY_FIELDS))})")
    return {arch: dict(entry or {}) for arch, entry in entries.items()}


def _family(arch: RegisteredArchitecture, entry: dict[str, Any]) -> Family:
    from harness.matrix import hf_source, shrink

    overrides = {**(entry.get("config") or {}), **(entry.get("extra_config") or {})}
    config = shrink.tiny_config(hf_source.config_fields(arch.hf_config_class),
                                hf_source.config_defaults(arch.hf_config_class), overrides)
    variants = {**every_family_variants(), **_variants(entry.get("variants"))}
    return Family(name=entry.get("name") or family_name(arch), architecture=arch, config=config,
                  description=entry.get("description", ""), provider=dict(entry.get("provider") or {}),
                  variants=variants, tokenizer=entry.get("tokenizer", "wordlevel"),
                  unsupported_parallelism=dict(entry.get("unsupported_parallelism") or {}),
                  writes_mtp_layers=bool(entry.get("writes_mtp_layers", False)))


@functools.lru_cache(maxsize=4)
def _families(bridge_models: Path) -> dict[str, Family]:
    entries = family_entries()
    out: dict[str, Family] = {}
    for arch in bridge_registry.text_lms(bridge_models):
        family = _family(arch, entries.get(arch.architecture, {}))
        if family.name in out:
            raise ValueError(f"family {family.name!r} for both {out[family.name].hf_architecture} and "
                             f"{arch.architecture}: give one a name in {FAMILIES_FILE.name}")
        out[family.name] = family
    return dict(sorted(out.items()))


def families() -> dict[str, Family]:
    """Every text-LM architecture of the Bridge in use, as a family, by name."""
    return _families(bridge_registry.bridge_models_root())


def __getattr__(name: str) -> Any:
    if name == "FAMILIES":  # computed on first use: it reads the Bridge's and transformers' sources
        return families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Megatron model classes of hybrid Mamba architectures (bridge_registry's ``target``).
MAMBA_TARGETS = ("HybridModel", "MambaModel", "FalconH1Model")


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

    def to_dict(self) -> dict[str, Any]:
        """As JSON data (override values are YAML scalars, lists and mappings)."""
        return {"family": self.family, "variant": self.variant, "overrides": [[k, v] for k, v in self.overrides],
                "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """The inverse of ``to_dict``; looks nothing up (no family is loaded)."""
        return cls(family=data["family"], variant=data.get("variant", ""),
                   overrides=tuple((k, v) for k, v in data.get("overrides", ())), seed=data.get("seed", DEFAULT_SEED))

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

    def setting(self, name: str, default: Any = None) -> Any:
        """An HF config value of this model: the tiny config's, else the config class's default."""
        from harness.matrix.hf_source import config_defaults

        cfg = self.hf_config
        if name in cfg:
            return cfg[name]
        return config_defaults(self.family_def.hf_config_class).get(name, default)

    @property
    def num_experts(self) -> int:
        return config_num_experts(self.hf_config)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def has_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek V2/V3, GLM-4.7-Flash, GLM-5): low-rank q/kv."""
        return "kv_lora_rank" in self.hf_config

    @property
    def has_mamba(self) -> bool:
        """Mamba (SSM) layers (Nemotron-H, Falcon-H1): Megatron builds them from mamba-ssm."""
        return self.family_def.architecture.target in MAMBA_TARGETS

    @property
    def has_gdn(self) -> bool:
        """Gated DeltaNet layers (Qwen3-Next): their fsdp_dtensor projections are split in parts."""
        return config_has_gdn(self.hf_config)

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU MLPs: fc1 holds [gate; up], which fsdp_dtensor stores as ``_w`` / ``_v``."""
        return (self.setting("hidden_act") or self.setting("hidden_activation")) == "silu"

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.setting("tie_word_embeddings", False))

    @property
    def local_spec(self) -> bool:
        """Megatron builds megatron-core's local (non-TE) layer spec (a ``@local`` variant); otherwise
        the TE layer spec, as users run it."""
        return self.provider_overrides.get("transformer_impl") == "local"

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
        family = get_family(self.family)
        # Only what determines the HF files: provider-only variants share a checkpoint.
        doc = {"family": self.family, "config": self.hf_config, "seed": self.seed, "std": INIT_STD,
               "tokenizer": family.tokenizer, "mtp_layers": family.writes_mtp_layers, "builder": _builder_digest()}
        blob = json.dumps(doc, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def _builder_digest() -> str:
    """The code that writes a checkpoint (this module and the tokenizer's): a cached checkpoint
    built by older code is never reused."""
    from harness.matrix import tokenizer

    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (sys.modules[__name__], tokenizer))
                          ).hexdigest()[:12]


def config_num_experts(cfg: Mapping[str, Any]) -> int:
    """Routed experts of an HF config dict (0 for a dense model); each family names the field its own way."""
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
               or cfg.get("moe_num_experts") or 0)


def config_has_gdn(cfg: Mapping[str, Any]) -> bool:
    """Gated DeltaNet (linear attention) layers in an HF config dict (Qwen3-Next, Qwen3.5): the one
    place that decides it (the layout audit and the fsdp_dtensor writer ask here too)."""
    return "linear_num_key_heads" in cfg


def get_family(name: str) -> Family:
    try:
        return families()[name]
    except KeyError:
        known = ", ".join(families())
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
    cfg = copy.deepcopy(spec.hf_config)  # transformers rewrites rope_parameters in place
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


def _draw_expert_table(shape, num_experts: int, generator):
    """A token -> expert-ids table ``[vocab, top_k]`` (DeepSeek-V4's hash router ``tid2eid``):
    each row top_k distinct experts, seeded. transformers initialises it to zeros (every token
    to expert 0), which would hide a swapped or dropped table."""
    import torch

    rows = [torch.randperm(num_experts, generator=generator)[: shape[1]] for _ in range(shape[0])]
    return torch.stack(rows)


# Integer tables that need values of their own kind: state-dict name suffix -> drawer(shape, model config, gen).
INTEGER_TABLES = {
    "tid2eid": lambda shape, config, gen: _draw_expert_table(shape, config.num_local_experts, gen),
}


def redraw_parameters(model, seed: int) -> None:
    """Overwrite every saved floating tensor with seeded noise, in a fixed (name-sorted) order,
    and the integer tables of ``INTEGER_TABLES`` with valid seeded values.

    "Saved" = the state dict: parameters *and* persistent buffers such as DeepSeek's
    ``e_score_correction_bias``, which HF initialises to zeros.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if tensor.is_floating_point():
                tensor.copy_(_draw(name, tensor.shape, gen).to(tensor.dtype))
            elif (table := INTEGER_TABLES.get(name.rsplit(".", 1)[-1])) is not None:
                tensor.copy_(table(tensor.shape, model.config, gen).to(tensor.dtype))


def build(spec: ModelSpec, out_dir: Path) -> Path:
    """Build the tiny checkpoint into ``out_dir`` (which must not exist)."""
    import torch
    import transformers

    from harness.matrix.hf_reference import pure_torch_reference

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
    if family.writes_mtp_layers and getattr(config, "num_nextn_predict_layers", 0):
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
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    from harness.matrix.hf_reference import pure_torch_reference

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
