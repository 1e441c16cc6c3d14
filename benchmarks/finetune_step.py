"""Cost of a fine-tuning step (`gsae finetune`) against a streaming g-SAE training step
(`gsae train`), per token, on the default model, measured side by side in one run.

Both stream from the language model and step one g-SAE (beta 100, 9,216 latents on SmolLM2)
once per batch of contexts: training runs the frozen forward + backward to the hook and the
SAE step; fine-tuning runs the same clean pass, then the layers above the hook again with the
reconstruction spliced in, and the backward through them to the SAE. The two alternate over
`--rounds` rounds on the same batches, so a busy machine slows both alike.

    python benchmarks/finetune_step.py [--model smollm2-135m] [--batches 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import torch

from gsae.finetune import FinetuneTrainer, SplicingSource
from gsae.models import ModelConfig, hidden_size, load_model
from gsae.sae import SAE, SAEConfig
from gsae.source import ActivationSource, SourceConfig
from gsae.text import DataConfig, batched_contexts, token_contexts
from gsae.train import TrainConfig, Trainer


def lm_batches(tokenizer, n: int, batch_size: int) -> list[torch.Tensor]:
    contexts = batched_contexts(token_contexts(DataConfig(), tokenizer, "train"), batch_size)
    return list(itertools.islice(contexts, n))


def seconds_per_token(trainer_class: type[Trainer], chunks, sae: SAE, hook: str,
                      batch_tokens: int) -> float:
    """Wall seconds per SAE token of one pass of `chunks` through a trainer of `sae`."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, tokens=10**9, batch_tokens=batch_tokens,
                          shuffle_tokens=batch_tokens, checkpoint_every=10**9, log_every=10**9)
        trainer = trainer_class.create([(sae, hook)], cfg)
        start = time.perf_counter()
        trainer.fit(chunks)
        return (time.perf_counter() - start) / trainer.members[0].tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="15")
    parser.add_argument("--batches", type=int, default=3, help="LM batches of 4 contexts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelConfig(model=args.model))
    cfg = SourceConfig(hooks=[args.hook], lm_batch_size=4)
    streaming = ActivationSource(model, cfg)
    splicing = SplicingSource(model, cfg, with_grad=True)
    hook = streaming.hook_names[0]
    batches = lm_batches(tokenizer, args.batches + 1, 4)
    splicing.batches(batches[0])  # warm-up
    batches = batches[1:]
    rows = len(streaming.batches(batches[0])[hook])  # one LM batch of rows per step

    def sae() -> SAE:
        return SAE(SAEConfig(beta=100.0), hidden_size(model))

    print(f"model {args.model}, hook {hook}, {args.batches} batches of 4 x "
          f"{batches[0].shape[1]} tokens per measurement, {torch.get_num_threads()} threads, "
          f"forward {splicing.interventions[hook].forward}")
    for r in range(args.rounds):
        train = seconds_per_token(Trainer, streaming.stream(iter(batches)), sae(), hook, rows)
        tune = seconds_per_token(FinetuneTrainer, splicing.stream(iter(batches)), sae(), hook,
                                 rows)
        print(f"round {r + 1}: streaming g-SAE training {1e3 * train:6.2f} ms/token, "
              f"fine-tuning {1e3 * tune:6.2f} ms/token, ratio {tune / train:.2f}")


if __name__ == "__main__":
    main()
