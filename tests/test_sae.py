"""The SAE against a naive dense implementation of method.md."""

import json
import os
import re
import stat
import subprocess
import sys
from functools import partial

import conftest
import pytest
import torch
from safetensors.torch import load_file, save_file

from gsae import SAE, GsaeError, Provenance, SAEConfig, kernels
from gsae.sae import WEIGHTS_FILE

make_sae = partial(conftest.make_sae, dtype=torch.float64)


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
    gen = torch.Generator().manual_seed(4)
    for scale in (1.0, 3.0):  # unit rows, as in training, and rows of norm 3
        with torch.no_grad():
            sae.W_dec.mul_(scale)
        grad = torch.randn(sae.W_dec.shape, generator=gen, dtype=sae.W_dec.dtype)
        sae.W_dec.grad = grad.clone()
        sae.remove_parallel_grads()
        rows = sae.W_dec.detach()
        dots = (sae.W_dec.grad * rows).sum(1)
        assert dots.abs().max() < 1e-12
        expected = grad - (grad * rows).sum(1, keepdim=True) / scale**2 * rows
        assert torch.allclose(sae.W_dec.grad, expected, atol=1e-12)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.n_latents, dtype=torch.float64))
    with torch.no_grad():
        sae.W_dec[0] = 0  # a zero row: its gradient passes unchanged, nothing turns NaN
    grad = torch.randn(sae.W_dec.shape, generator=gen, dtype=sae.W_dec.dtype)
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_grads()
    assert torch.equal(sae.W_dec.grad[0], grad[0]) and sae.W_dec.grad.isfinite().all()


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
    sae.provenance = Provenance(hook="model.layers.1", model={"model": "tiny-llama"},
                                context_size=64, skip_first=2)
    sae.save(tmp_path / "s")
    loaded = SAE.load(tmp_path / "s")
    for name, p in sae.named_parameters():
        assert torch.equal(p, getattr(loaded, name))
    assert loaded.cfg == sae.cfg and loaded.provenance == sae.provenance
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["d_in"] == 12 and cfg["n_latents"] == 48 and cfg["beta"] == 3.0
    assert cfg["provenance"]["hook"] == "model.layers.1" and cfg["provenance"]["skip_first"] == 2
    assert "metadata" not in cfg


def test_cfg_json_records_the_real_number_of_latents(tmp_path):
    sae = SAE(SAEConfig(k=4), 8)  # sized by the default expansion factor, 16
    sae.save(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["n_latents"] == 8 * 16
    loaded = SAE.load(tmp_path)
    assert loaded.n_latents == 128 and loaded.cfg == sae.cfg


def test_old_cfg_json_with_metadata_still_loads(tmp_path):
    sae = make_sae()
    sae.save(tmp_path)
    # The layout written before provenance: "metadata", and the config's 0 over n_latents.
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["provenance"]
    cfg.update(n_latents=0, expansion_factor=4,
               metadata={"hook": "model.layers.3", "context_size": 32, "unknown": 1})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded = SAE.load(tmp_path)
    assert loaded.provenance == Provenance(hook="model.layers.3", context_size=32)
    assert loaded.n_latents == 48 and loaded.cfg.expansion_factor == 4


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        make_sae().save(tmp_path / "s")
    finally:
        os.umask(old)
    for name in ("sae.safetensors", "cfg.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "s" / name).st_mode) == 0o640, name
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".")]


