"""Speed of one SAE training step: TopK and g-SAE side by side in one run.

A step is what the trainer does per batch: forward (selection, decode, FVU, AuxK when latents
are dead), backward, removal of the gradient parallel to the decoder rows, fused Adam, decoder
renormalisation. The variants take turns, step by step, for many rounds, so that the drift of a
shared machine hits them alike; each prints the median time of all its steps (at least 10) and
tokens per second, and the g-SAE's time is compared with TopK's.

    python benchmarks/sae_step.py [--shape smollm2|gpt2] [--rounds 12] [--steps 1]
        [--beta 100] [--dead-fraction 0] [--wait-idle 0] [--sparsify]

`--sparsify` adds EleutherAI sparsify's SparseCoder step (TopK, same shape, same Adam) when the
`eai-sparsify` package is importable; it is not a dependency of gsae.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from gsae import SAE, SAEConfig
from gsae.kernels import onednn_available

SHAPES = {"smollm2": (576, 16), "gpt2": (768, 32)}  # d_in and expansion: 9216 / 24576 latents
X_MEAN_NORM = 150.0  # x = a shared mean + a sparse sum of features: ||x|| is about 170
X_SPREAD_NORM = 80.0
G_NORM = 0.23  # median ||dL/dx|| measured on SmolLM2-135M (method.md)
FEATURES_PER_TOKEN = 24
IDLE_FRACTION = 0.9  # --wait-idle: start a step once the CPUs were this idle for 0.3 s


def cpu_idle_fraction(window: float = 0.3) -> float:
    """Fraction of the machine's CPU time that was idle over `window` seconds (Linux)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(window)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_for_idle_cpus(timeout: float) -> None:
    """Wait, at most `timeout` seconds, until other processes leave the CPUs idle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and cpu_idle_fraction() < IDLE_FRACTION:
        pass


def make_batch(d_in: int, n_tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured activations and gradients: each x is a shared mean plus a sparse positive sum
    of a few thousand random unit features; each g is Gaussian with norm G_NORM."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(4 * d_in, d_in, generator=gen)
    features /= features.norm(dim=1, keepdim=True)
    mean = torch.randn(d_in, generator=gen)
    mean *= X_MEAN_NORM / mean.norm()
    which = torch.randint(0, len(features), (n_tokens, FEATURES_PER_TOKEN), generator=gen)
    size = torch.empty(n_tokens, FEATURES_PER_TOKEN).exponential_(generator=gen)
    spread = torch.nn.functional.embedding_bag(which, features, per_sample_weights=size,
                                             mode="sum")
    spread *= X_SPREAD_NORM / spread.norm(dim=1).median()
    g = torch.randn(n_tokens, d_in, generator=gen)
    g *= G_NORM / g.norm(dim=1, keepdim=True)
    return mean + spread, g


def gsae_step(d_in: int, n_latents: int, k: int, beta: float, x: torch.Tensor, g: torch.Tensor,
              dead: torch.Tensor | None) -> Callable[[], None]:
    """One training step of a gsae SAE, as the trainer runs it."""
    sae = SAE(SAEConfig(n_latents=n_latents, k=k, beta=beta), d_in)
    sae.init_b_dec(x, "mean")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    grad = g if beta > 0 else None

    def step() -> None:
        out = sae(x, grad, dead_mask=dead, k_aux=d_in // 2)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_parallel_grads()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()

    return step


def sparsify_step(d_in: int, n_latents: int, k: int, x: torch.Tensor,
                  dead: torch.Tensor | None) -> Callable[[], None]:
    """One training step of sparsify's SparseCoder, as its trainer runs it."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=n_latents, k=k), device="cpu")
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--beta", type=float, default=100.0, help="beta of the g-SAE")
    parser.add_argument("--rounds", type=int, default=12, help="turns each variant takes")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant per turn")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dead-fraction", type=float, default=0.0,
                        help="fraction of latents marked dead, so that AuxK runs")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="on a shared machine: before each timed step, wait up to this long "
                        "for other processes to leave the CPUs idle (Linux)")
    parser.add_argument("--sparsify", action="store_true",
                        help="also time EleutherAI sparsify's step, if it is installed")
    args = parser.parse_args()
    if args.rounds * args.steps < 10:
        parser.error("time at least 10 steps per variant (--rounds x --steps)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d_in, expansion = SHAPES[args.shape]
    n_latents = d_in * expansion
    x, g = make_batch(d_in, args.batch)
    dead = None
    if args.dead_fraction > 0:
        dead = torch.rand(n_latents, generator=torch.Generator().manual_seed(1))
        dead = dead < args.dead_fraction
    variants = {
        "TopK (beta 0)": gsae_step(d_in, n_latents, args.k, 0.0, x, g, dead),
        f"g-SAE (beta {args.beta:g})": gsae_step(d_in, n_latents, args.k, args.beta, x, g, dead),
    }
    if args.sparsify:
        try:
            variants["sparsify SparseCoder (TopK)"] = sparsify_step(d_in, n_latents, args.k, x,
                                                                    dead)
        except ImportError:
            print("sparsify is not installed: skipped (pip install eai-sparsify)")

    print(f"shape {d_in} x {n_latents}, k {args.k}, batch {args.batch}, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, dense products through "
          f"{'oneDNN' if onednn_available() else 'the default BLAS'}, dead latents "
          f"{0 if dead is None else int(dead.sum())}")
    print(f"{args.rounds} rounds; in each, every variant runs {args.steps} timed step(s), in an "
          "order that rotates from round to round")
    names = list(variants)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for step in variants.values():
        for _ in range(args.warmup):
            step()
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            this_round = []
            for _ in range(args.steps):
                if args.wait_idle > 0:
                    wait_for_idle_cpus(args.wait_idle)
                start = time.perf_counter()
                variants[name]()
                this_round.append(time.perf_counter() - start)
            times[name].append(this_round)

    print(f"{'variant':30s} {'median ms/step':>14s} {'quartiles':>13s} {'tokens/s':>9s}")
    medians = {}
    for name, rounds in times.items():
        all_steps = sorted(t for r in rounds for t in r)
        medians[name] = statistics.median(all_steps)
        q1, _, q3 = statistics.quantiles(all_steps, n=4)
        print(f"{name:30s} {1e3 * medians[name]:14.1f} {1e3 * q1:6.0f}-{1e3 * q3:<6.0f} "
              f"{args.batch / medians[name]:9,.0f}")
    topk, gsae = names[:2]
    round_ratios = [statistics.median(a) / statistics.median(b)
                    for a, b in zip(times[gsae], times[topk])]
    print(f"g-SAE / TopK time per step: {medians[gsae] / medians[topk]:.3f} (ratio of medians); "
          f"median of the per-round ratios {statistics.median(round_ratios):.3f}")
    for name in names[2:]:
        round_ratios = [statistics.median(a) / statistics.median(b)
                        for a, b in zip(times[name], times[topk])]
        print(f"{name} / TopK time per step: {medians[name] / medians[topk]:.3f} (ratio of "
              f"medians); median of the per-round ratios {statistics.median(round_ratios):.3f}")


if __name__ == "__main__":
    main()
