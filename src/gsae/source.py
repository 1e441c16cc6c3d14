"""Activations and loss gradients from a frozen language model.

One forward and one backward of the model give, for every hook point at once, the hook's
activation `x` and `g = dL/dx`, where L is the sum over predicted positions of each sequence's
next-token cross-entropy (summed over the batch too: no averaging, so `g` for a token does not
depend on the batch size). The model's weights are frozen, so the autograd graph starts at the
earliest hook and no weight gradient is ever formed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsae import distributed
from gsae.batch import Batch, no_rows_error
from gsae.errors import GsaeError
from gsae.hooks import hook_output_tensor, replace_hook_output, resolve_hook
from gsae.text import DataConfig, corpus_identity


@dataclass
class SourceConfig:
    """Where the activations come from and which tokens become SAE data."""

    hooks: list[str] = field(
        default_factory=lambda: ["15"],
        metadata={"help": "hook points: a layer index (residual stream after that block), a "
                  "TransformerLens name like blocks.15.hook_resid_post, or a module path"},
    )
    lm_batch_size: int = field(default=8, metadata={"help": "contexts per language-model batch",
                                                   "min": 1})
    skip_first: int = field(
        default=1,
        metadata={"help": "leading positions of each context left out of SAE data (position 0 "
                  "is an attention sink on many models)", "min": 0},
    )
    outlier_factor: float = field(
        default=5.0,
        metadata={"help": "drop tokens whose activation norm exceeds this multiple of the "
                  "batch's median norm (0 keeps all)", "min": 0},
    )
    autocast: str = field(
        default="none",
        metadata={"help": "run the language model under autocast: 'none' (fp32) or 'bf16'",
                  "choices": ("none", "bf16")},
    )


def source_identity(cfg: SourceConfig, data_cfg: DataConfig) -> dict[str, Any]:
    """What SAE data made by this source depends on, besides the model: the corpus, the
    context size, the positions kept and the autocast setting (recorded in SAEs and stores)."""
    return {"corpus": corpus_identity(data_cfg), "context_size": data_cfg.context_size,
            "skip_first": cfg.skip_first, "outlier_factor": cfg.outlier_factor,
            "autocast": cfg.autocast}


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass once the last hook has run."""


