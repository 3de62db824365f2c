"""Write fsdp_dtensor-convention DCP checkpoints on CPU (test fixtures for readers and audit).

CPU cannot run Megatron-FSDP, so it cannot produce a real fsdp_dtensor checkpoint. This module
writes one with the same on-disk conventions, from a canonical state dict (e.g. read from a real
torch_dist checkpoint the bridge wrote on CPU): plain DCP, ``model.module.`` prefixes, SwiGLU
``linear_fc1`` split into ``_w``/``_v``, GDN ``in_proj``/``conv1d`` split into named parts,
GroupedMLP expert keys ``…experts.linear_fc1.weight<global index>``, and optimizer moments under
``optimizer.state.<wrappers><param>.exp_avg``. The knobs exist so tests can write the *broken*
variants the layout audit must catch. Conventions follow
``megatron/core/transformer/fsdp_dtensor_checkpoint.py`` (megatron-core 0.19.2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from harness.formats import canonical

_FC1 = re.compile(r"(?:^|\.)mlp\.(?:experts\.\d+\.|shared_experts\.)?linear_fc1\.weight$")
_EXPERT = re.compile(r"^(?P<pre>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<fc>linear_fc[12])\.(?P<kind>weight|bias)$")


@dataclass(frozen=True)
class Conventions:
    model_prefix: str = "model.module."
    optimizer_wrappers: int = 3  # "module." repeated: FSDP adapter -> MegatronFSDP -> Float16Module
    split_swiglu: bool = True
    local_experts: int = 0  # > 0: number experts e % local_experts, as one EP rank sees them (wrong)
    with_optimizer: bool = True


def gdn_split_sizes(hf_config: Mapping) -> tuple[list[int], list[int]]:
    """in_proj and conv1d part sizes along dim 0, as the GDN handler computes them (TP = 1)."""
    qk = hf_config["linear_num_key_heads"] * hf_config["linear_key_head_dim"]
    v = hf_config["linear_num_value_heads"] * hf_config["linear_value_head_dim"]
    nvh = hf_config["linear_num_value_heads"]
    return [qk, qk, v, v, nvh, nvh], [qk, qk, v]


def fsdp_keys(key: str, tensor: torch.Tensor, conv: Conventions, gdn_sizes=None) -> dict[str, torch.Tensor]:
    """One canonical tensor -> its stored fsdp_dtensor entries (without the model prefix)."""
    parts: dict[str, torch.Tensor] = {key: tensor}
    if gdn_sizes and (key.endswith(".in_proj.weight") or ".conv1d." in key):
        sizes = gdn_sizes[0] if key.endswith(".in_proj.weight") else gdn_sizes[1]
        names = canonical.GDN_IN_PROJ_PARTS if key.endswith(".in_proj.weight") else canonical.GDN_CONV1D_PARTS
        parts = {f"{key}.{n}": t for n, t in zip(names, torch.split(tensor, sizes, dim=0))}
    elif conv.split_swiglu and _FC1.search(key):
        w, v = torch.chunk(tensor, 2, dim=0)
        parts = {f"{key}_w": w, f"{key}_v": v}
    out = {}
    for name, t in parts.items():
        base, suffix = name, ""
        for s in ("_w", "_v"):
            if name.endswith(s):
                base, suffix = name[: -len(s)], s
        if m := _EXPERT.match(base):
            index = int(m["e"]) % conv.local_experts if conv.local_experts else int(m["e"])
            base = f"{m['pre']}.{m['fc']}.{m['kind']}{index}"
        out[base + suffix] = t.contiguous()
    return out


def write_fsdp_dtensor(path: Path, state: Mapping[str, torch.Tensor], conv: Conventions = Conventions(),
                       hf_config: Mapping | None = None, gdn_sizes: tuple[list[int], list[int]] | None = None) -> Path:
    """``gdn_sizes`` overrides the in_proj / conv1d split (tests write wrong splits with it)."""
    import torch.distributed.checkpoint as dcp

    gdn = gdn_sizes or (gdn_split_sizes(hf_config) if hf_config and "linear_num_key_heads" in hf_config else None)
    flat: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for stored, t in fsdp_keys(key, tensor, conv, gdn).items():
            flat[conv.model_prefix + stored] = t
            if conv.with_optimizer:
                opt = "optimizer.state." + "module." * conv.optimizer_wrappers + stored
                flat[f"{opt}.exp_avg"] = torch.full_like(t, 0.01)
                flat[f"{opt}.exp_avg_sq"] = torch.full_like(t, 0.001)
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(flat, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    return path
