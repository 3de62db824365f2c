"""The HF side of every comparison runs on the CPU, in fp32, in plain torch, on every lane.

On a CUDA machine transformers binds CUDA-only kernels at import time where they are installed:
Qwen3-Next takes flash-linear-attention's gated-delta-rule kernels and ``FusedRMSNormGated``
(transformers/models/qwen3_next/modeling_qwen3_next.py), and they then receive the CPU tensors of
the reference ("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)", the H100
run). Those kernels also compute in TF32, which would spoil an fp32 reference. While an HF model
is *built* inside ``pure_torch_reference()`` its modules take the pure-torch implementations
transformers ships for machines without the kernels; the globals are restored on exit. Only
where the reference computes changes, never keys or values.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Iterator
from unittest import mock

# module -> {global: value meaning "not installed"} (the values transformers itself uses then).
CUDA_ONLY_FAST_PATHS: dict[str, dict[str, Any]] = {
    "transformers.models.qwen3_next.modeling_qwen3_next": {
        "FusedRMSNormGated": None, "chunk_gated_delta_rule": None, "fused_recurrent_gated_delta_rule": None,
        "causal_conv1d_fn": None, "causal_conv1d_update": None, "is_fast_path_available": False,
    },
}


@contextlib.contextmanager
def pure_torch_reference() -> Iterator[None]:
    """Build HF models inside this block: they take transformers' pure-torch code paths."""
    with contextlib.ExitStack() as stack:
        for module_path, values in CUDA_ONLY_FAST_PATHS.items():
            try:
                module = importlib.import_module(module_path)
            except ImportError:
                continue
            for name, value in values.items():
                if hasattr(module, name):
                    stack.enter_context(mock.patch.object(module, name, value))
        yield
