"""The SAE step's kernels: a chunked dense selection pass, and sparse products for the rest.

A TopK SAE touches only k of its n latents per token, so only the selection needs dense
products: the encoder pre-activations `z` [N, n] and, for a g-SAE, `g W_dec^T` [N, n]. They are
computed a block of rows at a time, so that the score, the top-k and the AuxK top-k of a block
are taken while it is still in cache and no [N, n] tensor is ever stored. Every other product
(the decode and all backward products) involves only the k selected rows of a weight matrix per
token: `SparsePattern` does them with `embedding_bag` and a CSR sparse-times-dense product, which
cost O(N k d) instead of O(N n d).
"""

from __future__ import annotations

import warnings
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_BYTES = 8 << 20  # size of one block of dense [rows, n_latents] scores in the selection


class DenseLinear:
    """`x @ W^T + b` for many blocks of rows with one weight.

    On CPU in float32 the weight is reordered once into oneDNN's blocked layout and the products
    run through oneDNN: on AVX2 machines as fast as MKL for a whole batch and much faster for
    blocks of a few hundred rows; on AVX-512 ones about twice as fast as MKL. The reordered copy
    lives only as long as this object, which never outlives one selection pass, so it cannot go
    stale when the weight changes (it costs about 2% of a training step).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int):
        self.weight, self.bias = weight, bias
        self.packed: Tensor | None = None
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def onednn_available() -> bool:
    """Whether this torch build can run fp32 matrix products through oneDNN."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Selection(NamedTuple):
    indices: Tensor  # [N, k] selected latents
    preacts: Tensor  # [N, k] their pre-activations z (no autograd graph)
    effect: Tensor | None  # [N, k] their |d_i . g|, when selected with a gradient
    aux_indices: Tensor | None  # [N, k_aux] the top dead latents by pre-activation
    aux_preacts: Tensor | None  # [N, k_aux]


def block_rows(n_rows: int, n_latents: int, element_size: int) -> int:
    """Rows per block of the selection pass: blocks of equal size, each [rows, n_latents] of at
    most about BLOCK_BYTES."""
    n_blocks = -(-n_rows * n_latents * element_size // BLOCK_BYTES)
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
    picked too, for the AuxK loss. Exactly the dense definition: every score is computed.
    """
    n_rows, n_latents = x_centered.shape[0], W_enc.shape[0]
    rows = block_rows(n_rows, n_latents, x_centered.element_size())
    encoder = DenseLinear(W_enc, b_enc, rows)
    decoder = None
    if grad is not None and W_dec is not None:
        decoder, grad = DenseLinear(W_dec, None, rows), grad.contiguous()
    indices = x_centered.new_empty(n_rows, k, dtype=torch.long)
    preacts = x_centered.new_empty(n_rows, k)
    effect = x_centered.new_empty(n_rows, k) if decoder is not None else None
    aux_local = aux_preacts = None
    if dead_latents is not None:
        aux_local = x_centered.new_empty(n_rows, k_aux, dtype=torch.long)
        aux_preacts = x_centered.new_empty(n_rows, k_aux)
    for start in range(0, n_rows, rows):
        block = slice(start, start + rows)
        z = encoder(x_centered[block])
        if decoder is None:
            torch.topk(z, k, dim=1, sorted=False, out=(preacts[block], indices[block]))
        else:
            effect_all = decoder(grad[block]).abs_()
            score = torch.addcmul(z, z, effect_all, value=beta)
            indices[block] = score.topk(k, dim=1, sorted=False).indices
            torch.gather(z, 1, indices[block], out=preacts[block])
            torch.gather(effect_all, 1, indices[block], out=effect[block])
        if aux_local is not None:
            dead_z = z.index_select(1, dead_latents)
            out = (aux_preacts[block], aux_local[block])
            torch.topk(dead_z, k_aux, dim=1, sorted=False, out=out)
    aux_indices = dead_latents[aux_local] if aux_local is not None else None
    return Selection(indices, preacts, effect, aux_indices, aux_preacts)


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
        if dense.device.type == "cpu":
            return self._row_dots_sampled(table, dense)
        return self._row_dots_bags(table, dense)

    def _row_dots_sampled(self, table: Tensor, dense: Tensor) -> Tensor:
        """`row_dots` as `dense @ table.T` sampled at the pattern (CSR). The CPU kernel computes
        each entry on its own, so rows need not hold sorted or distinct columns."""
        n, k = self.indices.shape
        crow = torch.arange(0, n * k + 1, k, dtype=torch.int32, device=dense.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
            pattern = torch.sparse_csr_tensor(
                crow, self.indices.reshape(-1).to(torch.int32), dense.new_zeros(n * k),
                (n, table.shape[0]), check_invariants=False,
            )
        return torch.sparse.sampled_addmm(pattern, dense, table.t(), beta=0.0).values().view(n, k)

    def _row_dots_bags(self, table: Tensor, dense: Tensor) -> Tensor:
        """`row_dots` with the embedding-bag kernel for the gradient of per-sample weights."""
        n, k = self.indices.shape
        offsets = torch.arange(0, n * k, k, device=dense.device)
        bags = torch.arange(n, device=dense.device).repeat_interleave(k)
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            dense, table, self.indices.reshape(-1), offsets, bags, 0, -1
        )
        return out.view(n, k)

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
