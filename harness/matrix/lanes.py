"""Which lane can run what, and why not: every lane-ability rule of the harness lives here.

A *blocker* is the reason a case (or one of its stages) cannot run on a lane; the empty string
means it can. ``harness list`` shows them, the matrix and pytest skip with them, and a route that
skips a check quotes them. Measured with megatron-core 0.19.2, megatron-bridge 0.6.2 and
Transformer Engine 2.20.2, the versions pinned in requirements/stack.txt.

No torch import (the CLI lists cases with this module).
"""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.matrix.cases import Case
    from harness.matrix.layouts import Layout
    from harness.matrix.model_spec import ModelSpec

CPU, GPU = "cpu", "gpu"
LANES = (CPU, GPU)

# What a pass on each lane does not vouch for; every run's summary.md and index.html say it, and the
# README. The CPU lane runs the same layer specs (TE's), wrappers, checkpoint code and converters as
# production, with the placement, kernel and transport redirects of harness/runtimes/cpu.py.
NOT_TESTED: dict[str, tuple[str, ...]] = {
    CPU: ("NCCL (collectives run over gloo)", "CUDA streams and the overlap of communication with compute",
          "the NCCL user-buffer paths", "TE's kernels and how TE picks them (cuBLAS GEMMs, fused norms, cuDNN/flash "
          "attention, FusedAdam's CUDA kernel: TE's modules are built, their forwards are plain torch)",
          "fp8/fp4 and the _extra_state it fills", "fused RoPE and the TE op fuser", "backward passes",
          "context parallelism (TE's ring attention)", "THD packed sequences", "GPU memory behaviour"),
    GPU: (),
}

# Features whose Megatron modules cannot be built on CPU: rules on model facts (ModelSpec), so
# they cover every family with the feature, including one a new bridge brings.
MLA_ON_LOCAL_SPEC = ("MLA needs the TE spec on megatron-core 0.19.2: the local spec passes k_channels to the local "
                     "DotProductAttention, which rejects it")
GDN_ON_LOCAL_SPEC = ("Gated DeltaNet layers need the TE layer spec (the local spec asserts "
                     "experimental_attention_variant is None; the GDN block spec asserts "
                     "transformer_impl='transformer_engine')")
MAMBA_NOT_INSTALLED = ("Mamba layers need mamba-ssm (and causal-conv1d), CUDA-kernel sdists that are not in "
                       "requirements/lock.txt (megatron/core/ssm/mamba_mixer.py raises ImportError without them): "
                       "neither lane can build the model until they are locked and built for the GPU image")
SEQUENTIAL_EXPERTS_UNMAPPED = (
    "the bridge maps experts only under TEGroupedMLP names (experts.linear_fc1.weight<i>); the local spec "
    "always builds SequentialMLP (megatron/core/models/backends.py), whose experts.local_experts.<i>.* "
    "parameters have no mapping, so load_hf_weights meets a None conversion task (model_bridge.py:1100)"
)
FULL_DIM_QK_NORM_SPEC_IS_TE = (
    "the bridge's own layer spec (full-width q/k norms: olmoe_provider.py OLMoESelfAttention, minimax_m2_provider.py "
    "FullDimQNorm/FullDimKNorm) is built on the TE spec; the generic local spec builds per-head "
    "q/k norms (k_layernorm [16] vs HF [kv_heads x head_dim]) and SequentialMLP experts, which the bridge does not map"
)


def _megatron_core_file(tree: str, relative: str) -> Path | None:
    """A source file of megatron-core: in the Megatron-LM ``tree`` if given, else in the installed
    package, found without importing it."""
    import importlib.util

    roots = [Path(tree) / "megatron"] if tree else []
    spec = importlib.util.find_spec("megatron")  # a namespace package: finding it imports nothing
    roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return next((root / "core" / relative for root in roots if (root / "core" / relative).is_file()), None)


CHECKPOINT_INSPECTOR = "tools/checkpoint/checkpoint_inspector.py"
INSPECTOR_NEEDS_TREE = (f"Megatron-LM's offline converter ({CHECKPOINT_INSPECTOR} convert-torch-dist-to-fsdp-dtensor) is "
                        "not in the pip wheels: give a Megatron-LM source tree (--megatron-lm, or --megatron-bridge with "
                        "3rdparty/Megatron-LM)")