def damage(folder, what):
    if what == "nan":
        tensors = load_file(str(folder / "sae.safetensors"))
        tensors["b_enc"][3] = float("nan")
        save_file(tensors, str(folder / "sae.safetensors"))
    elif what == "inf":
        tensors = load_file(str(folder / "sae.safetensors"))
        tensors["W_dec"][0, 0] = float("-inf")
        save_file(tensors, str(folder / "sae.safetensors"))
    elif what == "shape":
        tensors = load_file(str(folder / "sae.safetensors"))
        tensors["W_enc"] = tensors["W_enc"][:, :-1].contiguous()
        save_file(tensors, str(folder / "sae.safetensors"))
    elif what == "cfg":
        text = (folder / "cfg.json").read_text()
        (folder / "cfg.json").write_text(text[: len(text) // 2])
    elif what == "weights":
        data = (folder / "sae.safetensors").read_bytes()
        (folder / "sae.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("what, message", [
    ("nan", r"sae.safetensors: the weights b_enc hold NaN or infinite values"),
    ("inf", r"sae.safetensors: the weights W_dec hold NaN or infinite values"),
    ("shape", r"sae.safetensors: the weights do not fit the config .*W_enc is \[48, 11\], "
              r"expected \[48, 12\]"),
    ("cfg", r"cfg.json is truncated or not valid JSON"),
    ("weights", r"sae.safetensors is damaged or not a safetensors file"),
])
def test_damaged_folders_are_refused_in_one_line(tmp_path, what, message):
    make_sae().save(tmp_path)
    damage(tmp_path, what)
    with pytest.raises(GsaeError, match=message) as err:
        SAE.load(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "^--k must be at least 1, got 0$"),
        ({"k": 49, "n_latents": 48}, "k must be between 1 and the number of latents .48., got 49"),
        ({"beta": -1.0}, "^--beta must be at least 0, got -1.0$"),
        ({"beta": float("nan")}, "^--beta must be a finite number, got nan$"),
        ({"value_mode": "max"}, "^--value_mode must be one of z, score, got 'max'$"),
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


@pytest.mark.parametrize("beta", [0.0, 10.0])
def test_bad_inputs_are_refused(beta):
    sae = make_sae(beta=beta)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    g = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    cases = [
        ((x.float(), g), r"x is float32 on cpu, the SAE float64 on cpu: convert it"),
        ((x, g.float()), r"grad is float32 on cpu, the SAE float64"),
        ((x, g[:5]), r"grad must have shape \[6, 12\], got \[5, 12\]"),
        ((x, g[:, :6]), r"grad must have shape \[6, 12\], got \[6, 6\]"),
        ((x.tolist(), None), r"x must be a torch tensor or numpy array, got list"),
    ]
    for t, bad in ((x, float("nan")), (x, float("inf")), (g, float("nan")), (g, -float("inf"))):
        broken = t.clone()
        broken[2, 7] = bad
        name = "x" if t is x else "grad"
        args = (broken, g) if t is x else (x, broken)
        cases.append((args, f"{name} holds NaN or infinite values"))
    for args, message in cases:
        with pytest.raises(GsaeError, match=message) as err:
            sae.encode(*args)
        assert "\n" not in str(err.value)
    with pytest.raises(GsaeError, match="x holds NaN"):
        sae(x.index_fill(1, torch.tensor([4]), float("nan")), g)  # the training path checks too


def test_overflowing_sum_of_finite_input_is_accepted():
    sae = make_sae()
    x = torch.full((4, 12), 5e306, dtype=torch.float64)  # each finite, the sum is not
    assert not torch.isfinite(x.sum())
    assert torch.isfinite(sae.encode(x).values).all()


def test_numpy_input_is_converted():
    sae = make_sae(beta=10.0)
    gen = torch.Generator().manual_seed(7)
    x, g = torch.randn(5, 12, generator=gen), torch.randn(5, 12, generator=gen)
    got = sae.encode(x.numpy(), g.numpy())  # float32 arrays: cast to the SAE's float64
    want = sae.encode(x.double(), g.double())
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


@pytest.mark.parametrize("change, message", [
    ({"k": None}, "'k' is missing or not a int"),
    ({"k": "four"}, "'k' is missing or not a int"),
    ({"k": True}, "'k' is missing or not a int"),
    ({"beta": "x"}, "'beta' is missing or not a number"),
    ({"d_in": "12"}, "'d_in' is missing or not a int"),
    ({"format_version": 999}, "format_version 999; this gsae reads up to 1"),
    ({"provenance": "x"}, "\"provenance\" must be an object"),
])
def test_hand_edited_cfg_json_is_refused_in_one_line(tmp_path, change, message):
    make_sae().save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    for key, value in change.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(GsaeError, match=re.escape(message)) as err:
        SAE.load(tmp_path)
    assert "\n" not in str(err.value)


def test_kept_values_are_never_negative_when_few_scores_are_positive():
    """With fewer than k positive pre-activations the k slots still hold k latents; the
    negative ones give 0, not a negative value (TopK then ReLU)."""
    sae = SAE(SAEConfig(n_latents=16, k=6, beta=0.0), 4)
    with torch.no_grad():
        sae.b_enc.fill_(-5.0)
        sae.b_enc[:2] = 50.0  # two latents positive for any small x
    x = 0.01 * torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    values, indices, _ = sae.encode(x)
    assert (values >= 0).all() and ((values > 0).sum(1) == 2).all()
    assert {0, 1} <= set(indices[0].tolist())


def test_weights_files_are_byte_identical_across_processes(tmp_path):
    """The same SAE saved by separate processes gives the same bytes (exact resume and study
    reuse compare weights files byte for byte); safetensors orders a metadata map's keys
    differently from one process to the next, so the metadata must not depend on that order."""
    script = ("import sys, torch; from gsae.sae import SAE, SAEConfig; torch.manual_seed(0); "
              "SAE(SAEConfig(n_latents=8, k=2, beta=3.0), 4).save(sys.argv[1])")
    files = []
    for i in range(6):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(i))], check=True)
        files.append((tmp_path / str(i) / WEIGHTS_FILE).read_bytes())
    assert all(f == files[0] for f in files)


def test_the_shared_test_helper_makes_what_it_says():
    """conftest.make_sae: untied weights drawn from their own seed, the last `dead` latents
    never selected with a value > 0, and the provenance it is given (a fresh dict each time)."""
    sae = conftest.make_sae(dead=3, hook="0")
    assert not torch.allclose(sae.W_enc, sae.W_dec)
    assert torch.equal(sae.W_enc, conftest.make_sae(dead=3).W_enc)
    assert not torch.equal(sae.W_enc, conftest.make_sae(weights_seed=7).W_enc)
    out = sae.encode(torch.randn(500, 12, generator=torch.Generator().manual_seed(0)))
    fired = out.indices[out.values > 0]
    assert fired.numel() and fired.max() < sae.n_latents - 3
    other = conftest.make_sae(hook="0")
    assert sae.provenance.model == other.provenance.model == conftest.TINY_MODEL
    assert sae.provenance.model is not other.provenance.model
    spread = conftest.make_sae(weights="spread_bias").b_enc.tolist()
    assert spread[0] == pytest.approx(0.3) and spread[-1] == pytest.approx(-0.3)
