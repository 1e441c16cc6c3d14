"""The SAE step's kernels: a chunked dense selection pass, and sparse products for the rest.

A TopK SAE touches only k of its n latents per token, so only the selection needs dense
products: the encoder pre-activations `z` [N, n] and, for a g-SAE, `g W_dec^T` [N, n]. They are
computed a block of rows at a time, so that the score, the top-k and the AuxK top-k of a block
are taken while it is still in cache and no [N, n] tensor is ever stored. Every other product
(the decode and all backward products) involves only the k selected rows of a weight matrix per
token: `SparsePattern` does them with `embedding_bag` and a CSR sparse-times-dense product, which
cost O(N k d) instead of O(N n d).

The selection is exact: the k latents of largest score in the input's dtype, equal scores
ordered by latent index (`best_positions`); its top-k ranks maxima of column groups first
(`top_m`). With `SCREEN` set to "auto", where bfloat16 products run in hardware (AVX512-BF16 or
AMX, `bf16_products_fast`), or "always", every score (z, and for a g-SAE z + beta z |d_i . g|)
is ranked by bfloat16 products of three-term splits with certified error bounds
(`SplitProduct`) and only the candidates are computed exactly (`_ScreenedScorer`,
`certified_top`); it selects the same latents. Its products are about twice as fast as the
float32 ones, but the candidates' rescoring, the split operands and a slower top-k over
bfloat16 values cost more than that saves in a whole step on the machines measured
(docs/performance.md), so it is off by default.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_BYTES = 8 << 20  # size of one block of dense [rows, n_latents] scores in the selection
SCREEN_BLOCK_BYTES = 8 << 20  # the same for the bfloat16 screen
# The TopK bfloat16 screen: "never" (the default: exact too, but measured slower than the dense
# float32 selection for a whole training step on the AMX machine this was written on, at the
# SmolLM2 and GPT-2 shapes), "auto" (where bfloat16 products run in hardware) or "always".
SCREEN = "never"
SCREEN_CANDIDATE_FACTORS = (1.25, 4)  # candidates per row of the screen: factor * k + 8, in turn
TOP_M_GROUPS = (16, 8, 4)  # group sizes `top_m` tries, in turn
BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
TINY = 2.0**-100  # entries below this may vanish in a bfloat16 product (flushed subnormals)
SAFETY = 2.0  # every bound on a rounding error is doubled


class DenseLinear:
    """`x @ W^T + b` for many blocks of rows with one weight.

    On CPU, in float32 or bfloat16, the weight is reordered once into oneDNN's blocked layout
    and the products run through oneDNN: on AVX2 machines as fast as MKL for a whole batch and
    much faster for blocks of a few hundred rows; on AVX-512 ones about twice as fast as MKL, and
    in bfloat16 several times faster again where the CPU has AVX512-BF16 or AMX. The reordered
    copy lives only as long as this object, which never outlives one selection pass, so it
    cannot go stale when the weight changes (it costs about 2% of a training step).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int):
        self.weight, self.bias = weight, bias
        self.packed: Tensor | None = None
        if onednn_packs(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def onednn_available() -> bool:
    """Whether this torch build can run fp32 matrix products through oneDNN."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_packs(weight: Tensor) -> bool:
    """Whether `DenseLinear` runs products with this weight through oneDNN."""
    if weight.device.type != "cpu" or not onednn_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def bf16_products_fast() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX tiles),
    and this torch reaches that hardware through oneDNN."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    hardware = any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return hardware and onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def screens(x: Tensor) -> bool:
    """Whether `select` ranks the scores of `x`'s rows by the bfloat16 screen
    (`_ScreenedScorer`) rather than by dense products in `x`'s dtype. Both select the same."""
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


class Exact(NamedTuple):
    """Exactly computed values for some latents of some rows: the score that ranks them, the
    pre-activation z and, with a gradient, |d_i . g|."""

    score: Tensor
    z: Tensor
    effect: Tensor | None


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
    (`_ScreenedScorer`); rows the bounds cannot settle get more candidates and in the end all
    latents.
    """
    n_rows, n_latents = x_centered.shape[0], W_enc.shape[0]
    if grad is None or W_dec is None:
        grad = W_dec = None
    if screens(x_centered):
        rows = block_rows(n_rows, n_latents, 2, SCREEN_BLOCK_BYTES)
        scorer: _Scorer = _ScreenedScorer(x_centered, W_enc, b_enc, rows, grad, W_dec, beta)
    else:
        rows = block_rows(n_rows, n_latents, x_centered.element_size())
        scorer = _DenseScorer(x_centered, W_enc, b_enc, rows, grad, W_dec, beta)
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


Bound = Callable[[Tensor, Tensor], Tensor]
Rescore = Callable[[Tensor, Tensor], Exact]


def certified_top(
    approx: Tensor, k: int, bound: Bound, rescore: Rescore,
    candidates: Callable[[int], tuple[int, ...]], columns: Tensor | None = None,
) -> tuple[Tensor, Exact]:
    """The k best latents per row by exact score, found from approximate scores `approx`
    [rows, cols] (column j is latent `columns[j]`, or j).

    Per row, the m columns of largest approximate score are candidates; they are computed
    exactly (`rescore(rows, latents)`) and ranked (`best_positions`). Let R be the exact score
    of the k-th best of them and v the smallest approximate score among them. `bound(rows, v)`
    is, per row, an upper bound on the exact score of every column whose approximate score is
    at most v. If it is below R, each latent outside the candidates scores below k of them and
    the candidates' top k is the row's top k. Rows where it is not try the next (larger) m of
    `candidates`, and finally all columns, which needs no bound.
    """
    n_rows, n_cols = approx.shape
    chosen = approx.new_empty((n_rows, k), dtype=torch.long)
    out: Exact | None = None
    pending = torch.arange(n_rows, device=approx.device)
    for m in [m for m in candidates(k) if k < m < n_cols] + [n_cols]:
        values, cols = top_m(approx if len(pending) == n_rows else approx[pending], m)
        latents = cols if columns is None else columns[cols]
        exact = rescore(pending, latents)
        best = best_positions(exact.score, latents, k)
        exact = Exact(*(None if t is None else t.gather(1, best) for t in exact))
        latents = latents.gather(1, best)
        if m == n_cols:
            done = torch.ones(len(pending), dtype=torch.bool, device=approx.device)
        else:
            done = bound(pending, values.amin(1).double()) < exact.score.amin(1).double()
        if len(pending) == n_rows and bool(done.all()):
            return latents, exact  # the common case: every row settled at once
        if out is None:
            out = Exact(*(None if t is None else t.new_empty(n_rows, k) for t in exact))
        rows = pending[done]
        chosen[rows] = latents[done]
        for into, t in zip(out, exact):
            if into is not None and t is not None:
                into[rows] = t[done]
        pending = pending[~done]
        if len(pending) == 0:
            break
    assert out is not None
    return chosen, out


def top_m(scores: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The m largest entries of each row of `scores` [rows, n] and their columns, unsorted: what
    `scores.topk(m, dim=1, sorted=False)` returns (up to which of equal values), faster on wide
    rows.

    The columns are cut into S strided groups of G, group j being {j, j + S, j + 2S, ...}
    (n = G S). Let T be the m-th largest group maximum. An entry of any other group is at most
    T, and each of the m groups with the largest maxima holds an entry at least T: so the m
    largest of their m G entries are m largest entries of the row. `torch.topk` then ranks
    n / G maxima and m G candidates instead of n entries (measured 30-40% faster at 9,216 and
    24,576 columns).
    """
    n = scores.shape[1]
    group = next((g for g in TOP_M_GROUPS if n % g == 0 and 4 * m * g <= n), None)
    if group is None or not scores.is_contiguous():
        return scores.topk(m, dim=1, sorted=False)
    stride = n // group
    maxima = scores.view(-1, group, stride).amax(1)
    groups = maxima.topk(m, dim=1, sorted=False).indices
    offsets = torch.arange(0, n, stride, device=scores.device)
    columns = (groups.unsqueeze(2) + offsets).view(len(scores), m * group)
    values, picked = scores.gather(1, columns).topk(m, dim=1, sorted=False)
    return values, columns.gather(1, picked)


def best_positions(score: Tensor, latents: Tensor, k: int) -> Tensor:
    """Positions of the k best entries of each row of `score` [rows, m]: larger score first,
    and on equal scores the lower latent index (`latents`, [rows, m], distinct per row)."""
    by_latent = latents.argsort(dim=1)
    ranked = score.gather(1, by_latent).sort(dim=1, descending=True, stable=True).indices
    return by_latent.gather(1, ranked[:, :k])


class _Block(NamedTuple):
    """The scores of one block of rows, as `certified_top` needs them: approximate (or exact)
    dense scores and pre-activations, bounds on their errors, and exact rescoring."""

    score: Tensor  # [rows, n_latents]
    z: Tensor  # [rows, n_latents]
    score_bound: Bound
    z_bound: Bound
    rescore: Rescore
    rescore_z: Rescore
    candidates: Callable[[int], tuple[int, ...]]  # candidate counts to try, given k


def _next_one(k: int) -> tuple[int, ...]:
    """Exact scores: the k-th and (k+1)-th decide, unless they are equal."""
    return (k + 1,)


def split_candidates(k: int) -> tuple[int, ...]:
    """Candidates per row of the screen, tried in turn before all latents."""
    return tuple(int(factor * k) + 8 for factor in SCREEN_CANDIDATE_FACTORS)


def _same(rows: Tensor, values: Tensor) -> Tensor:
    return values


def _pick(t: Tensor, rows: Tensor, latents: Tensor) -> Tensor:
    """t[rows[n], latents[n, j]]; `rows` are increasing, so as many as t has means all."""
    return (t if len(rows) == len(t) else t[rows]).gather(1, latents)


_Scorer = Callable[[slice], _Block]


def _gamma(n: int, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u), u the unit roundoff of `dtype`: the relative error bound of a
    sum of n terms in `dtype`, added in any order (relative to the sum of their magnitudes)."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def _row_dots(table: Tensor, rows: Tensor, latents: Tensor) -> Tensor:
    """out[n, j] = table[latents[n, j]] . rows[n], each entry computed on its own (by the
    embedding-bag kernel)."""
    return SparsePattern(latents, table.shape[0]).row_dots(table, rows)


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

    def __call__(self, block: slice) -> _Block:
        z = self.encoder(self.x[block])

        def rescore_z(rows: Tensor, latents: Tensor) -> Exact:
            picked = _pick(z, rows, latents)
            return Exact(picked, picked, None)

        if self.decoder is None or self.grad is None:
            return _Block(z, z, _same, _same, rescore_z, rescore_z, _next_one)
        effect = self.decoder(self.grad[block]).abs_()
        score = torch.addcmul(z, z, effect, value=self.beta)

        def rescore(rows: Tensor, latents: Tensor) -> Exact:
            return Exact(*(_pick(t, rows, latents) for t in (score, z, effect)))

        return _Block(score, z, _same, _same, rescore, rescore_z, _next_one)


def split_into(t: Tensor, hi: Tensor, lo: Tensor) -> None:
    """Write the first two terms of t = hi + lo + rest into the bfloat16 tensors `hi` and `lo`
    (views of one matrix): hi = bf16(t), lo = bf16(t - hi). Entrywise |t - hi| <= u |t|,
    |lo| <= (1 + u) u |t| and |rest| <= u^2 |t| (u = 2^-8; t - hi is exact in t's dtype,
    float32 or float64), for entries in bfloat16's normal range."""
    hi.copy_(t)
    lo.copy_(torch.sub(t, hi))


def _row_norms(t: Tensor) -> Tensor:
    """Upper bounds on the Euclidean norms of the rows of t (of its entries, for a vector):
    computed in t's dtype, then raised by twice their relative rounding bound."""
    if t.dim() == 1:
        return t.abs().double()
    return t.norm(dim=1).double() * (1 + 2 * _gamma(t.shape[1] + 1, t.dtype))


def _max_norm(t: Tensor) -> float:
    return float(_row_norms(t).max()) if t.numel() else 0.0


class SplitProduct:
    """`x W^T + b` for the rows of x as one bfloat16 product of three-term splits, with a
    certified bound on its error; with `shifted`, plus a shift per row that turns the bound
    into a purely relative one.

    With x = xh + xl + xr, each row w = wh + wl + wr and b = bh + bl + br (`split_into`), the
    product of [xh, xl, xh, 1, 1, A~] and [wh, wh, wl, bh, bl, 1] (zero-padded to a multiple of
    32 columns, the AMX tile width) runs in bfloat16 with float32 accumulation. Against
    y = x . w + b it leaves out xh.wr + xl.(w - wh) + xr.w + br, at most (Cauchy-Schwarz and
    the entrywise bounds of `split_into`) (1 + u) u^2 + (1 + u) u^2 + u^2 <= 3.1 u^2 times
    ||x|| max||w||, plus u^2 max|b|. Each product of two bfloat16 values is exact in float32;
    adding the K terms in any order errs by at most gamma_K times the sum of their magnitudes,
    at most gamma_K ((1 + u)^2 ((1 + 2u) ||x|| max||w|| + max|b|) + A~). Underflow: an entry
    of x or w below TINY = 2^-100 may be lost entirely (bfloat16 conversions and products that
    flush subnormals), and a larger one loses at most 2^-125 beyond the bounds above; so the
    losses add at most 3.1 sqrt(d) TINY (max||w|| + ||x||) + 2 TINY (the bias pieces) + K TINY
    (flushed products). E is SAFETY times the sum without the A~ term, F
    (`exact_bound`) SAFETY times the error bound of y computed in x's dtype one latent at a
    time (the rescoring).

    Unshifted (A~ = 0): the float32 sum p is within E of y, and `bound` = E + F bounds the
    distance of every rescored y' from p. Shifted: A = (E + F) / (1 - 2 gamma_K), A~ = a
    bfloat16 value >= A. Then p >= y + A~ - E - gamma_K A~ >= y + F >= y' for every rescored
    y'. The stored q = bf16(p) has |q - p| <= u |p| (u = 2^-8, round to nearest), so
        y' <= `upper(q)` = q + u |q| / (1 - u),
    a bound with no absolute part (`split_products_as_modelled` checks this model of the
    hardware once per process).
    """

    def __init__(self, x: Tensor, weight: Tensor, bias: Tensor | None, rows: int,
                 shifted: bool = False):
        d, u = weight.shape[1], BF16_UNIT
        width = -(-(3 * d + 3) // 32) * 32
        w3 = weight.new_empty(weight.shape[0], width, dtype=torch.bfloat16)
        split_into(weight, w3[:, :d], w3[:, 2 * d:3 * d])
        w3[:, d:2 * d] = w3[:, :d]
        w3[:, 3 * d:].zero_()
        w3[:, 3 * d + 2] = 1
        b_max = 0.0
        if bias is not None and bias.numel():
            split_into(bias, w3[:, 3 * d], w3[:, 3 * d + 1])
            b_max = _max_norm(bias)
        gamma = _gamma(width, torch.float32)
        x_norm, w_max = _row_norms(x), _max_norm(weight)
        left_out = 3.1 * u * u * x_norm * w_max + u * u * b_max
        magnitude = (1 + u) ** 2 * ((1 + 2 * u) * x_norm * w_max + b_max)
        underflow = 3.1 * d**0.5 * TINY * (w_max + x_norm) + (2 + width) * TINY
        error = SAFETY * (left_out + gamma * magnitude + underflow)
        self.exact_bound = SAFETY * _gamma(d + 1, x.dtype) * (x_norm * w_max + b_max)
        self.bound = error + self.exact_bound
        shift16 = torch.zeros_like(self.bound, dtype=torch.bfloat16)
        if shifted:  # rounded up: bf16(y) >= y (1 - u)
            shift16 = (self.bound / (1 - 2 * gamma) * (1 + 2 * u)).to(torch.bfloat16)
        self.shift = shift16.double()
        self.x3 = x.new_zeros(x.shape[0], width, dtype=torch.bfloat16)
        split_into(x, self.x3[:, :d], self.x3[:, d:2 * d])
        self.x3[:, 2 * d:3 * d] = self.x3[:, :d]
        self.x3[:, 3 * d:3 * d + 2] = 1
        self.x3[:, 3 * d + 2] = shift16
        self.linear = DenseLinear(w3, None, rows)
        # an upper bound on |q| for every latent, per row
        self.magnitude = (x_norm * w_max + b_max + self.shift + self.bound) / (1 - u)

    def __call__(self, block: slice) -> Tensor:
        return self.linear(self.x3[block])


def upper(q: Tensor) -> Tensor:
    """The `SplitProduct` bound: q + u' |q| (u' = u / (1 - u)), an upper bound on every value
    within the product's slack of the true one, given its stored bfloat16 value q."""
    return q + BF16_UNIT / (1 - BF16_UNIT) * q.abs()


def _upper(rows: Tensor, v: Tensor) -> Tensor:
    """`upper` as a `Bound` (the same for every row)."""
    return upper(v)


@functools.cache
def split_products_as_modelled() -> bool:
    """Whether this machine's bfloat16 products obey `SplitProduct`'s error model, checked
    against float64 on a case with cancellation and magnitudes from 1e-3 to 1e3."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 100, generator=gen) * torch.logspace(-3, 3, 100)
    bias = torch.randn(200, generator=gen)
    x = torch.randn(40, 100, generator=gen) * torch.logspace(3, -3, 100)
    x[:20] += weight[:20]  # large, mostly cancelling sums
    truth = x.double() @ weight.double().T + bias.double()
    ok = True
    for shifted in (False, True):
        product = SplitProduct(x, weight, bias, rows=16, shifted=shifted)
        q = torch.cat([product(slice(s, s + 16)) for s in range(0, 40, 16)]).double()
        if shifted:
            ok &= bool((truth <= upper(q)).all())
        else:
            p_far = (q - truth).abs() - BF16_UNIT / (1 - BF16_UNIT) * q.abs()
            ok &= bool((p_far <= product.bound[:, None]).all())
    return ok


class _ScreenedScorer:
    """All scores ranked from `SplitProduct`s, candidates rescored exactly.

    TopK: the score is z, ranked by its shifted product q: every rescored z' of a latent with
    q <= v is at most `upper(v)`.

    g-SAE: the score s = z + beta z |e|, e = d_i . g, is ranked by T = q + beta q |Q|, taken in
    bfloat16 (`torch.addcmul`, at most three roundings of terms of one sign) from the shifted
    z-product q and the unshifted e-product Q, whose `bound` B gives |e'| <= |Q| / (1 - u) + B
    for the rescored e'. For a latent with z' >= 0 (then q >= 0):
        s' <= upper(q) (1 + beta |e'|) (1 + 4 eps)
           <= q (1 + beta |Q|) (1 + beta B) / (1 - u)^2 (1 + 4 eps) <= C T,
    C = (1 + beta B) / ((1 - u)^2 (1 - 3u)) (1 + 4 eps). A latent with z' < 0 has s' < 0, below
    every v >= 0. For v < 0, a latent with T <= v has q <= v / ((1 + 3u)(1 + beta Qm)), Qm >= |Q|
    (`magnitude`), and s' <= z' (1 - 2 eps) <= upper(q) (1 - 2 eps).
    """

    def __init__(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, rows: int,
                 grad: Tensor | None, W_dec: Tensor | None, beta: float):
        self.x, self.W_enc, self.b_enc, self.beta = x, W_enc, b_enc, beta
        self.encoder = SplitProduct(x, W_enc, b_enc, rows, shifted=True)
        self.effect: tuple[SplitProduct, Tensor, Tensor] | None = None  # product, g, W_dec
        if grad is not None and W_dec is not None:
            self.effect = (SplitProduct(grad, W_dec, None, rows), grad, W_dec)

    def __call__(self, block: slice) -> _Block:
        x = self.x[block]
        z16 = self.encoder(block)

        def rescore_z(rows: Tensor, latents: Tensor) -> Exact:
            z = _row_dots(self.W_enc, x if len(rows) == len(x) else x[rows], latents)
            z += self.b_enc[latents]
            return Exact(z, z, None)

        if self.effect is None:
            return _Block(z16, z16, _upper, _upper, rescore_z, rescore_z, split_candidates)
        product, grad, W_dec = self.effect
        score16 = torch.addcmul(z16, z16, product(block).abs_(), value=self.beta)
        grad = grad[block]

        def rescore(rows: Tensor, latents: Tensor) -> Exact:
            z = rescore_z(rows, latents).z
            e = _row_dots(W_dec, grad if len(rows) == len(grad) else grad[rows], latents).abs_()
            return Exact(torch.addcmul(z, z, e, value=self.beta), z, e)

        return _Block(score16, z16, self.score_bound(product, block), _upper, rescore, rescore_z,
                      split_candidates)

    def score_bound(self, effect: SplitProduct, block: slice) -> Bound:
        """`C v` for v >= 0 and `upper(v / ((1 + 3u)(1 + beta Qm))) (1 - 2 eps)` below 0,
        per row, for the e-product `effect` (see the class)."""
        u, beta = BF16_UNIT, self.beta
        eps = torch.finfo(self.x.dtype).eps
        positive = (1 + beta * effect.bound[block]) / ((1 - u) ** 2 * (1 - 3 * u)) * (1 + 4 * eps)
        negative = 1 / ((1 + 3 * u) * (1 + beta * effect.magnitude[block]))

        def bound(rows: Tensor, v: Tensor) -> Tensor:
            below = upper(v * negative[rows]) * (1 - 2 * eps)
            return torch.where(v >= 0, v * positive[rows], below)

        return bound


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
        with respect to its weights), by the embedding-bag kernel for the gradient of
        per-sample weights: each entry is computed on its own, so rows need not hold sorted or
        distinct columns (on CPU it is faster than a CSR-sampled dense product)."""
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
