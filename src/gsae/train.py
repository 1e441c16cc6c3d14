"""Training one or many SAEs on the same stream of (activation, gradient) batches.

The trainer does not know where batches come from (a live language model or the on-disk store):
it takes an iterator of "chunks", each a dict from hook point to `Batch`, mixes them through a
shuffle buffer per hook point, and steps every SAE attached to that hook on every mixed batch.
Under torchrun the ranks either split every batch (data-parallel, the same computation as one
process) or the sweep (`--distribute_sweep`); see `gsae.distributed` and the README.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from gsae import distributed
from gsae.errors import GsaeError
from gsae.sae import SAE, SAEConfig, total_variance_of
from gsae.source import Batch

STATE_DIR = "checkpoint"


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
    checkpoint_every: int = field(default=50, metadata={"help": "steps between checkpoints",
                                                        "min": 1})
    resume: bool = field(default=False, metadata={"help": "continue the run found in --out",
                                                  "identity": False})
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


def data_parallel(cfg: TrainConfig) -> bool:
    """True when the ranks of a torchrun launch split every batch (rather than the sweep)."""
    return distributed.world_size() > 1 and not cfg.distribute_sweep


def variant_name(cfg: SAEConfig) -> str:
    """A folder name that tells the sweep members apart."""
    width = f"n{cfg.n_latents}" if cfg.n_latents > 0 else f"x{cfg.expansion_factor}"
    return f"k{cfg.k}-beta{cfg.beta:g}-{cfg.value_mode}-{width}-s{cfg.seed}"


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

    @property
    def name(self) -> str:
        return f"{self.hook}/{self.folder.name}"

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "b_dec_ready": self.b_dec_ready}

    def save_checkpoint(self, extra: dict[str, Any]) -> None:
        """Write the SAE (in the folder, for users) and a consistent checkpoint: the weights,
        the optimiser state and the counters go to a fresh folder that then replaces
        `checkpoint/` by renames, so a kill at any moment leaves one complete checkpoint."""
        self.sae.save(self.folder)
        final = self.folder / STATE_DIR
        tmp, old = final.with_name(STATE_DIR + ".tmp"), final.with_name(STATE_DIR + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        self.sae.save(tmp)
        tensors = {"since_fired": self.since_fired.cpu()}
        for i, p in enumerate(self.sae.parameters()):
            for key, value in self.opt.state.get(p, {}).items():
                tensors[f"{i}.{key}"] = value.detach().cpu().reshape(-1) if value.ndim == 0 \
                    else value.detach().cpu()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**self.state(), **extra}))
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> dict[str, Any]:
        state_dir = checkpoint_dir(self.folder)
        if state_dir is None:
            raise GsaeError(f"--resume: {self.folder} has no checkpoint to resume from")
        self.sae.load_state_dict(SAE.load(state_dir).state_dict())
        tensors = load_file(str(state_dir / "optimizer.safetensors"))
        self.since_fired = tensors.pop("since_fired").to(self.since_fired.device)
        params = list(self.sae.parameters())
        for name, value in tensors.items():
            i, key = name.split(".", 1)
            p = params[int(i)]
            value = value.to(p.device)
            self.opt.state.setdefault(p, {})[key] = value.reshape(()) if key == "step" else value
        state = json.loads((state_dir / "state.json").read_text())
        self.step, self.tokens = state["step"], state["tokens"]
        self.b_dec_ready = state["b_dec_ready"]
        return state


def checkpoint_dir(folder: Path) -> Path | None:
    """The complete checkpoint of an SAE folder (the previous one if a kill interrupted the
    swap), or None."""
    for name in (STATE_DIR, STATE_DIR + ".old"):
        if (folder / name / "state.json").is_file():
            return folder / name
    return None


def finished_training(folder: Path) -> bool:
    """Whether the checkpoint of an SAE folder says its training finished."""
    state_dir = checkpoint_dir(folder)
    return state_dir is not None and bool(
        json.loads((state_dir / "state.json").read_text()).get("finished"))


def _adam_kwargs(sae: SAE) -> dict[str, Any]:
    # The fused kernel is exact and ~10x faster than the default loop on CPU and GPU alike.
    return {"fused": True} if sae.W_dec.dtype in (torch.float32, torch.float64) else {}


class Trainer:
    """Trains a list of SAEs, each bound to a hook point, on shared batches."""

    def __init__(self, members: list[TrainedSAE], cfg: TrainConfig):
        if not members:
            raise GsaeError("nothing to train: the sweep is empty")
        self.members = members
        self.cfg = cfg
        self.data_parallel = data_parallel(cfg)
        # Data-parallel ranks hold identical SAEs: rank 0 writes them. Sweep shares are disjoint.
        self.writes_files = distributed.is_main() or cfg.distribute_sweep
        self.device = members[0].sae.W_dec.device
        self.total_steps = max(1, cfg.tokens // cfg.batch_tokens)
        self.chunks_done = 0
        self.dropped_outliers = 0
        self.rows_seen = 0

    @classmethod
    def create(cls, saes: list[tuple[SAE, str]], cfg: TrainConfig) -> Trainer:
        """The members of a run, each in its folder under `cfg.out` (see `sae_folder`); with
        `cfg.resume`, restored from their checkpoints, else with fresh logs. Under
        `distribute_sweep` this rank takes its share of the SAEs."""
        folders = [sae_folder(cfg.out, hook, sae.cfg) for sae, hook in saes]
        for i, folder in enumerate(folders):
            if folder in folders[:i]:
                raise GsaeError(f"the sweep lists the same SAE twice: {folder}")
        jobs = list(zip(saes, folders))
        if cfg.distribute_sweep:
            world = distributed.world_size()
            if len(jobs) < world:
                raise GsaeError(f"--distribute_sweep on {world} ranks needs at least {world} "
                                f"SAEs; the sweep has {len(jobs)}")
            jobs = jobs[distributed.rank()::world]
        members = [TrainedSAE(sae, hook, folder, cfg) for (sae, hook), folder in jobs]
        trainer = cls(members, cfg)
        if cfg.resume:
            trainer._resume()
        elif trainer.writes_files:
            for m in members:
                m.folder.mkdir(parents=True, exist_ok=True)
                (m.folder / "log.jsonl").write_text("")
        return trainer

    def _resume(self) -> None:
        states = [m.load_checkpoint() for m in self.members]
        self.chunks_done = min(s["chunks_done"] for s in states)

    @property
    def done(self) -> bool:
        return all(m.tokens >= self.cfg.tokens for m in self.members)

    def fit(self, chunks: Iterator[dict[str, Batch]]) -> list[dict[str, Any]]:
        """Train until every SAE has seen the token budget or the data ends. `chunks` must
        already skip the `chunks_done` chunks of a resumed run. Returns the final metrics."""
        buffers = {
            hook: ShuffleBuffer(self.cfg.shuffle_tokens, self.cfg.batch_tokens,
                                self.cfg.shuffle_seed + self.chunks_done)
            for hook in {m.hook for m in self.members}
        }
        start_tokens = min(m.tokens for m in self.members)
        bar = tqdm(total=self.cfg.tokens, initial=start_tokens, unit="tok", unit_scale=True,
                   desc="train", dynamic_ncols=True, disable=not distributed.is_main())
        self._t0 = time.perf_counter()
        self._t0_tokens = start_tokens
        try:
            for chunk in chunks:
                if self.done:
                    break
                for hook, batch in chunk.items():
                    if hook not in buffers:
                        continue
                    self.dropped_outliers += batch.dropped_outliers
                    self.rows_seen += len(batch)
                    for ready in buffers[hook].add(batch.to(self.device)):
                        self._step_hook(hook, ready, bar)
                self.chunks_done += 1
                if bar.n == start_tokens:  # nothing trained yet: show the buffer filling up
                    buf = next(iter(buffers.values()))
                    bar.set_postfix_str(f"filling the shuffle buffer: {buf.rows}/{buf.capacity}")
            for hook, buf in buffers.items():
                for ready in buf.flush():
                    self._step_hook(hook, ready, bar)
        finally:
            bar.close()
        for m in self.members:
            self._log(m)
        final = [{"name": m.name, "folder": str(m.folder), **m.last_record}
                 for m in self.members]
        self._save_checkpoints(finished=True)
        if self.cfg.distribute_sweep:
            parts = distributed.gather_objects(final)  # dealt round-robin: interleave back
            final = [r for group in itertools.zip_longest(*parts) for r in group if r is not None]
        return final

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
            self._save_checkpoints(finished=False)

    def _save_checkpoints(self, finished: bool) -> None:
        if self.writes_files:
            for m in self.members:
                m.save_checkpoint({"chunks_done": self.chunks_done, "finished": finished})

    def _train_step(self, m: TrainedSAE, batch: Batch) -> None:
        sae = m.sae
        if not m.b_dec_ready:
            sae.init_b_dec(batch.x, self.cfg.b_dec_init)
            m.b_dec_ready = True
        for group in m.opt.param_groups:
            group["lr"] = m.base_lr * lr_factor(m.step, self.total_steps, self.cfg.warmup_steps,
                                                 self.cfg.decay_fraction)
        dead = m.since_fired >= self.cfg.dead_tokens
        part, variance = self._rows_here(batch)
        out = sae(part.x, part.g, dead_mask=dead, k_aux=m.k_aux, variance=variance)
        loss = out.fvu + self.cfg.auxk_coef * out.auxk_loss
        if not torch.isfinite(loss):
            raise GsaeError(
                f"the loss of {m.name} became non-finite at step {m.step}; the last checkpoint "
                f"in {m.folder} is kept (try a lower --lr)"
            )
        loss.backward()
        with torch.no_grad():
            active = out.values > 0
            fired = torch.zeros(sae.n_latents, device=active.device)
            fired[out.indices[active]] = 1.0
            effect = out.fvu.new_zeros(()) if out.effect is None else out.effect.sum()
            totals = torch.stack([out.fvu, out.auxk_loss, active.sum().float(), effect])
        if self.data_parallel:  # before the step: the ranks' gradients add up to the batch's
            distributed.all_reduce_sum([p.grad for p in sae.parameters()] + [fired, totals])
        sae.remove_parallel_grads()
        m.opt.step()
        m.opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        m.since_fired += len(batch)
        m.since_fired[fired > 0] = 0
        fvu, auxk, selected, effect_sum = totals.tolist()
        stats = {"fvu": fvu, "auxk": auxk, "l0": selected / len(batch),
                 "effect": effect_sum / (len(batch) * sae.k)}
        for key, value in stats.items():
            m.acc[key] = m.acc.get(key, 0.0) + value
        m.acc_steps += 1
        m.step += 1
        m.tokens += len(batch)
        if m.step % self.cfg.log_every == 0:
            self._log(m)

    def _rows_here(self, batch: Batch) -> tuple[Batch, torch.Tensor | None]:
        """The rows this rank trains on, and the variance that normalises the losses (None: the
        rows' own). Data-parallel ranks take contiguous shares of the batch, normalised by the
        whole batch's variance, so their losses and gradients add up to the one-process ones."""
        if not self.data_parallel:
            return batch, None
        g = None if batch.g is None else distributed.shard(batch.g)
        return Batch(distributed.shard(batch.x), g), total_variance_of(batch.x)

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
            with open(m.folder / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        m.acc, m.acc_steps, m.last_record = {}, 0, record


def _check_finite(batch: Batch, step: int) -> None:
    bad = [name for name, t in (("activation", batch.x), ("gradient", batch.g))
           if t is not None and not torch.isfinite(t).all()]
    if bad:
        raise GsaeError(
            f"non-finite {' and '.join(bad)} values in the data at step {step}; training stopped "
            "and the last checkpoint is kept (try --autocast none, or check the model)"
        )
