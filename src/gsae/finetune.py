"""Fine-tuning trained SAEs on the spliced model's next-token distribution (`gsae finetune`).

The loss of one SAE on one batch of contexts is

    loss = w * c * KL(clean || spliced) + (1 - w) * FVU + auxk_coef * AuxK

where KL is the mean over the scored predictions (positions skip_first .. T-2, as in
evaluation) of the KL divergence between the clean model's next-token distribution and the
model's with the SAE's reconstruction spliced in at the hook; FVU and AuxK are the training
losses of `gsae train`; `w` is `--kl_weight`; and `c` balances the two terms: it is FVU / KL of
the SAE's first fine-tuning batch, fixed from then on (and kept in the checkpoint), so both
terms start at the same size whatever the scale of the model's KL (docs/method.md).

One clean forward of the language model per batch of contexts serves every SAE at every hook:
it gives x at each hook, the clean logits and, when some SAE selects with the gradient, g. Then,
per SAE, the layers above the hook run again with x_hat written at the SAE's positions (the
patched-forward harness of `gsae.hooks`, with autograd on), and the backward pass reaches the
SAE's parameters only: the model is frozen and the clean pass's recordings are detached, so the
layers below the hook are not in the graph. Positions that are not SAE data (the first
`skip_first`, the last, outliers) keep their clean activation, as in evaluation.

Everything else (Adam, the learning-rate schedule, decoder-norm upkeep, dead latents, logs,
snapshots, checkpoints and exact resume, torchrun) is the trainer's (`gsae.train`); a step
takes one batch of `lm_batch_size` contexts, so the run makes
ceil(tokens / (lm_batch_size * (context_size - 1 - skip_first))) steps.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gsae import distributed
from gsae.errors import GsaeError
from gsae.hooks import Intervention, Recording, log_probs, resolve_hook, splice
from gsae.io import differing_keys, read_json, write_json
from gsae.sae import SAE, ForwardOutput
from gsae.source import ActivationSource, SourceConfig, training_positions
from gsae.train import STATE_DIR, TrainConfig, TrainedSAE, Trainer

BALANCE_FILE = "balance.json"


def _as_in_training(name: str, **changes: Any) -> Any:
    """A field of `TrainConfig` (default, help, bounds) for the fine-tuning section."""
    f = TrainConfig.__dataclass_fields__[name]
    metadata = {**f.metadata, **changes.pop("metadata", {})}
    if f.default_factory is not MISSING:
        return field(default_factory=f.default_factory, metadata=metadata)
    return field(default=changes.pop("default", f.default), metadata=metadata)


@dataclass
class FinetuneConfig:
    """The fine-tuning: its loss, optimisation, budget, bookkeeping and output."""

    out: str = _as_in_training("out", default="runs/finetune")
    tokens: int = _as_in_training("tokens", default=12_000, metadata={
        "help": "fine-tuning budget per SAE in SAE positions: the run makes ceil(tokens / "
        "(lm_batch_size * (context_size - 1 - skip_first))) steps, one batch of contexts each"})
    kl_weight: float = field(default=0.5, metadata={
        "help": "share w of the KL term in loss = w * c * KL + (1 - w) * FVU + AuxK, where c "
        "makes the KL term equal to FVU on the first batch", "min": 0, "max": 1})
    lr: float = _as_in_training("lr")
    warmup_steps: int = _as_in_training("warmup_steps")
    decay_fraction: float = _as_in_training("decay_fraction")
    auxk_coef: float = _as_in_training("auxk_coef")
    k_aux: int = _as_in_training("k_aux")
    dead_tokens: int = _as_in_training("dead_tokens")
    log_every: int = _as_in_training("log_every")
    checkpoint_every: int = _as_in_training("checkpoint_every")
    keep_training_state: bool = _as_in_training("keep_training_state")
    resume: bool = _as_in_training("resume")
    overwrite: bool = _as_in_training("overwrite")
    device: str = _as_in_training("device")
    wandb_project: str = _as_in_training("wandb_project")
    snapshots: list[int] = _as_in_training("snapshots")


def trainer_config(cfg: FinetuneConfig, rows_per_step: int) -> TrainConfig:
    """The trainer's settings for a fine-tuning run whose steps take `rows_per_step` SAE
    positions each (one batch of contexts)."""
    shared = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if hasattr(cfg, f.name)}
    return replace(TrainConfig(), **shared, batch_tokens=rows_per_step)


# ---------------------------------------------------------------------------------- the data


@dataclass
class SplicedBatch:
    """One batch of contexts at one hook, as a fine-tuning step needs it: the SAE rows and
    where they sit, the clean pass's recording (to run the layers above the hook again) and
    the clean next-token log-probabilities. Counts and the variance are the whole batch's (all
    ranks' under torchrun), so that the ranks' losses add up to it."""

    x: Tensor  # [N, d] activations at the positions of `mask`
    g: Tensor | None  # [N, d] dL/dx there, None when no SAE selects with the gradient
    mask: Tensor  # [B, T] the positions spliced
    recording: Recording
    clean_logp: Tensor  # [B, P, V] clean log-probabilities of the scored predictions
    skip_first: int
    scored: int  # scored predictions of the whole batch
    rows: int  # SAE rows of the whole batch
    variance: Tensor | None  # total variance of the whole batch's rows; None: x's own
    dropped_outliers: int = 0
    bf16: bool = False  # the clean pass ran under bfloat16 autocast

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device) -> SplicedBatch:
        g = None if self.g is None else self.g.to(device)
        return replace(self, x=self.x.to(device), g=g)


class SplicingSource:
    """The clean pass of fine-tuning: one forward (and, with `with_grad`, backward) of the
    frozen model per batch of contexts, recorded at every hook for the spliced passes. Under
    torchrun with `split_across_ranks`, each rank takes its share of the contexts."""

    def __init__(self, model: nn.Module, cfg: SourceConfig, with_grad: bool,
                 split_across_ranks: bool = False):
        if any(p.requires_grad for p in model.parameters()):
            raise GsaeError("the model's weights require grad: freeze them with "
                            "model.requires_grad_(False) before fine-tuning")
        self.cfg, self.split = cfg, split_across_ranks
        self.source = ActivationSource(model, cfg, with_grad=with_grad)
        self.hook_names = self.source.hook_names
        self.interventions = {name: Intervention(model, resolve_hook(model, name)[1])
                              for name in self.hook_names}
        self.device = next(model.parameters()).device

    def batches(self, tokens: Tensor) -> dict[str, SplicedBatch]:
        """The spliced batches of one batch of contexts [B, T], by hook."""
        contexts = tokens.shape[0]
        if self.split:
            tokens = distributed.shard(tokens)
        tokens = tokens.to(self.device)
        captured: dict[str, Tensor] = {}
        with ExitStack() as stack:
            recordings = {name: stack.enter_context(iv.record(tokens))
                          for name, iv in self.interventions.items()}
            states = self.source.hidden_states(tokens, logits_out=captured)
        skip = self.cfg.skip_first
        clean_logp = log_probs(captured.pop("logits")[:, skip:-1])
        scored = contexts * clean_logp.shape[1]
        out = {}
        for name, (x_full, g_full) in states.items():
            mask, outliers = training_positions(x_full, skip, self.cfg.outlier_factor)
            x = x_full[mask]
            rows, dropped, variance = self._whole_batch(x, outliers)
            out[name] = SplicedBatch(x, None if g_full is None else g_full[mask], mask,
                                     recordings[name], clean_logp, skip, scored, rows, variance,
                                     dropped, self.cfg.autocast == "bf16")
        return out

    def _whole_batch(self, x: Tensor, outliers: int) -> tuple[int, int, Tensor | None]:
        """Rows, outliers and total variance of the whole batch (all ranks' shares)."""
        if not self.split:
            return x.shape[0], outliers, None
        x64 = x.double()
        sums = torch.cat([x64.new_tensor([x.shape[0], outliers]), x64.sum(0), x64.pow(2).sum(0)])
        distributed.all_reduce_sum([sums])
        rows, dropped = int(sums[0]), int(sums[1])
        sum_x, sum_x2 = sums[2:].chunk(2)
        return rows, dropped, (sum_x2 - sum_x.pow(2) / rows).sum().to(x.dtype)

    def stream(self, contexts: Iterator[Tensor]) -> Iterator[dict[str, SplicedBatch]]:
        """`batches` for each [B, T] tensor of an iterator of context batches."""
        for tokens in contexts:
            yield self.batches(tokens)


# ---------------------------------------------------------------------------------- the loss


class SplicedLosses(NamedTuple):
    out: ForwardOutput  # the SAE's forward: x_hat, selection, FVU and AuxK
    kl: Tensor  # mean KL(clean || spliced) over the scored predictions (this rank's share)
    mse: Tensor  # mean squared error per activation entry (this rank's share)


def kl_to_clean(clean_logp: Tensor, logits: Tensor) -> Tensor:
    """Sum over predictions of KL(clean || other), from the clean log-probabilities and the
    other logits at the same predictions [..., V]; float32."""
    logp = log_probs(logits)
    return (clean_logp.exp() * (clean_logp - logp)).sum()


def spliced_losses(sae: SAE, batch: SplicedBatch, dead_mask: Tensor | None = None,
                   k_aux: int = 0) -> SplicedLosses:
    """The SAE's losses on one spliced batch, differentiable in its parameters: its forward
    on the rows, then the layers above the hook with x_hat written at the rows' positions."""
    out = sae(batch.x, batch.g, dead_mask=dead_mask, k_aux=k_aux, variance=batch.variance)
    device_type = batch.x.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=batch.bf16):
        logits = batch.recording.logits_with_grad(splice(batch.mask, out.x_hat))
    kl = kl_to_clean(batch.clean_logp, logits[:, batch.skip_first : -1]) / batch.scored
    mse = (batch.x - out.x_hat).pow(2).sum() / (batch.rows * sae.d_in)
    return SplicedLosses(out, kl.to(out.fvu.dtype), mse)


