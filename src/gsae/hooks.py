"""Hook points in a causal language model, and running the model with one hook's output changed.

A hook point is the output of one module: by default the residual stream after a decoder block.
`Intervention` is the one way gsae runs a model with that output transformed by a patch
(`splice` rows in, `zero_all` positions, or `add` a vector): evaluation splices reconstructions
and ablations, steering adds decoder directions.

When the hook is a decoder block's output in a model family whose blocks are a plain sequence
(Llama, GPT-2, GPT-NeoX), a patched pass runs only the blocks above the hook, then the final norm
and the LM head: the clean pass records what each of those blocks received (position embeddings,
masks, ...), and the patched pass feeds them the patched hidden state with the same extra
arguments. Other hook points (e.g. `model.layers.15.mlp`) and other models run the whole forward
with a forward hook instead; `Intervention.forward` says which path runs.

`SplitAtHook` is the same split for cached greedy decoding (`gsae.steer.greedy`): the blocks up
to the hook run once for rows whose tokens agree, the blocks above it once per row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.cache_utils import Cache

from gsae.errors import GsaeError

FULL, ABOVE_HOOK = "full", "above-hook"
# The module applied to the last block's output before the LM head, per supported model type.
FINAL_NORMS = {
    "llama": "model.norm",
    "gpt2": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
}

Patch = Callable[[Tensor], Tensor]  # the hook's clean hidden state [B, T, d] -> the patched one

_LAYER_INDEX = re.compile(r"-?\d+")
_RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")
# The decoder-block lists whose block N's output TransformerLens calls blocks.N.hook_resid_post:
# Llama-family models (and most others), GPT-2, GPT-NeoX.


# Hook points ------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and ModuleList of the model's decoder blocks."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    expected = getattr(text_config, "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    matching = [(n, m) for n, m in lists if expected is None or len(m) == expected]
    if not matching:
        raise GsaeError(
            f"cannot find the decoder layers of {type(model).__name__}: name the hook point "
            "by its module path instead"
        )
    return max(matching, key=lambda item: len(item[1]))


def num_layers(model: nn.Module) -> int:
    """The number of decoder blocks."""
    return len(decoder_layers(model)[1])


def resolve_hook(model: nn.Module, hook: str | int) -> tuple[str, nn.Module]:
    """The canonical name and module whose output is the activation at hook point `hook`.

    `hook` is a layer index (int or digit string; negative counts from the end) meaning the
    residual stream after that decoder block, the TransformerLens name `blocks.N.hook_resid_post`
    (the same), or a module path from `model.named_modules()` such as `model.layers.15.mlp`.
    """
    text = str(hook).strip()
    match = _RESID_POST.fullmatch(text)
    if isinstance(hook, int) or _LAYER_INDEX.fullmatch(text) or match:
        return _layer_hook(model, int(match.group(1) if match else text))
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    if text and text not in modules and f"{prefix}.{text}" in modules:
        text = f"{prefix}.{text}"  # sparsify names hook points inside the base model
    if text and text in modules:
        return text, modules[text]
    name, layers = decoder_layers(model)
    middle = len(layers) // 2
    child = next((n for n, _ in layers[middle].named_children()), "")
    example = f"'{name}.{middle}'" + (f" or '{name}.{middle}.{child}'" if child else "")
    raise GsaeError(
        f"unknown hook point {text!r}: use a layer index (0-{len(layers) - 1}, or negative from "
        f"the end), 'blocks.N.hook_resid_post', or a module path such as {example}"
    )


def _layer_hook(model: nn.Module, index: int) -> tuple[str, nn.Module]:
    name, layers = decoder_layers(model)
    count = len(layers)
    if not -count <= index < count:
        raise GsaeError(
            f"layer {index} is out of range: this model has {count} layers "
            f"(0-{count - 1}, or -{count}..-1)"
        )
    index %= count
    return f"{name}.{index}", layers[index]


def hook_output_tensor(output: Any) -> torch.Tensor:
    """The hidden-state tensor in a module's output: a tensor, or a tuple/list led by one."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise GsaeError(
        f"the hook module returns {type(output).__name__}, not a tensor or a tuple starting with "
        "one: choose another hook point"
    )


def replace_hook_output(output: Any, new: torch.Tensor) -> Any:
    """`output` with its hidden-state tensor replaced by `new`, keeping the same structure."""
    hook_output_tensor(output)
    if isinstance(output, torch.Tensor):
        return new
    return type(output)([new, *output[1:]])


# Patches ----------------------------------------------------------------------------------------


def splice(mask: Tensor, rows: Tensor) -> Patch:
    """The patch writing `rows` [N, d] at the N true positions of `mask` [B, T] (ablations are
    splices of zeros or of a mean)."""

    def patch(h: Tensor) -> Tensor:
        h = h.clone()
        h[mask.to(h.device)] = rows.to(h.device, h.dtype)
        return h

    return patch


