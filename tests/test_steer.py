"""The steering evaluation against a naive computation on the tiny model, and its CLI."""

import json
from functools import partial
from pathlib import Path

import conftest
import pytest
import torch

from gsae.cli import main
from gsae.errors import GsaeError
from gsae.records import SteerResult
from gsae.steer import SteerConfig, format_table, steer_on, summarize
from gsae.tiny import tiny_llama

D = 64


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def pool():
    return torch.randint(0, 512, (7, 12), generator=torch.Generator().manual_seed(1))


make_sae = partial(conftest.make_sae, d_in=D, n_latents=32, k=4, hook="0", outlier_factor=1.05,
                   weights="noisy_bias")


# A naive reference: one context and one position at a time, float64 softmaxes ------------------


def log_softmax64(logits):
    z = logits.double() - logits.double().max(-1, keepdim=True).values
    return z - z.exp().sum(-1, keepdim=True).log()


def forward(model, tokens, add=None):
    """Logits [T, V] and the layer-0 output [T, d] of one context; `add` maps t to a vector."""
    seen = {}

    def hook(_module, _inputs, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        for t, vector in (add or {}).items():
            h[0, t] = h[0, t] + vector
        seen["h"] = h[0]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.model.layers[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=tokens[None]).logits[0]
    finally:
        handle.remove()
    return logits, seen["h"]


def naive_firing(model, sae, pool, batch_size, factor):
    """Per pool context: {t: set of latents fired} at the data positions, and per latent the
    list of its non-zero values."""
    T = pool.shape[1]
    fired, values = [], {}
    for batch in pool.split(batch_size):
        hs = [forward(model, tokens)[1] for tokens in batch]
        candidates = [(b, t) for b in range(len(batch)) for t in range(1, T - 1)]
        norms = torch.stack([hs[b][t].norm() for b, t in candidates])
        median = norms.sort().values[(len(norms) - 1) // 2]  # the lower median, as torch's
        per_context = [{} for _ in batch]
        for (b, t), norm in zip(candidates, norms):
            if norm > factor * median:
                continue
            v, idx, _ = sae.encode(hs[b][t][None])
            per_context[b][t] = {int(i) for i, x in zip(idx[0], v[0]) if x > 0}
            for i, x in zip(idx[0].tolist(), v[0].tolist()):
                if x > 0:
                    values.setdefault(i, []).append(x)
        fired += per_context
    return fired, values


def naive_steer(model, sae, pool, contexts, fired, latent, alpha):
    """Log-probability differences [P, V] and steered log-probabilities at the positions of
    `contexts` where `latent` did not fire, steering each context on its own."""
    diffs, steered = [], []
    direction = sae.W_dec.detach()[latent]
    for c in contexts:
        positions = [t for t, latents in fired[c].items() if latent not in latents]
        clean = log_softmax64(forward(model, pool[c])[0])
        logits, _ = forward(model, pool[c], {t: alpha * direction for t in positions})
        logq = log_softmax64(logits)
        for t in positions:
            diffs.append(logq[t] - clean[t])
            steered.append(logq[t])
    return (torch.stack(diffs), torch.stack(steered)) if diffs else (None, None)


def test_steering_matches_the_naive_computation(model, pool):
    sae = make_sae()
    cfg = SteerConfig(latents=3, alphas=[1.0, 3.0], contexts=2, pool=7, top_tokens=4,
                      batch_size=5, seed=0)
    result = steer_on([sae], model, pool, cfg, names=["s"]).to_json()
    run, (record,) = result["run"], result["results"]
    a, b = run["contexts_a"], run["contexts_b"]
    assert len(a) == len(b) == 2 and not set(a) & set(b)
    fired, values = naive_firing(model, sae, pool, batch_size=5, factor=1.05)
    n_data = sum(len(f) for f in fired)
    assert n_data < 7 * 10  # the outlier rule is exercised
    assert record["pool_tokens"] == n_data and record["live_latents"] == len(values)
    assert record["sampled_latents"] == 3 and len(record["latents"]) == 3 * 2
    norms = sorted(forward(model, pool[c])[1][t].norm().item()
                   for c, positions in enumerate(fired) for t in positions)
    assert record["median_x_norm"] == pytest.approx(norms[(len(norms) - 1) // 2], rel=1e-5)
    measured = 0
    for r in record["latents"]:
        i, m = r["latent"], r["alpha_multiple"]
        typical = sum(values[i]) / len(values[i])
        assert r["typical_activation"] == pytest.approx(typical, rel=1e-5)
        assert r["firing_frequency"] == pytest.approx(len(values[i]) / n_data)
        assert r["alpha"] == pytest.approx(m * typical, rel=1e-5)
        diff_a, _ = naive_steer(model, sae, pool, a, fired, i, m * typical)
        diff_b, logq_b = naive_steer(model, sae, pool, b, fired, i, m * typical)
        counts = [0 if d is None else len(d) for d in (diff_a, diff_b)]
        assert [r["positions_a"], r["positions_b"]] == counts
        if diff_a is None or diff_b is None:  # fires (almost) everywhere: nothing to measure
            assert r["kl"] is None and r["logprob_gain"] is None
            continue
        measured += 1
        gain_a, top = diff_a.mean(0).topk(4)
        assert sorted(r["promoted_tokens"]) == sorted(top.tolist())
        assert r["selection_gain"] == pytest.approx(gain_a.mean().item(), rel=1e-4)
        gain_b = diff_b[:, r["promoted_tokens"]].mean().item()
        kl = (logq_b.exp() * diff_b).sum(-1).mean().item()
        assert r["logprob_gain"] == pytest.approx(gain_b, rel=1e-4, abs=1e-6)
        assert r["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
        assert r["kl"] > 0
    assert measured >= 4  # most sampled latents have positions to steer in both sets
    for row in record["summary"]:
        rows = [r for r in record["latents"]
                if r["alpha_multiple"] == row["alpha_multiple"] and r["kl"] is not None]
        assert row["latents"] == len(rows)
        assert row["kl"] == summarize([r["kl"] for r in rows])
        assert row["logprob_gain"]["mean"] == pytest.approx(
            sum(r["logprob_gain"] for r in rows) / len(rows))


def test_same_contexts_and_latent_count_for_every_sae(model, pool):
    twin = make_sae(seed=0)
    saes = [make_sae(seed=0), make_sae(seed=1, beta=5.0), twin]
    cfg = SteerConfig(latents=2, alphas=[2.0], contexts=3, pool=7, top_tokens=3, batch_size=4)
    result = steer_on(saes, model, pool, cfg, names=["x", "y", "z"]).to_json()
    first, second, third = result["results"]
    assert [r["sampled_latents"] for r in result["results"]] == [2, 2, 2]
    # Identical weights give identical records, whatever else is steered in the same run.
    assert first["latents"] == third["latents"]
    assert first["latents"] != second["latents"]
    # A latent with a larger strength moves the output more (KL grows with alpha here).
    bigger = steer_on(saes[:1], model, pool, SteerConfig(
        latents=2, alphas=[8.0], contexts=3, pool=7, top_tokens=3, batch_size=4)).to_json()
    bigger = bigger["results"][0]
    pairs = [(big["kl"], small["kl"]) for big, small in zip(bigger["latents"], first["latents"])
             if small["kl"] is not None]
    assert pairs and all(big > small for big, small in pairs)


def test_summary_of_values():
    stats = summarize([1.0, None, 3.0, 2.0, 4.0])
    assert stats == pytest.approx({"mean": 2.5, "min": 1.0, "max": 4.0, "q25": 1.75,
                                   "median": 2.5, "q75": 3.25})
    assert summarize([None]) is None


def test_bad_settings_are_refused(model, pool):
    with pytest.raises(ValueError, match=r"pool \(7\) must hold"):
        steer_on([make_sae()], model, pool, SteerConfig(contexts=4, pool=7))
    with pytest.raises(GsaeError, match=r"^--alphas must be greater than 0, got 0.0$"):
        steer_on([make_sae()], model, pool, SteerConfig(alphas=[0.0], pool=7, contexts=2))
    with pytest.raises(GsaeError, match="top_tokens is 513: .* vocabulary size, 512$") as info:
        steer_on([make_sae()], model, pool, SteerConfig(top_tokens=513, pool=7, contexts=2))
    assert len(str(info.value).splitlines()) == 1


def test_cli_steer_table_and_json(tmp_path, corpus, capsys):
    folder = tmp_path / "a-folder-name-long-enough-that-cutting-it-to-48-characters-shows" / "sae"
    sae = make_sae(outlier_factor=5.0)
    sae.provenance.corpus = {"dataset": corpus, "context_size": 32}
    sae.save(folder)
    out = tmp_path / "steer.json"
    code = main(["steer", str(folder), "--model", "tiny-llama", "--latents", "2",
                 "--alphas", "1", "2", "--contexts", "2", "--pool", "4",
                 "--steer.context_size", "0", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    assert result["schema"] == "gsae.steer/2" and result["run"]["context_size"] == 32
    assert result["run"]["forward"] == {"model.layers.0": "above-hook"}
    assert result["run"]["settings"]["latents"] == 2
    assert result["run"]["corpus"]["dataset"] == corpus
    (record,) = result["results"]
    assert [row["alpha_multiple"] for row in record["summary"]] == [1.0, 2.0]
    assert all(isinstance(t, str) for t in record["latents"][0]["promoted"])
    assert "KL(steered||clean)" in captured.out
    assert f"{folder} " in captured.out  # the whole name, not its last 48 characters


# The above-hook path, typed results ------------------------------------------------------------


def test_above_hook_path_gives_the_numbers_of_the_full_forward(family_model):
    model = family_model
    pool = torch.randint(0, 512, (8, 12), generator=torch.Generator().manual_seed(6))
    saes = [make_sae(seed=0), make_sae(seed=1, beta=5.0)]
    saes[1].provenance.hook = "1"
    # 3 contexts per set, 7 per pass: two steered copies per pass, one pass with a single copy
    cfg = SteerConfig(latents=3, alphas=[1.0, 2.0, 4.0], contexts=3, pool=8, top_tokens=3,
                      batch_size=7)
    fast = steer_on(saes, model, pool, cfg, names=["a", "b"])
    full = steer_on(saes, model, pool, cfg, names=["a", "b"], above_hook=False)
    assert set(fast.run.forward.values()) == {"above-hook"} and len(fast.run.forward) == 2
    assert set(full.run.forward.values()) == {"full"}
    for got, expected in zip(fast.results, full.results):
        assert got.summary and len(got.latents) == len(expected.latents) == 9
        for mine, theirs in zip(got.latents, expected.latents):
            assert mine["promoted_tokens"] == theirs["promoted_tokens"]
            for key, value in theirs.items():
                if isinstance(value, float):
                    assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
                else:
                    assert mine[key] == value, key


def test_result_json_round_trip(model, pool):
    cfg = SteerConfig(latents=2, alphas=[2.0], contexts=2, pool=7, top_tokens=3)
    result = steer_on([make_sae()], model, pool, cfg, names=["s"])
    data = json.loads(json.dumps(result.to_json()))
    assert data["schema"] == "gsae.steer/2" and "values" not in data["results"][0]
    assert SteerResult.from_json(data) == result


def test_version_1_results_load():
    """A comparison's "steer" block of schema gsae.steer/1 (compact records, no schema key)."""
    saved = json.loads((Path(__file__).parents[1] / "docs/results/results.json").read_text())
    old = saved["steer"]
    result = SteerResult.from_json(old)
    assert result.run.settings == {k.removeprefix("steer_"): v
                                   for k, v in old["run"]["settings"].items()}
    assert SteerConfig(**result.run.settings).latents == old["run"]["settings"]["steer_latents"]
    assert result.run.forward == {old["results"][0]["hook"]: "full"}
    assert [r.to_json() for r in result.results] == old["results"]
    assert result.results[0].latents is None and result.results[0].values
    assert "KL(steered||clean)" in format_table(result)


def test_more_bad_settings_are_refused_and_the_edges_accepted(model, pool):
    cfg = SteerConfig(latents=1, alphas=[1.0], contexts=2, pool=4, top_tokens=3)
    with pytest.raises(GsaeError, match=r"^the pool has 3 contexts; 4 are needed"):
        steer_on([make_sae()], model, pool[:3], cfg)
    with pytest.raises(GsaeError, match="contexts of 2 tokens leave no position to steer"):
        steer_on([make_sae()], model, pool[:, :2], cfg)  # skip_first 1: position 1 is the last
    whole = SteerConfig(latents=1, alphas=[1.0], contexts=2, pool=7, top_tokens=512)
    result = steer_on([make_sae()], model, pool, whole).to_json()  # the whole vocabulary
    assert result["results"][0]["sampled_latents"] == 1


def test_the_table_shows_medians_and_quartiles(model, pool):
    cfg = SteerConfig(latents=8, alphas=[1.0, 3.0], contexts=2, pool=7, top_tokens=4)
    result = steer_on([make_sae()], model, pool, cfg, names=["s"])
    lines = format_table(result).splitlines()
    rows = [row for row in result.results[0].summary
            if row["kl"] and row["kl"]["mean"] != pytest.approx(row["kl"]["median"])]
    assert rows  # the median is not the mean: the table shows which
    for row in rows:
        kl = row["kl"]
        cell = f"{kl['median']:.4g} [{kl['q25']:.3g}, {kl['q75']:.3g}]"
        assert any(line.startswith("s ") and cell in line for line in lines), cell


def test_steer_prompt_steers_from_the_sae_s_first_position_and_refuses_an_empty_prompt(
        model, monkeypatch):
    import gsae.steer as steer
    from gsae.tiny import tiny_tokenizer

    sae = make_sae(skip_first=3)
    seen = {}
    monkeypatch.setattr(steer, "greedy", lambda model, module, ids, vectors, skip_first, new:
                        seen.setdefault("skip_first", skip_first) and torch.zeros(
                            len(vectors), new, dtype=torch.long))
    steer.steer_prompt(sae, model, tiny_tokenizer(), 0, "hello there", [2.0], 3, 1.0)
    assert seen["skip_first"] == 3
    with pytest.raises(GsaeError, match="the prompt is empty"):
        steer.steer_prompt(sae, model, tiny_tokenizer(), 0, "", [2.0], 3, 1.0)
