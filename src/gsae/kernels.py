"""Sparse pieces of the SAE step: encoder pre-activations, a gather with a sparse backward, and
a sparse decode.

A TopK SAE touches only k of its n latents per token, so only the forward pre-activation needs a
dense matrix product. Every other product (the decode and all backward products) involves just
the k selected rows of a weight matrix per token, and is done here with `embedding_bag` (gather
and sum) and sparse-times-dense products, which cost O(N k d) instead of O(N n d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def preactivations(x_centered: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """Dense encoder pre-activations `x_centered @ W_enc.T + b_enc`, shape [N, n_latents]."""
    return torch.addmm(b_enc, x_centered, W_enc.t())


def gather_rows_sum(indices: Tensor, weights: Tensor, table: Tensor) -> Tensor:
    """out[n] = sum_j weights[n, j] * table[indices[n, j]]: a weighted gather, shape [N, d]."""
    return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")


def scatter_rows_sum(indices: Tensor, weights: Tensor, dense: Tensor, n_rows: int) -> Tensor:
    """out[i] = sum over (n, j) with indices[n, j] == i of weights[n, j] * dense[n].

    The transpose of `gather_rows_sum`: a sparse [n_rows, N] matrix times a dense [N, d] one.
    """
    n, k = indices.shape
    rows = torch.arange(n, device=indices.device).repeat_interleave(k)
    sparse = torch.sparse_coo_tensor(
        torch.stack([indices.reshape(-1), rows]), weights.reshape(-1), (n_rows, n),
        check_invariants=False,
    )
    return torch.sparse.mm(sparse, dense)


def row_dots(indices: Tensor, table: Tensor, dense: Tensor) -> Tensor:
    """out[n, j] = table[indices[n, j]] . dense[n], shape [N, k]."""
    return torch.bmm(F.embedding(indices, table), dense.unsqueeze(-1)).squeeze(-1)


class _SelectedPreacts(torch.autograd.Function):
    """z[n, idx[n, j]] from precomputed dense pre-activations, with a backward that touches only
    the selected encoder rows."""

    @staticmethod
    def forward(ctx, z_dense, indices, x_centered, W_enc, b_enc):  # type: ignore[override]
        ctx.save_for_backward(indices, x_centered, W_enc)
        ctx.n_latents = W_enc.shape[0]
        return z_dense.gather(1, indices)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        indices, x_centered, W_enc = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_x = gather_rows_sum(indices, grad_out, W_enc)
        if ctx.needs_input_grad[3]:
            grad_w = scatter_rows_sum(indices, grad_out, x_centered, ctx.n_latents)
        if ctx.needs_input_grad[4]:
            grad_b = torch.zeros(ctx.n_latents, dtype=grad_out.dtype, device=grad_out.device)
            grad_b.index_add_(0, indices.reshape(-1), grad_out.reshape(-1))
        return None, None, grad_x, grad_w, grad_b


def selected_preacts(
    z_dense: Tensor, indices: Tensor, x_centered: Tensor, W_enc: Tensor, b_enc: Tensor
) -> Tensor:
    """Gather the selected pre-activations [N, k] so that gradients reach `x_centered`, `W_enc`
    and `b_enc` exactly as if `z_dense` had been computed with autograd (it need not be)."""
    return _SelectedPreacts.apply(z_dense, indices, x_centered, W_enc, b_enc)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec):  # type: ignore[override]
        ctx.save_for_backward(values, indices, W_dec)
        return gather_rows_sum(indices, values, W_dec)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = row_dots(indices, W_dec, grad_out)
        if ctx.needs_input_grad[2]:
            grad_w = scatter_rows_sum(indices, values, grad_out, W_dec.shape[0])
        return grad_values, None, grad_w


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[n, j] * W_dec[indices[n, j]] without forming a dense [N, n_latents] code."""
    return _SparseDecode.apply(values, indices, W_dec)
