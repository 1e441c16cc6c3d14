"""What training must do, checked against independent references: a run killed with SIGKILL
and resumed ends bit for bit where an uninterrupted one does; planted features are recovered;
dead latents are the ones that did not fire, and AuxK teaches them; the decoder moves on the
unit sphere."""

import json
import multiprocessing
import os
import random
import tempfile
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from gsae import SAE, SAEConfig
from gsae.batch import Batch
from gsae.cli import main
from gsae.models import ModelConfig, load_model
from gsae.pipeline import CacheRun, cache, context_batches
from gsae.source import ActivationSource
from gsae.store import StoreConfig, StoreReader
from gsae.text import DataConfig
from gsae.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------ killed and resumed


@pytest.fixture(scope="module")
def forked():
    """Processes forked from a server that imported gsae once (a fresh interpreter per run
    would spend seconds importing), each running the language model on one thread."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["gsae.cli"])
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by torch when the server imports it
    try:
        boot = ctx.Process(target=os.getpid)
        boot.start()
        boot.join()
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    return ctx


def start(ctx, argv):
    process = ctx.Process(target=main, args=(argv,))
    process.start()
    return process


def kill(process):
    """SIGKILL; True if the process was still running."""
    alive = process.is_alive()
    if alive:
        process.kill()
    process.join()
    return alive


def wait_until(ready, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not ready() and process.is_alive():
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.002)


def checkpoint_state(out):
    """The run-level checkpoint's state (None while there is none or it is being swapped)."""
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError):
        return None


def train_args(data, out):
    return ["train", *data, "--hooks", "0", "1", "--tokens", "2048", "--batch_tokens", "64",
            "--shuffle_tokens", "256", "--expansion_factor", "2", "--k", "4", "--beta", "0,10",
            "--lr", "3e-3", "--dead_tokens", "300", "--checkpoint_every", "3", "--log_every", "2",
            "--out", str(out)]


def sae_files(run):
    return sorted(p.relative_to(run) for p in run.glob("*/*/sae.safetensors"))


def log_records(path):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in path.open()]


@pytest.mark.parametrize("source", ["stream", "store"])
def test_runs_killed_at_random_moments_resume_to_the_same_weights(forked, corpus, tmp_path,
                                                                  source):
    model = ["--model", "tiny-llama", "--dataset", corpus, "--context_size", "32",
             "--lm_batch_size", "4"]
    data = model
    if source == "store":
        store = tmp_path / "store"
        cache = start(forked, ["cache", *model, "--hooks", "0", "1", "--store", str(store),
                               "--tokens", "900", "--batches_per_shard", "1"])
        cache.join()
        assert (store / "manifest.json").exists()
        data = ["--store", str(store)]  # 900 stored rows: training passes over them twice
    start(forked, train_args(data, tmp_path / "ref")).join()
    moments = checkpoint_state(tmp_path / "ref")["moment"]
    out = tmp_path / "cut"
    args = train_args(data, out)
    # Killed as soon as it has claimed its folder: before its first checkpoint.
    first = start(forked, args)
    wait_until((out / "run.json").exists, first)
    assert kill(first) and checkpoint_state(out) is None
    # Killed at random moments after the checkpoints of random (increasing) numbers: while it
    # trains, writes a checkpoint or a log line, or starts again; each resumed by the next run.
    rng = random.Random(source)
    for target in sorted(rng.sample(range(1, moments - 1), 3)):
        run = start(forked, [*args, "--resume"])
        wait_until(lambda t=target: (checkpoint_state(out) or {}).get("moment", 0) >= t, run)
        time.sleep(rng.uniform(0, 0.05))
        assert kill(run)
    start(forked, [*args, "--resume"]).join()
    assert checkpoint_state(out)["finished"]
    assert sae_files(out) == sae_files(tmp_path / "ref") and len(sae_files(out)) == 4
    for path in sae_files(out):
        got, expected = load_file(str(out / path)), load_file(str(tmp_path / "ref" / path))
        for name in expected:
            assert torch.equal(got[name], expected[name]), (path, name)
        log = path.parent / "log.jsonl"
        assert log_records(out / log) == log_records(tmp_path / "ref" / log)


