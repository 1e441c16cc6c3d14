"""The latent cache layout of EleutherAI's delphi (its `LatentCache.save_splits`), which delphi's
`LatentDataset` reads to explain and score latents:

    delphi/<hook>/config.json               the cache settings, plus "model_name"
    delphi/<hook>/<start>_<end>.safetensors one per split of the latents (end inclusive):
        locations   [N, 3] uint16, or uint32 when a value needs it: (context row, position,
                    latent - start)
        activations [N] float16
        tokens      [n_contexts, T] int64: the token contexts the rows refer to

Rows are the firings shown in the browser (the SAE's training-time selection, value > 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import Tensor

from gsae.browser.collect import Encoded
from gsae.browser.setup import Recorded

SPLITS = 4


def split_bounds(n_latents: int, splits: int = SPLITS) -> list[tuple[int, int]]:
    """(start, end) of each split of the latents, end inclusive, as delphi cuts them."""
    edges = torch.linspace(0, n_latents, steps=min(splits, n_latents) + 1).long().tolist()
    return [(a, b - 1) for a, b in zip(edges, edges[1:])]


def write_delphi_cache(folder: Path, enc: Encoded, contexts: Tensor, hook: str, rec: Recorded,
                       n_latents: int, model_name: str, batch_size: int) -> Path:
    """Write the firings of `enc` over `contexts` [n, T] in delphi's layout under `folder`."""
    hook_dir = folder / hook
    hook_dir.mkdir(parents=True, exist_ok=True)
    fired = enc.values > 0
    rows, slots = fired.nonzero(as_tuple=True)
    latents = enc.indices[rows, slots]
    locations = torch.stack([enc.where[rows, 0], enc.where[rows, 1], latents], dim=1)
    activations = enc.values[rows, slots]
    tokens = contexts.cpu().numpy().astype(np.int64)
    for start, end in split_bounds(n_latents):
        keep = (latents >= start) & (latents <= end)
        where = locations[keep].clone()
        where[:, 2] -= start
        small = where.numel() == 0 or int(where.max()) < 2**16
        save_file({
            "locations": where.numpy().astype(np.uint16 if small else np.uint32),
            "activations": activations[keep].numpy().astype(np.float16),
            "tokens": tokens,
        }, str(hook_dir / f"{start}_{end}.safetensors"))
    config = {
        "dataset_repo": rec.corpus.get("dataset", ""), "dataset_split": "gsae eval split",
        "dataset_name": "", "dataset_column": rec.corpus.get("text_column", "text"),
        "batch_size": batch_size, "cache_ctx_len": contexts.shape[1],
        "ctx_len": contexts.shape[1], "n_tokens": contexts.numel(),
        "n_splits": len(split_bounds(n_latents)), "model_name": model_name,
        "width": n_latents,
        "gsae_selection": "training-time selection (gradient-aware for a g-SAE), value > 0, "
        "data positions only",
    }
    (hook_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return hook_dir
