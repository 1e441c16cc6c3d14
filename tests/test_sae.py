"""The SAE against a naive dense implementation of method.md."""

import json

import pytest
import torch

from gsae import SAE, GsaeError, SAEConfig, kernels


def make_sae(d_in=12, n_latents=48, k=5, beta=0.0, value_mode="z", seed=0):
    cfg = SAEConfig(n_latents=n_latents, k=k, beta=beta, value_mode=value_mode, seed=seed)
    sae = SAE(cfg, d_in, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move away from the symmetric init so encoder != decoder
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=gen, dtype=torch.float64))
        sae.b_enc.copy_(0.1 * torch.randn(n_latents, generator=gen, dtype=torch.float64))
        sae.b_dec.copy_(0.2 * torch.randn(d_in, generator=gen, dtype=torch.float64))
    return sae


def naive(sae, x, g=None, dead=None, k_aux=0):
    """Dense reference: every latent computed, dense code, dense decode, plain autograd."""
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    z = (x - b_dec) @ W_enc.T + b_enc
    score = z
    if g is not None and sae.beta > 0:
        score = z + sae.beta * z * (g @ W_dec.T).abs().detach()
    idx = score.detach().topk(sae.k, dim=1).indices
    chosen = (score if sae.cfg.value_mode == "score" else z).gather(1, idx)
    code = torch.zeros_like(z).scatter(1, idx, torch.relu(chosen))
    x_hat = code @ W_dec + b_dec
    total_var = ((x - x.mean(0)) ** 2).sum()
    fvu = ((x - x_hat) ** 2).sum() / total_var
    aux = torch.zeros((), dtype=x.dtype)
    if dead is not None and dead.any():
        residual = (x - x_hat).detach()
        masked = z.masked_fill(~dead, float("-inf"))
        aidx = masked.detach().topk(min(k_aux, int(dead.sum())), dim=1).indices
        acode = torch.zeros_like(z).scatter(1, aidx, torch.relu(z.gather(1, aidx)))
        aux = ((acode @ W_dec - residual) ** 2).sum() / total_var
    return idx, code, x_hat, fvu, aux


def sorted_selection(values, indices):
    order = indices.argsort(1)
    return values.gather(1, order), indices.gather(1, order)


def random_batch(d_in=12, n=40, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64) * 2
    g = torch.randn(n, d_in, generator=gen, dtype=torch.float64) * 0.5
    return x, g


@pytest.mark.parametrize("value_mode", ["z", "score"])
@pytest.mark.parametrize("beta", [0.0, 0.7, 5.0])
def test_encode_matches_naive(beta, value_mode):
    sae = make_sae(beta=beta, value_mode=value_mode)
    x, g = random_batch()
    values, indices, _ = sae.encode(x, g)
    idx_ref, code_ref, x_hat_ref, _, _ = naive(sae, x, g)
    v, i = sorted_selection(values, indices)
    assert torch.equal(i, idx_ref.sort(1).values)
    assert torch.allclose(v, code_ref.gather(1, i), atol=1e-12)
    assert torch.allclose(sae.decode(values, indices), x_hat_ref, atol=1e-12)


def test_gradient_changes_the_winner_hand_computed():
    # Two latents along the axes; latent 0 has the larger activation, latent 1 the larger
    # gradient effect. z = (1.0, 0.9); |W_dec g| = (0, 1); with beta = 1 the scores are
    # s = (1.0, 0.9 + 0.9 * 1) = (1.0, 1.8).
    cfg = SAEConfig(n_latents=2, k=1, beta=1.0)
    sae = SAE(cfg, 2, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2, dtype=torch.float64))
        sae.W_dec.copy_(torch.eye(2, dtype=torch.float64))
    x = torch.tensor([[1.0, 0.9]], dtype=torch.float64)
    g = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    assert sae.encode(x).indices.item() == 0  # TopK / gradient-free: latent 0
    values, indices, effect = sae.encode(x, g)
    assert indices.item() == 1 and values.item() == pytest.approx(0.9)
    assert effect.item() == pytest.approx(1.0)
    sae.cfg.value_mode = "score"
    values, indices, _ = sae.encode(x, g)
    assert indices.item() == 1 and values.item() == pytest.approx(1.8)


