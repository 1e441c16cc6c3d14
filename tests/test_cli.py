"""The `gsae` command end to end on the tiny model: training, sweeps, the store, errors."""

import json

import pytest

from gsae import SAE
from gsae.cli import main


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
        assert sae.d_in == 64 and sae.n_latents == 256 and sae.provenance.hook == "model.layers.1"
    assert "trained 2 SAE(s)" in out and "FVU" in out
    run_cfg = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [c["beta"] for c in run_cfg["recorded"]["saes"]] == [0.0, 20.0]
    assert run_cfg["sae"]["beta"] == [0.0, 20.0] and run_cfg["train"]["tokens"] == 8000


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--k", "300", "--expansion_factor", "4"], "k must be between 1 and the number of"),
        (["--k", "0"], "--sae.k must be at least 1, got 0"),
        (["--beta", "-1"], "--sae.beta must be at least 0, got -1.0"),
        (["--hooks", "5"], "out of range"),
        (["--value_mode", "max"], "--sae.value_mode must be one of z, score"),
        (["--model", "/nonexistent/model"], "does not exist; a model is"),
    ],
)
def test_train_errors_are_one_line(corpus, tmp_path, capsys, extra, message):
    code, _, err = run(["train", *common(corpus, tmp_path / "r"), "--tokens", "512",
                        "--batch_tokens", "256", *extra], capsys)
    assert code == 2
    assert message in err and err.startswith("gsae: error:") and err.count("\n") == 1


def test_empty_corpus_and_different_run_errors(corpus, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(["train", *common(str(empty), tmp_path / "r"), "--tokens", "512",
                        "--batch_tokens", "256"], capsys)
    assert code == 2 and "corpus" in err
    base = ["train", *common(corpus, tmp_path / "r2"), "--tokens", "512", "--batch_tokens",
            "256", "--expansion_factor", "2"]
    assert run(base, capsys)[0] == 0
    code, _, err = run([*base, "--k", "4"], capsys)
    assert code == 2 and "holds a different run" in err
