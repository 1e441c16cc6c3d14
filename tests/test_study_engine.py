"""The study engine on the tiny model: a plan declared in Python (a trained variant with
snapshots, a variant fine-tuned from one of its snapshots, one evaluation, one further step)
runs every stage once, and a second run reuses every finished piece."""

import json
from dataclasses import asdict, replace

import pytest

from gsae import pipeline
from gsae.errors import GsaeError
from gsae.evaluate import EvalConfig
from gsae.finetune import FinetuneConfig
from gsae.models import ModelConfig
from gsae.pipeline import TrainRun
from gsae.sae import SAE, SAEConfig
from gsae.source import SourceConfig
from gsae.study.engine import Evaluation, Finetune, Step, Study, StudyPlan, Variant
from gsae.text import DataConfig
from gsae.train import TrainConfig

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
