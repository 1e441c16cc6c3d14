"""Greedy continuations of fixed prompts with a latent's decoder direction added at the hook.

The vector `m * a_i * d_i` (a_i the latent's typical activation: the mean of its non-zero values
under gradient-free selection, as `gsae steer` defines it; d_i its unit decoder row) is added to
the hook's output at every position from `skip_first` on, in the prompt and in every generated
token. m = 0 is the clean model.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gsae.steer import greedy

PROMPTS = ("The weather today is", "In the city of", "My favourite thing about")
MULTIPLES = (0.0, 1.0, 4.0)


def continuations(model: nn.Module, module: nn.Module, tokenizer,
                  directions: dict[Hashable, Tensor], typical: dict[Hashable, float],
                  skip_first: int, new_tokens: int, batch_rows: int = 1024
                  ) -> dict[Hashable, list[dict]]:
    """For each latent (any key: unit direction [d], typical activation): per prompt the
    continuation text at every multiple of `MULTIPLES`. One greedy run holds every row of all
    prompts of one token length (the default model's three prompts are all 4 tokens), the
    clean one (m = 0) included: on a CPU a decoding step has a large fixed cost (reading every
    weight, the framework's per-step work), so fewer, larger runs are faster."""
    if not directions:
        return {}
    prompts = [torch.tensor(tokenizer(p)["input_ids"], dtype=torch.long) for p in PROMPTS]
    jobs = [(key, m) for key in directions for m in MULTIPLES if m > 0]
    vectors = torch.stack([torch.zeros_like(next(iter(directions.values())).float()),
                           *[m * typical[key] * directions[key].float() for key, m in jobs]])
    texts: dict[tuple[Hashable, float, int], str] = {}
    bar = tqdm(total=len(vectors) * len(prompts), desc="inspect: steer", unit="continuation",
               dynamic_ncols=True)
    for group in _by_length(prompts):  # prompts of one length share a run
        ids = torch.cat([prompts[p][None].expand(len(vectors), -1) for p in group])
        spelled = []
        for block_ids, block in zip(ids.split(batch_rows),
                                    vectors.repeat(len(group), 1).split(batch_rows)):
            spelled += _spell(tokenizer, greedy(model, module, block_ids, block, skip_first,
                                                new_tokens))
            bar.update(len(block))
        for g, p in enumerate(group):
            mine = spelled[g * len(vectors) : (g + 1) * len(vectors)]
            texts.update({(key, m, p): text for (key, m), text in zip(jobs, mine[1:])})
            texts.update({(key, 0.0, p): mine[0] for key in directions})
    bar.close()
    return {key: [{"prompt": PROMPTS[p], "continuations": [
        {"multiple": m, "alpha": m * typical[key], "text": texts[(key, m, p)]}
        for m in MULTIPLES]} for p in range(len(prompts))] for key in directions}


def _by_length(prompts: list[Tensor]) -> list[list[int]]:
    """Indices of the prompts grouped by token count, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for p, ids in enumerate(prompts):
        groups.setdefault(len(ids), []).append(p)
    return list(groups.values())


def _spell(tokenizer, ids: Tensor) -> list[str]:
    return [tokenizer.decode(row.tolist()) for row in ids]

