"""The Fisher-weighted reconstruction loss (`fisher_coef`, lambda) against independent
references: a float64 loss written here and its autograd gradient, planted data on which only
the loss gradient's direction tells the objectives apart, and training runs that must produce
the gradient the term needs (streaming, from a store, on two ranks)."""

import json
from functools import partial

import conftest
import pytest
import torch
from safetensors.torch import load_file

from gsae import SAE, GsaeError, SAEConfig
from gsae.batch import Batch
from gsae.cli import main
from gsae.train import TrainConfig, Trainer, training_loss, variant_name

pytestmark = pytest.mark.usefixtures("one_thread")


make_sae = partial(conftest.make_sae, dtype=torch.float64, fisher_coef=0.5)


def random_batch(d_in=12, n=40, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64) * 2 + 5
    g = torch.randn(n, d_in, generator=gen, dtype=torch.float64) * 0.3
    return x, g


def reference_loss(sae, x, g, dead, k_aux, auxk_coef):
    """FVU + lambda FVU_g + auxk_coef AuxK in float64, every latent dense, plain autograd."""
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    z = (x - b_dec) @ W_enc.T + b_enc
    score = z + sae.beta * z * (g @ W_dec.T).abs().detach()
    idx = score.detach().topk(sae.k, dim=1).indices
    code = torch.zeros_like(z).scatter(1, idx, torch.relu(z.gather(1, idx)))
    x_hat = code @ W_dec + b_dec
    centered = x - x.mean(0)
    fvu = ((x - x_hat) ** 2).sum() / (centered ** 2).sum()
    along_g = sum((gi @ ri) ** 2 for gi, ri in zip(g, x - x_hat))  # row by row
    fvu_g = along_g / sum((gi @ ci) ** 2 for gi, ci in zip(g, centered))
    residual = (x - x_hat).detach()
    masked = z.masked_fill(~dead, float("-inf"))
    aux_idx = masked.detach().topk(min(k_aux, int(dead.sum())), dim=1).indices
    aux_code = torch.zeros_like(z).scatter(1, aux_idx, torch.relu(z.gather(1, aux_idx)))
    aux = ((aux_code @ W_dec - residual) ** 2).sum() / (centered ** 2).sum()
    return fvu + sae.cfg.fisher_coef * fvu_g + auxk_coef * aux, fvu_g


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_the_loss_and_its_gradient_equal_a_float64_reference(beta):
    sae = make_sae(beta=beta)
    x, g = random_batch()
    dead = torch.zeros(sae.n_latents, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, g, dead_mask=dead, k_aux=7)
    loss = training_loss(out, sae.cfg, auxk_coef=1 / 32)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    expected, fvu_g = reference_loss(sae, x, g, dead, k_aux=7, auxk_coef=1 / 32)
    assert 0.05 < fvu_g.item() and sae.cfg.fisher_coef * fvu_g.item() > 0.1 * loss.item()
    torch.testing.assert_close(out.fvu_g, fvu_g, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    expected.backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_the_fisher_term_is_one_for_the_mean_and_has_no_units():
    """Reconstructing every row by the batch mean gives FVU = FVU_g = 1 (as computed by hand);
    scaling g or shifting x changes nothing."""
    sae = make_sae()
    x, g = random_batch()
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)  # no latent fires: x_hat = b_dec
        sae.b_dec.copy_(x.mean(0))
    out = sae(x, g)
    assert out.fvu.item() == pytest.approx(1.0, rel=1e-12)
    assert out.fvu_g.item() == pytest.approx(1.0, rel=1e-12)
    sae = make_sae()
    base = sae(x, g).fvu_g.item()
    assert sae(x, 7.0 * g).fvu_g.item() == pytest.approx(base, rel=1e-12)
    with torch.no_grad():
        sae.b_dec.add_(100.0)
    assert sae(x + 100.0, g).fvu_g.item() == pytest.approx(base, rel=1e-9)


def test_parts_of_a_batch_add_up_to_the_whole():
    """Data-parallel ranks normalise their rows by the whole batch's Fisher variance: the
    parts' Fisher terms add up to the whole batch's."""
    from gsae.sae import fisher_variance_of, total_variance_of

    sae = make_sae()
    x, g = random_batch()
    whole = sae(x, g).fvu_g
    norms = {"variance": total_variance_of(x), "fisher_variance": fisher_variance_of(x, g)}
    parts = [sae(x[rows], g[rows], **norms).fvu_g for rows in (slice(0, 17), slice(17, None))]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-12, atol=0)


