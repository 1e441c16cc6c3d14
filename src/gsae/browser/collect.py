"""One clean forward and backward over the held-out contexts, every SAE encoding what it sees,
then per-latent numbers by cheap aggregation.

A latent *fires* on a token when the SAE selects it there with a value > 0. The values shown are
those of the SAE's training-time selection: for a g-SAE the gradient-aware selection with the
clean model's loss gradient `g` for the true next tokens; `novel_share` compares it with plain
TopK selection (beta = 0) on the same weights. Only the SAE's data positions are encoded
(skip_first <= t <= T-2, outlier tokens left out), as in training and `gsae eval`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gsae.browser.setup import Recorded
from gsae.sae import SAE
from gsae.source import ActivationSource, SourceConfig, training_positions


@dataclass
class Encoded:
    """What one SAE did at every data position: rows are tokens."""

    where: Tensor  # [N, 2] (context, position)
    values: Tensor  # [N, k] values of the training-time selection
    indices: Tensor  # [N, k]
    slope: Tensor  # [N, k] d_i . g of the selected latents (first-order loss change per unit)
    effect: Tensor | None  # [N, k] beta |d_i . g|, None for a plain TopK SAE
    novel: Tensor  # [N, k] True where plain TopK on the same weights would not select it
    plain_values: Tensor  # [N, k] values of the plain TopK selection
    plain_indices: Tensor  # [N, k]
    data_mask: Tensor  # [n_contexts, T] the encoded positions

    @property
    def rows(self) -> int:
        return self.where.shape[0]

    def firings_of(self, latent: int) -> tuple[Tensor, Tensor]:
        """(row, slot) of every firing of `latent`, rows ascending. The firings are sorted by
        latent once, so each page costs a slice, not a scan of every row."""
        if not hasattr(self, "_by_latent"):
            fired = (self.values > 0).flatten().nonzero()[:, 0]
            order = fired[torch.argsort(self.indices.flatten()[fired], stable=True)]
            counts = torch.bincount(self.indices.flatten()[order].long())
            self._by_latent = (order, torch.cat([torch.zeros(1, dtype=torch.long),
                                                 counts.cumsum(0)]))
        order, starts = self._by_latent
        if latent + 1 >= starts.numel():
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        flat = order[starts[latent] : starts[latent + 1]]
        k = self.indices.shape[1]
        return flat // k, flat % k


def encode_contexts(model: nn.Module, contexts: Tensor, saes: list[tuple[SAE, Recorded]],
                    batch_size: int) -> list[Encoded]:
    """Run the contexts [n, T] through the model once (forward and backward) and let every SAE
    encode the activations and gradients at its hook."""
    hooks = list(dict.fromkeys(rec.hook for _, rec in saes))
    autocast = saes[0][1].autocast if saes[0][1].autocast in ("none", "bf16") else "none"
    source = ActivationSource(model, SourceConfig(hooks=hooks, autocast=autocast),
                              with_grad=True)
    names = dict(zip(hooks, source.hook_names))
    parts: list[list[dict[str, Tensor | None]]] = [[] for _ in saes]
    for start in tqdm(range(0, contexts.shape[0], batch_size), desc="inspect: encode",
                      unit="batch", dynamic_ncols=True):
        states = source.hidden_states(contexts[start : start + batch_size])
        for (sae, rec), part in zip(saes, parts):
            x, g = states[names[rec.hook]]
            mask, _ = training_positions(x, rec.skip_first, rec.outlier_factor)
            part.append(_encode_rows(sae, x[mask], g[mask]))
            part[-1]["mask"] = mask.cpu()
    return [_concat(part) for part in parts]


@torch.no_grad()
def _encode_rows(sae: SAE, x: Tensor, g: Tensor) -> dict[str, Tensor | None]:
    param = sae.W_dec
    x, g = x.to(param.device, param.dtype), g.to(param.device, param.dtype)
    values, indices, effect = sae.encode(x, g)
    plain_values, plain_indices, _ = sae.encode(x)
    slope = torch.einsum("nkd,nd->nk", param[indices], g)
    novel = ~(indices[:, :, None] == plain_indices[:, None, :]).any(-1)
    cpu = {"values": values, "indices": indices, "slope": slope, "novel": novel,
           "plain_values": plain_values, "plain_indices": plain_indices,
           "effect": effect if sae.beta > 0 else None}
    return {name: None if t is None else t.detach().cpu() for name, t in cpu.items()}


def _concat(part: list[dict[str, Tensor | None]]) -> Encoded:
    mask = torch.cat([p["mask"] for p in part])  # type: ignore[misc]
    joined = {name: None if part[0][name] is None else torch.cat([p[name] for p in part])
              for name in part[0] if name != "mask"}
    joined["values"] = joined["values"].float()  # type: ignore[union-attr]
    return Encoded(where=mask.nonzero(), data_mask=mask, **joined)  # type: ignore[arg-type]


# Per-latent aggregation -------------------------------------------------------------------------


def latent_numbers(enc: Encoded, n_latents: int) -> dict[str, Tensor]:
    """Per latent [n_latents]: firing count and frequency, mean and max activation, mean
    beta |d_i . g| and the share of firings plain TopK would not have made (NaN where it never
    fires or where the SAE is plain TopK), and the typical activation of the plain selection
    (mean of its non-zero values, as `gsae steer` defines it)."""
    fired = enc.values > 0
    idx, val = enc.indices[fired], enc.values[fired].double()
    count = torch.bincount(idx, minlength=n_latents).double()
    per_fire = count.where(count > 0, torch.full_like(count, float("nan")))
    top = torch.zeros(n_latents, dtype=torch.float64).scatter_reduce(
        0, idx, val, "amax", include_self=True)
    plain_fired = enc.plain_values > 0
    plain_idx = enc.plain_indices[plain_fired]
    plain_count = torch.bincount(plain_idx, minlength=n_latents).double()
    numbers = {
        "count": count,
        "frequency": count / max(1, enc.rows),
        "mean_activation": torch.bincount(idx, val, minlength=n_latents) / per_fire,
        "max_activation": top.where(count > 0, torch.full_like(top, float("nan"))),
        "typical_activation": torch.bincount(
            plain_idx, enc.plain_values[plain_fired].double(), minlength=n_latents)
        / plain_count.where(plain_count > 0, torch.full_like(plain_count, float("nan"))),
    }
    numbers["mean_abs_loss_effect"] = torch.bincount(
        idx, (val * enc.slope[fired].double()).abs(), minlength=n_latents) / per_fire
    nan = torch.full((n_latents,), float("nan"), dtype=torch.float64)
    numbers["mean_effect"], numbers["novel_share"] = nan, nan.clone()
    if enc.effect is not None:
        numbers["mean_effect"] = torch.bincount(
            idx, enc.effect[fired].double(), minlength=n_latents) / per_fire
        numbers["novel_share"] = torch.bincount(
            idx, enc.novel[fired].double(), minlength=n_latents) / per_fire
    return numbers


def latent_map(enc: Encoded, latent: int) -> tuple[Tensor, Tensor]:
    """The latent's activation and first-order loss effect `value * (d_i . g)` at every position
    of every context [n, T]: 0 where it does not fire, NaN where nothing was encoded."""
    rows, slot = enc.firings_of(latent)
    act = torch.zeros(enc.data_mask.shape, dtype=torch.float64)
    act[~enc.data_mask] = float("nan")
    loss = act.clone()
    ctx, pos = enc.where[rows, 0], enc.where[rows, 1]
    act[ctx, pos] = enc.values[rows, slot].double()
    loss[ctx, pos] = act[ctx, pos] * enc.slope[rows, slot].double()
    return act, loss


def top_activating_tokens(enc: Encoded, contexts: Tensor, n_latents: int, count: int
                          ) -> list[list[int]]:
    """Per latent, the ids of the `count` tokens with the largest summed activation of the
    latent on them (the token at the firing position), largest first; ties to the lower id."""
    fired = enc.values > 0
    rows, _ = fired.nonzero(as_tuple=True)
    latent = enc.indices[fired].long()
    token = contexts[enc.where[rows, 0], enc.where[rows, 1]].long()
    vocab = int(contexts.max().item()) + 1 if contexts.numel() else 1
    keys, inverse = torch.unique(latent * vocab + token, return_inverse=True)
    sums = torch.zeros(keys.numel(), dtype=torch.float64).index_add_(
        0, inverse, enc.values[fired].double())
    order = torch.argsort(sums, descending=True, stable=True)  # keys ascend: ties to lower ids
    order = order[torch.argsort(keys[order] // vocab, stable=True)]
    tops: list[list[int]] = [[] for _ in range(n_latents)]
    for key in keys[order].tolist():
        owner = tops[key // vocab]
        if len(owner) < count:
            owner.append(key % vocab)
    return tops


def choose_pages(numbers: dict[str, Tensor], top: int, random: int, seed: int,
                 requested: list[int] | tuple[int, ...] = ()) -> list[int]:
    """The latents that get a page: the `top` most frequent live latents, then a seeded random
    sample of `random` of the other live ones, then the `requested` ones not yet chosen."""
    live = (numbers["count"] > 0).nonzero()[:, 0]
    order = live[numbers["frequency"][live].argsort(descending=True, stable=True)]
    chosen, rest = order[:top], order[top:]
    gen = torch.Generator().manual_seed(seed)
    sample = rest[torch.randperm(rest.numel(), generator=gen)[:random]]
    picked = chosen.tolist() + sorted(sample.tolist())
    return picked + [i for i in dict.fromkeys(requested) if i not in picked]
