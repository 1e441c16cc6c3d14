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
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import matplotlib
import torch

from gsae import pipeline
from gsae.config import flag_names, identity, to_dict, validate
from gsae.errors import GsaeError
from gsae.evaluate import (
    EvalConfig,
    TokenLosses,
    eval_contexts,
    evaluate,
    evaluate_contexts,
    unseen_contexts,
)
from gsae.io import claim_folder, file_fingerprint, read_json, versions, write_json
from gsae.models import ModelConfig, hidden_size, load_model, model_identity
from gsae.pipeline import SAESweep, TrainRun
from gsae.records import EvalResult, ScalingResult
from gsae.sae import SAE, WEIGHTS_FILE, SAEConfig
from gsae.source import ActivationSource, SourceConfig
from gsae.steer import SteerConfig, steer
from gsae.store import StoreConfig, StoreReader, fill_store
from gsae.study import registers
from gsae.study.compare import cached, flag_text, machine_record, sae_record
from gsae.study.registers_report import build_registers_report
from gsae.study.results import compact_steering
from gsae.study.scaling_report import build_scaling_report, largest_gap
from gsae.text import DataConfig, corpus_identity, load_documents, token_contexts
from gsae.train import TrainConfig, sae_folder, snapshot_folder, variant_name

IDENTITY_FILE = "study.json"
STORE_CHECK_FILE = "store-check.json"
DISTANCES_FILE = "distances.json"
REPLAY_DIR = "snapshot-replay"  # scratch run folder: snapshots added after training
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
    registers_report: str = field(default="", metadata={
        "help": "the registers report's folder (the committed one is docs/results/registers), "
                "written when --unseen names two corpora or more; empty: <out>/registers-report",
        "identity": False})
    extra_k: list[int] = field(default_factory=list, metadata={
        "help": "further values of k whose SAEs (every other sweep value) are trained as long "
                "and evaluated and steered at the last snapshot only, e.g. 16 64; give the flag "
                "alone for none", "may_be_empty": True, "min": 1})


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
    default = ScalingRun()
    parts = ["gsae", "study"]
    names = flag_names(ScalingRun)
    for f in fields(ScalingRun):
        for g in fields(getattr(run, f.name)):
            value = getattr(getattr(run, f.name), g.name)
            if value != getattr(getattr(default, f.name), g.name):
                joined = ",".join if f.name == "sae" else " ".join
                parts.append(f"{names[f'{f.name}.{g.name}']} {flag_text(value, joined)}")
    return " ".join(parts)


# The SAEs --------------------------------------------------------------------------------------


def curve_configs(run: ScalingRun) -> list[SAEConfig]:
    """The SAEs of the learning curves: every combination of the sweep, TopK once per k and
    seed (its value mode is irrelevant, so it is always z)."""
    configs: dict[str, SAEConfig] = {}
    for c in pipeline.sweep_configs(run.sae):
        c = replace(c, value_mode=c.value_mode if c.beta > 0 else "z")
        configs.setdefault(variant_name(c), c)
    if not any(c.beta == 0 for c in configs.values()) or all(c.beta == 0
                                                               for c in configs.values()):
        raise GsaeError(f"the study compares TopK with g-SAEs: --beta must list 0 and at least "
                        f"one value above 0, got {run.sae.beta}")
    return list(configs.values())


def extra_configs(run: ScalingRun) -> list[SAEConfig]:
    """The SAEs of --extra_k: the curve's SAEs at each further k."""
    curve = curve_configs(run)
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


@dataclass
class Snapshot:
    """One saved state of one SAE: its name in the caches and results, where it is, when."""

    name: str
    variant: str
    requested: int
    folder: Path

    def fingerprint(self) -> str:
        return file_fingerprint(self.folder / WEIGHTS_FILE)

    def record(self) -> dict[str, Any]:
        saved = read_json(self.folder / "snapshot.json", "a snapshot record")
        return {"name": self.name, "folder": str(self.folder), **saved}


def snapshots_of(folders: dict[str, Path], counts: list[int]) -> list[Snapshot]:
    """Every snapshot of every SAE, by count then SAE."""
    return [Snapshot(f"{name}@{n}", name, n, snapshot_folder(folder, n))
            for n in counts for name, folder in folders.items()]


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


