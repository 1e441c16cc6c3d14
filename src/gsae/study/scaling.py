"""`gsae study`: TopK SAEs against g-SAEs along training (learning curves over seeds, on the
training corpus's held-out split and on corpora no SAE sees).

Stages, each reused when an earlier run of the same study finished it:

1. the activation store (as `gsae cache`; continued after its last shard when interrupted), and
   its count of exactly repeated rows (cached in `<out>/store-check.json`);
2. training every SAE of the sweep to `train.tokens`, saving a snapshot at each count of
   `train.snapshots` (`gsae.pipeline.train_saes`, resumed from its checkpoint); the SAEs of
   `study.extra_k` are trained as a second run in `<out>/saes-extra`;
3. evaluation of every snapshot in both inference modes, on the held-out split of the training
   corpus and on each unseen corpus, cached per snapshot (by the fingerprint of its weights) in
   `<out>/eval-train.json` and `<out>/eval-unseen-<name>.json` and saved after each snapshot
   count;
4. steering with the last snapshot of every SAE, cached the same way in `<out>/steer.json`;
5. the report (`gsae.study.scaling_report`): README.md, results.json (schema gsae.scaling/2) and
   the plots.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gsae import pipeline
from gsae.batch import Batch
from gsae.config import identity, to_dict, validate
from gsae.errors import GsaeError
from gsae.evaluate import EvalConfig, TokenLosses, eval_contexts, unseen_contexts
from gsae.finetune import FinetuneConfig
from gsae.io import read_json, write_json
from gsae.models import ModelConfig, model_identity
from gsae.pipeline import SAESweep, TrainRun
from gsae.records import ScalingResult
from gsae.sae import SAE, SAEConfig
from gsae.source import SourceConfig
from gsae.steer import SteerConfig
from gsae.store import StoreReader
from gsae.study import registers
from gsae.study.engine import (
    Evaluation,
    Finetune,
    Outcome,
    Snapshot,
    Steering,
    Step,
    Study,
    StudyPlan,
    Variant,
    cached,
    distinct_saes,
    fingerprints,
    keyed_cache,
    machine_record,
    sae_record,
)
from gsae.study.engine import (
    command_line as flags_command,
)
from gsae.study.fisher_sweep import reference_config, run_sweep
from gsae.study.objectives_report import build_objectives_report
from gsae.study.registers_report import build_registers_report
from gsae.study.results import compact_steering
from gsae.study.scaling_report import build_scaling_report, largest_gap
from gsae.text import DataConfig, corpus_identity, load_documents, token_contexts
from gsae.train import TrainConfig, step_seconds, variant_name

IDENTITY_FILE = "study.json"
FINETUNED = "saes-finetuned"  # the run folder of the fine-tuned twins
FINETUNED_SUFFIX = "+kl"
FINETUNED_EXTRA = "saes-finetuned-extra"  # the fine-tuned twins of the --extra_k SAEs
DISTANCES_FILE = "distances.json"
COST_FILE = "cost.json"
COST_ROUNDS, COST_WARMUP = 12, 2  # timed and untimed rounds of the step timing
SNAPSHOTS = [150_000, 300_000, 600_000, 1_200_000, 2_400_000]


@dataclass
class StudyConfig:
    """The folders, store and second corpus of the learning-curve study."""

    out: str = field(
        default="runs/scaling",
        metadata={"help": "work folder: store, SAEs and their snapshots, evaluation and steering "
                  "results (reused when the command is run again)", "identity": False},
    )
    report: str = field(default="", metadata={
        "help": "report folder (the committed one is docs/results/scaling); empty: "
                "<out>/report", "identity": False})
    store: str = field(
        default="", metadata={"help": "activation store, built if missing; empty: <out>/store"}
    )
    store_tokens: int = field(default=600_000, metadata={
        "help": "tokens in the store, fewer if the training split runs out first (training "
                "then takes more shuffled passes over it)", "min": 1})
    unseen: list[str] = field(default_factory=lambda: ["news"], metadata={
        "help": "corpora that no SAE sees in training (e.g. news code legal verse german), each "
                "evaluated from its start, all of it (not only a held-out split) up to "
                "--unseen_tokens"})
    unseen_tokens: int = field(default=16_384, metadata={
        "help": "evaluation budget on each unseen corpus in context tokens, from its start (the "
                "whole corpus if it is smaller; news has 75,264 tokens in contexts of 128)",
        "min": 1})
    counts_per_eval: int = field(default=0, metadata={
        "help": "snapshot counts evaluated together in one pass over the evaluation text (the "
                "clean, mean and ablated passes are shared by all their SAEs, about half the "
                "cost of a pass of six SAEs); results are saved after each pass, so a smaller "
                "value loses less to an interruption; 0: all counts in one pass",
        "min": 0, "identity": False})
    per_token: list[str] = field(default_factory=list, metadata={
        "help": "corpora whose gap is analysed token by token at the last snapshot: 'train' (the "
                "training corpus's held-out split), an --unseen name, or 'largest_gap' (the "
                "unseen corpus where the first g-SAE's gradient-free mean gap is lowest); give "
                "the flag alone for none", "may_be_empty": True})
    objectives_report: str = field(default="", metadata={
        "help": "the objectives report's folder (the committed one is docs/results/objectives), "
                "written when the study has objective variants (--fisher_coef above 0, "
                "--fisher_sweep or --finetune_fraction); empty: <out>/objectives-report",
        "identity": False})
    registers_report: str = field(default="", metadata={
        "help": "the registers report's folder (the committed one is docs/results/registers), "
                "written when --unseen names two corpora or more; empty: <out>/registers-report",
        "identity": False})
    extra_k: list[int] = field(default_factory=list, metadata={
        "help": "further values of k whose SAEs (every other sweep value) are trained as long "
                "and evaluated and steered at the last snapshot only, e.g. 16 64; give the flag "
                "alone for none", "may_be_empty": True, "min": 1})
    extra_beta: list[float] = field(default_factory=list, metadata={
        "help": "the betas of the curve SAEs that --extra_k also trains (e.g. 0 for TopK "
                "alone); give the flag alone for all", "may_be_empty": True, "min": 0})
    extra_fisher_coef: list[float] = field(default_factory=list, metadata={
        "help": "the Fisher lambdas of the curve SAEs that --extra_k also trains (e.g. 0: none "
                "with the term); give the flag alone for all", "may_be_empty": True, "min": 0})
    finetune_fraction: float = field(default=0.0, metadata={
        "help": "share of --tokens spent on KL fine-tuning: each curve SAE without the Fisher "
                "term gets a fine-tuned twin (named <SAE>+kl), made by gsae finetune from its "
                "snapshot at (1 - share) x --tokens for the rest of the budget, and evaluated and "
                "steered at --tokens beside it, e.g. 0.05; 0: none", "min": 0, "max": 0.5})
    fisher_sweep: list[float] = field(default_factory=list, metadata={
        "help": "lambdas of the Fisher term to choose from before the study: TopK SAEs (first k "
                "and seed) train for --sweep_tokens on the store without its validation part "
                "(--validation_fraction) and are scored by the spliced CE increase there; the "
                "lowest gives lambda*, and the study trains --fisher_coef 0 lambda* (variants "
                "with and without the term), e.g. 0.1 0.3 1 3; give the flag alone for none",
        "may_be_empty": True, "min": 0})
    sweep_tokens: int = field(default=600_000, metadata={
        "help": "training tokens of each SAE of --fisher_sweep", "min": 1})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "share of the store's shards (its last ones) that the --fisher_sweep SAEs never "
                "read: the validation part of the training split that scores them",
        "min": 0, "max": 0.5})
    kl_weight: float = field(default=0.5, metadata={
        "help": "the fine-tuned twins' share w of the KL term (as gsae finetune --kl_weight)",
        "min": 0, "max": 1})


@dataclass
class ScalingRun:
    """Everything `gsae study` needs: the sweep (TopK is beta 0) trained with snapshots, and
    the evaluation and steering sections of `gsae eval` and `gsae steer` with this study's
    defaults (`train.out` and `train.store` are set by the study from `study.out` and
    `study.store`)."""

    study: StudyConfig = field(default_factory=StudyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    sae: SAESweep = field(default_factory=lambda: SAESweep(  # type: ignore[valid-type]
        k=[32], beta=[0.0, 100.0], value_mode=["z"], seed=[0, 1, 2], n_latents=[9216]))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        tokens=2_400_000, snapshots=list(SNAPSHOTS)))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(eval_tokens=8192))
    steer: SteerConfig = field(default_factory=SteerConfig)


def command_line(run: ScalingRun) -> str:
    """The `gsae study` command that reproduces these settings: every flag whose value differs
    from its default."""
    return flags_command(["gsae", "study"], run, ScalingRun())


# The SAEs --------------------------------------------------------------------------------------


def curve_configs(run: ScalingRun) -> list[SAEConfig]:
    """The SAEs of the learning curves: every combination of the sweep, TopK once per k and
    seed (its value mode is irrelevant, so it is always z)."""
    configs = distinct_saes(pipeline.sweep_configs(run.sae))
    if not any(c.beta == 0 for c in configs) or all(c.beta == 0 for c in configs):
        raise GsaeError(f"the study compares TopK with g-SAEs: --beta must list 0 and at least "
                        f"one value above 0, got {run.sae.beta}")
    return configs


def extra_configs(run: ScalingRun) -> list[SAEConfig]:
    """The SAEs of --extra_k: the curve's SAEs (those of --extra_beta and --extra_fisher_coef)
    at each further k."""
    study = run.study
    curve = [c for c in curve_configs(run)
             if (not study.extra_beta or c.beta in study.extra_beta)
             and (not study.extra_fisher_coef or c.fisher_coef in study.extra_fisher_coef)]
    extra = {variant_name(c): c for k in run.study.extra_k if k not in run.sae.k
             for c in (replace(c, k=k) for c in curve)}
    return list(extra.values())


def check_schedule(train: TrainConfig) -> list[int]:
    """The snapshot counts, sorted; each must be reached by the training."""
    counts = sorted(set(train.snapshots))
    if not counts:
        raise GsaeError("the study evaluates snapshots: give --snapshots at least one count")
    if counts[-1] > train.tokens:
        raise GsaeError(f"--snapshots {counts[-1]} is beyond --tokens {train.tokens}: every "
                        "snapshot must be reached by the training")
    return counts


# The stages ------------------------------------------------------------------------------------


def unseen_data(run: ScalingRun) -> dict[str, DataConfig]:
    """The unseen corpora by name, each cut as the training corpus is, every document in one
    part."""
    names = run.study.unseen
    for name in names:
        if name == run.data.dataset:
            raise GsaeError(f"--unseen {name!r} is the training corpus: name corpora that no SAE "
                            "sees in training (e.g. news code)")
        if name == "train" or names.count(name) > 1:
            raise GsaeError(f"--unseen names {name!r} {names.count(name)} times or as 'train' "
                            "(the key of the training corpus's results): name each corpus once")
    corpora = {name: replace(run.data, dataset=name, eval_fraction=0.0) for name in names}
    for data in corpora.values():  # a missing package or an unknown name stops the study now
        next(iter(load_documents(data)), None)
    return corpora


def unseen_cache(out: Path, name: str, settings: dict[str, Any]) -> Path:
    """The evaluation cache of one unseen corpus, `<out>/eval-unseen-<name>.json`. A study of
    one unseen corpus kept it in `eval-unseen.json`: that file is copied to the new name when it
    holds these settings, so its results are reused."""
    path = out / f"eval-unseen-{_slug(name)}.json"
    legacy = out / "eval-unseen.json"
    if not path.is_file() and legacy.is_file():
        saved = read_json(legacy, "an evaluation cache")
        if saved.get("settings") == json.loads(json.dumps(settings)):
            write_json(path, saved)
    return path


def eval_groups(snaps: list[Snapshot], counts_per_eval: int) -> list[list[str]]:
    """The snapshots' names in groups of `counts_per_eval` consecutive snapshot counts (0: one
    group)."""
    counts = sorted({s.requested for s in snaps})
    size = counts_per_eval or len(counts)
    return [[s.name for s in snaps if s.requested in counts[i:i + size]]
            for i in range(0, len(counts), size)]


# The plan --------------------------------------------------------------------------------------


@dataclass
class Corpora:
    """The evaluated token contexts per corpus ("train": the held-out split), and each unseen
    corpus's size in contexts; known once the evaluations are declared."""

    contexts: dict[str, torch.Tensor] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