# ---------------------------------------------------------------------------------- training


class FinetunedSAE(TrainedSAE):
    """A trained SAE being fine-tuned: its `b_dec` is already trained, and the KL term's
    balancing factor is part of its checkpoint."""

    def __init__(self, sae: SAE, hook: str, folder: Path, cfg: TrainConfig):
        super().__init__(sae, hook, folder, cfg)
        self.b_dec_ready = True
        self.kl_scale: float | None = None  # set on the first fine-tuning batch

    def _write_state(self, folder: Path, run_state: dict[str, Any]) -> None:
        write_json(folder / BALANCE_FILE, {"kl_scale": self.kl_scale})
        super()._write_state(folder, run_state)

    def load_checkpoint(self, folder: Path) -> None:
        super().load_checkpoint(folder)
        self.kl_scale = read_json(folder / BALANCE_FILE, "a checkpoint's balance")["kl_scale"]


class FinetuneTrainer(Trainer):
    """The trainer with the fine-tuning step: every SAE steps once on every batch of contexts
    (no shuffle buffer: a spliced pass needs whole contexts)."""

    member_class = FinetunedSAE
    progress_label = "finetune"
    kl_weight = 0.5  # w of the loss (`FinetuneConfig.kl_weight`)

    def __init__(self, members: list[FinetunedSAE], cfg: TrainConfig,
                 checkpoint_name: str = STATE_DIR):
        super().__init__(members, cfg, checkpoint_name)  # type: ignore[arg-type]
        self.total_steps = max(1, math.ceil(cfg.tokens / cfg.batch_tokens))

    @property
    def done(self) -> bool:
        # Outliers make some batches shorter: the run is as many steps as the budget's batches.
        return all(m.step >= self.total_steps for m in self.members)

    def _train_on(self, chunk: dict[str, SplicedBatch], bar) -> None:  # type: ignore[override]
        for hook, batch in chunk.items():
            if hook not in self.buffers:
                continue
            self.dropped_outliers += batch.dropped_outliers
            self.rows_seen += batch.rows
            self._step_hook(hook, batch.to(self.device), bar)  # type: ignore[arg-type]

    def _train_step(self, m: FinetunedSAE, batch: SplicedBatch) -> None:  # type: ignore[override]
        self._set_lr(m)
        dead = m.since_fired >= self.cfg.dead_tokens
        terms = spliced_losses(m.sae, batch, dead_mask=dead, k_aux=m.k_aux)
        if m.kl_scale is None:
            m.kl_scale = self._balance(terms)
        loss = (self.kl_weight * m.kl_scale * terms.kl + (1 - self.kl_weight) * terms.out.fvu
                + self.cfg.auxk_coef * terms.out.auxk_loss)
        self._refuse_non_finite(m, loss)
        loss.backward()
        self._finish_step(m, terms.out, batch.rows,
                          {"kl": terms.kl.detach(), "mse": terms.mse.detach()})

    def _balance(self, terms: SplicedLosses) -> float:
        """c = FVU / KL on this batch (the whole batch's, over all ranks)."""
        pair = torch.stack([terms.out.fvu, terms.kl]).detach()
        if self.data_parallel:
            distributed.all_reduce_sum([pair])
        fvu, kl = pair.tolist()
        return fvu / kl if kl > 0 else 1.0