def keyed_cache(path: Path, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """The value saved at `path` for this `key`, else `compute()`'s, saved there."""
    if path.is_file():
        saved = read_json(path, "a study cache")
        if saved.get("key") == json.loads(json.dumps(key)):
            return saved["check"]
    value = compute()
    write_json(path, {"key": key, "check": value})
    return value


def store_check(out: Path, reader: StoreReader, hook: str) -> dict[str, Any]:
    """The store's count of exactly repeated rows, computed once per store identity and size."""
    return keyed_cache(out / STORE_CHECK_FILE, {"identity": reader.identity, "rows": reader.rows},
                       lambda: {"rows": reader.rows, "repeated_rows": reader.repeated_rows(hook)})


def train_stage(train_run: TrainRun, configs: list[SAEConfig], out: str, hook: str,
                counts: list[int]) -> dict[str, Path]:
    """Train (or finish) the SAEs of `configs` in the run folder `out`, keeping the finished
    SAEs there (`pipeline.train_missing`), and give each a snapshot at every one of `counts`;
    their folders by name."""
    pipeline.train_missing(replace(train_run, train=replace(train_run.train, out=out)), configs,
                           hook)
    folders = {variant_name(c): sae_folder(out, hook, c) for c in configs}
    replay_snapshots(train_run, configs, folders, counts, Path(out).parent / REPLAY_DIR)
    return folders


def missing_snapshots(folders: dict[str, Path], counts: list[int]) -> dict[str, list[int]]:
    """The snapshot counts that each SAE folder lacks (only SAEs that lack any)."""
    missing = {name: [n for n in counts if not (snapshot_folder(f, n) / WEIGHTS_FILE).is_file()]
               for name, f in folders.items()}
    return {name: counts for name, counts in missing.items() if counts}


def replay_snapshots(train_run: TrainRun, configs: list[SAEConfig], folders: dict[str, Path],
                     counts: list[int], scratch: Path) -> None:
    """Save the snapshots that trained SAEs lack (counts added after they passed them): their
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


@dataclass
class Stage:
    """What an evaluating stage needs: the model and a way to load a snapshot."""

    model: Any
    tokenizer: Any
    model_id: dict[str, Any]
    device: str

    def load(self, snaps: list[Snapshot]) -> list[SAE]:
        return [SAE.load(s.folder, device=self.device) for s in snaps]


def eval_groups(snaps: list[Snapshot], counts_per_eval: int) -> list[list[str]]:
    """The snapshots' names in groups of `counts_per_eval` consecutive snapshot counts (0: one
    group)."""
    counts = sorted({s.requested for s in snaps})
    size = counts_per_eval or len(counts)
    return [[s.name for s in snaps if s.requested in counts[i:i + size]]
            for i in range(0, len(counts), size)]


def eval_stage(stage: Stage, path: Path, snaps: list[Snapshot], settings: dict[str, Any],
               evaluate_on: Callable[[list[SAE], list[str]], EvalResult], counts_per_eval: int
               ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Evaluate every snapshot not yet in the cache at `path`, `counts_per_eval` snapshot counts
    per pass over the text (the cache is saved after each)."""
    by_name = {s.name: s for s in snaps}
    groups = eval_groups(snaps, counts_per_eval)

    def compute(names: list[str]) -> dict[str, Any]:
        return evaluate_on(stage.load([by_name[n] for n in names]), names).to_json()

    return cached(path, settings, {s.name: s.fingerprint() for s in snaps}, compute, groups)


def steer_stage(stage: Stage, path: Path, snaps: list[Snapshot], data: DataConfig,
                cfg: SteerConfig) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Steer with every snapshot not yet in the cache at `path`, one k at a time."""
    by_name = {s.name: s for s in snaps}
    saes = dict(zip(by_name, stage.load(snaps)))
    groups = [[n for n in by_name if saes[n].k == k] for k in sorted({s.k for s in saes.values()})]

    def compute(names: list[str]) -> dict[str, Any]:
        return steer([saes[n] for n in names], stage.model, stage.tokenizer, data, cfg,
                     names=names, model_id=stage.model_id).to_json()

    return cached(path, asdict(cfg), {s.name: s.fingerprint() for s in snaps}, compute, groups)


# The study -------------------------------------------------------------------------------------


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
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            write_json(self.path, self.seconds)


@dataclass
class Plan:
    """The study's settings checked and resolved: folders, SAEs, the loaded model."""

    run: ScalingRun
    out: Path
    store: Path
    counts: list[int]
    curve: list[SAEConfig]
    extra: list[SAEConfig]
    unseen: dict[str, DataConfig]
    stage: Stage
    train_run: TrainRun


def plan(run: ScalingRun) -> Plan:
    """Check the settings, load the model and claim the work folder."""
    if len(run.source.hooks) != 1:
        raise GsaeError(f"gsae study takes one hook point, got {run.source.hooks}")
    validate(run)
    run.steer.check_sets()
    counts, unseen = check_schedule(run.train), unseen_data(run)
    curve, extra = curve_configs(run), extra_configs(run)
    out = Path(run.study.out)
    store = Path(run.study.store or out / "store")
    model, tokenizer = load_model(run.model)
    for sae_cfg in curve + extra:
        sae_cfg.validate(hidden_size(model))
    stage = Stage(model, tokenizer, model_identity(run.model), run.model.device)
    train_run = TrainRun(model=run.model, data=run.data, source=run.source,
                         train=replace(run.train, store=str(store),
                                       device=run.train.device or run.model.device))
    settings = identity(run)
    claim_folder(out, IDENTITY_FILE, {"model": stage.model_id, "store": str(store),
                                      "store_tokens": run.study.store_tokens,
                                      **as_recorded(out / IDENTITY_FILE, {
                                          k: settings[k] for k in SETTINGS_RECORDED})},
                 "a study", run.train.overwrite)
    return Plan(run, out, store, counts, curve, extra, unseen, stage, train_run)


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


