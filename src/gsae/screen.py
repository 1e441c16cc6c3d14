"""The bfloat16 screen of the selection (exact, off by default: `gsae.kernels.SCREEN`).

Every score (z, and for a g-SAE z + beta z |d_i . g|) is ranked by bfloat16 products of
three-term splits with certified error bounds (`SplitProduct`) and only the candidates are
computed exactly (`ScreenedScorer`, through `gsae.topk.certified_top`); it selects the same
latents as the dense float32 pass. Its products are about twice as fast as the float32 ones
where bfloat16 products run in hardware (AVX512-BF16 or AMX), but the candidates' rescoring, the
split operands and a slower top-k over bfloat16 values cost more than that saves in a whole
step on the machines measured (docs/performance.md), so it is off by default. A one-time probe
(`split_products_as_modelled`) checks this machine's products against the error model.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from gsae.private_ops import DenseLinear, row_dots
from gsae.topk import BlockScores, Bound, Exact

SCREEN_CANDIDATE_FACTORS = (1.25, 4)  # candidates per row of the screen: factor * k + 8, in turn
BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
TINY = 2.0**-100  # entries below this may vanish in a bfloat16 product (flushed subnormals)
SAFETY = 2.0  # every bound on a rounding error is doubled


def split_candidates(k: int) -> tuple[int, ...]:
    """Candidates per row of the screen, tried in turn before all latents."""
    return tuple(int(factor * k) + 8 for factor in SCREEN_CANDIDATE_FACTORS)


def _gamma(n: int, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u), u the unit roundoff of `dtype`: the relative error bound of a
    sum of n terms in `dtype`, added in any order (relative to the sum of their magnitudes)."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


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


class ScreenedScorer:
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

    def __call__(self, block: slice) -> BlockScores:
        x = self.x[block]
        z16 = self.encoder(block)

        def rescore_z(rows: Tensor, latents: Tensor) -> Exact:
            z = row_dots(self.W_enc, latents, x if len(rows) == len(x) else x[rows])
            z += self.b_enc[latents]
            return Exact(z, z, None)

        if self.effect is None:
            return BlockScores(z16, z16, _upper, _upper, rescore_z, rescore_z, split_candidates)
        product, grad, W_dec = self.effect
        score16 = torch.addcmul(z16, z16, product(block).abs_(), value=self.beta)
        grad = grad[block]

        def rescore(rows: Tensor, latents: Tensor) -> Exact:
            z = rescore_z(rows, latents).z
            e = row_dots(W_dec, latents, grad if len(rows) == len(grad) else grad[rows]).abs_()
            return Exact(torch.addcmul(z, z, e, value=self.beta), z, e)

        return BlockScores(score16, z16, self.score_bound(product, block), _upper, rescore,
                           rescore_z, split_candidates)

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
