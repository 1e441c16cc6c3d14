"""Bad input as a new user gives it: one line naming the problem, a non-zero exit, and no file
changed that the command did not create."""

import errno
import hashlib
import json

import pytest

from gsae import SAE, Provenance, SAEConfig
from gsae.cli import main
from gsae.models import ModelConfig, model_identity
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


def test_finetune_refuses_what_is_no_parent_of_this_run(corpus, tmp_path, capsys):
    """A folder without an SAE, and an SAE of another model, hook or corpus: one line naming
    it, and nothing written."""
    parent = str(saved_sae(tmp_path, corpus))
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other.txt"
    other.write_text(open(corpus).read() + "\n\nA document of another corpus.")
    out = ["--out", str(tmp_path / "ft"), "--tokens", "64"]
    run_refused(["finetune", str(tmp_path / "empty"), *out], capsys, tmp_path,
                "empty is not a gsae SAE folder")
    for extra, message in [
        (["--model", "tiny-gpt2"], "was trained on model 'tiny-llama', not on --model "
         "'tiny-gpt2'"),
        (["--hooks", "0"], "was trained at hook 'model.layers.1', which is not among --hooks "
         "(model.layers.0)"),
        (["--dataset", str(other)], f"was trained on corpus {corpus!r}, not on --dataset"),
    ]:
        run_refused(["finetune", parent, *out, *extra], capsys, tmp_path, message)
    assert not (tmp_path / "ft").exists()
