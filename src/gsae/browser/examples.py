"""Which token contexts a latent page shows: the top-activating contexts and samples from
quantile bins of the latent's non-zero activations, each cut to a window around one token."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

WINDOW_BEFORE, WINDOW_AFTER = 16, 4
HISTOGRAM_BINS = 24


@dataclass
class Strip:
    """A window of one context around the token at `position`, with the latent's activation
    and first-order loss effect at each token (None where the position was not encoded)."""

    context: int
    position: int
    start: int
    tokens: list[str]
    activations: list[float | None]
    loss_effects: list[float | None]

    @property
    def activation(self) -> float:
        return self.activations[self.position - self.start] or 0.0


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def strip(contexts: Tensor, act: Tensor, loss: Tensor, context: int, position: int,
          spell: Callable[[int], str]) -> Strip:
    """The window of context `context` around `position`."""
    start = max(0, position - WINDOW_BEFORE)
    stop = min(contexts.shape[1], position + WINDOW_AFTER + 1)
    return Strip(
        context=context, position=position, start=start,
        tokens=[spell(int(t)) for t in contexts[context, start:stop]],
        activations=[_number(v) for v in act[context, start:stop].tolist()],
        loss_effects=[_number(v) for v in loss[context, start:stop].tolist()],
    )


def top_positions(act: Tensor, count: int) -> list[tuple[int, int]]:
    """(context, position) of the `count` contexts with the largest activation, each at its
    largest activation; ties go to the earlier context."""
    filled = act.nan_to_num(nan=0.0)
    best, where = filled.max(dim=1)
    order = best.argsort(descending=True, stable=True)
    return [(int(c), int(where[c])) for c in order[:count] if best[c] > 0]


def quantile_positions(act: Tensor, bins: int, per_bin: int, seed: int
                       ) -> list[tuple[float, float, list[tuple[int, int]]]]:
    """For each of `bins` quantile bins of the non-zero activations: its bounds and a seeded
    sample of up to `per_bin` (context, position) pairs whose activation lies in it (lower
    bound included, upper excluded except in the last bin)."""
    filled = act.nan_to_num(nan=0.0)
    where = (filled > 0).nonzero()
    values = filled[where[:, 0], where[:, 1]]
    if values.numel() == 0:
        return []
    edges = torch.quantile(values, torch.linspace(0, 1, bins + 1, dtype=values.dtype))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(bins):
        upper = values <= edges[b + 1] if b == bins - 1 else values < edges[b + 1]
        members = ((values >= edges[b]) & upper).nonzero()[:, 0]
        picked = members[torch.randperm(members.numel(), generator=gen)[:per_bin]].sort().values
        out.append((edges[b].item(), edges[b + 1].item(),
                    [(int(where[i, 0]), int(where[i, 1])) for i in picked]))
    return out


def histogram(act: Tensor, bins: int = HISTOGRAM_BINS) -> tuple[list[int], list[float]]:
    """Counts and edges of the latent's non-zero activations, `bins` equal bins from 0 to the
    maximum."""
    values = act.nan_to_num(nan=0.0)
    values = values[values > 0]
    top = values.max().item() if values.numel() else 1.0
    counts = torch.histc(values.float(), bins=bins, min=0.0, max=top) if values.numel() \
        else torch.zeros(bins)
    return [int(c) for c in counts.tolist()], [top * i / bins for i in range(bins + 1)]
