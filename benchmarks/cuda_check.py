"""A short check of the CUDA path: a few g-SAE training steps on one GPU, with the language model
under bf16 autocast and the model and SAE on the GPU, through `gsae train` itself. Prints the
tokens/s of training (language model and SAE together) and the loss.

    python benchmarks/cuda_check.py [--model smollm2-135m] [--steps 40] [--device cuda]

Without a GPU it runs a CPU fallback (float32, no autocast, fewer and smaller steps) and says so:
its figures say nothing about GPU speed, only that the path runs. For several GPUs, run
`torchrun --nproc_per_node N -m gsae train ...` with the same flags (see the README).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from gsae.cli import main as gsae_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="15")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu: the fallback)")
    parser.add_argument("--sae_device", default="", help="the SAE's device; default --device")
    parser.add_argument("--model_dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_tokens", type=int, default=4096)
    parser.add_argument("--lm_batch_size", type=int, default=32)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    autocast, dtype, steps, batch_tokens = "bf16", args.model_dtype, args.steps, args.batch_tokens
    if cuda:
        print(f"CUDA check on {torch.cuda.get_device_name(torch.device(args.device))}, "
              f"torch {torch.__version__}")
    else:
        print("NOTE: no CUDA device here: CPU fallback (float32 model, no autocast, 10 steps of "
              "256 tokens). Its figures are not GPU figures; it only shows the path runs.")
        args.device, args.sae_device = "cpu", "cpu"
        autocast, dtype, steps, batch_tokens = "none", "float32", min(steps, 10), 256
        args.lm_batch_size = min(args.lm_batch_size, 4)
    with tempfile.TemporaryDirectory() as out:
        flags = ["train", "--model", args.model, "--hooks", args.hook, "--device", args.device,
                 "--train.device", args.sae_device, "--dtype", dtype, "--autocast", autocast,
                 "--lm_batch_size", str(args.lm_batch_size), "--batch_tokens", str(batch_tokens),
                 "--tokens", str(steps * batch_tokens), "--shuffle_tokens", str(2 * batch_tokens),
                 "--warmup_steps", str(max(1, steps // 4)), "--log_every", "5",
                 "--checkpoint_every", str(10 * steps), "--out", out]
        start = time.perf_counter()
        code = gsae_main(flags)
        wall = time.perf_counter() - start
        if code != 0:
            raise SystemExit(code)
        logs = [json.loads(line) for f in Path(out).glob("*/*/log.jsonl") for line in f.open()]
    first, last = logs[0], logs[-1]
    print(f"\n{'CUDA' if cuda else 'CPU fallback'}: {last['step']} steps, {last['tokens']} tokens "
          f"in {wall:.1f} s including model loading")
    # tokens_per_s is an average since the start of training: elapsed = tokens / tokens_per_s.
    elapsed = [r["tokens"] / r["tokens_per_s"] for r in (first, last)]
    steady = (last["tokens"] - first["tokens"]) / (elapsed[1] - elapsed[0]) \
        if last["step"] > first["step"] else last["tokens_per_s"]
    print(f"training throughput (LM + SAE): {last['tokens_per_s']:.0f} tokens/s overall, "
          f"{steady:.0f} tokens/s after step {first['step']}")
    print(f"loss (FVU + AuxK / 32): first logged {first['fvu'] + first['auxk'] / 32:.4f}, "
          f"last {last['fvu'] + last['auxk'] / 32:.4f}; FVU {first['fvu']:.4f} -> "
          f"{last['fvu']:.4f}; L0 {last['l0']:.1f}; dead fraction {last['dead_fraction']:.3f}")
    if cuda:
        peak = torch.cuda.max_memory_allocated(torch.device(args.device)) / 2**30
        print(f"peak GPU memory: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
