"""The CPU forwards of Transformer Engine's modules (harness.runtimes.te_cpu): each against an
independent reference formula in float64 on CPU, TE's signatures they rely on, and each against
the real TE kernel where a GPU is lent.

The modules are TE's own classes, built on CPU by the CPU runtime's constructor redirect, so the
parameters the stand-ins read are TE's. Tolerances: the stand-ins compute in fp32 (the module's
dtype) and the references in float64; 1e-5 relative is ~80 fp32 ulps, far below any real
mistake (a dropped bias, a swapped head or a missing mask moves outputs by O(0.1))."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from harness.runtimes import te_cpu

pytestmark = pytest.mark.cpu
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture
def te(cpu_runtime):
    import transformer_engine.pytorch as te

    torch.manual_seed(0)
    return te


def _redraw(module):
    """TE initialises norms to 1 and biases to 0; a reference cannot tell them apart then."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and "weight" in _name(module, p) else 0.0))


def _name(module, param):
    return next(n for n, p in module.named_parameters() if p is param)


def ref_norm(x, w, b, rms: bool, eps: float, zero_centered: bool):
    x, w = x.double(), w.double()
    gamma = w + 1 if zero_centered else w
    if rms:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma
    mu = x.mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps) * gamma
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("bias,return_bias", [(True, False), (True, True), (False, False)])
def test_linear_is_x_wt_plus_b(te, bias, return_bias):
    layer = te.Linear(12, 8, bias=bias, return_bias=return_bias, device="cpu")
    _redraw(layer)
    x = torch.randn(5, 3, 12)
    out = layer(x)
    y, b = (out if return_bias else (out, None))
    ref = x.double() @ layer.weight.double().T
    if bias and not return_bias:
        ref = ref + layer.bias.double()
    torch.testing.assert_close(y.double(), ref, **TOL)
    assert y.shape == (5, 3, 8) and y.dtype == torch.float32
    if return_bias:
        assert torch.equal(b, layer.bias)


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_layernorm_linear_is_the_norm_then_the_gemm(te, normalization, zero_centered):
    layer = te.LayerNormLinear(16, 6, eps=1e-3, normalization=normalization, zero_centered_gamma=zero_centered,
                               return_layernorm_output=True, device="cpu")
    _redraw(layer)
    x = torch.randn(4, 2, 16)
    out, ln_out = layer(x)
    ln_ref = ref_norm(x, layer.layer_norm_weight, layer.layer_norm_bias, normalization == "RMSNorm", 1e-3, zero_centered)
    torch.testing.assert_close(ln_out.double(), ln_ref, **TOL)
    torch.testing.assert_close(out.double(), ln_ref @ layer.weight.double().T + layer.bias.double(), **TOL)


def test_grouped_linear_is_one_gemm_per_split(te):
    layer = te.GroupedLinear(3, 8, 5, bias=True, device="cpu")
    _redraw(layer)
    x = torch.randn(9, 8)
    splits = [4, 0, 5]
    out = layer(x, splits)
    rows, start = [], 0
    for i, n in enumerate(splits):
        rows.append(x[start:start + n].double() @ getattr(layer, f"weight{i}").double().T + getattr(layer, f"bias{i}").double())
        start += n
    torch.testing.assert_close(out.double(), torch.cat(rows), **TOL)


@pytest.mark.parametrize("cls,rms", [("LayerNorm", False), ("RMSNorm", True)])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_norms(te, cls, rms, zero_centered):
    layer = getattr(te, cls)(10, eps=1e-2, zero_centered_gamma=zero_centered, device="cpu")
    _redraw(layer)
    x = torch.randn(3, 4, 10)
    ref = ref_norm(x, layer.weight, getattr(layer, "bias", None), rms, 1e-2, zero_centered)
    torch.testing.assert_close(layer(x).double(), ref, **TOL)


