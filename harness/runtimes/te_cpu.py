"""Plain-torch forwards for the six Transformer Engine modules of megatron-core's TE layer spec.

On the CPU lane TE's own classes are built (their parameters, names, ``_extra_state`` and every
attribute megatron-core's wrappers read come from TE itself); only their ``forward``, which runs
CUDA kernels, is replaced by one of the functions below while a run is active
(``harness.runtimes.cpu.REDIRECTS``). Each is TE's math as TE 2.20.2 documents and implements it,
in the order of TE's unfused reference path, with TE's tensor-parallel communication done by
megatron-core's own ``tensor_parallel.mappings`` functions:

=================  ==================================================================================
``Linear``         ``x @ W.T (+ b)``; column: input copied (gathered under sequence parallelism) to the
                   TP region; row: output all-reduced (reduce-scattered under SP), then the bias
                   (transformer_engine/pytorch/module/linear.py)
``LayerNormLinear`` the norm of ``x`` (LayerNorm or RMSNorm, ``(1 + w)`` when zero-centred), then as a
                   column ``Linear`` (module/layernorm_linear.py: the norm runs on the local sequence
                   shard, the gather follows it)
``GroupedLinear``  ``x`` split by ``m_splits``, one GEMM per expert, no TP communication
                   (module/grouped_linear.py)
``DotProductAttention`` ``softmax(scale * Q K^T (softcapped), masked) V`` over ``[s, b, h, d]``, GQA by
                   repeating K/V heads, causal/window masks with TE's top-left alignment, learnable or
                   off-by-one sinks as an extra never-masked column (attention/dot_product_attention/
                   backends.py ``UnfusedDotProductAttention``)
``LayerNorm`` /    fp32 inside, output in the weight's dtype (ops/basic/layer_norm.py, rmsnorm.py)
``RMSNorm``
=================  ==================================================================================

Compute is fp32 where TE's kernels accumulate in fp32 (norms, softmax); GEMMs run in the
activation dtype as torch's CPU matmul does. What these do not reproduce is TE's kernel choice
(cuBLAS, cuDNN/flash attention, fused norms) and fp8: the CPU lane does not test TE's kernels
(``harness.matrix.lanes.NOT_TESTED``). tests/unit/test_te_cpu.py checks each against a reference
formula, and against the real TE module where a GPU is lent.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------ helpers


def activation_dtype(inp: torch.Tensor) -> torch.dtype:
    """TE's ``set_activation_dtype``: the autocast dtype under autocast, else the input's."""
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return inp.dtype


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, normalization: str, eps: float,
         zero_centered_gamma: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """TE's LayerNorm / RMSNorm kernel math: fp32 statistics and scale, output in ``out_dtype``."""
    xf = x.float()
    gamma = weight.float() + 1 if zero_centered_gamma else weight.float()
    if normalization == "RMSNorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * gamma
    else:
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + eps) * gamma
        if bias is not None:
            y = y + bias.float()
    return y.to(out_dtype)


def _weight(module) -> torch.Tensor:
    names = getattr(module, "weight_names", ["weight"])
    return torch.cat([getattr(module, n) for n in names]) if len(names) > 1 else getattr(module, names[0])


def _tp_active(module) -> bool:
    return module.parallel_mode in ("column", "row") and module.tp_size > 1


def _column_input(module, x: torch.Tensor) -> torch.Tensor:
    """TE's forward communication before a column-parallel GEMM."""
    from megatron.core.tensor_parallel import mappings

    if module.parallel_mode != "column" or not _tp_active(module):
        return x
    if module.sequence_parallel:
        return mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=module.tp_group)
    return mappings.copy_to_tensor_model_parallel_region(x, group=module.tp_group)


def _row_output(module, y: torch.Tensor) -> torch.Tensor:
    """TE's forward communication after a row-parallel GEMM."""
    from megatron.core.tensor_parallel import mappings

    if module.parallel_mode != "row" or not _tp_active(module):
        return y
    if module.sequence_parallel:
        return mappings.reduce_scatter_to_sequence_parallel_region(y, group=module.tp_group)
    return mappings.reduce_from_tensor_model_parallel_region(y, group=module.tp_group)


