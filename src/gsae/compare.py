"""`gsae compare`: TopK SAEs against g-SAEs on one model, hook point and corpus.

Four stages, each reused when an earlier run of the same comparison finished it:

1. the activation store (as `gsae cache`; continued after its last shard when interrupted);
2. training every SAE of the grid (k x beta x value mode x seed) from the store with one
   multi-SAE trainer, so all of them see the same batches; finished SAE folders are kept;
3. evaluation (`gsae.evaluate`) and steering (`gsae.steer`) of every SAE, cached per SAE (by the
   fingerprint of its weights and the stage's settings) in `<out>/eval.json` and
   `<out>/steer.json`;
4. the report (`gsae.report`): plots, markdown and a JSON of all numbers.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import matplotlib
import torch
import transformers

import gsae
from gsae.cache import file_fingerprint
from gsae.errors import GsaeError
from gsae.evaluate import EvalConfig, evaluate, write_json
from gsae.models import ModelConfig, hidden_size, load_model, model_identity
from gsae.report import SCHEMA, build_report, compact_steering
from gsae.sae import SAE, WEIGHTS_FILE, SAEConfig
from gsae.source import ActivationSource, SourceConfig
from gsae.steer import SteerConfig, steer
from gsae.store import StoreConfig, StoreReader, fill_store
from gsae.text import DataConfig
from gsae.train import (
    TrainConfig,
    Trainer,
    checkpoint_dir,
    comparable_settings,
    finished_training,
    sae_folder,
    variant_name,
)

IDENTITY_FILE = "compare.json"


def _flag_value(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if text and " " not in text else repr(text)


def _show(value: Any) -> str:
    return " ".join(map(_flag_value, value)) if isinstance(value, list) else _flag_value(value)


# Settings of --quick, for the settings left at their defaults.
QUICK: dict[str, Any] = {
    "out": "runs/compare-quick",
    "store_tokens": 30_000,
    "tokens": 60_000,
    "k": [16, 32],
    "beta": [0.0, 100.0],
    "sweep_beta": [],
    "value_mode": ["z"],
    "dead_tokens": 20_000,
    "eval_tokens": 4096,
    "latents": 12,
    "pool": 32,
}


@dataclass
class CompareConfig:
    """The grid, budgets and folders of a comparison of TopK and g-SAEs."""

    out: str = field(
        default="runs/compare",
        metadata={"help": "work folder: store, SAEs, evaluation and steering results (reused "
                  "when the command is run again)"},
    )
    report: str = field(default="", metadata={"help": "report folder; empty: <out>/report"})
    store: str = field(
        default="", metadata={"help": "activation store, built if missing; empty: <out>/store"}
    )
    store_tokens: int = field(default=150_000, metadata={"help": "tokens in the store"})
    tokens: int = field(
        default=150_000,
        metadata={"help": "training tokens per SAE (the store is read again if smaller)"},
    )
    k: list[int] = field(default_factory=lambda: [8, 16, 32, 64],
                         metadata={"help": "values of k"})
    beta: list[float] = field(
        default_factory=lambda: [0.0, 100.0],
        metadata={"help": "values of beta trained at every k; 0 is the TopK baseline"},
    )
    sweep_beta: list[float] = field(
        default_factory=lambda: [30.0, 1000.0],
        metadata={"help": "further values of beta trained only at --fixed_k (the beta sweep); "
                  "give the flag alone for none", "may_be_empty": True},
    )
    value_mode: list[str] = field(
        default_factory=lambda: ["z", "score"],
        metadata={"help": "g-SAE value modes (TopK is trained once, its value mode is moot)"},
    )
    seed: list[int] = field(default_factory=lambda: [0, 1],
                            metadata={"help": "seeds of the SAE initialisation"})
    expansion_factor: int = field(default=16, metadata={"help": "latents per input dimension"})
    batch_tokens: int = field(
        default=TrainConfig.batch_tokens, metadata={"help": "tokens per SAE optimiser step"}
    )
    lr: float = field(
        default=TrainConfig.lr,
        metadata={"help": "Adam learning rate; 0 picks gsae train's width-scaled default"},
    )
    dead_tokens: int = field(
        default=TrainConfig.dead_tokens,
        metadata={"help": "training: a latent not selected for this many tokens is dead (AuxK)"},
    )
    eval_tokens: int = field(
        default=8192, metadata={"help": "held-out tokens for the evaluation of every SAE"}
    )
    fixed_k: int = field(
        default=32, metadata={"help": "k of the headline comparison and of the beta sweep"}
    )
    quick: bool = field(
        default=False,
        metadata={"help": "a small setting, about 15 minutes on 2 idle CPU cores; it sets "
                  + ", ".join(f"{k} {_show(v)}" for k, v in QUICK.items())
                  + " (each only if that flag is left at its default)"},
    )


def apply_quick(*configs: Any) -> None:
    """Give every field named in QUICK that is still at its default the quick value."""
    for cfg in configs:
        for f in fields(cfg):
            if f.name in QUICK and getattr(cfg, f.name) == _default(f):
                setattr(cfg, f.name, QUICK[f.name])


def command_line(configs: Sequence[Any]) -> str:
    """The `gsae compare` command that reproduces these settings: --quick if set, then every
    flag whose value differs from its default (after --quick)."""
    quick = any(getattr(c, "quick", False) for c in configs)
    parts = ["gsae", "compare", *(["--quick"] if quick else [])]
    for cfg in configs:
        for f in fields(cfg):
            default = QUICK.get(f.name, _default(f)) if quick else _default(f)
            value = getattr(cfg, f.name)
            if f.name == "quick" or value == default:
                continue
            name = f"steer.{f.name}" if isinstance(cfg, SteerConfig) else f.name
            parts.append(f"--{name} {_show(value)}")
    return " ".join(parts)


def grid(cfg: CompareConfig) -> list[SAEConfig]:
    """The SAEs to compare: TopK (beta 0) once per k and seed, g-SAEs for every beta > 0 and
    value mode; the sweep's betas only at the fixed k."""
    if cfg.sweep_beta and cfg.fixed_k not in cfg.k:
        raise GsaeError(f"the beta sweep runs at --fixed_k {cfg.fixed_k}, which is not one of "
                        f"the values of k {cfg.k}; add it or give --sweep_beta no values")
    configs: dict[str, SAEConfig] = {}
    every_k = itertools.product(cfg.k, cfg.beta, cfg.value_mode, cfg.seed)
    sweep = itertools.product([cfg.fixed_k], cfg.sweep_beta, cfg.value_mode, cfg.seed)
    for k, beta, mode, seed in itertools.chain(every_k, sweep):
        sae_cfg = SAEConfig(expansion_factor=cfg.expansion_factor, k=k, beta=beta,
                            value_mode=mode if beta > 0 else "z", seed=seed)
        configs.setdefault(variant_name(sae_cfg), sae_cfg)
    if not configs:
        raise GsaeError("the comparison grid is empty: give values of k, beta, value_mode, seed")
    return list(configs.values())


