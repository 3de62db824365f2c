"""Tiny, seeded Hugging Face checkpoints, and the on-disk cache of them.

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
import tempfile
from pathlib import Path

from harness import workspace
from harness.matrix import model_spec, tokenizer
from harness.matrix.family_registry import get_family
from harness.matrix.model_spec import ModelSpec, hf_config_object
from harness.matrix.tokenizer import save_tokenizer

# Every parameter is re-drawn from N(mean, STD). HF's own init leaves norms at exactly 1 and
# biases at 0, which hides any swap between two of them. 1-D norm weights are centred on 1 so
# activations stay O(1) and the logits are far from uniform (a near-uniform softmax would make
# KL and top-1 blind); they are still all distinct.
INIT_STD = 0.1


def checkpoint_digest(spec: ModelSpec) -> str:
    """The cache key of ``spec``'s checkpoint."""
    family = get_family(spec.family)
    # Only what determines the HF files: provider-only variants share a checkpoint.
    doc = {"family": spec.family, "config": spec.hf_config, "seed": spec.seed, "std": INIT_STD,
           "tokenizer": family.tokenizer, "mtp_layers": family.writes_mtp_layers, "builder": _builder_digest()}
    if spec.checkpoint_extras:  # absent otherwise: every existing cache key stays what it was
        doc["extras"] = spec.checkpoint_extras
    blob = json.dumps(doc, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def _builder_digest() -> str:
    """The code that writes a checkpoint (this module, the config object of ``model_spec`` and the
    tokenizer's): a cached checkpoint built by older code is never reused."""
    modules = (__file__, model_spec.__file__, tokenizer.__file__)
    return hashlib.sha256(b"".join(Path(m).read_bytes() for m in modules)).hexdigest()[:12]


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
    if spec.checkpoint_extras.get("legacy_inv_freq"):
        _add_legacy_inv_freq(out_dir, model, config)
    if spec.checkpoint_extras.get("stored_tied_lm_head"):
        _add_stored_tied_lm_head(out_dir, model, config)
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
    from safetensors.torch import load_file

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
    _add_tensors(out_dir, extra)


def _add_legacy_inv_freq(out_dir: Path, model, config) -> None:
    """Each layer's ``self_attn.rotary_emb.inv_freq``, as transformers before 4.31 saved it (a
    persistent buffer per layer; now one non-persistent buffer on the model). The values are the
    model's own, so the checkpoint stays consistent; the bridge must carry them through an export
    unchanged (llama_bridge.py, maybe_modify_converted_hf_weight)."""
    inv_freq = model.model.rotary_emb.inv_freq.detach().to("cpu")
    _add_tensors(out_dir, {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone()
                           for i in range(config.num_hidden_layers)})


def _add_stored_tied_lm_head(out_dir: Path, model, config) -> None:
    """``lm_head.weight`` beside the tied embedding, equal to it, as checkpoints written by other
    tools than transformers' own save carry it (transformers drops the tied duplicate). The bridge
    must export both names, each with its own storage (model_bridge.py,
    stream_weights_megatron_to_hf, ``emit_output_weight`` / ``clone_identity_output``)."""
    if not getattr(config, "tie_word_embeddings", False):
        raise ValueError("stored_tied_lm_head needs tie_word_embeddings: true in the same variant")
    embedding = model.get_input_embeddings().weight.detach().to("cpu")
    _add_tensors(out_dir, {"lm_head.weight": embedding.clone()})


def _add_tensors(out_dir: Path, extra: dict) -> None:
    """Tensors transformers does not save, written into the checkpoint's one safetensors file."""
    from safetensors.torch import load_file, save_file

    file = out_dir / "model.safetensors"
    weights = load_file(file)
    weights.update(extra)
    save_file(weights, file, metadata={"format": "pt"})


def materialize(spec: ModelSpec) -> Path:
    """Return the directory of the checkpoint for ``spec``, building it once (atomically).

    Several processes (ranks, xdist workers) may race here: each builds into a private temp dir
    and renames it into place; the loser discards its copy. A reader never sees a partial dir.
    """
    final = workspace.zoo_root() / f"{spec.family}-{checkpoint_digest(spec)}"
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
