"""Training one or many SAEs on the same stream of (activation, gradient) batches.

The trainer does not know where batches come from (a live language model or the on-disk store):
it takes an iterator of "chunks", each a dict from hook point to `Batch`, mixes them through a
shuffle buffer per hook point, and steps every SAE attached to that hook on every mixed batch.
Under torchrun the ranks either split every batch (data-parallel, the same computation as one
process) or the sweep (`--distribute_sweep`); see `gsae.distributed` and the README.

Checkpoints and exact resume. A checkpoint is taken between two chunks (once some SAE has made
`checkpoint_every` more steps), so no chunk is ever half used, and it holds everything the rest
of the run depends on; a run killed at any moment and resumed with `--resume` ends with the
weights of an uninterrupted run, bit for bit. It has parts, each a folder:

    <out>/checkpoint/              the run-level part: state.json (moment, chunks_done,
                                   rows_seen, dropped_outliers, finished) and
                                   buffers.safetensors (per hook: the rows x and g held in the
                                   shuffle buffer, and its generator state)
    <out>/<hook>/<variant>/checkpoint/
                                   each SAE's part: sae.safetensors and cfg.json (weights),
                                   optimizer.safetensors (Adam state, steps since each latent
                                   fired), state.json (moment, step, tokens, the metrics not yet
                                   logged, the length of log.jsonl)

Every part of checkpoint number `moment` is written into `checkpoint.tmp` and renamed into place
(run-level part first), the part's previous checkpoint becoming `checkpoint.old`; the `.old`
folders are removed only once every part holds the new moment. So at any instant each part holds
the latest or the previous moment, and `--resume` takes the latest moment that every part holds
(then drops the other folders and cuts log.jsonl back to that moment); with none, the run starts
from the beginning. The data is then read again from chunk `chunks_done` on. One process (or
rank 0 of a data-parallel run, whose ranks hold identical state) writes all parts; under
`--distribute_sweep` each rank writes its own SAEs and its run-level part
`checkpoint-rank<r>-of-<world>`, so such a run resumes with the same number of ranks.

Once a run has finished (its last checkpoint says `finished`, and the SAEs are saved in their
folders), every part keeps only its state.json unless `keep_training_state` is set: a finished
run is never trained on again (`--resume` refuses it without reading the rest), and the state
files still say that it finished (`finished_training`), which is what `--resume`, `gsae study`
and `gsae compare` read.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gsae import distributed
from gsae.batch import Batch
from gsae.errors import GsaeError
from gsae.io import save_tensors, write_json
from gsae.sae import (
    SAE,
    ForwardOutput,
    SAEConfig,
    fisher_variance_of,
    read_tensors,
    total_variance_of,
)

STATE_DIR = "checkpoint"
STATE_FILE = "state.json"
BUFFERS_FILE = "buffers.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
LOG_FILE = "log.jsonl"
OLD, TMP = ".old", ".tmp"


@dataclass
class TrainConfig:
    """Optimisation, budget, bookkeeping and output of a training run."""

    out: str = field(default="runs/gsae",
                     metadata={"help": "output folder of the run", "identity": False})
    store: str = field(
        default="",
        metadata={"help": "train from this activation store (see gsae cache) instead of "
                  "running the language model"},
    )
    tokens: int = field(default=240_000, metadata={"help": "training tokens per SAE", "min": 1})
    validation_fraction: float = field(
        default=0.0,
        metadata={"help": "share of the --store's shards (its last ones: the training split's "
                  "contexts it read last) that training never reads, kept as a validation part "
                  "of the training split, e.g. 0.1 (gsae study scores its --fisher_sweep on "
                  "them); 0: train on every shard", "min": 0, "max": 0.5,
                  "omit_at_default": True},
    )
    batch_tokens: int = field(default=2048,
                              metadata={"help": "tokens per SAE optimiser step", "min": 1})
    lr: float = field(
        default=0.0,
        metadata={"help": "Adam learning rate; 0 picks 2e-4 / sqrt(n_latents / 2^14) "
                  "(Gao et al.'s scaling)", "min": 0},
    )
    warmup_steps: int = field(default=20, metadata={"help": "linear learning-rate warm-up steps",
                                                    "min": 0})
    decay_fraction: float = field(
        default=0.2, metadata={"help": "final fraction of steps with linear decay to 0",
                               "min": 0, "max": 1}
    )
    auxk_coef: float = field(default=1 / 32, metadata={"help": "weight of the AuxK loss",
                                                       "min": 0})
    k_aux: int = field(default=0, metadata={"help": "latents in the AuxK term; 0 means d_in // 2",
                                            "min": 0})
    dead_tokens: int = field(
        default=100_000,
        metadata={"help": "a latent not selected for this many tokens counts as dead", "min": 1},
    )
    shuffle_tokens: int = field(
        default=16_384,
        metadata={"help": "rows held in the shuffle buffer that mixes contexts into batches",
                  "min": 1},
    )
    shuffle_seed: int = field(default=0, metadata={"help": "seed of the shuffle buffer"})
    b_dec_init: str = field(
        default="geometric_median",
        metadata={"help": "b_dec initialisation from the first batch",
                  "choices": ("geometric_median", "mean")},
    )
    log_every: int = field(default=10, metadata={"help": "steps between logged metrics",
                                                 "min": 1})
    checkpoint_every: int = field(
        default=50, metadata={"help": "steps between checkpoints (each taken between two "
                              "chunks of data, once some SAE has made this many steps)", "min": 1})
    keep_training_state: bool = field(
        default=False,
        metadata={"help": "keep the checkpoint's training state (weights, Adam state, shuffle "
                  "buffers) once the run has finished; by default only its state.json, which "
                  "marks the run finished, is left", "identity": False})
    resume: bool = field(
        default=False,
        metadata={"help": "continue the run found in --out from its latest checkpoint, exactly "
                  "(a run with no checkpoint yet starts from the beginning)", "identity": False})
    overwrite: bool = field(
        default=False, metadata={"help": "replace whatever run is in --out", "identity": False}
    )
    device: str = field(
        default="",
        metadata={"help": "device of the SAEs (cpu, cuda, cuda:N); empty means the model's "
                  "--device", "identity": False},
    )
    distribute_sweep: bool = field(
        default=False,
        metadata={"help": "under torchrun, give each rank a share of the sweep's SAEs (each rank "
                  "reads all the data) instead of splitting every batch across the ranks"},
    )
    wandb_project: str = field(
        default="",
        metadata={"help": "also log every SAE's log.jsonl records to this Weights & Biases "
                  "project (needs gsae[wandb])", "identity": False},
    )
    snapshots: list[int] = field(
        default_factory=list,
        metadata={"help": "token counts at which every SAE is also saved, as it is after the "
                  "step that reaches the count, to <sae folder>/snapshots/tokens-N (an SAE "
                  "folder like any other), e.g. 150000 300000 600000; at most --tokens",
                  "may_be_empty": True,
                  "min": 1, "identity": False},
    )

    def check(self) -> None:
        """The rules between settings (`gsae.config.validate` calls it): a step fits in the
        budget, and every snapshot is reached."""
        if self.validation_fraction > 0 and not self.store:
            raise GsaeError(f"--validation_fraction {self.validation_fraction:g} keeps shards of "
                            "an activation store out of training: give --store as well")
        if self.batch_tokens > self.tokens:
            raise GsaeError(f"--batch_tokens {self.batch_tokens} is more than --tokens "
                            f"{self.tokens}: a step takes batch_tokens rows, so make it at most "
                            "the budget")
        beyond = sorted(s for s in self.snapshots if s > self.tokens)
        if beyond:
            raise GsaeError(f"--snapshots {' '.join(map(str, beyond))}: beyond --tokens "
                            f"{self.tokens}, where training stops, so they would never be saved; "
                            "give counts up to --tokens, or raise --tokens")


def default_lr(n_latents: int) -> float:
    """Adam learning rate scaled with width, as in Gao et al. 2024."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def lr_factor(step: int, total_steps: int, warmup: int, decay_fraction: float) -> float:
    """Multiplier of the base learning rate at `step` (0-based): warm-up, flat, linear decay."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(total_steps * (1 - decay_fraction))
    if step >= decay_start and total_steps > decay_start:
        return max(0.0, (total_steps - step) / (total_steps - decay_start))
    return 1.0


def training_loss(out: ForwardOutput, sae_cfg: SAEConfig, auxk_coef: float) -> torch.Tensor:
    """FVU + auxk_coef AuxK, plus lambda FVU_g when the SAE's `fisher_coef` lambda is above 0
    (method.md)."""
    loss = out.fvu + auxk_coef * out.auxk_loss
    if sae_cfg.fisher_coef > 0:
        if out.fvu_g is None:
            raise GsaeError(f"fisher_coef {sae_cfg.fisher_coef:g} needs the loss gradient g, and "
                            "the data has none: train from a store or from a source made with "
                            "gradients")
        loss = loss + sae_cfg.fisher_coef * out.fvu_g
    return loss


def data_parallel(cfg: TrainConfig) -> bool:
    """True when the ranks of a torchrun launch split every batch (rather than the sweep)."""
    return distributed.world_size() > 1 and not cfg.distribute_sweep


def variant_name(cfg: SAEConfig) -> str:
    """A folder name that tells the sweep members apart; `-f<lambda>` only when the Fisher
    term is on, so SAEs without it keep the names they had before it existed."""
    width = f"n{cfg.n_latents}" if cfg.n_latents > 0 else f"x{cfg.expansion_factor}"
    fisher = f"-f{cfg.fisher_coef:g}" if cfg.fisher_coef > 0 else ""
    return f"k{cfg.k}-beta{cfg.beta:g}{fisher}-{cfg.value_mode}-{width}-s{cfg.seed}"


def sae_folder(out: str | Path, hook: str, cfg: SAEConfig) -> Path:
    """Where a run in `out` keeps the SAE of this config at this hook."""
    return Path(out) / hook / variant_name(cfg)


class ShuffleBuffer:
    """Mixes rows from many contexts: holds up to `capacity` rows, and once full emits a random
    half of them as batches of `batch_size`."""

    def __init__(self, capacity: int, batch_size: int, seed: int):
        self.capacity = max(capacity, 2 * batch_size)
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.x: list[torch.Tensor] = []
        self.g: list[torch.Tensor | None] = []
        self.rows = 0

    def add(self, batch: Batch) -> Iterator[Batch]:
        """Add a batch's rows; yield any batches that became ready."""
        self.x.append(batch.x)
        self.g.append(batch.g)
        self.rows += len(batch)
        if self.rows >= self.capacity:
            yield from self._emit(self.rows // 2)

    def flush(self) -> Iterator[Batch]:
        """Emit everything left (at the end of the data)."""
        yield from self._emit(self.rows)

    def _emit(self, n_rows: int) -> Iterator[Batch]:
        if not self.rows:
            return
        x = torch.cat(self.x)
        g = None if any(t is None for t in self.g) else torch.cat(self.g)  # type: ignore[misc]
        perm = torch.randperm(x.shape[0], generator=self.gen)
        n_rows = n_rows - n_rows % self.batch_size if n_rows >= self.batch_size else n_rows
        for start in range(0, n_rows, self.batch_size):
            idx = perm[start : start + self.batch_size]
            yield Batch(x[idx], None if g is None else g[idx])
        rest = perm[n_rows:]
        self.x, self.g = [x[rest]], [None if g is None else g[rest]]
        self.rows = rest.numel()

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The rows held and the random state, as CPU tensors named `prefix` + x, g,
        generator (what `load_state` restores)."""
        tensors = {prefix + "generator": self.gen.get_state()}
        if self.rows:
            tensors[prefix + "x"] = torch.cat(self.x).cpu()
            if all(g is not None for g in self.g):
                tensors[prefix + "g"] = torch.cat(self.g).cpu()  # type: ignore[arg-type]
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor], prefix: str,
                   device: torch.device) -> None:
        """Hold again the rows and random state that `state_tensors` saved."""
        self.gen.set_state(tensors[prefix + "generator"])
        x, g = tensors.get(prefix + "x"), tensors.get(prefix + "g")
        self.x = [] if x is None else [x.to(device)]
        self.g = [] if x is None else [None if g is None else g.to(device)]
        self.rows = 0 if x is None else x.shape[0]


# ------------------------------------------------------------------------------ checkpoints


def _sibling(final: Path, suffix: str) -> Path:
    return final.with_name(final.name + suffix)


def _remove_part(folder: Path) -> None:
    """Delete a checkpoint folder, its state file first: a kill midway never leaves a folder
    that looks complete."""
    (folder / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def _write_part(final: Path, write: Callable[[Path], None]) -> None:
    """Write one part of a checkpoint into a fresh folder (`write` fills it; its state file
    last), which then becomes `final` by renames; the part's previous checkpoint stays as
    `.old` until every part of the run has the new one."""
    tmp, old = _sibling(final, TMP), _sibling(final, OLD)
    _remove_part(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    _remove_part(old)  # older than the previous checkpoint, which every part holds
    if final.exists():
        final.rename(old)
    tmp.rename(final)


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def _refuse_damaged(parts: list[Path]) -> None:
    """A checkpoint's state file is written whole before its folder is renamed into place, so
    one that exists but does not read is damage, not a kill: refuse rather than start again
    over the run's progress."""
    for part in parts:
        for folder in (part, _sibling(part, OLD)):
            state = folder / STATE_FILE
            if state.is_file() and _read_state(folder) is None:
                raise GsaeError(f"the checkpoint file {state} is damaged (not valid JSON); "
                                "pass --overwrite to train the run again, or restore the file")


def _checkpoints_by_moment(final: Path) -> dict[int, Path]:
    """The complete checkpoints of one part (`final` and its `.old`), by moment."""
    found = {}
    for folder in (final, _sibling(final, OLD)):
        state = _read_state(folder)
        if state is not None and "moment" in state:
            found[state["moment"]] = folder
    return found


def _keep_only(final: Path, chosen: Path) -> None:
    """Make `chosen`, one of the checkpoints of the part `final`, its only one, named `final`."""
    if chosen != final:
        _remove_part(final)
        chosen.rename(final)
    _remove_part(_sibling(final, OLD))
    _remove_part(_sibling(final, TMP))


def checkpoint_dir(folder: Path) -> Path | None:
    """The latest complete checkpoint of an SAE folder, or None."""
    found = _checkpoints_by_moment(Path(folder) / STATE_DIR)
    return found[max(found)] if found else None


def finished_training(folder: Path) -> bool:
    """Whether the checkpoint of an SAE folder says its training finished."""
    state_dir = checkpoint_dir(folder)
    return state_dir is not None and bool((_read_state(state_dir) or {}).get("finished"))


# ---------------------------------------------------------------------------------- the SAEs


class TrainedSAE:
    """One SAE of a run with its optimiser and bookkeeping."""

    def __init__(self, sae: SAE, hook: str, folder: Path, cfg: TrainConfig):
        self.sae, self.hook, self.folder = sae, hook, folder
        if cfg.device:
            sae.to(cfg.device)
        self.base_lr = cfg.lr if cfg.lr > 0 else default_lr(sae.n_latents)
        self.k_aux = cfg.k_aux if cfg.k_aux > 0 else max(1, sae.d_in // 2)
        self.opt = torch.optim.Adam(sae.parameters(), lr=self.base_lr, **_adam_kwargs(sae))
        self.since_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=sae.W_dec.device)
        self.step = 0
        self.tokens = 0
        self.b_dec_ready = False
        self.acc: dict[str, float] = {}
        self.acc_steps = 0
        self.last_record: dict[str, Any] = {}
        self.log_bytes = 0  # the length of log.jsonl at the checkpoint resumed from

    @property
    def name(self) -> str:
        return f"{self.hook}/{self.folder.name}"

    @property
    def log_file(self) -> Path:
        return self.folder / LOG_FILE

    def save_checkpoint(self, moment: int, run_state: dict[str, Any]) -> None:
        """Write the SAE (in its folder, for users) and its part of the run's checkpoint
        `moment`: weights, optimiser state and every counter."""
        self.sae.save(self.folder)
        _write_part(self.folder / STATE_DIR,
                    lambda tmp: self._write_state(tmp, {"moment": moment, **run_state}))

    def _write_state(self, folder: Path, run_state: dict[str, Any]) -> None:
        self.sae.save(folder)
        tensors = {"since_fired": self.since_fired.cpu()}
        for i, p in enumerate(self.sae.parameters()):
            for key, value in self.opt.state.get(p, {}).items():
                tensors[f"{i}.{key}"] = value.detach().cpu().reshape(-1) if value.ndim == 0 \
                    else value.detach().cpu()
        save_tensors(folder / OPTIMIZER_FILE, tensors)
        log_bytes = self.log_file.stat().st_size if self.log_file.exists() else 0
        state = {**run_state, "step": self.step, "tokens": self.tokens,
                 "b_dec_ready": self.b_dec_ready, "log_bytes": log_bytes, "acc": self.acc,
                 "acc_steps": self.acc_steps, "last_record": self.last_record}
        write_json(folder / STATE_FILE, state, indent=None)

    def load_checkpoint(self, folder: Path) -> None:
        """Restore the SAE, its optimiser and its counters from one of its checkpoints."""
        self.sae.load_state_dict(SAE.load(folder).state_dict())
        tensors = read_tensors(folder / OPTIMIZER_FILE)
        params = list(self.sae.parameters())
        _check_optimizer_state(tensors, params, self.sae.n_latents, folder / OPTIMIZER_FILE)
        self.since_fired = tensors.pop("since_fired").to(self.since_fired.device)
        for name, value in tensors.items():
            i, key = name.split(".", 1)
            p = params[int(i)]
            value = value.to(p.device)
            self.opt.state.setdefault(p, {})[key] = value.reshape(()) if key == "step" else value
        state = json.loads((folder / STATE_FILE).read_text())
        self.step, self.tokens = state["step"], state["tokens"]
        self.b_dec_ready = state["b_dec_ready"]
        self.acc, self.acc_steps = state["acc"], state["acc_steps"]
        self.last_record, self.log_bytes = state["last_record"], state["log_bytes"]

    def cut_log(self) -> None:
        """Drop what log.jsonl gained after the checkpoint resumed from (it is logged again)."""
        if self.log_file.exists():
            with open(self.log_file, "r+b") as f:
                f.truncate(min(self.log_bytes, self.log_file.stat().st_size))


def _check_optimizer_state(tensors: dict[str, torch.Tensor], params: list[torch.Tensor],
                           n_latents: int, where: Path) -> None:
    """Refuse an optimizer file whose tensors do not fit the SAE: Adam would otherwise go on
    with moments of the wrong shape without a word."""
    expected = {"since_fired": (n_latents,)}
    for i, p in enumerate(params):
        expected.update({f"{i}.exp_avg": tuple(p.shape), f"{i}.exp_avg_sq": tuple(p.shape),
                         f"{i}.step": (1,)})
    wrong = sorted(name for name, t in tensors.items() if expected.get(name) != tuple(t.shape))
    if wrong or "since_fired" not in tensors:
        raise GsaeError(f"{where} does not fit the SAE (wrong or unknown tensors: "
                        f"{', '.join(wrong) or 'since_fired is missing'})")


SNAPSHOT_DIR = "snapshots"


def snapshot_folder(folder: Path, tokens: int) -> Path:
    """Where the SAE in `folder` is saved as it was at the snapshot of `tokens`."""
    return folder / SNAPSHOT_DIR / f"tokens-{tokens}"


def save_snapshots(m: TrainedSAE, reached: list[int]) -> None:
    """Save the SAE as it is now (after the step that reached each count) as a snapshot, with
    `snapshot.json` saying exactly when: its tokens and step."""
    for tokens in reached:
        folder = m.sae.save(snapshot_folder(m.folder, tokens))
        write_json(folder / "snapshot.json", {"requested_tokens": tokens, "tokens": m.tokens,
                                              "step": m.step})


def _adam_kwargs(sae: SAE) -> dict[str, Any]:
    # The fused kernel is exact and ~10x faster than the default loop on CPU and GPU alike.
    return {"fused": True} if sae.W_dec.dtype in (torch.float32, torch.float64) else {}


class WandbLog:
    """Sends every record written to an SAE's log.jsonl to a Weights & Biases run too, as
    `<hook>/<variant>/<metric>` with that SAE's tokens as the x axis."""

    def __init__(self, project: str, name: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=project, name=name, config=config)
        self.named: set[str] = set()

    def log(self, sae_name: str, record: dict[str, Any]) -> None:
        if sae_name not in self.named:
            self.run.define_metric(f"{sae_name}/*", step_metric=f"{sae_name}/tokens")
            self.named.add(sae_name)
        self.run.log({f"{sae_name}/{key}": value for key, value in record.items()})

    def finish(self) -> None:
        self.run.finish()


def check_wandb(cfg: TrainConfig) -> None:
    """Refuse --wandb_project when wandb is not installed (before any work is done)."""
    if not cfg.wandb_project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise GsaeError("--wandb_project needs the wandb package: pip install 'gsae[wandb]'"
                        ) from None


# ---------------------------------------------------------------------------------- training


def _share_of_this_rank(jobs: list[Any], cfg: TrainConfig) -> tuple[list[Any], str]:
    """The SAEs this process trains, and the name of its run-level checkpoint part: all of
    them and `checkpoint`, or under `distribute_sweep` a round-robin share and
    `checkpoint-rank<r>-of-<world>`."""
    world = distributed.world_size()
    if not cfg.distribute_sweep or world == 1:
        return jobs, STATE_DIR
    if len(jobs) < world:
        raise GsaeError(f"--distribute_sweep on {world} ranks needs at least {world} SAEs; the "
                        f"sweep has {len(jobs)}")
    return jobs[distributed.rank()::world], f"{STATE_DIR}-rank{distributed.rank()}-of-{world}"



def fill_status(rows: int, capacity: int, seconds: float) -> str:
    """The progress line while the shuffle buffer fills (no step is taken before it is full),
    with the time left at the rate so far."""
    line = f"filling the shuffle buffer: {rows}/{capacity}"
    if rows > 0 and seconds > 0:
        line += f", about {(capacity - rows) * seconds / rows:.0f} s left"
    return line


class Trainer:
    """Trains a list of SAEs, each bound to a hook point, on shared batches."""

    member_class = TrainedSAE  # what `create` wraps each SAE in
    progress_label = "train"

    def __init__(self, members: list[TrainedSAE], cfg: TrainConfig,
                 checkpoint_name: str = STATE_DIR):
        if not members:
            raise GsaeError("nothing to train: the sweep is empty")
        self.members = members
        self.cfg = cfg
        self.data_parallel = data_parallel(cfg)
        # Data-parallel ranks hold identical SAEs: rank 0 writes them. Sweep shares are disjoint.
        self.writes_files = distributed.is_main() or cfg.distribute_sweep
        self.device = members[0].sae.W_dec.device
        # The steps taken: the last one may be partly beyond the budget (it reaches it).
        self.total_steps = max(1, math.ceil(cfg.tokens / cfg.batch_tokens))
        self.buffers = {hook: ShuffleBuffer(cfg.shuffle_tokens, cfg.batch_tokens,
                                            cfg.shuffle_seed)
                        for hook in dict.fromkeys(m.hook for m in members)}
        self.checkpoint = Path(cfg.out) / checkpoint_name  # the run-level part
        self.chunks_done = 0
        self.dropped_outliers = 0
        self.rows_seen = 0
        self.moment = 0  # checkpoints written by the run so far
        self.finished = False
        self.checkpoint_due = False
        self.wandb: WandbLog | None = None

    @classmethod
    def create(cls, saes: list[tuple[SAE, str]], cfg: TrainConfig,
               run_config: dict[str, Any] | None = None) -> Trainer:
        """The members of a run, each in its folder under `cfg.out` (see `sae_folder`); with
        `cfg.resume`, restored from the run's latest checkpoint (from the beginning if it has
        none yet), else with fresh logs. Under `distribute_sweep` this rank takes its share of
        the SAEs. `run_config` is what a wandb run records as its config."""
        folders = [sae_folder(cfg.out, hook, sae.cfg) for sae, hook in saes]
        for i, folder in enumerate(folders):
            if folder in folders[:i]:
                raise GsaeError(f"the sweep lists the same SAE twice: {folder}")
        jobs, name = _share_of_this_rank(list(zip(saes, folders)), cfg)
        members = [cls.member_class(sae, hook, folder, cfg) for (sae, hook), folder in jobs]
        trainer = cls(members, cfg, name)
        if cfg.resume:
            trainer._resume()
        else:
            trainer._start_afresh()
        if cfg.wandb_project and trainer.writes_files:
            check_wandb(cfg)
            suffix = "" if name == STATE_DIR else name[len(STATE_DIR):]
            trainer.wandb = WandbLog(cfg.wandb_project, Path(cfg.out).name + suffix,
                                     run_config or {"train": asdict(cfg)})
        return trainer

    def _parts(self) -> list[Path]:
        """The folders of this process's checkpoint: the run-level part, then each SAE's."""
        return [self.checkpoint] + [m.folder / STATE_DIR for m in self.members]

    def _resume(self) -> None:
        """Restore the latest checkpoint that every part holds (see the module docstring)."""
        parts = self._parts()
        _refuse_damaged(parts)
        found = [_checkpoints_by_moment(part) for part in parts]
        common = set(found[0]).intersection(*found[1:])
        if not common:
            self._refuse_other_split()
            self._refuse_unmatched(found)
            if distributed.is_main():
                print(f"gsae: --resume: {self.cfg.out} holds no checkpoint of this run yet; "
                      "starting it from the beginning", file=sys.stderr)
            self._start_afresh()
            return
        self.moment = max(common)
        if (_read_state(found[0][self.moment]) or {}).get("finished"):
            self.finished = True  # nothing is trained on: its training state may be gone
            return
        try:
            self._load_run_state(found[0][self.moment])
            for m, by_moment in zip(self.members, found[1:]):
                m.load_checkpoint(by_moment[self.moment])
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            reason = (str(err).splitlines() or [""])[0]
            if not isinstance(err, GsaeError):
                reason = f"{type(err).__name__}: {reason}"
            raise GsaeError(f"a checkpoint of the run in {self.cfg.out} is damaged or incomplete "
                            f"({reason}); pass --overwrite to train the run again") from None
        distributed.barrier()  # every rank has read the checkpoint before it is tidied
        if self.writes_files:
            for part, by_moment in zip(parts, found):
                _keep_only(part, by_moment[self.moment])
            for m in self.members:
                m.cut_log()

    def _start_afresh(self) -> None:
        """Remove any checkpoint of this process's parts (a previous run's) and the logs. The
        SAE folders are made by the first log record or checkpoint, so a run that stops before
        it trains leaves only its run.json (see `gsae.pipeline.claim_run_folder`)."""
        distributed.barrier()  # every rank has looked for checkpoints before they go
        if not self.writes_files:
            return
        for part in self._parts():
            for folder in (part, _sibling(part, OLD), _sibling(part, TMP)):
                _remove_part(folder)
        for m in self.members:
            m.log_file.unlink(missing_ok=True)

    def _refuse_other_split(self) -> None:
        """A run split differently across ranks (--distribute_sweep) keeps its run-level state
        under other names: resuming it with another split would silently start again."""
        others = sorted(p.name for p in Path(self.cfg.out).glob(STATE_DIR + "*")
                        if p.name.split(".")[0] != self.checkpoint.name and _read_state(p))
        if others:
            raise GsaeError(f"{self.cfg.out} holds checkpoints of the run split otherwise "
                            f"across ranks ({', '.join(others)}); resume it with the ranks and "
                            "--distribute_sweep setting that wrote them, or pass --overwrite")

    def _refuse_unmatched(self, found: list[dict[int, Path]]) -> None:
        """Parts that share no moment are normal only while the first checkpoint is written;
        once some part holds a later one, every part holds it or the one before, so a part
        without either was damaged: refuse rather than start again over the run's progress."""
        later = [moment for by_moment in found for moment in by_moment if moment > 1]
        if later:
            raise GsaeError(f"the checkpoint parts of the run in {self.cfg.out} share no moment "
                            f"(one holds moment {max(later)}, another neither it nor the one "
                            "before): a checkpoint folder or its state.json was damaged or "
                            "removed; restore it, or pass --overwrite to train the run again")

    def _load_run_state(self, folder: Path) -> None:
        state = json.loads((folder / STATE_FILE).read_text())
        self.chunks_done, self.rows_seen = state["chunks_done"], state["rows_seen"]
        self.dropped_outliers, self.finished = state["dropped_outliers"], state["finished"]
        tensors = read_tensors(folder / BUFFERS_FILE)
        widths = {m.hook: m.sae.d_in for m in self.members}
        for hook, buf in self.buffers.items():
            _check_buffer_rows(tensors, f"{hook}/", widths[hook], folder / BUFFERS_FILE)
            buf.load_state(tensors, f"{hook}/", self.device)

    def _write_run_state(self, folder: Path, state: dict[str, Any]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for hook, buf in self.buffers.items():
            tensors.update(buf.state_tensors(f"{hook}/"))
        save_tensors(folder / BUFFERS_FILE, tensors)
        write_json(folder / STATE_FILE, state, indent=None)

    @property
    def done(self) -> bool:
        return all(m.tokens >= self.cfg.tokens for m in self.members)

    def fit(self, chunks: Iterable[dict[str, Batch]]) -> list[dict[str, Any]]:
        """Train until every SAE has seen the token budget or the data ends. `chunks` must
        already skip the `chunks_done` chunks of a resumed run. Returns the final metrics."""
        chunks = iter(chunks)
        start_tokens = min(m.tokens for m in self.members)
        # smoothing 0.05: the rate (and so the ETA) averages over about 20 updates; steps come
        # in bursts, one chunk at a time, which made tqdm's default of 0.3 jump
        bar = tqdm(total=self.cfg.tokens, initial=start_tokens, unit="tok", unit_scale=True,
                   desc=self.progress_label, dynamic_ncols=True,
                   disable=not distributed.is_main(), smoothing=0.05)
        self._t0 = time.perf_counter()
        self._t0_tokens = start_tokens
        try:
            while not self.done and (chunk := next(chunks, None)) is not None:
                self._train_on(chunk, bar)
                self.chunks_done += 1
                if self.checkpoint_due:  # at a chunk boundary: nothing half-used to replay
                    self._save_checkpoints(finished=False)
                if bar.n == start_tokens:  # nothing trained yet: show the buffer filling up
                    buf = next(iter(self.buffers.values()))
                    bar.set_postfix_str(fill_status(buf.rows, buf.capacity,
                                                    time.perf_counter() - self._t0))
            if not self.done:  # the data ended: train on what the buffers still hold
                for hook, buf in self.buffers.items():
                    for ready in buf.flush():
                        self._step_hook(hook, ready, bar)
        finally:
            bar.close()
        for m in self.members:
            self._log(m)
        final = [{"name": m.name, "folder": str(m.folder), **m.last_record}
                 for m in self.members]
        self._save_checkpoints(finished=True)
        if not self.cfg.keep_training_state:
            self._drop_training_state()
        if self.wandb is not None:
            self.wandb.finish()
        if self.cfg.distribute_sweep:
            parts = distributed.gather_objects(final)  # dealt round-robin: interleave back
            final = [r for group in itertools.zip_longest(*parts) for r in group if r is not None]
        return final

    def _train_on(self, chunk: dict[str, Batch], bar) -> None:
        for hook, batch in chunk.items():
            if hook not in self.buffers:
                continue
            self.dropped_outliers += batch.dropped_outliers
            self.rows_seen += len(batch)
            for ready in self.buffers[hook].add(batch.to(self.device)):
                self._step_hook(hook, ready, bar)

    def _step_hook(self, hook: str, batch: Batch, bar) -> None:
        if self.data_parallel and len(batch) < distributed.world_size():
            return  # the last rows of finite data, too few to give each rank one: left out
        _check_finite(batch, self.members[0].step)
        for m in self.members:
            if m.hook == hook and m.tokens < self.cfg.tokens:
                self._train_step(m, batch)
        lead = min(m.tokens for m in self.members)
        bar.update(lead - bar.n)
        first = self.members[0]
        if first.acc_steps:
            bar.set_postfix(fvu=f"{first.acc['fvu'] / first.acc_steps:.3f}",
                            dead=f"{self._dead_fraction(first):.3f}", refresh=False)
        if any(m.step % self.cfg.checkpoint_every == 0 and m.step > 0 for m in self.members
               if m.hook == hook):
            self.checkpoint_due = True

    def _save_checkpoints(self, finished: bool) -> None:
        """Checkpoint `moment + 1`: the run-level part, then every SAE's; then the previous
        checkpoint of every part is removed (see the module docstring)."""
        self.moment += 1
        self.checkpoint_due = False
        self.finished = finished
        if not self.writes_files:
            return
        run_state = {"moment": self.moment, "chunks_done": self.chunks_done,
                     "finished": finished}
        _write_part(self.checkpoint, lambda tmp: self._write_run_state(tmp, {
            **run_state, "rows_seen": self.rows_seen, "dropped_outliers": self.dropped_outliers,
            "saes": [m.name for m in self.members]}))
        for m in self.members:
            m.save_checkpoint(self.moment, run_state)
        for part in self._parts():
            _remove_part(_sibling(part, OLD))

    def _drop_training_state(self) -> None:
        """Delete from every part of the finished checkpoint what only a resumed run would read
        (SAE weights, Adam state, shuffle buffers): the SAEs are saved in their folders by
        then. Each part keeps its state.json, which says the training finished; a kill midway
        leaves a finished checkpoint with some of its files, which nothing reads either."""
        if not self.writes_files:
            return
        for part in self._parts():
            for path in part.iterdir() if part.is_dir() else []:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.name != STATE_FILE:
                    path.unlink()

    def _train_step(self, m: TrainedSAE, batch: Batch) -> None:
        sae = m.sae
        if not m.b_dec_ready:
            sae.init_b_dec(batch.x, self.cfg.b_dec_init)
            m.b_dec_ready = True
        self._set_lr(m)
        dead = m.since_fired >= self.cfg.dead_tokens
        part, variance, fisher_variance = self._rows_here(batch)
        out = sae(part.x, part.g, dead_mask=dead, k_aux=m.k_aux, variance=variance,
                  fisher_variance=fisher_variance)
        loss = training_loss(out, sae.cfg, self.cfg.auxk_coef)
        self._refuse_non_finite(m, loss)
        loss.backward()
        self._finish_step(m, out, len(batch), {} if out.fvu_g is None else {"fvu_g": out.fvu_g})

    def _refuse_non_finite(self, m: TrainedSAE, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise GsaeError(
                f"the loss of {m.name} became non-finite at step {m.step}; the last checkpoint "
                f"in {m.folder} is kept (try a lower --lr)"
            )

    def _set_lr(self, m: TrainedSAE) -> None:
        for group in m.opt.param_groups:
            group["lr"] = m.base_lr * lr_factor(m.step, self.total_steps, self.cfg.warmup_steps,
                                                 self.cfg.decay_fraction)

    def _finish_step(self, m: TrainedSAE, out: ForwardOutput, rows: int,
                     extra: dict[str, torch.Tensor] | None = None) -> None:
        """After the loss's backward on a batch of `rows` rows: the optimiser step with the
        decoder-norm upkeep, dead-latent counts, metrics (with the scalars of `extra`, summed
        over the ranks like the losses), logs and snapshots."""
        sae, extra = m.sae, extra or {}
        with torch.no_grad():
            active = out.values > 0
            fired = torch.zeros(sae.n_latents, device=active.device)
            fired[out.indices[active]] = 1.0
            effect = out.fvu.new_zeros(()) if out.effect is None else out.effect.sum()
            totals = torch.stack([out.fvu, out.auxk_loss, active.sum().float(), effect,
                                  *extra.values()])
        if self.data_parallel:  # before the step: the ranks' gradients add up to the batch's
            distributed.all_reduce_sum([p.grad for p in sae.parameters()] + [fired, totals])
        sae.remove_parallel_grads()
        m.opt.step()
        m.opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        m.since_fired += rows
        m.since_fired[fired > 0] = 0
        fvu, auxk, selected, effect_sum, *more = totals.tolist()
        stats = {"fvu": fvu, "auxk": auxk, "l0": selected / rows,
                 "effect": effect_sum / (rows * sae.k), **dict(zip(extra, more))}
        for key, value in stats.items():
            m.acc[key] = m.acc.get(key, 0.0) + value
        m.acc_steps += 1
        m.step += 1
        m.tokens += rows
        if m.step % self.cfg.log_every == 0:
            self._log(m)
        reached = [s for s in self.cfg.snapshots if m.tokens - rows < s <= m.tokens]
        if reached and self.writes_files:
            save_snapshots(m, reached)

    def _rows_here(self, batch: Batch
                   ) -> tuple[Batch, torch.Tensor | None, torch.Tensor | None]:
        """The rows this rank trains on, and the variance and Fisher variance that normalise
        the losses (None: the rows' own). Data-parallel ranks take contiguous shares of the
        batch, normalised by the whole batch's, so their losses and gradients add up to the
        one-process ones."""
        if not self.data_parallel:
            return batch, None, None
        g = None if batch.g is None else distributed.shard(batch.g)
        fisher = None if batch.g is None else fisher_variance_of(batch.x, batch.g)
        return Batch(distributed.shard(batch.x), g), total_variance_of(batch.x), fisher

    def _dead_fraction(self, m: TrainedSAE) -> float:
        return (m.since_fired >= self.cfg.dead_tokens).float().mean().item()

    def _log(self, m: TrainedSAE) -> None:
        if not m.acc_steps:
            return
        elapsed = time.perf_counter() - self._t0
        record = {
            "step": m.step,
            "tokens": m.tokens,
            **{key: value / m.acc_steps for key, value in m.acc.items()},
            "dead_fraction": self._dead_fraction(m),
            "lr": m.opt.param_groups[0]["lr"],
            "tokens_per_s": (m.tokens - self._t0_tokens) / elapsed if elapsed > 0 else 0.0,
            "outlier_fraction": self.dropped_outliers / max(1, self.dropped_outliers
                                                            + self.rows_seen),
        }
        if self.writes_files:
            m.folder.mkdir(parents=True, exist_ok=True)
            with open(m.log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb is not None:
                self.wandb.log(m.name, record)
        m.acc, m.acc_steps, m.last_record = {}, 0, record


def _check_buffer_rows(tensors: dict[str, torch.Tensor], prefix: str, width: int,
                       where: Path) -> None:
    """Refuse shuffle-buffer rows that do not fit the SAEs of their hook."""
    x, g = tensors.get(prefix + "x"), tensors.get(prefix + "g")
    if x is not None and (x.ndim != 2 or x.shape[1] != width
                          or (g is not None and g.shape != x.shape)):
        raise GsaeError(f"{where}: the rows of {prefix}x do not fit the SAEs' width {width} "
                        f"(x is {list(x.shape)}, g {None if g is None else list(g.shape)})")


def _check_finite(batch: Batch, step: int) -> None:
    bad = [name for name, t in (("activation", batch.x), ("gradient", batch.g))
           if t is not None and not torch.isfinite(t).all()]
    if bad:
        raise GsaeError(
            f"non-finite {' and '.join(bad)} values in the data at step {step}; training stopped "
            "and the last checkpoint is kept (try --autocast none, or check the model)"
        )


def step_seconds(configs: list[SAEConfig], batches: list[Batch], cfg: TrainConfig,
                 warmup: int = 2) -> list[float]:
    """The median wall seconds of one training step (forward, loss, backward, optimiser step,
    bookkeeping: `Trainer`'s own) of a fresh SAE of each config, measured interleaved so that
    every config meets the same machine load: round r steps every SAE in turn on batches[r];
    the first `warmup` rounds (b_dec's initialisation among them) are not counted."""
    if len(batches) <= warmup:
        raise GsaeError(f"step timing needs more than {warmup} batches, got {len(batches)}")
    cfg = replace(cfg, log_every=1 << 62, snapshots=[])  # no logs, no files
    d_in = batches[0].x.shape[1]
    members = [TrainedSAE(SAE(c, d_in), batches[0].hook, Path(cfg.out), cfg) for c in configs]
    trainer = Trainer(members, cfg)
    times: list[list[float]] = [[] for _ in members]
    for r, batch in enumerate(batches):
        for m, seconds in zip(members, times):
            start = time.perf_counter()
            trainer._train_step(m, batch)
            if r >= warmup:
                seconds.append(time.perf_counter() - start)
    return [sorted(s)[len(s) // 2] for s in times]