def run_compare(cfg: CompareConfig, model_cfg: ModelConfig, data_cfg: DataConfig,
                source_cfg: SourceConfig, steer_cfg: SteerConfig) -> Path:
    """Run (or finish) the comparison and write its report; returns the report's markdown."""
    start = time.perf_counter()
    if len(source_cfg.hooks) != 1:
        raise GsaeError(f"gsae compare takes one hook point, got {source_cfg.hooks}")
    steer_cfg.validate()
    out = Path(cfg.out)
    store = Path(cfg.store or out / "store")
    stages: dict[str, float] = {}
    model, tokenizer = load_model(model_cfg)
    model_id = model_identity(model_cfg)
    configs = grid(cfg)
    for sae_cfg in configs:
        sae_cfg.validate(hidden_size(model))
    train_cfg = TrainConfig(out=str(out / "saes"), store=str(store), tokens=cfg.tokens,
                            batch_tokens=cfg.batch_tokens, lr=cfg.lr,
                            dead_tokens=cfg.dead_tokens, sae_device=model_cfg.device)
    _check_identity(out, comparable_settings({
        "model": model_id, "model_dtype": model_cfg.dtype, "data": asdict(data_cfg),
        "source": asdict(source_cfg), "store": str(store), "store_tokens": cfg.store_tokens,
        "train": asdict(train_cfg),
    }))

    t = time.perf_counter()
    source = ActivationSource(model, source_cfg, with_grad=True)
    fill_store(StoreConfig(store=str(store), tokens=cfg.store_tokens), source, data_cfg,
               tokenizer, model_id)
    reader = StoreReader(store)
    stages["store"] = time.perf_counter() - t

    t = time.perf_counter()
    (hook,) = reader.hooks
    folders = {variant_name(c): sae_folder(train_cfg.out, hook, c) for c in configs}
    _train([c for c in configs if not finished_training(folders[variant_name(c)])], train_cfg,
           reader)
    stages["train"] = time.perf_counter() - t

    saes = {name: SAE.load(folder, device=model_cfg.device) for name, folder in folders.items()}
    prints = {name: file_fingerprint(folder / WEIGHTS_FILE) for name, folder in folders.items()}
    eval_cfg = EvalConfig(eval_tokens=cfg.eval_tokens)

    def run_eval(names: list[str]) -> dict[str, Any]:
        return evaluate([saes[n] for n in names], model, tokenizer, data_cfg, eval_cfg,
                        names=names, model_id=model_id).to_json()

    def run_steer(names: list[str]) -> dict[str, Any]:
        return steer([saes[n] for n in names], model, tokenizer, data_cfg, steer_cfg,
                     names=names, model_id=model_id).to_json()

    t = time.perf_counter()
    eval_run, evals = _cached(out / "eval.json", asdict(eval_cfg), prints, run_eval,
                              [list(prints)])
    stages["eval"] = time.perf_counter() - t
    t = time.perf_counter()
    by_k = [[n for n in prints if saes[n].k == k] for k in sorted({s.k for s in saes.values()})]
    steer_run, steers = _cached(out / "steer.json", asdict(steer_cfg), prints, run_steer, by_k)
    stages["steer"] = time.perf_counter() - t

    results = {
        "schema": SCHEMA,
        "command": command_line([cfg, model_cfg, data_cfg, source_cfg, steer_cfg]),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": {"gsae": gsae.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "matplotlib": matplotlib.__version__,
                     "python": platform.python_version()},
        "machine": _machine(model_cfg.device),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
        "model": model_id,
        "hook": hook,
        "store_tokens": reader.rows,
        "settings": {"compare": asdict(cfg), "model": asdict(model_cfg),
                     "data": asdict(data_cfg), "source": asdict(source_cfg),
                     "train": asdict(train_cfg), "eval": asdict(eval_cfg),
                     "steer": asdict(steer_cfg)},
        "saes": [_sae_record(name, saes[name], folders[name]) for name in folders],
        "eval": {"run": eval_run, "results": [r for n in prints for r in evals[n]]},
        "steer": {"run": steer_run,
                  "results": [compact_steering(r) for n in prints for r in steers[n]]},
    }
    return build_report(results, cfg.report or out / "report")


