"""The GPU lane's runtime: NCCL, one rank per GPU, Megatron as upstream configures it.

It redirects nothing and keeps the provider's default (Transformer Engine) layer spec: this lane
tests what users run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from harness.matrix.layouts import Layout
from harness.matrix.zoo import ModelSpec

DEFAULT_SEED = 1234


@dataclass
class GpuRuntime:
    seed: int = DEFAULT_SEED
    lane = "gpu"
    backend = "nccl"
    use_cpu_initialization = False

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    def __enter__(self) -> "GpuRuntime":
        if not torch.cuda.is_available():
            raise RuntimeError("the GPU lane needs CUDA, and torch.cuda.is_available() is False")
        torch.cuda.set_device(self.device)
        # Logit parity is judged in fp32: TF32 matmuls would add ~1e-3 relative noise.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def init_model_parallel(self, layout: Layout, seed: int | None = None) -> None:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(**layout.megatron_kwargs())
        model_parallel_cuda_manual_seed(self.seed if seed is None else seed)

    def configure_provider(self, provider, model: ModelSpec) -> None:
        # Upstream defaults (TE spec, fused kernels) on purpose: this lane tests what users run.
        return None

    def provenance(self) -> dict[str, Any]:
        return {"lane": self.lane}