# ------------------------------------------------------------------------------- the parents


def weights_fingerprint(sae: SAE) -> str:
    """sha256 of the SAE's parameters (names and float32 values), whatever its file format."""
    digest = hashlib.sha256()
    for name, p in sorted(sae.named_parameters()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_parent_model(sae: SAE, folder: str, model_id: dict[str, Any]) -> None:
    """Refuse a parent SAE trained on another model than `model_id` (the same fingerprint
    when both are known, else the same name)."""
    trained = sae.provenance.model or {}
    key = "fingerprint" if trained.get("fingerprint") and model_id.get("fingerprint") else "model"
    if trained and trained.get(key) != model_id.get(key):
        raise GsaeError(f"{folder} was trained on model {trained.get('model')!r}, not on "
                        f"--model {model_id.get('model')!r}: fine-tune it on its own model")


def check_parent_data(sae: SAE, folder: str, model: nn.Module, hooks: list[str],
                      corpus: dict[str, Any]) -> str:
    """Refuse a parent SAE trained at a hook not among `hooks` (canonical names) or on
    another corpus (its cutting into contexts may differ); else return its hook's canonical
    name."""
    if not sae.provenance.hook:
        raise GsaeError(f"{folder} does not record its hook point, so it cannot be fine-tuned")
    hook = resolve_hook(model, sae.provenance.hook)[0]
    if hook not in hooks:
        raise GsaeError(f"{folder} was trained at hook {hook!r}, which is not among --hooks "
                        f"({', '.join(hooks)})")
    trained_corpus = sae.provenance.corpus or corpus
    differing = [k for k in differing_keys(trained_corpus, corpus) if k != "context_size"]
    if differing:
        raise GsaeError(f"{folder} was trained on corpus {trained_corpus.get('dataset')!r}, not "
                        f"on --dataset {corpus.get('dataset')!r} (they differ in "
                        f"{', '.join(differing)}): fine-tune it on its own corpus")
    return hook
