"""Bad input as a new user gives it: one line naming the problem, a non-zero exit, and no file
changed that the command did not create."""

import errno
import hashlib
import json
import shutil
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
        if path.name != "run.json":
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
