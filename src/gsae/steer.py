"""Steering evaluation: how much adding a latent's decoder direction to the residual stream moves
the model's output, in held-out contexts where the latent was not active.

Protocol (the README's steering section defines every number):

1. A pool of held-out contexts is run once to the hook; every SAE encodes it gradient-free
   (beta = 0 selection: steering has no labels). This gives each latent's firing count, its
   typical activation (mean of its non-zero values) and where it fired.
2. Two disjoint sets of contexts, A and B, are drawn from the pool (seeded), the same for every
   SAE; the same number of live latents is drawn from each SAE (seeded).
3. For each latent i and multiple m of its typical activation a_i, `m * a_i * d_i` is added to the
   hook's output at the SAE's data positions where latent i did not fire. On set A the
   `top_tokens` tokens with the largest mean log-probability gain are chosen ("promoted
   tokens"); on set B, at the same kind of positions, the mean log-probability gain of those
   tokens and the mean KL(steered || clean) are measured.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from gsae.config import validate
from gsae.errors import GsaeError
from gsae.evaluate import EvalConfig, eval_contexts, recorded_hook, sae_names
from gsae.hooks import (
    Intervention,
    Recording,
    SplitAtHook,
    add,
    hook_output_tensor,
    log_probs,
    replace_hook_output,
    resolve_hook,
)
from gsae.io import versions
from gsae.records import SteerRecord, SteerResult, SteerRunInfo
from gsae.sae import SAE
from gsae.source import ActivationSource, SourceConfig, training_positions
from gsae.text import DataConfig, corpus_identity

QUANTILES = {"q25": 0.25, "median": 0.5, "q75": 0.75}
METRICS = ("kl", "logprob_gain")
PROTOCOL = {
    "encoding": "gradient-free (beta = 0 selection on the SAE's weights): no labels exist when "
    "steering",
    "typical_activation": "mean of the latent's non-zero values over the data positions of the "
    "pool",
    "alpha": "multiple * typical_activation; the vector alpha * d_i (d_i the unit-norm decoder "
    "row) is added to the hook's output",
    "positions": "the SAE's data positions (skip_first <= t <= T-2, outliers excluded, as in "
    "training) where the latent was not selected with a value > 0; steered and measured there",
    "promoted_tokens": "the top_tokens vocabulary entries with the largest mean log-probability "
    "gain over the positions of set A",
    "logprob_gain": "mean over the positions of set B and the promoted tokens of "
    "log p_steered - log p_clean (nats)",
    "kl": "mean over the positions of set B of KL(p_steered || p_clean) (nats)",
}


@dataclass
class SteerConfig:
    """How many latents to steer, how hard, and in which held-out contexts."""

    latents: int = field(
        default=16, metadata={"help": "live latents sampled per SAE (the same count for all)",
                              "min": 1}
    )
    alphas: list[float] = field(
        default_factory=lambda: [1.0, 4.0],
        metadata={"help": "steering strengths, as multiples of each latent's typical activation",
                  "above": 0},
    )
    contexts: int = field(
        default=4,
        metadata={"help": "contexts in each of the two disjoint sets (A picks the promoted "
                  "tokens, B measures)", "min": 1},
    )
    pool: int = field(
        default=64,
        metadata={"help": "held-out contexts encoded to find each latent's typical activation "
                  "and where it fires; A and B are drawn from them", "min": 2},
    )
    context_size: int = field(
        default=64, metadata={"help": "tokens per steering context (0: the corpus setting)",
                              "min": 0}
    )
    top_tokens: int = field(
        default=10, metadata={"help": "promoted tokens chosen per latent and strength", "min": 1}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the contexts and of the latent sample"}
    )
    batch_size: int = field(
        default=8, metadata={"help": "contexts per language-model forward pass", "min": 1}
    )

    def check(self) -> None:
        """The rule between settings that `gsae.config.validate` adds to the fields' bounds."""
        if self.context_size == 1:
            raise GsaeError("--steer.context_size 1 leaves no position to steer at: give 0 (the "
                            "corpus's context size) or at least 2")

    def check_sets(self) -> None:
        """The rule of the sampled evaluation (not of steering one latent on a prompt, which
        draws no sets): the pool holds both sets of contexts. `SteeringRun.check` runs it
        without --latent; the studies' runners, `steer` and `steer_on` after `validate`."""
        if self.pool < 2 * self.contexts:
            raise GsaeError(f"pool ({self.pool}) must hold the two sets of contexts "
                            f"({self.contexts} contexts each)")


