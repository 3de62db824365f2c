"""Layout audit of an fsdp_dtensor checkpoint: what the model config says must be on disk.

Reads metadata only (no tensor data). Expectations come from the HF config of the model and the
key grammar of ``harness.formats.megatron_keys`` (megatron-core 0.19.2):

* every gated-MLP ``linear_fc1`` is stored as ``_w`` and ``_v`` (no unsplit key left), each
  ``[F, H]`` with F the dense, expert or shared-expert intermediate size;
* GDN ``in_proj.weight`` has the parts query|key|value|z|beta|alpha with sizes
  [qk, qk, v, v, nvh, nvh] and ``conv1d`` the parts query|key|value with sizes [qk, qk, v];
* expert indices are global: every MoE layer holds exactly experts 0..E-1;
* optimizer keys share one wrapper depth (``optimizer.state.module.module.module.<param>``),
  the one the save path produces (3 for bf16, 2 for fp32; see harness/checks/key_contract.py).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping

from harness.formats import megatron_keys as keys
from harness.formats.megatron import FsdpDtensorCheckpoint
from harness.matrix.zoo import config_num_experts
from harness.results import CheckResult

OPTIMIZER_DEPTH = keys.OPTIMIZER_DEPTH


def audit_fsdp_dtensor(ckpt: FsdpDtensorCheckpoint, cfg: Mapping[str, Any], *, optimizer_depth: int | None = None) -> CheckResult:
    hidden = cfg["hidden_size"]
    sizes = {
        "dense": cfg.get("intermediate_size"),
        "expert": cfg.get("moe_intermediate_size") or cfg.get("intermediate_size"),
        "shared": cfg.get("shared_expert_intermediate_size")
        or (cfg.get("moe_intermediate_size", 0) * cfg.get("n_shared_experts", 0)) or None,
    }
    has_gdn = "linear_num_key_heads" in cfg
    problems: list[str] = []
    halves: dict[str, set[str]] = defaultdict(set)
    experts_by_layer: dict[str, set[int]] = defaultdict(set)
    gdn_parts: dict[str, dict[str, int]] = defaultdict(dict)

    for stored in ckpt.model_keys():
        key = keys.parse_fsdp_key(stored)
        spec = ckpt.stored[stored]
        projection = key.projection
        if projection == "fc1":
            if not key.part:
                problems.append(f"unsplit SwiGLU fc1: {key.base} (expected {key.base}_w and {key.base}_v)")
            else:
                halves[key.base].add(f"_{key.part}")
                size = sizes[key.fc1_kind]
                want = (size, hidden) if ".weight" in key.base else (size,)
                if size and tuple(spec.shape) != want:
                    problems.append(f"{key.base}_{key.part}: shape {list(spec.shape)}, expected {list(want)} (half of fc1)")
        if key.expert is not None:
            experts_by_layer[key.layer].add(key.expert)
        if projection in ("in_proj", "conv1d"):
            if key.part:
                gdn_parts[key.base][key.part] = spec.shape[0]
            elif has_gdn:
                problems.append(f"unsplit GDN {projection}: {key.base}")

    for base, parts in sorted(halves.items()):
        if parts != {"_w", "_v"}:
            missing = sorted({"_w", "_v"} - parts)
            problems.append(f"{base}: missing {', '.join(missing)}")

    total = config_num_experts(cfg)
    for layer, found in sorted(experts_by_layer.items()):
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
        for base, parts in sorted(gdn_parts.items()):
            want = expect["in_proj" if ".in_proj." in base else "conv1d"]
            if parts != want:
                problems.append(f"{base}: GDN split sizes {parts}, expected {want}")

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
            f"optimizer keys carry {found} wrapper prefix(es) (optimizer.state.{'module.' * found}...), expected {optimizer_depth}"
        )

    checked = f"{len(halves)} fc1 splits, {len(experts_by_layer)} MoE layers, {len(gdn_parts)} GDN projections, " \
              f"{sum(depths.values())} optimizer keys"
    return CheckResult(
        name="fsdp-layout-audit",
        passed=not problems,
        summary=f"{len(problems)} problem(s): {problems[0]}" if problems else f"layout as expected ({checked})",
        metrics={"problems": problems, "fc1_splits": len(halves), "moe_layers": len(experts_by_layer),
                 "gdn_projections": len(gdn_parts), "optimizer_depths": dict(depths)},
    )