# ------------------------------------------------------------------ planted features


def planted_chunks(n_chunks, rows=256, d=32, n_features=64, active=3, seed=0):
    """Rows that are sums of `active` of `n_features` known unit directions (the features),
    with coefficients in [1, 3]; no gradient (plain TopK selection)."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=gen, dtype=torch.float64)
    features = (features / features.norm(dim=1, keepdim=True)).float()
    chunks = []
    for _ in range(n_chunks):
        idx = torch.rand(rows, n_features, generator=gen).argsort(1)[:, :active]
        coef = torch.rand(rows, active, generator=gen) * 2 + 1
        chunks.append({"h": Batch(torch.einsum("na,nad->nd", coef, features[idx]), None, "h")})
    return features, chunks


def recovered(sae, features):
    """The fraction of the features that some decoder row matches with cosine > 0.9."""
    cosine = features @ sae.W_dec.detach().T  # both unit-norm
    return (cosine.max(1).values > 0.9).float().mean().item()


def planted_run(tmp_path, asleep=0, n_chunks=100, **train_kwargs):
    """Train 64 latents on 64 planted features; the last `asleep` latents start with tiny
    encoder rows and a small positive bias, so the main TopK never picks them: only AuxK,
    which needs them counted as dead, can teach them the features the others leave."""
    features, chunks = planted_chunks(n_chunks)
    cfg = TrainConfig(out=str(tmp_path / "planted"), tokens=256 * n_chunks, batch_tokens=256,
                      shuffle_tokens=1024, lr=1e-2, warmup_steps=5, dead_tokens=1000,
                      checkpoint_every=10**6, log_every=10, **train_kwargs)
    sae = SAE(SAEConfig(n_latents=64, k=3, beta=0.0), 32)
    with torch.no_grad():
        sae.W_enc[64 - asleep:] *= 1e-3
        sae.b_enc[64 - asleep:] = 0.05
    asleep_rows = sae.W_dec[64 - asleep:].detach().clone()
    Trainer.create([(sae, "h")], cfg).fit(chunks)
    return recovered(sae, features), asleep_rows, sae


def test_planted_features_are_recovered(tmp_path):
    assert planted_run(tmp_path)[0] >= 0.9


def test_auxk_teaches_latents_that_never_fire_the_missing_features(tmp_path):
    assert planted_run(tmp_path, asleep=32)[0] >= 0.9
    # Without AuxK about a quarter of the features stay unlearned.
    assert planted_run(tmp_path, asleep=32, auxk_coef=0.0)[0] < 0.85
    # Early on, nothing but AuxK moves the sleeping latents' decoder rows.
    for auxk_coef, share_moved in ((0.0, 0.0), (1 / 32, 1.0)):
        _, before, sae = planted_run(tmp_path, asleep=32, n_chunks=12, auxk_coef=auxk_coef)
        moved = ((sae.W_dec[32:] - before).abs().amax(1) > 1e-3).float().mean().item()
        assert moved == share_moved, auxk_coef


# ----------------------------------------------------------------------- dead latents


def test_dead_latents_are_those_that_have_not_fired_for_dead_tokens(tmp_path):
    """Half the latents always fire (a large positive bias), half never can (a large negative
    one) though TopK selects a few of them in every row with the value 0: those count as dead
    once `dead_tokens` tokens have gone by, the others never."""
    gen = torch.Generator().manual_seed(0)
    chunks = [{"h": Batch(torch.randn(64, 8, generator=gen), None, "h")} for _ in range(12)]
    sae = SAE(SAEConfig(n_latents=32, k=20, beta=0.0), 8)
    with torch.no_grad():
        sae.b_enc[:16], sae.b_enc[16:] = 100.0, -100.0
    cfg = TrainConfig(out=str(tmp_path / "run"), tokens=64 * 12, batch_tokens=64,
                      shuffle_tokens=128, lr=1e-6, dead_tokens=320, log_every=1,
                      checkpoint_every=10**6)
    trainer = Trainer.create([(sae, "h")], cfg)
    trainer.fit(chunks)
    log = [json.loads(line) for line in trainer.members[0].log_file.open()]
    assert [r["tokens"] for r in log[:5]] == [64, 128, 192, 256, 320]
    assert [r["dead_fraction"] for r in log] == [0.0] * 4 + [0.5] * (len(log) - 4)
    assert all(r["l0"] == 16 for r in log)  # 20 selected, 16 of them firing


# ------------------------------------------------------------------ the decoder's sphere


def test_parallel_gradient_removal_gives_the_gradient_on_the_unit_sphere():
    """At unit-norm rows, the gradient of a loss of the normalised rows, W / |W|, is the
    gradient of the loss with each row's own component removed."""
    sae = SAE(SAEConfig(n_latents=12, k=3, beta=0.0), 5)
    target = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))

    def loss_of(w):
        return ((w * target).sum(1) ** 2).sum() + (w**3).sum()

    w = sae.W_dec
    (on_sphere,) = torch.autograd.grad(loss_of(w / w.norm(dim=1, keepdim=True)), w)
    (sae.W_dec.grad,) = torch.autograd.grad(loss_of(w), w)
    sae.remove_parallel_grads()
    torch.testing.assert_close(sae.W_dec.grad, on_sphere, rtol=1e-5, atol=1e-6)
    assert on_sphere.norm() > 1


