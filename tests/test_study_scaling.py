"""`gsae study`: the learning-curve study end to end on the tiny model (snapshots evaluated on
the training corpus's held-out split and on an unseen corpus, rerun reusing every stage), and
the report's trend rule and verdicts on hand-made numbers."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from gsae.cli import main
from gsae.evaluate import GRAD_AWARE, GRAD_FREE, EvalConfig, evaluate_contexts
from gsae.models import ModelConfig, load_model
from gsae.records import ScalingResult
from gsae.sae import SAE
from gsae.store import StoreReader
from gsae.study.results import Variant
from gsae.study.scaling_report import (
    Curves,
    Series,
    build_scaling_report,
    objective_lines,
    trend,
    trend_phrase,
    verdicts,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SNAPSHOTS = [400, 800, 1600]
NEWS_WORDS = ("markets rose sharply today as investors weighed fresh data on prices wages and "
              "jobs while officials said the bank would hold rates steady until spring").split()


@pytest.fixture(scope="module")
def news(tmp_path_factory):
    """A second corpus of another kind (a news-like register), never trained on."""
    gen = torch.Generator().manual_seed(1)
    docs = [" ".join(NEWS_WORDS[i] for i in torch.randint(0, len(NEWS_WORDS), (90,),
                                                          generator=gen).tolist()) + "."
            for _ in range(12)]
    path = tmp_path_factory.mktemp("news") / "news.txt"
    path.write_text("\n\n".join(docs))
    return str(path)


def study_args(corpus, news, out):
    return ["study", "--model", "tiny-llama", "--dataset", corpus, "--context_size", "32",
            "--hooks", "1", "--lm_batch_size", "4", "--out", str(out), "--store_tokens", "1200",
            "--tokens", "1600", "--snapshots", *map(str, SNAPSHOTS), "--batch_tokens", "256",
            "--k", "4", "--beta", "0,10", "--value_mode", "z", "--seed", "0,1",
            "--n_latents", "0", "--expansion_factor", "2", "--dead_tokens", "800",
            "--eval_tokens", "128", "--unseen", news, "--unseen_tokens", "160",
            "--latents", "3", "--contexts", "2", "--pool", "4", "--steer.context_size", "16",
            "--alphas", "1", "--top_tokens", "3"]


@pytest.fixture(scope="module")
def study(corpus, news, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    assert main(study_args(corpus, news, out)) == 0
    results = json.loads((out / "report" / "results.json").read_text())
    return out, results


def test_results_hold_every_snapshot_on_both_corpora_in_both_modes(study, corpus, news):
    out, results = study
    assert results["schema"] == ScalingResult.SCHEMA == "gsae.scaling/2"
    names = {s["name"] for s in results["saes"]}
    assert names == {f"k4-beta{b}-z-x2-s{s}" for b in (0, 10) for s in (0, 1)}
    for sae in results["saes"]:
        assert [s["requested_tokens"] for s in sae["snapshots"]] == SNAPSHOTS
        # each snapshot is taken after the step that reaches its count (batches of 256 rows)
        assert all(0 <= s["tokens"] - s["requested_tokens"] < 256 for s in sae["snapshots"])
    assert results["corpora"]["train"]["corpus"]["dataset"] == corpus
    assert results["corpora"][news]["corpus"]["dataset"] == news
    for key in ("train", news):
        records = results["eval"][key]["results"]
        assert {(r["variant"], r["snapshot"], r["mode"]) for r in records} == {
            (n, t, m) for n in names for t in SNAPSHOTS for m in (GRAD_AWARE, GRAD_FREE)}
    assert results["eval"][news]["run"]["contexts"] == math.ceil(160 / 32)
    # the run info evaluate wrote: which corpus and which part of it each stage read
    assert results["eval"]["train"]["run"]["corpus"]["dataset"] == corpus
    assert results["eval"]["train"]["run"]["part"] == "eval"
    assert results["eval"][news]["run"]["corpus"]["dataset"] == news
    assert results["eval"][news]["run"]["part"] == "all"
    assert {r["variant"] for r in results["steer"]["results"]} == names
    assert {r["snapshot"] for r in results["steer"]["results"]} == {SNAPSHOTS[-1]}
    assert results["settings"]["train"]["snapshots"] == SNAPSHOTS
    assert list(results["verdicts"]) == ["train", news]
    # no objective variant: no step timing, no objectives report
    assert "cost" not in results and "fisher_sweep" not in results
    assert not (out / "cost.json").exists() and not (out / "objectives-report").exists()


def test_the_store_check_counts_repeated_rows(study):
    out, results = study
    reader = StoreReader(out / "store")
    (hook,) = reader.hooks
    rows = torch.cat([reader.read_shard(n)[hook].x for n in reader.shards])
    # an independent count: rows minus distinct rows
    assert results["store"]["repeated_rows"] == rows.shape[0] - torch.unique(rows, dim=0).shape[0]
    assert results["store"]["rows"] == rows.shape[0]
    assert f"{results['store']['repeated_rows']} of" in (out / "report" / "README.md").read_text()


def _reevaluate(out, results, variant, tokens, contexts):
    """The CE increase of one snapshot, evaluated here from its folder on the given contexts."""
    model, _ = load_model(ModelConfig(model="tiny-llama"))
    folder = next(Path(s["folder"]) for sae in results["saes"] if sae["name"] == variant
                  for s in sae["snapshots"] if s["requested_tokens"] == tokens)
    got = evaluate_contexts([SAE.load(folder)], model, contexts, EvalConfig(batch_size=8))
    return got.results[0].ce_increase


def _unseen_contexts(news):
    """The first five contexts of 32 tokens of the whole news file, packed here."""
    from gsae.text import DataConfig, token_contexts

    model, tokenizer = load_model(ModelConfig(model="tiny-llama"))
    stream = token_contexts(DataConfig(dataset=news, context_size=32, eval_fraction=0.0),
                            tokenizer, "train")
    return torch.stack([next(stream) for _ in range(5)])


def test_each_snapshot_is_evaluated_itself_on_the_unseen_corpus(study, news):
    out, results = study
    contexts = _unseen_contexts(news)
    variant = "k4-beta10-z-x2-s1"
    by = {(r["snapshot"], r["mode"]): r["ce_increase"] for r in results["eval"][news]["results"]
          if r["variant"] == variant}
    for tokens in (SNAPSHOTS[0], SNAPSHOTS[-1]):
        assert by[(tokens, GRAD_AWARE)] == pytest.approx(
            _reevaluate(out, results, variant, tokens, contexts), rel=1e-5)
    assert by[(SNAPSHOTS[0], GRAD_AWARE)] != pytest.approx(by[(SNAPSHOTS[-1], GRAD_AWARE)])


def test_report_has_its_plots_and_the_verdicts_of_the_json(study):
    out, results = study
    report = out / "report"
    text = (report / "README.md").read_text()
    for name in ("ce_increase_vs_tokens.png", "fvu_vs_tokens.png", "dead_fraction_vs_tokens.png",
                 "gap_vs_tokens.png"):
        assert (report / name).read_bytes().startswith(PNG_SIGNATURE)
        assert f"]({name})" in text
    for per_series in results["verdicts"].values():
        for v in per_series.values():
            assert f"tokens {trend_phrase(v['trend'])}" in text
    assert results["command"] in text and results["command"].startswith("gsae study --out ")


def test_a_rerun_reuses_every_stage(study, corpus, news, monkeypatch):
    import gsae.study.scaling as scaling

    out, results = study
    # a study of one unseen corpus made before several were possible kept its results here
    (cache,) = out.glob("eval-unseen-*.json")
    cache.rename(out / "eval-unseen.json")

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("evaluate", "evaluate_contexts", "steer"):
        monkeypatch.setattr(scaling.pipeline, name, refuse)
    monkeypatch.setattr(scaling.pipeline, "train_saes", refuse)
    monkeypatch.setattr(StoreReader, "repeated_rows", refuse)
    shards = {p: p.stat().st_mtime_ns for p in (out / "store").glob("shard-*")}
    assert main(study_args(corpus, news, out)) == 0
    again = json.loads((out / "report" / "results.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in (out / "store").glob("shard-*")} == shards
    assert again["eval"] == results["eval"] and again["verdicts"] == results["verdicts"]


def test_an_unseen_corpus_added_later_is_the_only_one_evaluated(study, corpus, news, tmp_path,
                                                                 monkeypatch):
    import gsae.study.scaling as scaling

    out, results = study
    # "code" (Python's standard library) is on every machine; the tiny tokenizer reads bytes
    evaluated = []
    evaluate_contexts = scaling.pipeline.evaluate_contexts

    def recording(saes, model, contexts, cfg, names, model_id, **kwargs):
        evaluated.append((contexts.clone(), sorted(names)))
        return evaluate_contexts(saes, model, contexts, cfg, names, model_id, **kwargs)

    monkeypatch.setattr(scaling.pipeline, "evaluate",
                        lambda *a, **k: pytest.fail("wiki evaluated again"))
    monkeypatch.setattr(scaling.pipeline, "evaluate_contexts", recording)
    monkeypatch.setattr(scaling.pipeline, "train_saes", lambda *a, **k: pytest.fail("retrained"))
    report, registers = tmp_path / "report", tmp_path / "registers"
    assert main([*study_args(corpus, news, out), "--unseen", news, "code", "--report",
                 str(report), "--registers_report", str(registers), "--per_token", "train",
                 "largest_gap"]) == 0
    (contexts, names), *per_token = evaluated  # one pass over code of every snapshot, then
    assert names == sorted(s["name"] + f"@{n}" for s in results["saes"] for n in SNAPSHOTS)
    # the per-token passes of the last snapshots: the held-out split, and the largest gap
    last = sorted(s["name"] + f"@{SNAPSHOTS[-1]}" for s in results["saes"])
    assert [names for _, names in per_token] == [last, last]
    model, tokenizer = load_model(ModelConfig(model="tiny-llama"))
    from gsae.registers import register_documents
    first = tokenizer(register_documents("code")[0])["input_ids"][:32]
    assert contexts[0].tolist() == first and contexts.shape == (5, 32)
    both = json.loads((report / "results.json").read_text())
    assert list(both["eval"]) == ["train", news, "code"]
    assert both["eval"][news] == results["eval"][news]
    assert both["corpora"]["code"]["corpus"]["kind"] == "register"
    assert list(both["verdicts"]) == ["train", news, "code"]
    assert "`code` (its first tokens" in (report / "README.md").read_text()
    _check_registers(both, registers, news)


def _gap_by_corpus(results, corpus):
    """The mean over seeds of g-SAE (gradient-free) minus TopK at the last snapshot, from the
    evaluation records."""
    by = {(r["variant"], r["mode"]): r["ce_increase"] for r in results["eval"][corpus]["results"]
          if r["snapshot"] == SNAPSHOTS[-1]}
    gaps = [by[(f"k4-beta10-z-x2-s{s}", GRAD_FREE)] - by[(f"k4-beta0-z-x2-s{s}", GRAD_FREE)]
            for s in (0, 1)]
    return sum(gaps) / 2


def _check_registers(results, registers, news):
    largest = min((news, "code"), key=lambda c: _gap_by_corpus(results, c))
    assert list(results["per_token"]) == ["train", largest]
    for corpus in ("train", largest):
        # each position's losses averaged again give the evaluation's CE increase
        part = results["per_token"][corpus]
        evaluated = {(r["variant"], r["mode"]): r["ce_increase"]
                     for r in results["eval"][corpus]["results"]
                     if r["snapshot"] == SNAPSHOTS[-1]}
        assert len(part["results"]) == 4 * 2
        for r in part["results"]:
            assert r["ce_increase"] == pytest.approx(evaluated[(r["variant"], r["mode"])],
                                                     rel=1e-4, abs=1e-6)
        assert sum(part["run"]["clean_ce"]["counts"]) == part["run"]["tokens"]
    _check_gradient_norms(results)
    kl = results["distances"]["corpora"]
    assert set(kl) == {"train", news, "code"} and kl["code"]["tokens"] == 160
    text = (registers / "README.md").read_text()
    assert "## Which tokens carry the gap" in text and "by quantile of the |g|" in text
    assert all((registers / n).read_bytes().startswith(PNG_SIGNATURE)
               for n in ("gap_vs_distance.png", "per_token_gap.png"))


def _check_gradient_norms(results):
    """|g| at the hook recomputed here by autograd on the held-out contexts: its smallest and
    largest values are the outer edges of the per-token bins."""
    from gsae.evaluate import EvalConfig, eval_contexts
    from gsae.text import DataConfig

    model, tokenizer = load_model(ModelConfig(model="tiny-llama"))
    data = DataConfig(dataset=results["settings"]["data"]["dataset"], context_size=32)
    contexts = eval_contexts(data, tokenizer, EvalConfig(eval_tokens=128))
    captured = {}

    def keep(_module, _inputs, output):  # the graph starts at the hook (the weights are frozen)
        h = (output[0] if isinstance(output, tuple) else output).detach().requires_grad_(True)
        captured["h"] = h
        return (h, *output[1:]) if isinstance(output, tuple) else h

    layer = model.model.layers[1]
    handle = layer.register_forward_hook(keep)
    with torch.enable_grad():
        logits = model(contexts).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                 contexts[:, 1:].flatten(), reduction="sum")
        loss.backward()
    handle.remove()
    norms = captured["h"].grad[:, 1:-1].norm(dim=-1)  # CE positions: after skip_first = 1
    edges = results["per_token"]["train"]["run"]["grad_norm"]["edges"]
    assert [edges[0], edges[-1]] == pytest.approx([norms.min().item(), norms.max().item()],
                                                  rel=1e-3)


def test_extra_k_added_later_trains_and_evaluates_only_the_new_saes(study, corpus, news,
                                                                    monkeypatch):
    import gsae.study.scaling as scaling

    out, _ = study
    trained, evaluated = [], []
    train_saes, evaluate = scaling.pipeline.train_saes, scaling.pipeline.evaluate

    def recording_train(run, configs, **kwargs):
        trained.extend((c.k, c.beta, c.seed) for c in configs)
        return train_saes(run, configs, **kwargs)

    def recording_evaluate(saes, *args, names, **kwargs):
        evaluated.extend(names)
        return evaluate(saes, *args, names=names, **kwargs)

    monkeypatch.setattr(scaling.pipeline, "train_saes", recording_train)
    monkeypatch.setattr(scaling.pipeline, "evaluate", recording_evaluate)
    assert main([*study_args(corpus, news, out), "--extra_k", "8"]) == 0
    assert sorted(trained) == [(8, b, s) for b in (0.0, 10.0) for s in (0, 1)]
    assert sorted(evaluated) == sorted(f"k8-beta{b}-z-x2-s{s}@1600" for b in (0, 10)
                                       for s in (0, 1))
    results = json.loads((out / "report" / "results.json").read_text())
    extra = [s for s in results["saes"] if s["extra_k"]]
    assert len(extra) == 4 and all([x["requested_tokens"] for x in s["snapshots"]] == [1600]
                                   for s in extra)
    by_k = results["aggregates"]["ce_increase_by_k"]["train"]["TopK"]
    assert set(by_k) == {"4", "8"} and by_k["8"]["n"] == 2
    assert "## Other values of k" in (out / "report" / "README.md").read_text()


def test_an_interrupted_evaluation_resumes_after_its_last_snapshot_count(corpus, news, tmp_path,
                                                                         monkeypatch):
    import gsae.study.scaling as scaling

    calls, interrupt = [], [True]
    evaluate = scaling.pipeline.evaluate

    def interrupted(saes, *args, names, **kwargs):
        calls.append(names)
        if len(calls) == 2 and interrupt[0]:  # during the second snapshot count
            raise KeyboardInterrupt
        return evaluate(saes, *args, names=names, **kwargs)

    out = tmp_path / "run"
    args = [*study_args(corpus, news, out), "--counts_per_eval", "1"]
    monkeypatch.setattr(scaling.pipeline, "evaluate", interrupted)
    assert main(args) == 130
    cached = json.loads((out / "eval-train.json").read_text())["saes"]
    assert sorted(cached) == sorted(f"k4-beta{b}-z-x2-s{s}@400" for b in (0, 10)
                                    for s in (0, 1))
    spent = json.loads((out / "stage-seconds.json").read_text())
    assert {"store", "train", "eval_train"} <= set(spent) and "steer" not in spent

    calls.clear()
    interrupt[0] = False
    monkeypatch.setattr(scaling.pipeline, "train_saes", lambda *a, **k: pytest.fail("retrained"))
    assert main(args) == 0
    assert [sorted({n.split("@")[1] for n in names}) for names in calls] == [["800"], ["1600"]]
    again = json.loads((out / "stage-seconds.json").read_text())
    assert again["eval_train"] > spent["eval_train"] and again["store"] >= spent["store"]
    results = json.loads((out / "report" / "results.json").read_text())
    assert results["stage_seconds"]["eval_train"] == pytest.approx(again["eval_train"], abs=0.1)
    assert len(results["eval"]["train"]["results"]) == 4 * 3 * 2


def test_eval_groups_take_consecutive_snapshot_counts():
    from gsae.study.scaling import Snapshot, eval_groups

    snaps = [Snapshot(f"{v}@{n}", v, n, Path(".")) for n in (1, 2, 4, 8, 16) for v in "ab"]
    assert eval_groups(snaps, 2) == [["a@1", "b@1", "a@2", "b@2"], ["a@4", "b@4", "a@8", "b@8"],
                                     ["a@16", "b@16"]]
    assert eval_groups(snaps, 0) == [[s.name for s in snaps]]
    assert eval_groups(snaps, 1)[2] == ["a@4", "b@4"]


def test_the_study_refuses_a_sweep_without_topk_and_the_training_corpus_as_unseen(corpus, news,
                                                                                 tmp_path, capsys):
    args = study_args(corpus, news, tmp_path / "x")
    assert main([*args, "--beta", "10"]) == 2
    assert "--beta must list 0 and at least one value above 0" in capsys.readouterr().err
    assert main([*args, "--unseen", corpus]) == 2
    assert "is the training corpus" in capsys.readouterr().err
    assert main([*args, "--unseen", news, news]) == 2
    assert "name each corpus once" in capsys.readouterr().err
    assert main([*args, "--snapshots", "400", "3200"]) == 2
    assert "--snapshots 3200: beyond --tokens 1600" in capsys.readouterr().err


# The trend rule and the verdicts on hand-made numbers -----------------------------------------


def test_trend_rule_on_hand_made_gaps():
    # g-SAE better by about 0.2 nats at the start (negative gap)
    assert trend([-0.2, -0.22, -0.18], [-0.1, -0.12, -0.09])["trend"] == "shrinks"
    assert trend([-0.2, -0.22, -0.18], [-0.3, -0.35, -0.33])["trend"] == "grows"
    assert trend([-0.2, -0.22, -0.18], [-0.21, -0.19, -0.2])["trend"] == "holds"
    # the mean moves 50% but one seed goes the other way
    assert trend([-0.2, -0.2, -0.2], [-0.05, -0.05, -0.25])["trend"].startswith("unclear")
    reversed_ = trend([-0.2, -0.2], [0.1, 0.05])
    assert reversed_["trend"] == "shrinks" and reversed_["reverses"]
    # a positive gap (g-SAE worse) growing further is "grows" too
    grown = trend([0.1, 0.1], [0.2, 0.25])
    assert grown["trend"] == "grows" and grown["relative_change"] == pytest.approx(1.25)
    # exactly at the tolerance (20%) still holds; just beyond does not
    assert trend([-0.5], [-0.6])["trend"] == "holds"
    assert trend([-0.5], [-0.61])["trend"] == "grows"
    assert trend([], [])["trend"] == "not measured"


def synthetic(gap_start, gap_end, counts=(100, 200, 400)):
    """A study result: TopK's CE increase falls from 1.0 to 0.5 over the counts; the g-SAE's is
    TopK's plus a gap moving linearly (in log tokens) from gap_start to gap_end; seed 1 adds
    0.01 to both, so the gap is the same for both seeds."""
    saes, records = [], {"train": [], "unseen": []}
    for beta in (0.0, 100.0):
        for seed in (0, 1):
            name = f"b{beta:g}-s{seed}"
            saes.append({"name": name, "k": 32, "beta": beta, "value_mode": "z", "seed": seed,
                         "n_latents": 64, "extra_k": False,
                         "snapshots": [{"requested_tokens": n, "tokens": n} for n in counts]})
            for i, n in enumerate(counts):
                t = i / (len(counts) - 1)
                topk = 1.0 - 0.5 * t + 0.01 * seed
                ce = topk + (gap_start + (gap_end - gap_start) * t if beta else 0.0)
                for corpus in records:
                    for mode in (GRAD_AWARE, GRAD_FREE):
                        records[corpus].append({
                            "sae": f"{name}@{n}", "variant": name, "snapshot": n, "mode": mode,
                            "ce_increase": ce + (0.05 if corpus == "unseen" else 0.0),
                            "fvu": 0.5 - 0.1 * t, "dead_fraction": 0.1 * t})
    return {
        "schema": ScalingResult.SCHEMA, "command": "gsae study", "created": "2026-12-01 00:00 UTC",
        "versions": {"gsae": "0.1.0"}, "machine": {"description": "2 CPU cores"},
        "wall_seconds": 10.0, "stage_seconds": {"store": 1.0, "train": 2.0},
        "model": {"model": "tiny-llama"}, "hook": "model.layers.1",
        "store": {"folder": "s", "rows": 1000, "repeated_rows": 0, "passes": 0.4},
        "corpora": {"train": {"name": "wiki", "part": "eval"},
                    "unseen": {"name": "news", "part": "all"}},
        "settings": {"train": {"tokens": counts[-1], "batch_tokens": 50},
                     "data": {"dataset": "wiki"}, "sae": {"seed": [0, 1]}},
        "saes": saes,
        "eval": {c: {"run": {"contexts": 4, "context_size": 32}, "results": r}
                 for c, r in records.items()},
        "steer": {"run": {}, "results": []},
    }


@pytest.mark.parametrize("gap_end, expected", [(-0.1, "shrinks"), (-0.19, "holds"),
                                                (-0.4, "grows")])
def test_verdicts_and_report_on_synthetic_curves(gap_end, expected, tmp_path):
    data = synthetic(-0.2, gap_end)
    found = verdicts(Curves(data))
    for corpus in ("train", "unseen"):
        for mode_label in ("g-SAE β=100 (z), gradient-aware", "g-SAE β=100 (z), gradient-free"):
            v = found[corpus][mode_label]
            assert v["trend"] == expected
            assert v["gap"]["mean"] == pytest.approx(gap_end)
            assert v["first"]["mean"] == pytest.approx(-0.2)
            assert v["topk"]["mean"] == pytest.approx(0.505 + (0.05 if corpus == "unseen"
                                                                else 0.0))
            assert v["verdict"] == "held"  # both seeds of the g-SAE below both of TopK
    report = build_scaling_report(data, tmp_path)
    text = report.read_text()
    assert text.count(f"tokens the gap **{expected}** (from") == 4
    written = json.loads((tmp_path / "results.json").read_text())
    gaps = written["aggregates"]["gaps"]["train"]["g-SAE β=100 (z), gradient-aware"]
    assert gaps["100"]["mean"] == pytest.approx(-0.2) and gaps["400"]["mean"] == \
        pytest.approx(gap_end)
    assert all((tmp_path / n).read_bytes().startswith(PNG_SIGNATURE)
               for n in ("ce_increase_vs_tokens.png", "gap_vs_tokens.png"))


def test_curves_keep_the_corpora_apart():
    data = synthetic(-0.2, -0.1)
    cv = Curves(data)
    topk = Series(Variant(0.0, "z"), 32, GRAD_FREE)
    assert cv.values("train", topk, "ce_increase", 100) == pytest.approx([1.0, 1.01])
    assert cv.values("unseen", topk, "ce_increase", 100) == pytest.approx([1.05, 1.06])


# Behaviour that deliberately broken code once got past -------------------------------------------


@pytest.mark.parametrize("first, last, expected", [
    ([-0.5, -0.5], [-0.55, -0.52], "holds"),  # 7% of the first gap
    ([-5.0], [-6.0], "holds"),  # exactly 20% (1 / 5 is the double nearest 0.2): still holds
    ([-0.5, -0.5], [-0.7, -0.65], "grows"),  # 35%
    ([-0.5, -0.5], [-0.3, -0.35], "shrinks"),  # -35%
    ([0.5, 0.5], [0.3, 0.35], "shrinks"),  # a positive gap towards zero
    ([0.5, 0.5], [0.7, 0.65], "grows"),
    # the mean moves 42% away from zero, but one seed of three moves towards it
    ([-0.2, -0.2, -0.2], [-0.35, -0.35, -0.15], "unclear (the seeds disagree)"),
    # the mean moves 42% towards zero, but one seed of three moves away from it
    ([0.2, 0.2, 0.2], [0.05, 0.05, 0.25], "unclear (the seeds disagree)"),
])
def test_trend_rule_on_clear_cases_on_both_sides(first, last, expected):
    assert trend(first, last)["trend"] == expected


def test_steering_aggregate_takes_the_first_strength():
    """The steering table shows the median KL at the first strength (alpha_multiples 1, then
    4), as a spread over the seeds of each variant."""
    data = synthetic(-0.2, -0.1)
    medians = {"b0-s0": (1.0, 9.0), "b0-s1": (1.2, 9.5), "b100-s0": (0.5, 7.0),
               "b100-s1": (0.7, 8.0)}
    data["steer"]["results"] = [
        {"variant": name, "snapshot": 400,
         "summary": [{"alpha_multiple": m, "kl": {"median": v}} for m, v in zip((1, 4), kl)]}
        for name, kl in medians.items()]
    from gsae.study.scaling_report import aggregates

    steering = aggregates(Curves(data))["steering"]
    assert steering["TopK"]["32"]["mean"] == pytest.approx(1.1)
    assert steering["g-SAE β=100 (z)"]["32"]["mean"] == pytest.approx(0.6)
    assert steering["g-SAE β=100 (z)"]["32"]["n"] == 2


def test_a_result_of_the_first_schema_still_loads(tmp_path):
    old = synthetic(-0.2, -0.1)
    old["schema"] = "gsae.scaling/1"
    cv = Curves(old)
    assert cv.corpora == ["train", "news"] and old["schema"] == "gsae.scaling/1"
    topk = Series(Variant(0.0, "z"), 32, GRAD_FREE)
    assert cv.values("news", topk, "ce_increase", 100) == pytest.approx([1.05, 1.06])


def test_the_committed_scaling_report_rebuilds_from_its_results(tmp_path):
    committed = Path(__file__).parents[1] / "docs" / "results" / "scaling"
    data = json.loads((committed / "results.json").read_text())
    build_scaling_report(data, tmp_path)
    rebuilt, original = ((f / "README.md").read_text() for f in (tmp_path, committed))
    # the same text; its numbers equal but for the last printed digit (the committed README was
    # written from unrounded values, results.json holds them rounded)
    number = re.compile(r"-?\d[\d,]*\.?\d*(?:e-?\d+)?")
    assert number.sub("#", rebuilt) == number.sub("#", original)
    for a, b in zip(number.findall(rebuilt), number.findall(original)):
        assert float(a.replace(",", "")) == pytest.approx(float(b.replace(",", "")), rel=1e-3)


# The objectives: variants that change the training objective, against TopK ---------------------


def add_saes(data, name, ce, k=32, extra_k=False, fisher_coef=0.0, parent=None):
    """`data` plus a TopK-like SAE per seed (`{name}-s{seed}`, fine-tuned from
    `{parent}-s{seed}` if given), evaluated only at the last snapshot: `ce[corpus][seed]` is its
    CE increase there."""
    last = data["saes"][0]["snapshots"][-1]["requested_tokens"]
    for seed in (0, 1):
        variant = f"{name}-s{seed}"
        data["saes"].append({"name": variant, "k": k, "beta": 0.0, "value_mode": "z",
                             "seed": seed, "n_latents": 64, "extra_k": extra_k,
                             "fisher_coef": fisher_coef,
                             "finetuned_from": f"{parent}-s{seed}" if parent else None,
                             "snapshots": [{"requested_tokens": last, "tokens": last}]})
        for corpus, values in ce.items():
            data["eval"][corpus]["results"].append({
                "sae": f"{variant}@{last}", "variant": variant, "snapshot": last,
                "mode": GRAD_FREE, "ce_increase": values[seed], "fvu": 0.4,
                "dead_fraction": 0.0})
    return data


def with_objective(data, name, fisher_coef, finetuned, ce):
    """`data` plus a TopK variant with the Fisher term or KL fine-tuning (of the curve's TopK)."""
    return add_saes(data, name, ce, fisher_coef=fisher_coef, parent="b0" if finetuned else None)


def test_an_objective_holds_only_with_a_fifth_less_ce_increase_everywhere(tmp_path):
    # TopK at the last snapshot: 0.50 and 0.51 (seeds 0, 1) on train, 0.55 and 0.56 unseen
    data = with_objective(synthetic(-0.2, -0.1), "kl", 0.0, True,
                          {"train": [0.39, 0.39], "unseen": [0.43, 0.43]})
    data = with_objective(data, "fisher", 0.5, False,
                          {"train": [0.39, 0.39], "unseen": [0.43, 0.46]})
    found = verdicts(Curves(data))
    kl, fisher = "TopK + KL fine-tuning", "TopK + Fisher λ=0.5"
    assert found["train"][kl]["reduction"]["min"] == pytest.approx(1 - 0.39 / 0.50)
    assert found["train"][kl]["reduction"]["max"] == pytest.approx(1 - 0.39 / 0.51)
    assert found["unseen"][kl]["every_seed_reduced"]  # 21.8% and 23.2%
    assert found["train"][fisher]["every_seed_reduced"]
    assert not found["unseen"][fisher]["every_seed_reduced"]  # seed 1: 1 - 0.46 / 0.56 = 17.9%
    text = build_scaling_report(data, tmp_path).read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()
            if line.startswith("| TopK + ")}
    assert rows[kl].endswith("**holds** |") and rows[fisher].endswith("does not hold |")
    assert "+22.8% (+22.0%..+23.5%)" in rows[kl]  # train: mean of 22.0% and 23.5%, min..max


