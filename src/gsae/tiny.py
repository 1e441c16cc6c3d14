"""Tiny randomly initialised language models and a byte-level tokenizer, for tests and quick trials.

They need no download: `tiny_tokenizer()` maps each UTF-8 byte to the token id equal to its value
and has one special token, `<|endoftext|>` (id 256), used as EOS, BOS and padding; the tiny models
have a 512-token vocabulary, so every id it produces is valid for them.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 256
TINY_VOCAB = 512


def _byte_chars() -> list[str]:
    """The printable stand-in character for each byte value, as in GPT-2's byte-level BPE."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: token id = byte value, plus `<|endoftext|>` = 256."""
    vocab = {char: b for b, char in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def _build(model_class: type[PreTrainedModel], config, seed: int) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.eval().requires_grad_(False)
    return model.float()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random LlamaForCausalLM: 2 layers, width 64, 4 heads, 2 KV heads, vocabulary 512."""
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    return _build(LlamaForCausalLM, config, seed)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A random GPT2LMHeadModel: 2 layers, width 64, 4 heads, vocabulary 512, 256 positions."""
    config = GPT2Config(
        vocab_size=TINY_VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    return _build(GPT2LMHeadModel, config, seed)
