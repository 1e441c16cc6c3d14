"""The kernels against naive dense references."""

import pytest
import torch
import torch.nn.functional as F

from gsae import SAE, SAEConfig, kernels

needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="no oneDNN in this torch")


def weights(n_latents=40, d_in=9, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(n_latents, d_in, generator=gen, dtype=dtype)
    W_dec = torch.randn(n_latents, d_in, generator=gen, dtype=dtype)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    b_enc = 0.5 * torch.randn(n_latents, generator=gen, dtype=dtype)
    return W_enc, b_enc, W_dec


def inputs(n=37, d_in=9, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=dtype)
    g = torch.randn(n, d_in, generator=gen, dtype=dtype)
    return x, g


def dense_scores(x, W_enc, b_enc, g=None, W_dec=None, beta=0.0):
    z = x @ W_enc.T + b_enc
    if g is None:
        return z, z
    return z, z + beta * z * (g @ W_dec.T).abs()


def same_set(indices, reference):
    return torch.equal(indices.sort(1).values, reference.sort(1).values)


@pytest.fixture(params=[1 << 30, 3 * 40 * 8], ids=["one block", "blocks of 3 rows"])
def block_bytes(request, monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("b_shift", [0.0, -100.0], ids=["mixed signs", "all z negative"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 30.0, 1e4])
def test_select_equals_dense_topk(block_bytes, beta, b_shift):
    W_enc, b_enc, W_dec = weights()
    b_enc = b_enc + b_shift
    x, g = inputs()
    use_grad = beta > 0
    sel = kernels.select(x, W_enc, b_enc, 6, grad=g if use_grad else None, W_dec=W_dec, beta=beta)
    z, score = dense_scores(x, W_enc, b_enc, g if use_grad else None, W_dec, beta)
    reference = score.topk(6, dim=1).indices
    assert same_set(sel.indices, reference)
    assert torch.allclose(sel.preacts, z.gather(1, sel.indices), rtol=1e-12, atol=1e-12)
    if use_grad:
        effect = (g @ W_dec.T).abs().gather(1, sel.indices)
        assert torch.allclose(sel.effect, effect, rtol=1e-12, atol=0)
    else:
        assert sel.effect is None and sel.aux_indices is None


def test_gradient_changes_the_selection():
    """The adversarial case for any shortcut: latents with small z but a large gradient effect
    win, so the selection with a gradient differs from plain TopK on most rows."""
    W_enc, b_enc, W_dec = weights()
    x, g = inputs()
    g = 50 * g
    plain = kernels.select(x, W_enc, b_enc, 6).indices
    with_grad = kernels.select(x, W_enc, b_enc, 6, grad=g, W_dec=W_dec, beta=10.0)
    _, score = dense_scores(x, W_enc, b_enc, g, W_dec, 10.0)
    assert same_set(with_grad.indices, score.topk(6, dim=1).indices)
    differs = [not same_set(a[None], b[None]) for a, b in zip(plain, with_grad.indices)]
    assert sum(differs) > len(differs) // 2


def test_aux_selection_is_the_top_dead_latents(block_bytes):
    W_enc, b_enc, W_dec = weights()
    x, g = inputs()
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.randperm(40, generator=torch.Generator().manual_seed(2))[:15]] = True
    sel = kernels.select(x, W_enc, b_enc, 6, grad=g, W_dec=W_dec, beta=2.0,
                         dead_latents=dead.nonzero().squeeze(1), k_aux=7)
    z, _ = dense_scores(x, W_enc, b_enc)
    reference = z.masked_fill(~dead, float("-inf")).topk(7, dim=1).indices
    assert same_set(sel.aux_indices, reference)
    assert torch.allclose(sel.aux_preacts, z.gather(1, sel.aux_indices), rtol=1e-12, atol=1e-12)


@needs_onednn
def test_onednn_products_match_f_linear():
    W_enc, b_enc, _ = weights(n_latents=300, d_in=64, dtype=torch.float32)
    x, _ = inputs(n=70, d_in=64, dtype=torch.float32)
    linear = kernels.DenseLinear(W_enc, b_enc, rows=32)
    assert linear.packed is not None
    reference = F.linear(x.double(), W_enc.double(), b_enc.double())
    for block in (slice(0, 32), slice(32, 64), slice(64, 70)):
        out = linear(x[block])
        assert out.dtype == torch.float32
        err = (out.double() - reference[block]).abs().max() / reference[block].abs().max()
        assert err < 1e-5
    no_bias = kernels.DenseLinear(W_enc, None, rows=x.shape[0])(x)
    reference = x.double() @ W_enc.double().T
    assert (no_bias.double() - reference).abs().max() / reference.abs().max() < 1e-5


@needs_onednn
def test_float32_selection_matches_float64_up_to_near_ties():
    W_enc, b_enc, W_dec = weights(n_latents=500, d_in=32, dtype=torch.float32)
    x, g = inputs(n=64, d_in=32, dtype=torch.float32)
    sel = kernels.select(x, W_enc, b_enc, 8, grad=g, W_dec=W_dec, beta=3.0)
    _, score = dense_scores(x.double(), W_enc.double(), b_enc.double(), g.double(),
                            W_dec.double(), 3.0)
    threshold = score.topk(8, dim=1).values[:, -1:]
    chosen = score.gather(1, sel.indices)
    tol = 1e-4 * score.abs().amax(1, keepdim=True)
    assert (chosen >= threshold - tol).all()  # nothing clearly below the k-th best was chosen


def test_weight_changes_are_seen_at_once():
    """Products use the weights as they are at each call: nothing cached can go stale."""
    sae = SAE(SAEConfig(n_latents=64, k=4, beta=5.0), 16)
    x, g = inputs(n=20, d_in=16, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=0.5, fused=True)

    def check():
        z, score = dense_scores(x.double() - sae.b_dec.double(), sae.W_enc.double(),
                                sae.b_enc.double(), g.double(), sae.W_dec.double(), 5.0)
        out = sae.encode(x, g)
        assert same_set(out.indices, score.topk(4, dim=1).indices)
        assert torch.allclose(out.values.double(), z.gather(1, out.indices).relu(), atol=1e-4)

    check()
    sae(x, g).fvu.backward()
    opt.step()
    check()
    with torch.no_grad():
        sae.W_enc.data.copy_(torch.randn_like(sae.W_enc))  # bypasses the version counter
        sae.W_dec.mul_(-2.0)
    sae.normalize_decoder()
    check()
    sae.load_state_dict({name: torch.randn_like(p) for name, p in sae.state_dict().items()})
    check()


def pattern_case(n=11, k=4, n_latents=9, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, n_latents - 2, (n, k), generator=gen)  # two latents never used
    indices[0] = indices[0, 0]  # repeats within a row are summed
    weights_ = torch.randn(n, k, generator=gen, dtype=torch.float64)
    table = torch.randn(n_latents, d, generator=gen, dtype=torch.float64)
    dense = torch.randn(n, d, generator=gen, dtype=torch.float64)
    code = torch.zeros(n, n_latents, dtype=torch.float64).index_put_(
        (torch.arange(n).repeat_interleave(k), indices.reshape(-1)), weights_.reshape(-1),
        accumulate=True)
    return kernels.SparsePattern(indices, n_latents), weights_, table, dense, code


def test_sparse_pattern_products_equal_dense_ones():
    pattern, weights_, table, dense, code = pattern_case()
    assert torch.allclose(pattern.gather(weights_, table), code @ table, atol=1e-12)
    assert torch.allclose(pattern.scatter(weights_, dense), code.T @ dense, atol=1e-12)
    row_dots = (table[pattern.indices] * dense[:, None, :]).sum(-1)
    assert torch.allclose(pattern.row_dots(table, dense), row_dots, atol=1e-12)
    assert torch.allclose(pattern._row_dots_bags(table, dense), row_dots, atol=1e-12)
    assert pattern.scatter(weights_, dense)[-2:].eq(0).all()


def test_sparse_backward_equals_dense_autograd():
    pattern, weights_, table, dense, _ = pattern_case()
    W_enc = table.clone().requires_grad_()
    x = dense.clone().requires_grad_()
    b = torch.randn(table.shape[0], dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn_like(table, requires_grad=True)
    with torch.no_grad():
        pre = (x @ W_enc.T + b).gather(1, pattern.indices)
    ours = kernels.selected_preacts(pre, pattern, x, W_enc, b)
    out = kernels.sparse_decode(ours.relu(), pattern, W_dec)
    (out * weights_.sum(1, keepdim=True)).sum().backward()
    grads = [t.grad.clone() for t in (x, W_enc, b, W_dec)]
    for t in (x, W_enc, b, W_dec):
        t.grad = None
    ref_pre = (x @ W_enc.T + b).gather(1, pattern.indices)
    code = torch.zeros(len(x), table.shape[0], dtype=torch.float64).scatter_add(
        1, pattern.indices, ref_pre.relu())
    ((code @ W_dec) * weights_.sum(1, keepdim=True)).sum().backward()
    for ours_grad, t in zip(grads, (x, W_enc, b, W_dec)):
        assert torch.allclose(ours_grad, t.grad, atol=1e-10)


def test_sparse_products_never_read_uninitialised_memory(monkeypatch):
    """Uninitialised memory can hold NaN bit patterns, and a sparse product with beta = 0 still
    propagates NaN from its input (this once made training diverge at random). Any buffer the
    kernels allocate is filled with NaN here: the results must not change."""
    gen = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 40, (16, 4), generator=gen)
    table = torch.randn(40, 8, generator=gen)
    dense = torch.randn(16, 8, generator=gen)
    weights = torch.randn(16, 4, generator=gen)
    expected_dots = (table[indices] * dense[:, None, :]).sum(-1)
    expected_scatter = torch.zeros(40, 8).index_add_(
        0, indices.reshape(-1), (weights[..., None] * dense[:, None, :]).reshape(-1, 8))
    real_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *a, **kw: real_new_empty(self, *a, **kw).fill_(float("nan"))
                        if kw.get("dtype", self.dtype).is_floating_point
                        else real_new_empty(self, *a, **kw))
    pattern = kernels.SparsePattern(indices, 40)
    assert torch.allclose(pattern.row_dots(table, dense), expected_dots, atol=1e-5)
    assert torch.allclose(pattern.scatter(weights, dense), expected_scatter, atol=1e-5)
