"""Seeded regressions, injected at run time by patching Megatron-Bridge / Megatron-Core functions.

A fault is a named context manager. While it is active, one upstream function behaves the way a
real regression would; on exit the original is restored. Faults are applied inside the worker
processes (every rank) around each case, so they exercise the same code paths as a real bug.
Installed files are never edited.

``harness run CASE --inject NAME`` and ``harness selftest`` (``harness.regression.selftest``) use
this registry.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from unittest import mock

from harness.formats import megatron_keys as keys


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    apply: Callable[[], contextlib.AbstractContextManager]


FAULTS: dict[str, Fault] = {}
# What a RunSpec names as its fault_provider: the worker imports this module by name and enters
# ``active(specs, case_id)`` around each case (harness.run_spec.RunSpec.fault_provider).
PROVIDER = __name__


def fault(name: str, description: str):
    def register(fn: Callable[[], Iterator[None]]):
        FAULTS[name] = Fault(name=name, description=description, apply=contextlib.contextmanager(fn))
        return fn

    return register


@contextlib.contextmanager
def patched(target: str, attribute: str, replacement: Any) -> Iterator[Any]:
    """Replace ``module_or_class.attribute`` for the block; yields the original."""
    module_path, _, class_name = target.partition(":")
    owner: Any = importlib.import_module(module_path)
    if class_name:
        owner = getattr(owner, class_name)
    original = getattr(owner, attribute)
    with mock.patch.object(owner, attribute, replacement):
        yield original


def parse(spec: str) -> tuple[str, str]:
    """``NAME`` or ``NAME@CASE_GLOB`` (the fault applies only to matching case IDs)."""
    name, _, pattern = spec.partition("@")
    if name not in FAULTS:
        raise KeyError(f"unknown fault {name!r} (known: {', '.join(sorted(FAULTS))})")
    return name, pattern or "*"


@contextlib.contextmanager
def active(specs: list[str], case_id: str = "") -> Iterator[None]:
    """Apply every fault in ``specs`` whose case pattern matches ``case_id``."""
    with contextlib.ExitStack() as stack:
        for spec in specs:
            name, pattern = parse(spec)
            if fnmatch.fnmatchcase(case_id, pattern):
                stack.enter_context(FAULTS[name].apply())
        yield


# ------------------------------------------------------------------ conversion regressions
# Each one makes one upstream function behave the way a real, seen-in-the-wild regression did.
_BRIDGE = "megatron.bridge.models.conversion.model_bridge:MegatronModelBridge"
_MAPPING = "megatron.bridge.models.conversion.param_mapping"
_MODEL_BRIDGE = "megatron.bridge.models.conversion.model_bridge"
_HANDLERS = "megatron.core.transformer.fsdp_dtensor_checkpoint"


@contextlib.contextmanager
def _filtered_export(transform):
    """Wrap export_hf_weights' generator: ``transform(name, tensor)`` -> (name, tensor) or None."""
    from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge

    original = MegatronModelBridge.stream_weights_megatron_to_hf

    def stream(self, *args, **kwargs):
        for name, tensor in original(self, *args, **kwargs):
            out = transform(name, tensor)
            if out is not None:
                yield out

    with patched(_BRIDGE, "stream_weights_megatron_to_hf", stream):
        yield


@contextlib.contextmanager
def _unmapped_on_import(matches):
    """A mapping whose hf_to_megatron yields nothing: the bridge skips the copy without a word
    (the way ranks without a shard skip), so the parameter keeps its initial values."""
    from megatron.bridge.models.conversion.param_mapping import AutoMapping

    original = AutoMapping.hf_to_megatron

    def hf_to_megatron(self, hf_weights, megatron_module):
        if matches(self.megatron_param):
            return None
        return original(self, hf_weights, megatron_module)

    with patched(f"{_MAPPING}:AutoMapping", "hf_to_megatron", hf_to_megatron):
        yield


