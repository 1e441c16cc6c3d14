"""The evaluation against naive computations on the tiny model, and its known edge cases."""

import json
import math
from dataclasses import asdict
from functools import partial
from pathlib import Path

import conftest
import pytest
import torch

from gsae import SAE, Provenance, SAEConfig
from gsae.cli import main
from gsae.errors import GsaeError
from gsae.evaluate import (
    GRAD_AWARE,
    GRAD_FREE,
    EvalConfig,
    eval_contexts,
    evaluate_contexts,
    format_table,
)
from gsae.hooks import resolve_hook
from gsae.models import ModelConfig, model_identity
from gsae.records import EvalResult
from gsae.source import ActivationSource, SourceConfig, training_positions
from gsae.text import DataConfig, corpus_identity, token_contexts
from gsae.tiny import tiny_llama, tiny_tokenizer

D = 64


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(0, 512, (10, 20), generator=torch.Generator().manual_seed(0))


make_sae = partial(conftest.make_sae, d_in=D, n_latents=256, k=8, beta=2.0, hook="0",
                   weights="noisy_bias")


def by_mode(result, sae_name):
    return {r.mode: asdict(r) for r in result.results if r.sae == sae_name}


# A naive reference: explicit loops over positions, explicit softmaxes, all rows at once ---------


def log_softmax64(logits):
    z = logits.double() - logits.double().max(-1, keepdim=True).values
    return z - z.exp().sum(-1, keepdim=True).log()


