"""The feature browser (`gsae inspect`): its numbers against a naive per-token computation on the
tiny model, its delphi export against delphi's documented layout, and its pages in a real
headless Chromium (rendering, sorting, links, strip counts, no network request)."""

import json
import math
import re
import shutil
import subprocess
from functools import partial
from urllib.parse import quote, urljoin

import conftest
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from gsae import SAE, Provenance, SAEConfig
from gsae.browser import InspectConfig, inspect_contexts
from gsae.browser import site as browser_site
from gsae.browser import steering as browser_steering
from gsae.browser.examples import quantile_positions, top_positions
from gsae.browser.logits import top_tokens
from gsae.browser.steering import greedy
from gsae.cli import main as gsae_main
from gsae.errors import GsaeError
from gsae.hooks import SplitAtHook, decoder_layers, hook_output_tensor
from gsae.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer

D, LATENTS, K, BETA = 64, 40, 4, 200.0
CFG = dict(top_latents=4, random_latents=3, contexts_per_latent=5, quantiles=3,
           contexts_per_quantile=2, continuation_tokens=4, neighbours=2, batch_size=4)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")


make_sae = partial(conftest.make_sae, d_in=D, n_latents=LATENTS, k=K, weights="spread_bias",
                   dead=3, hook="0", outlier_factor=0.0)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(0, 256, (10, 20), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def saes():
    return make_sae(seed=0, beta=BETA), make_sae(seed=1, beta=0.0)


ROWS_PER_PAGE = 16  # 40 latents: three pages


@pytest.fixture(scope="module")
def site(tmp_path_factory, model, contexts, saes):
    out = tmp_path_factory.mktemp("site") / "site"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(browser_site, "ROWS_PER_PAGE", ROWS_PER_PAGE)
        inspect_contexts(saes[0], model, tiny_tokenizer(), contexts,
                         InspectConfig(out=str(out), **CFG), other=saes[1],
                         names=("gsae", "topk"))
    return out


@pytest.fixture(scope="module")
def site_json(site):
    return json.loads((site / "latents.json").read_text())


# A naive reference: one token at a time, float64, the selection written out -----------------


def states(model, tokens):
    """Layer-0 outputs x [B, T, d] and g = d(summed next-token CE)/dx, by hand."""
    seen = {}

    def hook(_module, _inputs, output):
        h = (output[0] if isinstance(output, tuple) else output).detach().requires_grad_(True)
        seen["x"] = h
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.model.layers[0].register_forward_hook(hook)
    try:
        logits = model(input_ids=tokens).logits
    finally:
        handle.remove()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           tokens[:, 1:].reshape(-1), reduction="sum")
    (g,) = torch.autograd.grad(loss, seen["x"])
    return seen["x"].detach().double(), g.double()


def select(sae, x, g, beta):
    """Indices and values of the k kept latents for one token."""
    W_enc, b_enc = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    W_dec, b_dec = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    z = W_enc @ (x - b_dec) + b_enc
    score = z + beta * z * (W_dec @ g).abs()
    idx = score.topk(sae.k).indices.tolist()
    return idx, [max(z[i].item(), 0.0) for i in idx]


@pytest.fixture(scope="module")
def naive(model, contexts, saes):
    """Per latent of the g-SAE: its firings [(context, t, value, loss effect, beta|d.g|,
    selected by plain TopK)] and its plain-TopK values."""
    sae = saes[0]
    x, g = states(model, contexts)
    W_dec = sae.W_dec.detach().double()
    fired = {i: [] for i in range(LATENTS)}
    plain_values = {i: [] for i in range(LATENTS)}
    for c in range(contexts.shape[0]):
        for t in range(1, contexts.shape[1] - 1):
            plain, pv = select(sae, x[c, t], g[c, t], 0.0)
            for i, v in zip(plain, pv):
                if v > 0:
                    plain_values[i].append(v)
            for i, v in zip(*select(sae, x[c, t], g[c, t], BETA)):
                if v > 0:
                    slope = (W_dec[i] @ g[c, t]).item()
                    fired[i].append((c, t, v, v * slope, BETA * abs(slope), i in plain))
    return {"fired": fired, "plain": plain_values, "rows": contexts.shape[0] *
            (contexts.shape[1] - 2)}