# Public entry points ----------------------------------------------------------------------------


def steer(
    saes: Sequence[SAE], model: nn.Module, tokenizer: PreTrainedTokenizerBase,
    data_cfg: DataConfig, cfg: SteerConfig, names: Sequence[str] | None = None,
    model_id: dict[str, Any] | None = None, above_hook: bool = True,
) -> SteerResult:
    """Steer with `saes` in contexts of the evaluation split of `data_cfg`'s corpus, cut to
    `context_size` tokens; the pool is a seeded sample of them (as `eval_contexts`)."""
    validate(cfg)
    cfg.check_sets()
    data = replace(data_cfg, context_size=cfg.context_size or data_cfg.context_size)
    pool_cfg = EvalConfig(eval_tokens=cfg.pool * data.context_size, seed=cfg.seed)
    pool = eval_contexts(data, tokenizer, pool_cfg)
    result = steer_on(saes, model, pool, cfg, names, model_id, tokenizer, above_hook)
    result.run.corpus = corpus_identity(data)
    return result


def steer_on(
    saes: Sequence[SAE], model: nn.Module, pool: Tensor, cfg: SteerConfig,
    names: Sequence[str] | None = None, model_id: dict[str, Any] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None, above_hook: bool = True,
) -> SteerResult:
    """The steering evaluation of `saes` (any hooks of this one model) on a pool of token
    contexts [n, T]: one record per SAE with a summary per strength and the per-latent records;
    `tokenizer`, if given, spells the promoted tokens. Steered passes run only the blocks above
    each hook where the model allows (`gsae.hooks`); `above_hook=False` runs the whole model."""
    validate(cfg)
    cfg.check_sets()
    names = sae_names(saes, names)
    if pool.ndim != 2 or pool.shape[0] < 2 * cfg.contexts:
        raise GsaeError(f"the pool has {pool.shape[0] if pool.ndim == 2 else 0} contexts; "
                        f"{2 * cfg.contexts} are needed (two sets of `contexts`)")
    if cfg.top_tokens > (vocab := _vocab_size(model)):
        raise GsaeError(f"top_tokens is {cfg.top_tokens}: it must be at most the model's "
                        f"vocabulary size, {vocab}")
    start = time.perf_counter()
    device = next(model.parameters()).device
    pool = pool.to(device)
    order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    sets = {"a": order[: cfg.contexts].sort().values,
            "b": order[cfg.contexts : 2 * cfg.contexts].sort().values}
    members = [_SteeredSAE(sae, name, model) for sae, name in zip(saes, names)]
    for member in members:
        if not 0 <= member.skip_first < pool.shape[1] - 1:
            raise GsaeError(f"contexts of {pool.shape[1]} tokens leave no position to steer "
                            f"after skipping the first {member.skip_first}")
    _pool_pass(model, pool, members, cfg.batch_size)
    interventions = {m.hook: Intervention(model, m.module, above_hook) for m in members}
    clean = {name: _clean_pass(model, pool[idx], interventions) for name, idx in sets.items()}
    bar = tqdm(total=len(members), desc="steer", unit="SAE", dynamic_ncols=True)
    results = []
    for member in members:
        runs = {name: (clean[name][0], clean[name][1][member.hook]) for name in sets}
        results.append(member.steer(runs, sets, cfg, tokenizer))
        bar.update()
    bar.close()
    run = SteerRunInfo(
        model=model_id if model_id is not None else next(
            (s.provenance.model for s in saes if s.provenance.model), {}),
        corpus=None,
        part="eval",
        pool_contexts=pool.shape[0],
        context_size=pool.shape[1],
        contexts_a=sets["a"].tolist(),
        contexts_b=sets["b"].tolist(),
        settings=asdict(cfg),
        protocol=PROTOCOL,
        model_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        device=str(device),
        versions=versions(),
        seconds=round(time.perf_counter() - start, 1),
        forward={hook: intervention.forward for hook, intervention in interventions.items()},
    )
    return SteerResult(run, results)