def ref_attention(q, k, v, scale, *, causal: bool, window=None, softcap=0.0, sinks=None, mask=None):
    """Naive [s, b, h, d] attention in float64: every (query, key) pair decided one by one."""
    sq, b, h, d = q.shape
    skv, _, g, dv = v.shape
    out = torch.zeros(sq, b, h, dv, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for i in range(sq):
                logits, allowed = [], []
                for j in range(skv):
                    s = float(q[i, bi, hi].double() @ k[j, bi, gi].double()) * scale
                    if softcap:
                        s = softcap * math.tanh(s / softcap)
                    ok = not (causal and j > i)
                    if window is not None:
                        ok = ok and j >= i - window[0]
                    if mask is not None:
                        ok = ok and not bool(mask[bi if mask.shape[0] > 1 else 0, 0, i, j])
                    logits.append(s)
                    allowed.append(ok)
                exps = [math.exp(s) if ok else 0.0 for s, ok in zip(logits, allowed)]
                denom = sum(exps) + (math.exp(float(sinks[hi])) if sinks is not None else 0.0)
                for j in range(skv):
                    out[i, bi, hi] += exps[j] / denom * v[j, bi, gi].double()
    return out.reshape(sq, b, h * dv)


@pytest.mark.parametrize("variant", ["causal", "window", "softcap", "mask", "sinks"])
def test_dot_product_attention(te, variant):
    h, g, d = 4, 2, 8
    kwargs = {"attn_mask_type": "causal", "qkv_format": "sbhd"}
    if variant == "window":
        kwargs["window_size"] = (2, 0)
    if variant == "softcap":
        kwargs["softcap"] = 1.5
    if variant == "sinks":
        kwargs["softmax_type"] = "learnable"
    if variant == "mask":
        kwargs["attn_mask_type"] = "arbitrary"
    attn = te.DotProductAttention(h, d, num_gqa_groups=g, **kwargs).eval()
    if variant == "sinks":
        with torch.no_grad():
            attn.softmax_offset.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    q, k, v = torch.randn(6, 2, h, d), torch.randn(6, 2, g, d), torch.randn(6, 2, g, d)
    mask = (torch.rand(2, 1, 6, 6) > 0.6) & ~torch.eye(6, dtype=torch.bool) if variant == "mask" else None
    out = attn(q, k, v, attention_mask=mask)
    ref = ref_attention(q, k, v, 1 / math.sqrt(d), causal=variant != "mask", window=kwargs.get("window_size"),
                        softcap=kwargs.get("softcap", 0.0), sinks=attn.softmax_offset if variant == "sinks" else None,
                        mask=mask)
    torch.testing.assert_close(out.double(), ref, **TOL)


# The signatures and attributes the stand-ins rely on: a TE bump that changes them must fail here,
# loudly, before a stand-in silently drops an argument.
SIGNATURES = {
    "Linear": ["self", "inp", "is_first_microbatch", "fp8_output", "fp8_grad"],
    "LayerNormLinear": ["self", "inp", "is_first_microbatch", "fp8_output", "fp8_grad"],
    "GroupedLinear": ["self", "inp", "m_splits", "is_first_microbatch", "out", "dgrad_out"],
}
ATTRIBUTES = {
    "Linear": ("parallel_mode", "tp_size", "tp_group", "sequence_parallel", "use_bias", "apply_bias", "return_bias",
               "gemm_bias_unfused_add", "weight_names", "out_features"),
    "LayerNormLinear": ("normalization", "eps", "zero_centered_gamma", "layer_norm_weight", "layer_norm_bias",
                        "return_layernorm_output", "parallel_mode", "apply_bias", "gemm_bias_unfused_add"),
    "GroupedLinear": ("num_gemms", "apply_bias", "return_bias", "out_features"),
    "DotProductAttention": ("qkv_format", "attn_mask_type", "window_size", "softcap", "softmax_scale", "softmax_type",
                            "attention_dropout"),
}


def test_te_forward_signatures_are_those_the_stand_ins_take():
    import transformer_engine.pytorch as te

    for cls, names in SIGNATURES.items():
        assert list(inspect.signature(getattr(te, cls).forward).parameters)[:len(names)] == names, cls
    dpa = list(inspect.signature(te.DotProductAttention.forward).parameters)
    stand_in = list(inspect.signature(te_cpu.dot_product_attention_forward).parameters)
    assert dpa[:len(stand_in) - 1] == stand_in[:-1], "TE DotProductAttention.forward's arguments moved"


def test_te_modules_built_on_cpu_have_the_attributes_the_stand_ins_read(te):
    built = {"Linear": te.Linear(4, 4, device="cpu"), "LayerNormLinear": te.LayerNormLinear(4, 4, device="cpu"),
             "GroupedLinear": te.GroupedLinear(2, 4, 4, device="cpu"), "DotProductAttention": te.DotProductAttention(2, 4)}
    for cls, attrs in ATTRIBUTES.items():
        missing = [a for a in attrs if not hasattr(built[cls], a)]
        assert not missing, f"{cls} lacks {missing}"
    assert list(built["Linear"].state_dict()) == ["weight", "bias", "_extra_state"]  # TE's own names


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the real TE kernels run only on CUDA")
def test_each_stand_in_matches_the_real_te_kernel_on_the_same_weights():
    """Where a GPU is lent: TE's own forward on CUDA vs the stand-in on CPU, same weights and input
    (fp32, TF32 off: NVIDIA_TF32_OVERRIDE=0 in the environment; bound 1e-5 relative)."""
    import transformer_engine.pytorch as te

    torch.manual_seed(0)
    cases = [
        (te.Linear(16, 8), lambda m, x: te_cpu.linear_forward(m, x), (torch.randn(4, 2, 16),)),
        (te.LayerNormLinear(16, 8, normalization="RMSNorm", zero_centered_gamma=True),
         lambda m, x: te_cpu.layernorm_linear_forward(m, x), (torch.randn(4, 2, 16),)),
        (te.RMSNorm(16, zero_centered_gamma=True), lambda m, x: te_cpu.rms_norm_forward(m, x), (torch.randn(4, 2, 16),)),
        (te.DotProductAttention(4, 8, num_gqa_groups=2, qkv_format="sbhd", attn_mask_type="causal"),
         lambda m, q, k, v: te_cpu.dot_product_attention_forward(m, q, k, v),
         (torch.randn(6, 2, 4, 8), torch.randn(6, 2, 2, 8), torch.randn(6, 2, 2, 8))),
    ]
    for module, stand_in, inputs in cases:
        module = module.cuda().eval()
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
            real = module(*[t.cuda() for t in inputs]).float().cpu()
            cpu_module = module.cpu()
            mine = stand_in(cpu_module, *inputs)
        torch.testing.assert_close(mine, real, rtol=1e-5, atol=1e-5)


def test_gdn_causal_conv1d_is_a_depthwise_causal_convolution_then_silu():
    from harness.runtimes import gdn_cpu

    x, w, b = torch.randn(2, 7, 5), torch.randn(5, 4), torch.randn(5)
    y, state = gdn_cpu.causal_conv1d(x, w, b, activation="silu")
    ref = torch.zeros(2, 7, 5, dtype=torch.float64)
    for t in range(7):
        for k in range(4):  # output t sees inputs t-3 .. t, the newest with the last tap
            if t - 3 + k >= 0:
                ref[:, t] += x[:, t - 3 + k].double() * w[:, k].double()
    ref = torch.nn.functional.silu(ref + b.double())
    torch.testing.assert_close(y.double(), ref, **TOL)
    assert state is None


def test_gdn_l2norm_is_fla_formula():
    from harness.runtimes import gdn_cpu

    x = torch.randn(3, 4, 16)
    ref = x.double() / torch.sqrt(x.double().pow(2).sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(gdn_cpu.l2norm(x).double(), ref, **TOL)