def test_beta_zero_is_plain_topk_whatever_the_gradient():
    sae = make_sae(beta=0.0)
    x, g = random_batch()
    with_grad = sae.encode(x, g)
    without = sae.encode(x)
    plain_topk = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).topk(sae.k, dim=1)
    for out in (with_grad, without):
        v, i = sorted_selection(out.values, out.indices)
        v_ref, i_ref = sorted_selection(torch.relu(plain_topk.values), plain_topk.indices)
        assert torch.equal(i, i_ref) and torch.allclose(v, v_ref.detach())


def test_sparse_decode_equals_dense_decode():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(30, 7, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, 30, (9, 4), generator=gen)
    vals = torch.rand(9, 4, generator=gen, dtype=torch.float64)
    dense = torch.zeros(9, 30, dtype=torch.float64).scatter_add(1, idx, vals)
    assert torch.allclose(kernels.sparse_decode(vals, idx, W), dense @ W, atol=1e-12)


@pytest.mark.parametrize("value_mode", ["z", "score"])
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_loss_gradients_match_dense_autograd(beta, value_mode):
    sae = make_sae(beta=beta, value_mode=value_mode)
    x, g = random_batch()
    dead = torch.zeros(sae.n_latents, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, g, dead_mask=dead, k_aux=7)
    (out.fvu + out.auxk_loss / 32).backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    _, _, _, fvu, aux = naive(sae, x, g, dead, k_aux=7)
    assert torch.allclose(out.fvu, fvu) and torch.allclose(out.auxk_loss, aux)
    assert aux.item() > 0
    (fvu + aux / 32).backward()
    for name, p in sae.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-10), name


def test_fvu_is_around_the_mean():
    sae = make_sae()
    x, _ = random_batch()
    x = x + 100.0  # a large offset must not change the denominator
    out = sae(x)
    expected = ((x - out.x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert torch.allclose(out.fvu, expected)


def test_remove_parallel_grads_and_normalize():
    sae = make_sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grads()
    dots = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert dots.abs().max() < 1e-12
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.n_latents, dtype=torch.float64))


def test_geometric_median_init():
    sae = make_sae(d_in=2)
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]], dtype=torch.float64)
    sae.init_b_dec(pts, iters=500)
    # The geometric median minimises the sum of distances; an outlier barely moves it.
    def total(c):
        return (pts - c).norm(dim=1).sum()
    assert sae.b_dec.norm() < 1.0
    for delta in ([1e-3, 0], [0, 1e-3], [-1e-3, 0], [0, -1e-3]):
        assert total(sae.b_dec) <= total(sae.b_dec + torch.tensor(delta, dtype=torch.float64))
    sae.init_b_dec(pts, method="mean")
    assert torch.allclose(sae.b_dec, pts.mean(0))


def test_save_load_round_trip(tmp_path):
    sae = make_sae(beta=3.0, value_mode="score")
    sae.metadata = {"hook": "model.layers.1"}
    sae.save(tmp_path / "s")
    loaded = SAE.load(tmp_path / "s")
    for name, p in sae.named_parameters():
        assert torch.equal(p, getattr(loaded, name))
    assert loaded.cfg == sae.cfg and loaded.metadata == sae.metadata
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["d_in"] == 12 and cfg["n_latents"] == 48 and cfg["beta"] == 3.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "k must be between 1"),
        ({"k": 49, "n_latents": 48}, "k must be between 1"),
        ({"beta": -1.0}, "beta must be"),
        ({"beta": float("nan")}, "beta must be"),
        ({"value_mode": "max"}, "value_mode must be one of"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(GsaeError, match=message):
        SAE(SAEConfig(**{"n_latents": 48, **kwargs}), 12)


def test_bad_input_shape_and_folder(tmp_path):
    sae = make_sae()
    with pytest.raises(GsaeError, match=r"x must have shape \[N, 12\]"):
        sae.encode(torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(GsaeError, match="not a gsae SAE folder"):
        SAE.load(tmp_path)
