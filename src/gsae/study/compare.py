"""`gsae compare`: TopK SAEs against g-SAEs on one model, hook point and corpus.

Four stages, each reused when an earlier run of the same comparison finished it:

1. the activation store (as `gsae cache`; continued after its last shard when interrupted);
2. training every SAE of the grid (k x beta x value mode x seed) from the store with one
   multi-SAE trainer, so all of them see the same batches; finished SAE folders are kept;
3. evaluation (`gsae.evaluate`) and steering (`gsae.steer`) of every SAE, cached per SAE (by the
   fingerprint of its weights and the stage's settings) in `<out>/eval.json` and
   `<out>/steer.json`;
4. the report (`gsae.study.report`): plots, markdown and a JSON of all numbers.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import matplotlib
import torch

from gsae import pipeline
from gsae.config import flag_names, identity, to_dict, validate
from gsae.errors import GsaeError
from gsae.evaluate import EvalConfig, evaluate
from gsae.io import claim_folder, file_fingerprint, versions, write_json
from gsae.models import ModelConfig, hidden_size, load_model, model_identity
from gsae.pipeline import SAESweep, TrainRun
from gsae.records import ComparisonResult
from gsae.sae import SAE, WEIGHTS_FILE, SAEConfig
from gsae.source import ActivationSource, SourceConfig
from gsae.steer import SteerConfig, steer
from gsae.store import StoreConfig, StoreReader, fill_store
from gsae.study.report import build_report
from gsae.study.results import compact_steering
from gsae.text import DataConfig
from gsae.train import TrainConfig, sae_folder, variant_name

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


def _flag_value(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if text and " " not in text else repr(text)


def flag_text(value: Any, joined: Callable[[Any], str] = " ".join) -> str:
    return joined(map(_flag_value, value)) if isinstance(value, list) else _flag_value(value)


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
    parts = ["gsae", "compare", *(["--quick"] if run.compare.quick else [])]
    names = flag_names(CompareRun)
    for f in fields(CompareRun):
        for g in fields(getattr(run, f.name)):
            value = getattr(getattr(run, f.name), g.name)
            if g.name != "quick" and value != getattr(getattr(default, f.name), g.name):
                joined = ",".join if f.name == "sae" else " ".join
                parts.append(f"{names[f'{f.name}.{g.name}']} {flag_text(value, joined)}")
    return " ".join(parts)


def grid(run: CompareRun) -> list[SAEConfig]:
    """The SAEs to compare: every combination of the `sae` lists, TopK (beta 0) once per k and
    seed, and the sweep's betas only at the fixed k."""
    cfg = run.compare
    if cfg.sweep_beta and cfg.fixed_k not in run.sae.k:
        raise GsaeError(f"the beta sweep runs at --fixed_k {cfg.fixed_k}, which is not one of "
                        f"the values of k {run.sae.k}; add it or give --sweep_beta no values")
    sweep = replace(run.sae, k=[cfg.fixed_k], beta=cfg.sweep_beta) if cfg.sweep_beta else None
    configs: dict[str, SAEConfig] = {}
    for c in itertools.chain(pipeline.sweep_configs(run.sae),
                             pipeline.sweep_configs(sweep) if sweep else []):
        c = replace(c, value_mode=c.value_mode if c.beta > 0 else "z")
        configs.setdefault(variant_name(c), c)
    if not configs:
        raise GsaeError("the comparison grid is empty: give values of k, beta, value_mode, seed")
    return list(configs.values())