def store_stage(p: Plan) -> tuple[StoreReader, dict[str, Any]]:
    """Build (or finish) the store; its reader and repeated-row check."""
    source = ActivationSource(p.stage.model, p.run.source, with_grad=True)
    fill_store(StoreConfig(store=str(p.store), tokens=p.run.study.store_tokens), source,
               p.run.data, p.stage.tokenizer, p.stage.model_id)
    reader = StoreReader(p.store)
    return reader, store_check(p.out, reader, reader.hooks[0])


StageRecords = tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]  # run info, records
Evaluated = dict[str, StageRecords]


def eval_stages(p: Plan, evaluated: list[Snapshot], clock: StageClock
                ) -> tuple[Evaluated, dict[str, torch.Tensor], dict[str, int]]:
    """Every corpus's evaluation of the snapshots: per corpus ("train", then each unseen one by
    name) the run info and records, and the token contexts evaluated; and per unseen corpus
    how many contexts it has in all."""
    run, stage = p.run, p.stage
    wiki_cfg = replace(run.eval, json="")
    corpora: Evaluated = {}
    with clock.stage("eval_train"):
        corpora["train"] = eval_stage(
            stage, p.out / "eval-train.json", evaluated, asdict(wiki_cfg),
            lambda saes, names: evaluate(saes, stage.model, stage.tokenizer, run.data, wiki_cfg,
                                         names=names, model_id=stage.model_id),
            run.study.counts_per_eval)
    contexts, sizes = {"train": eval_contexts(run.data, stage.tokenizer, wiki_cfg)}, {}
    for name, data in p.unseen.items():
        with clock.stage(f"eval_{name}"):
            corpora[name], contexts[name], sizes[name] = unseen_stage(p, data, evaluated)
    return corpora, contexts, sizes


def unseen_stage(p: Plan, data: DataConfig, evaluated: list[Snapshot]
                 ) -> tuple[StageRecords, torch.Tensor, int]:
    """One unseen corpus's evaluation of the snapshots (run info, records), its contexts, and
    how many contexts it has in all."""
    run, stage = p.run, p.stage
    unseen_cfg = replace(run.eval, json="", eval_tokens=run.study.unseen_tokens, pool_tokens=0)
    contexts, available = unseen_contexts(data, stage.tokenizer, run.study.unseen_tokens)

    def on_unseen(saes: list[SAE], names: list[str]) -> EvalResult:
        result = evaluate_contexts(saes, stage.model, contexts, unseen_cfg, names,
                                   stage.model_id)
        result.run.corpus, result.run.part = corpus_identity(data), "all"
        return result

    settings = {"corpus": corpus_identity(data), "tokens": run.study.unseen_tokens,
                "batch_size": run.eval.batch_size}
    found = eval_stage(stage, unseen_cache(p.out, data.dataset, settings), evaluated, settings,
                       on_unseen, run.study.counts_per_eval)
    assert available is not None
    return found, contexts, available