def test_an_objective_at_exactly_a_fifth_less_holds():
    # TopK 0.50/0.51 (train), 0.55/0.56 (unseen): 80% of each is exactly a fifth less
    data = with_objective(synthetic(-0.2, -0.1), "edge", 0.25, False,
                          {"train": [0.40, 0.408], "unseen": [0.44, 0.448]})
    data = with_objective(data, "under", 0.75, False,
                          {"train": [0.40, 0.4081], "unseen": [0.44, 0.448]})
    found = verdicts(Curves(data))
    assert all(found[c]["TopK + Fisher λ=0.25"]["every_seed_reduced"] for c in ("train", "unseen"))
    assert not found["train"]["TopK + Fisher λ=0.75"]["every_seed_reduced"]  # 19.98%


def test_kl_fine_tuned_twins_come_from_the_snapshot_before_the_last_share(study, corpus, news,
                                                                          tmp_path, monkeypatch):
    import shutil

    import gsae.study.scaling as scaling

    out = tmp_path / "run"
    shutil.copytree(study[0], out)
    args = [*study_args(corpus, news, out), "--store", str(study[0] / "store"),
            "--finetune_fraction", "0.25"]  # the study.json copied names that store
    parents, finetune = [], scaling.pipeline.finetune
    timed, step_seconds = [], scaling.step_seconds

    def recording(run):
        parents.extend(run.saes)
        return finetune(run)

    def timing(configs, batches, cfg, warmup):
        timed.append((len(configs), len(batches), {len(b.x) for b in batches}, warmup))
        return step_seconds(configs, batches, cfg, warmup)

    monkeypatch.setattr(scaling.pipeline, "finetune", recording)
    monkeypatch.setattr(scaling, "step_seconds", timing)
    assert main(args) == 0
    saes = out / "saes" / "model.layers.1"
    assert sorted(parents) == sorted(str(saes / v / "snapshots" / "tokens-1200")
                                     for v in (f"k4-beta{b}-z-x2-s{s}" for b in (0, 10)
                                               for s in (0, 1)))
    results = json.loads((out / "report" / "results.json").read_text())
    twins = [s for s in results["saes"] if s["finetuned_from"]]
    assert sorted(s["name"] for s in twins) == sorted(
        f"k4-beta{b}-z-x2-s{s}+kl" for b in (0, 10) for s in (0, 1))
    for key in ("train", news):
        done = {(r["variant"], r["snapshot"]) for r in results["eval"][key]["results"]}
        assert {(s["name"], 1600) for s in twins} <= done
    assert "## Objectives" in (out / "report" / "README.md").read_text()
    assert {s["finetuned_at"] for s in twins} == {1200}
    assert not any("finetuned_at" in s for s in results["saes"] if not s["finetuned_from"])
    # the steps of the two settings (their first seed's) timed once: 2 untimed rounds, then 12,
    # of --batch_tokens rows; the objectives report shows them
    assert timed == [(2, 14, {256}, 2)]
    assert sorted(results["cost"]["step_seconds"]) == [f"k4-beta{b}-z-x2-s0" for b in (0, 10)]
    assert "## Cost" in (out / "objectives-report" / "README.md").read_text()
    # a second run reuses the fine-tuned twins
    monkeypatch.setattr(scaling.pipeline, "finetune", lambda run: pytest.fail("fine-tuned again"))
    monkeypatch.setattr(scaling, "step_seconds", lambda *a: pytest.fail("timed again"))
    assert main(args) == 0


