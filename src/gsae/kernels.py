"""The SAE step's kernels: a chunked dense selection pass, and sparse products for the rest.

A TopK SAE touches only k of its n latents per token, so only the selection needs dense
products: the encoder pre-activations `z` [N, n] and, for a g-SAE, `g W_dec^T` [N, n]. They are
computed a block of rows at a time, so that the score, the top-k and the AuxK top-k of a block
are taken while it is still in cache and no [N, n] tensor is ever stored. Every other product
(the decode and all backward products) involves only the k selected rows of a weight matrix per
token: `SparsePattern` does them with `embedding_bag` and a CSR sparse-times-dense product, which
cost O(N k d) instead of O(N n d); each is the adjoint of the decode `gather` in one argument.

The selection is exact: the k latents of largest score in the input's dtype, equal scores
ordered by latent index (`gsae.topk`). With `SCREEN` set to "auto" (where bfloat16 products run
in hardware) or "always", the scores are ranked by the bfloat16 screen instead (`gsae.screen`),
which selects the same latents; it is off by default, being slower for a whole step on the
machines measured (docs/performance.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gsae.private_ops import DenseLinear, bf16_products_fast, row_dots
from gsae.screen import ScreenedScorer, split_products_as_modelled
from gsae.topk import BlockScores, Exact, certified_top

BLOCK_BYTES = 8 << 20  # size of one block of dense [rows, n_latents] scores in the selection
SCREEN_BLOCK_BYTES = 8 << 20  # the same for the bfloat16 screen
# The TopK bfloat16 screen: "never" (the default: exact too, but measured slower than the dense
# float32 selection for a whole training step on the AMX machine this was written on, at the
# SmolLM2 and GPT-2 shapes), "auto" (where bfloat16 products run in hardware) or "always".
SCREEN = "never"


def screens(x: Tensor) -> bool:
    """Whether `select` ranks the scores of `x`'s rows by the bfloat16 screen
    (`ScreenedScorer`) rather than by dense products in `x`'s dtype. Both select the same."""
    if SCREEN == "never" or x.device.type != "cpu":
        return False
    if x.dtype not in (torch.float32, torch.float64):
        return False
    fast = SCREEN == "always" or bf16_products_fast()
    return fast and split_products_as_modelled()


class Selection(NamedTuple):
    indices: Tensor  # [N, k] selected latents
    preacts: Tensor  # [N, k] their pre-activations z (no autograd graph)
    effect: Tensor | None  # [N, k] their |d_i . g|, when selected with a gradient
    aux_indices: Tensor | None  # [N, k_aux] the top dead latents by pre-activation
    aux_preacts: Tensor | None  # [N, k_aux]


