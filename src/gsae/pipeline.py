"""The runs as library functions of typed configs: train, cache, load SAEs for evaluation,
evaluate and steer. The `gsae` command parses its flags into these configs and calls them.

    from gsae.pipeline import TrainRun, train
    run = TrainRun()                      # the defaults of `gsae train`
    run.sae.k = [32]; run.sae.beta = [0.0]
    summary = train(run)                  # SAEs saved under run.train.out
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from gsae import distributed
from gsae.batch import Batch
from gsae.caching import fill_store
from gsae.config import build, identity, section_record, sweep_configs, sweep_of, to_dict, validate
from gsae.errors import GsaeError
from gsae.evaluate import (
    EvalConfig,
    TokenLosses,
    check_model,
    eval_contexts,
    evaluate,
    evaluate_contexts,
    unseen_contexts,
)
from gsae.finetune import (
    FinetuneConfig,
    FinetuneTrainer,
    SplicingSource,
    check_parent_data,
    check_parent_model,
    trainer_config,
    weights_fingerprint,
)
from gsae.formats import load
from gsae.io import LOCK_FILE, check_output_file, differing_keys, folder_lock, write_json
from gsae.models import ModelConfig, available_device, hidden_size, load_model, model_identity
from gsae.records import EvalResult, SteerResult
from gsae.sae import SAE, Provenance, SAEConfig
from gsae.saebench import check_folder, write_core
from gsae.source import ActivationSource, PassRows, SourceConfig, source_identity
from gsae.steer import (
    PromptSteering,
    SteerConfig,
    check_latent,
    steer,
    steer_prompt,
    typical_activations,
)
from gsae.store import StoreConfig, StoreReader, StoreWriter, read_manifest
from gsae.text import (
    DataConfig,
    batched_contexts,
    corpus_fingerprint,
    corpus_identity,
    token_contexts,
)
from gsae.train import (
    TrainConfig,
    Trainer,
    check_wandb,
    data_parallel,
    finished_training,
    sae_folder,
)

SAESweep = sweep_of(SAEConfig)
RUN_FILE = "run.json"


# ------------------------------------------------------------------------ the config trees


@dataclass
class TrainRun:
    """Everything `gsae train` needs: one SAE per combination of the `sae` lists."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    sae: SAESweep = field(default_factory=SAESweep)  # type: ignore[valid-type]
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> None:
        """The rule between sections (`gsae.config.validate` calls it)."""
        check_positions(self.data, self.source)