@fault("gate-up-swapped", "GatedMLPMapping swaps gate and up on import AND on export (round trip stays bitwise)")
def _gate_up_swapped():
    from megatron.bridge.models.conversion.param_mapping import GatedMLPMapping

    imp, exp = GatedMLPMapping.hf_to_megatron, GatedMLPMapping.megatron_to_hf

    def hf_to_megatron(self, hf_weights, megatron_module):
        return imp(self, {"gate": hf_weights["up"], "up": hf_weights["gate"]}, megatron_module)

    def megatron_to_hf(self, megatron_weights, megatron_module):
        out = exp(self, megatron_weights, megatron_module)
        renamed = {"gate_proj": "up_proj", "up_proj": "gate_proj"}
        return {re.sub(r"gate_proj|up_proj", lambda m: renamed[m.group(0)], k): v for k, v in out.items()}

    with patched(f"{_MAPPING}:GatedMLPMapping", "hf_to_megatron", hf_to_megatron), \
         patched(f"{_MAPPING}:GatedMLPMapping", "megatron_to_hf", megatron_to_hf):
        yield


@fault("qkv-naive-concat", "QKV merged as cat([q, k, v]) instead of per-query-group interleaving, split the same way")
def _qkv_naive():
    import torch

    def merge(provider, q, k, v):
        return torch.cat([q, k, v], dim=0)

    def split(provider, qkv):
        head = provider.kv_channels or provider.hidden_size // provider.num_attention_heads
        sizes = [provider.num_attention_heads * head, provider.num_query_groups * head, provider.num_query_groups * head]
        return tuple(torch.split(qkv, sizes, dim=0))

    with patched(_MAPPING, "merge_qkv_weights", merge), patched(_MAPPING, "split_qkv_weights", split), \
         patched(_MAPPING, "merge_qkv_biases", merge), patched(_MAPPING, "split_qkv_biases", split):
        yield


@contextlib.contextmanager
def _renamed_globally(rewrite):
    """Wrap the bridge's local -> global parameter naming: ``rewrite(local, global)`` -> global."""
    from megatron.bridge.models.conversion import model_bridge

    original = model_bridge._megatron_local_name_to_global

    def local_name_to_global(models, config, param_name, vp_stage=None):
        return rewrite(param_name, original(models, config, param_name, vp_stage))

    with patched(_MODEL_BRIDGE, "_megatron_local_name_to_global", local_name_to_global):
        yield


@fault("expert-offset-local", "under EP > 1, local expert numbers are used as global ones (no EP-rank offset)")
def _expert_offset():
    def keep_local_expert_number(param_name, out):
        local = keys.expert_number(param_name)
        return out if local is None else keys.renumber_expert(out, local)

    with _renamed_globally(keep_local_expert_number):
        yield


@fault("export-drops-lm-head", "export_hf_weights omits lm_head.weight (as if the model were tied)")
def _drop_lm_head():
    with _filtered_export(lambda n, t: None if n == "lm_head.weight" else (n, t)):
        yield


@fault("export-mutates-live-weight", "exporting the final norm scales the live Megatron weight in place (after "
       "handing out a correct copy): the first export is right, the model and any later export are not")
def _export_mutates_live_weight():
    import torch
    from megatron.bridge.models.conversion.param_mapping import AutoMapping

    original = AutoMapping.megatron_to_hf

    def megatron_to_hf(self, megatron_weights, megatron_module):
        out = original(self, megatron_weights, megatron_module)
        if megatron_weights is not None and self.megatron_param.endswith("final_layernorm.weight"):
            out = {k: v.clone() for k, v in out.items()}
            with torch.no_grad():
                megatron_weights.mul_(1.5)
        return out

    with patched("megatron.bridge.models.conversion.param_mapping:AutoMapping", "megatron_to_hf", megatron_to_hf):
        yield


@contextlib.contextmanager
def _provider_falls_back(field: str, megatron_default):
    """The bridge's provider loses one mapped HF config value: Megatron's default takes its place."""
    from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge

    original = MegatronModelBridge.provider_bridge

    def provider_bridge(self, hf_pretrained):
        provider = original(self, hf_pretrained)
        setattr(provider, field, megatron_default)
        return provider

    with patched(_BRIDGE, "provider_bridge", provider_bridge):
        yield


