"""A tiny LLaMA folder with a real tokenizer, as a user's model folder looks: shared by the CLI tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import torch


def save_tiny_llama(path: Path, words: Sequence[str], vocab_size: int) -> Path:
    """A tiny LLaMA (hidden 64, 2 layers, 4 heads, 2 KV heads) and a byte-level BPE tokenizer of
    ``vocab_size`` trained on ``words``, saved to ``path`` as safetensors (seeded: the same every call)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(words)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    fast.save_pretrained(path)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def one_thread_and_clean_env() -> Iterator[None]:
    """One torch thread; and undo ``-q``'s ``TQDM_DISABLE`` so later tests see the same env."""
    n = torch.get_num_threads()
    before = os.environ.get("TQDM_DISABLE")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if before is None:
        os.environ.pop("TQDM_DISABLE", None)
    else:
        os.environ["TQDM_DISABLE"] = before


def embedded_words() -> list[str]:
    from permsparse.data.text import load_wikipedia_articles

    return "\n\n".join(load_wikipedia_articles()).split()
