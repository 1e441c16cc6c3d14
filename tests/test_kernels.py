"""The kernels against naive dense references."""

import math

import pytest
import torch
import torch.nn.functional as F

from gsae import SAE, SAEConfig, kernels, private_ops
from gsae.private_ops import DenseLinear, bf16_products_fast
from gsae.screen import BF16_UNIT, ScreenedScorer, SplitProduct, split_products_as_modelled, upper
from gsae.topk import Exact, certified_top, top_m

needs_onednn = pytest.mark.skipif(not private_ops.works("onednn_linear"),
                                  reason="no working oneDNN linear in this torch")
needs_split_model = pytest.mark.skipif(
    not split_products_as_modelled(),
    reason="this machine's bfloat16 products do not follow the screen's error model, so the "
    "screen is never used here")


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


def reference_top(scores, k):
    """The k best columns of each row: larger score first, lower index among equal scores."""
    rows = [sorted(range(len(row)), key=lambda i: (-row[i], i))[:k] for row in scores.tolist()]
    return torch.tensor(rows)


@pytest.fixture(params=["always", "never"], ids=["bf16 screen", "dense"])
def screen(request, monkeypatch):
    """Run a selection test with the bfloat16 screen forced on, and with it off."""
    if request.param == "always" and not split_products_as_modelled():
        pytest.skip("this machine's bfloat16 products do not follow the screen's error model")
    monkeypatch.setattr(kernels, "SCREEN", request.param)
    assert kernels.screens(torch.zeros(1, 1)) == (request.param == "always")
    return request.param


