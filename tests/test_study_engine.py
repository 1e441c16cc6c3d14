"""The study engine on the tiny model: a plan declared in Python (a trained variant with
snapshots, a variant fine-tuned from one of its snapshots, one evaluation, one further step)
runs every stage once, and a second run reuses every finished piece."""

import json
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from gsae import pipeline
from gsae.errors import GsaeError
from gsae.evaluate import EvalConfig
from gsae.finetune import FinetuneConfig
from gsae.models import ModelConfig
from gsae.pipeline import TrainRun
from gsae.sae import SAE, WEIGHTS_FILE, SAEConfig
from gsae.source import SourceConfig
from gsae.study.engine import (
    Evaluation,
    Finetune,
    StageClock,
    Step,
    Study,
    StudyPlan,
    Variant,
    cached,
    command_line,
    flag_text,
    keyed_cache,
    missing_snapshots,
    replay_snapshots,
)
from gsae.text import DataConfig
from gsae.train import TrainConfig, snapshot_folder, variant_name

TOPK = "k4-beta0-z-x2-s0"


def make_plan(corpus, out, finetune_lr=1e-2):
    model, data = ModelConfig(model="tiny-llama"), DataConfig(dataset=corpus, context_size=32)
    train = TrainConfig(tokens=800, batch_tokens=256, shuffle_tokens=512, dead_tokens=800,
                        snapshots=[800], lr=3e-3, store=str(out / "store"))
    run = TrainRun(model=model, data=data, source=SourceConfig(hooks=["1"], lm_batch_size=4),
                   train=train)
    topk = SAEConfig(k=4, beta=0.0, expansion_factor=2, n_latents=0)
    tuned = Finetune(TOPK, 400, FinetuneConfig(tokens=256, lr=finetune_lr, warmup_steps=2))
    cfg = EvalConfig(eval_tokens=128)
    held_out = Evaluation("train", "eval_train", "eval-train.json", asdict(cfg),
                          lambda loaded: pipeline.evaluate_held_out(loaded, cfg))
    counted = Step("count", lambda study, outcome: len(outcome.snapshots))
    return StudyPlan(
        what="a test study", out=out, identity_file="plan.json", identity={"test": 1},
        overwrite=False, model=model, data=data, train_run=run, store=out / "store",
        store_tokens=1200,
        variants=[Variant(topk, counts=[800]),
                  Variant(topk, group="finetuned", finetune=tuned, label="topk+kl")],
        evaluations=lambda study: [held_out], steps=lambda study, outcome: [counted])