def zero_all(h: Tensor) -> Tensor:
    """The patch writing zeros at every position (SAEBench's ablation baseline)."""
    return torch.zeros_like(h)


def add(delta: Tensor) -> Patch:
    """The patch adding `delta` [B, T, d] to the hidden state (steering)."""
    return lambda h: h + delta.to(h.device, h.dtype)


def log_probs(logits: Tensor) -> Tensor:
    """Float32 log-probabilities over the vocabulary (the last dimension)."""
    return F.log_softmax(logits.float(), dim=-1)


# The intervention harness -----------------------------------------------------------------------


@dataclass
class _Suffix:
    """What runs after the hook: the decoder blocks above it, the final norm, the LM head."""

    layers: list[nn.Module]
    norm: nn.Module
    head: nn.Module


class Intervention:
    """Runs `model` with the output of the hook module `module` replaced by a patch of it.

    Use: `with intervention.record(tokens) as clean:` around a clean forward of `tokens` (any
    forward that runs the whole model on them), then `clean.logits(patch)` for each patched pass.
    `above_hook=False` forces the full forward even where the blocks above could run alone.
    """

    def __init__(self, model: nn.Module, module: nn.Module, above_hook: bool = True):
        self.model, self.module = model, module
        self.suffix = _suffix_above(model, module) if above_hook else None
        self.forward = ABOVE_HOOK if self.suffix is not None else FULL

    @contextmanager
    def record(self, tokens: Tensor) -> Iterator[Recording]:
        """Record what the patched passes need during the clean forward run inside the block."""
        recording = Recording(self, tokens)
        handles = [self.module.register_forward_hook(recording.keep_output)]
        for i, layer in enumerate(self.suffix.layers if self.suffix else []):
            handles.append(layer.register_forward_pre_hook(
                lambda _m, args, kwargs, i=i: recording.keep_inputs(i, args, kwargs),
                with_kwargs=True))
        try:
            yield recording
        finally:
            for handle in handles:
                handle.remove()


class Recording:
    """One clean batch as the patched passes need it: the tokens, the hook's clean output and,
    on the above-hook path, the arguments each block above the hook received."""

    def __init__(self, intervention: Intervention, tokens: Tensor):
        self.intervention, self.tokens = intervention, tokens
        self.hidden: Tensor | None = None
        suffix = intervention.suffix
        self.inputs: list[tuple[tuple, dict] | None] = [None] * len(suffix.layers if suffix else [])

    def keep_output(self, _module: nn.Module, _args: Any, output: Any) -> None:
        self.hidden = hook_output_tensor(output).detach()

    def keep_inputs(self, i: int, args: tuple, kwargs: dict) -> None:
        # The hidden state itself is not kept: the patched pass brings its own. A key-value
        # cache is dropped: a patched pass must not read or extend the clean pass's cache.
        kwargs = {k: False if k == "use_cache" else v for k, v in kwargs.items()
                  if k != "hidden_states"}
        self.inputs[i] = _detached((args[1:], kwargs))

    @torch.no_grad()
    def logits(self, patch: Patch, repeat: int = 1) -> Tensor:
        """Logits [repeat * B, T, V] of the model on the recorded tokens, repeated `repeat` times
        along the batch, with the hook's output h replaced by `patch(h)`."""
        return self.logits_with_grad(patch, repeat)

    def logits_with_grad(self, patch: Patch, repeat: int = 1) -> Tensor:
        """`logits`, with autograd as the caller has it: gradients flow into what the patch
        writes (an SAE's reconstruction, to train it on the spliced model's output). The clean
        pass's recordings are detached, so no gradient reaches the layers below the hook."""
        suffix = self.intervention.suffix
        if suffix is None:
            return self._full_logits(patch, repeat)
        if self.hidden is None or any(inputs is None for inputs in self.inputs):
            raise RuntimeError("no clean forward ran while recording")
        batch = self.tokens.shape[0]
        h = patch(_repeat_batch(self.hidden, batch, repeat))
        for layer, inputs in zip(suffix.layers, self.inputs):
            args, kwargs = _repeat_batch(inputs, batch, repeat)
            h = hook_output_tensor(layer(h, *args, **kwargs))
        return suffix.head(suffix.norm(h))

    def _full_logits(self, patch: Patch, repeat: int) -> Tensor:
        def hook(_module, _inputs, output):
            return replace_hook_output(output, patch(hook_output_tensor(output)))

        model = self.intervention.model
        handle = self.intervention.module.register_forward_hook(hook)
        try:
            return model(input_ids=self.tokens.repeat(repeat, 1), use_cache=False).logits
        finally:
            handle.remove()