def test_latent_numbers_match_the_naive_computation(site_json, naive):
    records = site_json["latents"]
    assert [r["latent"] for r in records] == list(range(LATENTS))
    assert site_json["sae"]["encoded_tokens"] == naive["rows"]
    for r in records:
        hits = naive["fired"][r["latent"]]
        assert r["count"] == len(hits)
        assert r["frequency"] == pytest.approx(len(hits) / naive["rows"])
        assert r["dead"] == (not hits)
        plain = naive["plain"][r["latent"]]
        if plain:
            assert r["typical_activation"] == pytest.approx(np.mean(plain), rel=1e-4)
        if not hits:
            assert r["mean_activation"] is None and r["log10_frequency"] is None
            continue
        values = [h[2] for h in hits]
        assert r["density_percent"] == pytest.approx(100 * len(hits) / naive["rows"])
        assert r["mean_abs_loss_effect"] == pytest.approx(np.mean([abs(h[3]) for h in hits]),
                                                          rel=1e-3)
        assert r["log10_frequency"] == pytest.approx(math.log10(len(hits) / naive["rows"]))
        assert r["mean_activation"] == pytest.approx(np.mean(values), rel=1e-4)
        assert r["max_activation"] == pytest.approx(max(values), rel=1e-4)
        assert r["mean_effect"] == pytest.approx(np.mean([h[4] for h in hits]), rel=1e-3)
        assert r["novel_share"] == pytest.approx(np.mean([not h[5] for h in hits]))
    assert sum(r["dead"] for r in records) >= 3
    assert any(r["novel_share"] for r in records if not r["dead"])  # the gradient mattered


def naive_top_tokens(hits, contexts, count=3):
    """The `count` token ids with the largest summed activation, ties to the lower id."""
    sums = {}
    for c, t, v, *_ in hits:
        token = int(contexts[c, t])
        sums[token] = sums.get(token, 0.0) + v
    return sorted(sums, key=lambda token: (-sums[token], token))[:count]


def test_top_activating_tokens_are_those_of_the_largest_summed_activation(site_json, naive,
                                                                          contexts):
    spell = tiny_tokenizer().decode
    for r in site_json["latents"]:
        want = naive_top_tokens(naive["fired"][r["latent"]], contexts)
        assert r["top_tokens"] == [spell([t]) for t in want]
    assert any(len(r["top_tokens"]) == 3 for r in site_json["latents"])


def test_pages_go_to_the_most_frequent_latents_and_a_sample(site_json, naive):
    counts = {i: len(h) for i, h in naive["fired"].items()}
    paged = [r["latent"] for r in site_json["latents"] if r["page"]]
    by_frequency = sorted(counts, key=lambda i: (-counts[i], i))
    assert set(by_frequency[: CFG["top_latents"]]) <= set(paged)
    assert len(paged) == CFG["top_latents"] + CFG["random_latents"]
    assert all(counts[i] > 0 for i in paged)


def test_requested_latents_get_pages_and_no_continuations_when_asked(tmp_path, model, contexts,
                                                                      saes, naive):
    out = tmp_path / "site"
    cfg = InspectConfig(out=str(out), **{**CFG, "top_latents": 1, "random_latents": 0,
                                         "continuation_tokens": 0, "latents": "5, 38,5"})
    inspect_contexts(saes[0], model, tiny_tokenizer(), contexts, cfg)
    result = json.loads((out / "latents.json").read_text())
    most = max(range(LATENTS), key=lambda i: (len(naive["fired"][i]), -i))
    assert sorted(int(i) for i in result["pages"]) == sorted({most, 5, 38})
    assert not naive["fired"][38] and result["latents"][38]["page"]  # dead, paged on request
    for latent, details in result["pages"].items():
        assert details["steering"] == []
        html = (out / result["latents"][int(latent)]["page"]).read_text()
        assert "Not run (--continuation_tokens 0)" in html


@pytest.mark.parametrize("latents,message", [("5,40", "do not exist"), ("5;7", "comma"),
                                             ("-1", "whole numbers")])
def test_unknown_requested_latents_are_refused(tmp_path, model, contexts, saes, latents,
                                               message):
    with pytest.raises(GsaeError, match=message):
        inspect_contexts(saes[0], model, tiny_tokenizer(), contexts,
                         InspectConfig(out=str(tmp_path / "x"), latents=latents))
    assert not (tmp_path / "x").exists()


def strips_of(html):
    return re.findall(r'<div class="strip" data-context="(\d+)" data-position="(\d+)">(.*?)</div>',
                      html)


def test_strips_show_values_and_loss_effects_of_the_naive_computation(site, site_json, naive):
    latent = max(naive["fired"], key=lambda i: len(naive["fired"][i]))
    html = (site / site_json["latents"][latent]["page"]).read_text()
    at = {(c, t): (v, loss) for c, t, v, loss, *_ in naive["fired"][latent]}
    best = {}
    for c, t, v, *_ in naive["fired"][latent]:
        if v > best.get(c, (0, -1))[0]:
            best[c] = (v, t)
    top = sorted(best, key=lambda c: -best[c][0])[: CFG["contexts_per_latent"]]
    found = strips_of(html)
    assert [int(c) for c, _, _ in found[: len(top)]] == top
    assert [int(p) for _, p, _ in found[: len(top)]] == [best[c][1] for c in top]
    checked = 0
    for c, p, body in found:
        spans = re.findall(r'<span class="tok[^"]*"(?: style="[^"]*")? title="([^"]*)"', body)
        start = max(0, int(p) - 16)
        for offset, title in enumerate(spans):
            t = start + offset
            if t == 0 or t == 19:
                assert title == "not encoded"
                continue
            value, loss = at.get((int(c), t), (0.0, 0.0))
            shown = re.match(r"activation (\S+); loss effect value\*\(d\.g\) (\S+)", title)
            assert float(shown[1]) == pytest.approx(value, rel=1e-3, abs=1e-6)
            assert float(shown[2]) == pytest.approx(loss, rel=1e-2, abs=1e-6)
            checked += 1
    assert checked > 50


