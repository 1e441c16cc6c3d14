"""Bad input as a new user gives it: one line naming the problem, a non-zero exit, and no file
changed that the command did not create."""

import errno
import hashlib
import json
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from gsae import SAE, GsaeError, Provenance, SAEConfig
from gsae.batch import Batch
from gsae.cli import main
from gsae.io import LOCK_FILE
from gsae.models import ModelConfig, model_identity
from gsae.source import PassRows
from gsae.text import DataConfig, corpus_identity


def snapshot(root):
    """Every file under `root` with the hash of its bytes."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file() and p.name != LOCK_FILE}  # the lock records its latest holder


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


# ------------------------------------------------------------ silent wrong results, refused


def cache_args(corpus, store):
    return ["cache", "--model", "tiny-llama", "--dataset", str(corpus), "--context_size", "32",
            "--hooks", "1", "--lm_batch_size", "4", "--tokens", "600", "--batches_per_shard", "1",
            "--store.dtype", "float32", "--store", str(store)]


def test_a_store_still_being_written_is_not_trained_on(corpus, tmp_path, capsys, monkeypatch):
    from gsae.store import StoreWriter

    real_write = StoreWriter.write_shard

    def killed_after_one_shard(self, chunks):
        real_write(self, chunks)
        raise KeyboardInterrupt

    train = ["train", "--store", str(tmp_path / "s"), "--hooks", "1", "--tokens", "256",
             "--batch_tokens", "128", "--expansion_factor", "2", "--k", "4"]
    for more in ([], ["--tokens", "1200"]):  # a new store, then a complete one extended
        monkeypatch.setattr(StoreWriter, "write_shard", killed_after_one_shard)
        assert main([*cache_args(corpus, tmp_path / "s"), *more]) == 130
        monkeypatch.setattr(StoreWriter, "write_shard", real_write)
        run_refused([*train, "--out", str(tmp_path / "r")], capsys, tmp_path,
                    "is incomplete: gsae cache is still writing it or was stopped")
        assert not (tmp_path / "r").exists()
        assert main([*cache_args(corpus, tmp_path / "s"), *more]) == 0  # finishing it
    assert main([*train, "--out", str(tmp_path / "r")]) == 0


def test_a_run_folder_in_use_is_refused_naming_its_holder(corpus, tmp_path, capsys):
    import os
    import socket
    import subprocess
    import sys

    import gsae

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(gsae.__file__).parents[1])}
    holder = subprocess.Popen(  # another command, in the middle of training this run
        [sys.executable, "-c", "import sys, time; from gsae.io import folder_lock\n"
         "with folder_lock(sys.argv[1], 'the run'):\n print('held', flush=True); time.sleep(600)",
         str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "held\n"
        for extra in ([], ["--resume"]):
            run_refused(["train", *tiny(corpus, out), *extra], capsys, tmp_path,
                        f"is in use: the run there is held by pid {holder.pid} on "
                        f"{socket.gethostname()}, since 20")
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", *tiny(corpus, out)]) == 0  # the lock ended with its holder


def test_a_change_in_the_middle_of_a_large_corpus_is_seen(corpus, tmp_path, capsys):
    from gsae.io import file_fingerprint
    from gsae.pipeline import check_corpus

    text = tmp_path / "docs.txt"
    one = open(corpus).read()
    text.write_text("\n\n".join([one] * (3 * 2**20 // len(one))))  # 3 MiB
    assert text.stat().st_size > 2 * 2**20 + 4096
    folder = saved_sae(tmp_path, text)
    data = DataConfig(dataset=str(text), context_size=32)
    older = SAE(SAEConfig(n_latents=128, k=4), 64, provenance=Provenance(  # recorded the ends
        hook="model.layers.1", corpus={**corpus_identity(data),
                                       "fingerprint": file_fingerprint(text)}))
    check_corpus([older], ["older"], data)  # an older record of the unchanged corpus is accepted
    raw = bytearray(text.read_bytes())
    middle = raw.index(b" ", len(raw) // 2)
    raw[middle] = ord("\n")  # one byte, 1.5 MiB from either end; the size is the same
    text.write_bytes(bytes(raw))
    run_refused(["eval", str(folder), "--eval_tokens", "64"], capsys, tmp_path, "changed since")


@pytest.mark.parametrize("flags, message", [
    (["--split_seed", "1"], "--split_seed 1 differs from the 0 that"),
    (["--eval_fraction", "0.5"], "--eval_fraction 0.5 is larger than the 0.1 that"),
])
def test_evaluation_on_another_split_of_the_training_corpus_is_refused(
        corpus, tmp_path, capsys, flags, message):
    folder = saved_sae(tmp_path, corpus)
    run_refused(["eval", str(folder), "--eval_tokens", "64", *flags], capsys, tmp_path, message)
    run_refused(["steer", str(folder), "--latents", "1", "--contexts", "1", "--pool", "2",
                 *flags], capsys, tmp_path, message)
    assert main(["eval", str(folder), "--eval_tokens", "64", "--eval_fraction", "0.05"]) == 0


def test_outputs_reached_through_a_symlink_are_written_where_it_points(corpus, tmp_path, capsys):
    folder = saved_sae(tmp_path, corpus)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert main(["export", str(folder), str(tmp_path / "link"), "--format", "saelens"]) == 0
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == [
        "cfg.json", "sae_weights.safetensors"]
    (tmp_path / "site").mkdir()
    (tmp_path / "site-link").symlink_to(tmp_path / "site")
    assert main(["inspect", str(folder), "--out", str(tmp_path / "site-link"), "--tokens", "64",
                 "--pool_tokens", "0", "--top_latents", "2", "--random_latents", "0",
                 "--continuation_tokens", "1"]) == 0
    assert (tmp_path / "site-link").is_symlink() and (tmp_path / "site" / "index.html").is_file()
    (tmp_path / "earlier.json").write_text('{"schema": "gsae.eval/2"}')
    (tmp_path / "result.json").symlink_to(tmp_path / "earlier.json")
    assert main(["eval", str(folder), "--eval_tokens", "64", "--json",
                 str(tmp_path / "result.json")]) == 0
    assert (tmp_path / "result.json").is_symlink()
    assert "results" in json.loads((tmp_path / "earlier.json").read_text())


def test_line_breaks_byte_order_marks_and_nul_characters_in_text(corpus, tmp_path, capsys):
    from gsae.text import load_documents

    docs = ["First document,\nits second line.", "Second document.", "Third, café."]
    lf = tmp_path / "lf.txt"
    lf.write_text("\n\n".join(docs) + "\n")
    expected = load_documents(DataConfig(dataset=str(lf)))
    assert expected == docs
    variants = {"cr.txt": lf.read_bytes().replace(b"\n", b"\r"),  # classic Mac OS line breaks
                "crlf.txt": lf.read_bytes().replace(b"\n", b"\r\n"),
                "bom.txt": b"\xef\xbb\xbf" + lf.read_bytes()}
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
        got = load_documents(DataConfig(dataset=str(tmp_path / name)))
        assert [d.replace("\r\n", "\n") for d in got] == docs, name
    rows = tmp_path / "bom.jsonl"
    rows.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps({"text": d}) for d in docs).encode())
    assert load_documents(DataConfig(dataset=str(rows))) == docs
    wide = tmp_path / "wide.txt"
    wide.write_bytes(open(corpus).read().encode("utf-16-le"))  # no BOM: valid UTF-8 with NULs
    run_refused(["train", *tiny(wide, tmp_path / "r")], capsys, tmp_path,
                "holds a NUL character (at character 1)")
    named = DataConfig(dataset=str(wide), encoding="utf-16-le")
    assert load_documents(named) == load_documents(DataConfig(dataset=corpus))


def test_edited_selection_settings_and_integer_weights_are_refused(corpus, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = saved_sae(tmp_path, corpus)  # k 4, beta 100, value_mode z
    cfg = folder / "cfg.json"
    raw = json.loads(cfg.read_text())
    for key, value, message in [
        ("beta", 0.0, "gives beta 0.0, but its weights were trained and saved with beta 100.0"),
        ("k", 8, "gives k 8, but its weights were trained and saved with k 4"),
        ("value_mode", "score", "gives value_mode score, but its weights were trained and saved "
         "with value_mode z"),
    ]:
        cfg.write_text(json.dumps({**raw, key: value}))
        run_refused(["eval", str(folder), "--eval_tokens", "64"], capsys, tmp_path, message)
    cfg.write_text(json.dumps({**raw, "beta": 100}))  # the same value, written as an integer
    assert SAE.load(folder).beta == 100
    weights = folder / "sae.safetensors"
    tensors = load_file(weights)
    for dtype, name in ((torch.int32, "int32"), (torch.bool, "bool")):
        save_file({**tensors, "W_enc": (tensors["W_enc"] * 10).to(dtype)}, weights)
        run_refused(["eval", str(folder), "--eval_tokens", "64"], capsys, tmp_path,
                    f"SAE weights must be floating point, but W_enc is {name}")


def test_overwrite_deletes_only_sae_folders_gsae_wrote_inside_the_run(corpus, tmp_path):
    """run.json's list of SAE folders is what --overwrite deletes: hand-edited entries that
    point outside the run (an absolute path, "..", a link) or at the run folder itself are
    ignored; the listed SAE folder of the replaced run goes."""
    run = tmp_path / "run"
    assert main(["train", *tiny(corpus, run)]) == 0
    (old,) = (run / "model.layers.1").iterdir()
    outside = tmp_path / "outside"
    (outside / "model.layers.1" / "x").mkdir(parents=True)
    (outside / "precious.txt").write_text("the user's")
    (run / "notes.txt").write_text("the user's too")
    (run / "model.layers.1" / "mine").mkdir()
    (run / "link").symlink_to(outside / "model.layers.1")
    record = json.loads((run / "run.json").read_text())
    listed = [str(outside), str(outside / "model.layers.1" / "x"), ".", "..", "../outside",
              "model.layers.1/../../outside/model.layers.1", "link/x", "model.layers.1",
              f"model.layers.1/{old.name}"]
    record["recorded"]["sae_folders"] = listed
    record["recorded"]["earlier_sae_folders"] = [".", str(outside)]
    (run / "run.json").write_text(json.dumps(record))
    kept = snapshot(outside)
    assert main(["train", *tiny(corpus, run), "--k", "8", "--overwrite"]) == 0
    assert snapshot(outside) == kept and (outside / "model.layers.1" / "x").is_dir()
    assert (run / "notes.txt").read_text() == "the user's too"
    assert (run / "model.layers.1" / "mine").is_dir() and (run / "link").is_symlink()
    assert not old.exists()  # the replaced run's SAE, listed as gsae writes it
    assert (run / "model.layers.1" / "k8-beta100-z-x2-s0" / "sae.safetensors").is_file()


def test_export_never_replaces_the_folder_it_reads(corpus, tmp_path, capsys):
    folder = saved_sae(tmp_path / "a", corpus)
    (folder / "log.jsonl").write_text("{}\n")
    for out, fmt in ((folder, "gsae"), (folder.parent, "saelens"), (folder.parent, "gsae")):
        run_refused(["export", str(folder), str(out), "--format", fmt, "--overwrite"], capsys,
                    tmp_path, "holds the SAE being exported")
    run_refused(["export", str(folder), str(folder.parent), "--format", "sparsify",
                 "--hookpoint", "sae", "--overwrite"], capsys, tmp_path,
                "holds the SAE being exported")
    assert (folder / "log.jsonl").is_file()


def test_inspect_overwrite_never_replaces_an_sae_or_a_store(corpus, tmp_path, capsys):
    folder = saved_sae(tmp_path / "a", corpus)
    other = saved_sae(tmp_path / "b", corpus)
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text("{}")
    args = ["inspect", str(folder), "--tokens", "64", "--overwrite", "--out"]
    for out in (folder, folder.parent):
        run_refused([*args, str(out)], capsys, tmp_path, "that is inspected")
    for out, found in ((other, "cfg.json"), (tmp_path / "b", "sae/cfg.json"),
                       (store, "manifest.json")):
        run_refused([*args, str(out)], capsys, tmp_path, f"holds {found}, a file of an SAE")


# ----------------------------------------------------------- the Fisher term (--fisher_coef)


@pytest.mark.parametrize("value, message", [
    ("-0.5", "--sae.fisher_coef must be at least 0, got -0.5"),
    ("0.5,-1", "--sae.fisher_coef must be at least 0, got -1.0"),
    ("nan", "argument --fisher_coef/--sae.fisher_coef: expected a finite number, got 'nan'"),
])
def test_a_bad_fisher_coef_on_the_command_line(corpus, tmp_path, capsys, value, message):
    (tmp_path / "keep.txt").write_text("a file of the user's")
    run_refused(["train", *tiny(corpus, tmp_path / "run"), "--fisher_coef", value], capsys,
                tmp_path, message)
    assert not (tmp_path / "run").exists()


def test_a_bad_fisher_coef_in_a_config_file_or_in_python(corpus, tmp_path, capsys):
    config = tmp_path / "run.json"
    for value, message in (("-2", "must be at least 0, got -2.0"),
                           ("NaN", "must be a finite number, got nan")):
        config.write_text('{"sae": {"fisher_coef": [' + value + ']}}')
        run_refused(["train", *tiny(corpus, tmp_path / "run"), "--config", str(config)], capsys,
                    tmp_path, f"--sae.fisher_coef {message}")
    for value, message in ((-0.1, "must be at least 0, got -0.1"),
                           (float("nan"), "must be a finite number, got nan")):
        with pytest.raises(GsaeError, match=f"^--fisher_coef {message}$"):
            SAE(SAEConfig(n_latents=8, k=2, fisher_coef=value), 4)


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


def test_snapshot_counts_beyond_the_budget_are_refused(corpus, tmp_path, capsys):
    run_refused(["train", *tiny(corpus, tmp_path / "r"), "--snapshots", "256", "513", "9000"],
                capsys, tmp_path, "--snapshots 513 9000: beyond --tokens 512, where training stops")
    assert not (tmp_path / "r").exists()
    assert main(["train", *tiny(corpus, tmp_path / "r"), "--snapshots", "256", "512"]) == 0
    saved = sorted(p.name for p in (tmp_path / "r").glob("*/*/snapshots/*"))
    assert saved == ["tokens-256", "tokens-512"]


def test_dot_dot_in_a_hub_id_is_refused_before_any_download(corpus, tmp_path, capsys,
                                                             monkeypatch):
    import huggingface_hub

    saved_sae(tmp_path / "cache", corpus)  # an SAE that '..' would reach from the snapshot
    downloads = []

    def snapshot_download(repo_id, **_):
        downloads.append(repo_id)
        (tmp_path / "cache" / "snap" / "repo").mkdir(parents=True, exist_ok=True)
        return str(tmp_path / "cache" / "snap" / "repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)  # where no folder 'owner' exists
    for name in ("hf://owner/repo/../../sae", "owner/repo/../../sae", "owner/..", "hf://../x"):
        run_refused(["eval", name], capsys, tmp_path, "is not a Hugging Face repo id: '.' and "
                    "'..' name no repo or subfolder")
    assert downloads == []


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
    assert sorted(p.name for p in out.iterdir()) == [".gsae.lock", "run.json"]
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


# Tracebacks that are now one line -----------------------------------------------------------------


@pytest.fixture
def stopped_run(corpus, tmp_path, monkeypatch):
    """The arguments of a run stopped (as by Ctrl-C) right after its second checkpoint, and its
    folder."""
    from gsae.train import Trainer

    out = tmp_path / "run"
    args = ["train", *tiny(corpus, out), "--tokens", "2048", "--shuffle_tokens", "256",
            "--checkpoint_every", "1"]
    save = Trainer._save_checkpoints

    def save_then_stop(self, finished):
        save(self, finished)
        if self.moment == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(Trainer, "_save_checkpoints", save_then_stop)
        assert main(args) == 130
    record = json.loads((out / "run.json").read_text())
    record["train"]["resume"] = True  # as --resume rewrites it, so that only damage differs
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    return [*args, "--resume"], out


SAE_PART = "model.layers.1/k4-beta100-z-x2-s0/checkpoint"


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def wrong_moment_shape(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors["0.exp_avg"] = tensors["0.exp_avg"][:3].clone()
    save_file(tensors, str(path))


def lose_the_newest_sae_part(part):
    """The SAE's part keeps only a previous checkpoint, whose state file is gone."""
    part.rename(part.with_name("checkpoint.old"))
    (part.with_name("checkpoint.old") / "state.json").unlink()


