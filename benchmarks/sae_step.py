"""Speed of one SAE training step: TopK and g-SAE side by side in one run, against one encoder
GEMM of the same shape and, with `--sparsify`, EleutherAI sparsify's step.

A step is what the trainer does per batch: forward (selection, decode, FVU, AuxK when latents
are dead), backward, removal of the gradient parallel to the decoder rows, fused Adam, decoder
renormalisation. The variants take turns, step by step, for many rounds, so that the drift of a
shared machine hits them alike; each prints the median time of all its steps (at least 10),
tokens per second, and its time as a multiple of one encoder GEMM (`x @ W_enc^T + b_enc` over
the batch in float32 through oneDNN, in the selection's blocks of rows).

    python benchmarks/sae_step.py [--shape smollm2|gpt2] [--rounds 12] [--steps 1]
        [--beta 100] [--fisher-coef 0] [--dead-fraction 0] [--wait-idle 0] [--one-path]
        [--sparsify] [--profile]

`--fisher-coef LAMBDA` adds both steps with the Fisher term (loss FVU + lambda FVU_g + AuxK,
docs/method.md) and prints each one's time against the same step without it. The steps take
(x, g) already in memory, as training from a store gives them to the SAE.

`--sparsify` adds sparsify's SparseCoder step (TopK, same shape, same Adam). sparsify is not a
dependency of gsae: it runs in the separate environment of the interop tests (created under the
gsae cache on first use, a few minutes; see tests/test_interop.py), as a subprocess that takes
its turns over a pipe. `--profile` prints where the time of each gsae step goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SHAPES = {"smollm2": (576, 16), "gpt2": (768, 32)}  # d_in and expansion: 9216 / 24576 latents
X_MEAN_NORM = 150.0  # x = a shared mean + a sparse sum of features: ||x|| is about 170
X_SPREAD_NORM = 80.0
G_NORM = 0.23  # median ||dL/dx|| measured on SmolLM2-135M (method.md)
FEATURES_PER_TOKEN = 24
IDLE_FRACTION = 0.9  # --wait-idle: start a step once the CPUs were this idle for 0.3 s
TARGETS = {"g-SAE / TopK": 1.3, "TopK / GEMM": 1.5}
Step = Callable[[], float]  # runs one step, returns its time in seconds


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


def dead_mask(n_latents: int, fraction: float) -> torch.Tensor | None:
    if fraction <= 0:
        return None
    return torch.rand(n_latents, generator=torch.Generator().manual_seed(1)) < fraction


def timed(fn: Callable[[], None]) -> Step:
    def step() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return step


def gsae_step(d_in: int, n_latents: int, k: int, beta: float, x: torch.Tensor, g: torch.Tensor,
              dead: torch.Tensor | None, fisher_coef: float = 0.0) -> Callable[[], None]:
    """One training step of a gsae SAE, as the trainer runs it."""
    from gsae import SAE, SAEConfig
    from gsae.train import training_loss

    sae = SAE(SAEConfig(n_latents=n_latents, k=k, beta=beta, fisher_coef=fisher_coef), d_in)
    sae.init_b_dec(x, "mean")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    grad = g if sae.cfg.needs_grad else None

    def step() -> None:
        out = sae(x, grad, dead_mask=dead, k_aux=d_in // 2)
        training_loss(out, sae.cfg, auxk_coef=1 / 32).backward()
        sae.remove_parallel_grads()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()

    step.sae = sae  # type: ignore[attr-defined]
    step.opt = opt  # type: ignore[attr-defined]
    return step


def switch_screen(step: Callable[[], None]) -> Callable[[], None]:
    """`step` with the selection's bfloat16 screen switched (off if it is on, else on)."""
    from gsae import kernels

    def switched_step() -> None:
        saved = kernels.SCREEN
        kernels.SCREEN = "always" if saved == "never" else "never"
        try:
            step()
        finally:
            kernels.SCREEN = saved

    return switched_step


def encoder_gemm(d_in: int, n_latents: int, x: torch.Tensor) -> Callable[[], None]:
    """One encoder GEMM over the batch: float32, oneDNN, in the selection's blocks of rows."""
    from gsae import kernels, private_ops

    gen = torch.Generator().manual_seed(2)
    W = torch.randn(n_latents, d_in, generator=gen) / d_in**0.5
    b = torch.zeros(n_latents)
    rows = kernels.block_rows(len(x), n_latents, 4)

    def gemm() -> None:
        linear = private_ops.DenseLinear(W, b, rows)
        for start in range(0, len(x), rows):
            linear(x[start:start + rows])

    return gemm


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