def expected_strips(values, contexts_fired):
    """Top contexts plus, per quantile bin (torch.quantile's linear interpolation, numpy's
    default), up to contexts_per_quantile examples."""
    edges = np.quantile(values, np.linspace(0, 1, CFG["quantiles"] + 1))
    per_bin = []
    for b in range(CFG["quantiles"]):
        last = b == CFG["quantiles"] - 1
        inside = [v for v in values if edges[b] <= v and (v <= edges[b + 1] if last
                                                          else v < edges[b + 1])]
        per_bin.append(min(CFG["contexts_per_quantile"], len(inside)))
    return min(CFG["contexts_per_latent"], contexts_fired) + sum(per_bin)


def test_quantile_bins_split_the_values_evenly():
    act = torch.tensor([[0.0, 1.0, 2.0, float("nan")], [3.0, 4.0, 5.0, 6.0], [7.0, 8.0, 0.0, 0.0]])
    bins = quantile_positions(act, 4, per_bin=10, seed=0)
    assert [(lo, hi) for lo, hi, _ in bins] == [(1, 2.75), (2.75, 4.5), (4.5, 6.25), (6.25, 8)]
    assert [sorted(act[c, t].item() for c, t in where) for _, _, where in bins] == [
        [1, 2], [3, 4], [5, 6], [7, 8]]
    assert top_positions(act, 2) == [(2, 1), (1, 3)]


def test_json_and_page_agree_on_examples(site, site_json, naive):
    for latent, details in site_json["pages"].items():
        hits = naive["fired"][int(latent)]
        html = (site / site_json["latents"][int(latent)]["page"]).read_text()
        want = expected_strips([h[2] for h in hits], len({h[0] for h in hits}))
        assert len(strips_of(html)) == want
        shown = len(details["top_examples"]) + sum(
            len(b["examples"]) for b in details["quantile_examples"])
        assert shown == want
        assert sum(details["histogram"]["counts"]) == len(hits)


# Promoted tokens: planted directions ---------------------------------------------------------


def test_promoted_tokens_go_through_the_rms_norm_gain():
    model = tiny_llama()
    with torch.no_grad():  # a gain with mixed signs: ignoring it ranks tokens differently
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, D) * torch.tensor([1, -1] * 32))
    W_U, gain = model.lm_head.weight.detach(), model.model.norm.weight.detach()
    planted = F.normalize(torch.stack([W_U[65] / gain, -W_U[300] / gain]), dim=1)
    up, _, down, _ = top_tokens(model, planted, 1)
    assert up[0, 0] == 65 and down[1, 0] == 300
    assert (W_U @ planted[0]).argmax() != 65  # the gain matters for this direction


def test_promoted_tokens_centre_through_layer_norm():
    model = tiny_gpt2()
    W_U, gain = model.lm_head.weight.detach(), model.transformer.ln_f.weight.detach()
    u = W_U[70] / gain
    planted = u - u.mean() + 5.0  # a large mean, which LayerNorm removes
    up, values, _, _ = top_tokens(model, planted[None], 3)
    assert up[0, 0] == 70
    expected = (W_U * gain) @ (u - u.mean())
    assert values[0].tolist() == pytest.approx(expected.topk(3).values.tolist(), rel=1e-4)



def test_index_promoted_tokens_are_the_naive_top_three(site, site_json, saes, model):
    """The index ranks every latent's direct logits (W_U (w * d_i), float64 here) without the
    suppressed side; both SAEs, the compared one's index too."""
    tokenizer = tiny_tokenizer()
    gain, W_U = model.model.norm.weight.detach().double(), model.lm_head.weight.detach().double()
    others = json.loads((site / "compare" / "latents.json").read_text())
    for sae, records in zip(saes, (site_json["latents"], others["latents"])):
        logits = (sae.W_dec.detach().double() * gain) @ W_U.T
        for r in records:
            ids = logits[r["latent"]].topk(3).indices.tolist()
            assert r["promoted"] == [tokenizer.decode([i]) for i in ids]

# Steering: greedy continuations against full recomputation -------------------------------


def test_greedy_continuations_match_full_recomputation(model):
    prompt = torch.tensor([10, 72, 101, 108, 108, 111])
    vectors = torch.randn(4, D, generator=torch.Generator().manual_seed(0)) * 3
    vectors[0] = 0
    got = greedy(model, model.model.layers[0], prompt, vectors, skip_first=3, new_tokens=6)
    for row, vector in enumerate(vectors):
        assert got[row].tolist() == conftest.naive_greedy(model, prompt, vector, 3, 6)
    assert got[1].tolist() != got[0].tolist() or got[2].tolist() != got[0].tolist()


