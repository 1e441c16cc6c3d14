"""Speed of the g-SAE data pipeline on the default model, measured side by side in one run.

Prints, in tokens per second of SAE training data:
  (a) the language model's frozen forward + backward to the hook, alone;
  (b) streaming g-SAE training of 1 SAE and of a sweep of 8, and their ratio to (a);
  (c) training 1 g-SAE from the on-disk store (activations and gradients already computed).

    python benchmarks/pipeline.py [--model smollm2-135m] [--batches 6] [--autocast none]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import torch

from gsae.models import ModelConfig, hidden_size, load_model
from gsae.sae import SAE, SAEConfig
from gsae.source import ActivationSource, SourceConfig
from gsae.store import StoreReader, StoreWriter
from gsae.text import DataConfig, batched_contexts, token_contexts
from gsae.train import TrainConfig, Trainer


def lm_batches(tokenizer, n: int, batch_size: int) -> list[torch.Tensor]:
    contexts = batched_contexts(token_contexts(DataConfig(), tokenizer, "train"), batch_size)
    return list(itertools.islice(contexts, n))


def train_rate(chunks, saes: list[SAE], hook: str, batch_tokens: int) -> float:
    """Tokens per second of one pass of `chunks` through a trainer of `saes`."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, tokens=10**9, batch_tokens=batch_tokens,
                          shuffle_tokens=2 * batch_tokens, checkpoint_every=10**9,
                          log_every=10**9)
        trainer = Trainer.create([(s, hook) for s in saes], cfg)
        start = time.perf_counter()
        trainer.fit(chunks)
        elapsed = time.perf_counter() - start
        return trainer.members[0].tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="15")
    parser.add_argument("--batches", type=int, default=6, help="LM batches of 8 x 128 tokens")
    parser.add_argument("--autocast", default="none", choices=["none", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelConfig(model=args.model))
    d_in = hidden_size(model)
    source = ActivationSource(model, SourceConfig(hooks=[args.hook], autocast=args.autocast))
    hook = source.hook_names[0]
    batches = lm_batches(tokenizer, args.batches + 1, 8)
    source.batches(batches[0])  # warm-up
    batches = batches[1:]
    batch_tokens = 1008  # about one LM batch of SAE rows per step

    start = time.perf_counter()
    rows = sum(len(source.batches(t)[hook]) for t in batches)
    lm_rate = rows / (time.perf_counter() - start)

    def make_saes(n: int) -> list[SAE]:
        return [SAE(SAEConfig(beta=100.0, seed=i), d_in) for i in range(n)]

    one = train_rate(source.stream(iter(batches)), make_saes(1), hook, batch_tokens)
    eight = train_rate(source.stream(iter(batches)), make_saes(8), hook, batch_tokens)

    with tempfile.TemporaryDirectory() as store_dir:
        writer = StoreWriter(store_dir, {"hooks": [hook], "d_in": d_in}, "float16", 2)
        chunks = [source.batches(t) for t in batches]
        for i in range(0, len(chunks), 2):
            writer.write_shard(chunks[i : i + 2])
        writer.finish()
        reader = StoreReader(store_dir)
        n_chunks = len(reader.shards)
        stored = train_rate(itertools.islice(reader.chunks(), 3 * n_chunks), make_saes(1), hook,
                            4096)

    print(f"model {args.model}, hook {hook}, {rows} tokens, autocast {args.autocast}, "
          f"{torch.get_num_threads()} threads")
    print(f"(a) LM forward+backward alone:      {lm_rate:8.0f} tokens/s")
    print(f"(b) streaming, 1 g-SAE:             {one:8.0f} tokens/s  = {one / lm_rate:.2f} x (a)")
    print(f"(b) streaming, sweep of 8 g-SAEs:   {eight:8.0f} tokens/s  = "
          f"{eight / lm_rate:.2f} x (a)")
    print(f"(c) from the store, 1 g-SAE:        {stored:8.0f} tokens/s  = "
          f"{stored / lm_rate:.1f} x (a)")


if __name__ == "__main__":
    main()