def test_a_declared_plan_runs_each_stage_once_and_a_rerun_reuses_them(corpus, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "study"
    outcome = Study(make_plan(corpus, out)).run()
    assert [(s.name, s.requested) for s in outcome.snapshots] == [
        (f"{TOPK}@800", 800), ("topk+kl@656", 656)]  # fine-tuned at 400, then 256 tokens
    # the parent snapshot at 400 was saved though no evaluation asked for it
    parent = out / "saes" / "model.layers.1" / TOPK / "snapshots" / "tokens-400"
    tuned = SAE.load(out / "finetuned" / "model.layers.1" / TOPK)
    assert tuned.provenance.finetuned_from["folder"] == str(parent)
    records = outcome.evaluated["train"][1]
    assert sorted(records) == sorted(s.name for s in outcome.snapshots)
    assert all(len(r) == 2 for r in records.values())  # both inference modes
    assert outcome.extra == {"count": 2}
    clock = json.loads((out / "stage-seconds.json").read_text())
    assert set(clock) == {"store", "train", "finetune", "eval_train", "count"}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("train_saes", "finetune", "evaluate", "evaluate_contexts"):
        monkeypatch.setattr(pipeline, name, refuse)
    again = Study(make_plan(corpus, out)).run()
    assert again.evaluated["train"] == outcome.evaluated["train"]
    assert again.extra == {"count": 2}  # further steps run each time (they cache themselves)
    later = json.loads((out / "stage-seconds.json").read_text())
    assert all(later[k] >= clock[k] for k in clock)


def test_fine_tuned_variants_of_one_run_folder_must_share_their_settings(corpus, tmp_path):
    plan = make_plan(corpus, tmp_path / "study")
    other = replace(plan.variants[1], label="other",
                    finetune=replace(plan.variants[1].finetune,
                                     cfg=FinetuneConfig(tokens=256, lr=1e-3)))
    plan.variants.append(other)
    with pytest.raises(GsaeError, match="differ in their settings or share a parent"):
        Study(plan).run()


# The engine's parts on planted folders and records (no model) ---------------------------------


def bare_plan(variants, out):
    """A plan of only these variants: the parts below read nothing else of it."""
    return StudyPlan(what="a test study", out=out, identity_file="plan.json", identity={},
                     overwrite=False, model=None, data=None, train_run=None, store=out,
                     store_tokens=0, variants=variants, evaluations=lambda study: [])


def test_snapshots_go_folder_by_folder_then_by_count_and_each_variant_keeps_its_last(tmp_path):
    a, b = SAEConfig(k=4, beta=0.0), SAEConfig(k=4, beta=10.0)
    tuned = Finetune("a", 300, FinetuneConfig(tokens=50))
    plan = bare_plan([Variant(a, counts=[200, 100], label="a"),
                      Variant(b, counts=[100], label="b"), Variant(b, group="other", label="c"),
                      Variant(a, group="tuned", finetune=tuned, label="a+kl")], tmp_path)
    folders = {v.name: tmp_path / v.name for v in plan.variants}
    study = SimpleNamespace(plan=plan)
    snaps = Study.snapshots(study, folders)
    assert [(s.name, s.variant, s.requested) for s in snaps] == [
        ("a@100", "a", 100), ("b@100", "b", 100), ("a@200", "a", 200), ("c", "c", 0),
        ("a+kl@350", "a+kl", 350)]
    assert snaps[0].folder == tmp_path / "a" / "snapshots" / "tokens-100"
    assert snaps[3].folder == tmp_path / "c" and snaps[4].folder == tmp_path / "a+kl"
    last = Study.last(study, SimpleNamespace(snapshots=snaps))
    assert sorted(s.name for s in last) == ["a+kl@350", "a@200", "b@100", "c"]
    # the snapshots a trained variant must keep: those evaluated and its twins' starting points
    assert plan.saved_counts(plan.groups()["saes"]) == [100, 200, 300]
    assert plan.saved_counts([plan.variants[1]]) == [100]
    assert list(plan.groups(finetuned=False)) == ["saes", "other"]
    assert list(plan.groups(finetuned=True)) == ["tuned"]


def plant_snapshot(folder, n, text="weights"):
    snap = snapshot_folder(folder, n)
    snap.mkdir(parents=True, exist_ok=True)
    (snap / WEIGHTS_FILE).write_text(text)


def test_only_snapshots_without_weights_are_missing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    plant_snapshot(a, 100)
    plant_snapshot(b, 100)
    plant_snapshot(b, 200)
    snapshot_folder(a, 200).mkdir(parents=True)  # an interrupted save: no weights
    every = {"a": [100, 200, 300], "b": [100, 200, 300]}
    assert missing_snapshots({"a": a, "b": b}, every) == {"a": [200, 300], "b": [300]}
    assert missing_snapshots({"b": b}, {"b": [100, 200]}) == {}
    # each SAE is held to its own counts: b needs no 300 here, and a folder without counts none
    assert missing_snapshots({"a": a, "b": b}, {"a": [100], "b": [200, 300]}) == {"b": [300]}


def test_replayed_snapshots_run_to_the_last_missing_count_and_replace_nothing(tmp_path,
                                                                              monkeypatch):
    configs = [SAEConfig(k=4, beta=0.0), SAEConfig(k=4, beta=10.0), SAEConfig(k=8, beta=0.0)]
    names = [variant_name(c) for c in configs]
    folders = {n: tmp_path / "saes" / n for n in names}
    for n in names:
        plant_snapshot(folders[n], 100, "kept")
    plant_snapshot(folders[names[1]], 300, "kept")
    plant_snapshot(folders[names[2]], 200, "kept")
    plant_snapshot(folders[names[2]], 300, "kept")  # the third lacks nothing
    scratch = tmp_path / "scratch"
    calls = []

    def replay(run, replayed, until=0):
        calls.append((run.train.out, run.train.snapshots, run.train.resume,
                      [variant_name(c) for c in replayed], until))
        records = []
        for c in replayed:
            folder = Path(run.train.out) / variant_name(c)
            for n in run.train.snapshots:
                if n <= until:
                    plant_snapshot(folder, n, "replayed")
            records.append({"folder": str(folder)})
        return SimpleNamespace(records=records)

    monkeypatch.setattr(pipeline, "train_saes", replay)
    run = TrainRun(train=TrainConfig(resume=True))
    replay_snapshots(run, configs, folders, dict.fromkeys(names, [100, 200, 300]), scratch)
    assert calls == [(str(scratch), [200, 300], False, names[:2], 300)]
    text = {n: {c: (snapshot_folder(folders[n], c) / WEIGHTS_FILE).read_text()
                for c in (100, 200, 300)} for n in names}
    assert text == {names[0]: {100: "kept", 200: "replayed", 300: "replayed"},
                    names[1]: {100: "kept", 200: "replayed", 300: "kept"},
                    names[2]: {100: "kept", 200: "kept", 300: "kept"}}
    assert not scratch.exists()
    # nothing lacking now
    replay_snapshots(run, configs, folders, dict.fromkeys(names, [100, 200, 300]), scratch)
    assert len(calls) == 1


def test_a_keyed_cache_computes_again_only_for_another_key(tmp_path):
    path, calls = tmp_path / "check.json", []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    assert keyed_cache(path, {"rows": 10, "id": (1, 2)}, compute) == {"value": 1}
    assert keyed_cache(path, {"rows": 10, "id": (1, 2)}, compute) == {"value": 1}  # a tuple
    assert keyed_cache(path, {"rows": 11, "id": (1, 2)}, compute) == {"value": 2}
    assert keyed_cache(path, {"rows": 10, "id": (1, 2)}, compute) == {"value": 3}
    assert json.loads(path.read_text()) == {"key": {"rows": 10, "id": [1, 2]},
                                            "check": {"value": 3}}


def test_the_stage_clock_adds_every_run_and_counts_an_interrupted_stage(tmp_path):
    path = tmp_path / "stage-seconds.json"
    path.write_text(json.dumps({"train": 100.0}))
    clock = StageClock(path)
    with clock.stage("train"):
        pass
    with pytest.raises(RuntimeError), clock.stage("eval"):
        raise RuntimeError
    saved = json.loads(path.read_text())
    assert set(saved) == {"train", "eval"} and 100.0 <= saved["train"] < 101.0
    assert 0.0 <= saved["eval"] < 1.0
    assert StageClock(path).seconds == saved and clock.rounded()["train"] == round(
        saved["train"], 1)


def test_a_command_line_writes_only_changed_settings_as_their_flags():
    from gsae.study.compare import CompareRun

    run, default = CompareRun(), CompareRun()
    run.sae.k, run.sae.beta = [4, 8], [0.0, 2.5]
    run.train.lr, run.data.dataset, run.train.device = 1e-4, "my corpus", "cpu:1"
    line = command_line(["gsae", "compare"], run, default, skip=("device",))
    assert line == "gsae compare --dataset 'my corpus' --k 4,8 --beta 0,2.5 --lr 0.0001"
    assert flag_text([1.0, 2]) == "1 2" and flag_text("") == "''" and flag_text(0.5) == "0.5"


def test_fine_tuned_variants_of_one_run_folder_may_not_share_a_parent(tmp_path):
    cfg = FinetuneConfig(tokens=256)
    twins = [Variant(SAEConfig(k=4, beta=b), group="tuned", finetune=Finetune("a", 400, cfg),
                     label=f"a+kl{b:g}") for b in (0.0, 10.0)]
    plan = bare_plan([Variant(SAEConfig(k=4), label="a"), *twins], tmp_path)
    with pytest.raises(GsaeError, match="differ in their settings or share a parent"):
        Study.finetune(SimpleNamespace(plan=plan), "h", {"a": tmp_path / "a"})


def test_a_cache_returns_only_the_snapshots_asked_for(tmp_path):
    def compute(names):
        return {"run": {}, "results": [{"sae": n} for n in names]}

    path = tmp_path / "eval.json"
    cached(path, {}, {"x": "fx", "y": "fy"}, compute, [["x", "y"]])
    _, records = cached(path, {}, {"y": "fy"}, lambda names: pytest.fail("computed"), [["y"]])
    assert records == {"y": [{"sae": "y"}]}  # x stays in the file, not in the results
    assert sorted(json.loads(path.read_text())["saes"]) == ["x", "y"]


def test_two_invocations_on_one_folder_keep_each_others_stage_times(tmp_path):
    path = tmp_path / "stage-seconds.json"
    first, second = StageClock(path), StageClock(path)  # both started before either wrote
    with first.stage("eval_train"):
        pass
    with second.stage("finetune"):
        pass
    with first.stage("steer"):
        pass
    assert set(json.loads(path.read_text())) == {"eval_train", "finetune", "steer"}


def test_each_trained_sae_is_replayed_only_for_the_snapshots_it_needs(tmp_path, monkeypatch):
    from gsae.study import engine

    a, b = SAEConfig(k=4, beta=0.0), SAEConfig(k=4, beta=10.0)
    tuned = Finetune("a", 300, FinetuneConfig(tokens=50))
    variants = [Variant(a, counts=[100, 400], label="a"), Variant(b, counts=[200, 400], label="b"),
                Variant(a, group="tuned", finetune=tuned, label="a+kl")]
    plan = replace(bare_plan(variants, tmp_path),
                   train_run=TrainRun(train=TrainConfig(snapshots=[400])))
    trained, replayed = [], []
    monkeypatch.setattr(pipeline, "train_missing",
                        lambda run, configs, hook: trained.append(run.train.snapshots))
    monkeypatch.setattr(engine, "replay_snapshots",
                        lambda run, configs, found, counts, scratch: replayed.append(counts))
    folders = Study.train(SimpleNamespace(plan=plan), "h")
    assert sorted(folders) == ["a", "b"]
    # the run saves every count of its SAEs; a lacks only its own and its twin's start, b its own
    assert trained == [[100, 200, 300, 400]]
    assert replayed == [{"a": [100, 300, 400], "b": [200, 400]}]
