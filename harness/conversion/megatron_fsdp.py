"""Megatron-FSDP steps of the fsdp_dtensor routes (GPU lane only: Megatron-FSDP creates CUDA
streams and a cuda DeviceMesh): build, save as fsdp_dtensor, audit, strict reload.

The routes (``harness.conversion.routes``) follow Megatron-Bridge's own recipe
(examples/conversion/mfsdp/convert_checkpoints_fsdp.py): ``provide_distributed_model(use_megatron_fsdp=True, data_parallel_sharding_strategy=
"optim_grads_params")`` + ``load_hf_weights`` + ``save_megatron_model(ckpt_format="fsdp_dtensor")``;
reload with ``training.checkpointing.load_checkpoint``. Two things the recipe does not do, on
purpose:

* the model that is loaded into is built from a *different seed* and then filled with the NaN
  sentinel, so a key the load silently skipped cannot pass as loaded;
* ``strict_fsdp_dtensor_load=True`` (the bridge default is False = partial load allowed).

The on-disk layout is audited (``harness.checks.fsdp_layout``) before reloading. The torch_dist
-> fsdp_dtensor step goes through the bridge (load torch_dist, export, import into
Megatron-FSDP): Megatron-LM's offline converter (tools/checkpoint/checkpoint_inspector.py) is not
in the pip package.

Two things the training loader expects that a conversion does not have are supplied for the load
only: no RNG state is asked for, and the global num-microbatches calculator exists.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from harness.checks import fsdp_layout
from harness.conversion import bridge_calls
from harness.errors import InputError
from harness.formats import megatron_keys
from harness.matrix.layouts import Layout
from harness.matrix.model_spec import ModelSpec
from harness.results import CheckResult
from harness.runtimes.base import Runtime

RELOAD_SEED = 97531  # any seed other than the runtime's: the reload target starts different


def _ddp_config():
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        use_distributed_optimizer=True, use_megatron_fsdp=True, data_parallel_sharding_strategy="optim_grads_params"
    )


def build_fsdp_model(bridge, spec: ModelSpec, layout: Layout, runtime: Runtime, *,
                     seed: int | None = None) -> bridge_calls.MegatronModel:
    from megatron.core.transformer.module import Float16Module

    runtime.init_model_parallel(layout, seed=seed)
    provider = bridge_calls.make_provider(bridge, spec, layout, runtime)
    bf16 = bool(getattr(provider, "bf16", False))
    chunks = provider.provide_distributed_model(
        ddp_config=_ddp_config(),
        use_megatron_fsdp=True,
        wrap_with_ddp=True,
        use_cpu_initialization=runtime.use_cpu_initialization,
        mixed_precision_wrapper=Float16Module if bf16 else None,
    )
    return bridge_calls.MegatronModel(bridge=bridge, chunks=list(chunks), layout=layout, provider=provider)


def save_fsdp_dtensor(model: bridge_calls.MegatronModel, path: Path) -> None:
    from megatron.bridge.training.model_load_save import save_megatron_model

    save_megatron_model(model.chunks, str(path), ckpt_format="fsdp_dtensor")


def training_config(model_config, path: Path, *, optimizer: bool, load: bool):
    """The ``ConfigContainer`` of an fsdp_dtensor save to, or strict load from, ``path``; with the
    optimizer's state (a training checkpoint) or without (the conversion recipe's model-only one).

    ``save_rng=False`` as well as ``load_rng=False``: the loader builds the state dict it asks for
    from ``save_rng`` (megatron/bridge/training/checkpointing.py: generate_state_dict), so with the
    default True it demands an ``rng_state`` that the harness never writes.
    """
    from megatron.bridge.training.config import CheckpointConfig, ConfigContainer, LoggerConfig
    from megatron.core.optimizer import OptimizerConfig

    where = {"load": str(path)} if load else {"save": str(path)}
    return ConfigContainer(
        model=model_config,
        train=None,
        optimizer=optimizer_config(model_config) if optimizer else OptimizerConfig(use_distributed_optimizer=True),
        ddp=_ddp_config(),
        scheduler=None,
        dataset=None,
        logger=LoggerConfig(),
        tokenizer=None,
        checkpoint=CheckpointConfig(
            **where, ckpt_format="fsdp_dtensor", strict_fsdp_dtensor_load=True, async_save=False,
            save_optim=optimizer, load_optim=optimizer, load_rng=False, save_rng=False, finetune=False,
        ),
        dist=None,
    )


def optimizer_config(model_config):
    """Adam through Megatron's DistributedOptimizer, as training with Megatron-FSDP builds it."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, bf16=bool(model_config.bf16),
                           params_dtype=model_config.params_dtype, use_distributed_optimizer=True)


