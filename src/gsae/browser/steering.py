"""Greedy continuations of fixed prompts with a latent's decoder direction added at the hook.

The vector `m * a_i * d_i` (a_i the latent's typical activation: the mean of its non-zero values
under gradient-free selection, as `gsae steer` defines it; d_i its unit decoder row) is added to
the hook's output at every position from `skip_first` on, in the prompt and in every generated
token. m = 0 is the clean model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gsae.steer import greedy

PROMPTS = ("The weather today is", "In the city of", "My favourite thing about")
MULTIPLES = (0.0, 1.0, 4.0)


def continuations(model: nn.Module, module: nn.Module, tokenizer, directions: dict[int, Tensor],
                  typical: dict[int, float], skip_first: int, new_tokens: int,
                  batch_rows: int = 256) -> dict[int, list[dict]]:
    """For each latent (unit direction [d], typical activation): per prompt the continuation
    text at every multiple of `MULTIPLES`. The clean continuation (m = 0) is run once. Rows go
    in large batches: on a CPU a decoding step costs about the same for 1 row as for 100 (it
    reads every weight once), so the number of steps is what counts."""
    prompts = [torch.tensor(tokenizer(p)["input_ids"], dtype=torch.long) for p in PROMPTS]
    width = next(iter(directions.values())).shape[0] if directions else 0
    clean = [_spell(tokenizer, greedy(model, module, p, torch.zeros(1, width), skip_first,
                                      new_tokens))[0] for p in prompts] if directions else []
    jobs = [(i, m) for i in directions for m in MULTIPLES if m > 0]
    texts: dict[tuple[int, float, int], str] = {}
    bar = tqdm(total=len(jobs) * len(prompts), desc="inspect: steer", unit="continuation",
               dynamic_ncols=True)
    for first in range(0, len(jobs), batch_rows):
        group = jobs[first : first + batch_rows]
        vectors = torch.stack([m * typical[i] * directions[i].float() for i, m in group])
        for p, prompt in enumerate(prompts):
            for (i, m), text in zip(group, _spell(tokenizer, greedy(
                    model, module, prompt, vectors, skip_first, new_tokens))):
                texts[(i, m, p)] = text
            bar.update(len(group))
    bar.close()
    return {i: [{"prompt": PROMPTS[p], "continuations": [
        {"multiple": m, "alpha": m * typical[i], "text": clean[p] if m == 0 else texts[(i, m, p)]}
        for m in MULTIPLES]} for p in range(len(prompts))] for i in directions}


def _spell(tokenizer, ids: Tensor) -> list[str]:
    return [tokenizer.decode(row.tolist()) for row in ids]

