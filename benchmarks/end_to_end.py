"""End to end on CPU: gsae training a TopK SAE against EleutherAI sparsify's `Trainer.fit`.

Both train a TopK SAE (k 32, 16 x d latents, Adam) on the output of layer 15 of SmolLM2-135M,
from the same token contexts, in batches of 8 x 128 tokens, in float32. gsae runs the model only
up to the hook (beta 0 needs no gradient, so the forward stops there); sparsify's trainer runs
its model body. Each side trains on the same `--batches` batches in turn, for `--rounds` rounds
(so that a shared machine's drift hits both alike), and the script prints each side's median
tokens per second (language-model tokens, position 0 included, per second of training) and
their ratio.

    python benchmarks/end_to_end.py [--batches 6] [--rounds 3] [--threads 2]

sparsify runs in the separate environment of the interop tests (created under the gsae cache on
first use, a few minutes; see tests/test_interop.py), in a subprocess per round: this script in
`--worker` mode. Model loading is not timed on either side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HOOK_LAYER = 15
K = 32
EXPANSION = 16
CONTEXTS_PER_BATCH = 8
LR = 2e-4


def gsae_rate(model, tokens: torch.Tensor) -> float:
    """Tokens per second of gsae training a TopK SAE on `tokens` [batches, 8, 128]: the
    language-model tokens times the fraction of their SAE rows that were trained on (the
    optimiser steps take whole batches of `batch_tokens` rows; a remainder is left over)."""
    from gsae.models import hidden_size
    from gsae.sae import SAE, SAEConfig
    from gsae.source import ActivationSource, SourceConfig
    from gsae.train import TrainConfig, Trainer

    source = ActivationSource(model, SourceConfig(hooks=[str(HOOK_LAYER)]), with_grad=False)
    rows_per_batch = CONTEXTS_PER_BATCH * (tokens.shape[2] - source.cfg.skip_first)
    batch_rows = rows_per_batch - 16  # a step per LM batch even if a few outlier rows drop out
    sae = SAE(SAEConfig(k=K, beta=0.0, expansion_factor=EXPANSION), hidden_size(model))
    offered = 0

    def counted(chunks):
        nonlocal offered
        for chunk in chunks:
            offered += sum(len(batch) for batch in chunk.values())
            yield chunk

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, tokens=10**9, batch_tokens=batch_rows,
                          shuffle_tokens=batch_rows, checkpoint_every=10**9,
                          log_every=10**9, lr=LR)
        trainer = Trainer.create([(sae, source.hook_names[0])], cfg)
        start = time.perf_counter()
        trainer.fit(counted(source.stream(iter(tokens))))
        elapsed = time.perf_counter() - start
        trained = trainer.members[0].tokens
    return tokens.numel() * trained / offered / elapsed


def sparsify_rate(python: Path, model_folder: Path, tokens: torch.Tensor, threads: int) -> float:
    """Tokens per second of sparsify's `Trainer.fit` on the same tokens, in its environment."""
    with tempfile.TemporaryDirectory() as work:
        torch.save(tokens.reshape(-1, tokens.shape[2]).clone(), Path(work) / "tokens.pt")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
               "SPARSIFY_DISABLE_TRITON": "1"}
        done = subprocess.run([str(python), __file__, "--worker", str(model_folder), work,
                               "--threads", str(threads)], env=env, cwd=work,
                              capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"the sparsify run failed:\n{done.stderr[-3000:]}")
        return json.loads((Path(work) / "rate.json").read_text())["tokens_per_second"]


def worker(model_folder: str, work: str, threads: int) -> None:
    """`--worker`: train with sparsify's Trainer on `work`/tokens.pt, write the rate."""
    from datasets import Dataset
    from sparsify import SparseCoderConfig, TrainConfig, Trainer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    tokens = torch.load(Path(work) / "tokens.pt")
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    model.eval().requires_grad_(False)
    cfg = TrainConfig(SparseCoderConfig(expansion_factor=EXPANSION, k=K),
                      batch_size=CONTEXTS_PER_BATCH, loss_fn="fvu", optimizer="adam", lr=LR,
                      hookpoints=[f"layers.{HOOK_LAYER}"], log_to_wandb=False,
                      save_every=10**9, save_dir=str(Path(work) / "checkpoints"))
    trainer = Trainer(cfg, dataset, model)
    start = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - start
    rate = {"tokens_per_second": tokens.numel() / elapsed}
    (Path(work) / "rate.json").write_text(json.dumps(rate))


def token_batches(tokenizer, n: int) -> torch.Tensor:
    from gsae.text import DataConfig, batched_contexts, token_contexts

    contexts = batched_contexts(token_contexts(DataConfig(), tokenizer, "train"),
                                CONTEXTS_PER_BATCH, drop_last=True)
    return torch.stack(list(itertools.islice(contexts, n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6, help="batches of 8 x 128 tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_interop import interop_python

    from gsae.models import ModelConfig, convert_gguf, default_gguf_path, load_model

    torch.set_num_threads(args.threads)
    python = interop_python()
    model_folder = convert_gguf(default_gguf_path())
    model, tokenizer = load_model(ModelConfig())
    tokens = token_batches(tokenizer, args.batches)
    print(f"SmolLM2-135M layer {HOOK_LAYER}, TopK k {K}, {EXPANSION} x latents, "
          f"{args.batches} batches of {CONTEXTS_PER_BATCH} x {tokens.shape[2]} tokens per round, "
          f"{args.rounds} rounds, fp32, {args.threads} threads; load average before "
          f"{os.getloadavg()[0]:.2f}")
    gsae_rate(model, tokens[:1])  # warm-up
    rates: dict[str, list[float]] = {"gsae": [], "sparsify": []}
    for round_ in range(args.rounds):
        for side in ("gsae", "sparsify") if round_ % 2 == 0 else ("sparsify", "gsae"):
            rate = (gsae_rate(model, tokens) if side == "gsae"
                    else sparsify_rate(python, model_folder, tokens, args.threads))
            rates[side].append(rate)
            print(f"round {round_ + 1}: {side:8s} {rate:8.0f} tokens/s", flush=True)
    medians = {side: statistics.median(r) for side, r in rates.items()}
    for side, median in medians.items():
        print(f"{side:8s} median {median:8.0f} tokens/s")
    ratio = medians["gsae"] / medians["sparsify"]
    print(f"gsae / sparsify tokens/s: {ratio:.2f} (target >= 1.5: "
          f"{'met' if ratio >= 1.5 else 'NOT met'}); load average after "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
