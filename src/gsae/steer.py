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
   `steer_top_tokens` tokens with the largest mean log-probability gain are chosen ("promoted
   tokens"); on set B, at the same kind of positions, the mean log-probability gain of those
   tokens and the mean KL(steered || clean) are measured.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

import gsae
from gsae.errors import GsaeError
from gsae.evaluate import EvalConfig, eval_contexts
from gsae.models import hook_output_tensor, replace_hook_output, resolve_hook
from gsae.sae import SAE
from gsae.source import ActivationSource, SourceConfig, training_positions
from gsae.text import DataConfig, corpus_identity

SCHEMA = "gsae.steer/1"
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

    steer_latents: int = field(
        default=16, metadata={"help": "live latents sampled per SAE (the same count for all)"}
    )
    steer_alphas: list[float] = field(
        default_factory=lambda: [1.0, 4.0],
        metadata={"help": "steering strengths, as multiples of each latent's typical activation"},
    )
    steer_contexts: int = field(
        default=4,
        metadata={"help": "contexts in each of the two disjoint sets (A picks the promoted "
                  "tokens, B measures)"},
    )
    steer_pool: int = field(
        default=64,
        metadata={"help": "held-out contexts encoded to find each latent's typical activation "
                  "and where it fires; A and B are drawn from them"},
    )
    steer_context_size: int = field(
        default=64, metadata={"help": "tokens per steering context (0: the corpus setting)"}
    )
    steer_top_tokens: int = field(
        default=10, metadata={"help": "promoted tokens chosen per latent and strength"}
    )
    steer_seed: int = field(
        default=0, metadata={"help": "seed of the contexts and of the latent sample"}
    )
    steer_batch_size: int = field(
        default=8, metadata={"help": "contexts per language-model forward pass"}
    )

    def validate(self) -> None:
        """Raise GsaeError if the settings cannot make a steering run."""
        for name in ("steer_latents", "steer_contexts", "steer_top_tokens", "steer_batch_size"):
            if getattr(self, name) < 1:
                raise GsaeError(f"{name} is {getattr(self, name)}: it must be at least 1")
        if not self.steer_alphas or any(not a > 0 for a in self.steer_alphas):
            raise GsaeError(f"steer_alphas must be positive numbers, got {self.steer_alphas}")
        if self.steer_pool < 2 * self.steer_contexts:
            raise GsaeError(f"steer_pool ({self.steer_pool}) must hold the two sets of "
                            f"steer_contexts ({self.steer_contexts}) contexts each")


# Public entry points ----------------------------------------------------------------------------


def steer(
    saes: Sequence[SAE], model: nn.Module, tokenizer: PreTrainedTokenizerBase,
    data_cfg: DataConfig, cfg: SteerConfig, names: Sequence[str] | None = None,
    model_id: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Steer with `saes` in contexts of the evaluation split of `data_cfg`'s corpus, cut to
    `steer_context_size` tokens; the pool is a seeded sample of them (as `eval_contexts`)."""
    cfg.validate()
    data = replace(data_cfg, context_size=cfg.steer_context_size or data_cfg.context_size)
    pool_cfg = EvalConfig(eval_tokens=cfg.steer_pool * data.context_size, seed=cfg.steer_seed)
    pool = eval_contexts(data, tokenizer, pool_cfg)
    result = steer_on(saes, model, pool, cfg, names, model_id, tokenizer)
    result["run"]["corpus"] = corpus_identity(data)
    return result


def steer_on(
    saes: Sequence[SAE], model: nn.Module, pool: Tensor, cfg: SteerConfig,
    names: Sequence[str] | None = None, model_id: dict[str, Any] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    """The steering evaluation of `saes` (any hooks of this one model) on a pool of token
    contexts [n, T]. Returns {"schema", "run", "results": one record per SAE with a summary per
    strength and the per-latent records}; `tokenizer`, if given, spells the promoted tokens."""
    cfg.validate()
    names = list(names) if names is not None else [f"sae{i}" for i in range(len(saes))]
    if not saes or len(names) != len(saes) or len(set(names)) != len(names):
        raise GsaeError(f"steering needs SAEs and a distinct name for each, got {len(saes)} "
                        f"SAEs and the names {names}")
    if pool.ndim != 2 or pool.shape[0] < 2 * cfg.steer_contexts:
        raise GsaeError(f"the pool has {pool.shape[0] if pool.ndim == 2 else 0} contexts; "
                        f"{2 * cfg.steer_contexts} are needed (two sets of steer_contexts)")
    start = time.perf_counter()
    device = next(model.parameters()).device
    pool = pool.to(device)
    order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(cfg.steer_seed))
    sets = {"a": order[: cfg.steer_contexts].sort().values,
            "b": order[cfg.steer_contexts : 2 * cfg.steer_contexts].sort().values}
    members = [_Member(sae, name, model) for sae, name in zip(saes, names)]
    for member in members:
        if not 0 <= member.skip_first < pool.shape[1] - 1:
            raise GsaeError(f"contexts of {pool.shape[1]} tokens leave no position to steer "
                            f"after skipping the first {member.skip_first}")
    _pool_pass(model, pool, members, cfg.steer_batch_size)
    clean = {name: _clean_log_probs(model, pool[idx], cfg.steer_batch_size)
             for name, idx in sets.items()}
    bar = tqdm(total=len(members), desc="steer", unit="SAE", dynamic_ncols=True)
    results = []
    for member in members:
        results.append(member.steer(model, pool, sets, clean, cfg, tokenizer))
        bar.update()
    bar.close()
    run = {
        "model": model_id if model_id is not None else next(
            (s.metadata["model"] for s in saes if s.metadata.get("model")), {}),
        "corpus": None,
        "part": "eval",
        "pool_contexts": pool.shape[0],
        "context_size": pool.shape[1],
        "contexts_a": sets["a"].tolist(),
        "contexts_b": sets["b"].tolist(),
        "settings": asdict(cfg),
        "protocol": PROTOCOL,
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(device),
        "versions": {"gsae": gsae.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "seconds": round(time.perf_counter() - start, 1),
    }
    return {"schema": SCHEMA, "run": run, "results": results}


def format_table(result: dict[str, Any]) -> str:
    """One line per SAE and strength: latents measured, median [q25, q75] of KL and gain."""
    lines = [f"{'SAE':<48} {'alpha x':>7} {'latents':>7} {'KL(steered||clean)':>26} "
             f"{'log-prob gain of promoted':>26}"]
    for record in result["results"]:
        for row in record["summary"]:
            cells = [f"{s['median']:.4g} [{s['q25']:.3g}, {s['q75']:.3g}]" if s else "-"
                     for s in (row["kl"], row["logprob_gain"])]
            lines.append(f"{record['sae'][-48:]:<48} {row['alpha_multiple']:>7g} "
                         f"{row['latents']:>7} {cells[0]:>26} {cells[1]:>26}")
    run = result["run"]
    lines.insert(0, f"{run['pool_contexts']} pool contexts x {run['context_size']} tokens, sets A "
                    f"and B of {len(run['contexts_a'])} contexts, {run['seconds']} s; "
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


# The SAE under test ------------------------------------------------------------------------------


class _Member:
    """One SAE: its hook, data settings, and what the pool pass found about its latents."""

    def __init__(self, sae: SAE, name: str, model: nn.Module):
        if "hook" not in sae.metadata:
            raise GsaeError(f"SAE {name!r} has no hook point in its metadata")
        self.sae, self.name = sae, name
        self.hook, self.module = resolve_hook(model, sae.metadata["hook"])
        self.skip_first = int(sae.metadata.get("skip_first", SourceConfig.skip_first))
        self.outlier_factor = float(sae.metadata.get("outlier_factor",
                                                     SourceConfig.outlier_factor))
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
        """The latents to steer: a seeded sample of `steer_latents` live latents, sorted."""
        live = (self.fired > 0).nonzero()[:, 0]
        gen = torch.Generator().manual_seed(cfg.steer_seed)
        return live[torch.randperm(live.numel(), generator=gen)[: cfg.steer_latents]].sort().values

    def steer(self, model: nn.Module, pool: Tensor, sets: dict[str, Tensor],
              clean: dict[str, Tensor], cfg: SteerConfig,
              tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]:
        """Steer every sampled latent at every strength; the SAE's result record."""
        mask, active = torch.cat(self.mask), torch.cat(self.active)
        typical = self.value_sum / self.fired.clamp_min(1)
        latents = self.sample(cfg)
        jobs = [(int(i), m) for i in latents for m in cfg.steer_alphas]
        where = {name: [mask[idx] & ~(active[idx] == i).any(-1) for i, _ in jobs]
                 for name, idx in sets.items()}
        direction = self.sae.W_dec.detach().float()
        vectors = [m * typical[i].item() * direction[i] for i, m in jobs]
        promoted = _steered_gains(model, self.module, pool[sets["a"]], clean["a"], vectors,
                                  where["a"], cfg, top_tokens=cfg.steer_top_tokens)
        measured = _steered_gains(model, self.module, pool[sets["b"]], clean["b"], vectors,
                                  where["b"], cfg, promoted=[p["tokens"] for p in promoted])
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
        return {
            "sae": self.name,
            "hook": self.hook,
            "k": sae.k,
            "beta": sae.beta,
            "value_mode": sae.cfg.value_mode,
            "n_latents": sae.n_latents,
            "d_in": sae.d_in,
            "pool_tokens": self.rows,
            "live_latents": int((self.fired > 0).sum()),
            "sampled_latents": latents.numel(),
            "median_x_norm": torch.cat(self.norms).median().item(),
            "summary": [
                {"alpha_multiple": m, "latents": sum(r["kl"] is not None for r in rows),
                 **{key: summarize([r[key] for r in rows]) for key in METRICS},
                 "typical_activation": summarize([r["typical_activation"] for r in rows])}
                for m in cfg.steer_alphas
                for rows in [[r for r in records if r["alpha_multiple"] == m]]
            ],
            "latents": records,
        }


# Forward passes ---------------------------------------------------------------------------------


def _pool_pass(model: nn.Module, pool: Tensor, members: list[_Member], batch_size: int) -> None:
    """Run the pool to the last hook once and let every SAE encode its hook's activations."""
    hooks = list(dict.fromkeys(m.hook for m in members))
    source = ActivationSource(model, SourceConfig(hooks=hooks), with_grad=False)
    for tokens in tqdm(pool.split(batch_size), desc="steer: pool", unit="batch", leave=False,
                       dynamic_ncols=True):
        states = source.hidden_states(tokens)
        with torch.no_grad():
            for member in members:
                member.add(states[member.hook][0])


def _log_probs(logits: Tensor) -> Tensor:
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def _clean_log_probs(model: nn.Module, tokens: Tensor, batch_size: int) -> Tensor:
    """Float32 log-probabilities [n, T, V] of the clean model."""
    return torch.cat([_log_probs(model(input_ids=t, use_cache=False).logits)
                      for t in tokens.split(batch_size)])


@torch.no_grad()
def _steered_gains(
    model: nn.Module, module: nn.Module, tokens: Tensor, clean: Tensor, vectors: list[Tensor],
    where: list[Tensor], cfg: SteerConfig, top_tokens: int = 0,
    promoted: list[list[int]] | None = None,
) -> list[dict[str, Any]]:
    """Steer the contexts `tokens` [c, T] with each vector (added at its [c, T] mask) and compare
    with the clean log-probabilities [c, T, V] at the masked positions.

    With `top_tokens`, returns per vector the tokens with the largest mean log-probability gain
    ("tokens") and that mean gain ("gain"); with `promoted` (token ids per vector), the mean
    gain of those tokens ("gain") and the mean KL(steered || clean) ("kl"). Several vectors share
    one forward pass (one vector per group of c rows). A vector with no position (or, measuring,
    no promoted token because it had no position in the first set) gets None."""
    c = tokens.shape[0]
    per_pass = max(1, cfg.steer_batch_size // c)
    out: list[dict[str, Any]] = []
    for first in range(0, len(vectors), per_pass):
        group = range(first, min(first + per_pass, len(vectors)))
        masks = torch.stack([where[j] for j in group]).to(tokens.device)  # [G, c, T]
        stacked = torch.stack([vectors[j] for j in group]).to(tokens.device)  # [G, d]
        delta = masks[..., None] * stacked[:, None, None, :]
        logp = _log_probs(_added_logits(model, module, tokens.repeat(len(group), 1),
                                        delta.flatten(0, 1)))
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


def _added_logits(model: nn.Module, module: nn.Module, tokens: Tensor, delta: Tensor) -> Tensor:
    """Logits of the model with `delta` [B, T, d] added to the hook module's output."""

    def add(_module, _inputs, output):
        h = hook_output_tensor(output)
        return replace_hook_output(output, h + delta.to(h.dtype))

    handle = module.register_forward_hook(add)
    try:
        return model(input_ids=tokens, use_cache=False).logits
    finally:
        handle.remove()
