"""The measurements behind the registers report: how far each evaluated corpus is from the
training text, and which tokens carry the g-SAE-minus-TopK gap.

- `unigram_kl`: KL(P || Q) of a corpus's evaluated tokens (P, their unigram frequencies)
  against the training split's tokens (Q, add-`SMOOTHING` smoothed over the vocabulary, so that a
  token the training split lacks costs a finite amount).
- `per_token_records`: from the per-position losses of one evaluation (`gsae.evaluate.
  TokenLosses`), each SAE's mean spliced CE increase in each quantile bin of the clean per-token
  CE and of |g| (the norm of the gradient at the hook at that position). The bins' edges depend on
  the model and the text only, so records computed in separate passes over the same text share
  them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gsae.evaluate import MODES, TokenLosses

SMOOTHING = 0.5
BINS = 5
KEYS = {"clean_ce": "clean per-token CE", "grad_norm": "|g| at the hook"}


def unigram_kl(tokens: Tensor, reference: Tensor, vocabulary: int) -> float:
    """KL(P || Q) in nats: P the unigram distribution of `tokens`, Q that of `reference` with
    add-`SMOOTHING` counts over the `vocabulary`."""
    p = torch.bincount(tokens.flatten(), minlength=vocabulary).double()
    q = torch.bincount(reference.flatten(), minlength=vocabulary).double() + SMOOTHING
    p, q = p / p.sum(), q / q.sum()
    seen = p > 0
    return float((p[seen] * (p[seen] / q[seen]).log()).sum())


def quantile_bins(values: Tensor, bins: int = BINS) -> tuple[list[float], Tensor]:
    """The edges of `bins` equally populated bins (the 0, 1/bins, ..., 1 quantiles) and each
    value's bin; a value on an inner edge goes to the bin above it."""
    edges = torch.quantile(values, torch.linspace(0, 1, bins + 1, dtype=values.dtype))
    return edges.tolist(), torch.bucketize(values, edges[1:-1], right=True)


def bin_means(values: Tensor, index: Tensor, bins: int = BINS) -> list[float | None]:
    """The mean of `values` in each bin (None for an empty bin)."""
    sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, values.double())
    counts = torch.bincount(index, minlength=bins)
    return [float(s / c) if c else None for s, c in zip(sums, counts)]


def per_token_records(losses: TokenLosses, names: list[str], bins: int = BINS
                      ) -> dict[str, Any]:
    """In the layout of `gsae.study.compare.cached`: the run (each key's bin edges and token
    counts) and per SAE and mode the mean CE increase in each bin of each key."""
    clean = losses.clean
    binned = {"clean_ce": quantile_bins(clean, bins), "grad_norm": quantile_bins(losses.grad_norm,
                                                                                bins)}
    run = {"tokens": clean.numel(), "bins": bins,
           **{key: {"edges": edges, "counts": torch.bincount(index, minlength=bins).tolist()}
              for key, (edges, index) in binned.items()}}
    results = [{"sae": name, "mode": mode, "ce_increase": float((spliced - clean).mean()),
                **{key: bin_means(spliced - clean, index, bins)
                   for key, (_, index) in binned.items()}}
               for name in names for mode in MODES
               for spliced in [losses.spliced(name, mode)]]
    return {"run": run, "results": results}
