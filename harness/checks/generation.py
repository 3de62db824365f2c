"""Generation parity: the exported checkpoint, reloaded from disk, decodes like the original.

Bitwise weights make this redundant for the tensors; it is here for what the tensors do not
cover: the exported ``config.json`` and tokenizer, as a deployment engineer would check them.
"""

from __future__ import annotations

from harness.results import CheckResult


def generation_parity(reference: list[list[int]], candidate: list[list[int]]) -> CheckResult:
    """Greedy continuations of the original and of the exported checkpoint must be identical."""
    for i, (ref, cand) in enumerate(zip(reference, candidate)):
        if ref != cand:
            step = next((j for j, (a, b) in enumerate(zip(ref, cand)) if a != b), min(len(ref), len(cand)))
            return CheckResult(
                name="generation", passed=False,
                summary=f"prompt {i}: greedy tokens diverge at step {step} (original {ref[step:step + 3]}, "
                        f"exported {cand[step:step + 3]})",
                metrics={"reference": reference, "candidate": candidate, "prompt": i, "step": step},
            )
    if len(reference) != len(candidate):
        return CheckResult("generation", False, f"{len(candidate)} continuations for {len(reference)} prompts")
    n = sum(len(r) for r in reference)
    return CheckResult(name="generation", passed=True,
                       summary=f"{n}/{n} greedy tokens identical ({len(reference)} prompts, exported checkpoint reloaded)",
                       metrics={"reference": reference, "candidate": candidate})