def hooked_forward(model, tokens, layer, replace=None, want_grad=False):
    """Logits and the hook output; `replace` maps (b, t) to the row written there."""
    seen = {}

    def hook(_module, _inputs, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        for (b, t), row in (replace or {}).items():
            h[b, t] = row
        if want_grad:
            h = h.detach().requires_grad_(True)
        seen["h"] = h
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.set_grad_enabled(want_grad):
            logits = model(input_ids=tokens).logits
    finally:
        handle.remove()
    return logits, seen["h"]


def naive_evaluation(model, sae, contexts, batch_size, layer, skip, factor):
    """Every reported number, computed the slow and obvious way."""
    T = contexts.shape[1]
    preds = range(skip, T - 1)  # prediction positions p (of token p + 1)
    batches = []
    for tokens in contexts.split(batch_size):
        logits, h = hooked_forward(model, tokens, layer, want_grad=True)
        logp = log_softmax64(logits)
        loss = -sum(logp[b, p, tokens[b, p + 1]] for b in range(len(tokens)) for p in range(T - 1))
        (g,) = torch.autograd.grad(loss, h)
        candidates = [(b, t) for b in range(len(tokens)) for t in range(skip, T - 1)]
        norms = torch.stack([h[b, t].norm() for b, t in candidates]).detach()
        median = norms.sort().values[(len(norms) - 1) // 2]  # the lower median, as torch's
        kept = [c for c, n in zip(candidates, norms) if n <= factor * median]
        batches.append(dict(tokens=tokens, logp=logp.detach(), h=h.detach(), g=g, kept=kept,
                            outliers=len(candidates) - len(kept)))
    x_all = torch.cat([torch.stack([b["h"][c] for c in b["kept"]]) for b in batches])
    mean = x_all.double().mean(0).float()

    def ce_and_kl(batch, replace):
        logits, _ = hooked_forward(model, batch["tokens"], layer, replace)
        logq, logp, tokens = log_softmax64(logits), batch["logp"], batch["tokens"]
        ce = torch.tensor([[-logq[b, p, tokens[b, p + 1]] for p in preds]
                           for b in range(len(tokens))], dtype=torch.float64)
        kl = torch.tensor([[(logp[b, p].exp() * (logp[b, p] - logq[b, p])).sum() for p in preds]
                           for b in range(len(tokens))], dtype=torch.float64)
        return ce, kl

    out = {}
    for mode in (GRAD_AWARE, GRAD_FREE):
        rows, ce, kl, ce_clean, ce_zero, ce_mean, predicted = [], [], [], [], [], [], []
        fired = torch.zeros(sae.n_latents, dtype=torch.bool)
        l0 = []
        for batch in batches:
            x = torch.stack([batch["h"][c] for c in batch["kept"]])
            g = torch.stack([batch["g"][c] for c in batch["kept"]])
            with torch.no_grad():
                values, indices, _ = sae.encode(x, g if mode == GRAD_AWARE else None)
                x_hat = sae.decode(values, indices)
            fired[indices[values > 0]] = True
            l0 += (values > 0).sum(1).tolist()
            rows.append((x, x_hat, g))
            c, k = ce_and_kl(batch, dict(zip(batch["kept"], x_hat)))
            ce.append(c)
            kl.append(k)
            tokens = batch["tokens"]
            ce_clean.append(torch.tensor([[-batch["logp"][b, p, tokens[b, p + 1]] for p in preds]
                                          for b in range(len(tokens))], dtype=torch.float64))
            ce_zero.append(ce_and_kl(batch, {c: torch.zeros(D) for c in batch["kept"]})[0])
            ce_mean.append(ce_and_kl(batch, {c: mean for c in batch["kept"]})[0])
            seq = torch.zeros(len(tokens), dtype=torch.float64)
            for (b, _), xi, xh, gi in zip(batch["kept"], x, x_hat, g):
                seq[b] += (gi.double() * (xh.double() - xi.double())).sum()
            predicted.append(seq)
        x = torch.cat([r[0] for r in rows]).double()
        x_hat = torch.cat([r[1] for r in rows]).double()
        g = torch.cat([r[2] for r in rows]).double()
        ce, kl, ce_clean = torch.cat(ce), torch.cat(kl), torch.cat(ce_clean)
        ce_zero, ce_mean = torch.cat(ce_zero), torch.cat(ce_mean)
        fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        measured = (ce - ce_clean).sum(1)
        predicted = torch.cat(predicted)
        cos = (x * x_hat).sum(1) / (x.norm(dim=1) * x_hat.norm(dim=1))
        out[mode] = {
            "tokens": len(x),
            "outlier_tokens": sum(b["outliers"] for b in batches),
            "ce_tokens": ce.numel(),
            "mse": ((x - x_hat) ** 2).mean().item(),
            "fvu": fvu.item(),
            "explained_variance": 1 - fvu.item(),
            "cosine": cos.mean().item(),
            "l2_ratio": (x_hat.norm(dim=1) / x.norm(dim=1)).mean().item(),
            "l0": sum(l0) / len(l0),
            "ce_clean": ce_clean.mean().item(),
            "ce_spliced": ce.mean().item(),
            "ce_zero_ablation": ce_zero.mean().item(),
            "ce_mean_ablation": ce_mean.mean().item(),
            "ce_recovered_zero": ((ce_zero.mean() - ce.mean()) / (ce_zero.mean()
                                                                  - ce_clean.mean())).item(),
            "ce_recovered_mean": ((ce_mean.mean() - ce.mean()) / (ce_mean.mean()
                                                                  - ce_clean.mean())).item(),
            "kl": kl.mean().item(),
            "first_order_abs": (g * (x - x_hat)).sum(1).abs().mean().item(),
            "first_order_ce_change": (predicted.sum() / ce.numel()).item(),
            "first_order_correlation": torch.corrcoef(torch.stack([predicted, measured]))[0, 1]
            .item(),
            "dead_latents": int((~fired).sum()),
        }
    return out


@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_every_metric_matches_the_naive_computation(model, contexts, beta):
    sae = make_sae(hook="0", beta=beta, outlier_factor=1.05, k=4, n_latents=128)
    result = evaluate_contexts([sae], model, contexts, EvalConfig(batch_size=4), names=["s"])
    expected = naive_evaluation(model, sae, contexts, 4, layer=0, skip=1, factor=1.05)
    got = by_mode(result, "s")
    assert set(got) == {GRAD_AWARE, GRAD_FREE}
    for mode in (GRAD_AWARE, GRAD_FREE):
        for key, value in expected[mode].items():
            rel = 1e-3 if key in ("kl", "first_order_ce_change", "ce_recovered_zero",
                                  "ce_recovered_mean") else 1e-5
            assert got[mode][key] == pytest.approx(value, rel=rel, abs=1e-7), (mode, key)
    outliers = got[GRAD_FREE]["outlier_tokens"]
    assert 0 < outliers < got[GRAD_FREE]["tokens"]  # the outlier path is exercised
    assert got[GRAD_FREE]["ce_tokens"] == 10 * 18
    assert (got[GRAD_AWARE]["fvu"] != got[GRAD_FREE]["fvu"]) == (beta > 0)
    histogram = got[GRAD_FREE]["firing_histogram"]
    assert sum(histogram["counts"]) + histogram["dead"] == sae.n_latents


def test_spliced_positions_are_the_training_rows(model, contexts):
    cfg = SourceConfig(hooks=["0"], skip_first=2, outlier_factor=1.05)
    source = ActivationSource(model, cfg)
    (x, _), = source.hidden_states(contexts[:4]).values()
    (batch,) = source.batches(contexts[:4]).values()
    mask, outliers = training_positions(x, 2, 1.05)
    assert torch.equal(x[mask], batch.x) and outliers == batch.dropped_outliers > 0
    assert not mask[:, :2].any() and not mask[:, -1].any()


def identity_sae(beta):
    """x_hat == x exactly: latents +e_i and -e_i; for each i exactly one of them is positive,
    and k = d keeps exactly the positive ones."""
    sae = make_sae(hook="1", beta=beta, n_latents=2 * D, k=D)
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_perfect_reconstruction_recovers_all_ce_with_zero_kl(model, contexts):
    sae = identity_sae(beta=1.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, D, generator=gen)
    values, indices, _ = sae.encode(x, torch.randn(50, D, generator=gen))
    assert torch.equal(sae.decode(values, indices), x)
    result = evaluate_contexts([sae], model, contexts, EvalConfig(batch_size=5), names=["id"])
    for record in by_mode(result, "id").values():
        assert record["fvu"] == 0 and record["mse"] == 0
        assert record["cosine"] == pytest.approx(1) and record["l2_ratio"] == pytest.approx(1)
        assert record["ce_spliced"] == pytest.approx(record["ce_clean"], abs=1e-6)
        assert record["ce_recovered_zero"] == pytest.approx(1, abs=1e-5)
        assert record["ce_recovered_mean"] == pytest.approx(1, abs=1e-5)
        assert record["kl"] == pytest.approx(0, abs=1e-7)
        assert record["first_order_abs"] == 0


def test_zero_reconstruction_equals_zero_ablation(model, contexts):
    sae = make_sae(hook="1", beta=1.0)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    result = evaluate_contexts([sae], model, contexts, EvalConfig(batch_size=5), names=["zero"])
    for record in by_mode(result, "zero").values():
        assert record["ce_spliced"] == record["ce_zero_ablation"]
        assert record["ce_recovered_zero"] == 0
        assert record["fvu"] > 1  # the error is x itself, its spread around 0 not the mean
        assert record["l2_ratio"] == 0 and record["cosine"] == 0


def test_beta_zero_modes_identical_and_equal_to_grad_free_g_sae(model, contexts):
    topk, gsae = make_sae(beta=0.0, seed=3), make_sae(beta=50.0, seed=3)
    result = evaluate_contexts([topk, gsae], model, contexts, EvalConfig(batch_size=4),
                               names=["topk", "gsae"])
    plain, grad = by_mode(result, "topk"), by_mode(result, "gsae")
    strip = {"mode", "sae", "beta"}
    assert {k: v for k, v in plain[GRAD_AWARE].items() if k != "mode"} == \
        {k: v for k, v in plain[GRAD_FREE].items() if k != "mode"}
    # Gradient-free selection of a g-SAE is beta = 0 on the same weights.
    assert {k: v for k, v in grad[GRAD_FREE].items() if k not in strip} == \
        {k: v for k, v in plain[GRAD_FREE].items() if k not in strip}
    assert grad[GRAD_AWARE]["fvu"] != grad[GRAD_FREE]["fvu"]
    table = format_table(result)
    assert "grad-aware = grad-free" in table and table.count("grad-aware") == 2


def test_result_does_not_depend_on_batch_size_or_other_hooks(model, contexts):
    saes = [make_sae(hook="0", beta=2.0, outlier_factor=0), make_sae(hook="1", beta=2.0, seed=1,
                                                                     outlier_factor=0)]
    together = evaluate_contexts(saes, model, contexts, EvalConfig(batch_size=3),
                                 names=["a", "b"]).to_json()
    alone = evaluate_contexts(saes[1:], model, contexts, EvalConfig(batch_size=10),
                              names=["b"]).to_json()
    for record in alone["results"]:
        other = next(r for r in together["results"] if r["sae"] == "b"
                     and r["mode"] == record["mode"])
        for key, value in record.items():
            if isinstance(value, float):
                assert other[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
            else:
                assert other[key] == value, key
    assert [(r["sae"], r["hook"]) for r in together["results"]] == [
        ("a", "model.layers.0"), ("a", "model.layers.0"), ("b", "model.layers.1"),
        ("b", "model.layers.1")]


def test_mixed_training_settings_are_refused(model, contexts):
    saes = [make_sae(skip_first=1), make_sae(skip_first=2)]
    with pytest.raises(ValueError, match="different skip_first"):
        evaluate_contexts(saes, model, contexts, EvalConfig())


WORDS = "the cat sat on a mat while birds sang over quiet hills near an old river".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (60,), generator=gen))
            for _ in range(30)]
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(docs))
    return str(path)


