"""Optimizer state of a training checkpoint: every moment of every parameter, bitwise.

Before a training checkpoint is saved, the harness gives the real DistributedOptimizer *known*
states: each moment is a fixed elementwise function of its own parameter's fp32 main value
(``KNOWN_MOMENTS``). The tiny models' weights are all distinct draws, so every moment element is
distinct too, and the rule can be checked wherever a parameter and its moments are both at hand:

* on disk, in the canonical space ``harness diff`` uses (the reader joins ``_w``/``_v`` halves and
  GDN parts and numbers experts globally, for model and optimizer keys alike): a moment that is
  missing, extra, swapped with its other half or another expert, or whose shard is misplaced,
  breaks the rule for some element (``check_on_disk``);
* in memory after a strict reload into a fresh optimizer, whose own states are the zeros of
  Megatron's dummy initialisation: a moment the load skipped or misplaced breaks it
  (``check_in_memory``).

The rule is exact in fp32 (a multiply by 0.5 and an add of a power of two, or a square plus one),
so bitwise equality is the right comparison: no arithmetic of the code under test is involved.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from harness.checks.load_coverage import local_shard
from harness.formats import megatron_keys as keys
from harness.results import CheckResult

IN_MEMORY = "optimizer-reload"
ON_DISK = "optimizer-on-disk"
KNOWN_STEP = 7  # the param groups' step count the harness sets; a reload must bring it back

KNOWN_MOMENTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp_avg": lambda p: p.float() * 0.5 - 0.25,
    "exp_avg_sq": lambda p: p.float() * p.float() + 0.125,
}


def _preview(items: list[str]) -> str:
    return "; ".join(items[:2]) + (f"; +{len(items) - 2} more" if len(items) > 2 else "")


def _first_difference(expected: torch.Tensor, got: torch.Tensor) -> str:
    if expected.shape != got.shape:
        return f"shape {list(got.shape)}, expected {list(expected.shape)}"
    if got.dtype != expected.dtype:
        return f"dtype {str(got.dtype).removeprefix('torch.')}, expected {str(expected.dtype).removeprefix('torch.')}"
    differ = (expected != got) & ~(expected.isnan() & got.isnan())
    count = int(differ.sum())
    return f"{count}/{expected.numel()} elements differ (max|d| {float((expected - got).abs().nan_to_num(float('inf')).max()):.3g})"


# ------------------------------------------------------------------------------ in memory


def optimizer_params(optimizer) -> Iterable[tuple[dict, torch.Tensor]]:
    """(param group, parameter) of the inner optimizer (one per Megatron-FSDP main weight)."""
    for group in optimizer.optimizer.param_groups:
        for param in group["params"]:
            yield group, param


def set_known_states(optimizer) -> int:
    """Give every parameter its known moments (``KNOWN_MOMENTS``) and every group ``KNOWN_STEP``;
    no optimizer step runs, so the model's weights stay exactly what the load gave them.
    Returns how many parameters were set on this rank."""
    optimizer.init_state_fn(optimizer.optimizer, optimizer.config)
    count = 0
    with torch.no_grad():
        for group, param in optimizer_params(optimizer):
            group["step"] = KNOWN_STEP
            state = optimizer.optimizer.state[param]
            for moment, rule in KNOWN_MOMENTS.items():
                local_shard(state[moment]).copy_(rule(local_shard(param)))
            count += 1
    return count


def check_in_memory(optimizer, name_of: Callable[[torch.Tensor], str]) -> CheckResult:
    """This rank's optimizer after a reload: every moment is its parameter's known moment and the
    step counts are back (merge the ranks with ``load_coverage.merge_over_ranks``)."""
    problems: list[str] = []
    checked = 0
    for group, param in optimizer_params(optimizer):
        checked += 1
        if group.get("step") != KNOWN_STEP:
            problems.append(f"{name_of(param)}: param group step {group.get('step')}, expected {KNOWN_STEP}")
        state = optimizer.optimizer.state.get(param, {})
        for moment, rule in KNOWN_MOMENTS.items():
            if moment not in state:
                problems.append(f"{name_of(param)}.{moment}: missing after the reload")
                continue
            expected, got = rule(local_shard(param)), local_shard(state[moment])
            if not torch.equal(expected, got):
                problems.append(f"{name_of(param)}.{moment}: {_first_difference(expected, got)}")
    if problems:
        return CheckResult(IN_MEMORY, False, f"{len(problems)} optimizer tensor(s) wrong after the reload: "
                           f"{_preview(problems)}", metrics={"problems": problems[:20], "params": checked})
    return CheckResult(IN_MEMORY, True, f"{checked} params x {len(KNOWN_MOMENTS)} moments bitwise after the reload "
                       f"(step {KNOWN_STEP})", metrics={"problems": [], "params": checked})


# --------------------------------------------------------------------------------- on disk


def check_on_disk(ckpt: Any, optimized: set[str]) -> CheckResult:
    """A checkpoint reader's canonical tensors (``harness.formats``): every parameter in
    ``optimized`` (the optimizer's own record of what it holds) has each known moment, equal
    bitwise to the rule applied to the parameter as saved, and there is no other moment. Streams
    one parameter (and its moments) at a time."""
    specs = ckpt.specs()
    params = [k for k in specs if keys.split_canonical_optimizer_key(k) is None and k in optimized]
    problems: list[str] = [f"{k}: the optimizer holds it, the checkpoint has no such parameter"
                           for k in sorted(optimized - set(specs))]
    moments = {k for k in specs if keys.split_canonical_optimizer_key(k) is not None}
    for param in params:
        wanted = [keys.canonical_optimizer_key(m, param) for m in KNOWN_MOMENTS]
        missing = [k for k in wanted if k not in moments]
        problems += [f"{k}: missing" for k in missing]
        present = [k for k in wanted if k in moments]
        tensors = dict(ckpt.tensors([param, *present]))
        value = tensors.pop(param)
        for key, got in tensors.items():
            moment, _ = keys.split_canonical_optimizer_key(key)
            expected = KNOWN_MOMENTS[moment](value)
            if not torch.equal(expected, got):
                problems.append(f"{key}: {_first_difference(expected, got)}")
        moments -= set(wanted)
    problems += [f"{k}: a moment of no parameter in the checkpoint" for k in sorted(moments)]
    checked = f"{len(params)} params x {len(KNOWN_MOMENTS)} moments"
    if problems:
        return CheckResult(ON_DISK, False, f"{len(problems)} problem(s) in the saved optimizer state ({checked}): "
                           f"{_preview(problems)}", metrics={"problems": problems[:20], "params": len(params)})
    return CheckResult(ON_DISK, True, f"{checked} bitwise on disk (canonical keys)",
                       metrics={"problems": [], "params": len(params)})
