"""The pipelines as library functions, and the rules of a run folder, on the tiny model."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import interrupt_fit

from gsae import SAE, GsaeError
from gsae.cli import main
from gsae.models import ModelConfig
from gsae.pipeline import CacheRun, TrainRun, cache, load_for_eval, train
from gsae.store import StoreConfig
from gsae.text import DataConfig
from gsae.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run(corpus, out, **train_kwargs):
    run = TrainRun(model=ModelConfig(model="tiny-llama"),
                   data=DataConfig(dataset=corpus, context_size=32))
    run.source.hooks, run.source.lm_batch_size = ["1"], 4
    run.sae.expansion_factor, run.sae.k, run.sae.beta = [2], [4], [10.0]
    run.train.out = str(out)
    run.train.tokens, run.train.batch_tokens, run.train.shuffle_tokens = 768, 256, 512
    for key, value in train_kwargs.items():
        setattr(run.train, key, value)
    return run


def weights(folder):
    return SAE.load(folder).state_dict()


def test_python_train_equals_the_command_and_config_replays_it(corpus, tmp_path, capsys):
    summary = train(tiny_run(corpus, tmp_path / "py"))
    (record,) = summary.records
    assert record["tokens"] >= 768 and record["name"] == "model.layers.1/k4-beta10-z-x2-s0"
    folder = tmp_path / "py" / "model.layers.1" / "k4-beta10-z-x2-s0"
    assert SAE.load(folder).provenance.hook == "model.layers.1"
    # The same run from its run.json, into another folder, ends with the same weights: the
    # file holds every setting (a changed default would show here too).
    code = main(["train", "--config", str(tmp_path / "py" / "run.json"),
                 "--out", str(tmp_path / "replay")])
    assert code == 0, capsys.readouterr().err
    replayed = tmp_path / "replay" / "model.layers.1" / "k4-beta10-z-x2-s0"
    for name, tensor in weights(folder).items():
        assert torch.equal(tensor, weights(replayed)[name]), name
    first = json.loads((tmp_path / "py" / "run.json").read_text())
    again = json.loads((tmp_path / "replay" / "run.json").read_text())
    first["train"].pop("out"), again["train"].pop("out")
    assert first == again


def test_run_folder_rules(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_run(corpus, out))
    with pytest.raises(GsaeError, match="already holds this run, finished: pass --overwrite"):
        train(tiny_run(corpus, out))
    with pytest.raises(GsaeError, match="holds a different run"):
        train(tiny_run(corpus, out, tokens=1024))
    # The run is recognised by its recorded identity, not by how the path is spelled.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GsaeError, match="has finished: there is nothing to resume"):
        train(tiny_run(corpus, "run", resume=True))
    # A folder that holds files but no run.json is never written into without --overwrite.
    (out / "run.json").unlink()
    sae_file = out / "model.layers.1" / "k4-beta10-z-x2-s0" / "sae.safetensors"
    before = sae_file.read_bytes()
    with pytest.raises(GsaeError, match="is not empty and holds no run.json.*--overwrite"):
        train(tiny_run(corpus, out))
    assert sae_file.read_bytes() == before
    train(tiny_run(corpus, out, overwrite=True))


def test_resume_before_the_first_checkpoint_starts_the_run(corpus, tmp_path, capsys,
                                                           monkeypatch):
    """A run killed before its first checkpoint (even before it wrote run.json, leaving only
    the temporary file of that write) is started by --resume, and trains the same SAE."""
    train(tiny_run(corpus, tmp_path / "ref"))
    expected = weights(tmp_path / "ref" / "model.layers.1" / "k4-beta10-z-x2-s0")
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / ".run.json.tmp-999999-0123abcd").write_text("{")
    train(tiny_run(corpus, tmp_path / "early", resume=True))
    assert "holds no run yet; starting it from the beginning" in capsys.readouterr().err
    import gsae.pipeline

    def killed(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gsae.pipeline.Trainer, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(corpus, tmp_path / "late"))
    assert (tmp_path / "late" / "run.json").exists()
    monkeypatch.undo()
    train(tiny_run(corpus, tmp_path / "late", resume=True))
    assert "holds no checkpoint of this run yet" in capsys.readouterr().err
    for run in ("early", "late"):
        got = weights(tmp_path / run / "model.layers.1" / "k4-beta10-z-x2-s0")
        assert all(torch.equal(got[name], expected[name]) for name in expected), run


@pytest.mark.parametrize("from_store", [False, True])
def test_an_interrupted_run_resumes_where_it_stopped(corpus, tmp_path, monkeypatch,
                                                      from_store):
    """Interrupted after some chunks (past a checkpoint), a run resumed with --resume reads
    the data from where its checkpoint stopped and ends with the uninterrupted run's SAE."""
    def run_in(out, **kwargs):
        run = tiny_run(corpus, out, tokens=1536, batch_tokens=64, shuffle_tokens=256,
                       checkpoint_every=2, **kwargs)
        if from_store:
            run.train.store = str(tmp_path / "store")
        return run

    if from_store:
        store = CacheRun(model=ModelConfig(model="tiny-llama"),
                         data=DataConfig(dataset=corpus, context_size=32))
        store.source.hooks, store.source.lm_batch_size = ["1"], 4
        store.store.store, store.store.tokens, store.store.batches_per_shard = \
            str(tmp_path / "store"), 600, 1
        cache(store)
    train(run_in(tmp_path / "ref"))
    import gsae.pipeline

    interrupt_fit(monkeypatch, gsae.pipeline.Trainer, 9)
    with pytest.raises(KeyboardInterrupt):
        train(run_in(tmp_path / "cut"))
    monkeypatch.undo()
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert 0 < state["chunks_done"] <= 9 and not state["finished"]
    assert checkpoint_files(tmp_path / "cut") == WHOLE_CHECKPOINT  # not finished: all kept
    train(run_in(tmp_path / "cut", resume=True))
    sae = Path("model.layers.1") / "k4-beta10-z-x2-s0"
    expected, got = weights(tmp_path / "ref" / sae), weights(tmp_path / "cut" / sae)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert checkpoint_files(tmp_path / "cut") == checkpoint_files(tmp_path / "ref") == STATES


