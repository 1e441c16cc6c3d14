"""The sparse autoencoder: TopK and gradient-aware TopK (g-SAE) in one class.

Selection score (method.md): `s = z + beta * z * |W_dec g|`, with `z` the encoder
pre-activations and `g = dL/dx` the language model's loss gradient at the hook. The k largest
scores are kept. `beta = 0` is a plain TopK SAE; so is any SAE encoded without a gradient.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gsae import kernels
from gsae.errors import GsaeError

VALUE_MODES = ("z", "score")
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
FORMAT_NAME = "gsae"
FORMAT_VERSION = 1
GRADIENT_DEFINITION = (
    "g = dL/dx at the hook, L = sum over predicted positions of each sequence's next-token "
    "cross-entropy (not averaged), clean model"
)


@dataclass
class SAEConfig:
    """Architecture of one SAE. The input width `d_in` comes from the data, not from here."""

    expansion_factor: int = field(
        default=16, metadata={"help": "latents per input dimension (ignored if n_latents > 0)"}
    )
    n_latents: int = field(
        default=0, metadata={"help": "number of latents; 0 means d_in * expansion_factor"}
    )
    k: int = field(default=32, metadata={"help": "latents kept per token (the L0)"})
    beta: float = field(
        default=100.0,
        metadata={"help": "weight of the gradient term in the selection score; 0 is plain TopK"},
    )
    value_mode: str = field(
        default="z",
        metadata={
            "help": "values of the kept latents: 'z' (encoder activations, selection only) or "
            "'score' (the gradient-augmented scores, as the paper's figure writes it)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the weight initialisation"})

    def latents_for(self, d_in: int) -> int:
        """The number of latents for an input of width `d_in`."""
        return self.n_latents if self.n_latents > 0 else d_in * self.expansion_factor

    def validate(self, d_in: int) -> None:
        """Raise GsaeError if the settings cannot make an SAE for inputs of width `d_in`."""
        if d_in < 1:
            raise GsaeError(f"d_in must be at least 1, got {d_in}")
        if self.n_latents < 0 or self.expansion_factor < 1:
            raise GsaeError(
                f"n_latents must be >= 0 and expansion_factor >= 1, got {self.n_latents} and "
                f"{self.expansion_factor}"
            )
        n = self.latents_for(d_in)
        if not 1 <= self.k <= n:
            raise GsaeError(f"k must be between 1 and the number of latents ({n}), got {self.k}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise GsaeError(f"beta must be a finite number >= 0 (0 is plain TopK), got {self.beta}")
        if self.value_mode not in VALUE_MODES:
            raise GsaeError(f"value_mode must be one of {VALUE_MODES}, got {self.value_mode!r}")


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


def total_variance_of(x: Tensor) -> Tensor:
    """Sum of squared deviations of the rows of `x` [N, d] from their mean: FVU's denominator."""
    return (x - x.mean(0)).pow(2).sum()


