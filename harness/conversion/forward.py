"""Forward passes that produce comparable logits: HF on one process, Megatron on all ranks.

Both sides get the same fixed batch and return fp32 logits ``[batch, seq, vocab]`` on CPU, with
Megatron's padded vocab cut back to the HF vocab. The HF reference always runs on the CPU in
plain torch (``harness.matrix.hf_reference``). The Megatron side gathers tensor-parallel vocab
shards and walks pipeline stages explicitly (send/recv of the hidden state), which works on gloo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from harness.conversion.bridge_calls import unwrap
from harness.matrix.case_classes import TEST_SEQUENCE
from harness.matrix.hf_reference import pure_torch_reference

BATCH_SEED = 4321


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [b, s] int64

    @property
    def position_ids(self) -> torch.Tensor:
        b, s = self.input_ids.shape
        return torch.arange(s).unsqueeze(0).expand(b, s).contiguous()

    @property
    def causal_mask(self) -> torch.Tensor:
        """Megatron's boolean mask, True = masked. Passed explicitly: the default is CUDA-only."""
        s = self.input_ids.shape[1]
        return torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)


def fixed_batch(vocab_size: int, batch: int = 3, seq: int = TEST_SEQUENCE, seed: int = BATCH_SEED) -> Batch:
    """A deterministic batch of ordinary (non-special) token ids."""
    gen = torch.Generator().manual_seed(seed)
    low = min(4, vocab_size - 1)  # skip the tokenizer's special tokens
    return Batch(input_ids=torch.randint(low, vocab_size, (batch, seq), generator=gen))


def hf_logits(hf_dir: Path, batch: Batch) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with pure_torch_reference():
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    return out.logits.float()


def megatron_logits(chunks: list[torch.nn.Module], batch: Batch, vocab_size: int, device) -> torch.Tensor | None:
    """Megatron forward over all pipeline stages; full logits on the last stage, else None.

    Collective over the model-parallel group: every rank must call it.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ids = batch.input_ids.to(device)
    pos = batch.position_ids.to(device)
    mask = batch.causal_mask.to(device)
    pp_size = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    pp_group = ps.get_pipeline_model_parallel_group()

    hidden_shape = None
    logits = None
    # Inference mode, as HF's side: a provider whose bridge leaves a dropout unmapped (Ernie 4.5
    # keeps Megatron's attention_dropout 0.1) would otherwise add noise to every logit.
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        # Global stage order is (chunk 0: rank 0..P-1), (chunk 1: rank 0..P-1), ...: each rank
        # walks its chunks in order, receiving from the previous stage and sending to the next.
        for chunk_idx, chunk in enumerate(chunks):
            if not (chunk_idx == 0 and pp_rank == 0):
                if hidden_shape is None:
                    hidden_shape = _hidden_shape(chunk, ids)
                hidden = torch.empty(hidden_shape, dtype=torch.float32, device=device)
                torch.distributed.recv(hidden, src=_global_rank(pp_group, (pp_rank - 1) % pp_size))
                unwrap(chunk).set_input_tensor(hidden)
            out = chunk(input_ids=ids, position_ids=pos, attention_mask=mask)
            if chunk_idx == len(chunks) - 1 and pp_rank == pp_size - 1:
                logits = out
            else:
                dst = _global_rank(pp_group, (pp_rank + 1) % pp_size)
                torch.distributed.send(out.contiguous().float(), dst=dst)
    if logits is None:
        return None
    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits[..., :vocab_size].float().cpu()


def _hidden_shape(chunk: torch.nn.Module, ids: torch.Tensor) -> tuple[int, int, int]:
    """Megatron passes [seq, batch, hidden] between stages."""
    hidden = unwrap(chunk).config.hidden_size
    return (ids.shape[1], ids.shape[0], hidden)


def _global_rank(group, group_rank: int) -> int:
    return torch.distributed.get_global_rank(group, group_rank)


NEW_TOKENS = 8


def greedy_tokens(model_dir: Path, prompts: tuple[str, ...], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy-decode ``new_tokens`` after each prompt, loading model *and tokenizer* from disk.

    Uses AutoTokenizer, as a deployment would: the family's tokenizer class reads the files.
    The prompt's own ids lead each returned sequence, so a tokenizer that encodes the prompt
    differently shows up as a difference too.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with pure_torch_reference():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", attn_implementation="eager")
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=None)
            if ids.shape[1] == 0:
                raise ValueError(f"{model_dir}: the tokenizer encodes {prompt!r} to no tokens")
            out.append(gen[0].tolist())
    return out
