"""The `gsae` command end to end on the tiny model: training, sweeps, the store, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gsae import SAE
from gsae.cli import main
from gsae.models import ModelConfig, load_model
from gsae.source import ActivationSource, SourceConfig
from gsae.store import StoreWriter
from gsae.text import DataConfig, batched_contexts, token_contexts


def common(corpus, out):
    return ["--model", "tiny-llama", "--dataset", corpus, "--context_size", "64",
            "--hooks", "1", "--lm_batch_size", "4", "--out", str(out)]


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_sweep_lowers_fvu_and_saves_each_sae(corpus, tmp_path, capsys):
    args = common(corpus, tmp_path / "run") + [
        "--tokens", "8000", "--batch_tokens", "256", "--shuffle_tokens", "1024",
        "--expansion_factor", "4", "--k", "8", "--beta", "0,20", "--lr", "3e-3",
        "--dead_tokens", "2000"]
    code, out, err = run(["train", *args], capsys)
    assert code == 0, err
    folders = sorted((tmp_path / "run" / "model.layers.1").iterdir())
    assert [f.name for f in folders] == ["k8-beta0-z-x4-s0", "k8-beta20-z-x4-s0"]
    for folder in folders:
        log = [json.loads(line) for line in (folder / "log.jsonl").open()]
        assert log[-1]["tokens"] >= 8000
        assert log[-1]["fvu"] < 0.6 * log[0]["fvu"]
        sae = SAE.load(folder)
        assert sae.d_in == 64 and sae.n_latents == 256 and sae.metadata["hook"] == "model.layers.1"
    assert "trained 2 SAE(s)" in out and "FVU" in out
    run_cfg = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [c["beta"] for c in run_cfg["recorded"]["saes"]] == [0.0, 20.0]
    assert run_cfg["sae"]["beta"] == [0.0, 20.0] and run_cfg["train"]["tokens"] == 8000


def test_store_equals_stream_and_resumes_after_a_kill(corpus, tmp_path, capsys, monkeypatch):
    store_args = ["--model", "tiny-llama", "--dataset", corpus, "--context_size", "64",
                  "--hooks", "0", "1", "--lm_batch_size", "4", "--tokens", "2000",
                  "--store_dtype", "float32", "--batches_per_shard", "2"]
    code, _, err = run(["cache", "--store", str(tmp_path / "full"), *store_args], capsys)
    assert code == 0, err
    # The stored rows equal what the source streams for the same contexts, bitwise.
    model, tok = load_model(ModelConfig(model="tiny-llama"))
    source = ActivationSource(model, SourceConfig(hooks=["0", "1"]))
    data = DataConfig(dataset=corpus, context_size=64)
    first_two = list(batched_contexts(token_contexts(data, tok, "train"), 4))[:2]
    streamed = [source.batches(t) for t in first_two]
    shard = load_file(str(tmp_path / "full" / "shard-000000.safetensors"))
    for hook in ("model.layers.0", "model.layers.1"):
        assert torch.equal(shard[f"{hook}.x"], torch.cat([s[hook].x for s in streamed]))
        assert torch.equal(shard[f"{hook}.g"], torch.cat([s[hook].g for s in streamed]))
    # A run killed after its second shard, then rerun, gives the same store.
    real_write = StoreWriter.write_shard
    calls = []

    def dying_write(self, chunks):
        real_write(self, chunks)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(StoreWriter, "write_shard", dying_write)
    code, _, _ = run(["cache", "--store", str(tmp_path / "cut"), *store_args], capsys)
    assert code == 130
    monkeypatch.setattr(StoreWriter, "write_shard", real_write)
    code, _, err = run(["cache", "--store", str(tmp_path / "cut"), *store_args], capsys)
    assert code == 0, err
    full = json.loads((tmp_path / "full" / "manifest.json").read_text())
    cut = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert cut == full and len(full["shards"]) >= 3
    for s in full["shards"]:
        a = load_file(str(tmp_path / "full" / s["file"]))
        b = load_file(str(tmp_path / "cut" / s["file"]))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Training from the store.
    code, out, err = run(["train", "--store", str(tmp_path / "full"), "--hooks", "1",
                          "--out", str(tmp_path / "run"), "--tokens", "1500",
                          "--batch_tokens", "256", "--expansion_factor", "2", "--k", "4"],
                         capsys)
    assert code == 0, err
    sae = SAE.load(tmp_path / "run" / "model.layers.1" / "k4-beta100-z-x2-s0")
    assert sae.metadata["model"] == full["identity"]["model"]


def test_mismatched_and_corrupt_stores_are_refused(corpus, tmp_path, capsys):
    args = ["--model", "tiny-llama", "--dataset", corpus, "--context_size", "64",
            "--hooks", "1", "--lm_batch_size", "4", "--tokens", "600", "--store_dtype", "float32"]
    assert run(["cache", "--store", str(tmp_path / "s"), *args], capsys)[0] == 0
    code, _, err = run(["cache", "--store", str(tmp_path / "s"), *args[:-1], "float16"], capsys)
    assert code == 2 and "made with other settings (differs in: dtype)" in err
    shard = tmp_path / "s" / "shard-000000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    code, _, err = run(["train", "--store", str(tmp_path / "s"), "--hooks", "1",
                        "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "missing or damaged shard-000000.safetensors" in err
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    code, _, err = run(["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r")],
                       capsys)
    assert code == 2 and "manifest.json is corrupt" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--k", "300", "--expansion_factor", "4"], "k must be between 1 and the number of"),
        (["--k", "0"], "k must be between 1"),
        (["--beta", "-1"], "beta must be a finite number >= 0"),
        (["--hooks", "5"], "out of range"),
        (["--value_mode", "max"], "value_mode must be one of"),
        (["--model", "/nonexistent/model"], "does not exist; a model is"),
    ],
)
def test_train_errors_are_one_line(corpus, tmp_path, capsys, extra, message):
    code, _, err = run(["train", *common(corpus, tmp_path / "r"), "--tokens", "512", *extra],
                       capsys)
    assert code == 2
    assert message in err and err.startswith("gsae: error:") and err.count("\n") == 1


def test_empty_corpus_and_different_run_errors(corpus, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(["train", *common(str(empty), tmp_path / "r"), "--tokens", "512"],
                       capsys)
    assert code == 2 and "corpus" in err
    base = ["train", *common(corpus, tmp_path / "r2"), "--tokens", "512", "--batch_tokens",
            "256", "--expansion_factor", "2"]
    assert run(base, capsys)[0] == 0
    code, _, err = run([*base, "--k", "4"], capsys)
    assert code == 2 and "holds a different run" in err