class ActivationSource:
    """Runs a frozen causal LM on token contexts and returns (x, g) at one or more hooks.

    With `split_across_ranks` (under torchrun), each rank runs the model on its share of every
    batch of contexts and the shares are all-gathered: every rank returns the whole batch's rows,
    as one process would, for 1 / world_size of the language-model work.
    """

    def __init__(self, model: nn.Module, cfg: SourceConfig, with_grad: bool = True,
                 split_across_ranks: bool = False):
        if not cfg.hooks:
            raise GsaeError("at least one hook point is needed")
        if cfg.autocast not in ("none", "bf16"):
            raise GsaeError(f"autocast must be 'none' or 'bf16', got {cfg.autocast!r}")
        self.model = model
        self.cfg = cfg
        self.with_grad = with_grad
        self.split_across_ranks = split_across_ranks
        resolved = [resolve_hook(model, h) for h in cfg.hooks]
        self.hook_names = [name for name, _ in resolved]
        if len(set(self.hook_names)) != len(self.hook_names):
            raise GsaeError(f"hook points repeat: {cfg.hooks} resolve to {self.hook_names}")
        self._modules = [module for _, module in resolved]
        order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
        self._last_module = max(self._modules, key=lambda m: order[id(m)])
        self._device = next(model.parameters()).device
        config = getattr(model, "config", None)
        self._width = config.get_text_config().hidden_size if config is not None else None

    def hidden_states(self, tokens: Tensor, logits_out: dict[str, Tensor] | None = None
                      ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Full-context activations [B, T, d] (and gradients, if enabled) at every hook.
        With a `logits_out` dict, the clean logits are stored in it too (without gradients,
        the forward then runs to the end instead of stopping at the last hook)."""
        tokens = tokens.to(self._device)
        captured: dict[str, Tensor] = {}
        handles = []
        graph_started = False

        def make_hook(name: str, module: nn.Module):
            def hook(_module, _inputs, output):
                nonlocal graph_started
                h = hook_output_tensor(output)
                if self._width is not None and h.shape[-1] != self._width:
                    raise GsaeError(f"hook point {name!r} outputs width {h.shape[-1]}, not the "
                                    f"residual stream's {self._width}: choose a module whose "
                                    "output is the residual width (a layer index, a block, its "
                                    "attention or MLP output)")
                if self.with_grad and not h.requires_grad:
                    # The first hook reached: start the graph here, nothing before needs one.
                    h = h.detach().requires_grad_(True)
                    graph_started = True
                    output = replace_hook_output(output, h)
                captured[name] = h
                if not self.with_grad and module is self._last_module and logits_out is None:
                    raise _StopForward
                return output

            return hook

        for name, module in zip(self.hook_names, self._modules):
            handles.append(module.register_forward_hook(make_hook(name, module)))
        autocast = torch.autocast(
            self._device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast == "bf16"
        )
        try:
            with torch.set_grad_enabled(self.with_grad), autocast:
                try:
                    logits = self.model(input_ids=tokens, use_cache=False).logits
                except _StopForward:
                    logits = None
            grads: list[Tensor | None] = [None] * len(self.hook_names)
            if logits_out is not None and logits is not None:
                logits_out["logits"] = logits.detach()
            if self.with_grad:
                assert logits is not None and graph_started
                loss = next_token_loss(logits, tokens)
                inputs = [captured[n] for n in self.hook_names]
                grads = list(torch.autograd.grad(loss, inputs))
        finally:
            for handle in handles:
                handle.remove()
        return {
            name: (captured[name].detach().float(), None if g is None else g.float())
            for name, g in zip(self.hook_names, grads)
        }

    def batches(self, tokens: Tensor) -> dict[str, Batch]:
        """SAE data for one batch of contexts [B, T]: the rows at `training_positions`."""
        out = {}
        states = self._states_of_all_ranks(tokens) if self.split_across_ranks \
            else self.hidden_states(tokens)
        for name, (x, g) in states.items():
            mask, outliers = training_positions(x, self.cfg.skip_first, self.cfg.outlier_factor)
            out[name] = Batch(x[mask], None if g is None else g[mask], name,
                              dropped_outliers=outliers)
        return out

    def _states_of_all_ranks(self, tokens: Tensor) -> dict[str, tuple[Tensor, Tensor | None]]:
        """`hidden_states(tokens)`, each rank running the model on its share of the contexts."""
        rows = tokens.shape[0]
        return {
            name: (distributed.gather(x, rows), None if g is None else distributed.gather(g, rows))
            for name, (x, g) in self.hidden_states(distributed.shard(tokens, pad=True)).items()
        }

    def stream(self, contexts: Iterator[Tensor]) -> Iterator[dict[str, Batch]]:
        """`batches` for each [B, T] tensor of an iterator of context batches."""
        for tokens in contexts:
            yield self.batches(tokens)


class PassRows:
    """Counts the rows each hook receives during one pass over the corpus, so that a loop that
    repeats the corpus fails once a whole pass leaves a hook without data, instead of waiting
    for data forever."""

    def __init__(self, hooks: list[str], outlier_factor: float):
        self.rows = dict.fromkeys(hooks, 0)
        self.outlier_factor = outlier_factor

    def counted(self, chunks: Iterator[dict[str, Batch]]) -> Iterator[dict[str, Batch]]:
        """`chunks`, counting their rows."""
        for chunk in chunks:
            for hook, batch in chunk.items():
                self.rows[hook] = self.rows.get(hook, 0) + len(batch)
            yield chunk

    def pass_ended(self, whole: bool) -> None:
        """Called at the end of each pass; `whole` when none of it was skipped (a resumed run
        skips what it has already trained on)."""
        empty = [hook for hook, rows in self.rows.items() if rows == 0]
        if whole and empty:
            raise no_rows_error(empty, self.outlier_factor, "a whole pass over the corpus gave")
        self.rows = dict.fromkeys(self.rows, 0)


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Sum over sequences and predicted positions of the next-token cross-entropy: the L of
    `gsae.batch.GRADIENT_DEFINITION`."""
    vocab = logits.shape[-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1), reduction="sum"
    )


def training_positions(x: Tensor, skip_first: int, outlier_factor: float) -> tuple[Tensor, int]:
    """The [B, T] mask of positions whose activation is SAE data, and the number of outlier
    tokens left out: positions skip_first .. T-2 (position T-1 predicts nothing inside its
    context, so its gradient is exactly 0) whose norm is at most `outlier_factor` times the
    median norm over those positions of the batch."""
    candidates = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    candidates[:, skip_first : x.shape[1] - 1] = True
    inliers = outlier_mask(x[candidates], outlier_factor)
    mask = candidates.clone()
    mask[candidates] = inliers
    return mask, int((~inliers).sum())


def outlier_mask(x: Tensor, factor: float) -> Tensor:
    """True for rows whose norm is at most `factor` times the median row norm (all if 0)."""
    if factor <= 0 or x.shape[0] == 0:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    norms = x.norm(dim=1)
    return norms <= factor * norms.median()