def megatron_lm_tool(relative: str) -> Path | None:
    """A file of the Megatron-LM source tree in use (``HARNESS_MEGATRON_LM``, else the
    ``3rdparty/Megatron-LM`` of ``HARNESS_MEGATRON_BRIDGE``); None without such a tree."""
    roots = [Path(p) for p in (os.environ.get("HARNESS_MEGATRON_LM", ""),) if p]
    if bridge := os.environ.get("HARNESS_MEGATRON_BRIDGE"):
        roots.append(Path(bridge) / "3rdparty" / "Megatron-LM")
    return next((root / relative for root in roots if (root / relative).is_file()), None)


def megatron_core_has(relative: str, needle: str) -> bool:
    """The megatron-core in use (``HARNESS_MEGATRON_LM``'s tree, else the installed package) has
    ``needle`` in its source file ``relative``."""
    return _has(os.environ.get("HARNESS_MEGATRON_LM", ""), relative, needle)


@functools.lru_cache(maxsize=None)
def _has(tree: str, relative: str, needle: str) -> bool:
    file = _megatron_core_file(tree, relative)
    return file is not None and needle in file.read_text(errors="replace")


# Bridges that need a megatron-core feature the one in use lacks: (family, megatron-core file, the
# feature's name in it, why). Checked against the source, so the cases run again, unchanged, once
# a Megatron-LM bump brings the feature.
MEGATRON_CORE_GAPS: tuple[tuple[str, str, str, str], ...] = (
    ("deepseek-v4", "models/gpt/experimental_attention_variant_module_specs.py", "dsv4_hybrid",
     "deepseek_v4_bridge.py sets experimental_attention_variant='dsv4_hybrid', which this megatron-core does not "
     "have (experimental_attention_variant_module_specs.py raises 'Invalid experimental attention variant'): "
     "a Bridge / megatron-core version mismatch, on every lane"),
)


def megatron_core_gap(model: "ModelSpec") -> str:
    return next((why for family, relative, needle, why in MEGATRON_CORE_GAPS
                 if model.family == family and not megatron_core_has(relative, needle)), "")


ZERO_CENTRED_NORM_ON_LOCAL_SPEC = ("zero-centred (1 + w) RMSNorm: the local torch norm rejects zero_centered_gamma "
                                   "(torch_norm.py)")
# The CPU lane builds the TE spec users run (harness.runtimes.te_cpu gives TE's modules CPU forwards);
# LOCAL_SPEC_BLOCKERS are the limits of megatron-core's local spec, for @local cases on either lane.

# @local: families whose Megatron model cannot be built with the local spec for a reason of their own.
LOCAL_SPEC_BLOCKERS: dict[str, str] = {
    "gemma2": "Gemma2's layer spec is hard-wired to TE modules (TELayerNormColumnParallelLinear, "
              "TERowParallelLinearLayerNorm); the local torch norm rejects zero_centered_gamma",
    **{family: ZERO_CENTRED_NORM_ON_LOCAL_SPEC for family in ("gemma", "gemma3")},
    "nemotron": "Nemotron's layernorm1p is a zero-centred (1 + w) LayerNorm: the local torch norm rejects "
                "zero_centered_gamma (torch_norm.py)",
    "exaone4": "EXAONE 4 is post-LayerNorm: its layer spec (exaone4_provider.py) is built from TE modules "
               "(TERowParallelLinearLayerNorm); the generic local spec is pre-LayerNorm, a different architecture "
               "the bridge has no mapping for",
    **{family: SEQUENTIAL_EXPERTS_UNMAPPED for family in ("exaone-moe", "glm4-moe")},
    **{family: FULL_DIM_QK_NORM_SPEC_IS_TE for family in ("olmoe", "minimax-m2")},
}
GEMMA4_MOE_ON_LOCAL_SPEC = ("Gemma 4's MoE block spec is TE-only (modeling_gemma4.py hard-codes Gemma4TEDotProductAttention "
                     "and puts the post-attention norm inside TE's linear_proj) and its experts are mapped under "
                     "TEGroupedMLP names only")
