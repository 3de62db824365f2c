"""The bf16 noise floor of a family's logits: the HF model in bf16 against itself in fp32.

The ``@bf16`` logit tolerances (harness/checks/logits.py) come from this measurement: the same
bf16 weights (the zoo's ``@bf16`` checkpoint), the same batches, HF's forward once in bf16 and
once in fp32. Whatever differs is bf16 arithmetic alone, the floor a correct bf16 conversion can
reach. Prints, per family, the worst max|d|, mean|d| and KL over the batches.

    .venv/bin/python benchmarks/bench_bf16_floor.py llama gemma nemotron --batches 40
"""

from __future__ import annotations

import argparse

import torch


def floor(family: str, batches: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from harness.checks.logits import logit_metrics
    from harness.conversion.forward import fixed_batch
    from harness.matrix import checkpoint_builder, model_spec
    from harness.matrix.hf_reference import pure_torch_reference

    spec = model_spec.ModelSpec.parse(f"{family}@bf16")
    hf_dir = checkpoint_builder.materialize(spec)
    with pure_torch_reference():
        fp32 = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
        bf16 = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.bfloat16, attn_implementation="eager").eval()
    worst = {"max_abs_diff": 0.0, "mean_abs_diff": 0.0, "kl": 0.0}
    vocab = spec.hf_config["vocab_size"]
    with torch.no_grad():
        for i in range(batches):
            batch = fixed_batch(vocab, seed=4321 + i)
            kwargs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
            m = logit_metrics(fp32(**kwargs).logits.float(), bf16(**kwargs).logits.float())
            worst = {k: max(worst[k], m[k]) for k in worst}
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("families", nargs="+")
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    for family in args.families:
        w = floor(family, args.batches)
        print(f"{family:14} max|d| {w['max_abs_diff']:.3g}  mean|d| {w['mean_abs_diff']:.3g}  KL {w['kl']:.3g}", flush=True)


if __name__ == "__main__":
    main()