def interop_python() -> Path:
    """The Python of the environment with sparsify that the interop tests use (created on
    first use)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_interop import interop_python as locate

    return locate()


class RemoteStep:
    """A step that runs in another Python (sparsify's environment): this script in `--worker`
    mode, which builds the step and runs one each time it reads a line."""

    def __init__(self, python: Path, args: argparse.Namespace):
        argv = [str(python), __file__, "--worker", "--shape", args.shape, "--batch",
                str(args.batch), "--k", str(args.k), "--threads", str(args.threads),
                "--dead-fraction", str(args.dead_fraction)]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, bufsize=1)
        self.version = self._read("version")

    def _read(self, tag: str) -> str:
        """The next line the worker marks with `tag` (it may print other lines too)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(tag + ": "):
                return line[len(tag) + 2:].strip()
        raise RuntimeError("the sparsify worker stopped (see its error output above)")

    def __call__(self) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write("step\n")
        return float(self._read("seconds"))

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def worker(args: argparse.Namespace) -> None:
    """`--worker`: build sparsify's step, then time one step per line read from stdin."""
    from importlib.metadata import version

    torch.set_num_threads(args.threads)
    d_in, expansion = SHAPES[args.shape]
    x, _ = make_batch(d_in, args.batch)
    step = timed(sparsify_step(d_in, d_in * expansion, args.k, x,
                               dead_mask(d_in * expansion, args.dead_fraction)))
    print(f"version: eai-sparsify {version('eai-sparsify')}, torch {torch.__version__}", flush=True)
    for _ in sys.stdin:
        print(f"seconds: {step()}", flush=True)


def run_rounds(variants: dict[str, Step], args: argparse.Namespace) -> dict[str, list[float]]:
    """Every variant takes `args.steps` timed steps per round, in an order that rotates."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in variants.values():
        for _ in range(args.warmup):
            step()
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            for _ in range(args.steps):
                if args.wait_idle > 0:
                    wait_for_idle_cpus(args.wait_idle)
                times[name].append(variants[name]())
    return times


def report(times: dict[str, list[float]], names: dict[str, str], batch: int) -> None:
    medians = {name: statistics.median(t) for name, t in times.items()}
    gemm = medians[names["gemm"]]
    print(f"{'variant':34s} {'median ms':>9s} {'quartiles':>11s} {'tokens/s':>9s} {'x GEMM':>7s}")
    for name, t in times.items():
        q1, _, q3 = statistics.quantiles(t, n=4)
        print(f"{name:34s} {1e3 * medians[name]:9.1f} {1e3 * q1:5.0f}-{1e3 * q3:<5.0f} "
              f"{batch / medians[name]:9,.0f} {medians[name] / gemm:7.2f}")
    ratios = {"g-SAE / TopK": (names["gsae"], names["topk"]),
              "TopK / GEMM": (names["topk"], names["gemm"])}
    if "topk other" in names:
        ratios["g-SAE / TopK, other"] = (names["gsae other"], names["topk other"])
        ratios["TopK / GEMM, other"] = (names["topk other"], names["gemm"])
        ratios["TopK other / TopK"] = (names["topk other"], names["topk"])
        ratios["g-SAE other / g-SAE"] = (names["gsae other"], names["gsae"])
    if "topk fisher" in names:
        ratios["TopK+Fisher / TopK"] = (names["topk fisher"], names["topk"])
        ratios["g-SAE+Fisher / g-SAE"] = (names["gsae fisher"], names["gsae"])
    if "sparsify" in names:
        ratios["sparsify / TopK"] = (names["sparsify"], names["topk"])
        ratios["sparsify / g-SAE"] = (names["sparsify"], names["gsae"])
    for label, (a, b) in ratios.items():
        paired = statistics.median(x / y for x, y in zip(times[a], times[b]))
        verdict = ""
        target = TARGETS.get(label.removesuffix(", other"))
        if target is not None:
            met = medians[a] / medians[b] <= target
            verdict = f"  target <= {target}: {'met' if met else 'NOT met'}"
        elif label.startswith("sparsify"):
            verdict = f"  gsae ahead: {'yes' if medians[a] > medians[b] else 'NO'}"
        print(f"{label:22s} {medians[a] / medians[b]:6.3f} (ratio of medians; median of paired "
              f"steps {paired:.3f}){verdict}")


SELECT_OPS = {  # the selection's operators by the part of the work they do
    "GEMM": ("mkldnn::_linear_pointwise", "aten::linear", "aten::addmm", "aten::mm"),
    "top-k": ("aten::topk",),
    "order of ties": ("aten::sort", "aten::argsort"),
    "exact rescoring": ("aten::_embedding_bag_per_sample_weights_backward", "aten::linalg_vecdot"),
}


def select_call(sae, x: torch.Tensor, g: torch.Tensor, dead: torch.Tensor | None
                ) -> Callable[[], None]:
    """The selection of one step, alone, as SAE.forward makes it."""
    from gsae import kernels

    dead_latents = None if dead is None else dead.nonzero().squeeze(1)
    k_aux = 0 if dead_latents is None else min(sae.d_in // 2, len(dead_latents))
    grad = g if sae.beta > 0 else None

    def call() -> None:
        with torch.no_grad():
            kernels.select(x - sae.b_dec, sae.W_enc, sae.b_enc, sae.k, grad=grad,
                           W_dec=sae.W_dec, beta=sae.beta, dead_latents=dead_latents,
                           k_aux=k_aux)

    return call


def phase_times(step, x: torch.Tensor, g: torch.Tensor, dead: torch.Tensor | None,
                d_in: int) -> dict[str, float]:
    """One training step, timed phase by phase, and the selection alone."""
    sae, opt = step.sae, step.opt
    grad = g if sae.beta > 0 else None
    marks = [time.perf_counter()]
    select_call(sae, x, g, dead)()
    marks.append(time.perf_counter())
    out = sae(x, grad, dead_mask=dead, k_aux=d_in // 2)
    marks.append(time.perf_counter())
    (out.fvu + out.auxk_loss / 32).backward()
    marks.append(time.perf_counter())
    sae.remove_parallel_grads()
    sae.normalize_decoder()
    marks.append(time.perf_counter())
    opt.step()
    opt.zero_grad(set_to_none=True)
    marks.append(time.perf_counter())
    spans = [b - a for a, b in zip(marks, marks[1:])]
    return {"selection": spans[0], "forward after selection": spans[1] - spans[0],
            "backward (sparse products)": spans[2], "decoder upkeep": spans[3],
            "Adam (fused)": spans[4]}


def selection_shares(call: Callable[[], None]) -> dict[str, float]:
    """Fractions of the selection's operator time by part (SELECT_OPS, the rest as other)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            call()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        part = next((p for p, ops in SELECT_OPS.items() if event.key in ops), "other")
        totals[part] = totals.get(part, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {part: t / whole for part, t in totals.items()}


def profile(steps: dict[str, tuple[Callable[[], None], str]], x: torch.Tensor, g: torch.Tensor,
            dead: torch.Tensor | None, args: argparse.Namespace) -> None:
    """Where the time of each gsae step goes: median ms per phase over interleaved rounds, the
    selection split by operator (profiler self time, scaled to the selection's median). Each
    step runs with its own setting of the bfloat16 screen (`kernels.SCREEN`)."""
    from gsae import kernels

    d_in, saved = x.shape[1], kernels.SCREEN
    phases: dict[str, dict[str, list[float]]] = {name: {} for name in steps}
    shares: dict[str, dict[str, float]] = {}
    try:
        for _ in range(max(5, args.rounds // 2)):
            for name, (step, screen) in steps.items():
                kernels.SCREEN = screen
                for phase, t in phase_times(step, x, g, dead, d_in).items():
                    phases[name].setdefault(phase, []).append(t)
        for name, (step, screen) in steps.items():
            kernels.SCREEN = screen
            shares[name] = selection_shares(select_call(step.sae, x, g, dead))
    finally:
        kernels.SCREEN = saved
    print("\nprofile: median ms per phase (selection timed alone; the forward's share without it)")
    print(f"{'phase':34s}" + "".join(f"{name:>22s}" for name in steps))
    medians = {name: {p: statistics.median(t) for p, t in ph.items()}
               for name, ph in phases.items()}
    for phase in next(iter(medians.values())):
        print(f"{phase:34s}" + "".join(f"{1e3 * medians[n][phase]:22.1f}" for n in steps))
        if phase == "selection":
            for part in list(SELECT_OPS) + ["other"]:
                print(f"{'  of which ' + part:34s}" + "".join(
                    f"{1e3 * medians[n][phase] * shares[n].get(part, 0.0):22.1f}" for n in steps))
    print(f"{'sum of phases':34s}" + "".join(
        f"{1e3 * sum(medians[n].values()):22.1f}" for n in steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--beta", type=float, default=100.0, help="beta of the g-SAE")
    parser.add_argument("--fisher-coef", type=float, default=0.0, metavar="LAMBDA",
                        help="also time both steps with the Fisher term of this weight")
    parser.add_argument("--rounds", type=int, default=12, help="turns each variant takes")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant per turn")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dead-fraction", type=float, default=0.0,
                        help="fraction of latents marked dead, so that AuxK runs")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="on a shared machine: before each timed step, wait up to this long "
                        "for other processes to leave the CPUs idle (Linux)")
    parser.add_argument("--one-path", action="store_true",
                        help="time the default selection path only (not also the other one on "
                        "CPUs with bfloat16 hardware)")
    parser.add_argument("--sparsify", action="store_true",
                        help="also time EleutherAI sparsify's step (in the interop environment)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the time of gsae's steps goes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.rounds * args.steps < 10:
        parser.error("time at least 10 steps per variant (--rounds x --steps)")
    from gsae import kernels
    from gsae.private_ops import bf16_products_fast

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d_in, expansion = SHAPES[args.shape]
    n_latents = d_in * expansion
    x, g = make_batch(d_in, args.batch)
    dead = dead_mask(n_latents, args.dead_fraction)
    names = {"gemm": "one encoder GEMM (fp32, oneDNN)", "topk": "gsae TopK (beta 0)",
             "gsae": f"gsae g-SAE (beta {args.beta:g})"}
    topk = gsae_step(d_in, n_latents, args.k, 0.0, x, g, dead)
    gsae = gsae_step(d_in, n_latents, args.k, args.beta, x, g, dead)
    variants: dict[str, Step] = {names["gemm"]: timed(encoder_gemm(d_in, n_latents, x)),
                                 names["topk"]: timed(topk), names["gsae"]: timed(gsae)}
    if args.fisher_coef > 0:
        for key, beta, label in (("topk fisher", 0.0, "TopK"), ("gsae fisher", args.beta,
                                                                 "g-SAE")):
            names[key] = f"gsae {label} + Fisher (lambda {args.fisher_coef:g})"
            variants[names[key]] = timed(gsae_step(d_in, n_latents, args.k, beta, x, g, dead,
                                                   args.fisher_coef))
    if bf16_products_fast() and not args.one_path:  # both again, the other path
        other = "dense fp32" if kernels.screens(x) else "bf16 screen"
        names["topk other"] = f"gsae TopK, {other}"
        names["gsae other"] = f"gsae g-SAE, {other}"
        variants[names["topk other"]] = timed(switch_screen(topk))
        variants[names["gsae other"]] = timed(switch_screen(gsae))
    remote = None
    if args.sparsify:
        remote = RemoteStep(interop_python(), args)
        names["sparsify"] = "sparsify SparseCoder (TopK)"
        variants[names["sparsify"]] = remote
    print(f"shape {d_in} x {n_latents}, k {args.k}, batch {args.batch}, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, selection screened in bfloat16: "
          f"{'on' if kernels.screens(x) else 'off'}, dead latents "
          f"{0 if dead is None else int(dead.sum())}"
          + (f", sparsify: {remote.version}" if remote else ""))
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min)")
    print(f"{args.rounds} rounds; in each, every variant runs {args.steps} timed step(s), in an "
          "order that rotates from round to round")
    times = run_rounds(variants, args)
    if remote is not None:
        remote.close()
    report(times, names, args.batch)
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
    if args.profile:
        steps = {"TopK": (topk, kernels.SCREEN), f"g-SAE (beta {args.beta:g})":
                 (gsae, kernels.SCREEN)}
        if bf16_products_fast():
            other = "never" if kernels.screens(x) else "always"
            steps[f"TopK, SCREEN={other}"] = (topk, other)
            steps[f"g-SAE, SCREEN={other}"] = (gsae, other)
        profile(steps, x, g, dead, args)


if __name__ == "__main__":
    main()
