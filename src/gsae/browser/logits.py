"""Promoted and suppressed tokens of a decoder direction: the direct path to the logits.

The unembedding W_U is applied to the direction after the model's final norm, linearised: an
RMSNorm's gain `w` multiplies the direction element-wise (`W_U (w * d)`); a LayerNorm also
removes the direction's mean first (`W_U (w * (d - mean d))`); Gemma-style norms scale by
`1 + w`. The norm's division by the residual stream's RMS (or standard deviation) is a positive
factor shared by all tokens, so it changes no ranking and is left out, as is the norm's bias
(the same for every latent). The layers between the hook and the final norm are skipped.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gsae.errors import GsaeError


def final_norm(model: nn.Module) -> nn.Module | None:
    """The model's last normalisation module (class name containing 'Norm'), if any."""
    norms = [m for _, m in model.named_modules() if "norm" in type(m).__name__.lower()]
    return norms[-1] if norms else None


def norm_description(model: nn.Module) -> str:
    """How the final norm enters the promoted tokens, in words."""
    norm = final_norm(model)
    if norm is None:
        return "the model has no final norm: W_U d"
    name = type(norm).__name__
    if _centres(norm):
        return f"final norm {name} linearised: W_U (w * (d - mean d)), w its gain"
    return f"final norm {name} linearised: W_U (w * d), w its gain"


def _centres(norm: nn.Module) -> bool:
    name = type(norm).__name__.lower()
    return isinstance(norm, nn.LayerNorm) or ("layernorm" in name and "rms" not in name)


def _gain(norm: nn.Module, width: int, like: Tensor) -> Tensor:
    weight = getattr(norm, "weight", None)
    if weight is None:
        return torch.ones(width, dtype=like.dtype, device=like.device)
    gain = weight.detach().to(like.device, like.dtype)
    return 1.0 + gain if type(norm).__name__.lower().startswith("gemma") else gain


def direct_logits(model: nn.Module, directions: Tensor) -> Tensor:
    """Logit change per unit of each direction [m, d] through the final norm and W_U: [m, V]."""
    unembed = model.get_output_embeddings()
    if unembed is None or getattr(unembed, "weight", None) is None:
        raise GsaeError("the model has no output embedding: promoted tokens need one")
    weight = unembed.weight.detach()
    d = directions.to(weight.device, torch.float32)
    norm = final_norm(model)
    if norm is not None:
        if _centres(norm):
            d = d - d.mean(dim=1, keepdim=True)
        d = d * _gain(norm, d.shape[1], d)
    return d @ weight.float().T


def top_tokens(model: nn.Module, directions: Tensor, count: int, chunk: int = 256
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each direction: the `count` most promoted token ids and their logit changes, and the
    `count` most suppressed ones (most negative first)."""
    return _ranked(model, directions, count, chunk, (True, False))  # type: ignore[return-value]


def promoted_tokens(model: nn.Module, directions: Tensor, count: int, chunk: int = 256
                    ) -> tuple[Tensor, Tensor]:
    """`top_tokens`' promoted ids and logit changes alone (the index of every latent needs no
    suppressed tokens: half the ranking work)."""
    return _ranked(model, directions, count, chunk, (True,))  # type: ignore[return-value]


def _ranked(model: nn.Module, directions: Tensor, count: int, chunk: int,
            sides: tuple[bool, ...]) -> tuple[Tensor, ...]:
    """Per direction, (ids, logit changes) of the `count` largest (True) or smallest (False)
    direct logits, for each side in `sides`, in blocks of `chunk` directions."""
    parts = []
    for block in directions.split(chunk):
        logits = direct_logits(model, block)
        ranked = [logits.topk(count, dim=1, largest=side) for side in sides]
        parts.append([t.cpu() for r in ranked for t in (r.indices, r.values)])
    return tuple(torch.cat(p) for p in zip(*parts))
