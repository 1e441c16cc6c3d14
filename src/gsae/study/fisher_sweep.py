"""The Fisher sweep of `gsae study --fisher_sweep`: the Fisher term's lambda chosen on a
validation part of the training split, never on the evaluation split.

TopK SAEs of the study's first k and seed, one per lambda (and lambda 0 as the reference),
train for `--sweep_tokens` on the store without its last shards (`--validation_fraction`); each
is evaluated on the contexts those shards were made from, which no SAE of the sweep read. The
lambda with the lowest spliced CE increase there is lambda*: the study's SAEs are then trained
with `--fisher_coef 0 lambda*`. A plan on the study engine, in `<out>/fisher-sweep` (its own
stage clock): every stage is reused when the study is run again.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from gsae import pipeline
from gsae.caching import validation_contexts
from gsae.errors import GsaeError
from gsae.evaluate import GRAD_FREE
from gsae.models import model_identity
from gsae.pipeline import TrainRun
from gsae.sae import SAEConfig
from gsae.store import StoreReader
from gsae.study.engine import Evaluation, Outcome, Study, StudyPlan, Variant
from gsae.text import corpus_identity
from gsae.train import variant_name

# `run` below is a `gsae.study.scaling.ScalingRun`: scaling imports this module, so the type is
# not imported back (no import cycle, even for type checking)
ScalingRun = Any

SWEEP_DIR = "fisher-sweep"
SWEEP_IDENTITY = "sweep.json"


def reference_config(run: ScalingRun, curve: list[SAEConfig]) -> SAEConfig:
    """The sweep's SAE: the study's TopK at its first k and first seed, without the term."""
    topk = [c for c in curve if c.beta == 0 and c.fisher_coef == 0]
    if not topk:
        raise GsaeError("--fisher_sweep needs a TopK SAE (--beta 0) without the Fisher term "
                        "(--fisher_coef 0) among the study's SAEs")
    first = [c for c in topk if c.k == run.sae.k[0] and c.seed == run.sae.seed[0]]
    return (first or topk)[0]


def sweep_values(run: ScalingRun) -> list[float]:
    """The lambdas of the sweep, the reference 0 first; refused beside --fisher_coef."""
    values = run.study.fisher_sweep
    if any(v <= 0 for v in values) or len(set(values)) < len(values):
        raise GsaeError(f"--fisher_sweep {' '.join(f'{v:g}' for v in values)}: give distinct "
                        "values above 0 (lambda 0, the reference, is always trained)")
    if any(c != 0 for c in run.sae.fisher_coef):
        raise GsaeError("--fisher_sweep chooses the Fisher term's lambda for the study: give it "
                        "or --fisher_coef, not both")
    return [0.0, *values]


class FisherSweep:
    """The sweep as a plan on the study engine, and lambda* from its results."""

    def __init__(self, run: ScalingRun, reference: SAEConfig, store: Path):
        self.run, self.store = run, store
        self.values = sweep_values(run)
        self.configs = [replace(reference, fisher_coef=v) for v in self.values]
        self.out = Path(run.study.out) / SWEEP_DIR
        self.contexts: Any = None
        self.span: list[int] = []  # the evaluated validation contexts: [first, last + 1)

    def train_run(self) -> TrainRun:
        run = self.run
        train = replace(run.train, store=str(self.store), tokens=run.study.sweep_tokens,
                        snapshots=[], validation_fraction=run.study.validation_fraction,
                        device=run.train.device or run.model.device)
        return TrainRun(model=run.model, data=run.data, source=run.source, train=train)

    def plan(self) -> StudyPlan:
        run, train_run = self.run, self.train_run()
        claimed = {"model": model_identity(run.model), "store": str(self.store),
                   "data": corpus_identity(run.data), "train": asdict(train_run.train)}
        claimed["train"].pop("out")
        return StudyPlan("a Fisher sweep", self.out, SWEEP_IDENTITY, claimed,
                         run.train.overwrite, run.model, run.data, train_run, self.store,
                         run.study.store_tokens, [Variant(c) for c in self.configs],
                         self.evaluations)

    def evaluations(self, study: Study) -> list[Evaluation]:
        """One evaluation: the validation part, up to the study's --eval_tokens."""
        reader = StoreReader(self.store, validation_fraction=self.run.study.validation_fraction)
        self.contexts = validation_contexts(reader, self.run.data, study.tokenizer,
                                            self.run.eval.eval_tokens)
        span = reader.validation_contexts()
        self.span = [span.start, span.start + self.contexts.shape[0]]
        cfg = replace(self.run.eval, json="", eval_tokens=self.contexts.numel(), pool_tokens=0)
        settings = {"corpus": corpus_identity(self.run.data), "contexts": self.span,
                    "batch_size": cfg.batch_size}
        return [Evaluation("validation", "eval_validation", "eval-validation.json", settings,
                           lambda loaded: pipeline.evaluate_on(loaded, self.contexts, cfg))]

    def result(self, study: Study, outcome: Outcome) -> dict[str, Any]:
        """The sweep's record: where it validated, every lambda's validation metrics, the
        chosen lambda and the sweep's stage clock."""
        info, _ = outcome.evaluated["validation"]
        coef = {variant_name(c): c.fisher_coef for c in self.configs}
        by_variant = {coef[r["variant"]]: r for r in outcome.records("validation")
                      if r["mode"] == GRAD_FREE}
        rows = [{"fisher_coef": v, **{k: by_variant[v].get(k) for k in SWEEP_METRICS}}
                for v in self.values]
        return {"tokens": self.run.study.sweep_tokens, "run": info,
                "validation_fraction": self.run.study.validation_fraction,
                "validation_contexts": self.span,
                "sae": variant_name(self.configs[0]), "results": rows,
                "chosen": choose(rows), "stage_seconds": study.clock.rounded()}


SWEEP_METRICS = ("ce_increase", "kl", "fvu", "l0", "dead_fraction", "first_order_abs")


def choose(rows: list[dict[str, Any]]) -> float:
    """lambda*: the swept lambda (above 0) with the lowest validation CE increase."""
    tried = [r for r in rows if r["fisher_coef"] > 0 and r["ce_increase"] is not None]
    if not tried:
        raise GsaeError("the Fisher sweep has no finite validation CE increase to choose from")
    return min(tried, key=lambda r: r["ce_increase"])["fisher_coef"]


def run_sweep(run: ScalingRun, reference: SAEConfig, store: Path) -> dict[str, Any]:
    """Run (or reuse) the sweep; its record."""
    sweep = FisherSweep(run, reference, store)
    study = Study(sweep.plan())
    return sweep.result(study, study.run())
