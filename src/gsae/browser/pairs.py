"""Pairing the latents of two SAEs of one model: each latent's partner is the other SAE's
latent with the largest decoder cosine; a pair is *mutual* when each is the other's best match.
Two SAEs are called near-identical when at least `NEAR_SHARE` of the first one's latents have a
partner at cosine >= `NEAR_COSINE` (same-seed TopK and g-SAE twins trained briefly are)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NEAR_COSINE, NEAR_SHARE = 0.99, 0.9


@dataclass
class Pairs:
    """For each latent of the first SAE: its partner in the second, their decoder cosine and
    whether the partner's best match is this latent."""

    partner: Tensor  # [n_a] long
    cosine: Tensor  # [n_a] float
    mutual: Tensor  # [n_a] bool

    def near_share(self) -> float:
        """Share of latents whose partner is at decoder cosine >= NEAR_COSINE."""
        return (self.cosine >= NEAR_COSINE).double().mean().item()

    def near_identical(self) -> bool:
        return self.near_share() >= NEAR_SHARE


def best_matches(a: Tensor, b: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """For each row of `a` [n, d], the index of the row of `b` [m, d] with the largest cosine,
    and that cosine; blockwise, so n x m is never held at once."""
    a = torch.nn.functional.normalize(a.float(), dim=1)
    b = torch.nn.functional.normalize(b.float(), dim=1)
    found = [(block @ b.T).max(dim=1) for block in a.split(chunk)]
    return torch.cat([f.indices for f in found]), torch.cat([f.values for f in found])


def pair_latents(W_a: Tensor, W_b: Tensor) -> Pairs:
    """The partners of the latents of the decoder `W_a` [n_a, d] among those of `W_b`."""
    partner, cosine = best_matches(W_a, W_b)
    back, _ = best_matches(W_b, W_a)
    mutual = back[partner] == torch.arange(W_a.shape[0])
    return Pairs(partner, cosine, mutual)


def token_overlap(a: list[str], b: list[str]) -> float | None:
    """Jaccard overlap of two top-token lists (None when both are empty)."""
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else None


COMPARED = ("density_percent", "mean_abs_loss_effect", "mean_effect")


def pair_records(pairs: Pairs, a: list[dict], b: list[dict]) -> list[dict]:
    """Per latent of the first SAE (its index records `a`): its partner, their cosine, and for
    density (%), mean |value * (d.g)| and mean beta |d.g| the two values and the first minus
    the second (None where either is missing), with their top activating tokens and overlap."""
    out = []
    for r, j, cosine, mutual in zip(a, pairs.partner.tolist(), pairs.cosine.tolist(),
                                    pairs.mutual.tolist()):
        q = b[j]
        row = {"latent": r["latent"], "partner": j, "cosine": cosine, "mutual": mutual}
        for name in COMPARED:
            row[name] = [r[name], q[name]]
            row[f"{name}_difference"] = _difference(r[name], q[name])
        row["top_tokens"] = [r["top_tokens"], q["top_tokens"]]
        row["token_overlap"] = token_overlap(r["top_tokens"], q["top_tokens"])
        out.append(row)
    return out


def _difference(x: float | None, y: float | None) -> float | None:
    if x is None or y is None or x != x or y != y:  # missing or NaN
        return None
    return x - y
