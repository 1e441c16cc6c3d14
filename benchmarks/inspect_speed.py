"""Speed of `gsae inspect --compare` on the default model: the site of a g-SAE and its TopK twin
(decoder cosine >= 0.999, as same-seed twins are) on held-out tokens, with the phases timed.

The SAEs are seeded random ones of the default shape (9,216 latents, k 32, layer 15) unless
folders are given; the site's work does not depend on how well an SAE was trained, only on how
many latents get pages. `--profile` prints the 25 most expensive calls. With `--old_src DIR`
(a `src` folder of an earlier gsae: `git archive ea28f3e src | tar -x -C /tmp/old` is the code
just before the browser's speed work), the same run is made with that code too, each in a
subprocess, alternating which goes first, and the wall and CPU times, their ratios (old / new)
and the load average before and after each run are printed: on a shared machine only the
ratio of runs made side by side is meaningful, and with one thread (OMP_NUM_THREADS=1) the
CPU time is the steadier measure of the work done.

    python benchmarks/inspect_speed.py [--tokens 4096] [--saes A B] [--profile]
        [--top_latents 32 --random_latents 32] [--old_src DIR --repeats 1] [--keep DIR]

`--keep DIR` leaves the site in DIR (a new folder), to compare what two versions wrote.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gsae import SAE, Provenance, SAEConfig, load
from gsae.browser import InspectConfig, inspect_contexts, site
from gsae.browser import steering as browser_steering
from gsae.browser.setup import held_out_contexts
from gsae.models import ModelConfig, load_model, model_identity
from gsae.text import DataConfig


def twins(model_cfg: ModelConfig, d_in: int) -> tuple[SAE, SAE]:
    """A g-SAE (beta 100) and a TopK SAE whose decoders are the g-SAE's plus 1% noise, the
    same in every process (seeded)."""
    meta = Provenance(hook="15", model=model_identity(model_cfg), skip_first=1)
    gsae = SAE(SAEConfig(n_latents=9216, k=32, beta=100.0, seed=0), d_in, provenance=meta)
    topk = SAE(SAEConfig(n_latents=9216, k=32, beta=0.0, seed=0), d_in, provenance=meta)
    topk.load_state_dict(gsae.state_dict())
    with torch.no_grad():
        noise = torch.randn(topk.W_dec.shape, generator=torch.Generator().manual_seed(1))
        topk.W_dec.add_(0.01 * noise * topk.W_dec.norm(dim=1).mean() / d_in ** 0.5)
    return gsae, topk


def timed_continuations(seconds: list[float]):
    original = browser_steering.continuations

    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--saes", nargs=2, metavar=("SAE", "COMPARE"))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top_latents", type=int, default=32)
    parser.add_argument("--random_latents", type=int, default=32)
    parser.add_argument("--old_src", help="an earlier gsae's src folder to time side by side")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", help="write the site into this new folder and keep it")
    args = parser.parse_args()
    if args.old_src:
        side_by_side(args)
        return
    model_cfg = ModelConfig()
    model, tokenizer = load_model(model_cfg)
    saes = (load(args.saes[0]), load(args.saes[1])) if args.saes else \
        twins(model_cfg, model.config.hidden_size)
    contexts = held_out_contexts(DataConfig(), tokenizer, args.tokens, 262_144, 0)
    steering = []
    site.continuations = timed_continuations(steering)
    profile = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory(prefix="inspect-speed-") as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        if profile:
            profile.enable()
        site_dir = Path(args.keep) if args.keep else Path(tmp) / "site"
        cfg = InspectConfig(out=str(site_dir), top_latents=args.top_latents,
                            random_latents=args.random_latents)
        inspect_contexts(saes[0], model, tokenizer, contexts, cfg, other=saes[1],
                         names=("gsae", "topk"))
        if profile:
            profile.disable()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        run = json.loads((site_dir / "latents.json").read_text())["run"]
        pages = [len(json.loads(f.read_text())["pages"])
                 for f in site_dir.rglob("latents.json")]
    print(f"{contexts.numel()} tokens, {torch.get_num_threads()} threads: {wall:.1f} s in all "
          f"(CPU {cpu:.1f} s), encoding {run['seconds_encoding']} s, "
          f"continuations {sum(steering):.1f} s, pages per SAE {pages}")
    print(json.dumps({"wall": wall, "cpu": cpu, "encoding": run["seconds_encoding"],
                      "continuations": sum(steering), "pages": pages}))
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)


def side_by_side(args: argparse.Namespace) -> None:
    """This run and the same with `--old_src`'s code, alternating; the wall and CPU seconds of
    each, the load average around each, and the ratios old / new of the mean times (with one
    thread, the CPU time depends less on what else the machine runs)."""
    flags = ["--tokens", str(args.tokens), "--top_latents", str(args.top_latents),
             "--random_latents", str(args.random_latents)]
    here = str(Path(__file__).resolve().parents[1] / "src")
    seconds: dict[str, dict[str, list[float]]] = {"new": {}, "old": {}}
    for repeat in range(args.repeats):
        order = [("new", here), ("old", args.old_src)]
        for name, src in order if repeat % 2 == 0 else order[::-1]:
            before = os.getloadavg()[0]
            done = subprocess.run([sys.executable, __file__, *flags], text=True,
                                  env={**os.environ, "PYTHONPATH": src},
                                  capture_output=True, check=True)
            *_, line, numbers = done.stdout.strip().splitlines()
            for kind in ("wall", "cpu"):
                seconds[name].setdefault(kind, []).append(json.loads(numbers)[kind])
            print(f"{name}: {line} (load average {before:.1f} before, "
                  f"{os.getloadavg()[0]:.1f} after)", flush=True)
    for kind in ("wall", "cpu"):
        old, new = (sum(seconds[n][kind]) / args.repeats for n in ("old", "new"))
        print(f"{kind}: old {old:.1f} s, new {new:.1f} s (mean of {args.repeats}): "
              f"{old / new:.2f}x faster")


if __name__ == "__main__":
    main()
