"""What training must do, checked against independent references: a run killed with SIGKILL
and resumed ends bit for bit where an uninterrupted one does."""

import json
import multiprocessing
import os
import random
import time

import pytest
import torch
from safetensors.torch import load_file

from gsae.cli import main

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