@pytest.mark.parametrize("damage, path, message", [
    (truncate, f"{SAE_PART}/optimizer.safetensors",
     "optimizer.safetensors is damaged or not a safetensors file"),
    (truncate, "checkpoint/buffers.safetensors",
     "buffers.safetensors is damaged or not a safetensors file"),
    (wrong_moment_shape, f"{SAE_PART}/optimizer.safetensors",
     "optimizer.safetensors does not fit the SAE (wrong or unknown tensors: 0.exp_avg)"),
    (lose_the_newest_sae_part, SAE_PART, "the checkpoint parts of the run in"),
])
def test_damaged_checkpoints_are_refused(stopped_run, tmp_path, capsys, damage, path, message):
    resume, out = stopped_run
    damage(out / path)
    run_refused(resume, capsys, tmp_path, message)


def test_a_full_disk_during_training_names_the_output_and_loses_nothing(corpus, tmp_path, capsys,
                                                                        monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "run"

    def full(*_args, **_kwargs):  # what safetensors raises when the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    with monkeypatch.context() as patched:
        patched.setattr(safetensors.torch, "save_file", full)
        err = run_refused(["train", *tiny(corpus, out)], capsys, tmp_path,
                          f"--out {out}: No space left on device: {out}/")
    assert "sae.safetensors" in err or "buffers.safetensors" in err
    assert not list(out.rglob("*.safetensors")) and not list(out.rglob(".*tmp*"))
    assert main(["train", *tiny(corpus, out), "--resume"]) == 0  # once there is room again


def sae_copy(tmp_path, corpus):
    """An SAE folder, and its weights and config as dicts to change."""
    from safetensors.torch import load_file

    folder = saved_sae(tmp_path, corpus)
    return folder, load_file(str(folder / "sae.safetensors")), json.loads(
        (folder / "cfg.json").read_text())


def test_weights_that_do_not_fit_are_refused_before_anything_is_allocated(corpus, tmp_path,
                                                                          capsys):
    from safetensors.torch import save_file

    folder, weights, cfg = sae_copy(tmp_path, corpus)
    del weights["W_dec"]
    save_file(weights, str(folder / "sae.safetensors"))
    run_refused(["eval", str(folder)], capsys, tmp_path, "W_dec is missing, expected [128, 64]")
    cfg.update(n_latents=10**9, d_in=10**6)  # 4 PB of float32 weights
    (folder / "cfg.json").write_text(json.dumps(cfg))
    run_refused(["eval", str(folder)], capsys, tmp_path,
                "the weights do not fit the config (d_in 1000000, 1000000000 latents)")


@pytest.mark.parametrize("field, value, message", [
    ("model", "tiny-llama", "the provenance's 'model' must be an object (or null), got "
     "'tiny-llama'"),
    ("corpus", ["docs.txt"], "the provenance's 'corpus' must be an object"),
    ("context_size", "32", "the provenance's 'context_size' must be a whole number"),
    ("skip_first", True, "the provenance's 'skip_first' must be a whole number"),
    ("outlier_factor", "5", "the provenance's 'outlier_factor' must be a number"),
])
def test_mistyped_provenance_fields(corpus, tmp_path, capsys, field, value, message):
    folder, _, cfg = sae_copy(tmp_path, corpus)
    cfg["provenance"][field] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    run_refused(["eval", str(folder), "--eval_tokens", "64"], capsys, tmp_path,
                f"{folder / 'cfg.json'}: {message}")


@pytest.mark.parametrize("seed, message", [
    ("1e20", "--seed/--sae.seed: expected a whole number, got '1e20'"),
    (str(10**20), "--sae.seed must fit in 64 bits (from -2^63 to 2^63-1), got " + str(10**20)),
    (str(2**63), "--sae.seed must fit in 64 bits"),
])
def test_seeds_beyond_64_bits(corpus, tmp_path, capsys, seed, message):
    run_refused(["train", *tiny(corpus, tmp_path / "run"), "--seed", seed], capsys, tmp_path,
                message)
    assert not (tmp_path / "run").exists()


def test_config_files_that_are_not_utf8_or_use_yaml_aliases(corpus, tmp_path, capsys):
    pytest.importorskip("yaml")
    args = ["train", *tiny(corpus, tmp_path / "run"), "--config"]
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"data": {"dataset": "caf\xe9"}}'.encode("latin-1"))
    run_refused([*args, str(latin)], capsys, tmp_path, "is not UTF-8 text (byte 25")
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\ntrain: {tokens: *a8}\n")  # 10^9 items once expanded
    err = run_refused([*args, str(bomb)], capsys, tmp_path,
                      "uses the YAML alias *a0: gsae config files may not use aliases")
    assert len(err) < 1000
    assert not (tmp_path / "run").exists()