def test_eval_contexts_sample_the_eval_split(corpus):
    data = DataConfig(dataset=corpus, context_size=16, eval_fraction=0.3)
    tok = tiny_tokenizer()
    split = torch.stack(list(token_contexts(data, tok, "eval")))
    first = eval_contexts(data, tok, EvalConfig(eval_tokens=70, pool_tokens=0))
    assert torch.equal(first, split[:5])
    sampled = eval_contexts(data, tok, EvalConfig(eval_tokens=70, seed=1))
    again = eval_contexts(data, tok, EvalConfig(eval_tokens=70, seed=1))
    other = eval_contexts(data, tok, EvalConfig(eval_tokens=70, seed=2))
    assert torch.equal(sampled, again) and not torch.equal(sampled, other)
    positions = [next(i for i, c in enumerate(split) if torch.equal(c, s)) for s in sampled]
    assert len(positions) == 5 and positions == sorted(positions) and positions[-1] > 4


def save_sae(folder, model_cfg, data_cfg, hook="1", beta=5.0, seed=0):
    meta = {"hook": hook, "model": model_identity(model_cfg), "corpus": corpus_identity(data_cfg),
            "context_size": data_cfg.context_size, "skip_first": 1, "outlier_factor": 5.0}
    cfg = SAEConfig(n_latents=128, k=4, beta=beta, seed=seed)
    return SAE(cfg, D, provenance=Provenance.from_json(meta)).save(folder)