def block_rows(n_rows: int, n_latents: int, element_size: int,
               block_bytes: int | None = None) -> int:
    """Rows per block of the selection pass: blocks of equal size, each [rows, n_latents] of at
    most about `block_bytes` (default BLOCK_BYTES)."""
    block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
    n_blocks = -(-n_rows * n_latents * element_size // block_bytes)
    return max(1, -(-n_rows // max(1, n_blocks)))


@torch.no_grad()
def select(
    x_centered: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    grad: Tensor | None = None,
    W_dec: Tensor | None = None,
    beta: float = 0.0,
    dead_latents: Tensor | None = None,
    k_aux: int = 0,
) -> Selection:
    """Pick the k latents of largest score per row, block by block.

    The score is `z` (TopK), or `z + beta * z * |W_dec g|` (g-SAE) when `grad` and `W_dec` are
    given. With `dead_latents` (indices of dead latents) the top `k_aux` of them by `z` are
    picked too, for the AuxK loss.

    The result is the exact top k of the scores computed in `x_centered`'s dtype: ranked by
    value, and among latents whose scores are equal to the last bit the one of lower index comes
    first. Latents with identical weights tie only where their products are exact: a BLAS
    kernel's summation order may depend on the CPU and on a row's place in memory, so in general
    they may score a rounding apart and either may win (docs/performance.md, "Ties"). Where
    `screens(x_centered)`, all scores are first ranked by bfloat16 products with certified error
    bounds and only the candidates that the bounds cannot rule out are computed exactly
    (`ScreenedScorer`); rows the bounds cannot settle get more candidates and in the end all
    latents.
    """
    n_rows = x_centered.shape[0]
    if grad is None or W_dec is None:
        grad = W_dec = None
    scorer, rows = _scorer(x_centered, W_enc, b_enc, grad, W_dec, beta)
    indices = x_centered.new_empty(n_rows, k, dtype=torch.long)
    preacts = x_centered.new_empty(n_rows, k)
    effect = x_centered.new_empty(n_rows, k) if grad is not None else None
    aux_indices = aux_preacts = None
    if dead_latents is not None:
        aux_indices = x_centered.new_empty(n_rows, k_aux, dtype=torch.long)
        aux_preacts = x_centered.new_empty(n_rows, k_aux)
    for start in range(0, n_rows, rows):
        block = slice(start, start + rows)
        scores = scorer(block)
        indices[block], exact = certified_top(scores.score, k, scores.score_bound, scores.rescore,
                                              scores.candidates)
        preacts[block] = exact.z
        if effect is not None and exact.effect is not None:
            effect[block] = exact.effect
        if aux_indices is not None and aux_preacts is not None and dead_latents is not None:
            dead_z = scores.z.index_select(1, dead_latents)
            aux_indices[block], exact = certified_top(dead_z, k_aux, scores.z_bound,
                                                      scores.rescore_z, scores.candidates,
                                                      columns=dead_latents)
            aux_preacts[block] = exact.z
    return Selection(indices, preacts, effect, aux_indices, aux_preacts)


_Scorer = Callable[[slice], BlockScores]


def _scorer(x: Tensor, W_enc: Tensor, b_enc: Tensor, grad: Tensor | None, W_dec: Tensor | None,
            beta: float) -> tuple[_Scorer, int]:
    """What scores `select`'s blocks, and their rows: the screen where `screens(x)`, else dense
    products (blocks sized by the bytes of their scores, 2 for bfloat16)."""
    n_rows, n_latents = x.shape[0], W_enc.shape[0]
    if screens(x):
        rows = block_rows(n_rows, n_latents, 2, SCREEN_BLOCK_BYTES)
        return ScreenedScorer(x, W_enc, b_enc, rows, grad, W_dec, beta), rows
    rows = block_rows(n_rows, n_latents, x.element_size())
    return _DenseScorer(x, W_enc, b_enc, rows, grad, W_dec, beta), rows


class _DenseScorer:
    """Every score computed densely in the input's dtype: exact, so the bounds are the values
    themselves and the candidates' exact values are read from the dense block."""

    def __init__(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, rows: int, grad: Tensor | None,
                 W_dec: Tensor | None, beta: float):
        self.x, self.grad, self.beta = x, grad, beta
        self.encoder = DenseLinear(W_enc, b_enc, rows)
        self.decoder = None
        if grad is not None and W_dec is not None:
            self.grad, self.decoder = grad.contiguous(), DenseLinear(W_dec, None, rows)

    def __call__(self, block: slice) -> BlockScores:
        z = self.encoder(self.x[block])

        def rescore_z(rows: Tensor, latents: Tensor) -> Exact:
            picked = _pick(z, rows, latents)
            return Exact(picked, picked, None)

        if self.decoder is None or self.grad is None:
            return BlockScores(z, z, _same, _same, rescore_z, rescore_z, _next_one)
        effect = self.decoder(self.grad[block]).abs_()
        score = torch.addcmul(z, z, effect, value=self.beta)

        def rescore(rows: Tensor, latents: Tensor) -> Exact:
            return Exact(*(_pick(t, rows, latents) for t in (score, z, effect)))

        return BlockScores(score, z, _same, _same, rescore, rescore_z, _next_one)


def _next_one(k: int) -> tuple[int, ...]:
    """Exact scores: the k-th and (k+1)-th decide, unless they are equal."""
    return (k + 1,)


def _same(rows: Tensor, values: Tensor) -> Tensor:
    return values


def _pick(t: Tensor, rows: Tensor, latents: Tensor) -> Tensor:
    """t[rows[n], latents[n, j]]; `rows` are increasing, so as many as t has means all."""
    return (t if len(rows) == len(t) else t[rows]).gather(1, latents)


class SparsePattern:
    """The selected latents of each row, `indices` [N, k] out of `n_latents`, as a sparse
    [N, n_latents] matrix with k entries per row, and the three products that use it.

    The CSR form of its transpose (rows sorted by latent) is built once, on first use, and
    shared by every weight gradient that uses this pattern.
    """

    def __init__(self, indices: Tensor, n_latents: int):
        self.indices = indices
        self.n_latents = n_latents

    def gather(self, weights: Tensor, table: Tensor) -> Tensor:
        """out[n] = sum_j weights[n, j] * table[indices[n, j]], shape [N, d]."""
        return F.embedding_bag(self.indices, table, per_sample_weights=weights, mode="sum")

    def row_dots(self, table: Tensor, dense: Tensor) -> Tensor:
        """out[n, j] = table[indices[n, j]] . dense[n], shape [N, k] (the adjoint of `gather`
        with respect to its weights)."""
        return row_dots(table, self.indices, dense)

    def scatter(self, weights: Tensor, dense: Tensor) -> Tensor:
        """out[i] = sum over (n, j) with indices[n, j] == i of weights[n, j] * dense[n], shape
        [n_latents, d] (the adjoint of `gather` with respect to its table)."""
        crow, col, order = self._transposed
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
            matrix = torch.sparse_csr_tensor(
                crow, col, weights.reshape(-1)[order], (self.n_latents, dense.shape[0]),
                check_invariants=False,
            )
        # Zeros, not empty memory: a sparse product with beta=0 may still read `out`, and
        # uninitialised memory can hold NaN bit patterns (0 * NaN = NaN).
        out = dense.new_zeros(self.n_latents, dense.shape[1])
        return torch.addmm(out, matrix, dense, beta=0, out=out)

    @cached_property
    def _transposed(self) -> tuple[Tensor, Tensor, Tensor]:
        """CSR row pointers and column indices of the transpose (int32 where they fit, as MKL
        takes them), and the order of its values among the pattern's entries."""
        flat = self.indices.reshape(-1)
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        order = flat.argsort(stable=True)  # stable: each latent's rows in increasing order
        crow = torch.zeros(self.n_latents + 1, dtype=index_dtype, device=flat.device)
        torch.cumsum(torch.bincount(flat, minlength=self.n_latents), 0, out=crow[1:])
        col = torch.div(order, self.indices.shape[1], rounding_mode="floor").to(index_dtype)
        return crow, col, order


class _SelectedPreacts(torch.autograd.Function):
    """The selected pre-activations, computed beforehand, with the gradient they would have had
    through `z = x_centered @ W_enc.T + b_enc`; the backward touches only the selected rows."""

    @staticmethod
    def forward(ctx, preacts, pattern, x_centered, W_enc, b_enc):  # type: ignore[override]
        ctx.save_for_backward(x_centered, W_enc)
        ctx.pattern = pattern
        return preacts

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_centered, W_enc = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_x = pattern.gather(grad_out, W_enc)
        if ctx.needs_input_grad[3]:
            grad_w = pattern.scatter(grad_out, x_centered)
        if ctx.needs_input_grad[4]:
            grad_b = grad_out.new_zeros(pattern.n_latents)
            grad_b.index_add_(0, pattern.indices.reshape(-1), grad_out.reshape(-1))
        return None, None, grad_x, grad_w, grad_b


def selected_preacts(
    preacts: Tensor, pattern: SparsePattern, x_centered: Tensor, W_enc: Tensor, b_enc: Tensor
) -> Tensor:
    """The pre-activations `preacts` [N, k] of the latents in `pattern`, computed without a
    graph, made differentiable with respect to `x_centered`, `W_enc` and `b_enc`."""
    return _SelectedPreacts.apply(preacts, pattern, x_centered, W_enc, b_enc)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, pattern, W_dec):  # type: ignore[override]
        ctx.save_for_backward(values, W_dec)
        ctx.pattern = pattern
        return pattern.gather(values, W_dec)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        values, W_dec = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_values = grad_w = None
        grad_out = grad_out.contiguous()
        if ctx.needs_input_grad[0]:
            grad_values = pattern.row_dots(W_dec, grad_out)
        if ctx.needs_input_grad[2]:
            grad_w = pattern.scatter(values, grad_out)
        return grad_values, None, grad_w


def sparse_decode(values: Tensor, indices: Tensor | SparsePattern, W_dec: Tensor) -> Tensor:
    """sum_j values[n, j] * W_dec[indices[n, j]] without forming a dense [N, n_latents] code."""
    if isinstance(indices, Tensor):
        indices = SparsePattern(indices, W_dec.shape[0])
    return _SparseDecode.apply(values, indices, W_dec)
