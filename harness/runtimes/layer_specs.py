"""The layer spec a ``@local`` case builds instead of the provider's TE spec (on either lane)."""

from __future__ import annotations


def local_block_spec(config, vp_stage: int | None = None):
    """Provider ``transformer_layer_spec`` that builds the whole block without TE: megatron-core's
    local spec (a local *layer* spec alone still builds TE's final norm)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization=config.normalization, vp_stage=vp_stage
    )


def allow_target(allowlisted: list[str]) -> None:
    """Megatron-Bridge instantiates only allow-listed callables named in a torch_dist checkpoint's
    ``run_config.yaml``: add ``local_block_spec`` (recorded in ``allowlisted`` so the caller can
    take it out again with ``forget``)."""
    from megatron.training.config.instantiate_utils import target_allowlist

    target = f"{local_block_spec.__module__}.{local_block_spec.__qualname__}"
    if not target_allowlist.is_allowed(target):
        target_allowlist.add_exact(target)
        allowlisted.append(target)


def forget(allowlisted: list[str]) -> None:
    if allowlisted:
        from megatron.training.config.instantiate_utils import target_allowlist

        for target in allowlisted:
            target_allowlist.remove_exact(target)
        allowlisted.clear()
