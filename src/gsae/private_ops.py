"""torch's private CPU kernels that the SAE step uses for speed, behind one guard.

oneDNN's prepacked linear (`torch.ops.mkldnn`), the embedding-bag kernel for the gradient of
per-sample weights (`torch.ops.aten._embedding_bag_per_sample_weights_backward`) and torch's
bfloat16 hardware queries (`torch.cpu._is_*`) are not public API: a torch release may drop them
or change their arguments, and builds and CPUs differ in which they have. `works(op)` tries each
once per process, on small integers whose products every correct kernel computes exactly; where
an op is missing, fails or disagrees, the functions here use public torch instead (`F.linear`,
one `torch.linalg.vecdot` per selected latent), which gives the same results up to rounding.
Nothing else in gsae calls a private torch API.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def works(op: str) -> bool:
    """Whether the private op `op` (a key of `TRIALS`) runs here and gives the result its public
    equivalent gives; tried once per process."""
    trial = TRIALS[op]
    try:
        return trial()
    except Exception:  # a missing or changed private op fails in many ways: all mean "no"
        return False


class DenseLinear:
    """`x @ W^T + b` for many blocks of rows with one weight.

    On CPU, in float32 or bfloat16, the weight is reordered once into oneDNN's blocked layout
    and the products run through oneDNN: on AVX2 machines as fast as MKL for a whole batch and
    much faster for blocks of a few hundred rows; on AVX-512 ones about twice as fast as MKL, and
    in bfloat16 several times faster again where the CPU has AVX512-BF16 or AMX. The reordered
    copy lives only as long as this object, which never outlives one selection pass, so it
    cannot go stale when the weight changes (it costs about 2% of a training step). Elsewhere,
    and where oneDNN's ops do not work, the products are `F.linear`'s.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int):
        self.weight, self.bias = weight, bias
        self.packed = _onednn_pack(weight, rows) if _packs(weight) else None

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return _onednn_linear(x, self.packed, self.bias)


def row_dots(table: Tensor, indices: Tensor, dense: Tensor) -> Tensor:
    """out[n, j] = table[indices[n, j]] . dense[n], shape [N, k], each entry computed on its own,
    so rows need not hold sorted or distinct indices: by the embedding-bag kernel for the
    gradient of per-sample weights (on CPU faster than a CSR-sampled dense product), else by one
    `vecdot` per column of `indices`."""
    if works("row_dots"):
        return _embedding_bag_row_dots(table, indices, dense)
    return _vecdot_row_dots(table, indices, dense)


def bf16_products_fast() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX tiles),
    and this torch reaches that hardware through oneDNN."""
    return works("bf16_hardware") and works("onednn_bf16_linear")


def _packs(weight: Tensor) -> bool:
    """Whether `DenseLinear` runs products with this weight through oneDNN."""
    if weight.device.type != "cpu":
        return False
    if weight.dtype == torch.float32:
        return works("onednn_linear")
    return weight.dtype == torch.bfloat16 and works("onednn_bf16_linear")


def _onednn_pack(weight: Tensor, rows: int) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def _onednn_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _embedding_bag_row_dots(table: Tensor, indices: Tensor, dense: Tensor) -> Tensor:
    n, k = indices.shape
    offsets = torch.arange(0, n * k, k, device=dense.device)
    bags = torch.arange(n, device=dense.device).repeat_interleave(k)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        dense, table, indices.reshape(-1), offsets, bags, 0, -1
    )
    return out.view(n, k)


def _vecdot_row_dots(table: Tensor, indices: Tensor, dense: Tensor) -> Tensor:
    out = dense.new_empty(indices.shape)
    for j in range(indices.shape[1]):  # one [N, d] gather at a time, never [N, k, d]
        out[:, j] = torch.linalg.vecdot(table[indices[:, j]], dense)
    return out


# ------------------------------------------------------------------------------------ trials


def _small_integers(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integers in [-2, 2]: the trials' products and sums stay exact in bfloat16 and float32."""
    gen = torch.Generator().manual_seed(len(shape) + sum(shape))
    return torch.randint(-2, 3, shape, generator=gen).to(dtype)


def _try_onednn_linear(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    x, weight = _small_integers(5, 8, dtype=dtype), _small_integers(24, 8, dtype=dtype)
    bias = _small_integers(24, dtype=dtype)
    out = _onednn_linear(x, _onednn_pack(weight, len(x)), bias)
    return torch.equal(out, F.linear(x, weight, bias))


def _try_row_dots() -> bool:
    table, dense = _small_integers(24, 8), _small_integers(5, 8)
    indices = (_small_integers(5, 3) + 2).long() * 5  # repeats within a row too
    return torch.equal(_embedding_bag_row_dots(table, indices, dense),
                       _vecdot_row_dots(table, indices, dense))


def _try_bf16_hardware() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


TRIALS: dict[str, Callable[[], bool]] = {
    "onednn_linear": lambda: _try_onednn_linear(torch.float32),
    "onednn_bf16_linear": lambda: _try_onednn_linear(torch.bfloat16),
    "row_dots": _try_row_dots,
    "bf16_hardware": _try_bf16_hardware,
}