SAE_PART = "model.layers.1/k4-beta10-z-x2-s0/checkpoint"
STATES = {"checkpoint/state.json", f"{SAE_PART}/state.json"}
WHOLE_CHECKPOINT = STATES | {"checkpoint/buffers.safetensors", f"{SAE_PART}/sae.safetensors",
                             f"{SAE_PART}/cfg.json", f"{SAE_PART}/optimizer.safetensors"}


def checkpoint_files(out):
    """The files of a run's checkpoint parts, relative to the run folder."""
    return {str(p.relative_to(out)) for p in out.rglob("*")
            if p.is_file() and "checkpoint" in p.relative_to(out).parts}


def test_a_finished_run_keeps_only_the_state_files_of_its_checkpoint(corpus, tmp_path):
    """Once a run has finished its training state is dropped (the SAE is saved, and the state
    files still say the run finished), unless --keep_training_state; the run is the same."""
    train(tiny_run(corpus, tmp_path / "dropped"))
    assert checkpoint_files(tmp_path / "dropped") == STATES
    assert main(["train", "--config", str(tmp_path / "dropped" / "run.json"), "--out",
                 str(tmp_path / "kept"), "--keep_training_state"]) == 0
    assert checkpoint_files(tmp_path / "kept") == WHOLE_CHECKPOINT
    sae = Path("model.layers.1") / "k4-beta10-z-x2-s0"
    expected, got = weights(tmp_path / "kept" / sae), weights(tmp_path / "dropped" / sae)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    recorded = [json.loads((tmp_path / run / "run.json").read_text())["recorded"]
                for run in ("dropped", "kept")]
    assert recorded[0] == recorded[1]  # not part of the run's identity
    for run in ("dropped", "kept"):  # finished either way: nothing to resume or retrain
        with pytest.raises(GsaeError, match="has finished: there is nothing to resume"):
            train(tiny_run(corpus, tmp_path / run, resume=True))
        with pytest.raises(GsaeError, match="already holds this run, finished"):
            train(tiny_run(corpus, tmp_path / run))