@fault("rope-theta-dropped", "the provider loses rope_theta and falls back to Megatron's rotary_base 10000")
def _rope_dropped():
    with _provider_falls_back("rotary_base", 10000.0):
        yield


@fault("config-export-drops-eps", "the config-only export stops writing rms_norm_eps back (the import still "
       "maps it): the HF config class default replaces it in a synthesised config")
def _config_export_drops_eps():
    from unittest import mock

    from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge

    original = MegatronModelBridge.__dict__["megatron_to_hf_config"].__func__

    def megatron_to_hf_config(cls, provider):
        out = original(cls, provider)
        out.pop("rms_norm_eps", None)
        return out

    # mock.patch.object restores the classmethod descriptor itself (subclasses call super()).
    with mock.patch.object(MegatronModelBridge, "megatron_to_hf_config", classmethod(megatron_to_hf_config)):
        yield


@fault("rms-eps-dropped", "the provider loses rms_norm_eps and falls back to Megatron's layernorm_epsilon 1e-5")
def _eps_dropped():
    with _provider_falls_back("layernorm_epsilon", 1e-5):
        yield


@fault("provider-drift-at-tp", "finalize() falls back to Megatron's rotary_base 10000 when TP > 1 (the model is right at TP1)")
def _provider_drift_at_tp():
    from megatron.bridge.models.transformer_config import TransformerConfig

    original = TransformerConfig.finalize

    def finalize(self):
        original(self)
        if self.tensor_model_parallel_size > 1:
            self.rotary_base = 10000.0

    with patched("megatron.bridge.models.transformer_config:TransformerConfig", "finalize", finalize):
        yield


@fault("vocab-padding-exported", "embedding and lm_head exported with Megatron's vocab padding (rows up to a multiple of 128)")
def _vocab_padding():
    import torch

    def pad(name, tensor):
        if name in ("model.embed_tokens.weight", "lm_head.weight") and tensor.shape[0] % 128:
            extra = 128 - tensor.shape[0] % 128
            tensor = torch.cat([tensor, tensor.new_zeros((extra, *tensor.shape[1:]))])
        return name, tensor

    with _filtered_export(pad):
        yield


@fault("qk-norm-unmapped", "q_layernorm / k_layernorm have no working mapping (silently not loaded)")
def _qk_norm():
    with _unmapped_on_import(lambda p: "q_layernorm" in p or "k_layernorm" in p):
        yield


@fault("router-unmapped", "the MoE router weight has no working mapping (silently not loaded)")
def _router():
    with _unmapped_on_import(lambda p: p.endswith("mlp.router.weight")):
        yield


@fault("fp32-param-via-bf16", "an fp32-kept parameter (router gate, e_score_correction_bias) is exported through bf16")
def _fp32_via_bf16():
    import torch

    def through_bf16(name, tensor):
        if name.endswith(("mlp.gate.weight", "e_score_correction_bias")) and tensor.dtype == torch.float32:
            tensor = tensor.to(torch.bfloat16).to(torch.float32)
        return name, tensor

    with _filtered_export(through_bf16):
        yield


@fault("partial-load", "one tensor (the final norm) silently keeps its initial values on load")
def _partial():
    with _unmapped_on_import(lambda p: p == "decoder.final_layernorm.weight"):
        yield


@fault("pp-layer-offset", "under PP > 1, global layer numbers of later stages are off by one")
def _layer_offset():
    from megatron.core import parallel_state

    def shift_later_stages(_param_name, out):
        if parallel_state.get_pipeline_model_parallel_rank() > 0 and (layer := keys.layer_number(out)) is not None:
            out = keys.renumber_layer(out, layer + 1)
        return out

    with _renamed_globally(shift_later_stages):
        yield


# Modules that bind the fsdp_dtensor handlers by name at import (``from ... import handle_...``):
# a regression in a handler reaches the save and load paths through these bindings.
_HANDLER_USERS = (_HANDLERS, "megatron.bridge.training.checkpointing", "megatron.core.optimizer.distrib_optimizer")