# @local on the CPU lane: families that convert but whose Megatron forward pass cannot run (the
# sliding-window mask gpt-oss needs is placed on the CPU by harness.runtimes.cpu, so it is not among them).
CPU_FORWARD_BLOCKERS: dict[str, str] = {
    "gemma4": "Gemma4DenseProvider builds its own layer spec (gemma4_provider.py) and the block's final norm is TE's "
              "(transformer_block.py: TENorm), which fails on CPU tensors (CUDAGuardImpl initialized with non-CUDA "
              "DeviceType: cpu)",
}
MOE_TP_FORWARD_ON_CPU = (
    "MoE with TP > 1 needs sequence parallelism (megatron/core/transformer/moe/moe_layer.py raises without it), "
    "which the local torch norm does not support"
)
CP_ON_CPU = ("CP > 1 needs TE's context-parallel attention (the ring exchange inside its CUDA kernels), which the "
             "CPU stand-in of DotProductAttention does not reproduce; the local spec's attention asserts 'Context "
             "parallelism is only supported by TEDotProductAttention'")
CP_FORWARD = "CP > 1 needs the load-balanced sequence split in the forward pass; logits are checked at CP1"


def model_blocker(model: "ModelSpec", lane: str) -> str:
    """Why ``model`` cannot be built as a Megatron model on ``lane`` ('' if it can)."""
    if model.has_mamba:
        return MAMBA_NOT_INSTALLED
    if gap := megatron_core_gap(model):
        return gap
    if model.local_spec:
        if model.has_mla:
            return MLA_ON_LOCAL_SPEC
        if model.has_gdn:
            return GDN_ON_LOCAL_SPEC
        if model.family == "gemma4" and model.is_moe:
            return GEMMA4_MOE_ON_LOCAL_SPEC
        return LOCAL_SPEC_BLOCKERS.get(model.family, "")
    return ""


def case_blocker(case: "Case", lane: str) -> str:
    """Why ``case`` cannot run on ``lane`` at all ('' if it can)."""
    if lane == CPU and case.kind == "key-contract":
        return ""  # key resolution only; DTensor construction is stubbed (harness.checks.key_contract)
    if case.kind == "config-export":
        return ""  # a provider and a config: no model is built, nothing a lane lacks
    if lane == CPU and any(layout.cp > 1 for layout in filter(None, (case.layout, case.load_layout))):
        return CP_ON_CPU
    if case.kind == "checkpoint-inspector" and megatron_lm_tool(CHECKPOINT_INSPECTOR) is None:
        return INSPECTOR_NEEDS_TREE
    return model_blocker(case.model, lane)


def forward_blocker(model: "ModelSpec", layout: "Layout", lane: str) -> str:
    """Why a Megatron forward pass of ``model`` at ``layout`` cannot run on ``lane`` ('' if it can)."""
    if lane == CPU:
        if model.local_spec and model.family in CPU_FORWARD_BLOCKERS:
            return CPU_FORWARD_BLOCKERS[model.family]
        if model.local_spec and model.is_moe and layout.tp > 1:
            return MOE_TP_FORWARD_ON_CPU
        return ""
    if layout.cp > 1:
        return CP_FORWARD
    return ""


def lanes_for(case: "Case") -> tuple[str, ...]:
    """The lanes that can build the case (the GPU lane all but those needing an uninstalled package)."""
    return tuple(lane for lane in LANES if not case_blocker(case, lane))


def note(case: "Case", lane: str) -> str:
    """What a reader of ``harness list`` should know about running ``case`` on ``lane``."""
    if case.invalid_reason:
        return f"invalid (expected, not run): {case.invalid_reason}"
    blocker = case_blocker(case, lane)
    if blocker:
        others = [other for other in lanes_for(case) if other != lane]
        return f"{others[0].upper()} only: {blocker}" if others else f"no lane: {blocker}"
    forward = forward_blocker(case.model, case.load_layout or case.layout, lane)
    if lane == CPU and forward:
        return f"CPU: no logit check ({forward})"
    return ""


# ------------------------------------------------------------------------------ environment


def rank_environment(lane: str) -> dict[str, str]:
    """Variables every rank of ``lane`` must start with (read before CUDA initialises, so they
    cannot be set from inside the rank). GPU: TF32 off for TE's cuBLASLt GEMMs, which ignore
    torch's ``allow_tf32`` (harness.runtimes.gpu)."""
    return {"NVIDIA_TF32_OVERRIDE": "0"} if lane == GPU else {}


# --------------------------------------------------------------------------------- capacity