def test_a_positive_fisher_coef_needs_the_gradient():
    sae = make_sae()
    x, _ = random_batch()
    with pytest.raises(GsaeError, match="fisher_coef 0.5 needs the loss gradient g"):
        training_loss(sae(x), sae.cfg, auxk_coef=1 / 32)
    sae.cfg.fisher_coef = 0.0  # lambda 0 trains without it, as before
    training_loss(sae(x), sae.cfg, auxk_coef=1 / 32)


# ------------------------------------------------------------------------ planted data


def planted_directions(d=32, n_features=32, seed=0):
    """32 unit features orthogonal to a unit direction v, which carries the loss gradient."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    v /= v.norm()
    features = torch.randn(n_features, d, generator=gen, dtype=torch.float64)
    features -= (features @ v)[:, None] * v
    features /= features.norm(dim=1, keepdim=True)
    return features.float(), v.float()


def planted_batches(features, v, n, rows=256, active=3, seed=1):
    """x = 3 of the features with coefficients in [1, 3] (almost all the variance) plus
    c v with c in [0.1, 0.5] (under 1% of it); g = r v, r standard normal: the loss depends
    on x only along v."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        which = torch.rand(rows, len(features), generator=gen).argsort(1)[:, :active]
        coef = torch.rand(rows, active, generator=gen) * 2 + 1
        along_v = torch.rand(rows, 1, generator=gen) * 0.4 + 0.1
        x = torch.einsum("na,nad->nd", coef, features[which]) + along_v * v
        batches.append(Batch(x, torch.randn(rows, 1, generator=gen) * v, "h"))
    return batches


def planted_run(tmp_path, fisher_coef, beta):
    """16 latents for 32 features (not enough for all): trained with and without lambda."""
    features, v = planted_directions()
    chunks = [{"h": b} for b in planted_batches(features, v, 100)]
    cfg = TrainConfig(out=str(tmp_path / f"planted-{fisher_coef}-{beta}"), tokens=256 * 100,
                      batch_tokens=256, shuffle_tokens=1024, lr=1e-2, warmup_steps=5,
                      dead_tokens=1000, checkpoint_every=10**6, log_every=10)
    sae = SAE(SAEConfig(n_latents=16, k=6, beta=beta, fisher_coef=fisher_coef), 32)
    Trainer.create([(sae, "h")], cfg).fit(chunks)
    (held_out,) = planted_batches(features, v, 1, rows=4096, seed=2)
    with torch.no_grad():
        fvu_g = sae(held_out.x, held_out.g).fvu_g.item()
    return (sae.W_dec @ v).abs().max().item(), fvu_g


@pytest.mark.parametrize("beta", [0.0, 10.0])
def test_the_fisher_term_spends_latents_on_the_gradients_direction(tmp_path, beta):
    """Without the Fisher term no decoder row points along v (it carries under 1% of the
    variance) and the error along v is that of the mean; with it one does, and the error along
    v falls (to almost nothing when the g-SAE's selection also sees g)."""
    # Measured here: cosine 0.02-0.09 and FVU_g 1.00-1.20 without the term, cosine 0.82-0.90
    # with it, over four seeds of the data and the weights; FVU_g 0.29-0.40 (TopK) and
    # 0.002-0.014 (g-SAE).
    cosine, fvu_g = planted_run(tmp_path, 0.0, beta)
    assert cosine < 0.2 and fvu_g > 0.95
    cosine, fvu_g = planted_run(tmp_path, 1.0, beta)
    assert cosine > 0.75 and fvu_g < (0.6 if beta == 0 else 0.05)


# ------------------------------------------------------------------- runs and folders


