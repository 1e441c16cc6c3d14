"""`gsae study` run again with more work in the same --out: the finished SAEs are kept byte for
byte and not retrained, only what is missing is trained and evaluated, and the report has
everything; settings that change what the earlier work means are refused."""

import json
from pathlib import Path

import pytest
import test_study_scaling as scaling_tests

from gsae.cli import main
from gsae.sae import WEIGHTS_FILE
from gsae.study.engine import REPLAY_DIR

news, study = scaling_tests.news, scaling_tests.study  # fixtures: the news corpus, a study
study_args = scaling_tests.study_args

VARIANTS = [f"k4-beta{b}-z-x2-s{s}" for b in (0, 10) for s in (0, 1)]


def files_of(folder: Path) -> dict[Path, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def sae_dir(out: Path, variant: str, run: str = "saes") -> Path:
    return out / run / "model.layers.1" / variant


@pytest.fixture
def recorded_training(monkeypatch):
    """The (k, beta, seed) of every SAE that `gsae study` trains from here on."""
    import gsae.pipeline as pipeline

    trained = []
    train_saes = pipeline.train_saes

    def recording(run, configs, **kwargs):
        trained.extend((c.k, c.beta, c.seed) for c in configs)
        return train_saes(run, configs, **kwargs)

    monkeypatch.setattr(pipeline, "train_saes", recording)
    return trained


def test_another_seed_trains_only_that_seed_and_keeps_the_first(corpus, news, study, tmp_path,
                                                                capsys, recorded_training):
    out = tmp_path / "run"
    assert main([*study_args(corpus, news, out), "--seed", "0"]) == 0
    # the format of run.json that studies already on disk were written in
    recorded = json.loads((out / "saes" / "run.json").read_text())["recorded"]
    assert set(recorded) == {"saes", "store", "sae_folders", "identity"}
    first = {v: files_of(sae_dir(out, v)) for v in VARIANTS if v.endswith("s0")}
    assert all(any(p.parent.name == "tokens-1600" for p in f) for f in first.values())
    recorded_training.clear()

    assert main(study_args(corpus, news, out)) == 0  # seeds 0 and 1
    assert "error" not in capsys.readouterr().err
    assert sorted(recorded_training) == [(4, 0.0, 1), (4, 10.0, 1)]
    for variant, files in first.items():  # same bytes, never rewritten
        assert files_of(sae_dir(out, variant)) == files, variant
    # the new seed's SAEs are those of a study that trained all four in one run
    reference, _ = study
    for variant in VARIANTS:
        assert (sae_dir(out, variant) / WEIGHTS_FILE).read_bytes() == \
            (sae_dir(reference, variant) / WEIGHTS_FILE).read_bytes(), variant
    results = json.loads((out / "report" / "results.json").read_text())
    assert sorted(s["name"] for s in results["saes"]) == sorted(VARIANTS)
    for corpus_key in ("train", str(news)):
        assert {r["variant"] for r in results["eval"][corpus_key]["results"]} == set(VARIANTS)
    # run.json lists the first run's SAE folders too, for a later --overwrite
    recorded = json.loads((out / "saes" / "run.json").read_text())["recorded"]
    assert sorted(recorded["earlier_sae_folders"]) == sorted(
        f"model.layers.1/{v}" for v in first)


def test_another_unseen_corpus_is_evaluated_without_training(corpus, news, study, tmp_path,
                                                             recorded_training):
    """A study folder as studies already on disk are (one run, run.json without
    earlier_sae_folders) is reused: its SAEs are neither trained again nor rewritten."""
    out, _ = study
    recorded = json.loads((out / "saes" / "run.json").read_text())["recorded"]
    assert set(recorded) == {"saes", "store", "sae_folders", "identity"}
    other = tmp_path / "other.txt"
    other.write_text(" ".join(["prices of grain and timber fell again this week"] * 60))
    before = {v: files_of(sae_dir(out, v)) for v in VARIANTS}
    train_cache = (out / "eval-train.json").read_bytes()
    args = study_args(corpus, news, out)
    assert main([*args, "--unseen", str(other)]) == 0
    assert recorded_training == []
    assert {v: files_of(sae_dir(out, v)) for v in VARIANTS} == before
    assert (out / "eval-train.json").read_bytes() == train_cache
    results = json.loads((out / "report" / "results.json").read_text())
    assert results["corpora"][str(other)]["corpus"]["dataset"] == str(other)
    assert {(r["variant"], r["snapshot"]) for r in results["eval"][str(other)]["results"]} == {
        (v, n) for v in VARIANTS for n in (400, 800, 1600)}
    assert main(args) == 0  # and back: the news results are reused, nothing trained
    assert recorded_training == []


@pytest.mark.parametrize("changed, setting", [
    (["--tokens", "1200", "--snapshots", "400", "800"], "train.tokens"),
    (["--lr", "0.001"], "train.lr"),
    (["--store_tokens", "800"], "store_tokens"),
])
def test_settings_that_change_earlier_work_are_refused(corpus, news, study, changed, setting,
                                                       capsys, recorded_training):
    out, _ = study
    before = {v: files_of(sae_dir(out, v)) for v in VARIANTS}
    assert main([*study_args(corpus, news, out), *changed]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and setting in err and "--overwrite" in err
    assert recorded_training == []
    assert {v: files_of(sae_dir(out, v)) for v in VARIANTS} == before


def test_a_setting_the_study_record_lacks_counts_as_its_default(corpus, news, study, capsys,
                                                                recorded_training):
    """A study made before gsae had a setting is reused while the setting keeps its default
    (what the study had, in effect), and refused, naming it, once it is given another value."""
    out, _ = study
    path = out / "study.json"
    record = json.loads(path.read_text())
    assert record["train"].pop("k_aux") == 0
    path.write_text(json.dumps(record))
    assert main(study_args(corpus, news, out)) == 0 and recorded_training == []
    assert main([*study_args(corpus, news, out), "--k_aux", "3"]) == 2
    assert "train.k_aux" in capsys.readouterr().err
    assert json.loads(path.read_text()) == record


def test_an_added_snapshot_is_replayed_exactly_and_only_it_is_evaluated(
        corpus, news, study, tmp_path, monkeypatch, recorded_training):
    import gsae.study.scaling as scaling

    out = tmp_path / "run"
    assert main([*study_args(corpus, news, out), "--snapshots", "400", "1600"]) == 0
    before = {v: files_of(sae_dir(out, v)) for v in VARIANTS}
    recorded_training.clear()
    evaluated, evaluate = [], scaling.pipeline.evaluate

    def recording_evaluate(saes, *args, names, **kwargs):
        evaluated.extend(names)
        return evaluate(saes, *args, names=names, **kwargs)

    monkeypatch.setattr(scaling.pipeline, "evaluate", recording_evaluate)
    assert main(study_args(corpus, news, out)) == 0  # snapshots 400 800 1600
    assert sorted(evaluated) == sorted(f"{v}@800" for v in VARIANTS)
    assert sorted(recorded_training) == sorted((4, b, s) for b in (0.0, 10.0) for s in (0, 1))
    reference, _ = study  # trained once with every snapshot
    for variant in VARIANTS:
        after = files_of(sae_dir(out, variant))
        assert {p: after[p] for p in before[variant]} == before[variant]  # nothing rewritten
        added = sorted(p.relative_to(sae_dir(out, variant)) for p in set(after) - set(before[
            variant]))
        assert [p.parts[:2] for p in added] == [("snapshots", "tokens-800")] * len(added)
        for name in added:
            assert (sae_dir(out, variant) / name).read_bytes() == \
                (sae_dir(reference, variant) / name).read_bytes(), (variant, name)
    assert not (out / REPLAY_DIR).exists()
    results = json.loads((out / "report" / "results.json").read_text())
    for sae in results["saes"]:
        assert [s["requested_tokens"] for s in sae["snapshots"]] == [400, 800, 1600]
    assert {(r["variant"], r["snapshot"]) for r in results["eval"]["train"]["results"]} == {
        (v, n) for v in VARIANTS for n in (400, 800, 1600)}


def test_overwrite_replaces_the_study_and_leaves_nothing_stale(corpus, news, tmp_path,
                                                               recorded_training):
    out = tmp_path / "run"
    args = [*study_args(corpus, news, out), "--seed", "0"]
    assert main(args) == 0
    old = sae_dir(out, "k4-beta10-z-x2-s0")
    weights = (old / WEIGHTS_FILE).read_bytes()
    recorded_training.clear()
    changed = [*args, "--lr", "0.001", "--snapshots", "400", "1600"]
    assert main(changed) == 2  # refused, as above
    assert main([*changed, "--overwrite"]) == 0
    assert sorted(recorded_training) == [(4, 0.0, 0), (4, 10.0, 0)]
    assert (old / WEIGHTS_FILE).read_bytes() != weights  # trained again, with the new lr
    assert sorted(p.name for p in (old / "snapshots").iterdir()) == ["tokens-1600", "tokens-400"]
    study_record = json.loads((out / "study.json").read_text())
    assert study_record["train"]["lr"] == 0.001
