"""Write fsdp_dtensor-convention DCP checkpoints on CPU (test fixtures for the readers and the audit).

CPU cannot run Megatron-FSDP, so it cannot produce a real fsdp_dtensor checkpoint. This module
writes one with the same on-disk conventions (``harness.formats.megatron_keys``) from a canonical
state dict, e.g. read from a real torch_dist checkpoint the bridge wrote on CPU. The
``Conventions`` knobs exist so tests can write the *broken* variants the layout audit must catch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from harness.formats import megatron_keys as keys
from harness.matrix.model_spec import config_has_gdn


@dataclass(frozen=True)
class Conventions:
    model_wrappers: int = keys.FSDP_MODEL_DEPTH  # model.module.<param>
    optimizer_wrappers: int = keys.OPTIMIZER_DEPTH["bf16"]  # FSDP adapter -> MegatronFSDP -> Float16Module
    split_swiglu: bool = True
    local_experts: int = 0  # > 0: number experts e % local_experts, as one EP rank sees them (wrong)
    with_optimizer: bool = True


def fsdp_entries(key: str, tensor: torch.Tensor, conv: Conventions,
                 gdn_sizes: tuple[list[int], list[int]] | None = None) -> dict[str, torch.Tensor]:
    """One canonical tensor -> its stored fsdp_dtensor entries (without the model prefix)."""
    plan = keys.fsdp_split_plan(key, tensor.shape[0], split_swiglu=conv.split_swiglu, gdn_sizes=gdn_sizes)
    pieces = torch.split(tensor, [rows for _, rows in plan], dim=0)
    return {
        keys.fsdp_stored_name(key, part, local_experts=conv.local_experts): piece.contiguous()
        for (part, _), piece in zip(plan, pieces)
    }


def write_fsdp_dtensor(path: Path, state: Mapping[str, torch.Tensor], conv: Conventions = Conventions(),
                       hf_config: Mapping | None = None, gdn_sizes: tuple[list[int], list[int]] | None = None) -> Path:
    """``gdn_sizes`` overrides the in_proj / conv1d split (tests write wrong splits with it)."""
    import torch.distributed.checkpoint as dcp

    gdn = gdn_sizes or (keys.gdn_split_sizes(hf_config) if hf_config and config_has_gdn(hf_config) else None)
    flat: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for stored, t in fsdp_entries(key, tensor, conv, gdn).items():
            flat[keys.fsdp_model_key(stored, conv.model_wrappers)] = t
            if conv.with_optimizer:
                flat[keys.fsdp_optimizer_key(stored, conv.optimizer_wrappers, "exp_avg")] = torch.full_like(t, 0.01)
                flat[keys.fsdp_optimizer_key(stored, conv.optimizer_wrappers, "exp_avg_sq")] = torch.full_like(t, 0.001)
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(flat, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    return path