def _gemm_and_bias(module, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
    """The GEMM of a Linear/LayerNormLinear, its row communication and its bias handling, as
    linear.py does it: the bias inside the GEMM unless it is returned or added after a row
    reduction. Returns (output, bias to return or None)."""
    bias = module.bias if module.use_bias else None
    fused_bias = bias.to(dtype) if bias is not None and module.apply_bias and not module.gemm_bias_unfused_add else None
    out = F.linear(x.to(dtype), _weight(module).to(dtype), fused_bias)
    out = _row_output(module, out)
    if bias is not None and module.gemm_bias_unfused_add:
        out = out + bias.to(dtype)
    returned = bias.to(dtype) if module.return_bias and bias is not None else (
        torch.empty(0, dtype=dtype) if module.return_bias else None)
    return out, returned


# ------------------------------------------------------------------------------ forwards


def linear_forward(self, inp: torch.Tensor, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
    """``te.pytorch.Linear.forward``."""
    dtype = activation_dtype(inp)
    out, bias = _gemm_and_bias(self, _column_input(self, inp), dtype)
    return (out, bias) if self.return_bias else out


def layernorm_linear_forward(self, inp: torch.Tensor, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
    """``te.pytorch.LayerNormLinear.forward``."""
    dtype = activation_dtype(inp)
    ln_out = norm(inp, self.layer_norm_weight, self.layer_norm_bias, normalization=self.normalization, eps=self.eps,
                  zero_centered_gamma=self.zero_centered_gamma, out_dtype=dtype)
    out, bias = _gemm_and_bias(self, _column_input(self, ln_out), dtype)
    extra = ((bias,) if self.return_bias else ()) + ((ln_out,) if self.return_layernorm_output else ())
    return (out, *extra) if extra else out


def grouped_linear_forward(self, inp: torch.Tensor, m_splits, is_first_microbatch=None, out=None, dgrad_out=None):
    """``te.pytorch.GroupedLinear.forward``: one GEMM per split, no TP communication."""
    dtype = activation_dtype(inp)
    splits = [int(m) for m in (m_splits.tolist() if isinstance(m_splits, torch.Tensor) else m_splits)]
    x = inp.reshape(-1, inp.shape[-1]).to(dtype)
    pieces = torch.split(x, splits, dim=0)
    outputs = []
    for i, piece in enumerate(pieces):
        bias = getattr(self, f"bias{i}") if self.apply_bias else None
        outputs.append(F.linear(piece, getattr(self, f"weight{i}").to(dtype), None if bias is None else bias.to(dtype)))
    result = torch.cat(outputs, dim=0) if outputs else x.new_zeros((0, self.out_features))
    result = result.view(*inp.shape[:-1], self.out_features)
    if out is not None:
        out.copy_(result)
        result = out
    if self.return_bias:
        return result, [getattr(self, f"bias{i}").to(dtype) for i in range(self.num_gemms)]
    return result


def _attention_mask(sq: int, skv: int, mask_type: str, window: tuple[int, int] | None,
                    attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """True where attention is NOT allowed, broadcastable to [b, h, sq, skv] (TE utils.get_full_mask,
    top-left alignment; ``*_bottom_right`` types shift the diagonal by skv - sq)."""
    i = torch.arange(sq).unsqueeze(1)
    j = torch.arange(skv).unsqueeze(0)
    shift = skv - sq if mask_type.endswith("bottom_right") else 0
    masked = torch.zeros(sq, skv, dtype=torch.bool)
    if "causal" in mask_type:
        masked |= j > i + shift
    if window is not None:
        left, right = window
        if left >= 0:
            masked |= j < i + shift - left
        if right >= 0:
            masked |= j > i + shift + right
    masked = masked.view(1, 1, sq, skv)
    if attention_mask is not None and mask_type in ("padding", "padding_causal", "arbitrary", "causal", "no_mask"):
        masked = masked | attention_mask.to(torch.bool)
    return masked


def dot_product_attention_forward(self, query_layer=None, key_layer=None, value_layer=None, attention_mask=None,
                                  qkv_format=None, cu_seqlens_q=None, cu_seqlens_kv=None, cu_seqlens_q_padded=None,
                                  cu_seqlens_kv_padded=None, max_seqlen_q=None, max_seqlen_kv=None, attn_mask_type=None,
                                  window_size=None, bottom_right_diagonal=None, softcap=None,
                                  checkpoint_core_attention=False, core_attention_bias_type="no_bias",
                                  core_attention_bias=None, alibi_slopes=None, fast_zero_fill=True, inference_params=None,
                                  pad_between_seqs=None, fp8_output=False, bf16_backward=False, num_splits=1, **_unused):
    """``te.pytorch.DotProductAttention.forward`` for ``sbhd`` inputs (the layout megatron passes)."""
    fmt = qkv_format or self.qkv_format
    if fmt != "sbhd":
        raise NotImplementedError(f"the CPU stand-in of DotProductAttention takes qkv_format 'sbhd', not {fmt!r}")
    if core_attention_bias_type not in ("no_bias", "post_scale_bias", "pre_scale_bias"):
        raise NotImplementedError(f"core_attention_bias_type {core_attention_bias_type!r} on CPU")
    mask_type = (attn_mask_type or self.attn_mask_type).replace(",", "_")
    window = tuple(window_size) if window_size is not None else (tuple(self.window_size) if self.window_size is not None else None)
    if window == (-1, -1):
        window = None
    cap = self.softcap if softcap is None else softcap
    dtype = query_layer.dtype
    sq, b, h, d = query_layer.shape
    skv, _, groups, _ = key_layer.shape
    q = query_layer.permute(1, 2, 0, 3).float()  # [b, h, sq, d]
    k = key_layer.permute(1, 2, 0, 3).float()
    v = value_layer.permute(1, 2, 0, 3).float()
    if groups != h:
        k = k.repeat_interleave(h // groups, dim=1)
        v = v.repeat_interleave(h // groups, dim=1)
    scale = self.softmax_scale
    if core_attention_bias_type == "pre_scale_bias":
        scores = (q @ k.transpose(-1, -2) + core_attention_bias.float()) * scale
    else:
        scores = (q @ k.transpose(-1, -2)) * scale
    if cap:
        scores = cap * torch.tanh(scores / cap)
    if core_attention_bias_type == "post_scale_bias":
        scores = scores + core_attention_bias.float()
    masked = _attention_mask(sq, skv, mask_type, window, attention_mask)
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    softmax_type = getattr(self, "softmax_type", "vanilla")
    if softmax_type != "vanilla":
        offset = self.softmax_offset.float().reshape(1, -1, 1, 1) if softmax_type == "learnable" else scores.new_zeros(1, h, 1, 1)
        scores = torch.cat([scores, offset.expand(b, h, sq, 1)], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs)  # a fully masked row attends to nothing
    if self.training and self.attention_dropout:
        probs = F.dropout(probs, p=self.attention_dropout)
    out = (probs @ v).to(dtype)  # [b, h, sq, d_v]
    return out.permute(2, 0, 1, 3).reshape(sq, b, h * v.shape[-1])


def layer_norm_forward(self, inp: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``te.pytorch.LayerNorm.forward``."""
    return norm(inp, self.weight, getattr(self, "bias", None), normalization="LayerNorm", eps=self.eps,
                zero_centered_gamma=self.zero_centered_gamma, out_dtype=_norm_out_dtype(self, inp))


def rms_norm_forward(self, inp: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``te.pytorch.RMSNorm.forward``."""
    return norm(inp, self.weight, None, normalization="RMSNorm", eps=self.eps,
                zero_centered_gamma=self.zero_centered_gamma, out_dtype=_norm_out_dtype(self, inp))


def _norm_out_dtype(module, inp: torch.Tensor) -> torch.dtype:
    """TE's norm ops compute in the autocast dtype, else the weight's (ops/basic/layer_norm.py)."""
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return module.weight.dtype
