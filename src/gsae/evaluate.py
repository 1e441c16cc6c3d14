"""Evaluation of SAEs spliced into their language model.

For every SAE, on held-out token contexts: reconstruction (MSE, FVU, cosine, L2 ratio, L0), the
next-token CE with the reconstruction spliced in at the hook against the clean model and against
zero- and mean-ablation (fraction of CE recovered), KL(clean || spliced), the first-order loss
effect of the reconstruction error, and dead latents. A g-SAE is evaluated in both inference
modes: "grad-aware" (selection uses the clean model's loss gradient for the true next tokens, as
in training) and "grad-free" (beta = 0 on the same weights). The README's Evaluation section
defines every number and the JSON schema.

One clean forward and backward per batch serves all SAEs and hooks; then one spliced forward per
SAE and mode, and one zero- and one mean-ablated forward per hook (with `core=True`, also one
with the hook zeroed at every position, SAEBench's baseline, for `gsae.saebench`). A spliced
forward runs only the decoder blocks above the hook, from what they received in the clean
forward, where the model allows it (`gsae.hooks`; the run info's "forward" says per hook).
Everything is accumulated as sums, so the result does not depend on the batch size (except
through the per-batch outlier threshold, which is the one used in training) and memory stays
bounded.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from gsae.batch import GRADIENT_DEFINITION
from gsae.config import validate
from gsae.errors import GsaeError
from gsae.hooks import Intervention, Recording, log_probs, resolve_hook, splice, zero_all
from gsae.io import versions, write_json
from gsae.records import CoreRecord, EvalRecord, EvalResult, EvalRunInfo
from gsae.sae import SAE, first_order_change
from gsae.source import ActivationSource, SourceConfig, training_positions
from gsae.text import DataConfig, corpus_identity, token_contexts

GRAD_AWARE, GRAD_FREE = "grad-aware", "grad-free"
MODES = (GRAD_AWARE, GRAD_FREE)
HISTOGRAM_EDGES = [-8.0 + 0.25 * i for i in range(33)]  # log10 firing frequency, 32 bins
POSITIONS = {
    "spliced": "positions t with skip_first <= t <= T-2 of every context (the SAE's training "
    "data), except outlier tokens, whose activation norm exceeds outlier_factor times the median "
    "norm of those positions in their batch of batch_size contexts; outliers and all other "
    "positions keep their clean activation",
    "ce": "next-token predictions made at positions skip_first <= p <= T-2 (of tokens "
    "skip_first+1 .. T-1): every prediction a splice can change; CE and KL are means over them",
    "reconstruction": "the spliced positions; FVU's variance is around the mean of x over all "
    "spliced positions of the run",
    "mean_ablation": "x replaced by the mean of x over the spliced positions of all evaluation "
    "contexts, computed in a first forward pass over the same contexts",
}


@dataclass
class EvalConfig:
    """How much held-out text to evaluate on, and where to write the result."""

    eval_tokens: int = field(
        default=12_288,
        metadata={"help": "evaluation budget in context tokens (rounded up to whole contexts)",
                  "min": 1},
    )
    pool_tokens: int = field(
        default=262_144,
        metadata={"help": "the contexts are a seeded random sample of the first this-many tokens "
                  "of the evaluation split; 0 takes the first contexts in order", "min": 0},
    )
    seed: int = field(default=0, metadata={"help": "seed of the choice of evaluation contexts"})
    batch_size: int = field(default=8, metadata={"help": "contexts per language-model batch",
                                                 "min": 1})
    json: str = field(default="", metadata={"help": "also write the result as JSON to this file"})


# Public entry points ----------------------------------------------------------------------------


def eval_contexts(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig
                  ) -> Tensor:
    """The evaluation contexts [n, T] from the evaluation split of `data_cfg`'s corpus.

    n = ceil(eval_tokens / context_size), fewer if the split is smaller. With `pool_tokens` > 0
    they are a uniform sample (reservoir sampling, seeded) of the split's first `pool_tokens`
    tokens' contexts, kept in corpus order.
    """
    validate(cfg)
    wanted = math.ceil(cfg.eval_tokens / data_cfg.context_size)
    stream = token_contexts(data_cfg, tokenizer, "eval")
    if cfg.pool_tokens <= 0:
        return torch.stack(list(islice(stream, wanted)))
    pool = max(wanted, cfg.pool_tokens // data_cfg.context_size)
    rng = random.Random(cfg.seed)
    chosen: list[tuple[int, Tensor]] = []
    for i, context in enumerate(islice(stream, pool)):
        if i < wanted:
            chosen.append((i, context))
        elif (j := rng.randrange(i + 1)) < wanted:
            chosen[j] = (i, context)
    return torch.stack([context for _, context in sorted(chosen, key=lambda c: c[0])])


def unseen_contexts(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, tokens: int,
                    count_all: bool = True) -> tuple[Tensor, int | None]:
    """The first ceil(tokens / context_size) contexts of a whole corpus that no SAE trained on
    (no document is held out: none was seen), and how many contexts the corpus has in all (if
    `count_all`: it tokenises the whole corpus)."""
    stream = token_contexts(replace(data_cfg, eval_fraction=0.0), tokenizer, "train")
    chosen = list(islice(stream, math.ceil(tokens / data_cfg.context_size)))
    return torch.stack(chosen), len(chosen) + sum(1 for _ in stream) if count_all else None


def evaluate(
    saes: Sequence[SAE], model: nn.Module, tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig,
    cfg: EvalConfig, names: Sequence[str] | None = None, model_id: dict[str, Any] | None = None,
    above_hook: bool = True, core: bool = False,
) -> EvalResult:
    """Evaluate `saes` on the evaluation split of `data_cfg`'s corpus (see `evaluate_contexts`);
    the run info also records the corpus. Writes the JSON file if `cfg.json` is set."""
    contexts = eval_contexts(data_cfg, tokenizer, cfg)
    result = evaluate_contexts(saes, model, contexts, cfg, names, model_id, above_hook, core=core)
    result.run.corpus = corpus_identity(data_cfg)
    if cfg.json:
        write_json(cfg.json, result.to_json())
    return result


def evaluate_contexts(
    saes: Sequence[SAE], model: nn.Module, contexts: Tensor, cfg: EvalConfig,
    names: Sequence[str] | None = None, model_id: dict[str, Any] | None = None,
    above_hook: bool = True, token_losses: TokenLosses | None = None, core: bool = False,
) -> EvalResult:
    """Evaluate `saes` (any hooks of this one model) on token contexts [n, T].

    `names` label the SAEs (default sae0, sae1, ...); `model_id` describes `model` in the run
    info (default: the model identity in the SAEs' metadata). Returns the run info and one
    record per SAE per inference mode (see the README). SAEs with beta = 0 get both records
    too; they are identical. Patched passes run only the blocks above each hook where the
    model allows (`gsae.hooks`); `above_hook=False` runs the whole model for each instead.
    `token_losses`, if given, collects the per-position losses (SAEs of one hook only).
    `core` also runs each hook zeroed at every position (SAEBench's ablation baseline, one more
    forward per hook and batch) and fills `result.core` (`CoreRecord`, for `gsae.saebench`).
    """
    names = sae_names(saes, names)
    validate(cfg)
    if any(p.requires_grad for p in model.parameters()):
        raise GsaeError("the model's weights require grad: freeze them with "
                        "model.requires_grad_(False) before evaluating")
    if contexts.ndim != 2 or contexts.shape[0] == 0:
        raise GsaeError(f"contexts must be a non-empty [n, T] tensor, got {list(contexts.shape)}")
    skip_first = _shared_setting(saes, "skip_first")
    outlier_factor = _shared_setting(saes, "outlier_factor")
    if not 0 <= skip_first < contexts.shape[1] - 1:
        raise GsaeError(
            f"contexts of {contexts.shape[1]} tokens leave no position to evaluate after "
            f"skipping the first {skip_first}: use longer contexts"
        )
    start = time.perf_counter()
    hooks = _group_by_hook(saes, names, model, above_hook)
    for hook in hooks.values():
        hook.zero_all = {"ce": 0.0, "kl": 0.0} if core else None
    if token_losses is not None and len(hooks) > 1:
        raise GsaeError(f"per-position losses are collected at one hook, got {list(hooks)}")
    source_cfg = SourceConfig(hooks=list(hooks), lm_batch_size=cfg.batch_size,
                              skip_first=skip_first, outlier_factor=outlier_factor)
    batches = contexts.split(cfg.batch_size)
    for name, mean in _mean_activations(model, source_cfg, batches).items():
        hooks[name].mean = mean
    _evaluation_pass(model, source_cfg, batches, hooks, token_losses)
    param = next(model.parameters())
    run = EvalRunInfo(
        model=model_id if model_id is not None else _model_identity(saes),
        corpus=None,
        part="eval",
        contexts=contexts.shape[0],
        context_size=contexts.shape[1],
        context_tokens=contexts.numel(),
        eval_tokens=cfg.eval_tokens,
        pool_tokens=cfg.pool_tokens,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        skip_first=skip_first,
        outlier_factor=outlier_factor,
        positions=POSITIONS,
        gradient=GRADIENT_DEFINITION,
        model_dtype=str(param.dtype).removeprefix("torch."),
        device=str(param.device),
        versions=versions(),
        seconds=round(time.perf_counter() - start, 1),
        forward={name: hook.intervention.forward for name, hook in hooks.items()},
    )
    results = [member.record(mode, hook) for hook in hooks.values() for member in hook.members
               for mode in MODES]
    order = {name: i for i, name in enumerate(names)}
    results.sort(key=lambda r: (order[r.sae], MODES.index(r.mode)))
    core_records = [member.core_record(mode, hook) for hook in hooks.values() if core
                    for member in hook.members for mode in MODES]
    core_records.sort(key=lambda r: (order[r.sae], MODES.index(r.mode)))
    return EvalResult(run, results, core_records)


def check_model(saes: Sequence[SAE], identity: dict[str, Any]) -> None:
    """Raise GsaeError unless every SAE was trained on the model `identity` describes (the same
    fingerprint when both are known, else the same model name)."""
    for i, sae in enumerate(saes):
        trained = sae.provenance.model
        if not trained:
            continue
        known = trained.get("fingerprint") and identity.get("fingerprint")
        same = (trained.get("fingerprint") == identity.get("fingerprint") if known
                else trained.get("model") == identity.get("model"))
        if not same:
            raise GsaeError(
                f"SAE {i} was trained on model {trained.get('model')!r} (fingerprint "
                f"{trained.get('fingerprint')}), not on {identity.get('model')!r} (fingerprint "
                f"{identity.get('fingerprint')}): evaluate it with its own model"
            )


TABLE_ROWS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("hook", itemgetter("hook")),
    ("k / beta", lambda r: f"{r['k']} / {r['beta']:g}"),
    ("tokens spliced", itemgetter("tokens")),
    ("outliers left clean", itemgetter("outlier_tokens")),
    ("L0", itemgetter("l0")),
    ("MSE", itemgetter("mse")),
    ("FVU", itemgetter("fvu")),
    ("explained variance", itemgetter("explained_variance")),
    ("cosine", itemgetter("cosine")),
    ("L2 ratio", itemgetter("l2_ratio")),
    ("CE clean", itemgetter("ce_clean")),
    ("CE spliced", itemgetter("ce_spliced")),
    ("CE increase", itemgetter("ce_increase")),
    ("CE zero-ablation", itemgetter("ce_zero_ablation")),
    ("CE mean-ablation", itemgetter("ce_mean_ablation")),
    ("CE recovered (zero)", itemgetter("ce_recovered_zero")),
    ("CE recovered (mean)", itemgetter("ce_recovered_mean")),
    ("KL(clean||spliced)", itemgetter("kl")),
    ("mean |g.(x-x_hat)|", itemgetter("first_order_abs")),
    ("1st-order CE change", itemgetter("first_order_ce_change")),
    ("corr(1st order, dCE)", itemgetter("first_order_correlation")),
    ("dead fraction", itemgetter("dead_fraction")),
    ("dead latents", lambda r: f"{r['dead_latents']} / {r['n_latents']}"),
]


def format_table(result: EvalResult) -> str:
    """The results side by side: one row per metric, one column per SAE and inference mode.

    The two modes of an SAE whose results are identical (beta = 0) share one column."""
    columns: list[dict[str, Any]] = []
    for record in map(asdict, result.results):
        previous = columns[-1] if columns else None
        if (previous is not None and previous["sae"] == record["sae"]
                and _without_mode(previous) == _without_mode(record)):
            columns[-1] = {**previous, "mode": "grad-aware = grad-free"}
        else:
            columns.append(record)
    labels = short_labels([c["sae"] for c in columns])
    rows = [("SAE", labels), ("mode", [c["mode"] for c in columns])]
    rows += [(title, [_show(cell(c)) for c in columns]) for title, cell in TABLE_ROWS]
    title_width = max(len(title) for title, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(columns))]
    lines = [
        f"{title:<{title_width}}  " + "  ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths))
        for title, cells in rows
    ]
    run = result.run
    corpus = (run.corpus or {}).get("dataset", "given contexts")
    lines.insert(0, f"model {run.model.get('model')!r}, corpus {corpus!r} (eval split), "
                    f"{run.contexts} contexts x {run.context_size} tokens, "
                    f"seed {run.seed}, {run.seconds} s")
    return "\n".join(lines)


# Accumulators -----------------------------------------------------------------------------------


class _EvaluatedSAE:
    """One SAE under evaluation, with a running tally per inference mode."""

    def __init__(self, sae: SAE, name: str):
        self.sae, self.name = sae, name
        self.tallies = {mode: _Tally(sae.n_latents) for mode in MODES}

    def record(self, mode: str, hook: _Hook) -> EvalRecord:
        sae, tally = self.sae, self.tallies[mode]
        ce_spliced = tally.ce / hook.ce_tokens
        ce = {kind: total / hook.ce_tokens for kind, total in hook.ce.items()}
        fvu = tally.sq_err / hook.total_variance()
        frequency = tally.fired.double() / max(1, tally.rows)
        live = frequency[frequency > 0]
        histogram = torch.histc(live.log10(), bins=len(HISTOGRAM_EDGES) - 1,
                                min=HISTOGRAM_EDGES[0], max=HISTOGRAM_EDGES[-1])
        n_dead = int((tally.fired == 0).sum())
        return EvalRecord(**_finite({
            "sae": self.name,
            "hook": hook.name,
            "mode": mode,
            "k": sae.k,
            "beta": sae.beta,
            "value_mode": sae.cfg.value_mode,
            "n_latents": sae.n_latents,
            "d_in": sae.d_in,
            "tokens": tally.rows,
            "outlier_tokens": hook.outliers,
            "ce_tokens": hook.ce_tokens,
            "l0": tally.l0 / tally.rows,
            "mse": tally.sq_err / (tally.rows * sae.d_in),
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "cosine": tally.cosine / tally.rows,
            "l2_ratio": tally.l2_ratio / tally.rows,
            "ce_clean": ce["clean"],
            "ce_spliced": ce_spliced,
            "ce_increase": ce_spliced - ce["clean"],
            "ce_zero_ablation": ce["zero"],
            "ce_mean_ablation": ce["mean"],
            "ce_recovered_zero": _recovered(ce["zero"], ce_spliced, ce["clean"]),
            "ce_recovered_mean": _recovered(ce["mean"], ce_spliced, ce["clean"]),
            "kl": tally.kl / hook.ce_tokens,
            "first_order_abs": tally.first_order_abs / tally.rows,
            "first_order_ce_change": sum(tally.predicted) / hook.ce_tokens,
            "first_order_correlation": _pearson(tally.predicted, tally.measured),
            "dead_latents": n_dead,
            "dead_fraction": n_dead / sae.n_latents,
            "dead_window_tokens": tally.rows,
            "firing_histogram": {
                "log10_frequency_edges": HISTOGRAM_EDGES,
                "counts": [int(c) for c in histogram.tolist()],
                "dead": n_dead,
            },
        }))

    def core_record(self, mode: str, hook: _Hook) -> CoreRecord:
        tally, rows = self.tallies[mode], self.tallies[mode].rows
        assert hook.zero_all is not None
        return CoreRecord(**_finite({
            "sae": self.name,
            "mode": mode,
            "ce_zero_all": hook.zero_all["ce"] / hook.ce_tokens,
            "kl_zero_all": hook.zero_all["kl"] / hook.ce_tokens,
            "l1": tally.l1 / rows,
            "l2_norm_in": tally.norm_in / rows,
            "l2_norm_out": tally.norm_out / rows,
            "relative_reconstruction_bias": _ratio(tally.norm_out_sq, tally.dot),
            "explained_variance_legacy": tally.ev_legacy / rows,
            "fired": tally.fired.tolist(),
            "contexts_fired": tally.contexts_fired.tolist(),
        }))


class _Tally:
    """Sums over the evaluation of one SAE in one mode (float64 Python numbers)."""

    def __init__(self, n_latents: int):
        self.rows = 0
        self.sq_err = self.cosine = self.l2_ratio = self.l0 = 0.0
        self.ce = self.kl = self.first_order_abs = 0.0
        self.fired = torch.zeros(n_latents, dtype=torch.long)
        self.predicted: list[float] = []  # per sequence: sum_t g_t . (x_hat_t - x_t)
        self.measured: list[float] = []  # per sequence: summed CE change over the CE positions
        # what SAEBench's core evaluation reports besides (CoreRecord)
        self.l1 = self.norm_in = self.norm_out = self.norm_out_sq = self.dot = 0.0
        self.ev_legacy = 0.0
        self.contexts_fired = torch.zeros(n_latents, dtype=torch.long)

    def add(self, x: Tensor, g: Tensor, x_hat: Tensor, values: Tensor, indices: Tensor,
            sequence: Tensor, ce: Tensor, kl: Tensor, ce_clean: Tensor) -> None:
        error = x_hat - x
        self.rows += x.shape[0]
        self.sq_err += _total(error.pow(2))
        self.cosine += _total(F.cosine_similarity(x_hat, x, dim=1, eps=1e-12))
        self._add_shrinkage(x, x_hat, error)
        active = values > 0
        self.l0 += _total(active)
        self.l1 += _total(values[active])
        self.fired += torch.bincount(indices[active].cpu(), minlength=self.fired.numel())
        self._add_contexts_fired(indices, active, sequence)
        dots = first_order_change(error, g)
        self.first_order_abs += _total(dots.abs())
        per_sequence = dots.new_zeros(ce.shape[0], dtype=torch.float64)
        self.predicted += per_sequence.index_add_(0, sequence, dots.double()).tolist()
        self.measured += (ce.double() - ce_clean.double()).sum(1).tolist()
        self.ce += _total(ce)
        self.kl += _total(kl)

    def _add_shrinkage(self, x: Tensor, x_hat: Tensor, error: Tensor) -> None:
        norm_in, norm_out = x.norm(dim=1), x_hat.norm(dim=1)
        self.l2_ratio += _total(norm_out / norm_in)
        self.norm_in += _total(norm_in)
        self.norm_out += _total(norm_out)
        self.norm_out_sq += _total(norm_out.pow(2))
        self.dot += _total((x * x_hat).sum(1))
        spread = (x - x.mean(0)).pow(2).sum(1)  # around the mean of this batch's rows
        self.ev_legacy += _total(1 - error.pow(2).sum(1) / spread)

    def _add_contexts_fired(self, indices: Tensor, active: Tensor, sequence: Tensor) -> None:
        """Count, per latent, the contexts of this batch in which it fired at least once."""
        n = self.contexts_fired.numel()
        pairs = (sequence.unsqueeze(1) * n + indices)[active].unique()
        self.contexts_fired += torch.bincount((pairs % n).cpu(), minlength=n)


class _Hook:
    """One hook point: its SAEs, its ablation baselines and the statistics of its activations."""

    def __init__(self, name: str, intervention: Intervention):
        self.name, self.intervention = name, intervention
        self.members: list[_EvaluatedSAE] = []
        self.mean: Tensor | None = None
        self.rows = self.outliers = self.ce_tokens = 0
        self.ce = {"clean": 0.0, "zero": 0.0, "mean": 0.0}
        # CE and KL sums with the hook zeroed at every position, when asked for (CoreRecord)
        self.zero_all: dict[str, float] | None = None
        self.sum_x: Tensor | None = None
        self.sum_x2: Tensor | None = None

    def add_rows(self, x: Tensor) -> None:
        x = x.double()
        self.rows += x.shape[0]
        sum_x, sum_x2 = x.sum(0), x.pow(2).sum(0)
        self.sum_x = sum_x if self.sum_x is None else self.sum_x + sum_x
        self.sum_x2 = sum_x2 if self.sum_x2 is None else self.sum_x2 + sum_x2

    def total_variance(self) -> float:
        """sum over rows of ||x - mean(x)||^2, from the running sums."""
        assert self.sum_x is not None and self.sum_x2 is not None
        return (self.sum_x2 - self.sum_x.pow(2) / self.rows).sum().item()


SCORED_POSITIONS = 16  # positions scored at a time: their [16, vocabulary] block stays in cache


class _Clean:
    """The clean model's next-token distribution at the CE positions of one batch."""

    def __init__(self, logits: Tensor, tokens: Tensor, skip_first: int):
        self.skip_first = skip_first
        self.targets = tokens[:, skip_first + 1 :].unsqueeze(-1)
        self.logp = log_probs(logits[:, skip_first:-1])
        self.p = self.logp.exp()
        self.ce = -self.logp.gather(-1, self.targets).squeeze(-1)

    def compare(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position CE [B, P] of other logits, and KL(clean || other) [B, P], a few positions
        at a time so that each block of log-probabilities is reused while still in cache. These
        are the operations of the whole batch at once; only the order in which a sum over the
        vocabulary is split between threads can differ (for a block of one position), by a
        unit in the last place."""
        scored = logits[:, self.skip_first : -1]  # a view, aligned with self.ce
        ce, kl = torch.empty_like(self.ce), torch.empty_like(self.ce)
        for b in range(ce.shape[0]):
            for start in range(0, ce.shape[1], SCORED_POSITIONS):
                part = slice(start, start + SCORED_POSITIONS)
                logp = log_probs(scored[b, part])
                ce[b, part] = -logp.gather(-1, self.targets[b, part]).squeeze(-1)
                kl[b, part] = logp.neg_().add_(self.logp[b, part]).mul_(self.p[b, part]).sum(-1)
        return ce, kl


class TokenLosses:
    """Per-position losses of an evaluation (`evaluate_contexts(..., token_losses=...)`), for
    analyses by token: at every CE position (batch by batch, row by row), the clean CE, the norm
    of g at the hook at that position (the gradient of the summed next-token CE with respect to
    the activation there), and each SAE's spliced CE per inference mode."""

    def __init__(self) -> None:
        self._clean: list[Tensor] = []
        self._grad_norm: list[Tensor] = []
        self._spliced: dict[tuple[str, str], list[Tensor]] = {}

    def add_clean(self, ce: Tensor, grad_norm: Tensor) -> None:
        self._clean.append(ce.detach().flatten().double().cpu())
        self._grad_norm.append(grad_norm.detach().flatten().double().cpu())

    def add_spliced(self, name: str, mode: str, ce: Tensor) -> None:
        self._spliced.setdefault((name, mode), []).append(ce.detach().flatten().double().cpu())

    @property
    def clean(self) -> Tensor:
        return torch.cat(self._clean)

    @property
    def grad_norm(self) -> Tensor:
        return torch.cat(self._grad_norm)

    def spliced(self, name: str, mode: str) -> Tensor:
        return torch.cat(self._spliced[(name, mode)])


# The two passes ---------------------------------------------------------------------------------


def _mean_activations(model: nn.Module, source_cfg: SourceConfig, batches: Sequence[Tensor]
                      ) -> dict[str, Tensor]:
    """Mean of x over the spliced positions of all batches, per hook (forward to the last hook)."""
    source = ActivationSource(model, source_cfg, with_grad=False)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for tokens in tqdm(batches, desc="eval: mean activation", unit="batch", leave=False,
                       dynamic_ncols=True):
        for name, (x, _) in source.hidden_states(tokens).items():
            mask, _ = training_positions(x, source_cfg.skip_first, source_cfg.outlier_factor)
            total = x[mask].double().sum(0)
            sums[name] = sums[name] + total if name in sums else total
            counts[name] = counts.get(name, 0) + int(mask.sum())
    return {name: (sums[name] / counts[name]).float() for name in sums}


def _evaluation_pass(model: nn.Module, source_cfg: SourceConfig, batches: Sequence[Tensor],
                     hooks: dict[str, _Hook], token_losses: TokenLosses | None = None) -> None:
    source = ActivationSource(model, source_cfg, with_grad=True)
    skip_first, outlier_factor = source_cfg.skip_first, source_cfg.outlier_factor
    device = next(model.parameters()).device
    bar = tqdm(total=sum(b.numel() for b in batches), desc="eval", unit="tok", unit_scale=True,
               dynamic_ncols=True)
    captured: dict[str, Tensor] = {}
    for tokens in batches:
        tokens = tokens.to(device)
        with ExitStack() as recording:
            clean_runs = {name: recording.enter_context(hook.intervention.record(tokens))
                          for name, hook in hooks.items()}
            states = source.hidden_states(tokens, logits_out=captured)
        with torch.no_grad():
            clean = _Clean(captured.pop("logits"), tokens, skip_first)
            for hook in hooks.values():
                patched = clean_runs[hook.name]
                x_full, g_full = states[hook.name]
                mask, outliers = training_positions(x_full, skip_first, outlier_factor)
                x, g = x_full[mask], g_full[mask]
                sequence = mask.nonzero()[:, 0]
                if token_losses is not None:
                    token_losses.add_clean(clean.ce, g_full[:, skip_first:-1].norm(dim=-1))
                hook.add_rows(x)
                hook.outliers += outliers
                hook.ce_tokens += clean.ce.numel()
                hook.ce["clean"] += _total(clean.ce)
                _ablations(hook, patched, clean, mask, x)
                for member in hook.members:
                    _evaluate_member(member, patched, hook, mask, x, g, sequence, clean,
                                     token_losses)
        bar.update(tokens.numel())
    bar.close()


def _ablations(hook: _Hook, patched: Recording, clean: _Clean, mask: Tensor, x: Tensor) -> None:
    """The baselines of one hook on one batch: zero- and mean-ablation at the spliced positions
    and, when asked for, zero-ablation at every position (SAEBench's)."""
    assert hook.mean is not None
    for kind, fill in (("zero", torch.zeros_like(x)), ("mean", hook.mean.expand_as(x))):
        ce, _ = clean.compare(patched.logits(splice(mask, fill)))
        hook.ce[kind] += _total(ce)
    if hook.zero_all is not None:
        ce, kl = clean.compare(patched.logits(zero_all))
        hook.zero_all["ce"] += _total(ce)
        hook.zero_all["kl"] += _total(kl)


def _evaluate_member(member: _EvaluatedSAE, patched: Recording, hook: _Hook, mask: Tensor,
                     x: Tensor, g: Tensor, sequence: Tensor, clean: _Clean,
                     token_losses: TokenLosses | None = None) -> None:
    """Encode, splice and score one SAE on one batch, in both modes. When the two modes give
    the same reconstruction (always so for beta = 0) the spliced forward is done once."""
    sae = member.sae
    if x.shape[1] != sae.d_in:
        raise GsaeError(f"SAE {member.name!r} takes inputs of width {sae.d_in}, but hook "
                        f"{hook.name!r} has width {x.shape[1]}")
    param = sae.W_dec
    x_in, g_in = x.to(param.device, param.dtype), g.to(param.device, param.dtype)
    done: list[tuple[Tensor, tuple[Tensor, Tensor]]] = []
    for mode in MODES:
        values, indices, _ = sae.encode(x_in, g_in if mode == GRAD_AWARE else None)
        x_hat = sae.decode(values, indices)
        same = [scores for previous, scores in done if torch.equal(previous, x_hat)]
        ce, kl = same[0] if same else clean.compare(patched.logits(splice(mask, x_hat)))
        done.append((x_hat, (ce, kl)))
        if token_losses is not None:
            token_losses.add_spliced(member.name, mode, ce)
        member.tallies[mode].add(x_in.float(), g_in.float(), x_hat.float(), values, indices,
                                 sequence.to(param.device), ce, kl, clean.ce)


# Helpers ----------------------------------------------------------------------------------------


def _group_by_hook(saes: Sequence[SAE], names: Sequence[str], model: nn.Module,
                   above_hook: bool) -> dict[str, _Hook]:
    hooks: dict[str, _Hook] = {}
    for sae, name in zip(saes, names):
        hook_name, module = resolve_hook(model, recorded_hook(sae, name))
        if hook_name not in hooks:
            hooks[hook_name] = _Hook(hook_name, Intervention(model, module, above_hook))
        hooks[hook_name].members.append(_EvaluatedSAE(sae, name))
    return hooks


def sae_names(saes: Sequence[SAE], names: Sequence[str] | None) -> list[str]:
    """The labels of `saes` in results: `names` (distinct, one per SAE) or sae0, sae1, ..."""
    if not saes:
        raise GsaeError("no SAE given")
    names = list(names) if names is not None else [f"sae{i}" for i in range(len(saes))]
    if len(names) != len(saes) or len(set(names)) != len(names):
        raise GsaeError(f"the {len(saes)} SAEs need as many distinct names, got {names}")
    return names


def recorded_hook(sae: SAE, name: str) -> str:
    """The hook point an SAE was trained at, from its provenance."""
    if not sae.provenance.hook:
        raise GsaeError(f"SAE {name!r} does not record its hook point (its provenance has no "
                        "hook): set sae.provenance.hook")
    return sae.provenance.hook


def _shared_setting(saes: Sequence[SAE], key: str) -> Any:
    """A data setting of the SAEs' training (from their provenance), which all must share."""
    values = {getattr(sae.provenance, key) for sae in saes}
    if len(values) > 1:
        raise GsaeError(f"the SAEs were trained with different {key} ({sorted(values)}): "
                        "evaluate them in separate runs")
    return values.pop()


def _model_identity(saes: Sequence[SAE]) -> dict[str, Any]:
    """The model identity recorded in the SAEs' provenance (empty if none is)."""
    return next((sae.provenance.model for sae in saes if sae.provenance.model), {})


def _total(t: Tensor) -> float:
    return t.double().sum().item()


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    return (ablated - spliced) / (ablated - clean) if ablated != clean else math.nan


def _pearson(a: list[float], b: list[float]) -> float:
    if len(a) < 2:
        return math.nan
    return torch.corrcoef(torch.tensor([a, b], dtype=torch.float64))[0, 1].item()


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats (an undefined ratio) become None, which JSON writes as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def _without_mode(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "mode"}


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def short_labels(names: list[str]) -> list[str]:
    """The shortest path suffixes (by folder) that tell the names apart."""
    parts = [Path(name).parts or (name,) for name in names]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(set(names)):
            return labels
    return list(names)