def format_table(result: SteerResult) -> str:
    """One line per SAE and strength: latents measured, median [q25, q75] of KL and gain."""
    width = max([3, *(len(record.sae) for record in result.results)])
    lines = [f"{'SAE':<{width}} {'alpha x':>7} {'latents':>7} {'KL(steered||clean)':>26} "
             f"{'log-prob gain of promoted':>26}"]
    for record in result.results:
        for row in record.summary:
            cells = [f"{s['median']:.4g} [{s['q25']:.3g}, {s['q75']:.3g}]" if s else "-"
                     for s in (row["kl"], row["logprob_gain"])]
            lines.append(f"{record.sae:<{width}} {row['alpha_multiple']:>7g} "
                         f"{row['latents']:>7} {cells[0]:>26} {cells[1]:>26}")
    run = result.run
    lines.insert(0, f"{run.pool_contexts} pool contexts x {run.context_size} tokens, sets A "
                    f"and B of {len(run.contexts_a)} contexts, {run.seconds} s; "
                    "median [quartiles] over latents, nats")
    return "\n".join(lines)


def summarize(values: Sequence[float | None]) -> dict[str, float] | None:
    """Mean, quartiles, min and max of the measured values (None entries left out)."""
    kept = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
    if kept.numel() == 0:
        return None
    stats = {"mean": kept.mean().item(), "min": kept.min().item(), "max": kept.max().item()}
    stats.update({name: torch.quantile(kept, q).item() for name, q in QUANTILES.items()})
    return stats


# Steering one latent on a prompt ---------------------------------------------------------------


@dataclass
class PromptSteering:
    """Greedy continuations of one prompt with one latent steered at several strengths."""

    sae: str
    latent: int
    typical_activation: float  # mean of its non-zero values over the pool, gradient-free
    pool_tokens: int
    prompt: str
    continuations: list[dict[str, Any]]  # {"multiple", "alpha", "text"}; multiple 0 is clean


def typical_activations(sae: SAE, model: nn.Module, pool: Tensor, batch_size: int = 8,
                        name: str = "the SAE") -> tuple[Tensor, int]:
    """Per latent, the mean of its non-zero values under gradient-free selection over the data
    positions of the pool contexts [n, T] (NaN where it never fires), and the tokens encoded."""
    member = _SteeredSAE(sae, name, model)
    _pool_pass(model, pool, [member], batch_size)
    typical = member.value_sum / member.fired
    return typical.where(member.fired > 0, torch.full_like(typical, float("nan"))), member.rows


def check_latent(sae: SAE, latent: int, name: str = "the SAE") -> None:
    """Refuse a latent index the SAE does not have."""
    if not 0 <= latent < sae.n_latents:
        raise GsaeError(f"latent {latent} does not exist: {name} has latents 0 to "
                        f"{sae.n_latents - 1}")


def steer_prompt(sae: SAE, model: nn.Module, tokenizer: PreTrainedTokenizerBase, latent: int,
                 prompt: str, multiples: Sequence[float], new_tokens: int,
                 typical: float, name: str = "the SAE", pool_tokens: int = 0) -> PromptSteering:
    """Greedy continuations of `prompt` with `m * typical * d_latent` added at the SAE's hook
    from position skip_first on, for m = 0 (clean) and every multiple."""
    check_latent(sae, latent, name)
    ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    if ids.numel() == 0:
        raise GsaeError("the prompt is empty: give some text to continue")
    _, module = resolve_hook(model, recorded_hook(sae, name))
    chosen = [0.0, *[m for m in multiples if m != 0]]
    direction = sae.W_dec.detach().float().cpu()[latent]
    vectors = torch.stack([m * typical * direction for m in chosen])
    rows = greedy(model, module, ids, vectors, sae.provenance.skip_first, new_tokens)
    texts = [tokenizer.decode(row.tolist()) for row in rows]
    return PromptSteering(name, latent, typical, pool_tokens, prompt, [
        {"multiple": m, "alpha": m * typical, "text": text} for m, text in zip(chosen, texts)])


