"""Parallel layouts (TP/PP/EP/ETP/VPP/CP): parsing, naming and up-front validation.

A layout is written the way people say it, ``tp2-pp2`` or ``tp1-ep2``, and that string is part of
the case ID, so it must be canonical: sizes of 1 are omitted except ``tp1``, and the order is
fixed. Validation against a model config happens *before* Megatron is touched so an impossible
combination is a one-line message naming the rule, not an assertion deep inside Megatron.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from harness.matrix.model_spec import config_num_experts

# Megatron-FSDP builds its device mesh over the whole world as (dp_cp, ep, tp)
# (megatron/core/distributed/fsdp/mcore_fsdp_adapter.py _get_dp_tp_mesh, megatron-core 0.19.2), so
# with PP > 1 the world does not factor: "Shape mismatch, 4 != 2" at PP2 x DP2 on CPU.
FSDP_REFUSES_PP = ("Megatron-FSDP's device mesh has no pipeline dimension (mcore_fsdp_adapter.py _get_dp_tp_mesh "
                   "rearranges the whole world as (dp_cp ep tp)), so the adapter refuses PP > 1")

_ORDER = ("tp", "pp", "vpp", "first", "last", "ep", "etp", "cp", "dp")
_TOKEN = re.compile(r"^(tp|pp|vpp|first|last|ep|etp|cp|dp)(\d+)$")
# Uneven pipeline stages: ``first``/``last`` are layer counts of the first/last stage
# (num_layers_in_first/last_pipeline_stage), not sizes; None = an even split.
_LAYER_COUNTS = ("first", "last")


class LayoutError(ValueError):
    """A layout that cannot be parsed or that the model cannot be split into."""


@dataclass(frozen=True, order=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline chunks per PP rank; 1 = no interleaving
    first: int | None = None  # layers in the first pipeline stage (uneven stages); None = even split
    last: int | None = None  # layers in the last pipeline stage
    ep: int = 1
    etp: int | None = None  # expert TP; None = same as tp (Megatron's default)
    cp: int = 1
    dp: int = 1  # data-parallel replicas (Megatron-FSDP shards across them); Megatron infers it

    def __post_init__(self) -> None:
        for name in _ORDER:
            value = getattr(self, name)
            if name in ("etp", *_LAYER_COUNTS) and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name} must be a positive integer, got {value!r}")
        if self.vpp > 1 and self.pp == 1:
            raise LayoutError(f"vpp{self.vpp} needs pp > 1 (virtual stages interleave real ones)")
        if self.pp == 1 and self.uneven:
            raise LayoutError("first/last stage layer counts need pp > 1")

    @classmethod
    def parse(cls, text: str) -> "Layout":
        sizes: dict[str, int] = {}
        for token in text.strip().lower().split("-"):
            match = _TOKEN.match(token)
            if not match:
                raise LayoutError(
                    f"bad layout {text!r}: token {token!r} is not one of "
                    f"{', '.join(n + '<N>' for n in _ORDER)}"
                )
            name, value = match.group(1), int(match.group(2))
            if name in sizes:
                raise LayoutError(f"bad layout {text!r}: {name} given twice")
            sizes[name] = value
        return cls(**sizes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Layout":
        return cls(**data)

    @property
    def id(self) -> str:
        parts = [f"tp{self.tp}"]
        for name in _ORDER[1:]:
            value = getattr(self, name)
            # etp1 differs from "etp = tp"; a layer count is a count, not a size: first1 is one layer
            if value is not None and (value != 1 or name in ("etp", *_LAYER_COUNTS)):
                parts.append(f"{name}{value}")
        return "-".join(parts)

    def __str__(self) -> str:
        return self.id

    @property
    def uneven(self) -> bool:
        """The first or the last pipeline stage has its own layer count."""
        return self.first is not None or self.last is not None

    @property
    def splits_model(self) -> bool:
        """Whether this layout splits the model at all (data parallelism only replicates it)."""
        return replace(self, dp=1) != Layout()

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def world_size(self) -> int:
        """Smallest world both decompositions fit: dense TPxPPxCP and expert ETPxEPxPP ranks."""
        return math.lcm(self.tp * self.pp * self.cp, self.expert_tp * self.ep * self.pp) * self.dp

    def megatron_kwargs(self) -> dict[str, Any]:
        return dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp if self.vpp > 1 else None,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp,
        )

    def pipeline_split_kwargs(self) -> dict[str, Any]:
        """How the layers are split over the pipeline stages (provider fields, not process-group
        sizes); None = evenly. Always given, so a reload at another layout resets a saved split."""
        return dict(num_layers_in_first_pipeline_stage=self.first, num_layers_in_last_pipeline_stage=self.last)

    def provider_kwargs(self) -> dict[str, Any]:
        return {**self.megatron_kwargs(), **self.pipeline_split_kwargs()}

    def violations(self, cfg: Mapping[str, Any], *, vocab_padded: bool = False) -> list[str]:
        """Rules this layout breaks for an HF config dict (empty list: the layout is valid).

        ``vocab_padded``: the provider pads the vocab to a multiple of 128 x TP; without it (the
        bridge's default) the embedding rows are split as they are and must divide by TP.
        """
        problems: list[str] = []
        heads = cfg.get("num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        layers = cfg.get("num_hidden_layers") or len(cfg.get("layers_block_type") or ()) or None
        experts = config_num_experts(cfg)

        if heads is not None and heads % self.tp:
            problems.append(f"attention heads {heads} not divisible by tp{self.tp}")
        if kv_heads is not None and kv_heads % self.tp and self.tp % kv_heads:
            problems.append(f"kv heads {kv_heads} and tp{self.tp}: neither divides the other")
        vocab = cfg.get("vocab_size")
        if vocab is not None and not vocab_padded and vocab % self.tp:
            problems.append(f"vocab {vocab} not divisible by tp{self.tp} (the vocab is not padded)")
        if layers is not None and self.uneven:
            problems += self._uneven_violations(layers)
        elif layers is not None and layers % (self.pp * self.vpp):
            what = f"pp{self.pp}" if self.vpp == 1 else f"pp{self.pp} x vpp{self.vpp}"
            problems.append(f"layers {layers} not divisible by {what}")
        if self.ep > 1 or self.etp is not None:
            if not experts:
                problems.append(f"{self.id} sets expert parallelism but the model has no experts")
            elif experts % self.ep:
                problems.append(f"experts {experts} not divisible by ep{self.ep}")
        return problems

    def _uneven_violations(self, layers: int) -> list[str]:
        """megatron-core's rules for uneven stages (TransformerConfig.__post_init__, "Uneven PP")."""
        problems, middle_layers, middle_stages = [], layers, self.pp
        for name in _LAYER_COUNTS:
            count = getattr(self, name)
            if count is None:
                continue
            if count % self.vpp:
                problems.append(f"{name}{count}: the {name} stage's layers not divisible by vpp{self.vpp}")
            middle_layers, middle_stages = middle_layers - count, middle_stages - 1
        if middle_layers < 0 or bool(middle_layers) != bool(middle_stages):
            problems.append(f"layers {layers}: {middle_layers} left for {middle_stages} middle stage(s)")
        elif middle_stages and (middle_layers % middle_stages or (middle_layers // middle_stages) % self.vpp):
            problems.append(f"layers {layers}: {middle_layers} middle layers do not split evenly over "
                            f"{middle_stages} stage(s) x vpp{self.vpp}")
        return problems

    def format_violations(self, fmt: str) -> list[str]:
        """Rules a checkpoint format's writer imposes on the layout (empty list: none)."""
        if fmt == "fsdp_dtensor" and self.pp > 1:
            return [f"pp{self.pp}: {FSDP_REFUSES_PP}"]
        return []

    def validate(self, cfg: Mapping[str, Any], *, vocab_padded: bool = False) -> None:
        problems = self.violations(cfg, vocab_padded=vocab_padded)
        if problems:
            raise LayoutError(f"invalid layout {self.id}: " + "; ".join(problems))