@dataclass
class FinetuneRun:
    """Everything `gsae finetune` needs; model, data and hooks default to what the SAEs record."""

    saes: list[str] = field(default_factory=list, metadata={
        "positional": True, "metavar": "SAE_DIR", "identity": False,
        "help": "trained SAE folders to fine-tune, all of one model (they are not changed: the "
        "fine-tuned SAEs are written under --out)"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    train: FinetuneConfig = field(default_factory=FinetuneConfig)

    def check(self) -> None:
        """The rules between settings (`gsae.config.validate` calls it)."""
        if not self.saes:
            raise GsaeError("give at least one SAE folder to fine-tune")
        check_positions(self.data, self.source)


@dataclass
class CacheRun:
    """Everything `gsae cache` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def check(self) -> None:
        """The rule between sections (`gsae.config.validate` calls it)."""
        check_positions(self.data, self.source)


SAE_DIRS_HELP = "SAE folders, all of one model (any hook points)"
CHANGED_CORPUS_HELP = ("evaluate even if the corpus's files changed since the SAE was trained "
                       "(its held-out split may then hold training documents)")


@dataclass
class EvaluationRun:
    """Everything `gsae eval` needs; model and data default to what the first SAE records."""

    saes: list[str] = field(default_factory=list, metadata={
        "positional": True, "metavar": "SAE_DIR", "help": SAE_DIRS_HELP})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    allow_changed_corpus: bool = field(default=False, metadata={"help": CHANGED_CORPUS_HELP})
    unseen: list[str] = field(default_factory=list, metadata={
        "help": "corpora no SAE trained on (e.g. news code legal verse german), each evaluated "
                "too, from its start and whole (no document held out), up to --unseen_tokens",
        "may_be_empty": True})
    unseen_tokens: int = field(default=16_384, metadata={
        "help": "evaluation budget on each --unseen corpus in context tokens, from its start",
        "min": 1})
    saebench: str = field(default="", metadata={
        "help": "also write one SAEBench core result file per SAE (sae-bench 0.6.0's "
                "CoreEvalOutput, grad-free mode) into this folder"})
    overwrite: bool = field(default=False, metadata={
        "help": "let --saebench replace files that gsae did not write"})

    def check(self) -> None:
        """The rule between settings (`gsae.config.validate` calls it)."""
        for name in self.unseen:
            if name == self.data.dataset or self.unseen.count(name) > 1:
                raise GsaeError(f"--unseen names {name!r} twice or as the training corpus: name "
                                "each corpus no SAE trained on once")


@dataclass
class SteeringRun:
    """Everything `gsae steer` needs; model and data default to what the first SAE records."""

    saes: list[str] = field(default_factory=list, metadata={
        "positional": True, "metavar": "SAE_DIR", "help": SAE_DIRS_HELP})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    allow_changed_corpus: bool = field(default=False, metadata={"help": CHANGED_CORPUS_HELP})
    json: str = field(default="", metadata={"help": "also write the result as JSON to this file"})
    latent: int = field(default=-1, metadata={
        "help": "with --prompt: steer this latent of each SAE at 0 and every --alphas multiple "
        "and print the greedy continuations (-1: the sampled evaluation)", "min": -1})
    prompt: str = field(default="", metadata={"help": "text to continue, with --latent"})
    new_tokens: int = field(default=20, metadata={
        "help": "tokens generated per continuation, with --prompt", "min": 1})

    def check(self) -> None:
        """The rules between settings (`gsae.config.validate` calls it); the sampled
        evaluation's rule only without --latent (steering on a prompt draws no sets)."""
        if (self.latent >= 0) != bool(self.prompt):
            raise GsaeError("--latent and --prompt go together: give both to steer one latent "
                            "on your text, or neither for the steering evaluation")
        if self.latent < 0:
            self.steer.check_sets()


# -------------------------------------------------------------------------------- training


@dataclass
class TrainingData:
    """Where a training run's batches come from: the language model or a store."""

    hooks: list[str]
    d_in: int
    provenance: Callable[[str], Provenance]  # hook -> what an SAE there records of its data
    recorded: dict[str, Any]  # what run.json records about the data beyond the settings
    chunks: Callable[[int], Iterator[dict[str, Batch]]]  # skip -> chunks from there on


@dataclass
class TrainSummary:
    """What a training run did: the final metrics of every SAE, and the wall time."""

    records: list[dict[str, Any]]
    seconds: float
    out: str
    dropped_outliers: int
    rows_seen: int
    main_rank: bool = True  # under torchrun, whether this process is rank 0 (which reports)
    verb: str = "trained"

    def table(self) -> str:
        """The summary `gsae train` prints: one row per SAE."""
        total = self.dropped_outliers + self.rows_seen
        lines = [f"\n{self.verb} {len(self.records)} SAE(s) in {self.seconds:.0f} s; outlier "
                 f"tokens dropped: {self.dropped_outliers} of {total} "
                 f"({100 * self.dropped_outliers / max(1, total):.3f}%)",
                 f"{'SAE':<48} {'tokens':>9} {'FVU':>7} {'L0':>6} {'dead':>6} {'beta|d.g|':>9}"]
        for r in self.records:
            lines.append(
                f"{r['name']:<48} {r.get('tokens', 0):>9} {r.get('fvu', float('nan')):>7.4f} "
                f"{r.get('l0', float('nan')):>6.1f} {r.get('dead_fraction', float('nan')):>6.3f} "
                f"{r.get('effect', 0.0):>9.3g}")
        lines.append(f"saved under {self.out}")
        return "\n".join(lines)


def train(run: TrainRun) -> TrainSummary:
    """Train one SAE per combination of `run.sae`'s lists (a sweep) at every hook point, from
    the language model or `run.train.store`; under torchrun data-parallel or with the sweep
    split across the ranks."""
    validate(run)
    return train_saes(run, sweep_configs(run.sae))


def train_saes(run: TrainRun, configs: list[SAEConfig], extend: bool = False, until: int = 0
               ) -> TrainSummary:
    """Train the SAEs of `configs` (the sweep lists in `run.sae` are ignored) on the same
    batches, as `train` does. With `extend` (see `train_missing`), a run of exactly these SAEs
    and settings found in `run.train.out` is continued, and a finished run there of other SAEs
    with the same settings is kept: these SAEs are trained beside its SAEs as a new run. With
    `until`, the data stops once every SAE has seen that many tokens (the schedule is still
    that of `run.train.tokens`: the steps so far are those of the whole run)."""
    t0 = time.perf_counter()
    validate(run)
    distributed.init()
    run = _local_devices(run)
    available_device(run.train.device, "--train.device")
    check_wandb(run.train)
    data = training_data(run, with_grad=any(c.needs_grad for c in configs))
    if run.train.store:
        run = settings_of_store(run, data.recorded["store"])
    for cfg in configs:
        cfg.validate(data.d_in)
    saes = [(SAE(replace(cfg), data.d_in, provenance=data.provenance(hook)), hook)
            for hook in data.hooks for cfg in configs]
    with run_folder_lock(run.train.out):
        if extend:
            run = _resume_if_same(run, configs, data)
        folders = [sae_folder(run.train.out, hook, cfg) for hook in data.hooks for cfg in configs]
        record = claim_run_folder(run, configs, {**data.recorded, "sae_folders": [
            str(f.relative_to(run.train.out)) for f in folders]}, extend)
        trainer = Trainer.create(saes, run.train, run_config=record)
        if trainer.finished:
            raise GsaeError(f"the run in {run.train.out} has finished: there is nothing to "
                            "resume (pass --overwrite to train it again, or a larger --tokens "
                            "as a new run)")
        chunks = data.chunks(trainer.chunks_done)
        records = trainer.fit(_until(trainer, chunks, until) if until else chunks)
    main_rank = distributed.is_main()
    distributed.shutdown()
    return TrainSummary(records, time.perf_counter() - t0, run.train.out,
                        trainer.dropped_outliers, trainer.rows_seen, main_rank)


def run_folder_lock(out: str) -> AbstractContextManager[None]:
    """The run folder's exclusive lock, held from reading run.json to the end of training, so
    that a second command on the same run (two --resume, say) is refused instead of writing
    beside the first. The main process holds it for all ranks of a torchrun run."""
    return folder_lock(out, "the run") if distributed.is_main() else nullcontext()


def _until(trainer: Trainer, chunks: Iterator[dict[str, Batch]], tokens: int
           ) -> Iterator[dict[str, Batch]]:
    for chunk in chunks:
        if min(m.tokens for m in trainer.members) >= tokens:
            return
        yield chunk


def settings_of_store(run: TrainRun, identity: dict[str, Any]) -> TrainRun:
    """The run with the model, corpus and data settings the store was made with (they, not the
    flags, describe the data), so that run.json records what was trained on; a note names the
    settings that the flags gave otherwise."""
    corpus = identity.get("corpus") or {}
    model = identity.get("model") or {}
    stored = {"model.model": model.get("model"), "model.revision": model.get("revision"),
              **{f"data.{f}": corpus[f] for f in DataConfig.__dataclass_fields__ if f in corpus},
              **{f"source.{f}": identity[f] for f in ("skip_first", "outlier_factor", "autocast")
                 if f in identity}}
    updated = copy.deepcopy(run)
    differing = []
    for key, value in stored.items():
        section, name = key.split(".")
        if value is not None and getattr(getattr(updated, section), name) != value:
            differing.append(key)
            setattr(getattr(updated, section), name, value)
    if differing and distributed.is_main():
        print(f"gsae: --store: training on the store's data; these settings come from the store, "
              f"not from the flags: {', '.join(differing)}", file=sys.stderr)
    return updated


def _local_devices(run: TrainRun) -> TrainRun:
    """Under torchrun, `cuda` means this rank's GPU; the SAEs default to the model's device."""
    model = replace(run.model, device=distributed.local_device(run.model.device))
    sae_device = distributed.local_device(run.train.device or model.device)
    return replace(run, model=model, train=replace(run.train, device=sae_device))


def train_missing(run: TrainRun, configs: list[SAEConfig], hook: str) -> list[SAEConfig]:
    """Train the SAEs of `configs` whose folder in `run.train.out` holds no finished training,
    keeping every finished SAE there (how `gsae study` and `gsae compare` grow): a run
    interrupted there is continued first when `configs` still lists all its SAEs (its progress
    is kept), then the missing SAEs are trained beside the others as a new run. Under
    --overwrite every SAE is trained again. Returns the SAEs trained."""
    if run.train.overwrite:
        train_saes(run, configs, extend=True)
        return configs
    wanted = {_comparable_config(c): c for c in configs}
    interrupted = _interrupted_saes(Path(run.train.out))
    resumed = [wanted[c] for c in interrupted] if all(c in wanted for c in interrupted) else []
    if resumed:
        train_saes(run, resumed, extend=True)
    todo = [c for c in configs if not finished_training(sae_folder(run.train.out, hook, c))]
    if todo:
        train_saes(run, todo, extend=True)
    return resumed + todo


def _comparable_config(cfg: SAEConfig) -> str:
    """An SAE config as run.json records it, as a key."""
    return json.dumps(section_record(cfg), sort_keys=True)


def _interrupted_saes(out: Path) -> list[str]:
    """The SAEs (as `_comparable_config` keys) of the run recorded in `out`, if any of them
    has not finished training; else none."""
    recorded = _previous_record(out) or {}
    folders = _written_sae_folders(out, recorded.get("sae_folders"))
    if all(finished_training(f) for f in folders):
        return []
    return [json.dumps(c, sort_keys=True) for c in recorded.get("saes", [])]


def _resume_if_same(run: TrainRun, configs: list[SAEConfig], data: TrainingData) -> TrainRun:
    same = (_previous_identity(Path(run.train.out))
            == run_record(run, configs, data.recorded)["recorded"]["identity"])
    return replace(run, train=replace(run.train, resume=same and not run.train.overwrite))


def check_positions(data: DataConfig, source: SourceConfig) -> None:
    """Refuse data settings that leave no SAE position in a context (training would wait for
    data forever): positions skip_first .. context_size - 2 are used."""
    if data.context_size - 1 - source.skip_first < 1:
        raise GsaeError(f"--context_size {data.context_size} with --skip_first "
                        f"{source.skip_first} leaves no position to train on: positions "
                        "skip_first .. context_size-2 are used, so make context_size larger "
                        "than skip_first + 1")


def training_data(run: TrainRun, with_grad: bool) -> TrainingData:
    """The batches of a run: from `run.train.store` if set, else from the language model."""
    if run.train.store:
        return _store_data(run)
    model, tokenizer = load_model(run.model)
    source = ActivationSource(model, run.source, with_grad=with_grad,
                              split_across_ranks=data_parallel(run.train))
    # Read the corpus's first context now: an unreadable corpus is refused before the run
    # folder is claimed, so the corrected command can use the same --out.
    next(iter(token_contexts(run.data, tokenizer, "train")), None)

    def chunks(skip: int) -> Iterator[dict[str, Batch]]:
        watch = PassRows(source.hook_names, run.source.outlier_factor)
        contexts = context_batches(run.data, tokenizer, run.source.lm_batch_size, skip=skip,
                                   pass_ended=watch.pass_ended)
        return watch.counted(source.stream(contexts))

    recorded = {"model": model_identity(run.model), **source_identity(run.source, run.data)}

    def provenance(hook: str) -> Provenance:
        return Provenance(hook=hook, **recorded)

    return TrainingData(source.hook_names, hidden_size(model), provenance, {}, chunks)


def _store_data(run: TrainRun) -> TrainingData:
    stored = read_manifest(run.train.store)["identity"]["hooks"]
    reader = StoreReader(run.train.store, store_hooks(run.source.hooks, stored),
                         run.train.validation_fraction)

    def chunks(skip: int) -> Iterator[dict[str, Batch]]:
        return reader.chunks(seed=run.train.shuffle_seed, skip=skip)

    return TrainingData(reader.hooks, reader.d_in, reader.provenance, {"store": reader.identity},
                        chunks)


def context_batches(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                    part: str = "train", skip: int = 0,
                    pass_ended: Callable[[bool], None] | None = None) -> Iterator[Any]:
    """Batches of token contexts, starting again at the corpus start whenever it runs out;
    the first `skip` batches are passed over (to resume a run). `pass_ended(whole)` is called
    at the end of every pass, `whole` when none of its batches was skipped."""
    for epoch in itertools.count():
        if epoch > 0 and distributed.is_main():
            tqdm.write(f"gsae: the {part} corpus is exhausted; starting pass {epoch + 1}")
        whole = skip == 0
        for tokens in batched_contexts(token_contexts(data_cfg, tokenizer, part), batch_size):
            if skip > 0:
                skip -= 1
                continue
            yield tokens
        if pass_ended is not None:
            pass_ended(whole)


def store_hooks(requested: list[str], stored: list[str]) -> list[str]:
    """Match requested hook points to a store's: by full name or by layer index."""
    chosen = []
    for hook in requested:
        match = [h for h in stored if h == hook or h.rsplit(".", 1)[-1] == hook.lstrip("+")]
        if len(match) != 1:
            raise GsaeError(f"hook {hook!r} is not in the store, which holds {stored}")
        chosen.append(match[0])
    return chosen


def run_record(run: TrainRun, configs: list[SAEConfig], recorded: dict[str, Any],
               command: str = "train") -> dict[str, Any]:
    """What run.json holds: the run's whole config tree (so `--config run.json` replays it)
    and, under "recorded", the SAEs trained, the data's identity and what must match to
    resume."""
    saes = [section_record(c) for c in configs]
    same_run = {"settings": identity(run), "saes": saes,
                **{k: v for k, v in recorded.items() if k not in WRITTEN_FOLDERS}}
    return {"command": command, **to_dict(run),
            "recorded": {"saes": saes, **recorded, "identity": same_run}}


def claim_run_folder(run: TrainRun, configs: list[SAEConfig], recorded: dict[str, Any],
                     extend: bool = False, command: str = "train") -> dict[str, Any]:
    """Refuse to mix runs in `run.train.out` (unless --overwrite): --resume continues only the
    same run, recognised by its recorded identity (not by how the path is spelled), and starts
    it when the folder holds none yet (a run killed before it wrote anything); a folder holding
    anything but this run is never written into, except with `extend` beside a finished run of
    the same settings (its SAE folders are kept, and listed in run.json as `earlier_sae_folders`
    for a later --overwrite). Then (re)write run.json; returns its record."""
    cfg = run.train
    out = Path(cfg.out)
    record = run_record(run, configs, recorded, command)
    if cfg.overwrite:
        _remove_replaced_saes(out)
    previous = None if cfg.overwrite else _previous_identity(out)
    if previous and not _files_besides_record(out):
        previous = None  # a run that stopped before it trained: nothing of it to keep
    if not cfg.overwrite:
        same = previous == record["recorded"]["identity"]
        if previous is not None and not same:
            _refuse_other_run(out, previous, record["recorded"]["identity"], extend)
        earlier = _earlier_folders(out, record) if previous is not None else []
        if earlier:
            record["recorded"]["earlier_sae_folders"] = earlier
        if same and not cfg.resume:
            _refuse_rerun(out, record["recorded"]["sae_folders"])
        if previous is None and _files_besides_record(out):
            raise GsaeError(f"{out} is not empty and holds no {RUN_FILE}: choose another --out, "
                            "or pass --overwrite to write into it")
    if cfg.resume and previous is None and distributed.is_main():
        print(f"gsae: --resume: {out} holds no run yet; starting it from the beginning",
              file=sys.stderr)
    distributed.barrier()  # every rank has read run.json before rank 0 replaces it
    if distributed.is_main():
        write_json(out / RUN_FILE, record)
    return record


def _refuse_other_run(out: Path, previous: dict[str, Any], current: dict[str, Any],
                      extend: bool) -> None:
    """A run may start beside another only when extending it: that run finished, and it has
    the settings and data of this one (so the SAEs of both mean the same)."""
    def settings(ident: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in ident.items() if k != "saes"}

    differing = differing_keys(settings(previous), settings(current))
    if differing:
        raise GsaeError(f"{out} holds a different run, made with other settings (differs "
                        f"in: {', '.join(differing)}; see its {RUN_FILE}); choose another --out "
                        "or pass --overwrite to replace it")
    if not extend:
        raise GsaeError(f"{out} holds a different run, of other SAEs (see its {RUN_FILE}); "
                        "choose another --out or pass --overwrite to replace it")
    recorded = _previous_record(out) or {}
    unfinished = [f.name for f in _written_sae_folders(out, recorded.get("sae_folders"))
                  if not finished_training(f)]
    if unfinished:
        raise GsaeError(f"{out} holds an interrupted run of other SAEs ({', '.join(unfinished)})"
                        ": list them too to finish it, or pass --overwrite to replace it")


WRITTEN_FOLDERS = ("sae_folders", "earlier_sae_folders")  # what --overwrite may delete


def _earlier_folders(out: Path, record: dict[str, Any]) -> list[str]:
    """The SAE folders that earlier runs in `out` wrote (as its run.json lists them), besides
    the folders of this run."""
    previous = _previous_record(out) or {}
    listed = [*(previous.get("earlier_sae_folders") or []), *(previous.get("sae_folders") or [])]
    current = record["recorded"]["sae_folders"]
    return [name for name in dict.fromkeys(str(f.relative_to(out))
                                           for f in _written_sae_folders(out, listed))
            if name not in current]


def _written_sae_folders(out: Path, names: Any) -> list[Path]:
    """The folders of a run.json list that are SAE folders gsae writes in `out`: <hook>/<name>
    inside it, reached without a link (a hand-edited absolute path, "." or ".." is ignored)."""
    if not isinstance(names, list):
        return []
    root = out.resolve()
    found = []
    for name in names:
        if not isinstance(name, str) or Path(name).is_absolute():
            continue
        folder = out / name
        try:
            inside = folder.resolve().relative_to(root)
        except (ValueError, OSError):
            continue
        if len(inside.parts) == 2 and inside == Path(name) and folder.is_dir():
            found.append(folder)
    return list(dict.fromkeys(found))


def _remove_replaced_saes(out: Path) -> None:
    """Under --overwrite, delete the SAE folders of the runs being replaced (as run.json lists
    them), so nothing stale (an SAE, a snapshot, a log) is left beside the new run's. Nothing
    else in the folder is touched."""
    recorded = _previous_record(out, damaged_ok=True) or {}
    if not distributed.is_main():
        return
    for key in WRITTEN_FOLDERS:
        for folder in _written_sae_folders(out, recorded.get(key)):
            shutil.rmtree(folder)


def _files_besides_record(out: Path) -> bool:
    """Whether `out` holds anything besides run.json, what a killed write of it leaves behind
    (a hidden temporary sibling) and the run's lock file. A run writes nothing else until it
    has trained."""
    return out.is_dir() and any(p.name not in (RUN_FILE, LOCK_FILE)
                                and not p.name.startswith(f".{RUN_FILE}") for p in out.iterdir())


def _refuse_rerun(out: Path, sae_folders: list[str]) -> None:
    """Refuse to start again, without --overwrite, the run that `out` holds."""
    if all(finished_training(out / folder) for folder in sae_folders):
        raise GsaeError(f"{out} already holds this run, finished: pass --overwrite to train it "
                        "again, or choose another --out (a larger --tokens is a new run)")
    raise GsaeError(f"{out} already holds this run; pass --resume to continue it or "
                    "--overwrite to start again")


def _previous_identity(out: Path) -> dict[str, Any] | None:
    recorded = _previous_record(out)
    return None if recorded is None else recorded.get("identity", {})


def _previous_record(out: Path, damaged_ok: bool = False) -> dict[str, Any] | None:
    """The "recorded" part of the run.json in `out`, None if there is none (or, with
    `damaged_ok`, if it does not read as a run record)."""
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text()).get("recorded", {})
        if isinstance(recorded, dict):
            return recorded
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass
    if damaged_ok:
        return None
    raise GsaeError(f"{path} is damaged (not a run record); pass --overwrite to start "
                    "the run again")


# ------------------------------------------------------------------------------ fine-tuning


def finetune(run: FinetuneRun) -> TrainSummary:
    """Fine-tune the SAE folders of `run` on KL(clean || spliced) plus FVU (`gsae.finetune`),
    streaming from the language model; each fine-tuned SAE is saved under `run.train.out` as
    `<hook>/<variant>`, recording its parent. Under torchrun the ranks split every batch of
    contexts."""
    t0 = time.perf_counter()
    validate(run)
    distributed.init()
    run = _local_devices(run)  # type: ignore[arg-type]
    check_wandb(run.train)  # type: ignore[arg-type]
    parents = [load(folder, device=run.train.device) for folder in run.saes]
    model, tokenizer = load_model(run.model)
    for folder, sae in zip(run.saes, parents):
        check_parent_model(sae, folder, model_identity(run.model))
    rows_per_step = run.source.lm_batch_size * (run.data.context_size - 1 - run.source.skip_first)
    train_cfg = trainer_config(run.train, rows_per_step)
    source = _splicing_source(run, model, parents, data_parallel(train_cfg))
    saes = _children(run, parents, model, source.hook_names)
    next(iter(token_contexts(run.data, tokenizer, "train")), None)  # refuse a bad corpus now
    with run_folder_lock(run.train.out):
        trainer = FinetuneTrainer.create(saes, train_cfg,
                                         run_config=_claim_finetune_folder(run, saes))
        trainer.kl_weight = run.train.kl_weight
        if trainer.finished:
            raise GsaeError(f"the run in {run.train.out} has finished: there is nothing to "
                            "resume (pass --overwrite to fine-tune again)")
        contexts = context_batches(run.data, tokenizer, run.source.lm_batch_size,
                                   skip=trainer.chunks_done)
        records = trainer.fit(source.stream(contexts))
    main_rank = distributed.is_main()
    distributed.shutdown()
    return TrainSummary(records, time.perf_counter() - t0, run.train.out,
                        trainer.dropped_outliers, trainer.rows_seen, main_rank, "fine-tuned")


def _splicing_source(run: FinetuneRun, model: PreTrainedModel, parents: list[SAE],
                     split: bool) -> SplicingSource:
    """The clean pass of a fine-tuning run: with the backward to the hooks when some parent
    selects with the gradient; under data-parallel torchrun, each rank on its contexts."""
    if split and run.source.lm_batch_size < distributed.world_size():
        raise GsaeError(f"--lm_batch_size {run.source.lm_batch_size} gives some of the "
                        f"{distributed.world_size()} ranks no context: make it at least that")
    return SplicingSource(model, run.source, with_grad=any(p.beta > 0 for p in parents),
                          split_across_ranks=split)


def _children(run: FinetuneRun, parents: list[SAE], model: PreTrainedModel, hooks: list[str]
              ) -> list[tuple[SAE, str]]:
    """The SAEs to fine-tune at their hooks: the parents' weights, with the provenance of this
    run's data and of the parent; a parent of another hook or corpus is refused."""
    model_id, corpus = model_identity(run.model), corpus_identity(run.data)
    data = {"model": model_id, **source_identity(run.source, run.data)}
    children = []
    for folder, sae in zip(run.saes, parents):
        hook = check_parent_data(sae, folder, model, hooks, corpus)
        parent = {"folder": folder, "weights": weights_fingerprint(sae), "tokens": run.train.tokens}
        sae.provenance = Provenance(hook=hook, **data, finetuned_from=parent)
        children.append((sae, hook))
    return children


def _claim_finetune_folder(run: FinetuneRun, saes: list[tuple[SAE, str]]) -> dict[str, Any]:
    """`claim_run_folder` for a fine-tuning run. The parents are recognised by their weights'
    fingerprints (run.json's `saes` lists their folders as given)."""
    folders = [sae_folder(run.train.out, hook, sae.cfg) for sae, hook in saes]
    recorded = {"parent_weights": [sae.provenance.finetuned_from["weights"]  # type: ignore[index]
                                   for sae, _ in saes],
                "sae_folders": [str(f.relative_to(run.train.out)) for f in folders]}
    return claim_run_folder(run, [sae.cfg for sae, _ in saes], recorded,  # type: ignore[arg-type]
                            command="finetune")


# --------------------------------------------------------------------------------- caching


@dataclass
class CacheSummary:
    """What `cache` stored."""

    store: str
    rows: int
    hooks: int
    shards: int
    bytes: int
    seconds: float
    corpus_ran_out: bool

    def line(self) -> str:
        """The summary `gsae cache` prints."""
        mib = self.bytes / 2**20
        return (f"stored {self.rows} tokens x {self.hooks} hook(s) in {self.shards} shards, "
                f"{mib:.1f} MiB ({mib / max(1, self.rows) * 1e6:.0f} MiB per million tokens), "
                f"{self.seconds:.0f} s, in {self.store}")


def cache(run: CacheRun) -> CacheSummary:
    """Run the language model once over the training split and store activations and
    gradients (continuing a store of the same identity after its last shard)."""
    validate(run)
    model, tokenizer = load_model(run.model)
    source = ActivationSource(model, run.source, with_grad=True)
    t0 = time.perf_counter()
    writer = fill_store(run.store, source, run.data, tokenizer, model_identity(run.model))
    return _cache_summary(writer, run.store, len(source.hook_names), time.perf_counter() - t0)


def _cache_summary(writer: StoreWriter, cfg: StoreConfig, hooks: int, seconds: float
                   ) -> CacheSummary:
    size = sum(f.stat().st_size for f in Path(cfg.store).glob("shard-*"))
    return CacheSummary(cfg.store, writer.rows_done, hooks, len(writer.manifest["shards"]),
                        size, seconds, writer.rows_done < cfg.tokens)


# ------------------------------------------------------------------- evaluation and steering


@dataclass
class LoadedModel:
    """SAE folders loaded with the language model, tokenizer and corpus they were trained on."""

    saes: list[SAE]
    names: list[str]
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_cfg: ModelConfig
    model_id: dict[str, Any]
    data: DataConfig


def recorded_settings(sae_dirs: list[str], need_model: bool = True, with_source: bool = False
                      ) -> dict[str, Any]:
    """The model and data sections that the first SAE's provenance records (a partial config
    tree: settings it does not record keep their defaults). With `need_model`, an SAE that
    does not record its model is refused (the caller has no model to use). With
    `with_source`, also the source section: every SAE's hook, and the first one's positions
    and autocast setting."""
    if not sae_dirs:
        raise GsaeError("give at least one SAE folder")
    recorded = load(sae_dirs[0]).provenance
    trained = recorded.model or {}
    if need_model and not trained.get("model"):
        raise GsaeError(f"{sae_dirs[0]} does not record its model: pass --model")
    model = {"model": trained["model"], "revision": trained.get("revision")} \
        if trained.get("model") else {}
    corpus = recorded.corpus or {}
    data = {f: corpus[f] for f in DataConfig.__dataclass_fields__ if corpus.get(f) is not None}
    if not with_source:
        return {"model": model, "data": data}
    hooks = [recorded.hook] + [load(folder).provenance.hook for folder in sae_dirs[1:]]
    source = {"skip_first": recorded.skip_first, "outlier_factor": recorded.outlier_factor,
              "autocast": recorded.autocast}
    if any(hooks):
        source["hooks"] = list(dict.fromkeys(h for h in hooks if h))
    return {"model": model, "data": data, "source": source}


def finetune_run(sae_dirs: list[str]) -> FinetuneRun:
    """The `gsae finetune` run of these SAE folders with its defaults: the model, corpus,
    hooks and positions the SAEs record."""
    return build(FinetuneRun, {"saes": list(sae_dirs),
                               **recorded_settings(sae_dirs, with_source=True)})


def load_for_eval(sae_dirs: list[str], model_cfg: ModelConfig | None = None,
                  data_cfg: DataConfig | None = None, allow_changed_corpus: bool = False
                  ) -> LoadedModel:
    """Load SAE folders (or hub ids) with their model and corpus: the given configs, or what
    the first SAE records (`recorded_settings`); every SAE must match the model, and the
    corpus must be unchanged since training (unless `allow_changed_corpus`)."""
    if model_cfg is None or data_cfg is None:
        recorded = build(EvaluationRun, recorded_settings(sae_dirs, need_model=not model_cfg))
        model_cfg, data_cfg = model_cfg or recorded.model, data_cfg or recorded.data
    saes = [load(folder, device=model_cfg.device) for folder in sae_dirs]
    model_id = model_identity(model_cfg)
    check_model(saes, model_id)
    check_split(saes, sae_dirs, data_cfg)
    if not allow_changed_corpus:
        check_corpus(saes, sae_dirs, data_cfg)
    model, tokenizer = load_model(model_cfg)
    return LoadedModel(saes, list(sae_dirs), model, tokenizer, model_cfg, model_id, data_cfg)


def check_split(saes: list[SAE], names: list[str], data_cfg: DataConfig) -> None:
    """Refuse an evaluation split that would hold documents an SAE trained on: of the corpus it
    trained on, under another --split_seed or a larger --eval_fraction (a smaller one holds out
    a part of the same documents)."""
    for sae, name in zip(saes, names):
        trained = sae.provenance.corpus or {}
        if trained.get("dataset") != data_cfg.dataset:
            continue
        seed, fraction = trained.get("split_seed"), trained.get("eval_fraction")
        if seed is not None and seed != data_cfg.split_seed:
            raise GsaeError(f"--split_seed {data_cfg.split_seed} differs from the {seed} that "
                            f"{name} was trained with, so its evaluation split would hold "
                            "training documents; leave --split_seed out to use the recorded one")
        if fraction is not None and data_cfg.eval_fraction > fraction:
            raise GsaeError(f"--eval_fraction {data_cfg.eval_fraction} is larger than the "
                            f"{fraction} that {name} was trained with, so its evaluation split "
                            "would hold training documents; use at most the recorded fraction")


def check_corpus(saes: list[SAE], names: list[str], data_cfg: DataConfig) -> None:
    """Refuse to evaluate on a corpus whose files changed since an SAE was trained on the same
    dataset: documents would move between the training and held-out splits."""
    current = corpus_identity(data_cfg)
    for sae, name in zip(saes, names):
        trained = sae.provenance.corpus or {}
        recorded = trained.get("fingerprint")
        if (trained.get("dataset") == current["dataset"] and recorded and current["fingerprint"]
                and recorded != current["fingerprint"]
                and recorded != corpus_fingerprint(data_cfg, whole=False)):  # an older record
            raise GsaeError(f"the corpus {current['dataset']!r} changed since {name} was trained "
                            "on it (its fingerprint differs), so its held-out split may now hold "
                            "training documents; pass --allow_changed_corpus to evaluate anyway")


def run_eval(run: EvaluationRun) -> EvalResult:
    """Evaluate the SAE folders of `run` spliced into their model on held-out text."""
    return next(iter(run_evals(run).values()))


def run_evals(run: EvaluationRun) -> dict[str, EvalResult]:
    """Evaluate the SAE folders of `run` on held-out text (first, under the corpus's name) and
    on each `--unseen` corpus (by name); with --json, the unseen results are in its "unseen";
    with --saebench, the held-out results also as SAEBench core files."""
    validate(run)
    if run.eval.json:
        check_output_file(run.eval.json, "--json", "gsae.eval/")
    if run.saebench:
        check_folder(run.saebench, run.saes, run.overwrite)
    loaded = load_for_eval(run.saes, run.model, run.data, run.allow_changed_corpus)
    results = {loaded.data.dataset: evaluate_held_out(loaded, run.eval, core=bool(run.saebench))}
    if run.saebench:
        write_core(run.saebench, results[loaded.data.dataset], loaded.saes, run.overwrite)
    for name in run.unseen:
        data = replace(loaded.data, dataset=name)
        contexts, _ = unseen_contexts(data, loaded.tokenizer, run.unseen_tokens, count_all=False)
        results[name] = evaluate_unseen(loaded, data, contexts, unseen_eval(run.eval,
                                                                            run.unseen_tokens))
    if run.eval.json and run.unseen:
        write_json(run.eval.json, {**results[loaded.data.dataset].to_json(), "unseen": {
            name: results[name].to_json() for name in run.unseen}})
    return results


def evaluate_held_out(loaded: LoadedModel, cfg: EvalConfig, core: bool = False) -> EvalResult:
    """The loaded SAEs evaluated on the held-out split of their corpus (`gsae eval`); with
    `core`, also the numbers of SAEBench's core evaluation (`gsae.saebench`)."""
    return evaluate(loaded.saes, loaded.model, loaded.tokenizer, loaded.data, cfg,
                    names=loaded.names, model_id=loaded.model_id, core=core)


def unseen_eval(cfg: EvalConfig, tokens: int) -> EvalConfig:
    """The evaluation settings on an unseen corpus: its first `tokens` tokens, no pool."""
    return replace(cfg, json="", eval_tokens=tokens, pool_tokens=0)


def evaluate_on(loaded: LoadedModel, contexts: Tensor, cfg: EvalConfig,
                token_losses: TokenLosses | None = None) -> EvalResult:
    """The loaded SAEs evaluated on token contexts [n, T], collecting the per-token losses into
    `token_losses` if given."""
    return evaluate_contexts(loaded.saes, loaded.model, contexts, cfg, loaded.names,
                             loaded.model_id, token_losses=token_losses)


def evaluate_unseen(loaded: LoadedModel, data: DataConfig, contexts: Tensor, cfg: EvalConfig
                    ) -> EvalResult:
    """The loaded SAEs evaluated on `contexts` of a corpus they never saw (`data`, recorded as
    evaluated whole)."""
    result = evaluate_on(loaded, contexts, cfg)
    result.run.corpus, result.run.part = corpus_identity(data), "all"
    return result


def steer_loaded(loaded: LoadedModel, cfg: SteerConfig) -> SteerResult:
    """The steering evaluation of the loaded SAEs in held-out contexts (`gsae steer`)."""
    return steer(loaded.saes, loaded.model, loaded.tokenizer, loaded.data, cfg,
                 names=loaded.names, model_id=loaded.model_id)


def run_steer_prompt(run: SteeringRun) -> list[PromptSteering]:
    """`gsae steer --latent N --prompt TEXT`: the latent of every SAE folder steered on the
    prompt, its strengths multiples of its typical activation over the steering pool."""
    validate(run)
    loaded = load_for_eval(run.saes, run.model, run.data, run.allow_changed_corpus)
    cfg = run.steer
    data = replace(loaded.data, context_size=cfg.context_size or loaded.data.context_size)
    pool = eval_contexts(data, loaded.tokenizer,
                         EvalConfig(eval_tokens=cfg.pool * data.context_size, seed=cfg.seed))
    results = []
    for sae, name in zip(loaded.saes, loaded.names):
        check_latent(sae, run.latent, name)
        typical, rows = typical_activations(sae, loaded.model, pool, cfg.batch_size, name)
        if typical[run.latent].isnan():
            raise GsaeError(f"latent {run.latent} of {name} never fired on the {rows} pool "
                            "tokens, so it has no typical activation to scale --alphas by: "
                            "choose another latent or a larger --pool")
        results.append(steer_prompt(sae, loaded.model, loaded.tokenizer, run.latent, run.prompt,
                                    cfg.alphas, run.new_tokens, typical[run.latent].item(),
                                    name, rows))
    return results


def run_steer(run: SteeringRun) -> SteerResult:
    """Steer with latents of the SAE folders of `run` in held-out contexts."""
    validate(run)
    if run.json:
        check_output_file(run.json, "--json", "gsae.steer/")
    loaded = load_for_eval(run.saes, run.model, run.data, run.allow_changed_corpus)
    result = steer_loaded(loaded, run.steer)
    if run.json:
        write_json(run.json, result.to_json())
    return result
