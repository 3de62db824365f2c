"""Layout audit of an fsdp_dtensor checkpoint: what the model config says must be on disk.

Reads metadata only (no tensor data). Expectations come from the HF config of the model and the
conventions of ``megatron/core/transformer/fsdp_dtensor_checkpoint.py`` (megatron-core 0.19.2):

* every gated-MLP ``linear_fc1`` is stored as ``_w`` and ``_v`` (no unsplit key left), each
  ``[F, H]`` with F the dense, expert or shared-expert intermediate size;
* GDN ``in_proj.weight`` has the parts query|key|value|z|beta|alpha with sizes
  [qk, qk, v, v, nvh, nvh] and ``conv1d`` the parts query|key|value with sizes [qk, qk, v];
* expert indices are global: every MoE layer holds exactly experts 0..E-1;
* optimizer keys share one wrapper depth (``optimizer.state.module.module.module.<param>``),
  the one the save path produces (3 for bf16, 2 for fp32; see harness/contracts.py).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Mapping

from harness.results import CheckResult
from harness.formats import canonical
from harness.formats.megatron import FsdpDtensorCheckpoint

_FC1 = re.compile(r"^(?P<layer>.*decoder\.layers\.\d+)\.mlp\.(?P<where>experts\.linear_fc1\.weight\d+|experts\.local_experts\.\d+\.linear_fc1\.weight|shared_experts\.linear_fc1\.weight|linear_fc1\.weight)(?P<part>_w|_v)?$")
_EXPERT_INDEX = re.compile(r"^(?P<layer>.*decoder\.layers\.\d+)\.mlp\.experts\.(?:linear_fc\d\.weight(?P<g>\d+)|local_experts\.(?P<s>\d+)\.)")
_GDN = re.compile(r"^(?P<base>.*\.(?P<proj>in_proj|conv1d)\.(?:weight|bias))(?:\.(?P<part>query|key|value|z|beta|alpha))?$")
OPTIMIZER_DEPTH = {"bf16": 3, "fp16": 3, "fp32": 2}


def num_experts(cfg: Mapping[str, Any]) -> int:
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)


def audit_fsdp_dtensor(ckpt: FsdpDtensorCheckpoint, cfg: Mapping[str, Any], *, optimizer_depth: int | None = None) -> CheckResult:
    hidden = cfg["hidden_size"]
    sizes = {
        "dense": cfg.get("intermediate_size"),
        "expert": cfg.get("moe_intermediate_size") or cfg.get("intermediate_size"),
        "shared": cfg.get("shared_expert_intermediate_size")
        or (cfg.get("moe_intermediate_size", 0) * cfg.get("n_shared_experts", 0)) or None,
    }
    problems: list[str] = []
    halves: dict[str, set[str]] = defaultdict(set)
    experts_by_layer: dict[str, set[int]] = defaultdict(set)
    gdn_parts: dict[str, dict[str, int]] = defaultdict(dict)

    for stored in ckpt.model_keys():
        key, _ = canonical.strip_wrappers(stored)
        spec = ckpt.stored[stored]
        if m := _FC1.match(key):
            if not m["part"]:
                problems.append(f"unsplit SwiGLU fc1: {key} (expected {key}_w and {key}_v)")
            else:
                base = key[:-2]
                halves[base].add(m["part"])
                kind = "shared" if "shared_experts" in key else "expert" if "experts" in key else "dense"
                want = (sizes[kind], hidden)
                if sizes[kind] and tuple(spec.shape) != want:
                    problems.append(f"{key}: shape {list(spec.shape)}, expected {list(want)} (half of fc1)")
        if m := _EXPERT_INDEX.match(key):
            experts_by_layer[m["layer"]].add(int(m["g"] if m["g"] is not None else m["s"]))
        if (m := _GDN.match(key)) and m["part"]:
            gdn_parts[m["base"]][m["part"]] = spec.shape[0]
        elif m and not m["part"] and "linear_num_key_heads" in cfg:
            problems.append(f"unsplit GDN {m['proj']}: {key}")

    for base, parts in sorted(halves.items()):
        if parts != {"_w", "_v"}:
            missing = sorted({"_w", "_v"} - parts)
            problems.append(f"{base}: missing {', '.join(missing)}")

    total = num_experts(cfg)
    for layer, found in sorted(experts_by_layer.items()):
        if found != set(range(total)):
            top = max(found) + 1 if found else 0
            if found == set(range(top)) and 0 < top < total and total % top == 0:
                problems.append(f"{layer}: experts 0..{top - 1} only, of {total}: local instead of global expert indices")
            else:
                lost = sorted(set(range(total)) - found)
                odd = sorted(found - set(range(total)))
                problems.append(f"{layer}: expert indices {sorted(found)}; lost {lost}, unexpected {odd}")

    if "linear_num_key_heads" in cfg:
        from harness.synthetic import gdn_split_sizes

        in_proj, conv = gdn_split_sizes(cfg)
        expect = {"in_proj": dict(zip(canonical.GDN_IN_PROJ_PARTS, in_proj)), "conv1d": dict(zip(canonical.GDN_CONV1D_PARTS, conv))}
        for base, parts in sorted(gdn_parts.items()):
            want = expect["in_proj" if ".in_proj." in base else "conv1d"]
            if parts != want:
                problems.append(f"{base}: GDN split sizes {parts}, expected {want}")

    depths = defaultdict(int)
    for key in ckpt.optimizer_keys():
        if key.startswith("optimizer.state."):
            _, depth = canonical.strip_wrappers(key.removeprefix("optimizer.state."))
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
