"""The GPU lane's runtime: NCCL, one rank per GPU (or several ranks per GPU over gloo, when asked:
``harness.matrix.lanes.Placement``), Megatron as users run it (TE layer spec, fused kernels),
with four adjustments, each recorded in ``provenance()`` because a reader of a GPU
result must know them (found on one H100 80GB at world size 1, with megatron-core 0.19.2,
megatron-bridge 0.6.2 and Transformer Engine 2.20.2 on torch 2.11.0+cu130; summarised in the
README, "The GPU lane"):

1. **dtype**: the model runs in fp32 unless the case is a ``@bf16`` variant. Some bridges force
   bf16 whatever the checkpoint says (gpt_oss_bridge.py sets ``bf16=True, params_dtype=bfloat16``;
   others force ``autocast_dtype``); an fp32 source would then be rounded on load and the weight
   round trip could not be bitwise.
2. **TF32 off**: ``NVIDIA_TF32_OVERRIDE=0`` must be in the rank's environment before CUDA starts
   (the launcher puts it there, ``harness.matrix.lanes.rank_environment``): TE's cuBLASLt GEMMs
   ask for TF32 on fp32 operands and ignore ``torch.backends.cuda.matmul.allow_tf32``
   (transformer_engine/common/gemm/cublaslt_gemm.cu). With TF32 the fp32 logit floor is 2.7e-3 to
   5.0e-3 instead of ~2e-6 (measured on an H100).
3. **gradient_accumulation_fusion off** when APEX's ``fused_weight_gradient_mlp_cuda`` cannot be
   imported: ColumnParallelLinear refuses to build otherwise
   (megatron/core/tensor_parallel/layers.py); the fusion only affects the backward pass.
4. **attention_backend auto** where a provider hard-codes ``flash`` but flash-attn is not installed
   or the model is fp32 (gemma3_provider.py): TE would find no backend at all. ``auto`` lets TE
   pick its unfused kernel, as for every other fp32 family; the per-layer windows are kept.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.matrix.layouts import Layout
from harness.matrix.model_spec import ModelSpec
from harness.runtimes.base import release_process_groups
from harness.matrix.lanes import GPU, Placement, rank_environment

DEFAULT_SEED = 1234


def apex_weight_grad_fusion_available() -> bool:
    """APEX's CUDA extension for gradient_accumulation_fusion (Megatron imports it by this name)."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@dataclass
class GpuRuntime:
    seed: int = DEFAULT_SEED
    placement: Placement = field(default_factory=Placement)
    lane = GPU
    use_cpu_initialization = False
    decisions: dict[str, Any] = field(default_factory=dict)  # what configure_provider changed, and why
    allowlisted: list[str] = field(default_factory=list)  # Megatron targets added for this runtime's life

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def backend(self) -> str:
        return self.placement.backend(self.world_size)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.placement.device_index(int(os.environ.get("LOCAL_RANK", "0"))))

    def __enter__(self) -> "GpuRuntime":
        missing = {k: v for k, v in rank_environment(GPU).items() if os.environ.get(k) != v}
        if missing:
            raise RuntimeError(f"the GPU lane needs {missing} in the rank's environment before CUDA starts "
                               "(TE's GEMMs ignore torch's allow_tf32); run ranks through harness.execution.rank_launcher")
        if not torch.cuda.is_available():
            raise RuntimeError("the GPU lane needs CUDA, and torch.cuda.is_available() is False")
        torch.cuda.set_device(self.device)
        # Plain torch matmuls follow these flags (TE's do not: see NVIDIA_TF32_OVERRIDE above).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return self

    def __exit__(self, *exc: Any) -> None:
        from harness.runtimes import layer_specs

        layer_specs.forget(self.allowlisted)

    def init_model_parallel(self, layout: Layout, seed: int | None = None) -> None:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        parallel_state.destroy_model_parallel()
        release_process_groups()  # destroy_model_parallel only forgets the old layout's groups
        parallel_state.initialize_model_parallel(**layout.megatron_kwargs())
        model_parallel_cuda_manual_seed(self.seed if seed is None else seed)

    def configure_provider(self, provider, model: ModelSpec) -> None:
        """Upstream defaults (TE spec, fused kernels), but for the four adjustments above; a
        ``@local`` case builds megatron-core's local spec instead."""
        if model.local_spec:
            from harness.runtimes import layer_specs

            provider.transformer_layer_spec = layer_specs.local_block_spec
            layer_specs.allow_target(self.allowlisted)
            self.decisions["layer_spec"] = "megatron-core local spec (@local)"
        dtype = torch.bfloat16 if model.bf16 else torch.float32
        for name, value in (("params_dtype", dtype), ("pipeline_dtype", dtype), ("autocast_dtype", dtype),
                            ("bf16", model.bf16), ("fp16", False)):
            if hasattr(provider, name):
                setattr(provider, name, value)
        self.decisions["dtype"] = str(dtype).removeprefix("torch.")
        if getattr(provider, "gradient_accumulation_fusion", False) and not apex_weight_grad_fusion_available():
            provider.gradient_accumulation_fusion = False
            self.decisions["gradient_accumulation_fusion"] = "off: APEX fused_weight_gradient_mlp_cuda not importable"
        backend = getattr(provider, "attention_backend", None)
        if backend is not None and getattr(backend, "name", "") == "flash" and (not model.bf16 or not flash_attn_installed()):
            provider.attention_backend = type(backend).auto
            self.decisions["attention_backend"] = (
                "auto instead of flash: " + ("fp32 model" if not model.bf16 else "flash-attn not installed"))

    def provenance(self) -> dict[str, Any]:
        return {"lane": self.lane, "environment": rank_environment(GPU), "backend": self.backend,
                "ranks_per_gpu": self.placement.ranks_per_gpu, "provider_decisions": dict(self.decisions)}