class ScalingPlan:
    """The learning-curve study as a plan on the study engine: the curve's SAEs with a snapshot
    at every count, the --extra_k SAEs (their last snapshot) in a run folder of their own, an
    evaluation per corpus, steering at the last snapshots, then the distances and per-token
    analyses."""

    def __init__(self, run: ScalingRun, sweep: dict[str, Any] | None = None,
                 typed: ScalingRun | None = None):
        if len(run.source.hooks) != 1:
            raise GsaeError(f"gsae study takes one hook point, got {run.source.hooks}")
        validate(run)
        run.steer.check_sets()
        self.run = run
        self.counts, self.unseen = check_schedule(run.train), unseen_data(run)
        self.curve, self.extra = curve_configs(run), extra_configs(run)
        self.out = Path(run.study.out)
        self.store = study_store(run)
        self.corpora = Corpora()
        self.saes: list[dict[str, Any]] | None = None  # the results' SAE rows, once read
        self.sweep = sweep or {}  # the Fisher sweep's record, when it chose lambda
        self.typed = typed or run  # the settings as given (before the sweep set the lambdas)

    def plan(self) -> StudyPlan:
        run = self.run
        train_run = TrainRun(model=run.model, data=run.data, source=run.source,
                             train=replace(run.train, store=str(self.store),
                                           device=run.train.device or run.model.device))
        settings = identity(run)
        claimed = {"model": model_identity(run.model), "store": str(self.store),
                   "store_tokens": run.study.store_tokens,
                   **as_recorded(self.out / IDENTITY_FILE,
                                 {k: settings[k] for k in SETTINGS_RECORDED})}
        variants = ([Variant(c, "saes", self.counts) for c in self.curve]
                    + [Variant(c, "saes-extra", self.counts[-1:]) for c in self.extra]
                    + self.finetuned())
        return StudyPlan("a study", self.out, IDENTITY_FILE, claimed, run.train.overwrite,
                         run.model, run.data, train_run, self.store, run.study.store_tokens,
                         variants, self.evaluations, Steering(run.steer), self.steps,
                         check_store=True)

    def finetuned(self) -> list[Variant]:
        """The fine-tuned twins of the curve SAEs without the Fisher term (--finetune_fraction):
        each from its snapshot at (1 - share) x --tokens, fine-tuned for the rest."""
        tokens, share = self.run.train.tokens, self.run.study.finetune_fraction
        start = tokens - round(share * tokens)
        if share == 0:
            return []
        if start < 1 or start == tokens:
            raise GsaeError(f"--finetune_fraction {share:g} of --tokens {tokens} leaves "
                            f"{start} tokens of training and {tokens - start} of fine-tuning: "
                            "both must be at least 1")
        cfg = FinetuneConfig(tokens=tokens - start, kl_weight=self.run.study.kl_weight)
        return [Variant(c, group, finetune=Finetune(variant_name(c), start, cfg),
                        label=variant_name(c) + FINETUNED_SUFFIX)
                for group, configs in ((FINETUNED, self.curve), (FINETUNED_EXTRA, self.extra))
                for c in configs if c.fisher_coef == 0]

    def grouped(self, snaps: list[Snapshot]) -> list[list[str]]:
        return eval_groups(snaps, self.run.study.counts_per_eval)

    def evaluations(self, study: Study) -> list[Evaluation]:
        """The held-out split of the training corpus ("train"), then each unseen corpus."""
        wiki_cfg = replace(self.run.eval, json="")
        self.corpora.contexts["train"] = eval_contexts(self.run.data, study.tokenizer, wiki_cfg)
        held_out = Evaluation("train", "eval_train", "eval-train.json", asdict(wiki_cfg),
                              lambda loaded: pipeline.evaluate_held_out(loaded, wiki_cfg),
                              self.grouped)
        return [held_out, *(self.unseen_evaluation(study, name, data)
                            for name, data in self.unseen.items())]

    def unseen_evaluation(self, study: Study, name: str, data: DataConfig) -> Evaluation:
        """One unseen corpus's evaluation, from its start, up to --unseen_tokens."""
        run = self.run
        cfg = pipeline.unseen_eval(run.eval, run.study.unseen_tokens)
        contexts, available = unseen_contexts(data, study.tokenizer, run.study.unseen_tokens)
        assert available is not None
        self.corpora.contexts[name], self.corpora.sizes[name] = contexts, available
        settings = {"corpus": corpus_identity(data), "tokens": run.study.unseen_tokens,
                    "batch_size": run.eval.batch_size}
        return Evaluation(name, f"eval_{name}",
                          unseen_cache(self.out, data.dataset, settings).name, settings,
                          lambda loaded: pipeline.evaluate_unseen(loaded, data, contexts, cfg),
                          self.grouped)

    def steps(self, study: Study, outcome: Outcome) -> list[Step]:
        """The distances, then the per-token analysis of each corpus of --per_token."""
        chosen = per_token_corpora(self, self.result(study, outcome))
        cost = [Step("cost", lambda s, o: self.cost(o))] if self.has_objectives() else []
        return [Step("distances", lambda s, o: self.distances(s)), *cost,
                *(Step(f"per_token_{name}", lambda s, o, name=name: self.per_token(s, o, name))
                  for name in chosen)]

    def distances(self, study: Study) -> dict[str, Any]:
        """Per corpus, the unigram KL of its evaluated tokens against the training split's
        tokens (`gsae.study.registers.unigram_kl`), cached in `<out>/distances.json`."""
        vocabulary, contexts = len(study.tokenizer), self.corpora.contexts
        key = {"reference": corpus_identity(self.run.data), "vocabulary": vocabulary,
               "smoothing": registers.SMOOTHING,
               "corpora": {n: hashlib.sha256(c.numpy().tobytes()).hexdigest()
                           for n, c in contexts.items()}}

        def compute() -> dict[str, Any]:
            reference = torch.stack(list(token_contexts(self.run.data, study.tokenizer, "train")))
            return {"reference_tokens": reference.numel(), "corpora": {
                n: {"unigram_kl": registers.unigram_kl(c, reference, vocabulary),
                    "tokens": c.numel()} for n, c in contexts.items()}}

        return keyed_cache(self.out / DISTANCES_FILE, key, compute)

    def has_objectives(self) -> bool:
        """Whether the study compares training objectives (the Fisher term, KL fine-tuning)."""
        return bool(self.run.study.finetune_fraction) or any(
            c.fisher_coef > 0 for c in self.curve)

    def cost(self, outcome: Outcome) -> dict[str, Any]:
        """Seconds of one training step of each variant (the first seed's settings), measured
        interleaved on the same store batches (`gsae.train.step_seconds`), cached in
        `<out>/cost.json` for this machine; the report multiplies them by the steps taken."""
        train = self.run.train
        firsts = {variant_name(replace(c, seed=0)): c for c in [*self.curve, *self.extra]}
        key = {"saes": list(firsts), "batch_tokens": train.batch_tokens,
               "rounds": COST_ROUNDS, "machine": machine_record(self.run.model.device)}

        def compute() -> dict[str, Any]:
            batches = store_batches(outcome.reader, outcome.hook, train.batch_tokens,
                                    COST_ROUNDS + COST_WARMUP)
            seconds = step_seconds(list(firsts.values()), batches,
                                   replace(train, out=str(self.out)), COST_WARMUP)
            return {"step_seconds": dict(zip(firsts, seconds)), "warmup": COST_WARMUP}

        return keyed_cache(self.out / COST_FILE, key, compute)

    def per_token(self, study: Study, outcome: Outcome, name: str) -> dict[str, Any]:
        """The last curve snapshots' spliced CE increase by quantile bin of the clean per-token
        CE and of |g| on one corpus (`gsae.study.registers.per_token_records`), cached per
        snapshot in `<out>/per-token-<name>.json`."""
        contexts = self.corpora.contexts[name]
        curve = {variant_name(c) for c in self.curve}
        last = [s for s in study.last(outcome) if s.variant in curve]
        cfg = replace(self.run.eval, json="", eval_tokens=contexts.numel(), pool_tokens=0)
        by_name = {s.name: s for s in last}

        def compute(names: list[str]) -> dict[str, Any]:
            losses = TokenLosses()
            pipeline.evaluate_on(study.loaded([by_name[n] for n in names]), contexts, cfg,
                                 token_losses=losses)
            return registers.per_token_records(losses, names)

        settings = {"tokens": hashlib.sha256(contexts.numpy().tobytes()).hexdigest(),
                    "batch_size": cfg.batch_size, "bins": registers.BINS}
        info, records = cached(self.out / f"per-token-{_slug(name)}.json", settings,
                               fingerprints(last), compute, [list(by_name)])
        return {"run": info, "results": [{**r, "snapshot": s.requested, "variant": s.variant}
                                          for s in last for r in records[s.name]]}

    def result(self, study: Study, outcome: Outcome) -> ScalingResult:
        """The study's typed record, from what the engine found so far."""
        run = self.run
        steer_run, steered = outcome.steered or ({}, {})
        return ScalingResult(
            **study.header(command_line(self.typed), outcome),
            store={"folder": str(self.store), **(outcome.store_check or {}),
                   "passes": round(run.train.tokens / max(1, outcome.reader.rows), 2)},
            corpora=self.corpora_record(),
            settings={**to_dict(run), "train": asdict(study.plan.train_run.train)},
            saes=self.sae_rows(study, outcome),
            eval={key: {"run": info, "results": outcome.records(key)}
                  for key, (info, _) in outcome.evaluated.items()},
            steer={"run": steer_run,
                   "results": [{**compact_steering(r), "snapshot": s.requested,
                                "variant": s.variant}
                               for s in study.last(outcome) for r in steered[s.name]]},
            distances=outcome.extra.get("distances", {}),
            per_token={key.removeprefix("per_token_"): value
                       for key, value in outcome.extra.items() if key.startswith("per_token_")},
            fisher_sweep=self.sweep or None,
            cost=outcome.extra.get("cost"),
        )

    def sae_rows(self, study: Study, outcome: Outcome) -> list[dict[str, Any]]:
        """Every SAE as the results list it, with its snapshots; read once (the per-token
        step's preliminary result and the final one share them)."""
        if self.saes is None:
            extra = {variant_name(c) for c in self.extra}
            steps = {v.name: v.finetune for v in study.plan.variants if v.finetune}
            self.saes = [{**sae_record(name, SAE.load(folder), folder),
                          "extra_k": name.removesuffix(FINETUNED_SUFFIX) in extra,
                          "fisher_coef": study.variants[name].config.fisher_coef,
                          "finetuned_from": steps[name].parent if name in steps else None,
                          **({"finetuned_at": steps[name].at} if name in steps else {}),
                          "snapshots": [s.record() for s in outcome.snapshots
                                        if s.variant == name]}
                         for name, folder in outcome.folders.items()]
        return self.saes

    def corpora_record(self) -> dict[str, Any]:
        contexts, sizes = self.corpora.contexts, self.corpora.sizes
        return {"train": {"name": self.run.data.dataset, "part": "eval",
                          "corpus": corpus_identity(self.run.data)},
                **{name: {"name": name, "part": "all", "corpus": corpus_identity(data),
                          "contexts": contexts[name].shape[0], "corpus_contexts": sizes[name]}
                   for name, data in self.unseen.items()}}


