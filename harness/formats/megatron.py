"""Readers for Megatron's two DCP formats, mapped to canonical keys.

* ``TorchDistCheckpoint``: MCore dist_checkpointing (``metadata.json`` says ``torch_dist``).
* ``FsdpDtensorCheckpoint``: Megatron-FSDP's flat per-parameter DCP.

How each stores a canonical tensor (stacking, splits, expert naming, wrapper prefixes) is the key
grammar of ``harness.formats.megatron_keys``. Both read one stored tensor at a time; a stacked
torch_dist tensor is read once and sliced for all the canonical keys it holds (keep requests
grouped, as ``specs()`` orders them).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from harness.errors import InputError
from harness.formats import dcp
from harness.formats import megatron_keys as keys
from harness.formats.base import TensorSpec, quote

MAX_CANONICAL_TENSORS = 2**22  # layers x experts x moments of the largest models: ~10**5


@dataclass(frozen=True)
class Source:
    """Where a canonical tensor comes from: stored keys, how to slice or join them."""

    stored: tuple[str, ...]
    index: tuple[int, ...] = ()  # leading indices into a stacked stored tensor
    join_dim0: bool = False  # several stored parts concatenated along dim 0


class _DcpReader:
    format = "dcp"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metadata = dcp.read_metadata(self.path)
        self.stored = dcp.tensor_specs(self.metadata)
        self._sources: OrderedDict[str, tuple[Source, TensorSpec]] = OrderedDict()
        self._build()

    def _build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def specs(self) -> dict[str, TensorSpec]:
        return {k: spec for k, (_, spec) in self._sources.items()}

    def tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, "object"]]:
        import torch

        cache_key, cache_val = None, None
        for key in keys:
            src = self._sources[key][0]
            parts = []
            for stored in src.stored:
                if stored != cache_key:
                    cache_key, cache_val = stored, None  # drop the previous one before reading
                    cache_val = next(dcp.load(self.path, [stored], self.stored, self.metadata))[1]
                parts.append(cache_val)
            tensor = torch.cat(parts, dim=0) if src.join_dim0 else parts[0]
            for i in src.index:
                tensor = tensor[i]
            yield key, tensor.contiguous()


class TorchDistCheckpoint(_DcpReader):
    format = "torch_dist"

    def _build(self) -> None:
        held = 0
        for stored, spec in self.stored.items():
            moment, param = keys.split_torch_dist_optimizer_key(stored) or ("", stored)
            # The metadata comes from outside: a stacked entry needs its stacking dims, and the
            # canonical tensors it claims are counted before any is listed (an empty tensor of
            # shape [2**60, 0] claims 2**60 layers and no bytes).
            stacking = keys.stacked_dims(param)
            if len(spec.shape) < stacking:
                raise InputError(f"{self.path}: {quote(stored)} stacks {stacking} dim(s) of tensors but has shape "
                                 f"{list(spec.shape)}; the checkpoint is corrupt")
            held += math.prod(spec.shape[:stacking])
            if held > MAX_CANONICAL_TENSORS:
                raise InputError(f"{self.path}: the stacked entries claim more than {MAX_CANONICAL_TENSORS} tensors "
                                 f"(at {quote(stored)}, shape {list(spec.shape)}); the checkpoint is corrupt")
            for entry in keys.unstack_torch_dist(param, spec.shape):
                key = keys.canonical_optimizer_key(moment, entry.key) if moment else entry.key
                self._sources[key] = (Source((stored,), entry.index), TensorSpec(entry.shape, spec.dtype))


class FsdpDtensorCheckpoint(_DcpReader):
    format = "fsdp_dtensor"

    def _build(self) -> None:
        groups: OrderedDict[str, dict[str, str]] = OrderedDict()
        for stored in self.model_keys():
            parsed = keys.parse_fsdp_key(stored)
            groups.setdefault(parsed.canonical, {})[parsed.part] = stored
        for stored in self.stored:
            if found := keys.parse_fsdp_optimizer_key(stored):
                moment, parsed = found
                groups.setdefault(keys.canonical_optimizer_key(moment, parsed.canonical), {})[parsed.part] = stored
        for key, parts in groups.items():
            if set(parts) == {""}:
                self._sources[key] = (Source((parts[""],)), self.stored[parts[""]])
                continue
            present = [p for p in keys.join_order(key) if p in parts]  # an unknown part is left out: the audit names it
            stored = tuple(parts[p] for p in present)
            first = self.stored[stored[0]]
            rows = sum(self.stored[s].shape[0] for s in stored)
            self._sources[key] = (Source(stored, join_dim0=True), TensorSpec((rows, *first.shape[1:]), first.dtype))
        self._check_optimizer_matches_model()

    def _check_optimizer_matches_model(self) -> None:
        """Every optimizer moment belongs to a parameter of the checkpoint and has its shape."""
        specs = self.specs()
        for key, spec in specs.items():
            if (split := keys.split_canonical_optimizer_key(key)) is None:
                continue
            param = specs.get(split[1])
            if param is None or param.shape != spec.shape:
                what = "no such parameter" if param is None else f"the parameter is {list(param.shape)}"
                raise InputError(f"{self.path}: the optimizer state does not match the model: {key} is "
                                 f"{list(spec.shape)}, {what}; the checkpoint is corrupt or mixed")

    def model_keys(self) -> list[str]:
        """Stored model keys (optimizer state, RNG and the like are not: see optimizer_keys)."""
        return [k for k in self.stored if k.startswith(keys.FSDP_MODEL_PREFIX)]

    def optimizer_keys(self) -> list[str]:
        return [k for k in self.metadata.state_dict_metadata if k.startswith(keys.FSDP_OPTIMIZER_PREFIX)]

    def optimized_params(self) -> set[str]:
        """Canonical parameters the optimizer says it holds state for (its ``param_to_group_meta``
        records); buffers such as a router's ``expert_bias`` are saved with the model but have none."""
        bases = {keys.parse_fsdp_key(stored).base for stored in self.model_keys()}
        return {keys.canonical(param) for stored in self.metadata.state_dict_metadata
                if (param := keys.fsdp_group_meta_param(stored, bases))}