def test_an_objective_is_measured_in_each_mode_against_topk_and_fails_without_records():
    # a g-SAE with the Fisher term, evaluated on the training corpus only: in gradient-aware
    # inference 0.35 and 0.357 (TopK: 0.50 and 0.51), gradient-free 0.45 and 0.459
    data = synthetic(-0.2, -0.1)
    for seed in (0, 1):
        name = f"fisher-s{seed}"
        data["saes"].append({"name": name, "k": 32, "beta": 100.0, "value_mode": "z",
                             "seed": seed, "n_latents": 64, "extra_k": False,
                             "fisher_coef": 0.5, "finetuned_from": None,
                             "snapshots": [{"requested_tokens": 400, "tokens": 400}]})
        for mode, share in ((GRAD_AWARE, 0.7), (GRAD_FREE, 0.9)):
            data["eval"]["train"]["results"].append({
                "sae": f"{name}@400", "variant": name, "snapshot": 400, "mode": mode,
                "ce_increase": share * (0.5 + 0.01 * seed), "fvu": 0.4, "dead_fraction": 0.0})
    found = verdicts(Curves(data))
    aware = "g-SAE β=100 (z) + Fisher λ=0.5, gradient-aware"
    free = "g-SAE β=100 (z) + Fisher λ=0.5, gradient-free"
    assert found["train"][aware]["reduction"]["mean"] == pytest.approx(0.3)
    assert found["train"][aware]["every_seed_reduced"]
    assert found["train"][free]["reduction"]["mean"] == pytest.approx(0.1)
    assert not found["train"][free]["every_seed_reduced"]
    # no records on the unseen corpus: nothing was reduced there
    assert found["unseen"][aware]["reduction"] is None
    assert not found["unseen"][aware]["every_seed_reduced"]
    lines = objective_lines(Curves(data), found)
    assert [line.split(" | ")[-1] for line in lines if line.startswith("| g-SAE")] == [
        "does not hold |", "does not hold |"]