def format_prompt_steering(result: PromptSteering) -> str:
    """The continuations, one line per strength."""
    lines = [f"{result.sae}: latent {result.latent}, typical activation "
             f"{result.typical_activation:.4g} (gradient-free, over {result.pool_tokens} "
             f"held-out tokens); greedy continuations of {result.prompt!r}"]
    for c in result.continuations:
        label = "clean" if c["multiple"] == 0 else f"{c['multiple']:g}x = {c['alpha']:.4g}"
        lines.append(f"  {label:>16}: {c['text']!r}")
    return "\n".join(lines)


@torch.no_grad()
def greedy(model: nn.Module, module: nn.Module, prompt: Tensor, vectors: Tensor,
           skip_first: int, new_tokens: int) -> Tensor:
    """Greedy continuations [R, new_tokens] of the prompt ids [P] (or one prompt per row,
    [R, P], all of one length), one row per vector [R, d] added to `module`'s output from
    position `skip_first` on. Uses the KV cache. Where the blocks above the hook can run on
    their own (`gsae.hooks.SplitAtHook`), the blocks up to the hook run once per distinct
    token history (the vectors change nothing below the hook): once per prompt, then once
    per distinct continuation so far."""
    device = next(model.parameters()).device
    rows = vectors.shape[0]
    tokens = (prompt if prompt.ndim == 2 else prompt[None].repeat(rows, 1)).to(device)
    vectors = vectors.to(device)
    offset = [0]

    def steer(h: Tensor) -> Tensor:
        positions = torch.arange(offset[0], offset[0] + h.shape[1], device=h.device)
        return h + (vectors[:, None, :] * (positions >= skip_first)[None, :, None]).to(h.dtype)

    split = SplitAtHook(model, module)
    if not split.available:
        return _greedy_all_rows(model, module, tokens, steer, offset, new_tokens)
    split.patch = steer
    return _greedy_split(model, split, tokens, offset, new_tokens)


