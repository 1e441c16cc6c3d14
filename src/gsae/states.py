"""The (x, g) of your own text: a hook's activations and the loss gradient there, for any
model gsae loads (`gsae.activations`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from gsae.errors import GsaeError
from gsae.models import ModelConfig, load_model
from gsae.source import ActivationSource, SourceConfig


def activations(texts: str | Sequence[str], hook: str | int,
                model: str | nn.Module = "smollm2-135m",
                tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[Tensor, Tensor]:
    """`x` and `g = dL/dx` at `hook` (a layer index or a module name) for every token of every
    text, rows in order: two float32 tensors [tokens, d]. Each text is tokenised as the model's
    tokenizer does (special tokens included) and run alone; L is its summed next-token
    cross-entropy, as in training (`gsae.source`), so the last token's g is 0. `model` is a
    name gsae loads (the default model, a hub id, a folder, a GGUF file; loaded once per
    process) or a loaded causal LM with its `tokenizer`."""
    if isinstance(texts, str):
        texts = [texts]
    model, tokenizer = _model_and_tokenizer(model, tokenizer)
    rows = [text_states(model, tokenizer, text, hook)[1:] for text in texts]
    if not rows:
        raise GsaeError("no texts given: pass a string or a list of strings")
    return torch.cat([x for x, _ in rows]), torch.cat([g for _, g in rows])


def text_states(model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str,
                hook: str | int) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids [T], x [T, d] and g [T, d] of one text at `hook`."""
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise GsaeError("the text is empty: it has no tokens to read activations of")
    source = ActivationSource(model, SourceConfig(hooks=[str(hook)]), with_grad=True)
    ((x, g),) = source.hidden_states(torch.tensor([ids])).values()
    return torch.tensor(ids), x[0].cpu(), g[0].cpu()


def _model_and_tokenizer(model: str | nn.Module, tokenizer: PreTrainedTokenizerBase | None
                         ) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    if isinstance(model, str):
        return _loaded(model)
    if tokenizer is None:
        raise GsaeError("a loaded model needs its tokenizer: pass tokenizer=...")
    return model, tokenizer


@functools.lru_cache(maxsize=2)
def _loaded(name: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    return load_model(ModelConfig(model=name))
