"""How close bf16 autocast's activations and gradients are to fp32's at one hook point.

The study's store may be built with `--autocast bf16` only if its gradients agree with fp32:
per token, cosine(g_bf16, g_fp32) with median and 5th percentile >= 0.99. This runs the same
held-out-free training contexts through both settings and prints those numbers for g (and x).

    python benchmarks/autocast_gradients.py [--hook 15] [--batches 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from gsae.models import ModelConfig, load_model
from gsae.source import ActivationSource, SourceConfig
from gsae.text import DataConfig, batched_contexts, token_contexts


def cosines(hook: str, batches: list[torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Per-token cosine between the bf16-autocast and fp32 values of x and g."""
    runs = {mode: ActivationSource(model, SourceConfig(hooks=[hook], autocast=mode))
            for mode in ("none", "bf16")}
    out: dict[str, list[torch.Tensor]] = {"x": [], "g": []}
    for tokens in batches:
        ref = next(iter(runs["none"].batches(tokens).values()))
        low = next(iter(runs["bf16"].batches(tokens).values()))
        out["x"].append(F.cosine_similarity(ref.x, low.x, dim=1))
        out["g"].append(F.cosine_similarity(ref.g, low.g, dim=1))
    return {k: torch.cat(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="15")
    parser.add_argument("--batches", type=int, default=8, help="batches of 8 contexts of 128")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelConfig(model=args.model))
    contexts = batched_contexts(token_contexts(DataConfig(), tokenizer, "train"), 8)
    found = cosines(args.hook, list(itertools.islice(contexts, args.batches)), model)
    for name, values in found.items():
        q = torch.quantile(values.double(), torch.tensor([0.05, 0.5], dtype=torch.float64))
        print(f"{name}: {values.numel()} tokens, cosine(bf16 autocast, fp32) median "
              f"{q[1]:.5f}, 5th percentile {q[0]:.5f}, min {values.min():.5f}")


if __name__ == "__main__":
    main()