class SAE(nn.Module):
    """A TopK sparse autoencoder whose selection may use the loss gradient (a g-SAE).

    Weights: `W_enc` [n_latents, d_in] (rows are latents, as in sparsify), `b_enc` [n_latents],
    `W_dec` [n_latents, d_in] with unit-norm rows, `b_dec` [d_in].
    """

    def __init__(
        self,
        cfg: SAEConfig,
        d_in: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, Any] | None = None,
        initialize: bool = True,
    ):
        """`initialize=False` leaves the weights uninitialised (for loading saved ones)."""
        super().__init__()
        cfg.validate(d_in)
        self.cfg = cfg
        self.d_in = d_in
        self.n_latents = cfg.latents_for(d_in)
        self.metadata: dict[str, Any] = dict(metadata or {})
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

    def encode(self, x: Tensor, grad: Tensor | None = None) -> EncoderOutput:
        """Select k latents per row of `x` [N, d_in] and return their values and indices.

        With `grad` (dL/dx, same shape as x) and beta > 0 the selection uses the g-SAE score;
        with `grad=None` it is gradient-free TopK on the same weights. Values are differentiable
        with respect to the encoder weights and `b_dec`.
        """
        return self._encode(x, grad)[0]

    def _encode(
        self, x: Tensor, grad: Tensor | None, dead_mask: Tensor | None = None, k_aux: int = 0
    ) -> tuple[EncoderOutput, kernels.SparsePattern, tuple[Tensor, kernels.SparsePattern] | None]:
        """`encode`, plus the selection as a sparse pattern and, when `dead_mask` marks dead
        latents and `k_aux` > 0, the AuxK values and pattern, all from one pass over the dense
        scores (which are never stored)."""
        self._check_input(x, "x")
        use_grad = grad is not None and self.beta > 0
        if use_grad:
            self._check_input(grad, "grad")
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
                k_aux: int = 0, variance: Tensor | None = None) -> ForwardOutput:
        """Encode, decode and compute the training losses.

        `fvu` is the squared error over the batch's total variance around its mean (or over
        `variance`, given when `x` is one part of a larger batch: the parts' losses then add up
        to the whole batch's). When `dead_mask` marks dead latents, `auxk_loss` is the AuxK term
        of Gao et al.: the top `k_aux` dead latents (by pre-activation) reconstruct the detached
        residual, normalised by the same total variance. It is 0 when no latent is dead.
        """
        (values, indices, effect), pattern, aux = self._encode(x, grad, dead_mask, k_aux)
        x_hat = kernels.sparse_decode(values, pattern, self.W_dec) + self.b_dec
        total_variance = total_variance_of(x) if variance is None else variance
        residual = x - x_hat
        fvu = residual.pow(2).sum() / total_variance
        auxk_loss = x.new_zeros(())
        if aux is not None:
            auxk_loss = self._auxk_loss(*aux, residual.detach()) / total_variance
        return ForwardOutput(x_hat, values, indices, fvu, auxk_loss, effect)

    def _auxk_loss(
        self, values: Tensor, pattern: kernels.SparsePattern, residual: Tensor
    ) -> Tensor:
        """Squared error of the dead latents' reconstruction of the detached residual."""
        residual_hat = kernels.sparse_decode(values, pattern, self.W_dec)
        return (residual_hat - residual).pow(2).sum()

    def _check_input(self, t: Tensor, name: str) -> None:
        if t.ndim != 2 or t.shape[1] != self.d_in:
            raise GsaeError(f"{name} must have shape [N, {self.d_in}], got {list(t.shape)}")

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
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        parallel /= self.W_dec.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ------------------------------------------------------------------------ save / load

    def config_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            **asdict(self.cfg),
            "gradient_definition": GRADIENT_DEFINITION,
            "metadata": self.metadata,
        }

    def save(self, path: str | Path) -> Path:
        """Write `sae.safetensors` and `cfg.json` into the folder `path` (created if needed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}
        tmp = path / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path / WEIGHTS_FILE)
        tmp = path / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        tmp.replace(path / CONFIG_FILE)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Load an SAE folder written by `save`. Anything else (a SAELens or sparsify TopK
        folder, a Hugging Face repo id) is handed to `gsae.formats.load_foreign`."""
        cfg_file, weights_file = Path(path) / CONFIG_FILE, Path(path) / WEIGHTS_FILE
        raw = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        if raw.get("format") != FORMAT_NAME:
            from gsae.formats import load_foreign  # imported here: it imports this module

            return load_foreign(path, device=device)
        if not weights_file.is_file():
            raise GsaeError(
                f"{path} is not a gsae SAE folder: expected {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
        fields = {f for f in SAEConfig.__dataclass_fields__}
        cfg = SAEConfig(**{k: v for k, v in raw.items() if k in fields})
        tensors = load_file(str(weights_file), device=str(device))
        dtype = tensors["W_dec"].dtype
        sae = cls(cfg, raw["d_in"], device=device, dtype=dtype, metadata=raw.get("metadata", {}),
                  initialize=False)
        sae.load_state_dict(tensors)
        return sae
