"""`gsae serve` on the tiny model: its API against a hand-written forward and backward and
greedy decoding recomputed from scratch, its page in a real headless Chromium, its refusals."""

import html
import re
import threading
import time
from urllib.parse import urlencode

import pytest
from conftest import naive_greedy
from starlette.testclient import TestClient
from test_browser import chromium, needs_chromium, select
from test_own_text import hand_states, make_sae

from gsae.browser import serve as serve_module
from gsae.browser.serve import ServeRun, load_reader, make_app
from gsae.cli import main
from gsae.models import ModelConfig
from gsae.tiny import tiny_llama, tiny_tokenizer

TEXT = "The cat sat on the mat, and the dog sat on the log."
BETA = 200.0


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    sae = make_sae()
    sae.cfg.beta = BETA  # a g-SAE: the page shows its gradient-aware selection
    folder = tmp_path_factory.mktemp("serve") / "sae"
    sae.save(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reader(sae_folder):
    return load_reader(ServeRun(saes=[sae_folder], model=ModelConfig(model="tiny-llama")))


@pytest.fixture(scope="module")
def client(reader):
    return TestClient(make_app(reader))


def naive_tokens(sae, text):
    """Per token from position 1: the selected (latent, value, value * d.g), largest first."""
    tokenizer = tiny_tokenizer()
    ids = tokenizer(text)["input_ids"]
    x, g = hand_states(tiny_llama(), ids)
    W_dec = sae.W_dec.detach().double()
    out = [None]
    for t in range(1, len(ids)):
        idx, values = select(sae, x[t].double(), g[t].double(), sae.beta)
        chosen = [(i, v, v * (W_dec[i] @ g[t].double()).item()) for i, v in zip(idx, values)
                  if v > 0]
        out.append(sorted(chosen, key=lambda c: -c[1]))
    return out


def test_read_gives_the_hand_computed_values_and_top_latents(client, reader):
    sae = reader.loaded.saes[0]
    assert sae.beta == BETA
    want = naive_tokens(sae, TEXT)
    latent = max(range(32), key=lambda i: sum(any(c[0] == i for c in w) for w in want[1:]))
    got = client.post("/api/read", json={"text": TEXT, "latent": latent}).json()
    assert len(got["tokens"]) == len(want) and not got["tokens"][0]["encoded"]
    for token, chosen in zip(got["tokens"][1:], want[1:]):
        hit = [c for c in chosen if c[0] == latent]
        assert token["value"] == pytest.approx(hit[0][1] if hit else 0.0, rel=1e-4, abs=1e-6)
        assert token["effect"] == pytest.approx(hit[0][2] if hit else 0.0, rel=1e-3, abs=1e-6)
        assert [t["latent"] for t in token["top"]] == [c[0] for c in chosen]
    assert any(t.get("value") for t in got["tokens"]) and not all(
        t.get("value") for t in got["tokens"][1:])


def test_steer_gives_the_recomputed_continuations(client, reader):
    sae = reader.loaded.saes[0]
    ids = tiny_tokenizer()("hello there")["input_ids"]
    got = client.post("/api/steer", json={"prompt": "hello there", "latent": 4, "alpha": 6.0,
                                          "new_tokens": 5}).json()
    decode = tiny_tokenizer().decode
    direction = sae.W_dec.detach()[4]
    assert got["clean"] == decode(naive_greedy(tiny_llama(), ids, 0 * direction, 1, 5))
    assert got["steered"] == decode(naive_greedy(tiny_llama(), ids, 6.0 * direction, 1, 5))
    assert got["clean"] != got["steered"]


@pytest.mark.parametrize("path,body,message", [
    ("/api/read", {"text": TEXT, "latent": 32}, "does not exist"),
    ("/api/read", {"text": "  ", "latent": 1}, "non-empty"),
    ("/api/read", {"text": TEXT, "latent": "1"}, "whole number"),
    ("/api/read", {"text": TEXT, "sae": 3}, "sae must be"),
    ("/api/steer", {"prompt": "hi", "latent": 1, "alpha": 1, "new_tokens": 500}, "new_tokens"),
    ("/api/steer", {"prompt": "hi", "latent": 1, "alpha": "x"}, "alpha"),
])
def test_bad_requests_get_one_line(client, path, body, message):
    response = client.post(path, json=body)
    assert response.status_code == 400 and message in response.json()["error"]
    assert "\n" not in response.json()["error"]
    bad = client.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"]


def test_the_command_says_it_serves_this_machine_only(sae_folder, monkeypatch, capsys):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    assert main(["serve", sae_folder, "--model", "tiny-llama", "--port", "8765"]) == 0
    out = capsys.readouterr().out
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8765
    assert "http://127.0.0.1:8765/" in out and "this machine only" in out
    assert serve_module.ServeRun().host == "127.0.0.1"


# In a real browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(reader):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(make_app(reader), host="127.0.0.1", port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    while not running.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join(10)


@needs_chromium
def test_the_page_reads_text_shows_top_latents_and_steers(server, reader, tmp_path):
    sae = reader.loaded.saes[0]
    want = naive_tokens(sae, TEXT)
    latent = want[3][0][0]
    query = urlencode({"text": TEXT, "latent": latent, "token": 3, "prompt": "hello there",
                       "alpha": 6, "new_tokens": 5, "run": 1})
    dom, requests = chromium(f"{server}/?{query}", tmp_path, local=True)
    assert 'data-ready="1"' in dom
    spans = re.findall(r'<span class="tok[^"]*" data-index="(\d+)"([^>]*)>', dom)
    assert len(spans) == len(want)
    for (_, attrs), chosen in zip(spans[1:], want[1:]):
        hit = [c for c in chosen if c[0] == latent]
        value = float(re.search(r'data-value="([^"]+)"', attrs)[1])
        assert value == pytest.approx(hit[0][1] if hit else 0.0, rel=1e-4, abs=1e-6)
    top = dom.split('id="top"', 1)[1].split("</table>", 1)[0]
    assert [int(i) for i in re.findall(r'<tr data-latent="(\d+)"', top)] == [
        c[0] for c in want[3]]
    ids = tiny_tokenizer()("hello there")["input_ids"]
    steered = tiny_tokenizer().decode(naive_greedy(tiny_llama(), ids, 6 * sae.W_dec.detach()[
        latent], 1, 5))
    shown = re.search(r'id="steered"[^>]*>(.*?)</td>', dom, re.S)[1]
    assert html.unescape(shown) == steered
    assert requests and all(r.startswith(server + "/") for r in requests)

