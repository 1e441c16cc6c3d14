"""Training under torchrun on CPU (gloo, 2 processes, the tiny model): data-parallel training
gives the SAEs of one-process training, a killed run resumes, and a sweep splits across ranks."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gsae import distributed
from gsae.cli import main

SAE_DIR = Path("model.layers.1") / "k4-beta20-z-x2-s0"


def train_args(corpus, out, tokens):
    return ["--model", "tiny-llama", "--dataset", corpus, "--context_size", "64", "--hooks", "1",
            "--lm_batch_size", "3", "--tokens", str(tokens), "--batch_tokens", "128",
            "--shuffle_tokens", "512", "--expansion_factor", "2", "--k", "4", "--beta", "20",
            "--lr", "3e-3", "--dead_tokens", "500", "--log_every", "5",
            "--checkpoint_every", "10", "--out", str(out)]


def torchrun(args):
    """`torchrun --nproc_per_node 2 -m gsae train ARGS`, started in the background."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "gsae", "train", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def weights(run):
    return load_file(str(run / SAE_DIR / "sae.safetensors"))


def assert_same_weights(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


def log(run):
    return [json.loads(line) for line in (run / SAE_DIR / "log.jsonl").open()]


def test_two_ranks_train_the_saes_of_one_process(corpus, tmp_path):
    out = finish(torchrun(train_args(corpus, tmp_path / "two", 3000)))
    assert out.count("trained 1 SAE(s)") == 1  # only rank 0 prints
    assert main(["train", *train_args(corpus, tmp_path / "one", 3000)]) == 0
    assert_same_weights(weights(tmp_path / "two"), weights(tmp_path / "one"))
    two, one = log(tmp_path / "two"), log(tmp_path / "one")  # rank 0's log: global metrics
    assert [r["step"] for r in two] == [r["step"] for r in one] and two[-1]["tokens"] >= 3000
    for a, b in zip(two, one):
        assert a["tokens"] == b["tokens"] and a["dead_fraction"] == b["dead_fraction"]
        for key in ("fvu", "auxk", "l0", "effect"):
            assert abs(a[key] - b[key]) < 1e-4 * (1 + abs(b[key])), key


def ranks(args):
    """Two ranks of `gsae train ARGS` started directly, with the environment torchrun gives them
    (to spare the test torchrun's own start-up, and to let it kill the ranks themselves)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-m", "gsae", "train", *args],
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(2)]


def test_a_killed_two_rank_run_resumes(corpus, tmp_path):
    run, snapshot = tmp_path / "run", tmp_path / "snapshot"
    args = train_args(corpus, run, 128 * 60)
    procs = ranks(args)
    state = run / SAE_DIR / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while not state.exists():
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    saved = json.loads(state.read_text())
    assert not saved["finished"] and 10 <= saved["step"] < 60
    shutil.copytree(run, snapshot)
    logged_before = len(log(run))
    for p in ranks([*args, "--resume"]):
        finish(p)
    resumed = log(run)[logged_before:]
    assert resumed[0]["step"] == saved["step"] + 5 and resumed[-1]["step"] == 60
    assert json.loads(state.read_text())["finished"]
    # One process resuming the same checkpoint trains the same SAE.
    two_ranks = weights(run)
    shutil.rmtree(run)
    shutil.copytree(snapshot, run)
    assert main(["train", *args, "--resume"]) == 0
    assert_same_weights(two_ranks, weights(run))


def test_a_sweep_split_across_ranks_trains_each_sae_once(corpus, tmp_path, monkeypatch):
    """Each rank of a --distribute_sweep run (played here one after the other: rank 1 first, as
    rank 0 writes run.json) trains its share of the sweep exactly as one process would. Real
    ranks all check the folder before any writes; played in turn, rank 0 would find rank 1's
    SAEs, so it is told to --overwrite (which touches only its own share and run.json)."""
    sweep = ["--k", "4,8", "--beta", "0,20"]
    assert main(["train", *train_args(corpus, tmp_path / "one", 1000), *sweep]) == 0
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    monkeypatch.setattr(distributed, "gather_objects", lambda obj: [obj])
    for rank in (1, 0):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        args = [*train_args(corpus, tmp_path / "split", 1000), *sweep, "--distribute_sweep",
                *(["--overwrite"] if rank == 0 else [])]
        assert main(["train", *args]) == 0
        trained = sorted(p.parent.name for p in (tmp_path / "split").glob("*/*/sae.safetensors"))
        assert len(trained) == 2 * (2 - rank)
    assert (tmp_path / "split" / "run.json").exists()
    for folder in (tmp_path / "one" / "model.layers.1").iterdir():
        split = load_file(str(tmp_path / "split" / "model.layers.1" / folder.name
                              / "sae.safetensors"))
        assert_same_weights(split, load_file(str(folder / "sae.safetensors")))


def test_two_ranks_finetune_the_saes_of_one_process(corpus, tmp_path):
    """Under torchrun each rank fine-tunes on its share of every batch of contexts; the ranks'
    losses add up to the whole batch's, so the SAEs are those of one process."""
    assert main(["train", *train_args(corpus, tmp_path / "parent", 640)]) == 0
    args = [str(tmp_path / "parent" / SAE_DIR), "--tokens", "744", "--lm_batch_size", "4",
            "--outlier_factor", "0", "--lr", "1e-2", "--log_every", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "gsae", "finetune", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert finish(proc).count("fine-tuned 1 SAE(s)") == 1
    assert main(["finetune", *args, "--out", str(tmp_path / "one")]) == 0
    assert_same_weights(weights(tmp_path / "two"), weights(tmp_path / "one"))
    two, one = log(tmp_path / "two"), log(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for key in ("kl", "mse", "fvu", "l0"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4), key