SETTINGS_RECORDED = ("model", "data", "source", "train")  # the sections study.json records


def as_recorded(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` (sections of `identity(run)`) without those that the study.json at `path`
    does not record and that hold their default: settings that gsae gained after the study
    was made, which then had, in effect, their default."""
    recorded = read_json(path, "a study's settings") if path.is_file() else {}
    default = identity(ScalingRun())
    return {section: {k: v for k, v in values.items()
                      if k in (recorded.get(section) or {}) or v != default[section].get(k)}
            if isinstance(recorded.get(section), dict) else values
            for section, values in settings.items()}


def _slug(name: str) -> str:
    """A corpus name (perhaps a path) as a piece of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def per_token_corpora(p: ScalingPlan, result: ScalingResult) -> list[str]:
    """The corpora of --per_token, 'largest_gap' resolved from the evaluation's records."""
    chosen = []
    for name in p.run.study.per_token:
        if name == "largest_gap":
            name = largest_gap(result.to_json(), list(p.unseen))
        if name not in ("train", *p.unseen):
            raise GsaeError(f"--per_token {name!r} is not an evaluated corpus: name 'train', "
                            f"one of --unseen ({', '.join(p.unseen)}) or 'largest_gap'")
        if name not in chosen:
            chosen.append(name)
    return chosen


def study_store(run: ScalingRun) -> Path:
    """The study's activation store: --store, else <out>/store."""
    return Path(run.study.store or Path(run.study.out) / "store")


def store_batches(reader: StoreReader, hook: str, rows: int, count: int) -> list[Batch]:
    """`count` batches of `rows` consecutive rows of `hook`, from the store's first shards
    (read again from the start if the store is smaller: they only time steps)."""
    xs: list[torch.Tensor] = []
    gs: list[torch.Tensor] = []
    read = 0
    for name in reader.shards:
        if read >= rows * count:
            break
        batch = reader.read_shard(name)[hook]
        xs.append(batch.x)
        gs.append(batch.g)
        read += len(batch.x)
    repeats = math.ceil(rows * count / read)
    x, g = torch.cat(xs * repeats), torch.cat(gs * repeats)
    return [Batch(x[i * rows:(i + 1) * rows], g[i * rows:(i + 1) * rows], hook)
            for i in range(count)]


def run_study(run: ScalingRun) -> tuple[Path, float]:
    """Run (or finish) the study and write its report; returns the report's markdown and the
    wall time of this invocation in seconds."""
    start = time.perf_counter()
    sweep, typed = None, run
    if run.study.fisher_sweep:
        sweep = run_sweep(run, reference_config(run, curve_configs(run)), study_store(run))
        run = replace(run, sae=replace(run.sae, fisher_coef=[0.0, sweep["chosen"]]))
    scaling = ScalingPlan(run, sweep, typed)
    study = Study(scaling.plan())
    data = scaling.result(study, study.run()).to_json()
    report = build_scaling_report(data, run.study.report or scaling.out / "report")
    if scaling.has_objectives():
        build_objectives_report(data, run.study.objectives_report
                                or scaling.out / "objectives-report")
    if len(scaling.unseen) > 1:
        build_registers_report(data, run.study.registers_report
                               or scaling.out / "registers-report")
    return report, time.perf_counter() - start