def test_topk_is_one_variant_whatever_value_mode_its_records_name():
    assert Variant.of({"beta": 0, "value_mode": "x"}) == Variant(0.0, "z")
    assert Variant.of({"beta": 1, "value_mode": "x", "fisher_coef": None,
                       "finetuned_from": ""}) == Variant(1.0, "x")
    assert Variant.of({"beta": 0, "value_mode": "z", "fisher_coef": 2,
                       "finetuned_from": "p"}).label == "TopK + Fisher λ=2 + KL fine-tuning"


def test_an_objective_leaves_out_seeds_with_an_undefined_ce_increase():
    data = with_objective(synthetic(-0.2, -0.1), "kl", 0.0, True,
                          {"train": [0.39, None], "unseen": [0.43, 0.43]})
    for record in data["eval"]["unseen"]["results"]:
        if record["variant"] == "b0-s1" and record["snapshot"] == 400:
            record["ce_increase"] = 0.0  # TopK's own: no reduction is defined against it
    found = verdicts(Curves(data))["train"]["TopK + KL fine-tuning"]
    assert found["reduction"]["n"] == 1
    assert found["reduction"]["mean"] == pytest.approx(1 - 0.39 / 0.50)
    unseen = verdicts(Curves(data))["unseen"]["TopK + KL fine-tuning"]
    assert unseen["reduction"]["n"] == 1
    # the gaps leave that seed out too (a record's None: a non-finite CE, e.g. a diverged SAE)
    series = Series(Variant(0.0, "z", finetuned=True), 32, GRAD_FREE)
    assert Curves(data).gaps("train", series, 400) == [pytest.approx(0.39 - 0.50)]


