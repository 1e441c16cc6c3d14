"""The study engine: a study is a plan, and one engine runs every plan.

A plan (`StudyPlan`) declares what a study is made of: its work folder and store, the SAE
variants (each with the run folder it trains in and the snapshot counts that are evaluated),
the evaluations (one per corpus), the steering, and any further stages. The engine (`Study`)
runs it in stages that are each reused when an earlier run of the same study finished them:

1. the activation store (`gsae.store.fill_store`, continued after its last shard when
   interrupted), and optionally its count of exactly repeated rows;
2. training (`gsae.pipeline.train_missing`: finished SAEs are kept, an interrupted run is
   resumed), then the snapshots that trained SAEs lack, made by replaying their training;
3. each evaluation and the steering, through `gsae.pipeline`'s entry points, cached per
   snapshot by the fingerprint of its weights (`cached`: the one cache rule);
4. the plan's further stages, in order.

The engine also keeps the stage clock (seconds per stage, summed over every run of the study)
and the machine record. `gsae compare` and `gsae study` are two plans on it; their reports are
built from the engine's `Outcome` by the plan's owner.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import matplotlib
import torch

from gsae import pipeline
from gsae.caching import fill_store
from gsae.config import flag_names
from gsae.errors import GsaeError
from gsae.finetune import FinetuneConfig
from gsae.io import claim_folder, file_fingerprint, read_json, versions, write_json
from gsae.models import ModelConfig, hidden_size, load_model, model_identity
from gsae.pipeline import FinetuneRun, LoadedModel, TrainRun
from gsae.records import EvalResult, SteerResult
from gsae.sae import CONFIG_FILE, SAE, WEIGHTS_FILE, SAEConfig, config_from_record
from gsae.source import ActivationSource
from gsae.steer import SteerConfig
from gsae.store import StoreConfig, StoreReader
from gsae.text import DataConfig
from gsae.train import finished_training, sae_folder, snapshot_folder, variant_name

CLOCK_FILE = "stage-seconds.json"
STORE_CHECK_FILE = "store-check.json"
REPLAY_DIR = "snapshot-replay"  # scratch run folder: snapshots added after training

StageRecords = tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]  # run info, records


# The plan -------------------------------------------------------------------------------------


@dataclass
class Finetune:
    """How a variant is made by fine-tuning another: `gsae finetune` with `cfg` (its `out` set
    by the engine) from the variant `parent` as it was at its snapshot of `at` tokens."""

    parent: str
    at: int
    cfg: FinetuneConfig


@dataclass
class Variant:
    """One SAE of a study: its settings, the run folder under the work folder that makes it
    (the SAEs of one folder train together, on the same batches), the snapshot counts of it
    that are evaluated (none: the finished SAE), and, for a fine-tuned variant, its fine-tuning
    step (`config` is then the parent's, and `label` names the variant)."""

    config: SAEConfig
    group: str = "saes"
    counts: list[int] = field(default_factory=list)
    finetune: Finetune | None = None
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or variant_name(self.config)

    @property
    def total_tokens(self) -> int:
        """The tokens a fine-tuned variant has seen: its parent's, then the fine-tuning's."""
        return self.finetune.at + self.finetune.cfg.tokens if self.finetune else 0


@dataclass
class Snapshot:
    """One saved state of one variant: its name in the caches and results, where it is, and
    the token count it was requested at (0: the finished SAE)."""

    name: str
    variant: str
    requested: int
    folder: Path

    def fingerprint(self) -> str:
        return file_fingerprint(self.folder / WEIGHTS_FILE)

    def record(self) -> dict[str, Any]:
        """Where it is and when it was saved (a fine-tuned SAE, saved once at the end of its
        run, has no snapshot record: its requested count is its total budget)."""
        path = self.folder / "snapshot.json"
        saved = (read_json(path, "a snapshot record") if path.is_file()
                 else {"requested_tokens": self.requested})
        return {"name": self.name, "folder": str(self.folder), **saved}


Evaluator = Callable[[LoadedModel], EvalResult]


@dataclass
class Evaluation:
    """One evaluation stage: the key of its results, its clock name, its cache file in the work
    folder and the settings the cache is valid for, how a group of loaded snapshots is
    evaluated (a `gsae.pipeline` entry point), and which snapshots are evaluated together in
    one pass (`group`: snapshot names in groups; default one group)."""

    key: str
    stage: str
    cache: str
    settings: dict[str, Any]
    evaluate: Evaluator
    group: Callable[[list[Snapshot]], list[list[str]]] | None = None


@dataclass
class Steering:
    """The steering stage: its settings and cache file; the snapshots of each k steer together."""

    cfg: SteerConfig
    cache: str = "steer.json"


@dataclass
class Step:
    """A further stage, run after the evaluations and steering: `run(study, outcome)` is kept in
    `outcome.extra[name]`."""

    name: str
    run: Callable[[Study, Outcome], Any]


@dataclass
class StudyPlan:
    """Everything the engine runs: the work folder (claimed for `identity` under
    `identity_file`), the store, the training run every variant is trained with, the variants,
    the evaluations, the steering and the further stages."""

    what: str  # the study's kind in messages, e.g. "a study"
    out: Path
    identity_file: str
    identity: dict[str, Any]
    overwrite: bool
    model: ModelConfig
    data: DataConfig
    train_run: TrainRun
    store: Path
    store_tokens: int
    variants: list[Variant]
    evaluations: Callable[[Study], list[Evaluation]]
    steering: Steering | None = None
    steps: Callable[[Study, Outcome], list[Step]] | None = None  # declared once evaluated
    check_store: bool = False

    def groups(self, finetuned: bool | None = None) -> dict[str, list[Variant]]:
        """The variants by run folder, in order of first appearance (only the trained ones, or
        only the fine-tuned ones, if `finetuned` says which)."""
        groups: dict[str, list[Variant]] = {}
        for v in self.variants:
            if finetuned is None or finetuned == (v.finetune is not None):
                groups.setdefault(v.group, []).append(v)
        return groups

    def saved_counts(self, variants: list[Variant]) -> list[int]:
        """The snapshot counts that these trained variants must have: those evaluated, and
        those that fine-tuning starts from."""
        names = {v.name for v in variants}
        starts = {v.finetune.at for v in self.variants if v.finetune and v.finetune.parent in names}
        return sorted({n for v in variants for n in v.counts} | starts)


@dataclass
class Outcome:
    """What the engine found: the store, the SAE folders, the snapshots and every stage's
    records."""

    reader: StoreReader
    store_check: dict[str, Any] | None
    folders: dict[str, Path]
    snapshots: list[Snapshot]
    evaluated: dict[str, StageRecords] = field(default_factory=dict)
    steered: StageRecords | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hook(self) -> str:
        return self.reader.hooks[0]

    def records(self, key: str) -> list[dict[str, Any]]:
        """One evaluation's records, each with its snapshot count and variant."""
        records = self.evaluated[key][1]
        return [{**r, "snapshot": s.requested, "variant": s.variant}
                for s in self.snapshots if s.name in records for r in records[s.name]]


# The engine -----------------------------------------------------------------------------------


class Study:
    """Runs a `StudyPlan`: loads the model, claims the work folder, and runs the stages."""

    def __init__(self, plan: StudyPlan):
        self.plan = plan
        self.model, self.tokenizer = load_model(plan.model)
        self.model_id = model_identity(plan.model)
        for v in plan.variants:
            v.config.validate(hidden_size(self.model))
        claim_folder(plan.out, plan.identity_file, plan.identity, plan.what, plan.overwrite)
        self.clock = StageClock(plan.out / CLOCK_FILE)
        self.variants = {v.name: v for v in plan.variants}

    def run(self) -> Outcome:
        """Every stage in turn; what they found."""
        with self.clock.stage("store"):
            reader, check = self.store()
        with self.clock.stage("train"):
            folders = self.train(reader.hooks[0])
        if self.plan.groups(finetuned=True):
            with self.clock.stage("finetune"):
                folders.update(self.finetune(reader.hooks[0], folders))
        outcome = Outcome(reader, check, folders, self.snapshots(folders))
        for evaluation in self.plan.evaluations(self):
            with self.clock.stage(evaluation.stage):
                outcome.evaluated[evaluation.key] = self.evaluate(evaluation, outcome.snapshots)
        if self.plan.steering:
            with self.clock.stage("steer"):
                outcome.steered = self.steer(self.plan.steering, self.last(outcome))
        for step in self.plan.steps(self, outcome) if self.plan.steps else []:
            with self.clock.stage(step.name):
                outcome.extra[step.name] = step.run(self, outcome)
        return outcome

    def store(self) -> tuple[StoreReader, dict[str, Any] | None]:
        """Build (or finish) the store; its reader and, if the plan asks, the repeated rows."""
        plan = self.plan
        source = ActivationSource(self.model, plan.train_run.source, with_grad=True)
        fill_store(StoreConfig(store=str(plan.store), tokens=plan.store_tokens), source,
                   plan.data, self.tokenizer, self.model_id)
        reader = StoreReader(plan.store)
        return reader, store_check(plan.out, reader) if plan.check_store else None

    def train(self, hook: str) -> dict[str, Path]:
        """Train (or finish) every run folder's variants, keeping finished SAEs, and give each
        the snapshots it lacks; the SAE folders by variant name."""
        folders: dict[str, Path] = {}
        for group, variants in self.plan.groups(finetuned=False).items():
            out, counts = str(self.plan.out / group), self.plan.saved_counts(variants)
            configs = [v.config for v in variants]
            train = self.plan.train_run.train
            run = replace(self.plan.train_run, train=replace(
                train, out=out, snapshots=sorted(set(train.snapshots) | set(counts))))
            pipeline.train_missing(run, configs, hook)
            found = {v.name: sae_folder(out, hook, v.config) for v in variants}
            needed = {v.name: self.plan.saved_counts([v]) for v in variants}
            replay_snapshots(run, configs, found, needed, self.plan.out / REPLAY_DIR)
            folders.update(found)
        return folders

    def finetune(self, hook: str, trained: dict[str, Path]) -> dict[str, Path]:
        """Fine-tune (or finish fine-tuning) every fine-tuning run folder's variants from their
        parents' snapshots; a finished run is kept. The SAE folders by variant name."""
        folders: dict[str, Path] = {}
        for group, variants in self.plan.groups(finetuned=True).items():
            out, steps = self.plan.out / group, [v.finetune for v in variants if v.finetune]
            if len({json.dumps(asdict(f.cfg), sort_keys=True) for f in steps}) > 1 or len(
                    {f.parent for f in steps}) < len(steps):
                raise GsaeError(f"the fine-tuned variants of {group} differ in their settings "
                                "or share a parent: give each its own run folder")
            parents = [str(snapshot_folder(trained[f.parent], f.at)) for f in steps]
            found = {v.name: twin_folder(out, hook, Path(p)) for v, p in zip(variants, parents)}
            if not all(finished_training(f) for f in found.values()):
                pipeline.finetune(FinetuneRun(
                    saes=parents, model=self.plan.model, data=self.plan.data,
                    source=self.plan.train_run.source,
                    train=replace(steps[0].cfg, out=str(out),
                                  device=steps[0].cfg.device or self.plan.model.device)))
            folders.update(found)
        return folders

    def snapshots(self, folders: dict[str, Path]) -> list[Snapshot]:
        """Every evaluated snapshot: run folder by run folder, by count then variant (a variant
        with no counts: its finished SAE, named as the variant, at its fine-tuned total)."""
        snaps = []
        for variants in self.plan.groups().values():
            for n in sorted({n for v in variants for n in v.counts}):
                snaps += [Snapshot(f"{v.name}@{n}", v.name, n, snapshot_folder(folders[v.name], n))
                          for v in variants if n in v.counts]
            snaps += [Snapshot(f"{v.name}@{v.total_tokens}" if v.finetune else v.name, v.name,
                               v.total_tokens, folders[v.name]) for v in variants if not v.counts]
        return snaps

    def header(self, command: str, outcome: Outcome) -> dict[str, Any]:
        """The fields that every study result records first (`gsae.records.StudyResult`)."""
        return {"command": command,
                "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "versions": {**versions(), "matplotlib": matplotlib.__version__},
                "machine": machine_record(self.plan.model.device),
                "wall_seconds": round(sum(self.clock.seconds.values()), 1),
                "stage_seconds": self.clock.rounded(), "model": self.model_id,
                "hook": outcome.hook}

    def last(self, outcome: Outcome) -> list[Snapshot]:
        """Each variant's last evaluated snapshot."""
        last: dict[str, Snapshot] = {}
        for s in outcome.snapshots:
            if s.variant not in last or s.requested >= last[s.variant].requested:
                last[s.variant] = s
        return list(last.values())

    def loaded(self, snaps: list[Snapshot], data: DataConfig | None = None) -> LoadedModel:
        """The snapshots loaded with the study's model, as `gsae.pipeline` evaluates them."""
        saes = [SAE.load(s.folder, device=self.plan.model.device) for s in snaps]
        return LoadedModel(saes, [s.name for s in snaps], self.model, self.tokenizer,
                           self.plan.model, self.model_id, data or self.plan.data)

    def evaluate(self, evaluation: Evaluation, snaps: list[Snapshot]) -> StageRecords:
        """Evaluate every snapshot that the evaluation's cache lacks, group by group."""
        by_name = {s.name: s for s in snaps}
        groups = evaluation.group(snaps) if evaluation.group else [list(by_name)]

        def compute(names: list[str]) -> dict[str, Any]:
            return evaluation.evaluate(self.loaded([by_name[n] for n in names])).to_json()

        return cached(self.plan.out / evaluation.cache, evaluation.settings,
                      fingerprints(snaps), compute, groups)

    def steer(self, steering: Steering, snaps: list[Snapshot]) -> StageRecords:
        """Steer with every snapshot that the steering cache lacks, one k at a time."""
        by_name = {s.name: s for s in snaps}
        ks = {s.name: self.variants[s.variant].config.k for s in snaps}
        groups = [[n for n in by_name if ks[n] == k] for k in sorted(set(ks.values()))]

        def compute(names: list[str]) -> dict[str, Any]:
            loaded = self.loaded([by_name[n] for n in names])
            result: SteerResult = pipeline.steer_loaded(loaded, steering.cfg)
            return result.to_json()

        return cached(self.plan.out / steering.cache, asdict(steering.cfg), fingerprints(snaps),
                      compute, groups)


def distinct_saes(configs: Iterable[SAEConfig]) -> list[SAEConfig]:
    """The SAEs of a study's sweep, each once: TopK (beta 0) once per remaining setting, its
    value mode set to z (the value mode changes nothing without the gradient)."""
    found: dict[str, SAEConfig] = {}
    for c in configs:
        c = replace(c, value_mode=c.value_mode if c.beta > 0 else "z")
        found.setdefault(variant_name(c), c)
    return list(found.values())


def fingerprints(snaps: list[Snapshot]) -> dict[str, str]:
    return {s.name: s.fingerprint() for s in snaps}


# Snapshots added after training ----------------------------------------------------------------


def twin_folder(out: Path, hook: str, parent: Path) -> Path:
    """Where `gsae finetune` in `out` saves the fine-tuned twin of the SAE folder `parent`:
    named by the parent's config as read back from its folder (where a count of latents equal
    to d_in x expansion factor reads as the expansion factor), not as the study configured it."""
    cfg, _ = config_from_record(read_json(parent / CONFIG_FILE, "an SAE config"), str(parent))
    return sae_folder(out, hook, cfg)


def missing_snapshots(folders: dict[str, Path], counts: dict[str, list[int]]
                      ) -> dict[str, list[int]]:
    """The snapshot counts that each SAE folder lacks of those it needs (`counts` by SAE name;
    only SAEs that lack any)."""
    missing = {name: [n for n in counts.get(name, [])
                      if not (snapshot_folder(f, n) / WEIGHTS_FILE).is_file()]
               for name, f in folders.items()}
    return {name: counts for name, counts in missing.items() if counts}


def replay_snapshots(train_run: TrainRun, configs: list[SAEConfig], folders: dict[str, Path],
                     counts: dict[str, list[int]], scratch: Path) -> None:
    """Save the snapshots that trained SAEs lack of those they need (`counts` by SAE name:
    counts added after they passed them; an SAE that needs none is not replayed): their
    training runs again, step for step, as a run in the folder `scratch` up to the last missing
    count, and each missing snapshot is moved into its SAE's folder (no snapshot there is
    replaced). `scratch` is the study's own: it is emptied before and removed after."""
    missing = missing_snapshots(folders, counts)
    if not missing:
        return
    wanted = sorted({n for lacking in missing.values() for n in lacking})
    replayed = [c for c in configs if variant_name(c) in missing]
    _remove_scratch(scratch)
    run = replace(train_run, train=replace(train_run.train, out=str(scratch), snapshots=wanted,
                                           resume=False, overwrite=False))
    summary = pipeline.train_saes(run, replayed, until=wanted[-1])
    for record in summary.records:
        name = Path(record["folder"]).name
        for n in missing[name]:
            target = snapshot_folder(folders[name], n)
            target.parent.mkdir(parents=True, exist_ok=True)
            snapshot_folder(Path(record["folder"]), n).rename(target)
    _remove_scratch(scratch)


def _remove_scratch(scratch: Path) -> None:
    if scratch.is_dir() and not scratch.is_symlink():
        shutil.rmtree(scratch)


# The caches ------------------------------------------------------------------------------------


def cached(
    path: Path, settings: dict[str, Any], fingerprints: dict[str, str],
    compute: Callable[[list[str]], dict[str, Any]], groups: list[list[str]],
) -> StageRecords:
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


def keyed_cache(path: Path, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """The value saved at `path` for this `key`, else `compute()`'s, saved there."""
    if path.is_file():
        saved = read_json(path, "a study cache")
        if saved.get("key") == json.loads(json.dumps(key)):
            return saved["check"]
    value = compute()
    write_json(path, {"key": key, "check": value})
    return value


def store_check(out: Path, reader: StoreReader) -> dict[str, Any]:
    """The store's count of exactly repeated rows, computed once per store identity and size."""
    return keyed_cache(out / STORE_CHECK_FILE, {"identity": reader.identity, "rows": reader.rows},
                       lambda: {"rows": reader.rows,
                                "repeated_rows": reader.repeated_rows(reader.hooks[0])})


# The clock, the machine and the command -------------------------------------------------------


class StageClock:
    """Seconds spent in each stage, summed over every invocation of the study (a resumed stage
    adds its time to what the interrupted ones spent), kept in `<out>/stage-seconds.json`."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = (read_json(path, "the stage times")
                                          if path.is_file() else {})

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:  # an interrupted stage's time counts too
            # read again: another invocation may have added its stages' times meanwhile
            if self.path.is_file():
                self.seconds = read_json(self.path, "the stage times")
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            write_json(self.path, self.seconds)

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.seconds.items()}


def machine_record(device: str) -> dict[str, Any]:
    """The machine a study ran on, as its reports describe it."""
    accelerator = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    threads = torch.get_num_threads()
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": threads, "device": device, "accelerator": accelerator,
            "description": accelerator or f"{os.cpu_count()} CPU cores ({threads} torch threads, "
                                          f"{platform.machine()})"}


def sae_record(name: str, sae: SAE, folder: Path) -> dict[str, Any]:
    """An SAE as a study's results list it: its settings and its last training log line."""
    log = (folder / "log.jsonl").read_text().splitlines()
    return {"name": name, "folder": str(folder), "k": sae.k, "beta": sae.beta,
            "value_mode": sae.cfg.value_mode, "seed": sae.cfg.seed,
            "n_latents": sae.n_latents, "train": json.loads(log[-1]) if log else {}}


def _flag_value(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if text and " " not in text else repr(text)


def flag_text(value: Any, joined: Callable[[Any], str] = " ".join) -> str:
    """A setting's value as it is written after its flag."""
    return joined(map(_flag_value, value)) if isinstance(value, list) else _flag_value(value)


def command_line(words: list[str], run: Any, default: Any, skip: tuple[str, ...] = ()) -> str:
    """The command (`words`, then flags) that reproduces the config tree `run`: every flag
    whose value differs from `default`'s (sweep lists joined by commas), but those in `skip`."""
    parts, names = list(words), flag_names(type(run))
    for f in fields(run):
        for g in fields(getattr(run, f.name)):
            value = getattr(getattr(run, f.name), g.name)
            if g.name not in skip and value != getattr(getattr(default, f.name), g.name):
                joined = ",".join if f.name == "sae" else " ".join
                parts.append(f"{names[f'{f.name}.{g.name}']} {flag_text(value, joined)}")
    return " ".join(parts)