@pytest.fixture(params=[1 << 30, 3 * 40 * 8], ids=["one block", "blocks of 3 rows"])
def block_bytes(request, monkeypatch):
    """One block, or blocks of 3 rows of 40 latents (of a row or two for wider SAEs), for
    the dense pass (8-byte scores) and the screen (2-byte scores) alike."""
    monkeypatch.setattr(kernels, "BLOCK_BYTES", request.param)
    monkeypatch.setattr(kernels, "SCREEN_BLOCK_BYTES", request.param // 4)
    return request.param


def public_torch_only(monkeypatch):
    """Report every private torch op unavailable, as on a torch or CPU without them, and make
    each fail if it is called anyway."""
    def called(*args):
        raise AssertionError("a private torch op ran although the guard said no")

    monkeypatch.setattr(private_ops, "works", lambda op: False)
    for name in ("_onednn_pack", "_onednn_linear", "_embedding_bag_row_dots"):
        monkeypatch.setattr(private_ops, name, called)


@pytest.fixture(params=["private", "public"], ids=["private torch ops", "public torch only"])
def torch_ops(request, monkeypatch):
    """Run a test with torch's private ops where they work here, and with public torch only."""
    if request.param == "public":
        public_torch_only(monkeypatch)
    return request.param


@pytest.mark.parametrize("b_shift", [0.0, -100.0], ids=["mixed signs", "all z negative"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 30.0, 1e4])
def test_select_equals_dense_topk(block_bytes, screen, beta, b_shift):
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


def test_aux_selection_is_the_top_dead_latents(block_bytes, screen):
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
    linear = DenseLinear(W_enc, b_enc, rows=32)
    assert linear.packed is not None
    reference = F.linear(x.double(), W_enc.double(), b_enc.double())
    for block in (slice(0, 32), slice(32, 64), slice(64, 70)):
        out = linear(x[block])
        assert out.dtype == torch.float32
        err = (out.double() - reference[block]).abs().max() / reference[block].abs().max()
        assert err < 1e-5
    no_bias = DenseLinear(W_enc, None, rows=x.shape[0])(x)
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


def test_weight_changes_are_seen_at_once(screen):
    """Products use the weights as they are at each call: nothing cached can go stale."""
    sae = SAE(SAEConfig(n_latents=64, k=4, beta=5.0), 16)
    x, g = inputs(n=20, d_in=16, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=0.5, fused=True)
    gen = torch.Generator().manual_seed(8)

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
        # .data bypasses the version counter
        sae.W_enc.data.copy_(torch.randn(sae.W_enc.shape, generator=gen))
        sae.W_dec.mul_(-2.0)
    sae.normalize_decoder()
    check()
    sae.load_state_dict({name: torch.randn(p.shape, generator=gen)
                         for name, p in sae.state_dict().items()})
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


def test_sparse_pattern_products_equal_dense_ones(torch_ops):
    pattern, weights_, table, dense, code = pattern_case()
    assert torch.allclose(pattern.gather(weights_, table), code @ table, atol=1e-12)
    assert torch.allclose(pattern.scatter(weights_, dense), code.T @ dense, atol=1e-12)
    row_dots = (table[pattern.indices] * dense[:, None, :]).sum(-1)
    assert torch.allclose(pattern.row_dots(table, dense), row_dots, atol=1e-12)
    assert pattern.scatter(weights_, dense)[-2:].eq(0).all()


def test_sparse_backward_equals_dense_autograd(torch_ops):
    pattern, weights_, table, dense, _ = pattern_case()
    W_enc = table.clone().requires_grad_()
    x = dense.clone().requires_grad_()
    gen = torch.Generator().manual_seed(7)
    b = torch.randn(table.shape[0], generator=gen, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(table.shape, generator=gen, dtype=table.dtype, requires_grad=True)
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


def test_sparse_products_never_read_uninitialised_memory(torch_ops, monkeypatch):
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


# ------------------------------------------------- torch's private ops and their public fallbacks


def test_public_fallbacks_equal_the_references_and_the_private_ops(monkeypatch):
    """With every private op reported unavailable, the dense products (float32 and bfloat16)
    and the row dots equal naive float64 references, and the private ops' results, up to
    rounding in their dtype."""
    W, b, _ = weights(n_latents=300, d_in=64, dtype=torch.float32)
    x, g = inputs(n=70, d_in=64, dtype=torch.float32)
    indices = torch.randint(0, 300, (70, 8), generator=torch.Generator().manual_seed(3))
    indices[0] = indices[0, 0]  # repeats within a row

    def products():
        return (DenseLinear(W, b, rows=32)(x),
                DenseLinear(W.bfloat16(), None, rows=32)(x.bfloat16()),
                private_ops.row_dots(W, indices, g))

    private = products()
    public_torch_only(monkeypatch)
    assert DenseLinear(W, b, rows=32).packed is None and not bf16_products_fast()
    public = products()
    references = (F.linear(x.double(), W.double(), b.double()),
                  x.bfloat16().double() @ W.bfloat16().double().T,
                  (W.double()[indices] * g.double()[:, None, :]).sum(-1))
    for ours, theirs, reference, tol in zip(public, private, references, (1e-5, 2**-7, 1e-5)):
        assert ours.dtype == theirs.dtype and ours.shape == reference.shape
        scale = reference.abs().max()
        assert (ours.double() - reference).abs().max() <= tol * scale
        assert (ours.double() - theirs.double()).abs().max() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_with_public_ops_only_is_the_same(screen, monkeypatch, dtype):
    """Integer weights and inputs, which every kernel, private or public, scores exactly: with
    every private op reported unavailable, the selection (with and without a gradient, and its
    AuxK part) equals the reference and the private ops' selection bit for bit."""
    W_enc, b_enc, W_dec, x, g = (t.to(dtype) for t in integer_twins())
    dead = torch.arange(0, 40, 3)

    def selections():
        return [kernels.select(x, W_enc, b_enc, 5, grad=grad, W_dec=W_dec, beta=beta,
                               dead_latents=dead, k_aux=4)
                for grad, beta in ((None, 0.0), (g, 3.0))]

    private = selections()
    public_torch_only(monkeypatch)
    public = selections()
    for ours, theirs, beta in zip(public, private, (0.0, 3.0)):
        _, score = dense_scores(x.double(), W_enc.double(), b_enc.double(), g.double(),
                                W_dec.double(), beta)
        assert torch.equal(ours.indices, reference_top(score, 5))
        for a, b in zip(ours, theirs):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("failure", ["raises", "disagrees"])
@pytest.mark.parametrize("op, private", [("onednn_linear", "_onednn_linear"),
                                         ("onednn_bf16_linear", "_onednn_linear"),
                                         ("row_dots", "_embedding_bag_row_dots")])
def test_the_guard_refuses_a_private_op_that_fails_or_disagrees(monkeypatch, op, private, failure):
    """A private op that raises (missing, or no longer taking these arguments) or that gives
    another result than its public equivalent is reported unavailable, so it is never used."""
    real = getattr(private_ops, private)

    def changed(*args):
        if failure == "raises":
            raise RuntimeError("no such op")
        return real(*args) + 1

    monkeypatch.setattr(private_ops, private, changed)
    assert not private_ops.works.__wrapped__(op)


def test_the_guard_reports_no_bfloat16_hardware_where_torch_cannot_tell(monkeypatch):
    for query in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, query, raising=False)
    assert not private_ops.works.__wrapped__("bf16_hardware")


# ------------------------------------------------------------ exactness of the bfloat16 screen


def clustered_case(dtype, n_rows=24, d_in=16, n_latents=300, spacing=1e-3, seed=0):
    """Latents that are small perturbations of a few directions: per row, dozens of scores lie
    within the bfloat16 error of the k-th best, but apart by far more than `dtype`'s error."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(4, d_in, generator=gen, dtype=torch.float64)
    W = base.repeat(n_latents // 4, 1)
    W += spacing * torch.randn(n_latents, d_in, generator=gen, dtype=torch.float64)
    b = spacing * torch.randn(n_latents, generator=gen, dtype=torch.float64)
    x = torch.randn(n_rows, d_in, generator=gen, dtype=torch.float64)
    return x.to(dtype), W.to(dtype), b.to(dtype)


def bound(x, W):
    """A shift of the biases that makes every score negative."""
    return x.norm(dim=1).max() * W.norm(dim=1).max() + 1


def exact_scores(x, W, b):
    """x W^T + b in float64, one latent at a time (equal rows of W give equal scores)."""
    return (x.double()[:, None, :] * W.double()[None]).sum(-1) + b.double()


def tiny_scale(x):
    return 1e-20 if x.dtype == torch.float64 else 1e-17


SCENARIOS = {
    "near ties": lambda x, W, b: (x, W, b),
    "large norms": lambda x, W, b: (1e4 * x, W, 1e4 * b),
    "all negative": lambda x, W, b: (x, W, b - bound(x, W)),
    "fewer than k positive": lambda x, W, b: (x, W, b - bound(x, W) * (torch.arange(len(b)) >= 3)),
    "exact ties": lambda x, W, b: (x, W[torch.arange(len(W)) // 3 * 3],
                                   b[torch.arange(len(b)) // 3 * 3]),
    # products below bfloat16's normal range in float64 (flushed), just above it in float32
    "tiny norms": lambda x, W, b: (tiny_scale(x) * x, tiny_scale(x) * W, tiny_scale(x)**2 * b),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_selection_is_exact_on_adversarial_inputs(block_bytes, screen, scenario, dtype):
    spacing = 1e-3 if dtype == torch.float32 else 1e-8  # far above dtype's rounding error
    x, W, b = SCENARIOS[scenario](*clustered_case(dtype, spacing=spacing))
    for k in (1, 8, 40):
        sel = kernels.select(x, W, b, k)
        scores = exact_scores(x, W, b)
        assert same_set(sel.indices, reference_top(scores, k)), (scenario, k)
        expected = scores.gather(1, sel.indices)
        assert torch.allclose(sel.preacts.double(), expected, rtol=1e-5, atol=0)


def aligned_rounding_case(dtype, n_fillers=40):
    """A latent whose bfloat16 rounding hides most of its score, behind decoys that bfloat16
    ranks higher but that truly score lower.

    x is all ones (exact in bfloat16). Latent 0 is (1 + b) on the first half and -(1 - b/2) on
    the second, with b = 0.99 2^-8: every entry rounds towards zero, all errors align with x,
    so its bfloat16 pre-activation is 0 while its true one is 48 b (about 0.186), at 95% of the
    Cauchy-Schwarz bound. Decoy j is (1 + j 2^-7) on the first entry and +-1 elsewhere, exact
    in bfloat16: it scores j 2^-7 both ways, below latent 0 for j <= 23. Fillers score -10.
    """
    d_half, b = 32, 0.99 * 2.0**-8
    signs = torch.cat([torch.ones(d_half), -torch.ones(d_half)]).double()
    hidden = torch.cat([torch.full((d_half,), 1 + b), torch.full((d_half,), -(1 - b / 2))])
    decoys = signs.repeat(23, 1)
    decoys[:, 0] += torch.arange(1, 24).double() * 2.0**-7
    fillers = -signs.abs().repeat(n_fillers, 1) * 10 / (2 * d_half)
    W = torch.cat([hidden.double()[None], decoys, fillers])
    x = torch.ones(3, 2 * d_half, dtype=torch.float64)
    return x.to(dtype), W.to(dtype), torch.zeros(len(W), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_screen_finds_a_latent_hidden_by_aligned_rounding(screen, dtype):
    x, W, b = aligned_rounding_case(dtype)
    if screen == "always":  # the case is adversarial for the screen: check its premise
        approx = (x.bfloat16().float() @ W.bfloat16().float().T)[0]
        assert approx[0] == 0 and (approx[1:24] > 0).all()
    for k in (1, 2):
        sel = kernels.select(x, W, b, k)
        assert (sel.indices == 0).any(dim=1).all()
        assert same_set(sel.indices, reference_top(exact_scores(x, W, b), k))


def integer_twins(n_latents=40, d_in=9, n=30):
    """Weights and inputs of small integers, latents 2i and 2i + 1 equal: every product and sum
    is an exact integer in float32 and float64, whatever order a kernel adds in, so equal
    latents score equal to the last bit on every CPU (and so do many unequal ones)."""
    gen = torch.Generator().manual_seed(0)

    def ints(*shape):
        return torch.randint(-4, 5, shape, generator=gen).double()

    twin = torch.arange(n_latents) // 2 * 2
    W_enc, b_enc, W_dec = ints(n_latents, d_in), ints(n_latents), ints(n_latents, d_in)
    return W_enc[twin], b_enc[twin], W_dec[twin], ints(n, d_in), ints(n, d_in)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_breaks_exact_ties_by_lower_index(screen, dtype):
    """Scores equal to the last bit: the lower index wins, with and without a gradient. Exact
    integer arithmetic makes the ties independent of the kernels this CPU picks."""
    W_enc, b_enc, W_dec, x, g = (t.to(dtype) for t in integer_twins())
    for grad, beta in ((None, 0.0), (g, 3.0)):
        sel = kernels.select(x, W_enc, b_enc, 5, grad=grad, W_dec=W_dec, beta=beta)
        _, score = dense_scores(x.double(), W_enc.double(), b_enc.double(), g.double(),
                                W_dec.double(), beta)
        assert same_set(sel.indices, reference_top(score, 5))
        for row in sel.indices.tolist():  # the second of two equal latents only with the first
            assert all(i - 1 in row for i in row if i % 2)


def test_select_picks_a_top_k_among_general_twins(screen):
    """Equal latents with general values may score apart by a rounding on some CPUs (a kernel's
    summation order can depend on a row's place in memory), so only the top k up to rounding
    is guaranteed: the selected scores are the k best."""
    W_enc, b_enc, W_dec = weights(n_latents=40, d_in=9)
    twin = torch.arange(40) // 2 * 2
    W_enc, b_enc, W_dec = W_enc[twin], b_enc[twin], W_dec[twin]
    x, g = inputs(n=30, d_in=9)
    for grad, beta in ((None, 0.0), (g, 3.0)):
        sel = kernels.select(x, W_enc, b_enc, 5, grad=grad, W_dec=W_dec, beta=beta)
        _, score = dense_scores(x, W_enc, b_enc, grad, W_dec, beta)
        chosen = score.gather(1, sel.indices).sort(1, descending=True).values
        best = score.topk(5, dim=1).values
        assert torch.allclose(chosen, best, rtol=1e-12, atol=1e-12)
        assert all(len(set(row)) == 5 for row in sel.indices.tolist())


@pytest.mark.parametrize("value_mode", ["z", "score"])
@pytest.mark.parametrize("beta", [0.0, 1.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encode_equals_naive_reference_with_large_gradients(screen, value_mode, beta, dtype):
    """Through the SAE: large ||g|| and beta up to 1e4, both value modes."""
    sae = SAE(SAEConfig(n_latents=96, k=7, beta=beta, value_mode=value_mode, seed=2), 12,
              dtype=dtype)
    x, g = inputs(n=25, d_in=12, dtype=dtype, seed=4)
    g = 1e3 * g
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(96, generator=torch.Generator().manual_seed(5)))
        out = sae.encode(x, g)
    xc = x.double() - sae.b_dec.double()
    z = exact_scores(xc, sae.W_enc, sae.b_enc)
    effect = (g.double() @ sae.W_dec.double().T).abs()
    score = z + beta * z * effect
    assert same_set(out.indices, reference_top(score, 7))
    chosen = (z if value_mode == "z" or beta == 0 else score).gather(1, out.indices)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(out.values.double(), chosen.relu(), rtol=tol, atol=tol)


@pytest.mark.skipif(not bf16_products_fast(), reason="no bfloat16 hardware")
def test_auto_screens_float32_topk_only_where_bfloat16_is_fast(monkeypatch):
    monkeypatch.setattr(kernels, "SCREEN", "auto")
    x = torch.zeros(2, 3)
    assert kernels.screens(x) and kernels.screens(x.double())
    assert not kernels.screens(x.half())


def test_certified_top_needs_the_bound_to_skip_latents():
    """With a bound that rules nothing out, every row ends up looking at all its latents."""
    approx = torch.arange(20.0).repeat(3, 1)
    exact = -approx  # the approximation ranks them exactly backwards
    seen = []

    def rescore(rows, latents):
        seen.append(latents.shape[1])
        picked = exact[rows].gather(1, latents)
        return Exact(picked, picked, None)

    chosen, out = certified_top(approx, 2, lambda rows, v: v + math.inf, rescore,
                                        lambda k: (4, 8))
    assert seen == [4, 8, 20]
    assert same_set(chosen, torch.tensor([[0, 1]] * 3))
    assert torch.equal(out.score.sort(1).values, torch.tensor([[-1.0, 0.0]] * 3))


# ------------------------------------------------------ the g-SAE score through the screen


def gradient_clustered_case(dtype, spacing, n_rows=20, d_in=16, n_latents=240, seed=3):
    """Encoder and decoder rows that are small perturbations of a few directions, so that per
    row dozens of g-SAE scores lie within the bfloat16 error of the k-th best."""
    gen = torch.Generator().manual_seed(seed)
    def clustered():
        base = torch.randn(4, d_in, generator=gen, dtype=torch.float64)
        return base.repeat(n_latents // 4, 1) + spacing * torch.randn(
            n_latents, d_in, generator=gen, dtype=torch.float64)
    W_enc, W_dec = clustered(), clustered()
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    b_enc = spacing * torch.randn(n_latents, generator=gen, dtype=torch.float64)
    x = torch.randn(n_rows, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(n_rows, d_in, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (x, W_enc, b_enc, g, W_dec)]


def exact_gradient_scores(x, W_enc, b_enc, g, W_dec, beta):
    z = exact_scores(x, W_enc, b_enc)
    return z + beta * z * exact_scores(g, W_dec, torch.zeros_like(b_enc)).abs()


GRADIENT_SCENARIOS = {
    "near ties": lambda x, W, b, g: (x, W, b, g),
    "large gradient": lambda x, W, b, g: (x, W, b, 1e4 * g),
    "tiny gradient": lambda x, W, b, g: (x, W, b, 1e-6 * g),
    "large norms": lambda x, W, b, g: (1e4 * x, W, 1e4 * b, g),
    "all negative": lambda x, W, b, g: (x, W, b - bound(x, W), g),
    "fewer than k positive": lambda x, W, b, g: (
        x, W, b - bound(x, W) * (torch.arange(len(b)) >= 3), g),
}


@pytest.mark.parametrize("scenario", GRADIENT_SCENARIOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.5, 100.0])
def test_gradient_selection_is_exact_on_adversarial_inputs(block_bytes, screen, scenario, dtype,
                                                          beta):
    spacing = 1e-3 if dtype == torch.float32 else 1e-8  # far above dtype's rounding error
    x, W_enc, b_enc, g, W_dec = gradient_clustered_case(dtype, spacing)
    x, W_enc, b_enc, g = GRADIENT_SCENARIOS[scenario](x, W_enc, b_enc, g)
    scores = exact_gradient_scores(x, W_enc, b_enc, g, W_dec, beta)
    z = exact_scores(x, W_enc, b_enc)
    for k in (1, 8, 40):
        sel = kernels.select(x, W_enc, b_enc, k, grad=g, W_dec=W_dec, beta=beta)
        assert same_set(sel.indices, reference_top(scores, k)), (scenario, k)
        assert torch.allclose(sel.preacts.double(), z.gather(1, sel.indices), rtol=1e-5,
                              atol=1e-6 * z.abs().max().item())


def random_case(dtype, seed, n_rows=30, d_in=48, n_latents=300):
    """Heavy-tailed inputs and weights over six orders of magnitude, some rows cancelling."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 3, d_in, dtype=torch.float64)[torch.randperm(d_in, generator=gen)]
    W = torch.randn(n_latents, d_in, generator=gen, dtype=torch.float64) * scale
    x = torch.randn(n_rows, d_in, generator=gen, dtype=torch.float64) / scale
    x[: n_rows // 2] -= W[: n_rows // 2] / scale**2  # large, mostly cancelling products
    b = torch.randn(n_latents, generator=gen, dtype=torch.float64) * 10
    return x.to(dtype), W.to(dtype), b.to(dtype)


@needs_split_model
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_split_product_bounds_hold_against_float64(dtype, seed):
    """The documented inequalities, entry by entry, against float64 truth: the shifted product
    bounds every value within the rescoring error from above with no absolute part, and the
    unshifted one is within its `bound` (plus the bfloat16 rounding) of the truth."""
    x, W, b = random_case(dtype, seed)
    truth = exact_scores(x, W, b)
    rescoring = SplitProduct(x, W, b, rows=7).exact_bound[:, None]
    for shifted in (False, True):
        product = SplitProduct(x, W, b, rows=7, shifted=shifted)
        q = torch.cat([product(slice(s, s + 7)) for s in range(0, len(x), 7)]).double()
        if shifted:
            assert (truth + rescoring <= upper(q)).all()
            assert (q <= upper(truth + 2 * product.shift[:, None])).all()
        else:
            rounding = BF16_UNIT / (1 - BF16_UNIT) * q.abs()
            assert ((q - truth).abs() - rounding <= product.bound[:, None] - rescoring).all()
        assert (q.abs() <= product.magnitude[:, None]).all()
    # a row along the longest weight row, where |x . w + b| nears the magnitude bound
    longest = W.norm(dim=1).argmax()
    along = SplitProduct(W[longest][None], W, b, rows=1)
    assert along(slice(0, 1)).double().abs().max() <= along.magnitude[0]
    assert along(slice(0, 1)).double().abs().max() >= 0.5 * along.magnitude[0]


@needs_split_model
@pytest.mark.parametrize("seed", range(3))
def test_screened_score_bound_holds_for_every_latent(seed):
    """`score_bound(v)` bounds the exact score of every latent whose screened score is <= v,
    taking v at each latent's own screened score, for both signs."""
    x, W_enc, b_enc = random_case(torch.float32, seed)
    gen = torch.Generator().manual_seed(seed + 10)
    W_dec = torch.randn(W_enc.shape, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    g = torch.randn(x.shape, generator=gen) * 1e-2
    for beta in (1.0, 1e3):
        scorer = ScreenedScorer(x, W_enc, b_enc, len(x), g, W_dec, beta)
        block = scorer(slice(0, len(x)))
        truth = exact_gradient_scores(x, W_enc, b_enc, g, W_dec, beta)
        rows = torch.arange(len(x))
        for j in range(0, W_enc.shape[0], 7):
            v = block.score[:, j].double()
            assert (truth[:, j] <= block.score_bound(rows, v)).all()
            z_bound = block.z_bound(rows, block.z[:, j].double())
            assert (exact_scores(x, W_enc, b_enc)[:, j] <= z_bound).all()


@pytest.mark.skipif(not bf16_products_fast(), reason="no bfloat16 hardware")
def test_probe_rejects_products_that_break_the_error_model(monkeypatch):
    """Where bfloat16 products run in hardware they follow the model (so the screen is
    available, and the tests that skip without it run); if the hardware rounded more than the
    model allows, the screen must switch itself off."""
    assert split_products_as_modelled.__wrapped__()
    real_call = SplitProduct.__call__
    monkeypatch.setattr(SplitProduct, "__call__",
                        lambda self, block: real_call(self, block) * (1 - 2**-6))
    assert not split_products_as_modelled.__wrapped__()


def hidden_effect_case(dtype):
    """A latent whose gradient effect lives entirely in the parts of W_dec that the three-term
    bfloat16 split leaves out, behind decoys that the screen ranks higher but that truly
    score lower.

    g alternates +1 and -1. Latent 0 pairs entries 1 + r (g = +1) and 1 + r' (g = -1), with
    r = (129 - 7/16) 2^-16 and r' = (129 + 7/16) 2^-16: both round to bfloat16's 129 2^-16, so
    the split's terms cancel exactly (its product is 0), while what it leaves out, -7/16 2^-16
    and +7/16 2^-16, adds up against g to an effect of 8 (7/8) 2^-16, about 1.07e-4. Decoy 1
    has effect 1.0e-4 and twelve decoys 2e-6, all kept by the split. Every z is 1 (W_enc = 0,
    b_enc = 1), so at beta 1e5 latent 0 scores about 11.7, decoy 1 11.0 and the twelve 1.2;
    the rest score 1.
    """
    d_in = 16
    r, r_prime = (129 - 7 / 16) * 2.0**-16, (129 + 7 / 16) * 2.0**-16
    g = torch.tensor([1.0, -1.0] * (d_in // 2), dtype=torch.float64)
    W_dec = torch.zeros(30, d_in, dtype=torch.float64)
    W_dec[0] = torch.tensor([1 + r, 1 + r_prime] * (d_in // 2), dtype=torch.float64)
    W_dec[1, 0] = 1.0e-4
    W_dec[2:14, 0] = 2e-6
    W_enc = torch.zeros(30, d_in, dtype=torch.float64)
    W_enc[5, 0] = 10
    b_enc = torch.ones(30, dtype=torch.float64)
    # Row 0 comes first with another story: latent 5 wins clearly (z = 11) and g is tiny, so
    # its bounds are tight and it settles at once; rows 1 and 2 need their own, wide bounds.
    x = torch.ones(3, d_in, dtype=torch.float64)
    x[1:, 0] = 0
    grads = torch.stack([2.0**-20 * g, g, g])
    return [t.to(dtype) for t in (x, W_enc, b_enc, grads, W_dec)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("one_row_blocks", [False, True], ids=["one block", "a block per row"])
def test_screen_finds_a_gradient_effect_hidden_by_the_split(screen, dtype, one_row_blocks,
                                                             monkeypatch):
    if one_row_blocks:
        monkeypatch.setattr(kernels, "SCREEN_BLOCK_BYTES", 30 * 2)
        monkeypatch.setattr(kernels, "BLOCK_BYTES", 30 * 8)
    x, W_enc, b_enc, g, W_dec = hidden_effect_case(dtype)
    true_effect = exact_scores(g, W_dec, torch.zeros_like(b_enc)).abs()[1]
    assert 1.0e-4 < true_effect[0] < 1.1e-4  # the premise: latent 0 truly wins rows 1 and 2
    if screen == "always":  # and the split's product cannot see it
        product = SplitProduct(g, W_dec, None, rows=3)
        assert product(slice(0, 3))[:, 0].eq(0).all()
    scores = exact_gradient_scores(x, W_enc, b_enc, g, W_dec, 1e5)
    for k in (1, 2):
        sel = kernels.select(x, W_enc, b_enc, k, grad=g, W_dec=W_dec, beta=1e5)
        assert same_set(sel.indices, reference_top(scores, k))
        assert (sel.indices[1:] == 0).any(dim=1).all() and (sel.indices[0] == 5).any()


@needs_split_model
def test_split_product_bound_matches_its_derivation():
    """The error bound's value on an input whose norms are known by hand: x = 3 (100 entries),
    w = 2 (100 entries), b = 0.5, so ||x|| = 30 and ||w|| = 20; 3 * 100 + 3 = 303 columns pad
    to K = 320. Each term of the documented bound is computed here from those numbers."""
    u, u32, u64 = 2.0**-8, 2.0**-24, 2.0**-53
    x = torch.full((2, 100), 3.0)
    W = torch.full((5, 100), 2.0)
    b = torch.full((5,), 0.5)
    gamma = 320 * u32 / (1 - 320 * u32)
    left_out = 3.1 * u * u * 600 + u * u * 0.5
    magnitude = (1 + u) ** 2 * ((1 + 2 * u) * 600 + 0.5)
    underflow = 3.1 * 10 * 2.0**-100 * (20 + 30) + 322 * 2.0**-100
    error = 2 * (left_out + gamma * magnitude + underflow)
    rescoring = 2 * (101 * u32 / (1 - 101 * u32)) * 600.5
    product = SplitProduct(x, W, b, rows=2, shifted=True)
    assert torch.allclose(product.bound, torch.full((2,), error + rescoring, dtype=torch.float64),
                          rtol=1e-4)
    assert (product.shift >= product.bound / (1 - 2 * gamma)).all()
    assert (product.shift <= product.bound * (1 + 3 * u)).all()
    assert torch.allclose(product(slice(0, 2)).double(), 600.5 + product.shift[:, None],
                          rtol=u)
    exact64 = SplitProduct(x.double(), W.double(), b.double(), rows=2).exact_bound
    assert torch.allclose(exact64, torch.full((2,), 2 * 101 * u64 / (1 - 101 * u64) * 600.5,
                                              dtype=torch.float64), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n, m", [(9216, 33), (9216, 48), (640, 40), (640, 41), (1001, 8)])
def test_top_m_finds_the_largest_entries(dtype, n, m):
    """Against `torch.topk`: the same multiset of values per row, each at its column, on rows
    with many exact ties (values on a coarse grid) and with the largest entries crowded into
    one strided group."""
    gen = torch.Generator().manual_seed(n + m)
    scores = (torch.randn(12, n, generator=gen) * 4).round().to(dtype)
    scores[0] = torch.arange(n).to(dtype)  # the largest entries in consecutive columns
    scores[1, :: max(1, n // 16)] = 1000  # ... and in one strided group
    scores[2] = 7  # all equal
    values, columns = top_m(scores, m)
    expected = scores.topk(m, dim=1).values
    assert torch.equal(values.sort(1, descending=True).values, expected)
    assert torch.equal(scores.gather(1, columns), values)
    assert (columns.sort(1).values.diff(dim=1) > 0).all()  # distinct columns



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_screen_accounts_for_entries_too_small_for_bfloat16(screen, dtype):
    """An input entry below bfloat16's normal range meets a huge weight: the product loses it,
    so the bound must not certify a ranking that it decides."""
    x = torch.tensor([[1e-39, 0.0]], dtype=dtype)
    W = torch.zeros(20, 2, dtype=dtype)
    W[0, 0] = 1e12
    b = torch.zeros(20, dtype=dtype)
    b[0], b[1], b[2:11] = 2.5e-27, 3.0e-27, 2.75e-27
    assert kernels.select(x, W, b, 1).indices.tolist() == [[0]]  # 1e-39 * 1e12 + 2.5e-27 wins


def test_screen_keeps_the_low_half_of_the_bias(screen):
    """Biases that differ only below bfloat16's precision decide the ranking here."""
    x = torch.ones(1, 1)
    W = torch.zeros(12, 1)
    W[0] = -99
    b = torch.full((12,), 1.0625)
    b[0], b[1] = 100.24, 1.125  # z = 1.24 (after cancellation), 1.125 and 1.0625
    assert kernels.select(x, W, b, 1).indices.tolist() == [[0]]
    assert kernels.select(x, W, b, 2).indices.sort(1).values.tolist() == [[0, 1]]


def test_screens_consults_the_probe(monkeypatch):
    monkeypatch.setattr(kernels, "SCREEN", "always")
    monkeypatch.setattr(kernels, "split_products_as_modelled", lambda: False)
    assert not kernels.screens(torch.zeros(1, 1))


@needs_split_model
@pytest.mark.parametrize("broken", ["unshifted", "shifted"])
def test_probe_checks_both_kinds_of_product(monkeypatch, broken):
    """An error that breaks the model of one kind of product only is caught: unshifted
    products 2^-6 too large (still below every shifted bound), or shifted ones lacking
    their shift."""
    real_call = SplitProduct.__call__

    def call(self, block):
        q = real_call(self, block)
        shifted = bool(self.shift.abs().sum() > 0)
        if broken == "unshifted" and not shifted:
            return q + q.abs() * 2**-6
        if broken == "shifted" and shifted:
            return q - 2 * self.shift[block, None].to(q.dtype)
        return q

    monkeypatch.setattr(SplitProduct, "__call__", call)
    assert not split_products_as_modelled.__wrapped__()


@needs_split_model
def test_screened_score_bound_holds_near_its_relative_limit():
    """One input dimension, z and |e| near 1 and beta 1: the bound's relative factors are all
    that separates scores, checked for every latent."""
    gen = torch.Generator().manual_seed(7)
    n = 20000
    x = torch.ones(3, 1) + 1e-3 * torch.rand(3, 1, generator=gen)
    W_enc = 1 + 0.01 * torch.rand(n, 1, generator=gen)
    b_enc = 0.01 * torch.rand(n, generator=gen)
    W_dec = torch.where(torch.rand(n, 1, generator=gen) < 0.5, -1.0, 1.0)
    W_dec *= 1 + 0.01 * torch.rand(n, 1, generator=gen)
    g = torch.ones(3, 1)
    rows, columns = torch.arange(3), torch.arange(n).repeat(3, 1)
    block = ScreenedScorer(x, W_enc, b_enc, 3, g, W_dec, 1.0)(slice(0, 3))
    rescored = block.rescore(rows, columns).score.double()
    bound = torch.stack([block.score_bound(rows, block.score[:, j].double()) for j in range(n)], 1)
    assert (rescored <= bound).all()
