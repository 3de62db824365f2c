"""Run real, unmodified Megatron on CPU (gloo, fp32).

This is the ONE place where the harness adapts Megatron to a machine without CUDA. It does five
things, and only for the duration of a run (``CpuRuntime`` is a context manager):

1. parallel-state init without CUDA: ``initialize_model_parallel`` plus the *inference* RNG
   tracker (``model_parallel_cuda_manual_seed`` needs CUDA; the inference tracker makes
   ``get_cuda_rng_tracker().fork()`` a no-op context);
2. the local (non-TE) *block* spec: a local layer spec alone still builds TE's final norm;
3. provider flags that select fused CUDA kernels are turned off, and the model is fp32;
4. a handful of ``torch.cuda`` calls that only *decide placement* (``current_device``) or only
   wait/record (``synchronize``, ``get_rng_state``) are redirected to CPU equivalents, and the few
   upstream functions that allocate with a hard-coded ``device="cuda"`` (``CUDA_PLACED_CALLS``)
   run with their tensor factories placed on the CPU (a ``TorchFunctionMode``; the function
   itself runs unchanged);
5. the saved ``run_config.yaml`` of a torch_dist checkpoint names the provider's layer-spec
   callable, here ``harness.runtimes.cpu.local_block_spec``; Megatron-Bridge only instantiates
   allow-listed targets, so that one exact name is added to Megatron's public
   ``target_allowlist`` (``add_exact``) and removed again on exit.

A redirect may change where a tensor lives; it must never change keys or values. Nothing here is
applied at import time, and every redirected attribute is restored on exit, exception or not
(tests/unit/test_cpu_runtime.py proves it). The GPU lane never enters this context.
"""

from __future__ import annotations

import functools
import importlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from harness.matrix.layouts import Layout
from harness.matrix.zoo import ModelSpec

# Provider fields that select fused CUDA kernels; each has a plain-PyTorch fallback.
CPU_UNSAFE_PROVIDER_FLAGS: dict[str, Any] = {
    "persist_layer_norm": False,
    "gradient_accumulation_fusion": False,
    "masked_softmax_fusion": False,
    "bias_activation_fusion": False,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
    "cross_entropy_loss_fusion": False,
}

# fp32 everywhere on CPU: the round trip must be bitwise and logits comparable to HF's fp32.
CPU_DTYPE_FLAGS: dict[str, Any] = {
    "params_dtype": torch.float32,
    "pipeline_dtype": torch.float32,
    "bf16": False,
    "fp16": False,
}

# MoE settings whose defaults need CUDA (observed with megatron-core 0.19.2):
# - the alltoall dispatcher creates a CUDA stream in __init__; allgather does not;
# - the router GEMM goes through TE unless the router runs in fp64.
CPU_MOE_FLAGS: dict[str, Any] = {
    "moe_token_dispatcher_type": "allgather",
    "moe_router_dtype": "fp64",
    "moe_shared_expert_overlap": False,
    "moe_permute_fusion": False,
    "moe_grouped_gemm": False,
}


def _cpu_current_device() -> str:
    return "cpu"


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _noop(*_args: Any, **_kwargs: Any) -> None:
    return None


def _tensor_stays_put(self: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
    return self


# (owner, attribute) -> CPU replacement. Placement, synchronisation and RNG bookkeeping only.
CUDA_REDIRECTS: dict[tuple[Any, str], Callable[..., Any]] = {
    (torch.cuda, "current_device"): _cpu_current_device,  # used as `device=` for new tensors
    (torch.cuda, "synchronize"): _noop,  # async checkpoint writer waits on the GPU
    (torch.cuda, "get_rng_state"): _cpu_get_rng_state,  # checkpoint save collects RNG state even if unused
    # Tied embeddings with PP > 1: the last stage's copy of the embedding is moved with
    # `weight.data.cuda()` before the all-reduce that syncs it with the first stage.
    (torch.Tensor, "cuda"): _tensor_stays_put,
}


# Upstream functions that allocate with a hard-coded device="cuda" and nothing else CUDA-only:
# they run unchanged, with their tensor factories placed on the CPU.
CUDA_PLACED_CALLS: tuple[tuple[str, str], ...] = (
    # The sliding-window attention mask (gpt-oss, gemma): megatron/core/transformer/utils.py,
    # called by name from the local spec's softmax.
    ("megatron.core.fusions.fused_softmax", "get_sliding_window_causal_mask"),
)


class _FactoriesOnCpu(TorchFunctionMode):
    """Inside it, a tensor factory asked for a CUDA device gets the CPU; nothing else changes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def _placed_on_cpu(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _FactoriesOnCpu():
            return function(*args, **kwargs)

    return call


def placed_call_redirects() -> dict[tuple[Any, str], Callable[..., Any]]:
    """``CUDA_PLACED_CALLS`` resolved (imports the modules) and wrapped."""
    out = {}
    for module_path, attribute in CUDA_PLACED_CALLS:
        module = importlib.import_module(module_path)
        out[(module, attribute)] = _placed_on_cpu(getattr(module, attribute))
    return out


def _name(key: tuple[Any, str]) -> str:
    owner, attribute = key
    return f"{owner.__module__}.{owner.__name__}.{attribute}" if isinstance(owner, type) else f"{owner.__name__}.{attribute}"

_ACTIVE_LOCK = threading.Lock()


def local_block_spec(config, vp_stage: int | None = None):
    """Provider ``transformer_layer_spec`` that builds the whole block without TE."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization=config.normalization, vp_stage=vp_stage
    )