def gpu_count() -> int:
    """GPUs this machine can give the GPU lane, found without importing torch.

    ``HARNESS_GPUS`` overrides the probe (tests, or a shared node where only some GPUs are
    yours); otherwise ``CUDA_VISIBLE_DEVICES`` if set, else the driver's device list.
    """
    if "HARNESS_GPUS" in os.environ:
        return int(os.environ["HARNESS_GPUS"])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        if not ids:
            return 0
        return min(len(ids), _driver_gpu_count() or len(ids))
    return _driver_gpu_count()


def _driver_gpu_count() -> int:
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def capacity_blocker(world_size: int, lane: str, gpus: int | None = None, ranks_per_gpu: int = 1) -> str:
    """Why a case of ``world_size`` ranks cannot run on ``lane`` on this machine ('' if it can).

    The GPU lane runs ``ranks_per_gpu`` ranks per GPU (one unless asked, ``Placement``); the CPU
    lane has no such limit (gloo ranks share cores).
    """
    if lane != GPU:
        return ""
    gpus = gpu_count() if gpus is None else gpus
    if gpus == 0:
        return "GPU lane: no CUDA GPU on this machine"
    needed = Placement(ranks_per_gpu).gpus_needed(world_size)
    if needed > gpus:
        if ranks_per_gpu == 1:
            return f"GPU lane: needs {world_size} GPUs, this machine has {gpus}"
        return f"GPU lane: needs {needed} GPUs at {ranks_per_gpu} ranks per GPU, this machine has {gpus}"
    return ""


# ------------------------------------------------------------------- several ranks on one GPU

# Why ranks sharing a GPU cannot use NCCL: since NCCL 2.5, ncclCommInitRank fails with
# ncclInvalidUsage, "Duplicate GPU detected : rank 1 and rank 0 both on CUDA device ..." (nccl
# src/init.cc); its maintainers say it would not work even without the check, because the topology
# search assumes one rank per device (NVIDIA/nccl#418).
NCCL_ONE_RANK_PER_GPU = ("NCCL refuses several ranks on one GPU ('Duplicate GPU detected', ncclInvalidUsage, "
                         "NVIDIA/nccl#418)")


@dataclass(frozen=True)
class Placement:
    """How a GPU-lane launch puts its ranks on devices.

    ``ranks_per_gpu`` > 1 fits a TP2/EP2/DP2 case on fewer GPUs (one machine with one GPU runs
    world size 2 and 4). Everything stays real but the collectives' transport: the process group
    is gloo, which takes CUDA tensors (through pinned host buffers; torch's ProcessGroupGloo
    implements allreduce, allgather, gather, scatter, broadcast and alltoall for CUDA, and
    reduce_scatter_tensor as an allreduce), because NCCL refuses shared devices
    (``NCCL_ONE_RANK_PER_GPU``). Megatron-FSDP, TE and the checkpoint formats are untouched;
    ranks still own disjoint shards. Gathers are bitwise under any transport; a sum's order may
    differ from NCCL's, which only logits (with their tolerance) see. Written without a GPU at
    hand: ``scripts/gpu/probe_collectives.py`` checks both transports on the device first.
    """

    ranks_per_gpu: int = 1

    def __post_init__(self) -> None:
        if self.ranks_per_gpu < 1:
            raise ValueError(f"ranks per GPU must be at least 1, not {self.ranks_per_gpu}")

    def gpus_needed(self, world_size: int) -> int:
        return -(-world_size // self.ranks_per_gpu)

    def shares_gpus(self, world_size: int) -> bool:
        return min(self.ranks_per_gpu, world_size) > 1

    def backend(self, world_size: int) -> str:
        """The process group's backend: NCCL unless ranks share a GPU (a world of one never does)."""
        return "gloo" if self.shares_gpus(world_size) else "nccl"

    def device_index(self, local_rank: int) -> int:
        """The GPU of ``local_rank``: consecutive ranks share one, so a TP pair sits on one device."""
        return local_rank // self.ranks_per_gpu


def placement(ranks_per_gpu: int, lane: str) -> Placement:
    """``--ranks-per-gpu`` as a ``Placement``; ``InputError`` (one line) where it cannot be used."""
    from harness.errors import InputError

    if ranks_per_gpu < 1:
        raise InputError(f"--ranks-per-gpu must be at least 1, not {ranks_per_gpu}")
    if ranks_per_gpu > 1 and lane != GPU:
        raise InputError(f"--ranks-per-gpu {ranks_per_gpu} applies to the GPU lane only "
                         "(the CPU lane has no GPUs to share)")
    return Placement(ranks_per_gpu)
