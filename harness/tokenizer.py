"""A local word-level tokenizer for the tiny models (no network, deterministic bytes).

The conversion path copies tokenizer files next to exported checkpoints and the generation check
reloads them, so every tiny model ships one. Its vocabulary is exactly ``vocab_size`` entries so
token ids and embedding rows line up one to one.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for ordinary tokens")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(len(SPECIAL_TOKENS), vocab_size):
        vocab[f"w{i}"] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=4096,
    )


def save_tokenizer(out_dir: Path, vocab_size: int) -> None:
    build_tokenizer(vocab_size).save_pretrained(out_dir)
