"""Layout audit of an fsdp_dtensor checkpoint: what the model config says must be on disk.

Reads metadata only (no tensor data). Expectations come from the HF config of the model and the
key grammar of ``harness.formats.megatron_keys`` (megatron-core 0.19.2):

* every SwiGLU ``linear_fc1`` is stored as ``_w`` and ``_v`` (no unsplit key left), each
  ``[F, H]`` with F the dense, expert or shared-expert intermediate size; any other fc1 whole;
* GDN ``in_proj.weight`` has the parts query|key|value|z|beta|alpha with sizes
  [qk, qk, v, v, nvh, nvh] and ``conv1d`` the parts query|key|value with sizes [qk, qk, v];
* expert indices are global: every MoE layer holds exactly experts 0..E-1;
* optimizer moments are split and numbered as their parameters are;
* optimizer keys share one wrapper depth (``optimizer.state.module.module.module.<param>``),
  the one the save path produces (3 for bf16, 2 for fp32; see harness/checks/key_contract.py).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping

from harness.formats import megatron_keys as keys
from harness.formats.megatron import FsdpDtensorCheckpoint
from harness.matrix.model_spec import config_has_gdn, config_num_experts
from harness.results import CheckResult

OPTIMIZER_DEPTH = keys.OPTIMIZER_DEPTH


def audit_fsdp_dtensor(ckpt: FsdpDtensorCheckpoint, cfg: Mapping[str, Any], *, optimizer_depth: int | None = None,
                       swiglu: bool = True) -> CheckResult:
    """``swiglu``: the model's MLP is SwiGLU, whose fc1 the save must split; a gated MLP with
    another activation (GPT-OSS's quick-GELU GLU, Gemma's GeGLU) is saved unsplit
    (megatron/bridge/training/checkpointing.py preprocess_fsdp_dtensor_state_dict splits only
    ``activation_func is F.silu``), and the audit then expects it whole."""
    hidden = cfg["hidden_size"]
    sizes = {
        "dense": cfg.get("intermediate_size"),
        "expert": cfg.get("moe_intermediate_size") or cfg.get("intermediate_size"),
        "shared": cfg.get("shared_expert_intermediate_size")
        or (cfg.get("moe_intermediate_size", 0) * cfg.get("n_shared_experts", 0)) or None,
    }
    has_gdn = config_has_gdn(cfg)
    problems: list[str] = []
    halves: dict[tuple[str, str], set[str]] = defaultdict(set)
    experts_by_layer: dict[tuple[str, str], set[int]] = defaultdict(set)
    gdn_parts: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)

    # Model keys, then every optimizer moment's key: the handlers split and number both alike.
    entries = [("", keys.parse_fsdp_key(stored), stored) for stored in ckpt.model_keys()]
    entries += [(moment, parsed, stored) for stored in ckpt.stored
                if (found := keys.parse_fsdp_optimizer_key(stored)) for moment, parsed in [found]]
    w, v = keys.SWIGLU_SUFFIXES
    for moment, key, stored in entries:
        spec = ckpt.stored[stored]
        projection = key.projection
        label = f"{key.base}{keys.part_suffix(key.part) if key.part else ''}" + (f" ({moment})" if moment else "")
        if projection == "fc1" and not swiglu:
            if key.part:
                problems.append(f"{label}: split, but the MLP is not SwiGLU (its fc1 is saved whole)")
        elif projection == "fc1":
            if not key.part:
                problems.append(f"unsplit SwiGLU fc1: {label} (expected {key.base}{w} and {key.base}{v})")
            else:
                halves[(moment, key.base)].add(keys.part_suffix(key.part))
                size = sizes[key.fc1_kind]
                want = (size, hidden) if ".weight" in key.base else (size,)
                if size and tuple(spec.shape) != want:
                    problems.append(f"{label}: shape {list(spec.shape)}, expected {list(want)} (half of fc1)")
        if key.expert is not None:
            experts_by_layer[(moment, key.layer)].add(key.expert)
        if projection in ("in_proj", "conv1d"):
            if key.part:
                gdn_parts[(moment, key.base)][key.part] = spec.shape[0]
            elif has_gdn:
                problems.append(f"unsplit GDN {projection}: {label}")

    for (moment, base), parts in sorted(halves.items()):
        if parts != {w, v}:
            missing = sorted({w, v} - parts)
            problems.append(f"{base}{f' ({moment})' if moment else ''}: missing {', '.join(missing)}")

    total = config_num_experts(cfg)
    for (moment, layer), found in sorted(experts_by_layer.items()):
        layer += f" ({moment})" if moment else ""
        if found != set(range(total)):
            top = max(found) + 1 if found else 0
            if found == set(range(top)) and 0 < top < total and total % top == 0:
                problems.append(f"{layer}: experts 0..{top - 1} only, of {total}: local instead of global expert indices")
            else:
                lost = sorted(set(range(total)) - found)
                odd = sorted(found - set(range(total)))
                problems.append(f"{layer}: expert indices {sorted(found)}; lost {lost}, unexpected {odd}")

    if has_gdn:
        in_proj, conv = keys.gdn_split_sizes(cfg)
        expect = {"in_proj": dict(zip(keys.GDN_IN_PROJ_PARTS, in_proj)), "conv1d": dict(zip(keys.GDN_CONV1D_PARTS, conv))}
        for (moment, base), parts in sorted(gdn_parts.items()):
            want = expect[keys.gdn_projection(base)]
            if parts != want:
                problems.append(f"{base}{f' ({moment})' if moment else ''}: GDN split sizes {parts}, expected {want}")

    depths = defaultdict(int)
    for key in ckpt.optimizer_keys():
        depth = keys.optimizer_key_depth(key)
        if depth is not None:
            depths[depth] += 1
    if len(depths) > 1:
        problems.append(f"optimizer keys at mixed wrapper depths {dict(depths)}")
    elif depths and optimizer_depth is not None and optimizer_depth not in depths:
        found = next(iter(depths))
        problems.append(
            f"optimizer keys carry {found} wrapper prefix(es) (optimizer.state.{keys.wrapper_prefix(found)}...), expected {optimizer_depth}"
        )

    model = {"fc1_splits": sum(1 for m, _ in halves if not m), "moe_layers": sum(1 for m, _ in experts_by_layer if not m),
             "gdn_projections": sum(1 for m, _ in gdn_parts if not m)}
    checked = f"{model['fc1_splits']} fc1 splits, {model['moe_layers']} MoE layers, {model['gdn_projections']} GDN " \
              f"projections, {sum(depths.values())} optimizer keys"
    return CheckResult(
        name="fsdp-layout-audit",
        passed=not problems,
        summary=f"{len(problems)} problem(s): {problems[0]}" if problems else f"layout as expected ({checked})",
        metrics={"problems": problems, **model, "optimizer_depths": dict(depths)},
    )
