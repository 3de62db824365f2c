"""Local tokenizers for the tiny models (no network, deterministic bytes).

The export path re-saves the tokenizer next to the exported weights (Megatron-Bridge loads it
with the family's own tokenizer class) and the generation check reloads it, so every tiny model
ships one of the *kind its family uses*: Qwen's tokenizer class re-reads tokenizer.json as
byte-level BPE, so a word-level file would silently come back as a different tokenizer. The
vocabulary is exactly ``vocab_size`` entries so token ids and embedding rows line up.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


KINDS = ("wordlevel", "bytelevel-bpe")
# Prompts for the generation check, in words each kind of tokenizer knows.
PROMPTS = {
    "wordlevel": ("w10 w11 w12 w13 w14 w15", "w200 w7 w42 w99 w5 w123"),
    "bytelevel-bpe": ("hello world", "Megatron 42"),
}


def _bytelevel_vocab(vocab_size: int) -> dict[str, int]:
    """Special tokens, then single byte-level symbols: space, letters, digits first."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    first = ["Ġ", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
    rest = sorted(set(alphabet) - set(first))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in first + rest:
        if len(vocab) == vocab_size:
            break
        vocab[symbol] = len(vocab)
    return vocab


def build_tokenizer(vocab_size: int, kind: str = "wordlevel"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS) + 64:
        raise ValueError(f"vocab_size {vocab_size} leaves too little room for ordinary tokens")
    if kind == "bytelevel-bpe":
        core = Tokenizer(models.BPE(vocab=_bytelevel_vocab(vocab_size), merges=[], unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
    else:
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


def save_tokenizer(out_dir: Path, vocab_size: int, kind: str = "wordlevel") -> None:
    build_tokenizer(vocab_size, kind).save_pretrained(out_dir)
