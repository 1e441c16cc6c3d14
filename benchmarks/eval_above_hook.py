"""Speed of one more SAE-mode in `gsae eval`: a spliced pass through the whole model against one
through the blocks above the hook only, measured side by side in one run.

For each held-out batch, one clean pass records what both paths need; then a stand-in
reconstruction (the clean activation plus noise, at the SAE's data positions) is spliced in
and scored (CE and KL against the clean model, as `gsae eval` does per SAE and mode), on each
path in turn, alternating which path goes first. Prints the median seconds per spliced pass
(forward alone, and forward plus scoring) of each path and their ratio, and checks that both
paths give the same logits. It also times the full path with the earlier whole-batch scoring
(the cost of each SAE-mode before the above-hook path and the blockwise scoring) and checks
how far apart the two scorings' numbers are (float32 summation order).

    python benchmarks/eval_above_hook.py [--model smollm2-135m] [--hook 15] [--batches 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from gsae.evaluate import EvalConfig, _Clean, eval_contexts
from gsae.hooks import Intervention, Patch, Recording, log_probs, resolve_hook, splice
from gsae.models import ModelConfig, load_model
from gsae.source import training_positions
from gsae.text import DataConfig


def timed(run: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


def spliced_pass(run: Recording, patch: Patch, clean: _Clean | None = None) -> object:
    """One spliced forward, and with `clean` its CE and KL scoring as `gsae eval` does it."""
    logits = run.logits(patch)
    return clean.compare(logits) if clean is not None else logits


def whole_batch_scoring(clean: _Clean, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE and KL as `gsae eval` scored them before scoring went a few positions at a time: the
    same operations on the whole [B, P, vocabulary] batch at once."""
    logp = log_probs(logits[:, clean.skip_first : -1])
    ce = -logp.gather(-1, clean.targets).squeeze(-1)
    return ce, logp.neg_().add_(clean.logp).mul_(clean.p).sum(-1)


def earlier_pass(run: Recording, patch: Patch, clean: _Clean) -> object:
    """The full forward with the earlier whole-batch scoring: each SAE-mode's cost before the
    above-hook path and the blockwise scoring."""
    return whole_batch_scoring(clean, run.logits(patch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="15")
    parser.add_argument("--batches", type=int, default=4, help="held-out batches of 8 contexts")
    parser.add_argument("--repeats", type=int, default=3, help="spliced passes per batch and path")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelConfig(model=args.model))
    name, module = resolve_hook(model, args.hook)
    paths = {"full": Intervention(model, module, above_hook=False),
             "above-hook": Intervention(model, module)}
    data = DataConfig()
    contexts = eval_contexts(data, tokenizer, EvalConfig(eval_tokens=8 * args.batches
                                                         * data.context_size))
    forward: dict[str, list[float]] = {path: [] for path in paths}
    scored: dict[str, list[float]] = {path: [] for path in paths}
    earlier: list[float] = []
    worst = worst_score = 0.0
    gen = torch.Generator().manual_seed(0)
    for b, tokens in enumerate(contexts.split(8)):
        with torch.no_grad(), paths["full"].record(tokens) as full, \
                paths["above-hook"].record(tokens) as above:
            logits = model(input_ids=tokens, use_cache=False).logits
        clean = _Clean(logits, tokens, skip_first=1)
        mask, _ = training_positions(full.hidden, 1, 5.0)
        x = full.hidden[mask]
        noise = torch.randn(x.shape, generator=gen) / x.shape[1] ** 0.5
        rows = x + 0.1 * x.norm(dim=1, keepdim=True) * noise  # a reconstruction at FVU ~ 0.01
        patch = splice(mask, rows)
        runs = {"full": full, "above-hook": above}
        worst = max(worst, (full.logits(patch) - above.logits(patch)).abs().max().item())
        now, before = clean.compare(full.logits(patch)), earlier_pass(full, patch, clean)
        worst_score = max(worst_score, *((a - b).abs().max().item() for a, b in zip(now, before)))
        for r in range(args.repeats):
            for path in (paths if (b + r) % 2 == 0 else reversed(list(paths))):
                forward[path].append(timed(spliced_pass, runs[path], patch))
                scored[path].append(timed(spliced_pass, runs[path], patch, clean))
            earlier.append(timed(earlier_pass, full, patch, clean))
    print(f"model {args.model!r}, hook {name} ({paths['above-hook'].forward} path available), "
          f"{contexts.shape[0]} contexts x {contexts.shape[1]} tokens in batches of 8, "
          f"{args.repeats} spliced passes per batch and path, {torch.get_num_threads()} threads")
    print(f"largest |logit difference| between the paths: {worst:.2e}; largest |CE or KL "
          f"difference| between blockwise and whole-batch scoring: {worst_score:.2e}")
    for title, times in (("spliced forward", forward), ("spliced forward + CE/KL scoring", scored)):
        full_s, above_s = (statistics.median(times[p]) for p in ("full", "above-hook"))
        print(f"{title:<34} full {full_s:7.3f} s   above-hook {above_s:7.3f} s   "
              f"ratio {above_s / full_s:.3f}")
    before, above_s = statistics.median(earlier), statistics.median(scored["above-hook"])
    print(f"{'earlier: full + whole-batch scoring':<34} full {before:7.3f} s   above-hook "
          f"{above_s:7.3f} s   ratio {above_s / before:.3f} (each SAE-mode now against then; "
          f"target <= 0.55: {'met' if above_s / before <= 0.55 else 'NOT met'})")


if __name__ == "__main__":
    main()