def test_the_fisher_sweep_chooses_lambda_on_contexts_its_saes_never_read(study, corpus, news,
                                                                         tmp_path, monkeypatch):
    import shutil

    import gsae.store as store_module
    from gsae.study import fisher_sweep

    out = tmp_path / "run"
    shutil.copytree(study[0], out)
    store = study[0] / "store"
    args = [*study_args(corpus, news, out), "--store", str(store), "--fisher_sweep", "0.5", "4",
            "--sweep_tokens", "512", "--validation_fraction", "0.5"]
    shards = json.loads((store / "manifest.json").read_text())["shards"]
    held = shards[-1]  # 2 shards: the second is the validation part
    assert len(shards) == 2
    read: list[str] = []
    original = store_module.StoreReader.read_shard

    def recording(self, name):
        read.append(name)
        return original(self, name)

    sweep_train = fisher_sweep.FisherSweep.plan
    seen_by_sweep: list[str] = []

    def plan_recording(self):
        plan = sweep_train(self)
        train_missing = fisher_sweep.Study.train

        def train(study_self, hook):
            read.clear()
            folders = train_missing(study_self, hook)
            if study_self.plan is plan:  # the sweep's training, not the study's
                seen_by_sweep.extend(read)
            return folders

        monkeypatch.setattr(fisher_sweep.Study, "train", train)
        return plan

    monkeypatch.setattr(store_module.StoreReader, "read_shard", recording)
    monkeypatch.setattr(fisher_sweep.FisherSweep, "plan", plan_recording)
    assert main(args) == 0
    assert seen_by_sweep and held["file"] not in seen_by_sweep  # trained, never on the held part
    results = json.loads((out / "report" / "results.json").read_text())
    sweep = results["fisher_sweep"]
    rows = {r["fisher_coef"]: r for r in sweep["results"]}
    assert sorted(rows) == [0.0, 0.5, 4.0]
    best = min((0.5, 4.0), key=lambda v: rows[v]["ce_increase"])
    assert sweep["chosen"] == best
    coefs = {s["name"]: s["fisher_coef"] for s in results["saes"]}
    assert {c for c in coefs.values()} == {0.0, best}
    assert f"k4-beta0-f{best:g}-z-x2-s1" in coefs
    # the recorded command is the one given (the sweep sets lambda again when it is rerun)
    assert "--fisher_sweep 0.5 4" in results["command"]
    assert "--fisher_coef" not in results["command"]
    # the validation contexts are those the held shard was made from: the model's activations
    # on them, taken here with a plain forward hook, are the shard's first rows
    # evaluated: the first --eval_tokens 128 / 32 = 4 of its 8 contexts (shard 0: 8 batches
    # of 4 contexts before it)
    assert held["batches"] == 2
    assert sweep["validation_contexts"] == [shards[0]["batches"] * 4, shards[0]["batches"] * 4 + 4]
    model, tokenizer = load_model(ModelConfig(model="tiny-llama"))
    from gsae.caching import validation_contexts
    from gsae.text import DataConfig

    data = DataConfig(dataset=corpus, context_size=32)
    reader = StoreReader(store, validation_fraction=0.5)
    contexts = validation_contexts(reader, data, tokenizer, 10_000)
    captured = {}
    handle = model.model.layers[1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("x", (o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        model(contexts[:1])
    handle.remove()
    stored = reader.read_shard(held["file"])["model.layers.1"].x
    expected = captured["x"][0, 1:31].float()
    torch.testing.assert_close(stored[:30], expected, atol=2e-3, rtol=2e-3)
    assert contexts.shape[0] == held["batches"] * 4  # every context of the held shard


def test_the_objectives_report_costs_each_variant_from_its_measured_parts(tmp_path):
    from gsae.study.objectives_report import build_objectives_report

    data = with_objective(synthetic(-0.2, -0.1), "kl", 0.0, True,
                          {"train": [0.39, 0.39], "unseen": [0.43, 0.43]})
    data = with_objective(data, "fisher", 0.5, False,
                          {"train": [0.60, 0.62], "unseen": [0.43, 0.46]})
    for sae in data["saes"]:
        if sae.get("finetuned_from"):
            sae["finetuned_at"] = 350
    data["stage_seconds"] = {"store": 100.0, "train": 20.0, "finetune": 8.0, "eval_train": 30.0,
                             "eval_unseen": 10.0, "steer": 1.0}
    data["cost"] = {"step_seconds": {"b0-s0": 0.5, "b100-s0": 0.75, "fisher-s0": 0.6}}
    data["fisher_sweep"] = {
        "tokens": 600, "validation_fraction": 0.1, "validation_contexts": [40, 44],
        "sae": "b0-s0", "chosen": 0.5, "stage_seconds": {"train": 3.0, "eval_validation": 1.0},
        "results": [{"fisher_coef": c, "ce_increase": ce, "kl": 0.1, "fvu": 0.3,
                     "dead_fraction": 0.0}
                    for c, ce in ((0.0, 0.7), (0.1, 0.9), (0.5, 0.8), (2.0, 0.95))]}
    text = build_objectives_report(data, tmp_path).read_text()
    cost = json.loads((tmp_path / "results.json").read_text())["objectives"]["cost"]
    # 400 tokens in steps of 50: 8 steps; the twins' parents trained 350 tokens: 7 steps; the
    # fine-tuning stage's 8 s over its 2 SAEs; the evaluation stages' 40 s over 16 evaluated
    # snapshots (4 curve SAEs x 3 counts + 4 objective SAEs x 1)
    per_eval = 40.0 / 16
    expected = {"TopK": (4.0, 0.0, 3 * per_eval), "g-SAE β=100 (z)": (6.0, 0.0, 3 * per_eval),
                "TopK + KL fine-tuning": (3.5, 4.0, per_eval),
                "TopK + Fisher λ=0.5": (4.8, 0.0, per_eval)}
    for label, (training, finetune, evaluation) in expected.items():
        got = cost["variants"][label]
        assert (got["training"], got["finetune"], got["evaluation"]) == pytest.approx(
            (training, finetune, evaluation)), label
    assert cost["store"] == 100.0
    row = next(line for line in text.splitlines()
               if line.startswith("| TopK + KL fine-tuning | 500 ms |"))  # the parent's step
    total = 100.0 + 3.5 + 4.0 + per_eval
    assert f"({3.5 / total:.0%})" in row and f"({100 / total:.0%})" in row
    verdict_rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()
                    if line.startswith("| TopK + ") and line.endswith("hold |")
                    or line.endswith("**holds** |")}
    assert verdict_rows["TopK + KL fine-tuning"].endswith("**holds** |")
    assert verdict_rows["TopK + Fisher λ=0.5"].endswith("does not hold |")
    assert "| 0.5 (chosen) | 0.8000 |" in text and "| 0.1 | 0.9000 |" in text
    assert "contexts 40..43" in text
    assert all((tmp_path / n).read_bytes().startswith(PNG_SIGNATURE)
               for n in ("ce_increase_vs_tokens.png", "pareto_ce_vs_fvu.png",
                         "reduction_vs_topk.png"))


def test_the_fisher_sweep_takes_distinct_positive_lambdas_and_chooses_among_them():
    from dataclasses import replace

    from gsae.errors import GsaeError
    from gsae.study.fisher_sweep import choose, sweep_values
    from gsae.study.scaling import ScalingRun

    run = ScalingRun()
    for values, sweep_coef in (([0.5, 0.5], [0.0]), ([0.0, 1.0], [0.0]), ([1.0], [0.0, 2.0])):
        bad = replace(run, study=replace(run.study, fisher_sweep=values),
                      sae=replace(run.sae, fisher_coef=sweep_coef))
        with pytest.raises(GsaeError, match="fisher_sweep"):
            sweep_values(bad)
    good = replace(run, study=replace(run.study, fisher_sweep=[0.3, 0.1]))
    assert sweep_values(good) == [0.0, 0.3, 0.1]
    # lambda 0 is the reference, never chosen, even when it is lowest; undefined rows skipped
    rows = [{"fisher_coef": 0.0, "ce_increase": 0.1}, {"fisher_coef": 0.3, "ce_increase": None},
            {"fisher_coef": 1.0, "ce_increase": 0.5}, {"fisher_coef": 3.0, "ce_increase": 0.4}]
    assert choose(rows) == 3.0
    with pytest.raises(GsaeError, match="no finite validation CE increase"):
        choose(rows[:2])


def test_extra_k_of_topk_alone_gets_fine_tuned_twins_of_its_own(study, corpus, news, tmp_path,
                                                                  monkeypatch):
    import shutil

    import gsae.study.scaling as scaling

    out = tmp_path / "run"
    shutil.copytree(study[0], out)
    trained, parents = [], []
    train_saes, finetune = scaling.pipeline.train_saes, scaling.pipeline.finetune

    def recording_train(run, configs, **kwargs):
        trained.extend((c.k, c.beta, c.seed, run.train.out.rsplit("/", 1)[-1]) for c in configs)
        return train_saes(run, configs, **kwargs)

    def recording_finetune(run):
        parents.append((run.train.out.rsplit("/", 1)[-1], sorted(run.saes)))
        return finetune(run)

    monkeypatch.setattr(scaling.pipeline, "train_saes", recording_train)
    monkeypatch.setattr(scaling.pipeline, "finetune", recording_finetune)
    args = [*study_args(corpus, news, out), "--store", str(study[0] / "store"),
            "--extra_k", "6", "--extra_beta", "0", "--finetune_fraction", "0.25"]
    assert main(args) == 0
    # TopK alone at k 8 (both seeds), in its own run; the curve's snapshots at 1,200 replayed
    assert sorted(t for t in trained if t[3] == "saes-extra") == [(6, 0.0, s, "saes-extra")
                                                                 for s in (0, 1)]
    extra_parents = [p for group, p in parents if group == "saes-finetuned-extra"]
    saes = out / "saes-extra" / "model.layers.1"
    assert extra_parents == [sorted(str(saes / f"k6-beta0-z-x2-s{s}" / "snapshots" / "tokens-1200")
                                    for s in (0, 1))]
    results = json.loads((out / "report" / "results.json").read_text())
    flags = {s["name"]: s["extra_k"] for s in results["saes"]}
    assert flags["k6-beta0-z-x2-s0+kl"] and flags["k6-beta0-z-x2-s1"]
    assert not flags["k4-beta0-z-x2-s0+kl"] and "k6-beta10-z-x2-s0" not in flags
    done = {(r["variant"], r["snapshot"]) for r in results["eval"]["train"]["results"]}
    assert {("k6-beta0-z-x2-s0+kl", 1600), ("k6-beta0-z-x2-s1", 1600)} <= done
    assert sorted(results["cost"]["step_seconds"]) == [
        "k4-beta0-z-x2-s0", "k4-beta10-z-x2-s0", "k6-beta0-z-x2-s0"]


def _objective_run(corpus, news, **study):
    """A study's settings (nothing run): TopK and a g-SAE at k 4, with and without the Fisher
    term, and the given study flags."""
    from dataclasses import replace

    from gsae.study.scaling import ScalingRun
    from gsae.text import DataConfig

    base = ScalingRun()
    return replace(base, data=DataConfig(dataset=corpus, context_size=32),
                   sae=replace(base.sae, k=[4], beta=[0.0, 10.0], seed=[0], n_latents=[0],
                               expansion_factor=[2], fisher_coef=[0.0, 0.5]),
                   train=replace(base.train, tokens=1600, batch_tokens=256, snapshots=SNAPSHOTS),
                   study=replace(base.study, unseen=[news], **study))


def test_extra_k_keeps_the_chosen_lambdas_and_only_saes_without_the_term_get_twins(corpus,
                                                                                     news):
    from gsae.study.scaling import ScalingPlan, extra_configs

    run = _objective_run(corpus, news, extra_k=[8], extra_fisher_coef=[0.0])
    assert sorted((c.k, c.beta, c.fisher_coef) for c in extra_configs(run)) == [
        (8, 0.0, 0.0), (8, 10.0, 0.0)]
    run = _objective_run(corpus, news, extra_k=[8], extra_beta=[0.0], extra_fisher_coef=[0.5])
    assert [(c.k, c.beta, c.fisher_coef) for c in extra_configs(run)] == [(8, 0.0, 0.5)]
    run = _objective_run(corpus, news, extra_k=[8], finetune_fraction=0.25)
    twins = ScalingPlan(run).finetuned()
    # the Fisher SAEs (curve and --extra_k) get none; the others start at 1,600 - 400 tokens
    assert sorted((v.group, v.config.k, v.config.beta, v.finetune.at) for v in twins) == [
        ("saes-finetuned", 4, 0.0, 1200), ("saes-finetuned", 4, 10.0, 1200),
        ("saes-finetuned-extra", 8, 0.0, 1200), ("saes-finetuned-extra", 8, 10.0, 1200)]
    assert all(v.config.fisher_coef == 0 for v in twins)


def test_the_fisher_sweep_trains_the_first_topk_briefly_and_validates_on_whole_contexts(
        study, corpus, news, monkeypatch):
    import itertools
    from dataclasses import replace
    from types import SimpleNamespace

    from gsae import pipeline
    from gsae.study.fisher_sweep import FisherSweep, reference_config
    from gsae.study.scaling import curve_configs
    from gsae.text import DataConfig, token_contexts

    store = study[0] / "store"
    run = _objective_run(corpus, news, fisher_sweep=[0.5, 2.0], sweep_tokens=512,
                         validation_fraction=0.5)
    run = replace(run, sae=replace(run.sae, k=[8, 4], beta=[10.0, 0.0], seed=[3, 1],
                                   fisher_coef=[0.0]),
                  eval=replace(run.eval, eval_tokens=100))
    reference = reference_config(run, curve_configs(run))
    assert (reference.k, reference.beta, reference.seed, reference.fisher_coef) == (8, 0, 3, 0)
    sweep = FisherSweep(run, reference, store)
    assert [(c.k, c.beta, c.seed, c.fisher_coef) for c in sweep.configs] == [
        (8, 0, 3, 0), (8, 0, 3, 0.5), (8, 0, 3, 2.0)]
    train = sweep.train_run().train
    assert (train.tokens, train.snapshots, train.validation_fraction, train.store) == (
        512, [], 0.5, str(store))
    _, tokenizer = load_model(ModelConfig(model="tiny-llama"))
    (evaluation,) = sweep.evaluations(SimpleNamespace(tokenizer=tokenizer))
    # 2 shards, the second held: the contexts after the first shard's batches of 4 contexts;
    # --eval_tokens 100 takes ceil(100 / 32) = 4 whole contexts of them
    shards = json.loads((store / "manifest.json").read_text())["shards"]
    first = 4 * shards[0]["batches"]
    assert evaluation.settings["contexts"] == [first, first + 4]
    seen = {}
    monkeypatch.setattr(pipeline, "evaluate_on",
                        lambda loaded, contexts, cfg: seen.update(contexts=contexts, cfg=cfg))
    evaluation.evaluate(None)
    stream = token_contexts(DataConfig(dataset=corpus, context_size=32), tokenizer, "train")
    assert torch.equal(seen["contexts"],
                       torch.stack(list(itertools.islice(stream, first, first + 4))))
    assert seen["cfg"].eval_tokens == 4 * 32


def test_validation_contexts_need_a_validation_part_and_the_store_s_corpus(study, tmp_path):
    from gsae.caching import validation_contexts
    from gsae.errors import GsaeError
    from gsae.text import DataConfig

    _, tokenizer = load_model(ModelConfig(model="tiny-llama"))
    store = study[0] / "store"
    short = tmp_path / "short.txt"
    short.write_text(" ".join(NEWS_WORDS))  # a few contexts: fewer than the store read
    with pytest.raises(GsaeError, match="without a validation part"):
        validation_contexts(StoreReader(store), DataConfig(dataset=str(short), context_size=32),
                            tokenizer, 100)
    with pytest.raises(GsaeError, match="fewer contexts than the store"):
        validation_contexts(StoreReader(store, validation_fraction=0.5),
                            DataConfig(dataset=str(short), context_size=32), tokenizer, 100)


def test_the_objectives_report_compares_each_seed_with_topk_of_its_own_seed(tmp_path):
    from gsae.errors import GsaeError
    from gsae.study.objectives_report import (
        _first_seed,
        build_objectives_report,
        per_seed_reductions,
    )

    with pytest.raises(GsaeError, match="no objective variant"):
        build_objectives_report(synthetic(-0.2, -0.1), tmp_path / "none")
    # TopK at the last snapshot (400): 0.50 and 0.51 (seeds 0, 1) on train, FVU 0.4, dead 0.1
    data = with_objective(synthetic(-0.2, -0.1), "kl", 0.0, True,
                          {"train": [0.39, 0.40], "unseen": [0.43, 0.43]})
    kl = Series(Variant(0.0, "z", finetuned=True), 32, GRAD_FREE)
    assert per_seed_reductions(Curves(data), "train", kl) == [
        pytest.approx(1 - 0.39 / 0.50), pytest.approx(1 - 0.40 / 0.51)]
    # TopK's gradient-free record is the reference of a gradient-aware series too (TopK's two
    # modes are one computation, and a study may record TopK in one mode only)
    only_free = json.loads(json.dumps(data))
    for part in only_free["eval"].values():
        part["results"] = [r for r in part["results"]
                           if r["variant"].startswith("b100") or r["mode"] == GRAD_FREE]
    aware = Series(Variant(100.0, "z"), 32, GRAD_AWARE)  # its CE: TopK's - 0.1 at the end
    assert per_seed_reductions(Curves(only_free), "train", aware) == [
        pytest.approx(0.1 / 0.50), pytest.approx(0.1 / 0.51)]
    build_objectives_report(data, tmp_path)
    table = json.loads((tmp_path / "results.json").read_text())["objectives"]["last_snapshot"]
    topk, tuned = table["train"]["TopK"], table["train"]["TopK + KL fine-tuning"]
    assert (topk["ce_increase"]["mean"], topk["fvu"]["mean"], topk["dead_fraction"]["mean"]) == \
        pytest.approx((0.505, 0.4, 0.1))
    assert topk["reduction"] is None
    assert (tuned["ce_increase"]["min"], tuned["ce_increase"]["max"]) == pytest.approx((0.39, 0.4))
    assert (tuned["reduction"]["min"], tuned["reduction"]["max"]) == pytest.approx(
        (1 - 0.40 / 0.51, 1 - 0.39 / 0.50), abs=1e-4)
    # the step timing keys settings by their first seed's name, a twin's by its parent's
    assert _first_seed("k4-beta10-z-x2-s3") == "k4-beta10-z-x2-s0"
    assert _first_seed("k4-beta0-f0.5-z-x2-s12+kl") == "k4-beta0-f0.5-z-x2-s0"
    assert _first_seed("k4-beta10-score-x2-s1") == "k4-beta10-score-x2-s0"


def with_extra_k(data, k, topk_ce, kl_ce):
    """`data` plus TopK and its KL twin at another k (--extra_k), evaluated at the last snapshot
    only, with the CE increases `topk_ce` and `kl_ce` (per corpus, per seed)."""
    data = add_saes(data, f"t{k}", topk_ce, k=k, extra_k=True)
    return add_saes(data, f"t{k}+kl", kl_ce, k=k, extra_k=True, parent=f"t{k}")


def test_the_objectives_report_compares_the_variants_at_other_values_of_k(tmp_path):
    from gsae.study.objectives_report import build_objectives_report

    # k 32 (the curve): TopK 0.50/0.51 on train, 0.55/0.56 unseen; its twin 0.39/0.40, 0.43/0.43
    data = with_objective(synthetic(-0.2, -0.1), "kl", 0.0, True,
                          {"train": [0.39, 0.40], "unseen": [0.43, 0.43]})
    no_extra = build_objectives_report(json.loads(json.dumps(data)), tmp_path / "a").read_text()
    assert "## Other values of k" not in no_extra and "other values of k (--extra_k)" in no_extra
    # k 16: the twin cuts 30%/25% on train but only 10% for seed 1 unseen; k 64: 40%/50% and
    # 25%/24%
    data = with_extra_k(data, 16, {"train": [1.0, 0.8], "unseen": [1.0, 1.0]},
                        {"train": [0.7, 0.6], "unseen": [0.7, 0.9]})
    data = with_extra_k(data, 64, {"train": [0.5, 0.4], "unseen": [0.4, 0.5]},
                        {"train": [0.3, 0.2], "unseen": [0.3, 0.38]})
    # a Fisher variant on the curve and at k 16 only: not compared at every k, so left out
    data = with_objective(data, "fisher", 0.5, False, {"train": [0.5, 0.5], "unseen": [0.5, 0.5]})
    data = add_saes(data, "f16", {"train": [0.6, 0.6], "unseen": [0.6, 0.6]}, k=16,
                    extra_k=True, fisher_coef=0.5)
    text = build_objectives_report(data, tmp_path / "b").read_text()
    by_k = json.loads((tmp_path / "b" / "results.json").read_text())["objectives"]["other_k"]
    assert list(by_k["train"]) == ["16", "32", "64"]
    assert set(by_k["train"]["16"]) == {"TopK", "TopK + KL fine-tuning"}  # not the g-SAE
    tuned = by_k["unseen"]["16"]["TopK + KL fine-tuning"]
    assert (tuned["reduction"]["min"], tuned["reduction"]["max"]) == pytest.approx((0.1, 0.3))
    assert not tuned["every_seed_reduced"]
    assert by_k["train"]["64"]["TopK"]["ce_increase"]["mean"] == pytest.approx(0.45)
    assert by_k["train"]["32"]["TopK + KL fine-tuning"]["reduction"]["min"] == pytest.approx(
        1 - 0.40 / 0.51, abs=1e-4)
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
            for line in text.split("## Other values of k")[1].splitlines()
            if line.startswith("| ") and not line.startswith("| k ")}
    assert rows[("16", "TopK + KL fine-tuning")].endswith("does not hold |")
    assert rows[("32", "TopK + KL fine-tuning")].endswith("**holds** |")
    assert rows[("64", "TopK + KL fine-tuning")].endswith("**holds** |")
    assert "+45.0% (+40.0%..+50.0%)" in rows[("64", "TopK + KL fine-tuning")]  # train
    assert rows[("64", "TopK")].endswith("(TopK) |") and "0.45 ± 0.05" in rows[("64", "TopK")]
    assert "other values of k (--extra_k)" not in text
    assert "At k = 16, 64 (last snapshot only): TopK, TopK + KL fine-tuning." in text


def test_the_curve_plot_marks_twins_and_fisher_variants_apart_from_their_counterparts(
        monkeypatch, tmp_path):
    import gsae.study.scaling_report as scaling_report

    drawn = {}
    monkeypatch.setattr(scaling_report, "save_png", lambda fig, path: drawn.setdefault(
        "lines", {line.get_label(): line for line in fig.axes[0].get_lines()}))
    data = with_objective(synthetic(-0.2, -0.1), "kl", 0.0, True,
                          {"train": [0.39, 0.40], "unseen": [0.43, 0.43]})
    data = with_objective(data, "fisher", 0.5, False,
                          {"train": [0.50, 0.51], "unseen": [0.55, 0.56]})
    data = add_saes(data, "fisher+kl", {"train": [0.4, 0.4]}, fisher_coef=0.5, parent="fisher")
    scaling_report.plot_metric(Curves(data), "ce_increase", tmp_path / "x.png")
    lines = drawn["lines"]
    assert lines["TopK"].get_marker() == "o"
    # the twin and the Fisher variant lie on TopK at the last snapshot: other markers show them
    assert lines["TopK + KL fine-tuning"].get_marker() == "*"
    assert lines["TopK + Fisher λ=0.5"].get_marker() == "s"
    assert lines["TopK + Fisher λ=0.5"].get_markerfacecolor() == "none"
    assert list(lines["TopK + KL fine-tuning"].get_xdata()) == [400]
    assert lines["TopK + Fisher λ=0.5 + KL fine-tuning"].get_marker() == "*"


def test_validation_contexts_of_a_store_that_read_its_split_to_the_end(tmp_path, monkeypatch):
    from gsae import caching
    from gsae.caching import validation_contexts
    from gsae.errors import GsaeError
    from gsae.text import DataConfig, token_contexts

    _, tokenizer = load_model(ModelConfig(model="tiny-llama"))
    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(" ".join(NEWS_WORDS[i:] + NEWS_WORDS[:i]) for i in range(12)))
    data = DataConfig(dataset=str(text), context_size=16)
    contexts = torch.stack(list(token_contexts(data, tokenizer, "train")))
    assert len(contexts) % 4 != 0  # the last batch of 4 contexts is short
    store = tmp_path / "store"
    assert main(["cache", "--model", "tiny-llama", "--dataset", str(text), "--context_size",
                 "16", "--hooks", "1", "--lm_batch_size", "4", "--batches_per_shard", "1",
                 "--store", str(store), "--tokens", "1000000"]) == 0
    reader = StoreReader(store, validation_fraction=0.25)
    held = len(reader.validation_shards)
    got = validation_contexts(reader, data, tokenizer, 10**6)  # the whole validation part
    first = 4 * len(reader.shards)
    assert torch.equal(got, contexts[first:])  # up to the split's end, not a batch beyond
    assert len(got) < 4 * held
    # a corpus that ends earlier is another corpus: a whole batch short at the span's end, or
    # short before the end of a requested prefix of the span
    span = reader.validation_contexts()
    assert len(span) > 3 and span.stop - len(contexts) < 4
    for ends_at, wanted in ((span.stop - 4, len(span)), (span.start + 2, 3)):
        with monkeypatch.context() as patch:
            patch.setattr(caching, "token_contexts", lambda *a, n=ends_at: iter(contexts[:n]))
            with pytest.raises(GsaeError, match="fewer contexts than the store"):
                validation_contexts(reader, data, tokenizer, wanted * 16)


def test_twins_are_found_when_the_width_is_given_as_a_count_of_latents(study, corpus, news,
                                                                       tmp_path):
    # 128 latents = d_in 64 x 2: an SAE folder reads this back as the expansion factor, so the
    # fine-tuned twin is saved under the x2 name although the study names its parent n128
    out = tmp_path / "run"
    args = [*study_args(corpus, news, out), "--store", str(study[0] / "store"), "--seed", "0",
            "--n_latents", "128", "--finetune_fraction", "0.25"]
    assert main(args) == 0
    results = json.loads((out / "report" / "results.json").read_text())
    twins = {s["name"]: s["folder"] for s in results["saes"] if s["finetuned_from"]}
    assert sorted(twins) == ["k4-beta0-z-n128-s0+kl", "k4-beta10-z-n128-s0+kl"]
    assert all(Path(f).name.endswith("-x2-s0") for f in twins.values())
    done = {(r["variant"], r["snapshot"]) for r in results["eval"]["train"]["results"]}
    assert {(name, 1600) for name in twins} <= done