class SplitAtHook:
    """Runs the blocks up to the hook module (it included) on U rows and the blocks above it on
    R rows: row r above the hook continues row `owner[r]` below it, with `patch` applied to the
    hook's output once it has its R rows. Rows that agree below the hook (the same tokens so
    far; a patch changes nothing below it) are computed there once.

    Only where the blocks above the hook can run on their own (`Intervention.forward` is
    "above-hook"); `available` says so. The extra arguments the model passes to the blocks
    above (masks, positions) are built for U rows; their batch-shaped tensors are taken by
    `owner` too. A key-value cache holds U rows for the blocks up to the hook and R rows above
    it: `select_below` keeps its lower blocks' rows in step when the U rows change."""

    def __init__(self, model: nn.Module, module: nn.Module):
        self.module = module
        self.suffix = _suffix_above(model, module)
        self.below = num_layers(model) - len(self.suffix.layers) if self.suffix else 0
        self.owner, self.rows_below = torch.zeros(0, dtype=torch.long), 0
        self.patch: Patch = lambda h: h

    def route(self, owner: Tensor) -> None:
        """Row r above the hook continues row `owner[r]` below it (every row below used)."""
        self.owner, self.rows_below = owner, int(owner.max()) + 1 if owner.numel() else 0

    @property
    def available(self) -> bool:
        return self.suffix is not None

    @contextmanager
    def hooked(self) -> Iterator[SplitAtHook]:
        """The hooks in place: forwards of the model split their rows at the hook."""
        if self.suffix is None:
            raise GsaeError("the blocks above this hook point cannot run on their own")
        handles = [self.module.register_forward_hook(self._expand_output)]
        handles += [layer.register_forward_pre_hook(self._expand_inputs, with_kwargs=True)
                    for layer in self.suffix.layers]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def select_below(self, cache: Cache, rows: Tensor) -> None:
        """Keep the rows `rows` (with repeats, in that order) of the cache's blocks up to the
        hook."""
        for layer in list(cache.layers)[: self.below]:
            layer.reorder_cache(rows)

    def _expand_output(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        h = hook_output_tensor(output)
        return replace_hook_output(output, self.patch(h[self.owner.to(h.device)]))

    def _expand_inputs(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        owner = self.owner.to(args[0].device)
        return ((args[0], *_select_batch(args[1:], self.rows_below, owner)),
                _select_batch(kwargs, self.rows_below, owner))

def _suffix_above(model: nn.Module, module: nn.Module) -> _Suffix | None:
    """The blocks above `module`, final norm and head, if `module` is a decoder block of a model
    family whose forward is exactly blocks -> final norm -> head; else None."""
    norm_path = FINAL_NORMS.get(getattr(getattr(model, "config", None), "model_type", None))
    get_head = getattr(model, "get_output_embeddings", None)
    if norm_path is None or get_head is None:
        return None
    try:
        _, layers = decoder_layers(model)
        norm = model.get_submodule(norm_path)
    except (GsaeError, AttributeError):
        return None
    index = next((i for i, layer in enumerate(layers) if layer is module), None)
    head = get_head()
    if index is None or head is None:
        return None
    return _Suffix(list(layers[index + 1 :]), norm, head)


def _detached(value: Any) -> Any:
    """`value` (tensors in tuples, lists and dicts) with every tensor detached and every
    key-value cache replaced by None."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, Cache):
        return None
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _repeat_batch(value: Any, batch: int, times: int) -> Any:
    """`value` with every batch-shaped tensor (at least 2-D, `batch` rows) repeated `times` times
    along the batch, as `tokens.repeat(times, 1)` repeats the contexts. Tensors with one row
    (position embeddings shared by the batch) broadcast as they are."""
    if times == 1:
        return value
    if isinstance(value, Tensor):
        if value.ndim >= 2 and value.shape[0] == batch:
            return value.repeat(times, *[1] * (value.ndim - 1))
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat_batch(v, batch, times) for v in value)
    if isinstance(value, dict):
        return {k: _repeat_batch(v, batch, times) for k, v in value.items()}
    return value



def _select_batch(value: Any, batch: int, rows: Tensor) -> Any:
    """`value` with every batch-shaped tensor (at least 2-D, `batch` rows) replaced by its rows
    `rows`; tensors with one row (shared by the batch) and everything else are kept."""
    if isinstance(value, Tensor):
        if value.ndim >= 2 and value.shape[0] == batch and batch != 1:
            return value[rows]
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_select_batch(v, batch, rows) for v in value)
    if isinstance(value, dict):
        return {k: _select_batch(v, batch, rows) for k, v in value.items()}
    return value
