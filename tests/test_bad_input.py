"""Bad input as a new user gives it: one line naming the problem, a non-zero exit, and no file
changed that the command did not create."""

import errno
import hashlib
import json
import signal
from contextlib import contextmanager

import pytest
import torch

from gsae import SAE, Provenance, SAEConfig
from gsae.cli import main
from gsae.errors import GsaeError
from gsae.models import ModelConfig, model_identity
from gsae.source import Batch, PassRows
from gsae.text import DataConfig, corpus_identity


def snapshot(root):
    """Every file under `root` with the hash of its bytes."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def run_refused(argv, capsys, root, message):
    before = snapshot(root)
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, err
    # Progress bars may precede it; the error itself is one line, with no traceback.
    lines = [line for line in err.splitlines() if line.startswith("gsae")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    after = snapshot(root)
    assert {p: h for p, h in after.items() if p in before} == before  # nothing changed
    return err


def tiny(corpus, out):
    return ["--model", "tiny-llama", "--dataset", str(corpus), "--context_size", "32",
            "--hooks", "1", "--lm_batch_size", "4", "--tokens", "512", "--batch_tokens", "256",
            "--expansion_factor", "2", "--k", "4", "--out", str(out)]


@pytest.mark.parametrize("extra, message", [
    (["--tokens", "0"], "--train.tokens must be at least 1, got 0"),
    (["--tokens", "-5"], "--train.tokens must be at least 1"),
    (["--batch_tokens", "0"], "--train.batch_tokens must be at least 1"),
    (["--lr", "-1"], "--train.lr must be at least 0"),
    (["--lr", "nan"], "expected a finite number, got 'nan'"),
    (["--outlier_factor", "inf"], "expected a finite number, got 'inf'"),
    (["--k", "abc"], "argument --k/--sae.k: expected a whole number, got 'abc'"),
    (["--context_size", "2"], "leaves no position to train on"),
    (["--skip_first", "31"], "leaves no position to train on"),
    (["--hooks", "model.layers.1.mlp.act_fn"], "outputs width 128, not the residual stream's 64"),
])
def test_bad_training_settings(corpus, tmp_path, capsys, extra, message):
    (tmp_path / "keep.txt").write_text("a file of the user's")
    run_refused(["train", *tiny(corpus, tmp_path / "run"), *extra], capsys, tmp_path, message)


def test_output_paths_that_cannot_be_written(corpus, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    run_refused(["train", *tiny(corpus, a_file)], capsys, tmp_path, "a-file")
    run_refused(["train", *tiny(corpus, a_file / "under")], capsys, tmp_path, "a-file")


def test_bad_text_files(tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("caf\xe9 " * 400).encode("latin-1"))
    run_refused(["train", *tiny(latin, tmp_path / "r")], capsys, tmp_path,
                "is not valid utf-8 text (byte 3")
    assert not (tmp_path / "r").exists()  # refused before the run folder was made
    fake = tmp_path / "fake.parquet"
    fake.write_text("this is not parquet")
    run_refused(["train", *tiny(fake, tmp_path / "r2")], capsys, tmp_path,
                "is not a readable parquet file")


def test_a_named_encoding_reads_the_text(tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("\n\n".join(["caf\xe9 na\xefve " * 60] * 8).encode("latin-1"))
    assert main(["train", *tiny(latin, tmp_path / "r"), "--encoding", "latin-1"]) == 0
    saved = json.loads((tmp_path / "r" / "run.json").read_text())
    assert saved["data"]["encoding"] == "latin-1"


def saved_sae(tmp_path, corpus):
    data = DataConfig(dataset=str(corpus), context_size=32)
    provenance = Provenance(hook="model.layers.1", model=model_identity(ModelConfig("tiny-llama")),
                            corpus=corpus_identity(data), context_size=32)
    return SAE(SAEConfig(n_latents=128, k=4), 64, provenance=provenance).save(tmp_path / "sae")


def test_evaluation_refuses_a_changed_corpus_and_a_json_folder(corpus, tmp_path, capsys):
    text = tmp_path / "docs.txt"
    text.write_text(open(corpus).read())
    folder = saved_sae(tmp_path, text)
    run_refused(["eval", str(folder), "--json", str(tmp_path)], capsys, tmp_path, "is a folder")
    text.write_text(open(corpus).read() + "\n\nOne more document, added after training.")
    run_refused(["eval", str(folder), "--eval_tokens", "64"], capsys, tmp_path,
                "changed since")
    assert main(["eval", str(folder), "--eval_tokens", "64", "--allow_changed_corpus"]) == 0


def test_damaged_sae_files(corpus, tmp_path, capsys):
    folder = saved_sae(tmp_path, corpus)
    cfg = folder / "cfg.json"
    cfg.write_text(cfg.read_text()[:40])
    run_refused(["eval", str(folder)], capsys, tmp_path, "cfg.json")


def test_a_full_disk_is_one_line(corpus, tmp_path, capsys, monkeypatch):
    import gsae.pipeline

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "run.json"))

    monkeypatch.setattr(gsae.pipeline, "write_json", full)
    err = run_refused(["train", *tiny(corpus, tmp_path / "run")], capsys, tmp_path,
                      "No space left on device")
    assert "run.json" in err


def test_interrupting_cache_says_how_to_continue(corpus, tmp_path, capsys, monkeypatch):
    import gsae.pipeline

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gsae.pipeline, "fill_store", interrupted)
    assert main(["cache", "--model", "tiny-llama", "--dataset", corpus, "--hooks", "1", "--store",
                 str(tmp_path / "s")]) == 130
    err = capsys.readouterr().err
    assert "rerun the same command to continue" in err and "--resume" not in err


def test_json_output_never_replaces_a_file_gsae_did_not_write(corpus, tmp_path, capsys):
    folder = saved_sae(tmp_path, corpus)
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    run_refused(["eval", str(folder), "--eval_tokens", "64", "--json", str(mine)], capsys,
                tmp_path, "is not a gsae.eval/* result")
    run_refused(["steer", str(folder), "--json", str(mine), "--latents", "1", "--contexts", "1",
                 "--pool", "2"], capsys, tmp_path, "is not a gsae.steer/* result")
    result = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--eval_tokens", "64", "--json", str(result)]) == 0
    assert main(["eval", str(folder), "--eval_tokens", "64", "--json", str(result)]) == 0


def test_names_that_would_leave_the_output_folder(corpus, tmp_path, capsys):
    folder = saved_sae(tmp_path, corpus)
    run_refused(["export", str(folder), str(tmp_path / "ex"), "--format", "sparsify",
                 "--hookpoint", "../../escape"], capsys, tmp_path, "must be a relative name")
    assert not (tmp_path.parent / "escape").exists()
    run_refused(["push", str(folder), "owner/repo", "--subfolder", "/abs"], capsys, tmp_path,
                "must be a relative name")


def test_a_config_folder_is_named_as_one(corpus, tmp_path, capsys):
    (tmp_path / "cfgdir").mkdir()
    run_refused(["train", "--config", str(tmp_path / "cfgdir")], capsys, tmp_path,
                "is a folder: give a JSON or YAML file")


# Hangs: a loop that waits for data fails once a whole pass yields none ---------------------------


@contextmanager
def no_hang(seconds=300):
    """Fail the test, instead of hanging the suite, if the block runs longer than `seconds`."""
    def stop(*_args):
        raise AssertionError(f"still running after {seconds} s: the command waits forever")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def short_corpus(tmp_path):
    """Three short documents: one pass over them takes a few language-model batches."""
    path = tmp_path / "short.txt"
    path.write_text("\n\n".join(" ".join(["the cat sat on a mat near an old river"] * 4)
                                for _ in range(3)))
    return path


NO_TOKEN_KEPT = "--outlier_factor 1e-06 dropped every one"


def test_an_outlier_factor_that_keeps_no_token_stops_after_one_pass(short_corpus, tmp_path,
                                                                    capsys):
    out = tmp_path / "run"
    args = ["train", *tiny(short_corpus, out), "--lm_batch_size", "8"]
    with no_hang():
        run_refused([*args, "--outlier_factor", "1e-6"], capsys, tmp_path,
                    "a whole pass over the corpus gave no token at model.layers.1: "
                    + NO_TOKEN_KEPT)
    # It trained nothing, so the corrected command may use the same folder.
    assert [p.name for p in out.iterdir()] == ["run.json"]
    assert main(args) == 0
    assert json.loads((out / "run.json").read_text())["source"]["outlier_factor"] == 5.0


def test_a_store_of_no_tokens_is_refused_by_cache_and_by_training(short_corpus, tmp_path,
                                                                  capsys):
    store = tmp_path / "store"
    cache = ["cache", "--model", "tiny-llama", "--dataset", str(short_corpus), "--context_size",
             "32", "--hooks", "1", "--lm_batch_size", "8", "--store", str(store),
             "--outlier_factor", "1e-6"]
    with no_hang():
        run_refused(cache, capsys, tmp_path, f"training split gave no token at model.layers.1: "
                    f"{NO_TOKEN_KEPT}")
        assert not json.loads((store / "manifest.json").read_text())["complete"]
        run_refused(["train", "--store", str(store), "--hooks", "1", "--out",
                     str(tmp_path / "run")], capsys, tmp_path,
                    f"the store {store} holds no token at model.layers.1")
    assert not (tmp_path / "run").exists()


def test_a_pass_is_judged_only_when_none_of_it_was_skipped():
    def chunk(rows_a, rows_b):
        return {"a": Batch(torch.zeros(rows_a, 2), None), "b": Batch(torch.zeros(rows_b, 2), None)}

    watch = PassRows(["a", "b"], 0.5)
    assert len(list(watch.counted(iter([chunk(3, 0), chunk(2, 0)])))) == 2
    watch.pass_ended(whole=False)  # a resumed run skipped part of it: no verdict
    list(watch.counted(iter([chunk(1, 1)])))
    watch.pass_ended(whole=True)  # both hooks got a row
    list(watch.counted(iter([chunk(4, 0)])))
    with pytest.raises(GsaeError, match="whole pass over the corpus gave no token at b: "
                       "--outlier_factor 0.5"):
        watch.pass_ended(whole=True)