def test_cli_eval_table_and_json(tmp_path, corpus, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    model_cfg = ModelConfig(model=str(model_dir))
    data_cfg = DataConfig(dataset=corpus, context_size=24)
    a = save_sae(tmp_path / "run" / "k4-beta5", model_cfg, data_cfg)
    b = save_sae(tmp_path / "run" / "k4-beta0", model_cfg, data_cfg, beta=0.0, hook="0")
    out_json = tmp_path / "eval.json"
    code = main(["eval", str(a), str(b), "--eval_tokens", "96", "--batch_size", "2",
                 "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "k4-beta5" in captured.out and "grad-aware = grad-free" in captured.out
    assert "CE recovered (zero)" in captured.out
    result = json.loads(out_json.read_text())
    run = result["run"]
    assert result["schema"] == "gsae.eval/2" and run["contexts"] == 4
    assert run["forward"] == {"model.layers.1": "above-hook", "model.layers.0": "above-hook"}
    assert run["context_size"] == 24 and run["corpus"]["dataset"] == corpus
    assert run["model"]["fingerprint"] == model_identity(model_cfg)["fingerprint"]
    assert [(r["sae"], r["mode"]) for r in result["results"]] == [
        (str(a), GRAD_AWARE), (str(a), GRAD_FREE), (str(b), GRAD_AWARE), (str(b), GRAD_FREE)]
    assert all(math.isfinite(r["kl"]) for r in result["results"])

    other = save_sae(tmp_path / "other", ModelConfig(model="tiny-gpt2"), data_cfg)
    code = main(["eval", str(other), "--model", str(model_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "trained on model 'tiny-gpt2'" in err and len(err.splitlines()) == 1


# The above-hook path, typed results ------------------------------------------------------------


def test_above_hook_path_gives_the_numbers_of_the_full_forward(family_model):
    model = family_model
    name = resolve_hook(model, 0)[0]
    mlp = next(n for n, _ in resolve_hook(model, 1)[1].named_children() if "mlp" in n)
    saes = [make_sae(hook="0", beta=3.0), make_sae(hook=f"{resolve_hook(model, 1)[0]}.{mlp}",
                                                   beta=0.0, seed=1)]
    tokens = torch.randint(0, 512, (6, 14), generator=torch.Generator().manual_seed(5))
    cfg = EvalConfig(batch_size=4)
    fast = evaluate_contexts(saes, model, tokens, cfg, names=["a", "b"], core=True)
    full = evaluate_contexts(saes, model, tokens, cfg, names=["a", "b"], above_hook=False,
                             core=True)
    assert fast.run.forward == {name: "above-hook", f"{resolve_hook(model, 1)[0]}.{mlp}": "full"}
    assert set(full.run.forward.values()) == {"full"}
    assert len(fast.core) == len(full.core) == 4
    for got, expected in zip(fast.results + fast.core, full.results + full.core):
        for key, value in asdict(expected).items():
            if isinstance(value, float):
                assert getattr(got, key) == pytest.approx(value, rel=1e-4, abs=1e-6), key
            else:
                assert getattr(got, key) == value, key


def test_result_json_round_trip(model, contexts):
    result = evaluate_contexts([make_sae()], model, contexts[:4], EvalConfig(), names=["s"])
    data = json.loads(json.dumps(result.to_json()))
    assert data["schema"] == "gsae.eval/2"
    assert EvalResult.from_json(data) == result
    with pytest.raises(GsaeError, match="schema 'gsae.eval/9'"):
        EvalResult.from_json({**data, "schema": "gsae.eval/9"})
    broken = {**data, "results": [{k: v for k, v in data["results"][0].items() if k != "mode"}]}
    with pytest.raises(GsaeError, match="lacks mode"):
        EvalResult.from_json(broken)


def test_version_1_results_load():
    """A comparison's "eval" block of schema gsae.eval/1 (no schema key) reads and writes back
    unchanged, apart from the run's new forward record."""
    saved = json.loads((Path(__file__).parents[1] / "docs/results/results.json").read_text())
    old = saved["eval"]
    result = EvalResult.from_json(old)
    assert len(result.results) == len(old["results"]) > 0
    assert result.run.forward == {old["results"][0]["hook"]: "full"}
    again = result.to_json()
    assert again["results"] == old["results"]
    assert {k: v for k, v in again["run"].items() if k != "forward"} == old["run"]
    assert "CE recovered (zero)" in format_table(result)


def test_trainable_weights_are_refused(contexts):
    model = tiny_llama().requires_grad_(True)
    with pytest.raises(GsaeError, match=r"requires_grad_\(False\)") as info:
        evaluate_contexts([make_sae()], model, contexts, EvalConfig())
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("skip_first", [0, 1, 3])
@pytest.mark.parametrize("length", [5, 18, 37])
def test_blockwise_scoring_equals_a_float64_reference(skip_first, length):
    """CE and KL of other logits against the clean ones, scored a few positions at a time,
    equal per-position float64 softmaxes (lengths around the block size of 16)."""
    from gsae.evaluate import _Clean

    gen = torch.Generator().manual_seed(length)
    clean_logits = 3 * torch.randn(2, length, 300, generator=gen)
    other = clean_logits + torch.randn(2, length, 300, generator=gen)
    tokens = torch.randint(0, 300, (2, length), generator=gen)
    ce, kl = _Clean(clean_logits, tokens, skip_first).compare(other)
    positions = range(skip_first, length - 1)
    assert ce.shape == kl.shape == (2, len(positions))
    for b in range(2):
        for j, t in enumerate(positions):
            logp, logq = log_softmax64(clean_logits[b, t]), log_softmax64(other[b, t])
            assert ce[b, j].item() == pytest.approx(-logq[tokens[b, t + 1]].item(), rel=1e-5)
            expected_kl = (logp.exp() * (logp - logq)).sum().item()
            assert kl[b, j].item() == pytest.approx(expected_kl, rel=1e-4, abs=1e-6)


# Behaviour that deliberately broken code once got past -------------------------------------------


def test_sampled_eval_contexts_are_a_uniform_choice_kept_in_order(monkeypatch):
    """Out of a pool of 10 planted contexts, 2 are taken: over 4000 seeds each context is taken
    in about 1 of 5 samples (a biased reservoir takes the first ones about half as often), and
    every sample keeps corpus order."""
    import gsae.evaluate

    pool = [torch.tensor([i]) for i in range(10)]
    monkeypatch.setattr(gsae.evaluate, "token_contexts", lambda *_args: iter(pool))
    data = DataConfig(context_size=4)
    taken = torch.zeros(10)
    for seed in range(4000):
        sample = eval_contexts(data, None, EvalConfig(eval_tokens=8, pool_tokens=40,
                                                      seed=seed))[:, 0]
        assert len(sample) == 2 and sample[0] < sample[1]
        taken[sample] += 1
    assert (taken / 4000 - 0.2).abs().max() < 0.03, taken.tolist()


def test_selected_latents_whose_value_is_zero_are_not_active(model, contexts):
    """Every row selects k = 8 latents, but only the 3 with a positive bias (the encoder
    weights are zero) have a positive value: L0 is 3 and the other latents are dead, in both
    inference modes; the firing histogram and dead fraction count the same way."""
    sae = make_sae(hook="1", beta=2.0, n_latents=128, k=8)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.b_enc[[5, 40, 99]] = 1.0
    result = evaluate_contexts([sae], model, contexts[:4], EvalConfig(batch_size=4),
                               names=["s"])
    for record in by_mode(result, "s").values():
        assert record["l0"] == 3 and record["dead_latents"] == 125
        assert record["dead_fraction"] == 125 / 128
        assert record["dead_window_tokens"] == record["tokens"] == 4 * 18
        # the 3 live latents fire at every position: log10 frequency 0, the top bin
        histogram = record["firing_histogram"]
        assert histogram["counts"] == [0] * 31 + [3] and histogram["dead"] == 125
        # README: the CE increase is the spliced CE minus the clean CE
        assert record["ce_increase"] == pytest.approx(record["ce_spliced"] - record["ce_clean"])
        assert record["ce_increase"] != 0