def _greedy_split(model: nn.Module, split: SplitAtHook, tokens: Tensor, offset: list[int],
                  new_tokens: int) -> Tensor:
    """`greedy` with the blocks up to the hook run once per distinct token history: the
    prompts [R, P] first, then at each step (history, new token) pairs, the lower blocks'
    cache rows following their histories."""
    below, owner = torch.unique(tokens, dim=0, return_inverse=True)
    split.route(owner)
    with split.hooked():
        out = model(input_ids=below, use_cache=True, **_last_logits_only(model))
        generated = [out.logits[:, -1].argmax(-1)]
        for step in range(new_tokens - 1):
            offset[0] = tokens.shape[1] + step
            vocab = out.logits.shape[-1]
            histories, owner = torch.unique(split.owner * vocab + generated[-1],
                                            return_inverse=True)
            cache = _cache_argument(model, out)
            split.select_below(next(iter(cache.values())), histories // vocab)
            split.route(owner)
            out = model(input_ids=(histories % vocab)[:, None], use_cache=True, **cache)
            generated.append(out.logits[:, -1].argmax(-1))
    return torch.stack(generated, dim=1).cpu()


def _greedy_all_rows(model: nn.Module, module: nn.Module, tokens: Tensor,
                     steer: Callable[[Tensor], Tensor], offset: list[int], new_tokens: int
                     ) -> Tensor:
    """`greedy` with every row run through the whole model (a forward hook patches `module`'s
    output with `steer`)."""

    def add(_module, _inputs, output):
        return replace_hook_output(output, steer(hook_output_tensor(output)))

    handle = module.register_forward_hook(add)
    try:
        out = model(input_ids=tokens, use_cache=True, **_last_logits_only(model))
        generated = [out.logits[:, -1].argmax(-1)]
        for step in range(new_tokens - 1):
            offset[0] = tokens.shape[1] + step
            out = model(input_ids=generated[-1][:, None], use_cache=True,
                        **_cache_argument(model, out))
            generated.append(out.logits[:, -1].argmax(-1))
    finally:
        handle.remove()
    return torch.stack(generated, dim=1).cpu()


def _last_logits_only(model: nn.Module) -> dict:
    """Ask for the last position's logits only, where the model's forward can."""
    return {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _cache_argument(model: nn.Module, out) -> dict:
    """The KV cache of `out` as the forward argument this transformers version names."""
    if _accepts(model, "cache"):
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}



# The SAE under test ------------------------------------------------------------------------------


class _SteeredSAE:
    """One SAE: its hook, data settings, and what the pool pass found about its latents."""

    def __init__(self, sae: SAE, name: str, model: nn.Module):
        self.sae, self.name = sae, name
        self.hook, self.module = resolve_hook(model, recorded_hook(sae, name))
        self.skip_first = sae.provenance.skip_first
        self.outlier_factor = sae.provenance.outlier_factor
        self.fired = torch.zeros(sae.n_latents, dtype=torch.float64)
        self.value_sum = torch.zeros(sae.n_latents, dtype=torch.float64)
        self.rows = 0
        self.norms: list[Tensor] = []
        self.mask: list[Tensor] = []  # per pool batch: [B, T] data positions
        self.active: list[Tensor] = []  # per pool batch: [B, T, k] fired latents, -1 elsewhere

    def add(self, x: Tensor) -> None:
        """Encode one pool batch of hook outputs [B, T, d] gradient-free and tally it."""
        mask, _ = training_positions(x, self.skip_first, self.outlier_factor)
        rows = x[mask].to(self.sae.W_dec.device, self.sae.W_dec.dtype)
        values, indices, _ = self.sae.encode(rows)
        values, indices = values.detach().cpu().double(), indices.cpu()
        fired = values > 0
        self.fired += torch.bincount(indices[fired], minlength=self.sae.n_latents)
        self.value_sum += torch.bincount(indices[fired], values[fired],
                                         minlength=self.sae.n_latents)
        self.rows += rows.shape[0]
        self.norms.append(rows.float().norm(dim=1).cpu())
        active = torch.full((*mask.shape, indices.shape[1]), -1, dtype=torch.long)
        active[mask.cpu()] = indices.masked_fill(~fired, -1)
        self.mask.append(mask.cpu())
        self.active.append(active)

    def sample(self, cfg: SteerConfig) -> Tensor:
        """The latents to steer: a seeded sample of `latents` live latents, sorted."""
        live = (self.fired > 0).nonzero()[:, 0]
        gen = torch.Generator().manual_seed(cfg.seed)
        return live[torch.randperm(live.numel(), generator=gen)[: cfg.latents]].sort().values

    def steer(self, runs: dict[str, tuple[Tensor, Recording]], sets: dict[str, Tensor],
              cfg: SteerConfig, tokenizer: PreTrainedTokenizerBase | None) -> SteerRecord:
        """Steer every sampled latent at every strength; the SAE's result record. `runs` holds
        per set its clean log-probabilities and its recorded clean pass at this SAE's hook."""
        mask, active = torch.cat(self.mask), torch.cat(self.active)
        typical = self.value_sum / self.fired.clamp_min(1)
        latents = self.sample(cfg)
        jobs = [(int(i), m) for i in latents for m in cfg.alphas]
        where = {name: [mask[idx] & ~(active[idx] == i).any(-1) for i, _ in jobs]
                 for name, idx in sets.items()}
        direction = self.sae.W_dec.detach().float()
        vectors = [m * typical[i].item() * direction[i] for i, m in jobs]
        promoted = _steered_gains(*runs["a"], vectors, where["a"], cfg, top_tokens=cfg.top_tokens)
        measured = _steered_gains(*runs["b"], vectors, where["b"], cfg,
                                  promoted=[p["tokens"] for p in promoted])
        records = []
        for j, (i, m) in enumerate(jobs):
            tokens = promoted[j]["tokens"]
            records.append({
                "latent": i,
                "firing_frequency": self.fired[i].item() / self.rows,
                "typical_activation": typical[i].item(),
                "alpha_multiple": m,
                "alpha": m * typical[i].item(),
                "positions_a": int(where["a"][j].sum()),
                "positions_b": int(where["b"][j].sum()),
                "kl": measured[j]["kl"],
                "logprob_gain": measured[j]["gain"],
                "selection_gain": promoted[j]["gain"],
                "promoted_tokens": tokens,
                "promoted": [tokenizer.decode([t]) for t in tokens] if tokenizer else None,
            })
        sae = self.sae
        return SteerRecord(
            sae=self.name,
            hook=self.hook,
            k=sae.k,
            beta=sae.beta,
            value_mode=sae.cfg.value_mode,
            n_latents=sae.n_latents,
            d_in=sae.d_in,
            pool_tokens=self.rows,
            live_latents=int((self.fired > 0).sum()),
            sampled_latents=latents.numel(),
            median_x_norm=torch.cat(self.norms).median().item(),
            summary=[
                {"alpha_multiple": m, "latents": sum(r["kl"] is not None for r in rows),
                 **{key: summarize([r[key] for r in rows]) for key in METRICS},
                 "typical_activation": summarize([r["typical_activation"] for r in rows])}
                for m in cfg.alphas
                for rows in [[r for r in records if r["alpha_multiple"] == m]]
            ],
            latents=records,
        )


# Forward passes ---------------------------------------------------------------------------------


def _pool_pass(model: nn.Module, pool: Tensor, members: list[_SteeredSAE], batch_size: int
               ) -> None:
    """Run the pool to the last hook once and let every SAE encode its hook's activations."""
    hooks = list(dict.fromkeys(m.hook for m in members))
    source = ActivationSource(model, SourceConfig(hooks=hooks), with_grad=False)
    for tokens in tqdm(pool.split(batch_size), desc="steer: pool", unit="batch", leave=False,
                       dynamic_ncols=True):
        states = source.hidden_states(tokens)
        with torch.no_grad():
            for member in members:
                member.add(states[member.hook][0])


@torch.no_grad()
def _clean_pass(model: nn.Module, tokens: Tensor, interventions: dict[str, Intervention]
                ) -> tuple[Tensor, dict[str, Recording]]:
    """Float32 log-probabilities [n, T, V] of the clean model on one set of contexts (one
    batch: the steered passes repeat it), and the set's recorded clean pass at every hook."""
    with ExitStack() as stack:
        runs = {hook: stack.enter_context(intervention.record(tokens))
                for hook, intervention in interventions.items()}
        logits = model(input_ids=tokens, use_cache=False).logits
    return log_probs(logits), runs


@torch.no_grad()
def _steered_gains(
    clean: Tensor, recording: Recording, vectors: list[Tensor], where: list[Tensor],
    cfg: SteerConfig, top_tokens: int = 0, promoted: list[list[int]] | None = None,
) -> list[dict[str, Any]]:
    """Steer the recorded contexts [c, T] with each vector (added at its [c, T] mask) and compare
    with the clean log-probabilities [c, T, V] at the masked positions.

    With `top_tokens`, returns per vector the tokens with the largest mean log-probability gain
    ("tokens") and that mean gain ("gain"); with `promoted` (token ids per vector), the mean
    gain of those tokens ("gain") and the mean KL(steered || clean) ("kl"). Several vectors share
    one forward pass (one vector per group of c rows). A vector with no position (or, measuring,
    no promoted token because it had no position in the first set) gets None."""
    tokens = recording.tokens
    c = tokens.shape[0]
    per_pass = max(1, cfg.batch_size // c)
    out: list[dict[str, Any]] = []
    for first in range(0, len(vectors), per_pass):
        group = range(first, min(first + per_pass, len(vectors)))
        masks = torch.stack([where[j] for j in group]).to(tokens.device)  # [G, c, T]
        stacked = torch.stack([vectors[j] for j in group]).to(tokens.device)  # [G, d]
        delta = masks[..., None] * stacked[:, None, None, :]
        logp = log_probs(recording.logits(add(delta.flatten(0, 1)), repeat=len(group)))
        for g, j in enumerate(group):
            m = masks[g]
            if not m.any() or (promoted is not None and not promoted[j]):
                out.append({"tokens": [], "gain": None, "kl": None})
                continue
            steered = logp[g * c : (g + 1) * c][m]  # [P, V]
            diff = steered - clean[m]
            if promoted is None:
                gain, ids = diff.mean(0).topk(top_tokens)
                out.append({"tokens": ids.tolist(), "gain": gain.mean().item()})
            else:
                ids = torch.tensor(promoted[j], dtype=torch.long, device=diff.device)
                kl = (steered.exp() * diff).sum(-1)
                out.append({"gain": diff[:, ids].mean().item(), "kl": kl.mean().item()})
    return out


def _vocab_size(model: nn.Module) -> int:
    """The width of the model's logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return weight.shape[0] if weight is not None else model.config.get_text_config().vocab_size
