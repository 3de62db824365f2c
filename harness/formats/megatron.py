"""Readers for Megatron's two DCP formats, mapped to canonical keys (``formats.canonical``).

* ``TorchDistCheckpoint``: MCore dist_checkpointing (``metadata.json`` says ``torch_dist``). Layers
  are stacked along dim 0 (``decoder.layers.X`` is ``[L, ...]``) and experts along dim 1.
* ``FsdpDtensorCheckpoint``: Megatron-FSDP's flat per-parameter DCP. Keys carry wrapper prefixes,
  SwiGLU ``linear_fc1`` is split into ``_w``/``_v``, GDN projections into named parts, experts
  use global indices, and optimizer state sits under ``optimizer.state.<wrapped param>.*``.

Both read one stored tensor at a time; a stacked torch_dist tensor is read once and sliced for
all the canonical keys it holds (keep requests grouped, as ``specs()`` orders them).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from harness.formats import canonical, dcp
from harness.formats.base import TensorSpec

_STACKED = re.compile(r"^(?P<pre>(?:.*\.)?decoder\.layers)\.(?P<rest>(?!\d+\.).+)$")
_STACKED_EXPERTS = "mlp.experts.experts."


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

    def source(self, key: str) -> Source:
        return self._sources[key][0]

    def tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, "object"]]:
        import torch

        cache_key, cache_val = None, None
        for key in keys:
            src = self._sources[key][0]
            parts = []
            for stored in src.stored:
                if stored != cache_key:
                    cache_key, cache_val = stored, None  # drop the previous one before reading
                    cache_val = next(dcp.load(self.path, [stored], self.stored))[1]
                parts.append(cache_val)
            tensor = torch.cat(parts, dim=0) if src.join_dim0 else parts[0]
            for i in src.index:
                tensor = tensor[i]
            yield key, tensor.contiguous()


class TorchDistCheckpoint(_DcpReader):
    format = "torch_dist"

    def _build(self) -> None:
        for stored, spec in self.stored.items():
            m = _STACKED.match(stored)
            if not m:
                self._sources[stored] = (Source((stored,)), spec)
                continue
            pre, rest = m["pre"], m["rest"]
            layers = spec.shape[0]
            if rest.startswith(_STACKED_EXPERTS):
                experts = spec.shape[1]
                tail = rest[len(_STACKED_EXPERTS):]
                for i in range(layers):
                    for e in range(experts):
                        key = canonical.canonical_norm(f"{pre}.{i}.mlp.experts.{e}.{tail}")
                        self._sources[key] = (Source((stored,), (i, e)), TensorSpec(spec.shape[2:], spec.dtype))
            else:
                for i in range(layers):
                    key = canonical.canonical_norm(f"{pre}.{i}.{rest}")
                    self._sources[key] = (Source((stored,), (i,)), TensorSpec(spec.shape[1:], spec.dtype))


_SWIGLU_PART = re.compile(r"^(?P<base>.+)_(?P<part>[wv])$")
_GDN_PART = re.compile(r"^(?P<base>.+\.(?:in_proj|conv1d)\.(?:weight|bias))\.(?P<part>query|key|value|z|beta|alpha)$")


class FsdpDtensorCheckpoint(_DcpReader):
    format = "fsdp_dtensor"
    MODEL_PREFIX = "model."
    OPTIMIZER_PREFIX = "optimizer."

    def _build(self) -> None:
        groups: OrderedDict[str, dict[str, str]] = OrderedDict()
        for stored in self.stored:
            if not stored.startswith(self.MODEL_PREFIX):
                continue  # optimizer state, RNG, ...: see optimizer_keys()
            key, _ = canonical.strip_wrappers(stored)
            part = ""
            if m := _GDN_PART.match(key):
                key, part = m["base"], m["part"]
            elif m := _SWIGLU_PART.match(key):
                key, part = m["base"], m["part"]
            key = canonical.canonical_norm(canonical.canonical_expert(key))
            groups.setdefault(key, {})[part] = stored
        for key, parts in groups.items():
            if set(parts) == {""}:
                self._sources[key] = (Source((parts[""],)), self.stored[parts[""]])
                continue
            order = canonical.GDN_IN_PROJ_PARTS if ".in_proj." in key else (
                canonical.GDN_CONV1D_PARTS if ".conv1d." in key else ("w", "v"))
            present = [p for p in order if p in parts]
            stored = tuple(parts[p] for p in present)
            first = self.stored[stored[0]]
            rows = sum(self.stored[s].shape[0] for s in stored)
            self._sources[key] = (Source(stored, join_dim0=True), TensorSpec((rows, *first.shape[1:]), first.dtype))

    def model_keys(self) -> list[str]:
        return [k for k in self.stored if k.startswith(self.MODEL_PREFIX)]

    def optimizer_keys(self) -> list[str]:
        return [k for k in self.metadata.state_dict_metadata if k.startswith(self.OPTIMIZER_PREFIX)]