def test_folder_names_and_configs_without_the_term_stay_as_they_were(tmp_path):
    assert variant_name(SAEConfig()) == "k32-beta100-z-x16-s0"
    assert variant_name(SAEConfig(beta=0.0, fisher_coef=0.1)) == "k32-beta0-f0.1-z-x16-s0"
    folder = SAE(SAEConfig(n_latents=24, k=3, fisher_coef=0.25), 8).save(tmp_path / "new")
    assert json.loads((folder / "cfg.json").read_text())["fisher_coef"] == 0.25
    assert SAE.load(folder).cfg.fisher_coef == 0.25
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["fisher_coef"]  # as gsae wrote cfg.json before the term existed
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert SAE.load(folder).cfg.fisher_coef == 0.0


def test_runs_recorded_before_the_term_are_the_same_runs():
    """At lambda 0 a run's record and identity hold no trace of the setting (so a run recorded
    before it existed resumes as the same run); above 0 they record it."""
    from gsae.config import sweep_configs
    from gsae.pipeline import TrainRun, run_record

    run = TrainRun()
    run.sae.beta = [0.0, 100.0]
    text = json.dumps(run_record(run, sweep_configs(run.sae), {})["recorded"])
    assert "fisher" not in text and '"beta": 0.0' in text
    run.sae.fisher_coef = [0.0, 0.5]
    recorded = run_record(run, sweep_configs(run.sae), {})["recorded"]
    assert recorded["identity"]["settings"]["sae"]["fisher_coef"] == [0.0, 0.5]
    assert [s.get("fisher_coef") for s in recorded["saes"]] == [None, 0.5, None, 0.5]


def tiny_args(corpus, out, tokens=768):
    return ["--model", "tiny-llama", "--dataset", corpus, "--context_size", "32", "--hooks",
            "1", "--lm_batch_size", "4", "--tokens", str(tokens), "--batch_tokens", "128",
            "--shuffle_tokens", "256", "--expansion_factor", "2", "--k", "4", "--out", str(out)]


def fisher_logged(folder):
    return [json.loads(line).get("fvu_g") for line in (folder / "log.jsonl").open()]


def test_a_topk_sweep_with_the_term_streams_the_gradient(corpus, tmp_path):
    """beta 0 alone needs no gradient; with lambda > 0 in the sweep the model's backward pass
    runs, and both SAEs log their Fisher term."""
    out = tmp_path / "run"
    assert main(["train", *tiny_args(corpus, out), "--beta", "0",
                 "--fisher_coef", "0,0.5"]) == 0
    plain, fisher = (out / "model.layers.1" / name for name in
                     ("k4-beta0-z-x2-s0", "k4-beta0-f0.5-z-x2-s0"))
    assert json.loads((fisher / "cfg.json").read_text())["fisher_coef"] == 0.5
    assert all(v is not None and v > 0 for v in fisher_logged(plain) + fisher_logged(fisher))
    record = json.loads((out / "run.json").read_text())["recorded"]
    assert [s.get("fisher_coef") for s in record["saes"]] == [None, 0.5]


def test_a_store_run_with_the_term(corpus, tmp_path):
    store = tmp_path / "store"
    assert main(["cache", "--model", "tiny-llama", "--dataset", corpus, "--context_size", "32",
                 "--hooks", "1", "--store", str(store), "--tokens", "900",
                 "--dtype", "float32"]) == 0
    out = tmp_path / "run"
    assert main(["train", *tiny_args(corpus, out), "--store", str(store), "--beta", "0,10",
                 "--fisher_coef", "1"]) == 0
    for name in ("k4-beta0-f1-z-x2-s0", "k4-beta10-f1-z-x2-s0"):
        logged = fisher_logged(out / "model.layers.1" / name)
        assert logged and all(v is not None for v in logged)


def test_two_ranks_train_the_fisher_saes_of_one_process(corpus, tmp_path):
    """Data-parallel ranks normalise by the whole batch's Fisher variance: two ranks end with
    the weights one process trains."""
    from test_distributed import finish, torchrun

    def args(out):
        return [*tiny_args(corpus, out, tokens=1536), "--beta", "0", "--fisher_coef", "2",
                "--lr", "3e-3"]

    finish(torchrun(args(tmp_path / "two")))
    assert main(["train", *args(tmp_path / "one")]) == 0
    name = "model.layers.1/k4-beta0-f2-z-x2-s0/sae.safetensors"
    two, one = load_file(str(tmp_path / "two" / name)), load_file(str(tmp_path / "one" / name))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
