"""The sparse autoencoder: TopK and gradient-aware TopK (g-SAE) in one class.

Selection score (method.md): `s = z + beta * z * |W_dec g|`, with `z` the encoder
pre-activations and `g = dL/dx` the language model's loss gradient at the hook. The k largest
scores are kept. `beta = 0` is a plain TopK SAE; so is any SAE encoded without a gradient.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from gsae import kernels
from gsae.batch import GRADIENT_DEFINITION
from gsae.config import validate
from gsae.errors import GsaeError
from gsae.io import read_json, save_tensors, write_json

VALUE_MODES = ("z", "score")
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
SELECTION_KEY = "gsae.selection"  # weights-file metadata: k, beta and value_mode as saved
FORMAT_NAME = "gsae"
FORMAT_VERSION = 1


@dataclass
class Provenance:
    """Where an SAE's training data came from: what evaluation and steering need to rebuild it.

    `model` is the model's identity (model, kind, path, revision, fingerprint) and `corpus` the
    corpus's (see `gsae.text.corpus_identity`); `imported_from` records the format and config
    of an SAE read from a SAELens or sparsify folder; `finetuned_from` the parent of an SAE made
    by `gsae finetune` (its folder and weights fingerprint, and the fine-tuning tokens).
    """

    hook: str | None = None
    model: dict[str, Any] | None = None
    corpus: dict[str, Any] | None = None
    context_size: int | None = None
    skip_first: int = 1
    outlier_factor: float = 5.0
    autocast: str = "none"
    imported_from: dict[str, Any] | None = None
    finetuned_from: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any] | None, where: str = "the provenance") -> Provenance:
        """Read a cfg.json "provenance" (or older "metadata") record; unknown keys are ignored
        and missing ones take their defaults; a field of the wrong type is refused with a
        one-line GsaeError naming `where`."""
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in (record or {}).items() if k in known and v is not None}
        for key, value in given.items():
            kind, name = PROVENANCE_KINDS[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise GsaeError(f"{where}: the provenance's {key!r} must be {name} (or null), "
                                f"got {repr(value)[:60]}")
        return cls(**given)


# What a provenance record may hold, field by field: the JSON type and its name.
PROVENANCE_KINDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "hook": (str, "a string"), "model": (dict, "an object"), "corpus": (dict, "an object"),
    "context_size": (int, "a whole number"), "skip_first": (int, "a whole number"),
    "outlier_factor": ((int, float), "a number"), "autocast": (str, "a string"),
    "imported_from": (dict, "an object"), "finetuned_from": (dict, "an object")}


@dataclass
class SAEConfig:
    """Architecture and training objective of one SAE; the input width `d_in` is the data's."""

    expansion_factor: int = field(
        default=16, metadata={"help": "latents per input dimension (ignored if n_latents > 0)",
                              "min": 1}
    )
    n_latents: int = field(
        default=0, metadata={"help": "number of latents; 0 means d_in * expansion_factor",
                             "min": 0}
    )
    k: int = field(default=32, metadata={"help": "latents kept per token (the L0)", "min": 1})
    beta: float = field(
        default=100.0,
        metadata={"help": "weight of the gradient term in the selection score; 0 is plain TopK",
                  "min": 0},
    )
    fisher_coef: float = field(
        default=0.0,
        metadata={"help": "weight lambda of the Fisher term in the loss, FVU + lambda FVU_g + "
                  "AuxK: FVU_g is the error along the loss gradient, sum (g.(x - x_hat))^2 / "
                  "sum (g.(x - mean x))^2 (docs/method.md); 0 trains on FVU alone",
                  "min": 0, "omit_at_default": True},
    )
    value_mode: str = field(
        default="z",
        metadata={
            "help": "values of the kept latents: 'z' (encoder activations, selection only) or "
            "'score' (the gradient-augmented scores, as the paper's figure writes it)",
            "choices": VALUE_MODES,
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the weight initialisation"})

    @property
    def needs_grad(self) -> bool:
        """Whether training this SAE needs the loss gradient g (its selection or its loss)."""
        return self.beta > 0 or self.fisher_coef > 0

    def latents_for(self, d_in: int) -> int:
        """The number of latents for an input of width `d_in`."""
        return self.n_latents if self.n_latents > 0 else d_in * self.expansion_factor

    def check(self) -> None:
        """The rule between settings that needs no data (`gsae.config.validate` calls it): k is
        at most a given number of latents."""
        if self.n_latents > 0:
            self._check_k(self.n_latents)

    def validate(self, d_in: int) -> None:
        """Raise GsaeError if the settings cannot make an SAE for inputs of width `d_in`: those
        of `gsae.config.validate`, and k at most the number of latents for that width."""
        validate(self)
        if d_in < 1:
            raise GsaeError(f"d_in must be at least 1, got {d_in}")
        self._check_k(self.latents_for(d_in))

    def _check_k(self, n_latents: int) -> None:
        if not 1 <= self.k <= n_latents:
            raise GsaeError(f"k must be between 1 and the number of latents ({n_latents}), got "
                            f"{self.k}")


class EncoderOutput(NamedTuple):
    values: Tensor  # [N, k], >= 0
    indices: Tensor  # [N, k], int64
    effect: Tensor | None  # [N, k] beta * |d_i . g| of the kept latents, None without a gradient


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    values: Tensor
    indices: Tensor
    fvu: Tensor
    auxk_loss: Tensor
    effect: Tensor | None
    fvu_g: Tensor | None = None  # the Fisher term FVU_g; None without a gradient


def total_variance_of(x: Tensor) -> Tensor:
    """Sum of squared deviations of the rows of `x` [N, d] from their mean: FVU's denominator."""
    return (x - x.mean(0)).pow(2).sum()


def first_order_change(delta: Tensor, g: Tensor) -> Tensor:
    """`g . delta` per row [N]: the first-order change of the model's loss when the activation
    moves by `delta` (x_hat - x for a reconstruction), with `g` = dL/dx."""
    return torch.linalg.vecdot(delta, g, dim=1)


def fisher_variance_of(x: Tensor, g: Tensor) -> Tensor:
    """Sum over rows of (g . (x - mean x))^2: FVU_g's denominator, the Fisher term of
    reconstructing every row by the batch mean (as FVU's is for the squared error)."""
    return first_order_change(x - x.mean(0), g).square().sum()


class SAE(nn.Module):
    """A TopK sparse autoencoder whose selection may use the loss gradient (a g-SAE).

    Weights: `W_enc` [n_latents, d_in] (rows are latents, as in sparsify), `b_enc` [n_latents],
    `W_dec` [n_latents, d_in] with unit-norm rows, `b_dec` [d_in]. `provenance` records where
    its training data came from. `save` writes a folder (`sae.safetensors`, `cfg.json`) that
    `load` reads; `gsae.load` reads SAELens and sparsify folders and Hub repos too.
    """

    def __init__(
        self,
        cfg: SAEConfig,
        d_in: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        provenance: Provenance | None = None,
        initialize: bool = True,
    ):
        """`initialize=False` leaves the weights uninitialised (for loading saved ones)."""
        super().__init__()
        cfg.validate(d_in)
        self.cfg = cfg
        self.d_in = d_in
        self.n_latents = cfg.latents_for(d_in)
        self.provenance = provenance or Provenance()
        if initialize:
            gen = torch.Generator().manual_seed(cfg.seed)
            w = torch.randn(self.n_latents, d_in, generator=gen, dtype=torch.float64)
            w = (w / w.norm(dim=1, keepdim=True)).to(dtype)
        else:
            w = torch.empty(self.n_latents, d_in, dtype=dtype)
        self.W_dec = nn.Parameter(w.to(device=device))
        self.W_enc = nn.Parameter(w.clone().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(self.n_latents, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def beta(self) -> float:
        return self.cfg.beta

    # ----------------------------------------------------------------------------- encoding

    def encode(self, x: Tensor | np.ndarray, grad: Tensor | np.ndarray | None = None
               ) -> EncoderOutput:
        """Select k latents per row of `x` [N, d_in] and return their values and indices.

        With `grad` (dL/dx, same shape as x) and beta > 0 the selection uses the g-SAE score;
        with `grad=None` it is gradient-free TopK on the same weights. Values are differentiable
        with respect to the encoder weights and `b_dec`.

        `x` and `grad` must be finite tensors of the weights' dtype and device (a GsaeError
        says what differs); numpy arrays are converted to the weights' dtype and device.
        """
        return self._encode(self._as_tensor(x), None if grad is None else self._as_tensor(grad))[0]

    def _as_tensor(self, a: Tensor | np.ndarray) -> Tensor:
        if isinstance(a, np.ndarray):
            return torch.from_numpy(a).to(device=self.W_dec.device, dtype=self.W_dec.dtype)
        return a

    def _encode(
        self, x: Tensor, grad: Tensor | None, dead_mask: Tensor | None = None, k_aux: int = 0
    ) -> tuple[EncoderOutput, kernels.SparsePattern, tuple[Tensor, kernels.SparsePattern] | None]:
        """`encode`, plus the selection as a sparse pattern and, when `dead_mask` marks dead
        latents and `k_aux` > 0, the AuxK values and pattern, all from one pass over the dense
        scores (which are never stored)."""
        self._check_input(x, "x")
        if grad is not None:
            self._check_input(grad, "grad", rows=x.shape[0])
        use_grad = grad is not None and self.beta > 0
        dead_latents = None
        if dead_mask is not None and k_aux > 0:
            dead_latents = dead_mask.to(x.device).nonzero().squeeze(1)
            k_aux = min(k_aux, len(dead_latents))
            dead_latents = dead_latents if k_aux > 0 else None
        x_centered = x - self.b_dec
        sel = kernels.select(
            x_centered, self.W_enc, self.b_enc, self.k, grad=grad if use_grad else None,
            W_dec=self.W_dec, beta=self.beta, dead_latents=dead_latents, k_aux=k_aux,
        )
        pattern = kernels.SparsePattern(sel.indices, self.n_latents)
        z_sel = kernels.selected_preacts(sel.preacts, pattern, x_centered, self.W_enc, self.b_enc)
        effect = None
        if sel.effect is not None:
            effect = sel.effect.mul_(self.beta)  # beta |d_i . g| of the kept latents
            if self.cfg.value_mode == "score":
                z_sel = z_sel * (1.0 + effect)
        aux = None
        if sel.aux_indices is not None and sel.aux_preacts is not None:
            aux_pattern = kernels.SparsePattern(sel.aux_indices, self.n_latents)
            aux_z = kernels.selected_preacts(
                sel.aux_preacts, aux_pattern, x_centered, self.W_enc, self.b_enc
            )
            aux = (torch.relu(aux_z), aux_pattern)
        return EncoderOutput(torch.relu(z_sel), sel.indices, effect), pattern, aux

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """Reconstruction `sum_j values[:, j] * W_dec[indices[:, j]] + b_dec`, [N, d_in]."""
        return kernels.sparse_decode(values, indices, self.W_dec) + self.b_dec

    def forward(self, x: Tensor, grad: Tensor | None = None, dead_mask: Tensor | None = None,
                k_aux: int = 0, variance: Tensor | None = None,
                fisher_variance: Tensor | None = None) -> ForwardOutput:
        """Encode, decode and compute the training losses.

        `fvu` is the squared error over the batch's total variance around its mean (or over
        `variance`, given when `x` is one part of a larger batch: the parts' losses then add up
        to the whole batch's). When `dead_mask` marks dead latents, `auxk_loss` is the AuxK term
        of Gao et al.: the top `k_aux` dead latents (by pre-activation) reconstruct the detached
        residual, normalised by the same total variance. It is 0 when no latent is dead.
        With `grad`, `fvu_g` is the Fisher term (method.md): sum (g . (x - x_hat))^2 over
        `fisher_variance_of(x, grad)` (or over `fisher_variance`, for a part of a larger batch).
        """
        (values, indices, effect), pattern, aux = self._encode(x, grad, dead_mask, k_aux)
        x_hat = kernels.sparse_decode(values, pattern, self.W_dec) + self.b_dec
        total_variance = total_variance_of(x) if variance is None else variance
        residual = x - x_hat
        fvu = residual.pow(2).sum() / total_variance
        auxk_loss = x.new_zeros(())
        if aux is not None:
            auxk_loss = self._auxk_loss(*aux, residual.detach()) / total_variance
        fvu_g = None
        if grad is not None:
            fisher = fisher_variance_of(x, grad) if fisher_variance is None else fisher_variance
            fvu_g = first_order_change(residual, grad).square().sum() / fisher
        return ForwardOutput(x_hat, values, indices, fvu, auxk_loss, effect, fvu_g)

    def _auxk_loss(
        self, values: Tensor, pattern: kernels.SparsePattern, residual: Tensor
    ) -> Tensor:
        """Squared error of the dead latents' reconstruction of the detached residual."""
        residual_hat = kernels.sparse_decode(values, pattern, self.W_dec)
        return (residual_hat - residual).pow(2).sum()

    def _check_input(self, t: Tensor, name: str, rows: int | None = None) -> None:
        """Refuse what would give wrong latents silently: another shape, dtype or device, or
        a NaN or infinity (which would select the same latents for every row)."""
        if not isinstance(t, Tensor):
            raise GsaeError(f"{name} must be a torch tensor or numpy array, got "
                            f"{type(t).__name__}")
        n = "N" if rows is None else str(rows)
        if t.ndim != 2 or t.shape[1] != self.d_in or (rows is not None and t.shape[0] != rows):
            raise GsaeError(f"{name} must have shape [{n}, {self.d_in}], got {list(t.shape)}")
        if t.dtype != self.W_dec.dtype or t.device != self.W_dec.device:
            raise GsaeError(f"{name} is {str(t.dtype).removeprefix('torch.')} on {t.device}, the "
                            f"SAE {str(self.W_dec.dtype).removeprefix('torch.')} on "
                            f"{self.W_dec.device}: convert it with .to(sae.W_dec)")
        # One reduction: a sum is finite when every entry is (barring overflow, checked then).
        if not torch.isfinite(t.detach().sum()) and not torch.isfinite(t).all():
            raise GsaeError(f"{name} holds NaN or infinite values: the SAE needs finite inputs")

    # -------------------------------------------------------------------- training upkeep

    @torch.no_grad()
    def init_b_dec(self, sample: Tensor, method: str = "geometric_median", iters: int = 50) -> None:
        """Set `b_dec` from a sample of activations: their geometric median (Weiszfeld
        iterations, the default) or their mean."""
        sample = sample.to(self.b_dec.dtype)
        center = sample.mean(0)
        if method == "geometric_median":
            for _ in range(iters):
                weights = 1.0 / (sample - center).norm(dim=1).clamp_min(1e-8)
                center = (weights[:, None] * sample).sum(0) / weights.sum()
        elif method != "mean":
            raise GsaeError(f"b_dec init must be 'geometric_median' or 'mean', got {method!r}")
        self.b_dec.copy_(center)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Remove from W_dec.grad the component parallel to each (unit-norm) decoder row."""
        if self.W_dec.grad is None:
            return
        grad, weight = self.W_dec.grad, self.W_dec.detach()
        # fused reductions and an in-place update: no [n_latents, d_in] temporaries
        parallel = torch.linalg.vecdot(grad, weight, dim=1).unsqueeze(1)
        parallel /= torch.linalg.vector_norm(weight, dim=1, keepdim=True).square().clamp_min(1e-12)
        grad.addcmul_(parallel, weight, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ------------------------------------------------------------------------ save / load

    def config_dict(self) -> dict[str, Any]:
        """The contents of cfg.json: format, sizes, the SAE config, the gradient and where the
        data came from."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "d_in": self.d_in,
            **asdict(self.cfg),
            "n_latents": self.n_latents,
            "gradient_definition": GRADIENT_DEFINITION,
            "provenance": self.provenance.to_json(),
        }

    def save(self, path: str | Path) -> Path:
        """Write `sae.safetensors` and `cfg.json` into the folder `path` (created if needed)."""
        path = Path(path)
        save_tensors(path / WEIGHTS_FILE, dict(self.named_parameters()),
                     {SELECTION_KEY: json.dumps(self.selection_record(), sort_keys=True)})
        write_json(path / CONFIG_FILE, self.config_dict())
        return path

    def selection_record(self) -> dict[str, str]:
        """The settings that decide which latents the weights select (k, beta, value_mode),
        recorded in the weights file's metadata so that an edited cfg.json is noticed. They are
        stored as one JSON string under SELECTION_KEY: safetensors writes a metadata map's keys
        in an order that changes between processes, and weights files must be byte-identical
        for the same training."""
        return {"gsae.k": str(self.cfg.k), "gsae.beta": repr(float(self.cfg.beta)),
                "gsae.value_mode": self.cfg.value_mode}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Load an SAE folder written by `save`. Other formats (SAELens, sparsify, the Hugging
        Face Hub) load with `gsae.load`."""
        folder = Path(path)
        cfg_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not (cfg_file.is_file() and weights_file.is_file()):
            raise GsaeError(f"{folder} is not a gsae SAE folder: expected {CONFIG_FILE} and "
                            f"{WEIGHTS_FILE} (other formats load with gsae.load)")
        raw = read_json(cfg_file, "the SAE's config")
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise GsaeError(f"{cfg_file} is not a gsae SAE config (no \"format\": "
                            f"\"{FORMAT_NAME}\"): load other formats with gsae.load")
        if not isinstance(raw.get("format_version"), int) or raw["format_version"] > FORMAT_VERSION:
            raise GsaeError(f"{cfg_file} has format_version {raw.get('format_version')!r}; this "
                            f"gsae reads up to {FORMAT_VERSION}: upgrade gsae")
        record = raw.get("provenance", raw.get("metadata"))
        if record is not None and not isinstance(record, dict):
            raise GsaeError(f"{cfg_file}: \"provenance\" must be an object, got {record!r}")
        cfg, d_in = config_from_record(raw, str(cfg_file))
        tensors = read_weights(weights_file)
        check_weight_shapes(tensors, cfg.latents_for(d_in), d_in, str(weights_file))
        provenance = Provenance.from_json(record, str(cfg_file))
        sae = cls(cfg, d_in, device=device, dtype=tensors["W_dec"].dtype,
                  provenance=provenance, initialize=False)
        sae.load_weights(tensors, str(weights_file))
        sae.check_selection_record(weights_file, cfg_file)
        return sae

    def check_selection_record(self, weights_file: Path, cfg_file: Path) -> None:
        """Refuse a cfg.json whose k, beta or value_mode differ from what its weights were saved
        with (files of an older gsae record none and are not checked)."""
        with safe_open(str(weights_file), framework="pt") as f:
            text = (f.metadata() or {}).get(SELECTION_KEY, "{}")
        try:
            saved = json.loads(text)
        except json.JSONDecodeError:
            saved = None
        if not isinstance(saved, dict):
            raise GsaeError(f"{weights_file}: its {SELECTION_KEY} metadata is damaged (not a JSON "
                            "object); save the SAE again from its source")
        ours = self.selection_record()
        for key in [k for k in ours if k in saved and saved[k] != ours[k]]:
            name = key.removeprefix("gsae.")
            raise GsaeError(f"{cfg_file} gives {name} {ours[key]}, but its weights were trained "
                            f"and saved with {name} {saved[key]} ({weights_file.name} records it): "
                            f"cfg.json was edited; set {name} back to {saved[key]}")

    def load_weights(self, tensors: dict[str, Tensor], where: str) -> None:
        """Copy `tensors` (W_enc, b_enc, W_dec, b_dec) into the SAE; refuse missing, extra,
        wrongly shaped and non-finite ones with a one-line GsaeError naming `where`."""
        check_weight_shapes(tensors, self.n_latents, self.d_in, where)
        bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
        if bad:
            raise GsaeError(f"{where}: the weights {', '.join(sorted(bad))} hold NaN or "
                            "infinite values; the file is damaged or training diverged")
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(tensors[name])


def check_weight_shapes(tensors: dict[str, Tensor], n_latents: int, d_in: int, where: str
                        ) -> None:
    """Refuse weights (W_enc, b_enc, W_dec, b_dec) missing, extra or of other shapes than an
    SAE of `n_latents` x `d_in` has, with a one-line GsaeError naming `where`; checked before
    an SAE of that size is made, so a damaged config allocates nothing."""
    expected = {"W_enc": (n_latents, d_in), "b_enc": (n_latents,), "W_dec": (n_latents, d_in),
                "b_dec": (d_in,)}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        wrong = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise GsaeError(f"{where}: the weights do not fit the config (d_in {d_in}, "
                        f"{n_latents} latents): " + ", ".join(
                            f"{k} is {list(found[k]) if k in found else 'missing'}, "
                            f"expected {list(expected[k]) if k in expected else 'none'}"
                            for k in wrong))


def config_from_record(raw: dict[str, Any], where: str) -> tuple[SAEConfig, int]:
    """The SAEConfig and d_in recorded in a cfg.json dict. A count of latents equal to
    d_in * expansion_factor is read back as 0 (sized by the expansion factor), as configured."""
    kinds = {"k": int, "beta": (int, float), "value_mode": str, "d_in": int}
    for key, kind in kinds.items():
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise GsaeError(f"{where}: the SAE config's {key!r} is missing or not a "
                            f"{'number' if key == 'beta' else kind.__name__} (got {value!r})")
    known = {f.name for f in fields(SAEConfig)}
    try:
        cfg = SAEConfig(**{k: v for k, v in raw.items() if k in known})
        d_in = int(raw["d_in"])
    except (KeyError, TypeError, ValueError) as err:
        raise GsaeError(f"{where}: the SAE config is incomplete or malformed ({err})") from None
    if cfg.n_latents == d_in * cfg.expansion_factor:
        cfg.n_latents = 0
    return cfg, d_in


def read_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of a safetensors file of any dtype (checkpoint parts hold integer random
    states); a damaged file raises a one-line GsaeError."""
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GsaeError(f"{path} is damaged or not a safetensors file ({reason})") from None


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of an SAE weights file, which must all be floating point; a damaged file
    raises a one-line GsaeError."""
    tensors = read_tensors(path, device)
    wrong = [f"{name} is {str(t.dtype).removeprefix('torch.')}" for name, t in
             sorted(tensors.items()) if not t.is_floating_point()]
    if wrong:
        raise GsaeError(f"{path}: SAE weights must be floating point, but {', '.join(wrong)}; "
                        "the file was not written as SAE weights")
    return tensors