def build_optimizer(model: bridge_calls.MegatronModel):
    """The real DistributedOptimizer over a Megatron-FSDP model's main weights."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.utils import get_model_config

    return get_megatron_optimizer(optimizer_config(get_model_config(model.chunks[0])), model.chunks)


def save_training_checkpoint(model: bridge_calls.MegatronModel, optimizer, path: Path) -> None:
    """The bridge's training save (``training.checkpointing.save_checkpoint``): model and
    optimizer state as one fsdp_dtensor checkpoint, through the SwiGLU/GDN/expert handlers."""
    from megatron.bridge.training.checkpointing import save_checkpoint
    from megatron.bridge.training.state import GlobalState
    from megatron.core.utils import get_model_config

    state = GlobalState()
    state.cfg = training_config(get_model_config(model.chunks[0]), path, optimizer=True, load=False)
    save_checkpoint(state, model.chunks, optimizer, None, 0)


@contextlib.contextmanager
def num_microbatches_calculator(data_parallel_size: int) -> Iterator[None]:
    """The training loader calls ``update_num_microbatches``, which needs Megatron's global
    num-microbatches calculator (megatron/core/num_microbatches_calculator.py). Set one up for a
    load (one micro batch per DP rank) and put back whatever was there before, exception or not."""
    from megatron.core import num_microbatches_calculator as calculators

    previous = calculators._GLOBAL_NUM_MICROBATCHES_CALCULATOR
    calculators.unset_num_microbatches_calculator()
    try:
        calculators.init_num_microbatches_calculator(
            rank=0, rampup_batch_size=None, global_batch_size=data_parallel_size, micro_batch_size=1,
            data_parallel_size=data_parallel_size)
        yield
    finally:
        calculators._GLOBAL_NUM_MICROBATCHES_CALCULATOR = previous


def load_fsdp_dtensor_strict(model: bridge_calls.MegatronModel, path: Path, optimizer=None) -> None:
    """``load_checkpoint`` with strict_fsdp_dtensor_load=True, no RNG state, and the optimizer's
    state when an optimizer is given."""
    from megatron.bridge.training.checkpointing import load_checkpoint
    from megatron.bridge.training.state import GlobalState
    from megatron.core import parallel_state
    from megatron.core.utils import get_model_config

    state = GlobalState()
    state.cfg = training_config(get_model_config(model.chunks[0]), path, optimizer=optimizer is not None, load=True)
    with num_microbatches_calculator(parallel_state.get_data_parallel_world_size()):
        load_checkpoint(state, model.chunks, optimizer=optimizer, opt_param_scheduler=None, strict=True)


def newest_iter(path: Path) -> Path:
    from harness.formats.dcp import newest_complete_iter

    found = newest_complete_iter(path)
    if found is None:
        raise RuntimeError(f"{path}: the fsdp_dtensor save left no complete iter_* folder")
    return found


def is_swiglu(provider) -> bool:
    """The model's MLP is SwiGLU: the fc1 halves the fsdp_dtensor save must store apart."""
    import torch.nn.functional as F

    return bool(getattr(provider, "gated_linear_unit", False)) and getattr(provider, "activation_func", None) is F.silu


def audit_saved(path: Path, spec: ModelSpec, provider) -> list[CheckResult]:
    """The layout audit, and for a training checkpoint the optimizer state on disk."""
    from harness.checks import optimizer_state
    from harness.formats.megatron import FsdpDtensorCheckpoint

    try:
        ckpt = FsdpDtensorCheckpoint(newest_iter(path))
    except InputError as err:  # e.g. chunks that do not tile a tensor: the save itself is wrong
        return [CheckResult("fsdp-layout-audit", False, f"the saved checkpoint does not read back: {err}")]
    depth = megatron_keys.OPTIMIZER_DEPTH["bf16" if spec.bf16 else "fp32"]
    results = [fsdp_layout.audit_fsdp_dtensor(ckpt, spec.hf_config, optimizer_depth=depth, swiglu=is_swiglu(provider))]
    if ckpt.optimizer_keys():
        results.append(optimizer_state.check_on_disk(ckpt, ckpt.optimized_params()))
    return results


def reload_fresh(bridge, spec: ModelSpec, layout: Layout, runtime: Runtime, saved: Path, *,
                 with_optimizer: bool) -> tuple[bridge_calls.MegatronModel, object]:
    """A Megatron-FSDP model from another seed, NaN-filled, then strictly loaded from ``saved``,
    with a fresh optimizer loaded too when ``with_optimizer`` (else None)."""
    model = build_fsdp_model(bridge, spec, layout, runtime, seed=RELOAD_SEED)
    bridge_calls.fill_sentinel(model)
    optimizer = build_optimizer(model) if with_optimizer else None
    load_fsdp_dtensor_strict(model, saved, optimizer)
    return model, optimizer