def reference_step(sae, x, lr):
    """One training step written independently of the package: the FVU of a TopK selection
    (taken as given) with the decoder rows normalised inside the loss, so that the gradient
    reaching W_dec lies on the unit sphere; then plain Adam and renormalised rows."""
    sae = SAE.load(sae.save(tempfile.mkdtemp()))  # an independent copy
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        indices = sae.encode(x).indices
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    values = torch.relu(pre.gather(1, indices))
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    x_hat = (values[:, :, None] * rows[indices]).sum(1) + sae.b_dec
    loss = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    loss.backward()
    opt.step()
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    return sae


def test_a_training_step_moves_the_decoder_on_the_unit_sphere(tmp_path):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 2 + 1
    sae = SAE(SAEConfig(n_latents=16, k=3, beta=0.0), 8)
    expected = reference_step(sae, x, lr=1e-2)
    cfg = TrainConfig(out=str(tmp_path / "run"), tokens=64, batch_tokens=64, shuffle_tokens=128,
                      lr=1e-2, warmup_steps=0, decay_fraction=0.0, b_dec_init="mean")
    Trainer.create([(sae, "h")], cfg).fit([{"h": Batch(x, None, "h")}])  # one step, all rows
    for name, p in expected.named_parameters():
        torch.testing.assert_close(getattr(sae, name), p, rtol=0, atol=1e-5, msg=name)
    assert (sae.W_dec - SAE(SAEConfig(n_latents=16, k=3, beta=0.0), 8).W_dec).abs().max() > 1e-3


# ------------------------------------------------------------------------------ the store


def test_a_float32_store_gives_back_exactly_what_the_source_computed(corpus, tmp_path):
    run = CacheRun(model=ModelConfig(model="tiny-llama"),
                   data=DataConfig(dataset=corpus, context_size=32))
    run.source.hooks, run.source.lm_batch_size = ["1"], 4
    dtype_field = "dtype" if "dtype" in StoreConfig.__dataclass_fields__ else "store_dtype"
    run.store = replace(run.store, store=str(tmp_path / "store"), tokens=300,
                        batches_per_shard=1, **{dtype_field: "float32"})
    cache(run)
    reader = StoreReader(run.store.store)
    model, tokenizer = load_model(run.model)
    source = ActivationSource(model, run.source)
    contexts = context_batches(run.data, tokenizer, run.source.lm_batch_size)
    for shard, tokens in zip(reader.shards, contexts):
        (stored,), (computed,) = reader.read_shard(shard).values(), source.batches(tokens).values()
        assert torch.equal(stored.x, computed.x) and torch.equal(stored.g, computed.g)
    assert len(reader.shards) >= 2