@dataclass
class CpuRuntime:
    """Context manager that makes Megatron run on CPU for one run, then undoes everything."""

    redirects: dict[tuple[Any, str], Callable[..., Any]] = field(
        default_factory=lambda: {**CUDA_REDIRECTS, **placed_call_redirects()})
    _saved: dict[tuple[Any, str], Any] = field(default_factory=dict, init=False, repr=False)
    _missing: set[tuple[Any, str]] = field(default_factory=set, init=False, repr=False)
    _allowlisted: list[str] = field(default_factory=list, init=False, repr=False)

    lane = "cpu"
    backend = "gloo"
    device = torch.device("cpu")
    use_cpu_initialization = True

    @property
    def touched(self) -> list[tuple[Any, str]]:
        """The (owner, attribute) pairs this runtime replaces while active."""
        return list(self.redirects)

    @property
    def touched_names(self) -> list[str]:
        return sorted(_name(key) for key in self.redirects)

    def __enter__(self) -> "CpuRuntime":
        if not _ACTIVE_LOCK.acquire(blocking=False):
            raise RuntimeError("CpuRuntime is already active; it is not re-entrant")
        try:
            for (owner, attribute), replacement in self.redirects.items():
                if attribute in vars(owner):
                    self._saved[(owner, attribute)] = vars(owner)[attribute]
                else:
                    self._missing.add((owner, attribute))
                setattr(owner, attribute, replacement)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        try:
            for (owner, attribute), original in self._saved.items():
                setattr(owner, attribute, original)
            for owner, attribute in self._missing:
                if attribute in vars(owner):
                    delattr(owner, attribute)
            if self._allowlisted:
                from megatron.training.config.instantiate_utils import target_allowlist

                for target in self._allowlisted:
                    target_allowlist.remove_exact(target)
        finally:
            self._saved.clear()
            self._missing.clear()
            self._allowlisted.clear()
            _ACTIVE_LOCK.release()

    def _allow_target(self, target: str) -> None:
        from megatron.training.config.instantiate_utils import target_allowlist

        if not target_allowlist.is_allowed(target):
            target_allowlist.add_exact(target)
            self._allowlisted.append(target)

    # -- Megatron setup ------------------------------------------------------------------------

    def init_model_parallel(self, layout: Layout, seed: int | None = None) -> None:
        """Megatron parallel state for ``layout`` on an existing gloo process group. ``seed`` is
        not used: the inference RNG tracker has no state to seed (weights come from the sentinel
        fill and the load, never from an RNG)."""
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import initialize_rng_tracker

        parallel_state.destroy_model_parallel()
        release_process_groups()
        parallel_state.initialize_model_parallel(**layout.megatron_kwargs())
        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)

    def configure_provider(self, provider, model: ModelSpec) -> None:
        """Make a bridge provider build a CPU-runnable fp32 model with the local spec."""
        provider.transformer_layer_spec = local_block_spec
        # The local torch norm rejects sequence parallelism; harness.runtimes.lanes says what that costs.
        provider.sequence_parallel = False
        self._allow_target(f"{local_block_spec.__module__}.{local_block_spec.__qualname__}")
        for flags in (CPU_UNSAFE_PROVIDER_FLAGS, CPU_DTYPE_FLAGS, CPU_MOE_FLAGS if model.is_moe else {}):
            for key, value in flags.items():
                if hasattr(provider, key):
                    setattr(provider, key, value)
        provider.use_cpu_initialization = True

    def provenance(self) -> dict[str, Any]:
        return {"lane": self.lane, "redirected": self.touched_names,
                "provider_flags_off": sorted(CPU_UNSAFE_PROVIDER_FLAGS), "dtype": "float32"}


def release_process_groups() -> int:
    """Destroy every process group but the default one; returns how many.

    ``parallel_state.destroy_model_parallel`` only forgets its ~20 groups (megatron/core/
    parallel_state.py sets the globals to None), so each re-initialisation leaves them alive, each
    with its gloo threads (measured: 60 more threads per initialisation, in every rank). Over a
    rank group's cases that is thousands of threads and a load average in the hundreds on 2 cores.
    Called between layouts, when no model of the old one is used any more (harness.conversion
    deletes it first); the default group, the rank group's own, stays.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    stale = [pg for pg in list(distributed_c10d._world.pg_map) if pg is not distributed_c10d.GroupMember.WORLD]
    for pg in stale:
        dist.destroy_process_group(pg)
    return len(stale)

