"""`gsae compare`: TopK SAEs against g-SAEs on one model, hook point and corpus.

A plan on the study engine (`gsae.study.engine`): the store (as `gsae cache`), every SAE of
the grid (k x beta x value mode x seed) trained from it as one run, so all of them see the same
batches, then evaluated (`gsae eval`, cached in `<out>/eval.json`) and steered (`gsae steer`,
cached in `<out>/steer.json`) per SAE; the report (`gsae.study.report`) holds plots, markdown and
a JSON of all numbers.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gsae import pipeline
from gsae.config import identity, to_dict, validate
from gsae.errors import GsaeError
from gsae.evaluate import EvalConfig
from gsae.models import ModelConfig, model_identity
from gsae.pipeline import SAESweep, TrainRun
from gsae.records import ComparisonResult
from gsae.sae import SAE, SAEConfig
from gsae.source import SourceConfig
from gsae.steer import SteerConfig
from gsae.study.engine import (
    Evaluation,
    Outcome,
    Steering,
    Study,
    StudyPlan,
    Variant,
    distinct_saes,
    flag_text,
    sae_record,
)
from gsae.study.engine import (
    command_line as flags_command,
)
from gsae.study.report import build_report
from gsae.study.results import compact_steering
from gsae.text import DataConfig
from gsae.train import TrainConfig

IDENTITY_FILE = "compare.json"

# Settings of --quick, for the settings left at their defaults.
QUICK: dict[str, Any] = {
    "compare.out": "runs/compare-quick",
    "compare.store_tokens": 30_000,
    "train.tokens": 60_000,
    "sae.k": [16, 32],
    "sae.beta": [0.0, 100.0],
    "compare.sweep_beta": [],
    "sae.value_mode": ["z"],
    "train.dead_tokens": 20_000,
    "eval.eval_tokens": 4096,
    "steer.latents": 12,
    "steer.pool": 32,
}


def _quick_help() -> str:
    shown = ", ".join(f"{key.split('.')[1]} {flag_text(v)}" for key, v in QUICK.items())
    return (f"a small setting, about 15 minutes on 2 idle CPU cores; it sets {shown} (each only "
            "if that setting is left at its default)")


@dataclass
class CompareConfig:
    """The folders, store size and beta sweep of a comparison of TopK and g-SAEs."""

    out: str = field(
        default="runs/compare",
        metadata={"help": "work folder: store, SAEs, evaluation and steering results (reused "
                  "when the command is run again)", "identity": False},
    )
    report: str = field(default="", metadata={"help": "report folder; empty: <out>/report",
                                              "identity": False})
    store: str = field(
        default="", metadata={"help": "activation store, built if missing; empty: <out>/store"}
    )
    store_tokens: int = field(default=150_000, metadata={"help": "tokens in the store",
                                                         "min": 1})
    sweep_beta: list[float] = field(
        default_factory=lambda: [30.0, 1000.0],
        metadata={"help": "further values of beta trained only at --fixed_k (the beta sweep); "
                  "give the flag alone for none", "may_be_empty": True, "min": 0},
    )
    fixed_k: int = field(
        default=32, metadata={"help": "k of the headline comparison and of the beta sweep",
                              "min": 1}
    )
    quick: bool = field(default=False, metadata={"help": _quick_help()})


@dataclass
class CompareRun:
    """Everything `gsae compare` needs. The SAE grid is every combination of the `sae` lists
    (TopK, beta 0, once per k and seed), plus `compare.sweep_beta` at `compare.fixed_k`; the
    training, evaluation and steering sections are those of `gsae train`, `gsae eval` and
    `gsae steer` with this study's defaults (`train.out` and `train.store` are set by the
    comparison from `compare.out` and `compare.store`)."""

    compare: CompareConfig = field(default_factory=CompareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    sae: SAESweep = field(default_factory=lambda: SAESweep(  # type: ignore[valid-type]
        k=[8, 16, 32, 64], beta=[0.0, 100.0], value_mode=["z", "score"], seed=[0, 1]))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(tokens=150_000))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(eval_tokens=8192))
    steer: SteerConfig = field(default_factory=SteerConfig)


def apply_quick(run: CompareRun) -> None:
    """Give every setting named in QUICK that is still at its default the quick value."""
    default = CompareRun()
    for key, value in QUICK.items():
        section, name = key.split(".")
        if getattr(getattr(run, section), name) == getattr(getattr(default, section), name):
            setattr(getattr(run, section), name, value)


def command_line(run: CompareRun) -> str:
    """The `gsae compare` command that reproduces these settings: --quick if set, then every
    flag whose value differs from its default (after --quick)."""
    default = CompareRun()
    if run.compare.quick:
        apply_quick(default)
    words = ["gsae", "compare", *(["--quick"] if run.compare.quick else [])]
    return flags_command(words, run, default, skip=("quick",))


def grid(run: CompareRun) -> list[SAEConfig]:
    """The SAEs to compare: every combination of the `sae` lists, TopK (beta 0) once per k and
    seed, and the sweep's betas only at the fixed k."""
    cfg = run.compare
    if cfg.sweep_beta and cfg.fixed_k not in run.sae.k:
        raise GsaeError(f"the beta sweep runs at --fixed_k {cfg.fixed_k}, which is not one of "
                        f"the values of k {run.sae.k}; add it or give --sweep_beta no values")
    sweep = replace(run.sae, k=[cfg.fixed_k], beta=cfg.sweep_beta) if cfg.sweep_beta else None
    configs = distinct_saes(itertools.chain(pipeline.sweep_configs(run.sae),
                                            pipeline.sweep_configs(sweep) if sweep else []))
    if not configs:
        raise GsaeError("the comparison grid is empty: give values of k, beta, value_mode, seed")
    return configs


