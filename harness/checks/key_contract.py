"""Wrapped-key contract for the fsdp_dtensor SwiGLU / GDN handlers, checked on CPU.

``handle_swiglu_in_state_dict`` and ``handle_gdn_in_state_dict``
(``megatron/core/transformer/fsdp_dtensor_checkpoint.py``) find the live parameter behind each
state-dict key with ``model.get_parameter(<key rewritten for an assumed wrapper depth>)``. That
code broke when the depth it assumed differed from what the save/load path handed it (the
wrapped-key bug: a ``"module."`` prefix looked up on an unwrapped model, and the reverse).

The contract: for every model key and every optimizer key, the handler must resolve the same
``Parameter`` object that the key names. This module runs the *imported* handler for real; only
the CUDA-only parts are stubbed: ``make_fsdp_dtensor`` (DTensor construction on a device mesh),
the FSDP shard metadata on each parameter, and ``DTensor.to_local`` on the values. Each
parameter's fake shard metadata carries its own name, so the stub learns which parameter the
handler resolved; the key resolution itself is never touched.

Wrapper stacks, as the bridge save/load path builds them (megatron-bridge 0.6.2 /
megatron-core 0.19.2; ``unwrap_model`` stops at MegatronFSDP, so the handler receives it):

* bf16: FullyShardedDataParallel -> MegatronFSDP -> Float16Module -> GPTModel
* fp32: FullyShardedDataParallel -> MegatronFSDP -> GPTModel   (no Float16Module in fp32)

Model keys come from ``MegatronFSDP.state_dict()`` (Float16Module passes through, adding no
prefix); optimizer keys from the outermost wrapper's ``named_parameters()``.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from unittest import mock

import torch
from torch import nn

from harness.formats import megatron_keys as keys
from harness.results import CheckResult


class MegatronFSDPStandIn(nn.Module):
    """Stands in for ``MegatronFSDP`` (CUDA streams, device mesh): a plain ``.module`` wrapper
    whose ``state_dict`` is ``nn.Module.state_dict``, as the real one's is."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.config = getattr(module, "config", None)


class FsdpAdapterStandIn(MegatronFSDPStandIn):
    """Stands in for the mcore ``FullyShardedDataParallel`` adapter (outermost wrapper)."""


@dataclass
class Stack:
    """A wrapper stack: what the handler receives, and where optimizer keys are named from."""

    name: str
    handler_model: nn.Module
    outer: nn.Module


def save_path_stack(model: nn.Module, *, bf16: bool) -> Stack:
    """The stack the bridge's fsdp_dtensor save/load builds around ``model``."""
    inner = model
    if bf16:
        from megatron.core.transformer.module import Float16Module

        config = _bf16_config(model.config)
        inner = Float16Module(config, model)
    fsdp = MegatronFSDPStandIn(inner)
    return Stack(name="bf16" if bf16 else "fp32", handler_model=fsdp, outer=FsdpAdapterStandIn(fsdp))


def custom_stack(model: nn.Module, handler_depth: int, name: str) -> Stack:
    """``handler_depth`` plain wrappers around ``model`` (0 = the bare model), for the tests that
    show the contract failing when the depth differs from what the handler assumes."""
    inner = model
    for _ in range(handler_depth):
        inner = MegatronFSDPStandIn(inner)
    return Stack(name=name, handler_model=inner, outer=FsdpAdapterStandIn(inner))


def _bf16_config(config):
    import copy

    config = copy.copy(config)
    config.bf16, config.fp16 = True, False
    return config


# ----------------------------------------------------------------------------- the stubs


@dataclass(frozen=True)
class Resolved:
    """What the stubbed ``make_fsdp_dtensor`` returns: which parameter the handler resolved."""

    param_name: str
    shape: tuple[int, ...]


class _FakeDistIndex:
    tp_dim = 0

    def __init__(self, param_name: str):
        self.param_name = param_name

    def get_submesh(self, *_args, **_kwargs):
        return _FakeMesh()


class _FakeMesh:
    class mesh:  # noqa: N801 - mimics DeviceMesh.mesh
        @staticmethod
        def numel() -> int:
            return 1


class FakeDTensor:
    """A full tensor posing as a single-shard DTensor, tagged with the parameter it came from."""

    def __init__(self, tensor: torch.Tensor, origin: str):
        self.tensor, self.origin = tensor, origin
        self.shape = tensor.shape

    def numel(self) -> int:
        return self.tensor.numel()

    def to_local(self) -> torch.Tensor:
        return self.tensor


def _fake_make_fsdp_dtensor(local, meta, dist_index=None, **_kwargs):
    return Resolved(param_name=dist_index.param_name, shape=tuple(meta.shape))


@contextlib.contextmanager
def cuda_free_handlers(model: nn.Module) -> Iterator[None]:
    """Stub DTensor construction and give every parameter fake FSDP shard metadata (tagged with
    its own name); everything is removed on exit."""
    import megatron.core.transformer.fsdp_dtensor_checkpoint as handlers

    tagged = []
    for name, param in model.named_parameters():
        param.megatron_fsdp_slice = slice(0, param.numel())
        param.megatron_fsdp_dist_index = _FakeDistIndex(_canonical(name))
        tagged.append(param)
    try:
        with mock.patch.object(handlers, "make_fsdp_dtensor", _fake_make_fsdp_dtensor):
            yield
    finally:
        for param in tagged:
            del param.megatron_fsdp_slice, param.megatron_fsdp_dist_index