# Stages -----------------------------------------------------------------------------------------


def _check_identity(out: Path, identity: dict[str, Any]) -> None:
    """Refuse a work folder made with other data or training settings (the grid, evaluation
    and steering settings may change: finished pieces are reused)."""
    path = out / IDENTITY_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != json.loads(json.dumps(identity)):
            diff = sorted(k for k in set(previous) | set(identity)
                          if json.dumps(previous.get(k)) != json.dumps(identity.get(k)))
            raise GsaeError(f"{out} holds a comparison made with other settings (differs in: "
                            f"{', '.join(diff)}); choose another --out or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(identity, path)


def _train(configs: list[SAEConfig], train_cfg: TrainConfig, reader: StoreReader) -> None:
    """Train the SAEs not finished yet, all on the same batches of the store; an interrupted
    training of exactly these SAEs is continued from its checkpoints."""
    if not configs:
        return
    (hook,) = reader.hooks
    run_config = {"command": "compare", "train": asdict(train_cfg),
                  "sweep": [asdict(c) for c in configs], "store": reader.identity}
    out = Path(train_cfg.out)
    previous = out / "run.json"
    resumable = (previous.is_file()
                 and json.loads(previous.read_text()).get("sweep") == run_config["sweep"]
                 and all(checkpoint_dir(sae_folder(out, hook, c)) for c in configs))
    train_cfg = replace(train_cfg, resume=resumable, overwrite=not resumable)
    saes = [(SAE(replace(c), reader.d_in, metadata={**reader.sae_metadata, "hook": hook}), hook)
            for c in configs]
    trainer = Trainer.create(saes, train_cfg, run_config)
    trainer.fit(reader.chunks(seed=train_cfg.data_seed, skip=trainer.chunks_done))


def _cached(
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
        write_json(cache, path)
    return cache["run"], {n: entries[n]["records"] for n in fingerprints}


# Records ----------------------------------------------------------------------------------------


def _sae_record(name: str, sae: SAE, folder: Path) -> dict[str, Any]:
    log = (folder / "log.jsonl").read_text().splitlines()
    return {"name": name, "folder": str(folder), "k": sae.k, "beta": sae.beta,
            "value_mode": sae.cfg.value_mode, "seed": sae.cfg.seed,
            "n_latents": sae.n_latents, "train": json.loads(log[-1]) if log else {}}


def _machine(device: str) -> dict[str, Any]:
    accelerator = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    threads = torch.get_num_threads()
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": threads, "device": device, "accelerator": accelerator,
            "description": accelerator or f"{os.cpu_count()} CPU cores ({threads} torch threads, "
                                          f"{platform.machine()})"}


def _default(f: Any) -> Any:
    return f.default_factory() if callable(f.default_factory) else f.default
