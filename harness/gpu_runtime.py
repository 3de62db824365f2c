"""The GPU lane's runtime: NCCL, one rank per GPU, Megatron exactly as upstream configures it.

It has the same shape as ``CpuRuntime`` so the case runner does not care which lane it is on, but
it redirects nothing and keeps the provider's default (Transformer Engine) layer spec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from harness.layouts import Layout


@dataclass
class GpuRuntime:
    seed: int = 1234
    backend = "nccl"

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def touched(self) -> list[str]:
        return []

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

    def init_model_parallel(self, layout: Layout) -> None:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(**layout.megatron_kwargs())
        model_parallel_cuda_manual_seed(self.seed)

    def forward_blocker(self, layout: Layout, family, moe: bool) -> str:
        if layout.cp > 1:
            return "CP > 1 needs the load-balanced sequence split in the forward pass; logits are checked at CP1"
        return ""

    def configure_provider(self, provider, *, is_moe: bool) -> None:
        # Upstream defaults (TE spec, fused kernels) on purpose: this lane tests what users run.
        return None