@contextlib.contextmanager
def _everywhere(name: str, replacement: Any) -> Iterator[Any]:
    """Replace the fsdp_dtensor handler ``name`` in its module and in every module of
    ``_HANDLER_USERS`` that bound it by name (as a regression in the handler itself would reach
    them); yields the original."""
    original = getattr(importlib.import_module(_HANDLERS), name)
    with contextlib.ExitStack() as stack:
        for module_path in _HANDLER_USERS:
            module = importlib.import_module(module_path)
            if getattr(module, name, None) is original:
                stack.enter_context(mock.patch.object(module, name, replacement))
        yield original


@contextlib.contextmanager
def _handed_model(handler_name: str, rewrap):
    """The fsdp_dtensor save/load path hands the handler a model at another wrapper depth."""
    original = getattr(importlib.import_module(_HANDLERS), handler_name)

    def handler(model, model_state_dict, optimizer_state_dict):
        return original(rewrap(model), model_state_dict, optimizer_state_dict)

    with _everywhere(handler_name, handler):
        yield


def _innermost(model):
    from harness.conversion.bridge_calls import unwrap

    return unwrap(model)


def _one_more_wrapper(model):
    from harness.checks.key_contract import MegatronFSDPStandIn

    return MegatronFSDPStandIn(model)


# The wrapped-key bug class: each fsdp_dtensor handler (name, fault-name stem) handed a model one
# wrapper too shallow or one too deep (suffix, how the model is rewrapped, description).
_WRAPPED_KEY_FAULTS = (
    ("handle_swiglu_in_state_dict", "swiglu"),
    ("handle_gdn_in_state_dict", "gdn"),
)
_REWRAPS = (
    ("unwrapped", _innermost, "is handed the unwrapped model (its lookups add 'module.')"),
    ("overwrapped", _one_more_wrapper, "is handed one wrapper more than its lookups strip"),
)


def _register_wrapped_key(handler_name: str, stem: str, how: str, rewrap, what: str) -> None:
    def apply():
        with _handed_model(handler_name, rewrap):
            yield

    fault(f"wrapped-key-{stem}-{how}", f"{handler_name} {what}")(apply)


for _handler, _stem in _WRAPPED_KEY_FAULTS:
    for _how, _rewrap, _what in _REWRAPS:
        _register_wrapped_key(_handler, _stem, _how, _rewrap, _what)


@fault("optimizer-wv-swapped", "the SwiGLU handler swaps the _w and _v halves of every fc1's optimizer state, on save "
                                "and load alike (the model halves are right; the round trip stays bitwise)")
def _optimizer_wv_swapped():
    def swap_halves(state: dict) -> dict:
        out = dict(state)
        w, v = keys.SWIGLU_SUFFIXES
        for key in state:
            if key.endswith(w) and (twin := key.removesuffix(w) + v) in state:
                out[key], out[twin] = state[twin], state[key]
        return out

    original = getattr(importlib.import_module(_HANDLERS), "handle_swiglu_in_state_dict")

    def handler(model, model_state_dict, optimizer_state_dict):
        new_model, new_optimizer = original(model, model_state_dict, optimizer_state_dict)
        if new_optimizer is not None:
            new_optimizer = {**new_optimizer, "state": swap_halves(new_optimizer["state"])}
        return new_model, new_optimizer

    with _everywhere("handle_swiglu_in_state_dict", handler):
        yield


@fault("fsdp-expert-index-local", "the fsdp_dtensor expert handlers lose the EP rank's expert offset "
                                  "(get_ep_layer_offset is 0), so every EP rank saves and loads experts 0..E/EP-1")
def _fsdp_expert_index_local():
    with patched(_HANDLERS, "get_ep_layer_offset", lambda num_experts=None: 0):
        yield


_UNEVEN = "megatron.core.distributed.fsdp.src.megatron_fsdp.uneven_dtensor"


def _last_rank() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1 and dist.get_rank() == dist.get_world_size() - 1


