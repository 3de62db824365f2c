"""Plain-torch kernels for megatron-core's Gated DeltaNet layer on the CPU lane.

megatron/core/ssm/gated_delta_net calls three flash-linear-attention kernels, all Triton (GPU
only): ``causal_conv1d``, ``l2norm`` and ``chunk_gated_delta_rule``. While a CPU run is active
(``harness.runtimes.cpu.REDIRECTS``) they are:

* ``causal_conv1d``: the depthwise causal convolution plus activation, exactly the torch branch
  megatron-core's own ``GatedDeltaNet.forward`` takes in ``deterministic_mode`` (F.conv1d over
  ``[b, d, s]``, cut to the sequence length);
* ``l2norm``: fla's ``l2norm_fwd`` formula, ``x / sqrt(sum(x^2) + eps)`` in fp32 (fla/modules/norm/
  l2norm.py ``l2norm_fwd_kernel_row``);
* ``chunk_gated_delta_rule``: megatron-core's own ``torch_chunk_gated_delta_rule``
  (gated_delta_net/common.py), its torch-native implementation of the same chunked recurrence.

Only which kernel computes the forward changes; the layer, its parameters and the fsdp_dtensor
handlers are megatron-core's. tests/unit/test_te_cpu.py checks the first two against formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
                  initial_state=None, output_final_state: bool = False, cu_seqlens=None, **_unused):
    """fla's ``causal_conv1d`` on ``[b, s, d]`` with a ``[d, w]`` depthwise kernel; returns (y, None)."""
    if initial_state is not None or output_final_state or cu_seqlens is not None:
        raise NotImplementedError("the CPU causal_conv1d takes whole sequences without carried state")
    seq_len, width = x.shape[1], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=width - 1, groups=weight.shape[0])[..., :seq_len]
    if activation in ("silu", "swish"):
        y = F.silu(y)
    elif activation is not None:
        raise NotImplementedError(f"activation {activation!r}")
    return y.transpose(1, 2), None


def l2norm(x: torch.Tensor, eps: float = 1e-6, output_dtype: torch.dtype | None = None) -> torch.Tensor:
    """fla's ``l2norm``: each row over the last dim, fp32 inside."""
    xf = x.float()
    y = xf / torch.sqrt((xf * xf).sum(-1, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


def chunk_gated_delta_rule(*args, **kwargs):
    """megatron-core's torch-native chunked gated delta rule, under fla's name."""
    from megatron.core.ssm.gated_delta_net.common import torch_chunk_gated_delta_rule

    kwargs.pop("scale", None)  # fla's optional query scale; megatron never passes it (1/sqrt(d) is fla's default too)
    return torch_chunk_gated_delta_rule(*args, **kwargs)
