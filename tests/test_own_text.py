"""Your own text: `gsae.activations` against a hand-written forward and backward, and
`gsae steer --latent N --prompt TEXT` against greedy decoding recomputed from scratch, on the
tiny model."""

from functools import partial

import conftest
import pytest
import torch
import torch.nn.functional as F

import gsae
from gsae.cli import main
from gsae.evaluate import EvalConfig, eval_contexts
from gsae.text import DataConfig
from gsae.tiny import tiny_llama, tiny_tokenizer

D = 64
TEXTS = ["The cat sat on the mat.", "Paris is a city"]


def hand_states(model, ids):
    """Layer-0 output x [T, d] and g = d(summed next-token CE)/dx of one token list."""
    seen = {}

    def hook(_module, _inputs, output):
        h = (output[0] if isinstance(output, tuple) else output).detach().requires_grad_(True)
        seen["x"] = h
        return (h, *output[1:]) if isinstance(output, tuple) else h

    tokens = torch.tensor([ids])
    handle = model.model.layers[0].register_forward_hook(hook)
    try:
        logits = model(input_ids=tokens).logits
    finally:
        handle.remove()
    loss = F.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="sum")
    (g,) = torch.autograd.grad(loss, seen["x"])
    return seen["x"].detach()[0], g[0]


def test_activations_are_the_hand_computed_x_and_g():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    x, g = gsae.activations(TEXTS, hook=0, model=model, tokenizer=tokenizer)
    want = [hand_states(model, tokenizer(t)["input_ids"]) for t in TEXTS]
    assert x.shape == (sum(len(tokenizer(t)["input_ids"]) for t in TEXTS), D)
    torch.testing.assert_close(x, torch.cat([w[0] for w in want]))
    torch.testing.assert_close(g, torch.cat([w[1] for w in want]), rtol=1e-4, atol=1e-6)
    assert g[-1].abs().max() == 0 and g[0].abs().max() > 0  # the last token predicts nothing
    by_name = gsae.activations(TEXTS[1], hook="model.layers.0", model="tiny-llama")
    torch.testing.assert_close(by_name[0], want[1][0])


def test_activations_refuse_what_they_cannot_read():
    with pytest.raises(gsae.GsaeError, match="no texts"):
        gsae.activations([], hook=0, model="tiny-llama")
    with pytest.raises(gsae.GsaeError, match="tokenizer"):
        gsae.activations("hi", hook=0, model=tiny_llama())
    with pytest.raises(gsae.GsaeError, match="empty"):
        gsae.activations("", hook=0, model="tiny-llama")


# gsae steer --latent N --prompt TEXT ----------------------------------------------------------


make_sae = partial(conftest.make_sae, d_in=D, n_latents=32, k=4, beta=100.0, hook="0",
                   weights="noisy_bias", dead=1)


def naive_typical(model, sae, pool):
    """Per latent, the mean of its non-zero gradient-free values at positions 1..T-2."""
    values = {}
    for tokens in pool:
        x, _ = hand_states(model, tokens.tolist())
        for t in range(1, pool.shape[1] - 1):
            v, idx, _ = sae.encode(x[t][None].detach())
            for i, a in zip(idx[0].tolist(), v[0].tolist()):
                if a > 0:
                    values.setdefault(i, []).append(a)
    return {i: sum(v) / len(v) for i, v in values.items()}


@pytest.fixture
def saved_sae(tmp_path, corpus):
    sae = make_sae()
    sae.provenance.corpus = {"dataset": corpus, "context_size": 32}
    sae.save(tmp_path / "a-long-folder-name-that-a-table-must-not-cut-from-the-left" / "sae")
    return sae, str(tmp_path / "a-long-folder-name-that-a-table-must-not-cut-from-the-left" / "sae")


def test_steer_prompt_prints_the_recomputed_continuations(saved_sae, corpus, capsys):
    sae, folder = saved_sae
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    pool = eval_contexts(DataConfig(dataset=corpus, context_size=32), tokenizer,
                         EvalConfig(eval_tokens=4 * 32, seed=0))
    typical = naive_typical(model, sae, pool)
    latent = max(typical, key=lambda i: (typical[i], -i))
    prompt = "hello there"
    code = main(["steer", folder, "--latent", str(latent), "--prompt", prompt, "--alphas", "2",
                 "5", "--pool", "4", "--steer.context_size", "0", "--new_tokens", "5"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"typical activation {typical[latent]:.4g}" in out.out and folder in out.out
    ids = tokenizer(prompt)["input_ids"]
    direction = sae.W_dec.detach()[latent]
    steer = conftest.naive_greedy
    texts = [tokenizer.decode(steer(model, ids, m * typical[latent] * direction, 1, 5))
             for m in (0, 2, 5)]
    for label, text in zip(("clean", "2x", "5x"), texts):
        line = next(li for li in out.out.splitlines() if li.strip().startswith(label))
        assert line.endswith(f": {text!r}"), (line, text)
    assert len(set(texts)) > 1  # steering changed something


@pytest.mark.parametrize("args,message", [
    (["--latent", "3"], "go together"),
    (["--prompt", "hi"], "go together"),
    (["--latent", "32", "--prompt", "hi"], "does not exist"),
    (["--latent", "31", "--prompt", "hi"], "never fired"),
])
def test_steer_prompt_refusals(saved_sae, capsys, args, message):
    code = main(["steer", saved_sae[1], "--pool", "4", "--steer.context_size", "0", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