def test_wandb_project_without_wandb_is_refused_before_anything_runs(corpus, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(GsaeError, match=r"--wandb_project needs the wandb package: pip install"):
        train(tiny_run(corpus, tmp_path / "run", wandb_project="gsae"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("context_size, skip_first", [(2, 1), (8, 7), (5, 4)])
def test_no_trainable_position_is_refused_before_the_model_runs(corpus, tmp_path,
                                                                 context_size, skip_first,
                                                                 monkeypatch):
    import gsae.pipeline

    monkeypatch.setattr(gsae.pipeline, "load_model", lambda *_: pytest.fail("model loaded"))
    run = tiny_run(corpus, tmp_path / "r")
    run.data.context_size, run.source.skip_first = context_size, skip_first
    with pytest.raises(GsaeError, match="leaves no position to train on"):
        train(run)
    with pytest.raises(GsaeError, match="leaves no position to train on"):
        cache(CacheRun(model=run.model, data=run.data, source=run.source))


def test_load_for_eval_uses_what_the_sae_records(corpus, tmp_path):
    train(tiny_run(corpus, tmp_path / "run"))
    folder = str(tmp_path / "run" / "model.layers.1" / "k4-beta10-z-x2-s0")
    loaded = load_for_eval([folder])
    assert loaded.model_cfg.model == "tiny-llama"
    assert loaded.data.dataset == os.path.abspath(corpus) or loaded.data.dataset == corpus
    assert loaded.data.context_size == 32 and loaded.names == [folder]
    with pytest.raises(GsaeError, match="trained on model"):
        load_for_eval([folder], model_cfg=ModelConfig(model="tiny-gpt2"))


def test_recorded_settings_keep_the_model_revision_and_corpus(tmp_path):
    from gsae import Provenance, SAEConfig
    from gsae.pipeline import recorded_settings

    provenance = Provenance(hook="model.layers.1",
                            model={"model": "owner/lm", "revision": "abc123"},
                            corpus={"dataset": "docs.txt", "context_size": 48, "split_seed": 3,
                                    "fingerprint": "f"})
    SAE(SAEConfig(n_latents=16, k=2), 8, provenance=provenance).save(tmp_path / "s")
    recorded = recorded_settings([str(tmp_path / "s")])
    assert recorded["model"] == {"model": "owner/lm", "revision": "abc123"}
    assert recorded["data"] == {"dataset": "docs.txt", "context_size": 48, "split_seed": 3}


def test_settings_built_in_python_are_checked_as_flags_are(corpus, tmp_path):
    run = tiny_run(corpus, tmp_path / "r", lr=-1.0)
    with pytest.raises(GsaeError, match="--train.lr must be at least 0"):
        train(run)
    run = tiny_run(corpus, tmp_path / "r")
    run.sae.k = 4
    with pytest.raises(GsaeError, match="--sae.k must be a list"):
        train(run)
    run = tiny_run(corpus, tmp_path / "r")
    run.source.hooks = "01"
    with pytest.raises(GsaeError, match="--source.hooks must be a list"):
        train(run)
    run = tiny_run(corpus, tmp_path / "r", batch_tokens=1024)
    with pytest.raises(GsaeError, match="--batch_tokens 1024 is more than --tokens 768"):
        train(run)
    assert not (tmp_path / "r").exists()


def test_a_store_run_records_the_stores_model_and_corpus(corpus, tmp_path, capsys):
    cache(CacheRun(model=ModelConfig(model="tiny-llama"),
                   data=DataConfig(dataset=corpus, context_size=32),
                   source=tiny_run(corpus, tmp_path).source,
                   store=StoreConfig(store=str(tmp_path / "st"), tokens=600, dtype="float32")))
    run = tiny_run(corpus, tmp_path / "r")
    run.model.model, run.data.context_size = "tiny-gpt2", 64  # not what the store holds
    run.train.store = str(tmp_path / "st")
    train(run)
    assert "model.model, data.context_size" in capsys.readouterr().err
    saved = json.loads((tmp_path / "r" / "run.json").read_text())
    assert saved["model"]["model"] == "tiny-llama" and saved["data"]["context_size"] == 32


def test_a_damaged_checkpoint_is_refused_not_trained_over(corpus, tmp_path):
    run = tiny_run(corpus, tmp_path / "r", tokens=2048, checkpoint_every=1)
    state = tmp_path / "r" / "checkpoint" / "state.json"
    real_fit = Trainer.fit

    def stop_after_a_checkpoint(self, chunks):
        def until_checkpointed():
            for chunk in chunks:
                if state.is_file():
                    raise KeyboardInterrupt
                yield chunk
        return real_fit(self, until_checkpointed())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "fit", stop_after_a_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            train(run)
    state.write_text('{"moment": ')
    sae_file = tmp_path / "r" / "model.layers.1" / "k4-beta10-z-x2-s0" / "sae.safetensors"
    before = sae_file.read_bytes()
    with pytest.raises(GsaeError, match="checkpoint file .*state.json is damaged"):
        train(tiny_run(corpus, tmp_path / "r", tokens=2048, checkpoint_every=1, resume=True))
    assert sae_file.read_bytes() == before


def test_overwrite_removes_the_replaced_runs_saes_and_nothing_else(corpus, tmp_path):
    out = tmp_path / "r"
    train(tiny_run(corpus, out))
    (out / "notes.txt").write_text("mine")
    run = tiny_run(corpus, out, overwrite=True)
    run.sae.k = [2]
    train(run)
    assert sorted(p.name for p in (out / "model.layers.1").iterdir()) == ["k2-beta10-z-x2-s0"]
    assert (out / "notes.txt").read_text() == "mine"
    (out / "run.json").write_text("{damaged")
    train(tiny_run(corpus, out, overwrite=True))  # a damaged run.json is replaced, not refused
    assert (out / "model.layers.1" / "k4-beta10-z-x2-s0" / "sae.safetensors").is_file()


def test_train_saes_checks_its_settings_too(corpus, tmp_path):
    from gsae import SAEConfig
    from gsae.pipeline import train_saes

    with pytest.raises(GsaeError, match="--train.lr must be at least 0"):
        train_saes(tiny_run(corpus, tmp_path / "r", lr=-1.0), [SAEConfig(n_latents=8, k=2)])


# Behaviour that deliberately broken code once got past -------------------------------------------


def test_a_mixed_beta_sweep_trains_its_g_sae_with_gradients(corpus, tmp_path):
    """A sweep of TopK and a g-SAE reads gradients for the g-SAE: it ends as it does trained
    alone, selecting by beta |d.g| > 0, while TopK's effect stays 0."""
    mixed = tiny_run(corpus, tmp_path / "mixed")
    mixed.sae.beta = [0.0, 10.0]
    records = {r["name"].split("/")[1]: r for r in train(mixed).records}
    assert records["k4-beta10-z-x2-s0"]["effect"] > 0
    assert records["k4-beta0-z-x2-s0"]["effect"] == 0
    train(tiny_run(corpus, tmp_path / "alone"))
    sae = Path("model.layers.1") / "k4-beta10-z-x2-s0"
    expected, got = weights(tmp_path / "alone" / sae), weights(tmp_path / "mixed" / sae)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_batch_tokens_may_equal_the_token_budget_but_not_exceed_it(corpus, tmp_path):
    (record,) = train(tiny_run(corpus, tmp_path / "equal", tokens=256, batch_tokens=256)).records
    assert record["step"] == 1 and record["tokens"] == 256
    with pytest.raises(GsaeError, match="--batch_tokens 257 is more than --tokens 256"):
        train(tiny_run(corpus, tmp_path / "over", tokens=256, batch_tokens=257))


def test_train_saes_continues_an_interrupted_run_from_its_checkpoint(corpus, tmp_path,
                                                                     monkeypatch):
    """With extend (what gsae study and gsae compare use), an interrupted run of the same SAEs
    is continued from its checkpoint, not trained again from the start."""
    import gsae.pipeline
    from gsae.pipeline import sweep_configs, train_saes

    def run_in(out, k=4):
        run = tiny_run(corpus, out, tokens=1536, batch_tokens=64, shuffle_tokens=256,
                       checkpoint_every=2)
        run.sae.k = [k]
        return run

    real_fit = gsae.pipeline.Trainer.fit
    starts = []

    def fit_noting_the_start(trainer, chunks):
        starts.append(trainer.chunks_done)
        return real_fit(trainer, chunks)

    out = tmp_path / "r"
    interrupt_fit(monkeypatch, gsae.pipeline.Trainer, 9)
    with pytest.raises(KeyboardInterrupt):
        train(run_in(out))
    done = json.loads((out / "checkpoint" / "state.json").read_text())["chunks_done"]
    assert done > 0
    monkeypatch.setattr(gsae.pipeline.Trainer, "fit", fit_noting_the_start)
    run = run_in(out)
    (record,) = train_saes(run, sweep_configs(run.sae), extend=True).records
    assert starts == [done] and record["tokens"] >= 1536


def test_train_missing_finishes_an_interrupted_run_then_trains_the_rest_beside_it(
        corpus, tmp_path, monkeypatch):
    import gsae.pipeline as pipeline
    from gsae.sae import SAEConfig

    hook = "model.layers.1"
    a, b = (SAEConfig(expansion_factor=2, k=4, beta=10.0, seed=s) for s in (0, 1))
    pipeline.train_saes(tiny_run(corpus, tmp_path / "ref"), [a, b])  # one uninterrupted run
    run = tiny_run(corpus, tmp_path / "run", checkpoint_every=1)
    # after the first step: a run stopped before it trained leaves nothing
    interrupt_fit(monkeypatch, Trainer, 7)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train_missing(run, [a], hook)
    monkeypatch.undo()
    folder_a = tmp_path / "run" / hook / "k4-beta10-z-x2-s0"
    before = {p: p.read_bytes() for p in folder_a.rglob("*") if p.is_file()}
    # a sweep that no longer lists the interrupted SAE is refused, and nothing is lost
    with pytest.raises(GsaeError, match="interrupted run of other SAEs.*list them too"):
        pipeline.train_missing(run, [b], hook)
    assert {p: p.read_bytes() for p in folder_a.rglob("*") if p.is_file()} == before
    calls = []
    train_saes = pipeline.train_saes

    def recording(run, configs, **kwargs):
        calls.append([c.seed for c in configs])
        return train_saes(run, configs, **kwargs)

    monkeypatch.setattr(pipeline, "train_saes", recording)
    assert pipeline.train_missing(run, [a, b], hook) == [a, b]
    assert calls == [[0], [1]]  # the interrupted run resumed, then the new SAE as a run
    for variant in ("k4-beta10-z-x2-s0", "k4-beta10-z-x2-s1"):
        expected = weights(tmp_path / "ref" / hook / variant)
        got = weights(tmp_path / "run" / hook / variant)
        assert all(torch.equal(got[name], expected[name]) for name in expected), variant
    assert pipeline.train_missing(run, [a, b], hook) == [] and calls == [[0], [1]]