def distance_stage(p: Plan, contexts: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per corpus, the unigram KL of its evaluated tokens against the training split's tokens
    (`gsae.study.registers.unigram_kl`), cached in `<out>/distances.json`."""
    vocabulary = len(p.stage.tokenizer)
    key = {"reference": corpus_identity(p.run.data), "vocabulary": vocabulary,
           "smoothing": registers.SMOOTHING,
           "corpora": {n: hashlib.sha256(c.numpy().tobytes()).hexdigest()
                       for n, c in contexts.items()}}

    def compute() -> dict[str, Any]:
        reference = torch.stack(list(token_contexts(p.run.data, p.stage.tokenizer, "train")))
        return {"reference_tokens": reference.numel(), "corpora": {
            n: {"unigram_kl": registers.unigram_kl(c, reference, vocabulary),
                "tokens": c.numel()} for n, c in contexts.items()}}

    return keyed_cache(p.out / DISTANCES_FILE, key, compute)


def per_token_stage(p: Plan, name: str, contexts: torch.Tensor, last: list[Snapshot]
                    ) -> dict[str, Any]:
    """The last snapshots' spliced CE increase by quantile bin of the clean per-token CE and of
    |g| on one corpus (`gsae.study.registers.per_token_records`), cached per snapshot in
    `<out>/per-token-<name>.json`."""
    cfg = replace(p.run.eval, json="", eval_tokens=contexts.numel(), pool_tokens=0)
    by_name = {s.name: s for s in last}

    def compute(names: list[str]) -> dict[str, Any]:
        losses = TokenLosses()
        evaluate_contexts(p.stage.load([by_name[n] for n in names]), p.stage.model, contexts, cfg,
                          names, p.stage.model_id, token_losses=losses)
        return registers.per_token_records(losses, names)

    settings = {"tokens": hashlib.sha256(contexts.numpy().tobytes()).hexdigest(),
                "batch_size": cfg.batch_size, "bins": registers.BINS}
    info, records = cached(p.out / f"per-token-{_slug(name)}.json", settings,
                           {s.name: s.fingerprint() for s in last}, compute, [list(by_name)])
    return {"run": info, "results": [{**r, "snapshot": s.requested, "variant": s.variant}
                                      for s in last for r in records[s.name]]}


def per_token_corpora(p: Plan, result: ScalingResult) -> list[str]:
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


def run_study(run: ScalingRun) -> tuple[Path, float]:
    """Run (or finish) the study and write its report; returns the report's markdown and the
    wall time of this invocation in seconds."""
    start = time.perf_counter()
    p = plan(run)
    clock = StageClock(p.out / "stage-seconds.json")
    with clock.stage("store"):
        reader, checked = store_stage(p)
    hook = reader.hooks[0]
    with clock.stage("train"):
        folders = train_stage(p.train_run, p.curve, str(p.out / "saes"), hook, p.counts)
        extra = train_stage(p.train_run, p.extra, str(p.out / "saes-extra"), hook,
                            p.counts[-1:]) if p.extra else {}
    snaps = snapshots_of(folders, p.counts)
    last = snapshots_of({**folders, **extra}, p.counts[-1:])
    evaluated = snaps + [s for s in last if s.variant in extra]
    corpora, contexts, sizes = eval_stages(p, evaluated, clock)
    with clock.stage("steer"):
        steered = steer_stage(p.stage, p.out / "steer.json", last, run.data, run.steer)
    result = ScalingResult(
        command=command_line(run),
        created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        versions={**versions(), "matplotlib": matplotlib.__version__},
        machine=machine_record(run.model.device),
        wall_seconds=0.0,  # set when every stage has run
        stage_seconds={},
        model=p.stage.model_id,
        hook=hook,
        store={"folder": str(p.store), **checked,
               "passes": round(run.train.tokens / max(1, reader.rows), 2)},
        corpora=_corpora(p, contexts, sizes),
        settings={**to_dict(run), "train": asdict(p.train_run.train)},
        saes=[{**sae_record(name, SAE.load(folder), folder), "extra_k": name in extra,
               "snapshots": [s.record() for s in (last if name in extra else snaps)
                             if s.variant == name]}
              for name, folder in {**folders, **extra}.items()],
        eval={key: {"run": info,
                    "results": [{**r, "snapshot": s.requested, "variant": s.variant}
                                for s in evaluated for r in records[s.name]]}
              for key, (info, records) in corpora.items()},
        steer={"run": steered[0],
               "results": [{**compact_steering(r), "snapshot": s.requested, "variant": s.variant}
                           for s in last for r in steered[1][s.name]]},
    )
    analyse_registers(p, result, contexts, [s for s in last if s.variant not in extra], clock)
    result.wall_seconds = round(sum(clock.seconds.values()), 1)
    result.stage_seconds = {k: round(v, 1) for k, v in clock.seconds.items()}
    data = result.to_json()
    report = build_scaling_report(data, run.study.report or p.out / "report")
    if len(p.unseen) > 1:
        build_registers_report(data, run.study.registers_report or p.out / "registers-report")
    return report, time.perf_counter() - start


def analyse_registers(p: Plan, result: ScalingResult, contexts: dict[str, torch.Tensor],
                      last: list[Snapshot], clock: StageClock) -> None:
    """The distances of every evaluated corpus to the training text and the per-token analyses
    of --per_token, into `result`."""
    with clock.stage("distances"):
        result.distances = distance_stage(p, contexts)
    for name in per_token_corpora(p, result):
        with clock.stage(f"per_token_{name}"):
            result.per_token[name] = per_token_stage(p, name, contexts[name], last)


def _corpora(p: Plan, contexts: dict[str, torch.Tensor], sizes: dict[str, int]
             ) -> dict[str, Any]:
    return {"train": {"name": p.run.data.dataset, "part": "eval",
                      "corpus": corpus_identity(p.run.data)},
            **{name: {"name": name, "part": "all", "corpus": corpus_identity(data),
                      "contexts": contexts[name].shape[0], "corpus_contexts": sizes[name]}
               for name, data in p.unseen.items()}}