# ----------------------------------------------------------------------------- the contract


@dataclass
class Resolution:
    ok: int = 0
    problems: list[str] = field(default_factory=list)


def _canonical(name: str) -> str:
    return keys.strip_wrappers(name)[0]


def check_handler(handler: Callable, stack: Stack, *, name: str) -> CheckResult:
    """Run ``handler(model, model_sd, optimizer_sd)`` and check every split key's parameter."""
    model = stack.handler_model
    bare = {_canonical(n): p for n, p in model.named_parameters()}
    model_sd = {
        k: FakeDTensor(v, _canonical(k)) if isinstance(v, torch.Tensor) else v
        for k, v in model.state_dict().items()
    }
    opt_state = {}
    for pname, param in stack.outer.named_parameters():
        opt_state[pname] = {moment: FakeDTensor(param.detach(), _canonical(pname)) for moment in keys.OPTIMIZER_MOMENTS}
    optimizer_sd = {"state": opt_state, "param_groups": []}
    resolution = Resolution()
    try:
        with cuda_free_handlers(stack.outer):
            new_model_sd, new_opt_sd = handler(model, model_sd, optimizer_sd)
    except Exception as err:  # noqa: BLE001 - a lookup that raises is a broken contract
        last = traceback.format_exception_only(err)[-1].strip()
        return CheckResult(
            name=name, passed=False,
            summary=f"{handler.__name__} on the {stack.name} stack raised: {last}",
            metrics={"stack": stack.name, "resolved": 0},
        )
    split_model = {k: v for k, v in new_model_sd.items() if isinstance(v, Resolved)}
    split_opt = {
        f"{k}.{sub}": v
        for k, moments in new_opt_sd["state"].items()
        for sub, v in moments.items()
        if isinstance(v, Resolved)
    }
    if not split_model:
        resolution.problems.append("the handler split no model key (nothing to resolve?)")
    for key, resolved in {**split_model, **split_opt}.items():
        expected = keys.source_param(key, bare)
        if resolved.param_name != expected:
            resolution.problems.append(f"{key} resolved to {resolved.param_name}, expected {expected}")
        else:
            resolution.ok += 1
    passed = not resolution.problems
    summary = (
        f"{len(split_model)} model + {len(split_opt)} optimizer keys resolve to their own parameters ({stack.name})"
        if passed else f"{len(resolution.problems)} wrong: {resolution.problems[0]}"
    )
    return CheckResult(
        name=name, passed=passed, summary=summary,
        metrics={"stack": stack.name, "model_keys": len(split_model), "optimizer_keys": len(split_opt),
                 "problems": resolution.problems[:20]},
    )


class GatedDeltaNetShape(nn.Module):
    """Stands in for megatron-core's ``GatedDeltaNet`` (it needs TE and flash-linear-attention
    kernels, so it cannot be built on CPU). It carries exactly what the GDN handler reads: the
    ``qk_dim`` / ``v_dim`` / ``in_proj_dim`` / ``num_value_heads`` attributes that identify a GDN
    module, and fused ``in_proj`` / ``conv1d`` parameters of the right shapes."""

    def __init__(self, hidden: int, qk_heads: int, qk_head_dim: int, v_heads: int, v_head_dim: int, kernel: int = 4):
        super().__init__()
        self.qk_dim = qk_heads * qk_head_dim
        self.v_dim = v_heads * v_head_dim
        self.num_value_heads = v_heads
        self.tp_size = 1
        self.in_proj_dim = 2 * self.qk_dim + 2 * self.v_dim + 2 * v_heads
        self.in_proj = nn.Linear(hidden, self.in_proj_dim, bias=False)
        conv_dim = 2 * self.qk_dim + self.v_dim
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel, groups=conv_dim, bias=True)


class GdnModelShape(nn.Module):
    """``decoder.layers.<i>.self_attention`` = GDN, the path the handler sees in Qwen3-Next."""

    def __init__(self, layers: int = 2, **gdn):
        super().__init__()
        self.config = None
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.self_attention = GatedDeltaNetShape(**gdn)
            self.decoder.layers.append(layer)


def gdn_stack_from_config(cfg) -> Stack:
    """The bf16 save-path stack around a GDN-shaped model sized from an HF config."""
    from types import SimpleNamespace

    from megatron.core.transformer.module import Float16Module

    model = GdnModelShape(
        layers=2, hidden=cfg["hidden_size"], qk_heads=cfg["linear_num_key_heads"],
        qk_head_dim=cfg["linear_key_head_dim"], v_heads=cfg["linear_num_value_heads"],
        v_head_dim=cfg["linear_value_head_dim"], kernel=cfg.get("linear_conv_kernel_dim", 4),
    )
    config = SimpleNamespace(bf16=True, fp16=False, virtual_pipeline_model_parallel_size=None)
    fsdp = MegatronFSDPStandIn(Float16Module(config, model))
    return Stack("bf16", fsdp, FsdpAdapterStandIn(fsdp))