def compare_plan(run: CompareRun) -> StudyPlan:
    """The comparison as a plan on the study engine (settings checked; --quick applied)."""
    if run.compare.quick:
        apply_quick(run)
    if len(run.source.hooks) != 1:
        raise GsaeError(f"gsae compare takes one hook point, got {run.source.hooks}")
    validate(run)
    run.steer.check_sets()
    out = Path(run.compare.out)
    store = Path(run.compare.store or out / "store")
    train_run = TrainRun(model=run.model, data=run.data, source=run.source,
                         train=replace(run.train, out=str(out / "saes"), store=str(store),
                                       device=run.train.device or run.model.device))
    settings = identity(run)
    # The grid, evaluation and steering settings may change: finished pieces are reused.
    claimed = {"model": model_identity(run.model), "store": str(store),
               "store_tokens": run.compare.store_tokens,
               **{k: settings[k] for k in ("model", "data", "source", "train")}}
    eval_cfg = replace(run.eval, json="")
    held_out = Evaluation("eval", "eval", "eval.json", asdict(run.eval),
                          lambda loaded: pipeline.evaluate_held_out(loaded, eval_cfg))
    return StudyPlan(what="a comparison", out=out, identity_file=IDENTITY_FILE,
                     identity=claimed, overwrite=run.train.overwrite, model=run.model,
                     data=run.data, train_run=train_run, store=store,
                     store_tokens=run.compare.store_tokens,
                     variants=[Variant(c) for c in grid(run)],
                     evaluations=lambda study: [held_out], steering=Steering(run.steer))


def run_compare(run: CompareRun) -> tuple[Path, float]:
    """Run (or finish) the comparison and write its report; returns the report's markdown
    and the wall time of this invocation in seconds."""
    start = time.perf_counter()
    study = Study(compare_plan(run))
    outcome = study.run()
    results = comparison_result(run, study, outcome)
    report = build_report(results.to_json(), run.compare.report or study.plan.out / "report")
    return report, time.perf_counter() - start


def comparison_result(run: CompareRun, study: Study, outcome: Outcome) -> ComparisonResult:
    """The comparison's typed record, from what the engine found."""
    (eval_run, evals), names = outcome.evaluated["eval"], list(outcome.folders)
    steer_run, steers = outcome.steered or ({}, {})
    return ComparisonResult(
        **study.header(command_line(run), outcome),
        store_tokens=outcome.reader.rows,
        settings={**to_dict(run), "train": asdict(study.plan.train_run.train)},
        saes=[sae_record(n, SAE.load(outcome.folders[n]), outcome.folders[n]) for n in names],
        eval={"run": eval_run, "results": [r for n in names for r in evals[n]]},
        steer={"run": steer_run,
               "results": [compact_steering(r) for n in names for r in steers[n]]},
    )
