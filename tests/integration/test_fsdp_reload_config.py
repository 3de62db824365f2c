"""The strict fsdp_dtensor reload asks only for what save_megatron_model wrote (CPU: the loader's
own state-dict builder, run for real; Megatron-FSDP itself needs a GPU)."""

from __future__ import annotations

import pytest

from harness.conversion import bridge_calls
from harness.conversion.megatron_fsdp import training_config
from harness.matrix import checkpoint_builder, model_spec
from harness.matrix.layouts import Layout

pytestmark = pytest.mark.cpu


def requested_keys(checkpoint_config) -> set[str]:
    from megatron.bridge.training.checkpointing import generate_state_dict

    state = generate_state_dict(checkpoint_config, model=[], optimizer=None, opt_param_scheduler=None, rng_state=None,
                                optim_sd_kwargs={"is_loading": True})
    return set(state)


def test_the_strict_reload_does_not_ask_for_rng_state(cpu_runtime, tmp_path):
    from megatron.bridge.training.config import CheckpointConfig
    from megatron.core.utils import get_model_config

    spec = model_spec.ModelSpec("llama")
    model = bridge_calls.build_model(bridge_calls.open_bridge(checkpoint_builder.materialize(spec)), spec, Layout(), cpu_runtime)
    config = training_config(get_model_config(model.chunks[0]), tmp_path, optimizer=False, load=True)
    checkpoint = config.checkpoint
    assert checkpoint.strict_fsdp_dtensor_load and not checkpoint.load_optim and not checkpoint.load_rng
    assert "rng_state" not in requested_keys(checkpoint)
    # The seeded bug: the bridge's default save_rng=True makes the loader demand rng_state even
    # with load_rng=False, which save_megatron_model never wrote (the H100 run's first error).
    default = CheckpointConfig(load=str(tmp_path), ckpt_format="fsdp_dtensor", load_rng=False, load_optim=False)
    assert "rng_state" in requested_keys(default)