def test_steering_starts_exactly_at_skip_first(model):
    """A prompt whose only steered position is its last one (position skip_first): the first
    generated token depends on that position's vector alone."""
    prompt = torch.tensor([10, 72, 101, 108])
    vectors = torch.randn(6, D, generator=torch.Generator().manual_seed(1)) * 20
    vectors[0] = 0
    got = greedy(model, model.model.layers[0], prompt, vectors, skip_first=3, new_tokens=1)
    want = [conftest.naive_greedy(model, prompt, v, 3, 1) for v in vectors]
    assert got.tolist() == want
    assert len({w[0] for w in want}) > 1  # some vector changes the first token
    # from position 4 on: no prompt position is steered, so the first token is the clean one
    first = greedy(model, model.model.layers[0], prompt, vectors, skip_first=4, new_tokens=1)
    assert first.tolist() == [want[0]] * len(vectors)



def deep_llama(attention="sdpa"):
    """A random 4-layer Llama: two blocks below a hook at layer 1, two above. Eager attention
    gets a mask tensor of the batch's rows, which the blocks above the hook must see per row."""
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=512, hidden_size=D, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, attn_implementation=attention)
    return LlamaForCausalLM(config).eval()


def one_at_a_time(model, module, prompt, vector, skip_first, steps):
    """Greedy decoding of one row, the whole sequence recomputed at every step (no cache, no
    batch), `vector` added to `module`'s output from `skip_first` on."""
    tokens = prompt.clone()

    def hook(_module, _inputs, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        h[:, skip_first:] += vector
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = module.register_forward_hook(hook)
    try:
        for _ in range(steps):
            with torch.no_grad():
                logits = model(input_ids=tokens[None], use_cache=False).logits
            tokens = torch.cat([tokens, logits[0, -1].argmax()[None]])
    finally:
        handle.remove()
    return tokens[len(prompt):].tolist()


@pytest.mark.parametrize("make, hook", [(deep_llama, "model.layers.1"),
                                        (lambda: deep_llama("eager"), "model.layers.1"),
                                        (tiny_gpt2, "transformer.h.0"),
                                        (deep_llama, "model.layers.1.mlp")])
def test_rows_share_the_blocks_below_the_hook_and_match_one_at_a_time_decoding(make, hook):
    """Rows of one batched greedy run (two prompts, repeated and near-zero vectors, strong
    ones) equal one-row decoding without a cache, token for token; on the split path the
    blocks below the hook ran once per prompt at first and never on every row."""
    model = make()
    module = model.get_submodule(hook)
    gen = torch.Generator().manual_seed(1)
    direction = F.normalize(torch.randn(D, generator=gen), dim=0)
    kinds = torch.stack([0 * direction, 0 * direction, 0.01 * direction, 8 * direction,
                         30 * direction, *(20 * torch.randn(2, D, generator=gen))])
    prompts = torch.tensor([[10, 72, 101, 108, 108], [300, 7, 7, 450, 2]])
    tokens, vectors = prompts.repeat_interleave(len(kinds), 0), kinds.repeat(2, 1)
    below = []  # rows seen by the first block, per forward
    handle = decoder_layers(model)[1][0].register_forward_hook(
        lambda _m, _a, out: below.append(hook_output_tensor(out).shape[0]))
    try:
        got = greedy(model, module, tokens, vectors, skip_first=2, new_tokens=6)
    finally:
        handle.remove()
    for row in range(len(vectors)):
        assert got[row].tolist() == one_at_a_time(model, module, tokens[row], vectors[row], 2, 6)
    assert len({tuple(r) for r in got.tolist()}) > 4  # the steering made distinct texts
    if SplitAtHook(model, module).available:  # a decoder block: the split path
        assert below[0] == 2 and max(below) < len(vectors)
    else:
        assert below == [len(vectors)] * 6

def test_steering_strengths_are_multiples_of_the_typical_activation(site_json, naive):
    sources = set()
    for latent, details in site_json["pages"].items():
        plain, fired = naive["plain"][int(latent)], naive["fired"][int(latent)]
        # the gradient-free mean, as gsae steer; latents that need the gradient to fire use
        # their gradient-aware mean
        typical = np.mean(plain) if plain else np.mean([h[2] for h in fired])
        sources.add(details["steering_unit_source"].split()[0])
        assert len(details["steering"]) == 3
        for prompt in details["steering"]:
            multiples = [c["multiple"] for c in prompt["continuations"]]
            assert multiples == [0.0, 1.0, 4.0]
            for c in prompt["continuations"]:
                assert c["alpha"] == pytest.approx(c["multiple"] * typical, rel=1e-4)
    assert sources == {"gradient-free", "gradient-aware"}


def test_dead_latents_with_pages_are_not_steered(site):
    other = json.loads((site / "compare" / "latents.json").read_text())
    dead = [r for r in other["latents"] if r["page"] and r["dead"]]
    assert dead  # a nearest neighbour that never fires
    for r in dead:
        assert other["pages"][str(r["latent"])]["steering"] == []
        assert "nan" not in (site / "compare" / r["page"]).read_text()


# Compare: nearest latents by decoder cosine -------------------------------------------------


def naive_fired(model, contexts, sae, beta):
    """Per latent: [(context, t, value, value * d.g)] where it fires."""
    x, g = states(model, contexts)
    W_dec = sae.W_dec.detach().double()
    fired = {i: [] for i in range(sae.n_latents)}
    for c in range(contexts.shape[0]):
        for t in range(1, contexts.shape[1] - 1):
            for i, v in zip(*select(sae, x[c, t], g[c, t], beta)):
                if v > 0:
                    fired[i].append((c, t, v, v * (W_dec[i] @ g[c, t]).item()))
    return fired


def test_latents_are_paired_by_decoder_cosine_with_their_differences(
        site, site_json, saes, naive, model, contexts):
    a, b = saes[0].W_dec.detach().double(), saes[1].W_dec.detach().double()
    cos = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    other = naive_fired(model, contexts, saes[1], 0.0)
    spell = tiny_tokenizer().decode
    pairing = site_json["pairing"]
    assert not pairing["near_identical"] and len(pairing["pairs"]) == LATENTS
    for p in pairing["pairs"]:
        i, j = p["latent"], p["partner"]
        assert j == cos[i].argmax().item() and p["cosine"] == pytest.approx(cos[i, j].item())
        assert p["mutual"] == (cos[:, j].argmax().item() == i)
        dens = [100 * len(hits) / naive["rows"] for hits in (naive["fired"][i], other[j])]
        assert p["density_percent_difference"] == pytest.approx(dens[0] - dens[1])
        effects = [np.mean([abs(h[3]) for h in hits]) if hits else None
                   for hits in (naive["fired"][i], other[j])]
        if None in effects:
            assert p["mean_abs_loss_effect_difference"] is None
        else:
            assert p["mean_abs_loss_effect_difference"] == pytest.approx(
                effects[0] - effects[1], rel=1e-3, abs=1e-6)
        tokens = [{spell([t]) for t in naive_top_tokens(hits, contexts)}
                  for hits in (naive["fired"][i], other[j])]
        if tokens[0] | tokens[1]:
            assert p["token_overlap"] == pytest.approx(
                len(tokens[0] & tokens[1]) / len(tokens[0] | tokens[1]))
    assert 0 < sum(p["mutual"] for p in pairing["pairs"]) < LATENTS
    html = (site / "compare.html").read_text()
    assert html.count("<tr data-latent=") == LATENTS and "near-identical" not in html


def test_near_identical_saes_are_called_so_at_the_top(tmp_path, model, contexts, saes):
    twin = make_sae(seed=0, beta=0.0)
    with torch.no_grad():  # the g-SAE's decoder, shuffled and nudged: cosine > 0.999
        order = torch.randperm(LATENTS, generator=torch.Generator().manual_seed(5))
        twin.W_dec.copy_(saes[0].W_dec[order] + 1e-3 * torch.randn(LATENTS, D))
    out = tmp_path / "twins"
    inspect_contexts(saes[0], model, tiny_tokenizer(), contexts,
                     InspectConfig(out=str(out), **{**CFG, "continuation_tokens": 0}),
                     other=twin)
    pairing = json.loads((out / "latents.json").read_text())["pairing"]
    assert pairing["near_identical"] and pairing["near_share"] == 1.0
    assert [p["partner"] for p in pairing["pairs"]] == order.argsort().tolist()
    assert all(p["mutual"] for p in pairing["pairs"])
    for page in ("compare.html", "index.html", "compare/index.html"):
        body = (out / page).read_text().split("<body>", 1)[1]
        assert body.index("near-identical") < body.index("<table"), page


def test_neighbours_are_the_nearest_by_decoder_cosine(site, site_json, saes):
    a = saes[0].W_dec.detach().double()
    b = saes[1].W_dec.detach().double()
    other = json.loads((site / "compare" / "latents.json").read_text())
    for latent, details in site_json["pages"].items():
        cos = [(a[int(latent)] @ b[j] / a[int(latent)].norm() / b[j].norm()).item()
               for j in range(LATENTS)]
        want = sorted(range(LATENTS), key=lambda j: -cos[j])[: CFG["neighbours"]]
        assert [n["latent"] for n in details["neighbours"]] == want
        html = (site / site_json["latents"][int(latent)]["page"]).read_text()
        for j in want:
            assert other["latents"][j]["page"] is not None
            assert f'href="../compare/{other["latents"][j]["page"]}"' in html
            assert (site / "compare" / other["latents"][j]["page"]).is_file()


# delphi's latent cache -------------------------------------------------------------------------


def test_delphi_cache_has_delphis_layout_and_the_firings(site, contexts, naive):
    (hook_dir,) = (site / "delphi").iterdir()
    assert hook_dir.name == "model.layers.0"
    config = json.loads((hook_dir / "config.json").read_text())
    for key in ("dataset_repo", "dataset_split", "dataset_name", "dataset_column", "batch_size",
                "cache_ctx_len", "n_tokens", "n_splits", "model_name"):
        assert key in config
    assert config["cache_ctx_len"] == contexts.shape[1]
    assert config["n_tokens"] == contexts.numel()
    files = sorted(hook_dir.glob("*.safetensors"), key=lambda f: int(f.stem.split("_")[0]))
    assert len(files) == config["n_splits"]
    bounds = [tuple(map(int, f.stem.split("_"))) for f in files]
    assert bounds[0][0] == 0 and bounds[-1][1] == LATENTS - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(bounds, bounds[1:]))  # end inclusive
    got = {}
    for (start, end), f in zip(bounds, files):
        data = load_file(str(f))  # what delphi's TensorBuffer.load reads
        assert set(data) == {"locations", "activations", "tokens"}
        loc, act = data["locations"], data["activations"]
        assert loc.dtype in (np.uint16, np.uint32) and loc.ndim == 2 and loc.shape[1] == 3
        assert act.dtype == np.float16 and act.shape == (loc.shape[0],)
        assert (data["tokens"] == contexts.numpy()).all()
        loc = loc.astype(np.int64)
        loc[:, 2] += start
        assert ((loc[:, 2] >= start) & (loc[:, 2] <= end)).all()
        got.update({tuple(row): a for row, a in zip(loc.tolist(), act.tolist())})
    want = {(c, t, i): v for i, hits in naive["fired"].items() for c, t, v, *_ in hits}
    assert got.keys() == want.keys()
    assert all(got[key] == pytest.approx(want[key], rel=2e-3, abs=1e-4) for key in want)


