"""Run real, unmodified Megatron (and Megatron-FSDP) on CPU (gloo).

This is the ONE place where the harness adapts Megatron to a machine without CUDA. It does five
things, and only for the duration of a run (``CpuRuntime`` is a context manager):

1. parallel-state init without CUDA: ``initialize_model_parallel`` plus the *inference* RNG
   tracker (``model_parallel_cuda_manual_seed`` needs CUDA; the inference tracker makes
   ``get_cuda_rng_tracker().fork()`` a no-op context);
2. the provider's own TE layer spec, as users run it (TE's classes are built; their forwards are
   plain torch: ``harness.runtimes.te_cpu``), or megatron-core's local spec for a ``@local`` case;
3. provider flags that select fused CUDA kernels are turned off; the model is fp32, or bf16 for
   a ``@bf16`` case (Megatron-FSDP's mixed precision: ``Float16Module`` and fp32 main weights);
4. the ``REDIRECTS`` table: each row names one upstream call that needs CUDA, what it becomes on
   CPU and why that changes nothing under test. A redirect may change *where* a tensor lives
   (placement), *which kernel* computes (the optimizer's Adam kernel) or how a collective
   travels (gloo instead of NCCL); never what is converted, saved or loaded;
5. for a ``@local`` case, the saved ``run_config.yaml`` of a torch_dist checkpoint names
   ``harness.runtimes.layer_specs.local_block_spec``; Megatron-Bridge only instantiates
   allow-listed targets, so that one exact name is added to Megatron's public
   ``target_allowlist`` and removed again on exit.

Nothing here is applied at import time. Every redirect is a ``unittest.mock.patch.object`` on one
``ExitStack``, so each is undone on exit, exception or not, and one that fails to install undoes
those before it (tests/unit/test_cpu_runtime.py proves it). The GPU lane never enters this
context. What the CPU lane therefore does not test is ``harness.matrix.lanes.NOT_TESTED``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode

from harness.matrix.layouts import Layout
from harness.matrix.model_spec import ModelSpec
from harness.runtimes import gdn_cpu, layer_specs, te_cpu
from harness.runtimes.base import release_process_groups

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

# MoE settings whose defaults need CUDA (observed with megatron-core 0.19.2):
# - the alltoall dispatcher creates a CUDA stream in __init__; allgather does not;
# - the router GEMM goes through TE's fused GEMM (not a module) unless the router runs in fp64.
# Grouped experts (TEGroupedMLP, the experts.linear_fc1.weight<i> names the bridges map) on the TE
# spec, SequentialMLP on the local spec (configure_provider).
CPU_MOE_FLAGS: dict[str, Any] = {
    "moe_token_dispatcher_type": "allgather",
    "moe_router_dtype": "fp64",
    "moe_shared_expert_overlap": False,
    "moe_permute_fusion": False,
}


def dtype_flags(model: ModelSpec) -> dict[str, Any]:
    """fp32 everywhere (round trips bitwise, logits comparable to HF's fp32), except a ``@bf16``
    case: bf16 parameters, as Megatron-FSDP's mixed precision runs them on a GPU."""
    dtype = torch.bfloat16 if model.bf16 else torch.float32
    return {"params_dtype": dtype, "pipeline_dtype": dtype, "autocast_dtype": dtype, "bf16": model.bf16,
            "fp16": False}


# ------------------------------------------------------------------------------ redirects


class CpuDeviceOrdinal(str):
    """What ``torch.cuda.current_device()`` returns on the CPU lane: ``"cpu"`` wherever it is used
    as a device (``device=current_device()``, ``.to(current_device())``), and ``0`` where it is
    formatted into a device string that is only compared, never allocated on
    (megatron_fsdp.py: ``if self.device != torch.device(f"cuda:{torch.cuda.current_device()}")``
    warns; the adapter is handed the CPU device explicitly, see ``_fsdp_adapter_on_cpu``)."""

    def __format__(self, spec: str) -> str:
        return "0"


def _cpu_current_device(_original: Callable) -> Callable[[], str]:
    def current_device() -> str:
        return CpuDeviceOrdinal("cpu")

    return current_device


def _noop(_original: Callable) -> Callable[..., None]:
    def noop(*_args: Any, **_kwargs: Any) -> None:
        return None

    return noop


def _cpu_rng_state(_original: Callable) -> Callable[..., torch.Tensor]:
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    return get_rng_state


def _stays_put(_original: Callable) -> Callable[..., torch.Tensor]:
    def cuda(self: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        return self

    return cuda


def _gloo_for_nccl(original: Callable) -> Callable:
    @functools.wraps(original)
    def init_process_group(backend=None, *args, **kwargs):
        return original("gloo" if backend in (None, "nccl") else backend, *args, **kwargs)

    return init_process_group


def _cuda_check_passes(original: Callable) -> Callable:
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):  # noqa: N807 - replaces an __init__
        with mock.patch.object(torch.cuda, "is_available", lambda: True):
            return original(self, *args, **kwargs)

    return __init__


def _is(replacement: Any) -> Callable[[Any], Any]:
    return lambda _original: replacement


def _mesh_on_cpu(original: Callable) -> Any:
    def from_group(group, device_type, *args, **kwargs):
        return original(group, "cpu", *args, **kwargs)

    return staticmethod(from_group)


def _fsdp_adapter_on_cpu(original: Callable) -> Callable:
    @functools.wraps(original)
    def __init__(self, *args, device=None, **kwargs):  # noqa: N807 - replaces an __init__
        return original(self, *args, device=torch.device("cpu") if device is None else device, **kwargs)

    return __init__


def _uneven_all_gather(original: Callable) -> Callable:
    """``dist.all_gather`` with NCCL's contract for outputs of different sizes (each rank's
    tensor lands whole in its slot), which gloo refuses ("invalid tensor size"). Only such calls
    are diverted: every input is padded to the largest size, gathered with the same collective,
    and each slot takes its first n elements. Equal sizes go to the original."""

    @functools.wraps(original)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        sizes = {t.numel() for t in tensor_list} | {tensor.numel()}
        if len(sizes) == 1:
            return original(tensor_list, tensor, group=group, async_op=async_op)
        largest = max(sizes)
        padded = [torch.empty(largest, dtype=t.dtype, device=t.device) for t in tensor_list]
        mine = torch.zeros(largest, dtype=tensor.dtype, device=tensor.device)
        mine[: tensor.numel()] = tensor.reshape(-1)
        original(padded, mine, group=group)
        for out, got in zip(tensor_list, padded):
            out.view(-1).copy_(got[: out.numel()])
        return None

    return all_gather


def cpu_multi_tensor_adam(chunk_size, noop_flag, tensor_lists, lr, beta1, beta2, eps, step, mode,
                          bias_correction, weight_decay, *_rest):
    """TE's ``multi_tensor_adam`` kernel (transformer_engine/common/multi_tensor/adam.cu) in plain
    torch, fp32 math: mode 1 is AdamW (decoupled weight decay), mode 0 Adam with L2. Lists are
    [grads, params, exp_avg, exp_avg_sq]; updated in place."""
    grads, params, exp_avgs, exp_avg_sqs = tensor_lists[:4]
    correction1 = 1 - beta1 ** step if bias_correction else 1.0
    correction2 = 1 - beta2 ** step if bias_correction else 1.0
    for grad, param, exp_avg, exp_avg_sq in zip(grads, params, exp_avgs, exp_avg_sqs):
        g, p = grad.float(), param.float()
        if mode == 0:
            g = g + weight_decay * p
        m = exp_avg.float().mul(beta1).add(g, alpha=1 - beta1)
        v = exp_avg_sq.float().mul(beta2).addcmul(g, g, value=1 - beta2)
        update = (m / correction1) / ((v / correction2).sqrt() + eps)
        if mode == 1:
            update = update + weight_decay * p
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        param.copy_(p - lr * update)


class _FactoriesOnCpu(TorchFunctionMode):
    """Inside it, a tensor factory asked for a CUDA device gets the CPU; nothing else changes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def _device_index_placed_on_cpu(function: Callable[..., Any]) -> Callable[..., Any]:
    """For code that builds ``torch.device("cuda", torch.cuda.current_device())``, which needs an
    int index: inside it the current device is index 0, and every tensor asked onto a CUDA device
    (a factory or ``.to``) lands on the CPU."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        with mock.patch.object(torch.cuda, "current_device", lambda: 0), _FactoriesOnCpu():
            return function(*args, **kwargs)

    return call


def _placed_on_cpu(function: Callable[..., Any]) -> Callable[..., Any]:
    """The upstream function runs unchanged, with its tensor factories placed on the CPU."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _FactoriesOnCpu():
            return function(*args, **kwargs)

    return call


@dataclass(frozen=True)
class Redirect:
    """One upstream call that needs CUDA, and what it is on the CPU lane.

    ``owner`` is a module path, ``module:Class`` for a class attribute; ``make`` takes the
    original and returns the replacement; ``needed_by`` names the upstream caller; ``why`` says
    why the replacement changes nothing the harness checks.
    """

    owner: str
    attribute: str
    make: Callable[[Any], Any]
    needed_by: str
    why: str

    @property
    def name(self) -> str:
        return f"{self.owner.replace(':', '.')}.{self.attribute}"

    def resolve(self) -> Any:
        module_path, _, class_name = self.owner.partition(":")
        owner: Any = importlib.import_module(module_path)
        return getattr(owner, class_name) if class_name else owner

    def patch(self) -> Any:
        owner = self.resolve()
        original = getattr(owner, self.attribute, None)
        return mock.patch.object(owner, self.attribute, self.make(original), create=original is None)


R = Redirect
REDIRECTS: tuple[Redirect, ...] = (
    R("torch.cuda", "current_device", _cpu_current_device,
      "RotaryEmbedding.get_emb (.to(current_device())); Megatron-FSDP buffers (utils.py, device=current_device()); "
      "megatron_fsdp.py's device check",
      "placement only: a tensor asked for 'the current CUDA device' is made on the CPU"),
    R("torch.cuda", "synchronize", _noop,
      "the async checkpoint writer; Megatron-FSDP's param_and_grad_buffer.py",
      "waits for GPU work; CPU work is synchronous"),
    R("torch.cuda", "get_rng_state", _cpu_rng_state,
      "the bridge's training/checkpointing.py get_rng_state (collected even with save_rng=False)",
      "RNG bookkeeping only; the harness never saves or loads RNG state"),
    R("torch:Tensor", "cuda", _stays_put,
      "tied embeddings at PP > 1 (weight.data.cuda() before the all-reduce); uneven_dtensor.py's boundary check",
      "placement only: the tensor stays where it is, values untouched"),
    R("torch.cuda", "set_device", _noop,
      "Megatron-LM's tools/checkpoint/checkpoint_inspector.py init_process_group (torch.cuda.set_device(local_rank))",
      "placement only: there is one device, the CPU"),
    R("torch.distributed", "init_process_group", _gloo_for_nccl,
      "checkpoint_inspector.py init_process_group(backend='nccl')",
      "transport only: the same collectives over gloo; the ranks, their number and the groups are unchanged"),
    R("torch.cuda", "Stream", _is(torch.cpu.Stream),
      "megatron/training/models/dist_utils.py _ddp_wrap; MegatronFSDP.__init__ (side streams)",
      "CPU work runs in order on one stream, so a stream is only a handle"),
    R("torch.cuda", "current_stream", _is(torch.cpu.current_stream),
      "dist_utils.py _ddp_wrap (wait_stream); Megatron-FSDP's gather/reduce paths",
      "as Stream"),
    R("torch.distributed.device_mesh:DeviceMesh", "from_group", _mesh_on_cpu,
      "mcore_fsdp_adapter.py _init_dist_index (DeviceMesh.from_group(..., device_type='cuda'))",
      "the mesh the DTensors are sharded on keeps its groups, rank layout and dim names; only its device type is CPU"),
    R("megatron.core.distributed.fsdp.mcore_fsdp_adapter:FullyShardedDataParallel", "__init__", _fsdp_adapter_on_cpu,
      "the bridge's _ddp_wrap builds the adapter without a device (default cuda:{current_device()})",
      "placement only: the adapter is given the CPU device, as a caller may; no other argument changes"),
    R("torch.distributed", "all_gather", _uneven_all_gather,
      "megatron_fsdp uneven_dtensor.py uneven_dtensor_to_full_tensor (export_hf_weights of every DTensor parameter)",
      "transport only: NCCL accepts outputs of different sizes, gloo does not; the padded gather returns "
      "exactly what NCCL returns (equal sizes go to the original)"),
    R("transformer_engine_torch", "multi_tensor_adam", _is(cpu_multi_tensor_adam),
      "TE FusedAdam.step, which the DistributedOptimizer runs with zero gradients to create the states a "
      "checkpoint load then overwrites (distrib_optimizer.py _init_optimizer_states_with_dummy_values)",
      "which kernel computes: the same Adam update in plain torch; every value it writes is replaced by the load"),
    R("transformer_engine.pytorch.optimizers.fused_adam:FusedAdam", "__init__", _placed_on_cpu,
      "FusedAdam.__init__ (its overflow flag: torch.tensor([0], device='cuda'))",
      "placement only: the constructor runs unchanged with its tensor factories on the CPU"),
    R("megatron.core.optimizer.optimizer:MixedPrecisionOptimizer", "__init__", _placed_on_cpu,
      "the DistributedOptimizer's base constructor (found_inf, overflow flag, scale: torch.tensor(..., device='cuda'))",
      "placement only: the constructor runs unchanged with its tensor factories on the CPU"),
    # Transformer Engine: TE's own classes are built (names, shapes, _extra_state and every attribute
    # megatron-core's wrappers read stay TE's); only the kernels of their forward are plain torch
    # (harness.runtimes.te_cpu, each checked against a reference formula in tests/unit/test_te_cpu.py).
    R("transformer_engine.pytorch.module.base:TransformerEngineBaseModule", "__init__", _cuda_check_passes,
      "every TE module's constructor (module/base.py: 'TransformerEngine needs CUDA.' when torch.cuda.is_available() "
      "is False)",
      "the check alone is let through, for the constructor only; the parameters are made where megatron-core asks "
      "(device='cpu' under use_cpu_initialization)"),
    R("transformer_engine.pytorch:DotProductAttention", "__init__", _placed_on_cpu,
      "TE DotProductAttention.__init__ (the attention-sink offset: torch.zeros(..., device='cuda'))",
      "placement only: the constructor runs unchanged with its tensor factories on the CPU"),
    *(R(f"transformer_engine.pytorch:{cls}", "forward", _is(getattr(te_cpu, fn)),
        f"te.pytorch.{cls}.forward (CUDA kernels), called by megatron-core's {wrapper}",
        f"which kernel computes: {what}, in plain torch (harness/runtimes/te_cpu.py)")
      for cls, fn, wrapper, what in (
          ("Linear", "linear_forward", "TELinear / TEColumnParallelLinear / TERowParallelLinear",
           "the GEMM, bias and TP communication (megatron's mappings)"),
          ("LayerNormLinear", "layernorm_linear_forward", "TELayerNormColumnParallelLinear",
           "the fused norm and GEMM"),
          ("GroupedLinear", "grouped_linear_forward", "TEColumn/RowParallelGroupedLinear (TEGroupedMLP)",
           "one GEMM per expert"),
          ("DotProductAttention", "dot_product_attention_forward", "TEDotProductAttention",
           "masked softmax attention (GQA, windows, softcap, sinks)"),
          ("LayerNorm", "layer_norm_forward", "TENorm", "the norm"),
          ("RMSNorm", "rms_norm_forward", "TENorm and q/k norms", "the norm"),
      )),
    # Gated DeltaNet: flash-linear-attention's Triton kernels, bound by name in megatron-core's GDN modules.
    R("megatron.core.ssm.gated_delta_net.gdn", "causal_conv1d", _is(gdn_cpu.causal_conv1d),
      "GatedDeltaNet.forward (fla causal_conv1d, Triton)",
      "which kernel computes: the depthwise causal convolution megatron-core's deterministic_mode branch runs"),
    R("megatron.core.ssm.gated_delta_net.gdn", "chunk_gated_delta_rule", _is(gdn_cpu.chunk_gated_delta_rule),
      "GatedDeltaNet.__init__ binds fla's chunk_gated_delta_rule (Triton) as its recurrence",
      "which kernel computes: megatron-core's own torch_chunk_gated_delta_rule"),
    R("megatron.core.ssm.gated_delta_net.common", "l2norm", _is(gdn_cpu.l2norm),
      "GatedDeltaNet._prepare_input_for_gated_delta_rule (fla l2norm, Triton)",
      "which kernel computes: fla's l2norm formula in plain torch"),
    R("megatron.bridge.models.minimax_m2.minimax_m2_bridge:_FullDimQKNormMapping", "hf_to_megatron",
      _device_index_placed_on_cpu,
      "the MiniMax-M2 full-width q/k-norm mapping at TP > 1 (torch.device('cuda', torch.cuda.current_device()) "
      "before a broadcast to the TP ranks)",
      "placement only: the weight is broadcast and sliced unchanged, on the CPU"),
    R("megatron.bridge.models.gemma.gemma2_provider", "get_swa", _placed_on_cpu,
      "Gemma2DotProductAttention.forward's sliding-window mask (gemma2_provider.py get_swa: device='cuda')",
      "placement only: the mask is built unchanged, on the CPU"),
    R("megatron.core.fusions.fused_softmax", "get_sliding_window_causal_mask", _placed_on_cpu,
      "the local spec's softmax (gpt-oss, gemma sliding windows): megatron/core/transformer/utils.py",
      "placement only: the mask is built unchanged, on the CPU"),
)

_ACTIVE_LOCK = threading.Lock()


@dataclass
class CpuRuntime:
    """Context manager that makes Megatron run on CPU for one run, then undoes everything."""

    redirects: tuple[Redirect, ...] = REDIRECTS
    _stack: contextlib.ExitStack | None = field(default=None, init=False, repr=False)
    _allowlisted: list[str] = field(default_factory=list, init=False, repr=False)
    provider_fields_set: set[str] = field(default_factory=set, init=False, repr=False)  # by configure_provider

    lane = "cpu"
    backend = "gloo"
    device = torch.device("cpu")
    use_cpu_initialization = True

    @property
    def touched_names(self) -> list[str]:
        return sorted(r.name for r in self.redirects)

    def __enter__(self) -> "CpuRuntime":
        if not _ACTIVE_LOCK.acquire(blocking=False):
            raise RuntimeError("CpuRuntime is already active; it is not re-entrant")
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(self._forget_allowlisted)
                for redirect in self.redirects:
                    stack.enter_context(redirect.patch())
                self._stack = stack.pop_all()
        except BaseException:
            _ACTIVE_LOCK.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                stack.close()
        finally:
            _ACTIVE_LOCK.release()

    def _forget_allowlisted(self) -> None:
        layer_specs.forget(self._allowlisted)

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
        """Make a bridge provider build a CPU-runnable model: the provider's own TE spec (TE's
        classes, forwards from ``te_cpu``), or megatron-core's local spec for a ``@local`` case."""
        if model.local_spec:
            provider.transformer_layer_spec = layer_specs.local_block_spec
            # The local torch norm rejects sequence parallelism; harness.matrix.lanes says what that costs.
            provider.sequence_parallel = False
            layer_specs.allow_target(self._allowlisted)
        moe = {**CPU_MOE_FLAGS, "moe_grouped_gemm": not model.local_spec} if model.is_moe else {}
        for flags in (CPU_UNSAFE_PROVIDER_FLAGS, dtype_flags(model), moe):
            for key, value in flags.items():
                if hasattr(provider, key):
                    setattr(provider, key, value)
                    self.provider_fields_set.add(key)
        provider.use_cpu_initialization = True

    def provenance(self) -> dict[str, Any]:
        return {"lane": self.lane, "redirected": self.touched_names,
                "provider_flags_off": sorted(CPU_UNSAFE_PROVIDER_FLAGS),
                # Whatever a bridge sets these to, this lane replaces it: no CPU case can show it.
                "provider_fields_set": sorted(self.provider_fields_set),
                "te_forwards": "harness.runtimes.te_cpu (TE's classes, plain-torch forwards)"}