def run_compare(run: CompareRun) -> tuple[Path, float]:
    """Run (or finish) the comparison and write its report; returns the report's markdown
    and the wall time in seconds."""
    start = time.perf_counter()
    if run.compare.quick:
        apply_quick(run)
    if len(run.source.hooks) != 1:
        raise GsaeError(f"gsae compare takes one hook point, got {run.source.hooks}")
    validate(run)
    run.steer.check_sets()
    out = Path(run.compare.out)
    store = Path(run.compare.store or out / "store")
    stages: dict[str, float] = {}
    model, tokenizer = load_model(run.model)
    model_id = model_identity(run.model)
    configs = grid(run)
    for sae_cfg in configs:
        sae_cfg.validate(hidden_size(model))
    train_run = TrainRun(model=run.model, data=run.data, source=run.source,
                         train=replace(run.train, out=str(out / "saes"), store=str(store),
                                       device=run.train.device or run.model.device))
    settings = identity(run)
    # The grid, evaluation and steering settings may change: finished pieces are reused.
    claim_folder(out, IDENTITY_FILE, {"model": model_id, "store": str(store),
                                      "store_tokens": run.compare.store_tokens,
                                      **{k: settings[k] for k in ("model", "data", "source",
                                                                  "train")}},
                 "a comparison", run.train.overwrite)

    t = time.perf_counter()
    source = ActivationSource(model, run.source, with_grad=True)
    fill_store(StoreConfig(store=str(store), tokens=run.compare.store_tokens), source, run.data,
               tokenizer, model_id)
    reader = StoreReader(store)
    stages["store"] = time.perf_counter() - t

    t = time.perf_counter()
    (hook,) = reader.hooks
    folders = {variant_name(c): sae_folder(train_run.train.out, hook, c) for c in configs}
    pipeline.train_missing(train_run, configs, hook)
    stages["train"] = time.perf_counter() - t

    saes = {name: SAE.load(folder, device=run.model.device) for name, folder in folders.items()}
    prints = {name: file_fingerprint(folder / WEIGHTS_FILE) for name, folder in folders.items()}

    def run_eval(names: list[str]) -> dict[str, Any]:
        return evaluate([saes[n] for n in names], model, tokenizer, run.data,
                        replace(run.eval, json=""), names=names, model_id=model_id).to_json()

    def run_steer(names: list[str]) -> dict[str, Any]:
        return steer([saes[n] for n in names], model, tokenizer, run.data, run.steer,
                     names=names, model_id=model_id).to_json()

    t = time.perf_counter()
    eval_run, evals = cached(out / "eval.json", asdict(run.eval), prints, run_eval,
                              [list(prints)])
    stages["eval"] = time.perf_counter() - t
    t = time.perf_counter()
    by_k = [[n for n in prints if saes[n].k == k] for k in sorted({s.k for s in saes.values()})]
    steer_run, steers = cached(out / "steer.json", asdict(run.steer), prints, run_steer, by_k)
    stages["steer"] = time.perf_counter() - t

    results = ComparisonResult(
        command=command_line(run),
        created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        versions={**versions(), "matplotlib": matplotlib.__version__},
        machine=machine_record(run.model.device),
        wall_seconds=round(time.perf_counter() - start, 1),
        stage_seconds={k: round(v, 1) for k, v in stages.items()},
        model=model_id,
        hook=hook,
        store_tokens=reader.rows,
        settings={**to_dict(run), "train": asdict(train_run.train)},
        saes=[sae_record(name, saes[name], folders[name]) for name in folders],
        eval={"run": eval_run, "results": [r for n in prints for r in evals[n]]},
        steer={"run": steer_run,
               "results": [compact_steering(r) for n in prints for r in steers[n]]},
    )
    report = build_report(results.to_json(), run.compare.report or out / "report")
    return report, time.perf_counter() - start


# Stages -----------------------------------------------------------------------------------------


def cached(
    path: Path, settings: dict[str, Any], fingerprints: dict[str, str],
    compute: Callable[[list[str]], dict[str, Any]], groups: list[list[str]],
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Per-SAE results of one stage, computed only for the SAEs (named in `fingerprints`) that
    `path` does not hold for these settings and weights; `compute` runs on each group's missing
    SAEs in turn, and `path` is rewritten after each. Returns the stage's run info and the
    records of every SAE."""
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get("settings") != json.loads(json.dumps(settings)):
        cache = {"settings": settings, "run": None, "saes": {}}
    entries = cache["saes"]
    for group in groups:
        todo = [n for n in group
                if entries.get(n, {}).get("fingerprint") != fingerprints[n]]
        if not todo:
            continue
        result = compute(todo)
        for name in todo:
            entries[name] = {"fingerprint": fingerprints[name],
                             "records": [r for r in result["results"] if r["sae"] == name]}
        cache["run"] = result["run"]
        write_json(path, cache)
    return cache["run"], {n: entries[n]["records"] for n in fingerprints}


# Records ----------------------------------------------------------------------------------------


def sae_record(name: str, sae: SAE, folder: Path) -> dict[str, Any]:
    log = (folder / "log.jsonl").read_text().splitlines()
    return {"name": name, "folder": str(folder), "k": sae.k, "beta": sae.beta,
            "value_mode": sae.cfg.value_mode, "seed": sae.cfg.seed,
            "n_latents": sae.n_latents, "train": json.loads(log[-1]) if log else {}}


def machine_record(device: str) -> dict[str, Any]:
    accelerator = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    threads = torch.get_num_threads()
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": threads, "device": device, "accelerator": accelerator,
            "description": accelerator or f"{os.cpu_count()} CPU cores ({threads} torch threads, "
                                          f"{platform.machine()})"}