def test_a_store_whose_manifest_gives_another_width(tmp_path, capsys):
    from gsae.store import StoreWriter

    identity = {"model": {"model": "tiny-llama"}, "hooks": ["h"], "d_in": 4,
                "corpus": {"dataset": "c"}, "context_size": 8, "skip_first": 1,
                "outlier_factor": 5.0, "autocast": "none"}
    writer = StoreWriter(tmp_path / "store", identity, "float32", 1)
    writer.write_shard([{"h": Batch(torch.ones(600, 6), torch.ones(600, 6), "h")}])
    writer.finish()
    run_refused(["train", "--store", str(tmp_path / "store"), "--hooks", "h", "--out",
                 str(tmp_path / "run"), "--k", "4", "--batch_tokens", "64", "--tokens", "128",
                 "--model", "tiny-llama", "--dataset", "c"], capsys, tmp_path,
                "holds rows of width 6, but the store's manifest records d_in 4")


def test_a_device_the_machine_lacks_is_refused_before_the_run_folder(corpus, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_refused(["train", *tiny(corpus, tmp_path / "run"), "--train.device", "cuda"], capsys,
                tmp_path, "--train.device: device 'cuda' is not available on this machine")
    assert not (tmp_path / "run").exists()


# Messages that say what to do ---------------------------------------------------------------------


def test_a_finished_run_is_not_told_to_resume(corpus, tmp_path, capsys):
    args = ["train", *tiny(corpus, tmp_path / "run")]
    assert main(args) == 0
    err = run_refused(args, capsys, tmp_path, "already holds this run, finished: pass "
                      "--overwrite to train it again, or choose another --out")
    assert "--resume" not in err


def test_a_record_of_a_run_that_never_trained_is_replaced(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *tiny(corpus, out)]
    assert main([*args, "--k", "8"]) == 0
    trained = json.loads((out / "run.json").read_text())
    run_refused([*args, "--k", "2"], capsys, tmp_path, "holds a different run")  # it trained
    for path in sorted(out.iterdir()):
        if path.name not in ("run.json", LOCK_FILE):
            shutil.rmtree(path)  # as left by a run that failed before it trained
    assert main(args) == 0
    assert json.loads((out / "run.json").read_text())["sae"]["k"] == [4] != trained["sae"]["k"]


@pytest.mark.parametrize("flag, hint", [
    (["--sae_device", "cpu"], "--sae_device is now --train.device"),
    (["--data_seed", "1"], "--data_seed is now --shuffle_seed"),
    (["--store_dtype=float16"], "--store_dtype is now --store.dtype"),
    (["--steer_latents", "3"], "--steer_latents is now --latents"),
    (["--steer_seed", "3"], "--steer_seed is now --seed (gsae steer) or --steer.seed (gsae "
     "compare)"),
])
def test_renamed_flags_name_their_new_flag(corpus, tmp_path, capsys, flag, hint):
    run_refused(["train", *tiny(corpus, tmp_path / "run"), *flag], capsys, tmp_path,
                f"unrecognized arguments: {' '.join(flag)}; {hint}")


def test_a_renamed_setting_in_a_config_file_names_its_new_flag(corpus, tmp_path, capsys):
    config = tmp_path / "old.json"
    config.write_text('{"sae_device": "cpu"}')
    run_refused(["train", *tiny(corpus, tmp_path / "run"), "--config", str(config)], capsys,
                tmp_path, "unknown setting 'sae_device' in the config file; --sae_device is now "
                "--train.device")


@pytest.mark.parametrize("model", ["models/mine", "checkpoints/final/model"])
def test_a_mistyped_local_model_path_is_said_not_to_exist(corpus, tmp_path, capsys, monkeypatch,
                                                          hub_offline, model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    run_refused(["train", *tiny(corpus, tmp_path / "run"), "--model", model], capsys, tmp_path,
                f"model path {model!r} does not exist")


def test_continuing_a_store_with_a_truncated_shard_is_refused(tmp_path, capsys):
    from gsae.store import StoreWriter

    identity = {"model": {"model": "tiny-llama"}, "hooks": ["h"], "d_in": 4}
    writer = StoreWriter(tmp_path / "store", identity, "float32", 1)
    for _ in range(2):
        writer.write_shard([{"h": Batch(torch.ones(5, 4), torch.ones(5, 4), "h")}])
    shard = tmp_path / "store" / "shard-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(GsaeError, match="has a missing or damaged shard-000001.safetensors"):
        StoreWriter(tmp_path / "store", identity, "float32", 1)