# The whole command on a corpus file, and refusals ------------------------------------------


def test_the_command_reads_the_recorded_model_and_corpus(tmp_path, corpus, capsys):
    sae = make_sae(seed=0, beta=BETA)
    sae.provenance.corpus = {"dataset": corpus, "context_size": 32}
    sae.save(tmp_path / "sae")
    out = tmp_path / "site"
    args = ["inspect", str(tmp_path / "sae"), "--out", str(out), "--tokens", "150",
            "--top_latents", "2", "--random_latents", "1", "--continuation_tokens", "2"]
    assert gsae_main(args) == 0, capsys.readouterr().err
    result = json.loads((out / "latents.json").read_text())
    assert result["run"]["contexts"] == 5 and result["run"]["context_size"] == 32
    assert result["run"]["model"] == "tiny-llama" and result["run"]["corpus"] == corpus
    assert sum(r["page"] is not None for r in result["latents"]) == 3
    capsys.readouterr()
    assert gsae_main(args) == 2  # a site is replaced only with --overwrite
    assert "is not empty" in capsys.readouterr().err
    (out / "latents.json").write_text("{}")
    assert gsae_main([*args, "--overwrite"]) == 0
    assert json.loads((out / "latents.json").read_text())["run"]["contexts"] == 5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert gsae_main([*args[:3], str(tmp_path / "other")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_bad_settings_are_refused(model, contexts, saes, tmp_path):
    with pytest.raises(GsaeError, match="contexts_per_latent"):
        inspect_contexts(saes[0], model, tiny_tokenizer(), contexts,
                         InspectConfig(out=str(tmp_path / "x"), contexts_per_latent=0))
    first, second = make_sae(seed=0, beta=BETA), make_sae(seed=1, beta=0.0)
    first.provenance.model["fingerprint"], second.provenance.model["fingerprint"] = "a", "b"
    with pytest.raises(GsaeError, match="another model"):
        inspect_contexts(first, model, tiny_tokenizer(), contexts,
                         InspectConfig(out=str(tmp_path / "x")), other=second)
    narrow = SAE(SAEConfig(n_latents=8, k=2), 32, provenance=Provenance(hook="0"))
    with pytest.raises(GsaeError, match="width"):
        inspect_contexts(saes[0], model, tiny_tokenizer(), contexts,
                         InspectConfig(out=str(tmp_path / "x")), other=narrow)


# In a real browser ----------------------------------------------------------------------------


def chromium(url, tmp_path, *extra, local=False):
    """The DOM of `url` after its scripts ran, and the URLs of the network requests the page
    made (from Chromium's net log; the browser's own background requests are left out), with
    every request bound to fail: a closed proxy port and no host resolution (`local`: except
    127.0.0.1, which Chromium never proxies)."""
    rules = "MAP * ~NOTFOUND" + (", EXCLUDE 127.0.0.1" if local else "")
    log = tmp_path / f"net-{len(list(tmp_path.glob('net-*')))}.json"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--proxy-server=http://127.0.0.1:9",
               f"--host-resolver-rules={rules}", f"--log-net-log={log}",
               "--virtual-time-budget=5000", "--dump-dom", *extra, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, page_requests(log)


def page_requests(log):
    net = json.loads(log.read_text())
    start = net["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    starts = [e.get("params", {}) for e in net["events"] if e["type"] == start]
    return [p["url"] for p in starts if "url" in p and p.get("initiator") != "not an origin"]


def table_order(dom):
    body = dom.split('<table id="latents">', 1)[1]
    return [int(i) for i in re.findall(r'<tr[^>]*><td class="l" data-v="(\d+)"', body)]


@needs_chromium
def test_index_renders_and_makes_no_request(site, site_json, tmp_path):
    dom, requests = chromium((site / "index.html").as_uri(), tmp_path)
    assert table_order(dom) == list(range(LATENTS))
    dead = sum(r["dead"] for r in site_json["latents"])
    table = dom.split('<table id="latents">', 1)[1]
    assert table.count('<span class="badge">dead</span>') == dead > 0
    assert "<svg" in dom and 'class="bar"' in dom
    assert requests == []
    for page in site.rglob("*.html"):
        assert not re.search(r"(https?:|ftp:)?//[a-z0-9]", page.read_text(), re.I), page


@needs_chromium
def test_the_request_detector_sees_requests(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<img src="http://example.com/a.png"><script>fetch("https://example.org/b")'
                    '.catch(() => {})</script>')
    _, requests = chromium(page.as_uri(), tmp_path)
    assert {"http://example.com/a.png", "https://example.org/b"} <= set(requests)


@needs_chromium
@pytest.mark.parametrize("key,field,descending",
                         [("freq", "frequency", True), ("mean", "mean_activation", False)])
def test_clicking_a_header_sorts_the_rows(site, site_json, tmp_path, key, field, descending):
    url = (site / "index.html").as_uri() + f"#sort={key},{'desc' if descending else 'asc'}"
    dom, requests = chromium(url, tmp_path)
    assert re.search(f'data-key="{key}"[^>]* data-dir="{"desc" if descending else "asc"}"', dom)
    records = site_json["latents"]
    missing = -math.inf  # dead latents have no mean: they sort below every number

    def value(r):
        v = r[field] if not r["dead"] else missing
        return v if v is not None else missing

    want = sorted(records, key=lambda r: -value(r) if descending else value(r))
    got = table_order(dom)
    assert [value(records[i]) for i in got] == [value(r) for r in want]
    assert got != list(range(LATENTS))
    assert requests == []


@needs_chromium
def test_a_latent_link_opens_its_page_with_its_strips(site, site_json, tmp_path, naive):
    index = (site / "index.html").as_uri()
    dom, _ = chromium(index, tmp_path)
    links = re.findall(r'<a href="(latents/\d+\.html)">(\d+)</a>', dom)
    assert len(links) == len(site_json["pages"])
    for href, latent in (links[0], links[-1]):
        page_dom, requests = chromium(urljoin(index, href), tmp_path)
        assert f"<h1>Latent {latent} of gsae</h1>" in page_dom
        hits = naive["fired"][int(latent)]
        assert page_dom.count('<div class="strip"') == expected_strips(
            [h[2] for h in hits], len({h[0] for h in hits}))
        assert requests == []
    back = re.search(r'<a href="([^"]+)">&larr; all latents</a>|<a href="([^"]+)">← all', page_dom)
    assert back and (back[1] or back[2]) == "../index.html"


# Behaviour that deliberately broken code once got past -------------------------------------------


def test_promoted_tokens_go_through_the_gemma_norm_gain_one_plus_w():
    """Gemma's final norm multiplies by 1 + w: the promoted and suppressed tokens are those of
    the model's own norm and unembedding applied to the direction (up to the norm's positive
    1 / RMS factor)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(vocab_size=512, hidden_size=D, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GemmaForCausalLM(config).eval().requires_grad_(False)
    norm = model.model.norm
    with torch.no_grad():  # a gain with mixed signs: w and 1 + w rank tokens differently
        norm.weight.copy_(torch.linspace(0.2, 3.0, D) * torch.tensor([1, -1] * (D // 2)))
    directions = torch.randn(8, D, generator=torch.Generator().manual_seed(1))
    up, up_values, down, _ = top_tokens(model, directions, 3)
    with torch.no_grad():
        reference = model.lm_head(norm(directions))
    assert torch.equal(up, reference.topk(3).indices)
    assert torch.equal(down, reference.topk(3, largest=False).indices)
    inverse_rms = (directions.pow(2).mean(1, keepdim=True) + norm.eps).rsqrt()
    assert torch.allclose(up_values * inverse_rms, reference.topk(3).values, rtol=1e-4)
    with_w_alone = (directions * norm.weight) @ model.lm_head.weight.T
    assert not torch.equal(with_w_alone.topk(3).indices, up)  # the test can tell them apart


def test_only_contexts_where_the_latent_fires_are_top_examples():
    act = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 1.0], [float("nan"), 0.0, 0.0],
                        [-1.0, -3.0, 0.0], [0.5, 0.0, 0.0]])
    assert top_positions(act, 5) == [(1, 1), (4, 0)]
    assert top_positions(act, 1) == [(1, 1)]


def visible_rows(dom):
    """Latent ids of the table rows the page shows (not hidden), in order."""
    body = dom.split('<table id="latents">', 1)[1]
    return [int(i) for attrs, i in re.findall(r'<tr([^>]*)><td class="l" data-v="(\d+)"', body)
            if "hidden" not in attrs]


@needs_chromium
def test_the_index_pages_through_every_latent(site, tmp_path):
    shown = []
    for page in (1, 2, 3):
        dom, requests = chromium((site / "index.html").as_uri() + f"#page={page}", tmp_path)
        shown.append(visible_rows(dom))
        assert f"{LATENTS} latents match; page {page} of 3" in dom
        assert requests == []
    assert [len(rows) for rows in shown] == [ROWS_PER_PAGE, ROWS_PER_PAGE, LATENTS - 32]
    assert sum(shown, []) == list(range(LATENTS))


@needs_chromium
def test_the_filter_finds_latents_by_id_and_by_token(site, site_json, tmp_path):
    records = site_json["latents"]
    index = (site / "index.html").as_uri()
    dom, _ = chromium(index + "#q=" + quote("7, 31"), tmp_path)
    assert visible_rows(dom) == [7, 31]
    counts = {}
    for r in records:
        for token in set(r["top_tokens"] + r["promoted"]):
            counts[token] = counts.get(token, 0) + 1
    query = next(t for t, n in sorted(counts.items(), key=lambda kv: -kv[1])
                 if t.strip().isalpha() and 1 < n < LATENTS).strip().swapcase()  # any case
    want = [r["latent"] for r in records if any(query.lower() in t.lower()
                                                for t in r["top_tokens"] + r["promoted"])]
    dom, requests = chromium(index + "#q=" + quote(query), tmp_path)
    assert visible_rows(dom) == want[:ROWS_PER_PAGE] and 0 < len(want) < LATENTS
    assert f"{len(want)} latents match" in dom
    assert requests == []


@needs_chromium
def test_every_column_header_explains_itself(site, tmp_path):
    dom, _ = chromium((site / "index.html").as_uri(), tmp_path)
    head = dom.split('<table id="latents">', 1)[1].split("</thead>", 1)[0]
    titles = dict(re.findall(r'<th data-key="(\w+)" title="([^"]+)"', head))
    assert list(titles) == [key for key, *_ in browser_site.COLUMNS]
    assert "percent" in titles["freq"] and "encoded tokens" in titles["freq"]
    assert "nats" in titles["abs_effect"] and "where it fires" in titles["abs_effect"]
    assert all(len(text) > 40 for text in titles.values())


def test_the_compared_sae_steers_the_partners_of_the_inspected_pages(site, site_json):
    other = json.loads((site / "compare" / "latents.json").read_text())
    partners = {d["neighbours"][0]["latent"] for d in site_json["pages"].values()}
    assert set(map(int, other["pages"])) > partners  # further neighbours have pages too
    for latent, details in other["pages"].items():
        live = not other["latents"][int(latent)]["dead"]
        assert (len(details["steering"]) == 3) == (int(latent) in partners and live)
        html = (site / "compare" / other["latents"][int(latent)]["page"]).read_text()
        assert ("a further neighbour" in html) == (int(latent) not in partners)


def test_prompts_of_one_length_share_a_run_and_keep_their_texts(model, monkeypatch):
    monkeypatch.setattr(browser_steering, "PROMPTS", ("abcdef", "ghijkl", "xyz"))
    runs = []
    real = browser_steering.greedy
    monkeypatch.setattr(browser_steering, "greedy",
                        lambda *a, **k: runs.append(a[2].shape) or real(*a, **k))
    gen = torch.Generator().manual_seed(7)
    directions = {("a", 3): F.normalize(torch.randn(D, generator=gen), dim=0),
                  ("b", 3): F.normalize(torch.randn(D, generator=gen), dim=0)}
    typical = {("a", 3): 4.0, ("b", 3): 9.0}
    tokenizer = tiny_tokenizer()
    got = browser_steering.continuations(model, model.model.layers[0], tokenizer, directions,
                                         typical, skip_first=1, new_tokens=4)
    assert runs == [(2 * 5, 6), (5, 3)]  # two 6-byte prompts in one run, 5 rows each
    for key, prompts in got.items():
        for entry in prompts:
            ids = torch.tensor(tokenizer(entry["prompt"])["input_ids"])
            for c in entry["continuations"]:
                vector = c["multiple"] * typical[key] * directions[key]
                want = conftest.naive_greedy(model, ids, vector, 1, 4)
                assert c["text"] == tokenizer.decode(want)