@fault("fsdp-shard-misplaced", "Megatron-FSDP's uneven-DTensor chunk metadata puts the last rank's shards at offset 0 "
                               "(written over the first rank's; the tail left uncovered)")
def _fsdp_shard_misplaced():
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    original = getattr(importlib.import_module(_UNEVEN), "gather_and_compute_chunk_metadata")

    def at_zero(dtensor):
        meta = original(dtensor)
        if _last_rank():
            return ChunkStorageMetadata(offsets=tuple(0 for _ in meta.offsets), sizes=meta.sizes)
        return meta

    with patched(_UNEVEN, "gather_and_compute_chunk_metadata", at_zero):
        yield


@fault("fsdp-shard-dropped", "the last rank writes none of its Megatron-FSDP shards (their chunks never reach the "
                             "checkpoint)")
def _fsdp_shard_dropped():
    original = getattr(importlib.import_module(_UNEVEN), "update_uneven_dtensor_chunk_metadata")

    def without_write_items(dtensor):
        original(dtensor)
        if _last_rank():
            dtensor._local_tensor.__create_write_items__ = lambda fqn, tensor: []

    with patched(_UNEVEN, "update_uneven_dtensor_chunk_metadata", without_write_items):
        yield


@fault("optimizer-load-skipped", "a checkpoint load leaves the DistributedOptimizer's state as it was (its "
                                 "load_state_dict does nothing)")
def _optimizer_load_skipped():
    with patched("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer", "load_state_dict",
                 lambda self, state_dict: None):
        yield


@fault("export-drops-final-norm", "export_hf_weights silently omits model.norm.weight")
def _export_drops_final_norm():
    with _filtered_export(lambda n, t: None if n == "model.norm.weight" else (n, t)):
        yield


# ------------------------------------------------------------------- faults of the harness itself
# Not conversion regressions: they make a rank hang or die, to prove the launcher copes.


@fault("launcher-hang", "every rank sleeps forever while loading HF weights")
def _hang():
    def sleep_forever(*_args, **_kwargs):
        while True:
            time.sleep(60)

    with patched("harness.conversion.bridge_calls", "load_hf", sleep_forever):
        yield


@contextlib.contextmanager
def _last_rank_dies(die):
    """The highest rank calls ``die()`` instead of loading HF weights; the others load."""
    from harness.conversion import bridge_calls

    original = bridge_calls.load_hf

    def load_or_die(*args, **kwargs):
        if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
            die()
        return original(*args, **kwargs)

    with patched("harness.conversion.bridge_calls", "load_hf", load_or_die):
        yield


@fault("launcher-crash", "the highest rank dies abruptly (exit 9) while loading HF weights")
def _crash():
    with _last_rank_dies(lambda: os._exit(9)):
        yield


@fault("rank-dies-mid-save", "the highest rank dies (exit 9) while DCP writes its checkpoint shards")
def _dies_mid_save():
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    original = FileSystemWriter.write_data

    def write_or_die(self, plan, planner):
        if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
            os._exit(9)
        return original(self, plan, planner)

    with patched("torch.distributed.checkpoint.filesystem:FileSystemWriter", "write_data", write_or_die):
        yield


@fault("save-refused-on-rank-0", "save_hf_pretrained raises on rank 0 only, as a strict save refusing an incomplete "
                                 "export does after its peers have gone on")
def _save_refused_on_rank_0():
    from megatron.bridge.models.conversion.auto_bridge import AutoBridge

    original = AutoBridge.save_hf_pretrained

    def save(self, *args, **kwargs):
        if int(os.environ.get("RANK", "0")) == 0:
            raise RuntimeError("55 tensors from the original checkpoint were not written (seeded)")
        return original(self, *args, **kwargs)

    with patched("megatron.bridge.models.conversion.auto_bridge:AutoBridge", "save_hf_pretrained", save):
        yield


@fault("launcher-kill", "the highest rank is killed by SIGKILL (as by the OOM killer) while loading HF weights")
def _kill():
    import signal

    with _last_rank_dies(lambda: os.kill(os.getpid(), signal.SIGKILL)):
        yield
