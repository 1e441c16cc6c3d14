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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from gsae import distributed
from gsae.config import build, check, identity, sweep_configs, sweep_of, to_dict
from gsae.errors import GsaeError
from gsae.evaluate import EvalConfig, EvalResult, check_model, evaluate
from gsae.formats import load
from gsae.io import check_output_file, write_json
from gsae.models import ModelConfig, available_device, hidden_size, load_model, model_identity
from gsae.sae import SAE, Provenance, SAEConfig
from gsae.source import ActivationSource, Batch, PassRows, SourceConfig, source_identity
from gsae.steer import SteerConfig, SteerResult, steer
from gsae.store import StoreConfig, StoreReader, StoreWriter, fill_store, read_manifest
from gsae.text import DataConfig, batched_contexts, corpus_identity, token_contexts
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


@dataclass
class CacheRun:
    """Everything `gsae cache` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    store: StoreConfig = field(default_factory=StoreConfig)


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

    def table(self) -> str:
        """The summary `gsae train` prints: one row per SAE."""
        total = self.dropped_outliers + self.rows_seen
        lines = [f"\ntrained {len(self.records)} SAE(s) in {self.seconds:.0f} s; outlier tokens "
                 f"dropped: {self.dropped_outliers} of {total} "
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
    check(run)
    return train_saes(run, sweep_configs(run.sae))


def train_saes(run: TrainRun, configs: list[SAEConfig], resume_if_same: bool = False
               ) -> TrainSummary:
    """Train the SAEs of `configs` (the sweep lists in `run.sae` are ignored) on the same
    batches, as `train` does. With `resume_if_same`, a run of exactly these SAEs and settings
    found in `run.train.out` is continued, and anything else there is replaced (what
    `gsae compare` wants)."""
    t0 = time.perf_counter()
    check(run)
    if run.train.batch_tokens > run.train.tokens:
        raise GsaeError(f"--batch_tokens {run.train.batch_tokens} is more than --tokens "
                        f"{run.train.tokens}: a step takes batch_tokens rows, so make it at most "
                        "the budget")
    distributed.init()
    run = _local_devices(run)
    available_device(run.train.device, "--train.device")
    check_positions(run.data, run.source)
    check_wandb(run.train)
    data = training_data(run, with_grad=any(c.beta > 0 for c in configs))
    if run.train.store:
        run = settings_of_store(run, data.recorded["store"])
    for cfg in configs:
        cfg.validate(data.d_in)
    saes = [(SAE(replace(cfg), data.d_in, provenance=data.provenance(hook)), hook)
            for hook in data.hooks for cfg in configs]
    if resume_if_same:
        run = _resume_or_restart(run, configs, data)
    folders = [sae_folder(run.train.out, hook, cfg) for hook in data.hooks for cfg in configs]
    record = claim_run_folder(run, configs, {**data.recorded, "sae_folders": [
        str(f.relative_to(run.train.out)) for f in folders]})
    trainer = Trainer.create(saes, run.train, run_config=record)
    if trainer.finished:
        raise GsaeError(f"the run in {run.train.out} has finished: there is nothing to resume "
                        "(pass --overwrite to train it again, or a larger --tokens as a new run)")
    records = trainer.fit(data.chunks(trainer.chunks_done))
    main_rank = distributed.is_main()
    distributed.shutdown()
    return TrainSummary(records, time.perf_counter() - t0, run.train.out,
                        trainer.dropped_outliers, trainer.rows_seen, main_rank)


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


def _resume_or_restart(run: TrainRun, configs: list[SAEConfig], data: TrainingData
                       ) -> TrainRun:
    same = (_previous_identity(Path(run.train.out))
            == run_record(run, configs, data.recorded)["recorded"]["identity"])
    return replace(run, train=replace(run.train, resume=same, overwrite=not same))


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
    reader = StoreReader(run.train.store, store_hooks(run.source.hooks, stored))

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


def run_record(run: TrainRun, configs: list[SAEConfig], recorded: dict[str, Any]
               ) -> dict[str, Any]:
    """What run.json holds: the run's whole config tree (so `--config run.json` replays it)
    and, under "recorded", the SAEs trained, the data's identity and what must match to
    resume."""
    saes = [asdict(c) for c in configs]
    same_run = {"settings": identity(run), "saes": saes,
                **{k: v for k, v in recorded.items() if k != "sae_folders"}}
    return {"command": "train", **to_dict(run),
            "recorded": {"saes": saes, **recorded, "identity": same_run}}


def claim_run_folder(run: TrainRun, configs: list[SAEConfig], recorded: dict[str, Any]
                     ) -> dict[str, Any]:
    """Refuse to mix runs in `run.train.out` (unless --overwrite): --resume continues only the
    same run, recognised by its recorded identity (not by how the path is spelled), and starts
    it when the folder holds none yet (a run killed before it wrote anything); a folder holding
    anything but this run is never written into. Then (re)write run.json; returns its record."""
    cfg = run.train
    out = Path(cfg.out)
    record = run_record(run, configs, recorded)
    if cfg.overwrite:
        _remove_replaced_saes(out, record["recorded"]["sae_folders"])
    previous = None if cfg.overwrite else _previous_identity(out)
    if previous and not _files_besides_record(out):
        previous = None  # a run that stopped before it trained: nothing of it to keep
    if not cfg.overwrite:
        if previous is not None and previous != record["recorded"]["identity"]:
            raise GsaeError(f"{out} holds a different run (its {RUN_FILE} differs); choose "
                            "another --out or pass --overwrite")
        if previous is not None and not cfg.resume:
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


def _remove_replaced_saes(out: Path, kept: list[str]) -> None:
    """Under --overwrite, delete the SAE folders of the run being replaced (as its run.json
    lists them) that the new run does not reuse, so no stale SAE is left beside the new ones.
    Nothing else in the folder is touched."""
    try:
        old = json.loads((out / RUN_FILE).read_text())["recorded"]["sae_folders"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no readable record of what the previous run wrote: delete nothing
    if not distributed.is_main():
        return
    for name in old:
        folder = out / name
        if name not in kept and ".." not in Path(name).parts and folder.is_dir():
            shutil.rmtree(folder)


def _files_besides_record(out: Path) -> bool:
    """Whether `out` holds anything besides run.json and what a killed write of it leaves
    behind (a hidden temporary sibling). A run writes nothing else until it has trained."""
    return out.is_dir() and any(p.name != RUN_FILE and not p.name.startswith(f".{RUN_FILE}")
                                for p in out.iterdir())


def _refuse_rerun(out: Path, sae_folders: list[str]) -> None:
    """Refuse to start again, without --overwrite, the run that `out` holds."""
    if all(finished_training(out / folder) for folder in sae_folders):
        raise GsaeError(f"{out} already holds this run, finished: pass --overwrite to train it "
                        "again, or choose another --out (a larger --tokens is a new run)")
    raise GsaeError(f"{out} already holds this run; pass --resume to continue it or "
                    "--overwrite to start again")


def _previous_identity(out: Path) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("recorded", {}).get("identity", {})
    except (json.JSONDecodeError, AttributeError):
        raise GsaeError(f"{path} is damaged (not a run record); pass --overwrite to start "
                        "the run again") from None


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
    check_positions(run.data, run.source)
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


def recorded_settings(sae_dirs: list[str], need_model: bool = True) -> dict[str, Any]:
    """The model and data sections that the first SAE's provenance records (a partial config
    tree: settings it does not record keep their defaults). With `need_model`, an SAE that
    does not record its model is refused (the caller has no model to use)."""
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
    return {"model": model, "data": data}


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
    if not allow_changed_corpus:
        check_corpus(saes, sae_dirs, data_cfg)
    model, tokenizer = load_model(model_cfg)
    return LoadedModel(saes, list(sae_dirs), model, tokenizer, model_cfg, model_id, data_cfg)


def check_corpus(saes: list[SAE], names: list[str], data_cfg: DataConfig) -> None:
    """Refuse to evaluate on a corpus whose files changed since an SAE was trained on the same
    dataset: documents would move between the training and held-out splits."""
    current = corpus_identity(data_cfg)
    for sae, name in zip(saes, names):
        trained = sae.provenance.corpus or {}
        if (trained.get("dataset") == current["dataset"] and trained.get("fingerprint")
                and current["fingerprint"] and trained["fingerprint"] != current["fingerprint"]):
            raise GsaeError(f"the corpus {current['dataset']!r} changed since {name} was trained "
                            "on it (its fingerprint differs), so its held-out split may now hold "
                            "training documents; pass --allow_changed_corpus to evaluate anyway")


def run_eval(run: EvaluationRun) -> EvalResult:
    """Evaluate the SAE folders of `run` spliced into their model on held-out text."""
    if run.eval.json:
        check_output_file(run.eval.json, "--json", "gsae.eval/")
    loaded = load_for_eval(run.saes, run.model, run.data, run.allow_changed_corpus)
    return evaluate(loaded.saes, loaded.model, loaded.tokenizer, loaded.data, run.eval,
                    names=loaded.names, model_id=loaded.model_id)


def run_steer(run: SteeringRun) -> SteerResult:
    """Steer with latents of the SAE folders of `run` in held-out contexts."""
    if run.json:
        check_output_file(run.json, "--json", "gsae.steer/")
    loaded = load_for_eval(run.saes, run.model, run.data, run.allow_changed_corpus)
    result = steer(loaded.saes, loaded.model, loaded.tokenizer, loaded.data, run.steer,
                   names=loaded.names, model_id=loaded.model_id)
    if run.json:
        write_json(run.json, result.to_json())
    return result
