"""The report of `gsae compare` (built from synthetic results: plots, tables, claims) and the
command end to end on the tiny model."""

import json
import random
import re
from pathlib import Path

import pytest

from gsae.cli import main
from gsae.errors import GsaeError
from gsae.evaluate import GRAD_AWARE, GRAD_FREE
from gsae.records import ComparisonResult
from gsae.steer import summarize
from gsae.study.report import build_report
from gsae.study.results import compact_steering, verdict

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VARIANTS = [(0.0, "z"), (10.0, "z"), (10.0, "score")]
KS = [4, 8]
SEEDS = [0, 1]


def synthetic_results():
    """Results shaped as `gsae compare` writes them. At k = 8 the g-SAE (beta 10, z) has a
    clearly lower CE increase than TopK, more dead latents, and steers more strongly."""
    rng = random.Random(0)
    saes, evals, steers = [], [], []
    for k in KS:
        for beta, mode in VARIANTS:
            for seed in SEEDS:
                name = f"k{k}-beta{beta:g}-{mode}-s{seed}"
                saes.append({"name": name, "k": k, "beta": beta, "value_mode": mode,
                             "seed": seed, "n_latents": 64, "folder": name,
                             "train": {"effect": 0.0 if beta == 0 else 0.5 + 0.1 * seed}})
                g_sae = beta > 0 and mode == "z"
                for inference in (GRAD_AWARE, GRAD_FREE):
                    ce = (0.5 if g_sae else 0.8) / k + 0.001 * seed
                    evals.append({
                        "sae": name, "mode": inference, "k": k, "beta": beta,
                        "value_mode": mode, "l0": k - 0.1 * rng.random(),
                        "fvu": 0.3 / k + 0.01 * rng.random(), "ce_increase": ce,
                        "ce_recovered_zero": 1 - ce, "kl": ce * 0.9,
                        "dead_fraction": (0.2 if g_sae else 0.1) + 0.01 * seed,
                        "dead_window_tokens": 1000})
                latents = [{"latent": i, "alpha_multiple": m,
                            "kl": (2.0 if g_sae else 1.0) * m * (0.5 + rng.random()),
                            "logprob_gain": m * rng.random(),
                            "typical_activation": 1 + rng.random()}
                           for i in range(6) for m in (1.0, 3.0)]
                summary = [{"alpha_multiple": m, "latents": 6,
                            **{key: summarize([r[key] for r in latents
                                               if r["alpha_multiple"] == m])
                               for key in ("kl", "logprob_gain", "typical_activation")}}
                           for m in (1.0, 3.0)]
                steers.append(compact_steering({"sae": name, "k": k, "sampled_latents": 6,
                                                "summary": summary, "latents": latents}))
    return {
        "schema": ComparisonResult.SCHEMA, "command": "gsae compare --quick",
        "created": "2026-11-28 00:00 UTC",
        "versions": {"gsae": "0.1.0", "torch": "2", "transformers": "5", "python": "3.11"},
        "machine": {"description": "2 CPU threads"}, "wall_seconds": 4000.0,
        "stage_seconds": {"store": 10.0, "train": 20.0, "eval": 30.0, "steer": 40.0},
        "hook": "model.layers.1", "model": {"model": "tiny-llama"}, "store_tokens": 2000,
        "settings": {
            "compare": {"fixed_k": 8, "sweep_beta": []},
            "sae": {"k": KS, "beta": [0.0, 10.0], "value_mode": ["z", "score"], "seed": SEEDS},
            "model": {"model": "tiny-llama", "dtype": "float32", "device": "cpu"},
            "data": {"dataset": "wiki", "context_size": 32},
            "source": {"skip_first": 1, "outlier_factor": 5.0},
            "train": {"tokens": 4000, "batch_tokens": 256, "lr": 0.0, "auxk_coef": 1 / 32,
                      "dead_tokens": 1000},
            "steer": {"latents": 6, "alphas": [1.0, 3.0], "contexts": 2, "top_tokens": 3},
        },
        "saes": saes,
        "eval": {"run": {"contexts": 4, "context_tokens": 128}, "results": evals},
        "steer": {"run": {"context_size": 16, "pool_contexts": 8}, "results": steers},
    }


def markdown_tables(text):
    """{title: {row label: {column: cell}}} of every table under a bold title line."""
    tables = {}
    for match in re.finditer(r"\*\*(.+?)\*\*\n\n(\|.+\|\n)\|[-:|]+\|\n((?:\|.+\|\n)+)", text):
        title, header, body = match.groups()
        columns = [c.strip() for c in header.strip().strip("|").split("|")]
        rows = {}
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = dict(zip(columns[1:], cells[1:]))
        tables[title] = rows
    return tables


def parse_cell(cell):
    mean, half = cell.split(" ± ")
    return float(mean), float(half)


def label(beta, mode):
    return "TopK" if beta == 0 else f"g-SAE β={beta:g} ({mode})"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    results = synthetic_results()
    path = build_report(results, folder)
    return folder, results, path.read_text()


def test_plots_exist_and_are_png(report):
    folder, _, text = report
    names = ["ce_increase_vs_l0.png", "ce_recovered_vs_l0.png", "fvu_vs_l0.png",
             "dead_fraction_vs_k.png", "steering.png", "beta_sweep.png"]
    for name in names:
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 10_000, name  # drawn, not blank
        assert f"]({name})" in text


def test_tables_match_the_json(report):
    folder, results, text = report
    saved = json.loads((folder / "results.json").read_text())
    assert saved["saes"] == results["saes"]
    tables = markdown_tables(text)
    seeds = {s["name"]: s for s in results["saes"]}
    checked = 0
    for mode, mode_name in ((GRAD_AWARE, "gradient-aware"), (GRAD_FREE, "gradient-free")):
        for key, title in (("ce_increase", "Spliced CE increase (nats)"),
                           ("fvu", "FVU (fraction of variance unexplained)"),
                           ("dead_fraction", "Dead fraction (fraction of latents never "
                                             "selected)")):
            table = tables[f"{title}, {mode_name}"]
            assert set(table) == {str(k) for k in KS}
            for k in KS:
                for beta, vm in VARIANTS:
                    values = [r[key] for r in results["eval"]["results"]
                              if r["mode"] == mode and seeds[r["sae"]]["k"] == k
                              and r["beta"] == beta and r["value_mode"] == vm]
                    mean, half = parse_cell(table[str(k)][label(beta, vm)])
                    assert len(values) == len(SEEDS)
                    assert mean == pytest.approx(sum(values) / len(values), rel=1e-3)
                    assert half == pytest.approx((max(values) - min(values)) / 2, rel=0.05,
                                                 abs=1e-12)
                    checked += 1
    assert checked == 2 * 3 * len(KS) * len(VARIANTS)
    kl = tables["KL(steered || clean) (nats), median per latent, alpha = 3 × typical activation"]
    for k in KS:
        for beta, vm in VARIANTS:
            medians = [summarize(v["kl"])["median"] for r in results["steer"]["results"]
                       if seeds[r["sae"]]["k"] == k and seeds[r["sae"]]["beta"] == beta
                       and seeds[r["sae"]]["value_mode"] == vm
                       for v in r["values"] if v["alpha_multiple"] == 3.0]
            mean, _ = parse_cell(kl[str(k)][label(beta, vm)])
            assert mean == pytest.approx(sum(medians) / len(medians), rel=1e-3)


def test_claims_follow_the_numbers(report):
    folder, results, text = report
    claims = json.loads((folder / "results.json").read_text())["claims"]
    assert claims["k"] == 8 and claims["best_g_sae"] == "g-SAE β=10 (z)"
    assert claims["ce_increase"]["verdict_gradient-aware"] == "held"
    assert claims["ce_increase"]["k_where_best_g_sae_is_lower"] == {"gradient-aware": 2,
                                                                    "gradient-free": 2}
    assert claims["dead_fraction"]["verdict"] == "did not hold"
    assert claims["dead_fraction"]["k_where_best_g_sae_has_fewer"] == 0
    assert claims["steering"]["verdict"] in ("held", "inconclusive (better mean, but the "
                                             "seeds' ranges overlap)")
    topk = claims["ce_increase"]["topk"]
    assert f"{topk['mean']:.4g} ± {topk['half_range']:.2g} nats for TopK" in text
    assert "Downstream loss at equal k: held" in text
    assert "Fewer dead latents: did not hold" in text
    assert "gsae compare --quick" in text and "torch 2" in text and "1 h 06 min" in text


def test_claim_1_picks_the_best_g_sae_of_each_inference_mode():
    from gsae.study.results import Results, claims

    data = synthetic_results()
    for r in data["eval"]["results"]:  # gradient-free: the score variant becomes the best
        if r["mode"] == GRAD_FREE and r["value_mode"] == "score" and r["beta"] > 0:
            r["ce_increase"] = 0.01
    ce = claims(Results(data))["ce_increase"]
    assert ce["best_gradient-aware"] == "g-SAE β=10 (z)"
    assert ce["best_gradient-free"] == "g-SAE β=10 (score)"
    assert ce["gradient-free"]["mean"] == pytest.approx(0.01)
    assert ce["verdict_gradient-free"] == "held"


def test_verdict_rules():
    def s(*values):
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}

    assert verdict(s(1.0, 1.1), s(0.5, 0.6), higher_is_better=False) == "held"
    assert verdict(s(1.0, 1.1), s(0.5, 1.05), higher_is_better=False).startswith("inconclusive")
    assert verdict(s(1.0, 1.1), s(1.2, 1.3), higher_is_better=False) == "did not hold"
    assert verdict(s(1.0, 1.1), s(1.2, 1.3), higher_is_better=True) == "held"
    assert verdict(None, s(1.0), higher_is_better=True) == "not measured"


def compare_args(corpus, out):
    return ["compare", "--model", "tiny-llama", "--dataset", corpus, "--context_size", "32",
            "--hooks", "1", "--lm_batch_size", "4", "--out", str(out), "--store_tokens", "1200",
            "--tokens", "1600", "--batch_tokens", "256", "--k", "4,8", "--beta", "0,10",
            "--sweep_beta", "30",
            "--value_mode", "z,score", "--seed", "0", "--expansion_factor", "2",
            "--dead_tokens", "800", "--eval_tokens", "128", "--fixed_k", "8",
            "--latents", "3", "--contexts", "2", "--pool", "4",
            "--steer.context_size", "16", "--alphas", "1", "3", "--top_tokens", "3"]


def test_compare_end_to_end_on_the_tiny_model(corpus, tmp_path, capsys):
    code = main(compare_args(corpus, tmp_path / "cmp"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = tmp_path / "cmp" / "report"
    results = json.loads((report / "results.json").read_text())
    names = {s["name"] for s in results["saes"]}
    # TopK is trained once per k and seed; g-SAEs for each value mode; the sweep's beta only
    # at the fixed k.
    assert len(names) == 2 * 3 + 2 and "k4-beta0-z-x2-s0" in names
    assert {"k8-beta30-z-x2-s0", "k8-beta30-score-x2-s0"} <= names
    assert not any("beta0-score" in n or "k4-beta30" in n for n in names)
    assert len(results["eval"]["results"]) == 2 * len(names)
    assert {r["sae"] for r in results["steer"]["results"]} == names
    assert all(r["sampled_latents"] == 3 for r in results["steer"]["results"])
    assert results["command"].startswith("gsae compare --out ")
    assert "--k 4,8" in results["command"] and "--beta 0,10" in results["command"]
    text = (report / "README.md").read_text()
    assert results["command"] in text
    for name in ("ce_increase_vs_l0.png", "steering.png", "beta_sweep.png"):
        assert (report / name).read_bytes().startswith(PNG_SIGNATURE)
    table = markdown_tables(text)["Spliced CE increase (nats), gradient-free"]
    for k in (4, 8):
        values = [r["ce_increase"] for r in results["eval"]["results"]
                  if r["mode"] == GRAD_FREE and r["k"] == k and r["beta"] == 0]
        mean, _ = parse_cell(table[str(k)]["TopK"])
        assert mean == pytest.approx(sum(values) / len(values), rel=1e-3)
    # A second run reuses every stage: no training, evaluation or steering is redone.
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").rglob("sae.safetensors")}
    eval_cache = (tmp_path / "cmp" / "eval.json").read_text()
    assert main(compare_args(corpus, tmp_path / "cmp")) == 0
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").rglob("sae.safetensors")}
    assert (tmp_path / "cmp" / "eval.json").read_text() == eval_cache
    again = json.loads((report / "results.json").read_text())
    assert again["eval"]["results"] == results["eval"]["results"]
    assert again["stage_seconds"]["train"] < 5
    # Other training settings in the same folder are refused.
    assert main([*compare_args(corpus, tmp_path / "cmp"), "--lr", "0.01"]) == 2
    assert "a comparison made with other settings (differs in: train.lr" in \
        capsys.readouterr().err


def test_grid_of_the_default_comparison():
    from gsae.errors import GsaeError
    from gsae.pipeline import SAESweep
    from gsae.study.compare import CompareConfig, CompareRun, grid

    configs = grid(CompareRun())
    # 4 k x (TopK + beta 100 in 2 value modes) x 2 seeds, plus 2 sweep betas x 2 modes x 2 seeds
    # at k 32.
    assert len(configs) == 4 * 3 * 2 + 2 * 2 * 2
    assert {(c.k, c.beta) for c in configs if c.beta in (30.0, 1000.0)} == {(32, 30.0),
                                                                            (32, 1000.0)}
    assert all(c.value_mode == "z" for c in configs if c.beta == 0)
    with pytest.raises(GsaeError, match="--fixed_k 32, which is not one of the values of k"):
        grid(CompareRun(sae=SAESweep(k=[8, 16], beta=[0.0, 100.0], value_mode=["z", "score"],
                                     seed=[0, 1])))
    two_k = CompareRun(compare=CompareConfig(sweep_beta=[]),
                       sae=SAESweep(k=[8, 16], beta=[0.0, 100.0], value_mode=["z", "score"],
                                    seed=[0, 1]))
    assert len(grid(two_k)) == 2 * 3 * 2


def test_dead_latent_claim_counts_the_k_where_the_g_sae_has_fewer():
    from gsae.study.results import Results, claims

    data = synthetic_results()
    for r in data["eval"]["results"]:  # at k 4 only, the g-SAE (beta 10, z) has no dead latent
        if r["k"] == 4 and r["beta"] > 0 and r["value_mode"] == "z":
            r["dead_fraction"] = 0.0
    dead = claims(Results(data))["dead_fraction"]
    assert dead["k_where_best_g_sae_has_fewer"] == 1
    assert dead["verdict"] == "did not hold"  # the fixed k is 8


def test_the_committed_report_rebuilds_byte_identical_from_its_old_schema(tmp_path):
    """docs/results was written with schema gsae.compare/1: read through the migration, it
    gives the same markdown, plots and results.json, byte for byte."""
    committed = Path(__file__).parent.parent / "docs" / "results"
    data = json.loads((committed / "results.json").read_text())
    assert data["schema"] == "gsae.compare/1"
    build_report(data, tmp_path)
    for name in ("README.md", "results.json", "ce_increase_vs_l0.png", "steering.png"):
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name


def test_comparison_results_are_typed_and_old_files_still_load():
    committed = Path(__file__).parent.parent / "docs" / "results" / "results.json"
    old = ComparisonResult.from_json(json.loads(committed.read_text()))
    assert old.schema == ComparisonResult.SCHEMA and old.settings["sae"]["k"] == [8, 16, 32, 64]
    assert old.settings["steer"]["latents"] == 16 and "steer_latents" not in old.settings["steer"]
    assert old.settings["train"]["shuffle_seed"] == 0
    again = ComparisonResult.from_json(old.to_json())
    assert again == old and list(old.to_json())[0] == "schema"
    with pytest.raises(GsaeError, match="not a gsae compare result"):
        ComparisonResult.from_json({"schema": "gsae.eval/2"})


# Behaviour that deliberately broken code once got past -------------------------------------------


def test_a_cached_stage_recomputes_only_saes_whose_weights_or_settings_changed(tmp_path):
    from gsae.study.engine import cached

    calls = []

    def compute(names):
        calls.append(list(names))
        return {"run": {"call": len(calls)},
                "results": [{"sae": n, "value": f"{n}{len(calls)}"} for n in names]}

    def stage(settings, prints):
        run, records = cached(tmp_path / "eval.json", settings, prints, compute, [["x"], ["y"]])
        return {n: [r["value"] for r in rs] for n, rs in records.items()}

    assert stage({"seed": 0}, {"x": "fx", "y": "fy"}) == {"x": ["x1"], "y": ["y2"]}
    assert stage({"seed": 0}, {"x": "fx", "y": "fy"}) == {"x": ["x1"], "y": ["y2"]}
    assert calls == [["x"], ["y"]]
    # y's weights changed: only y is computed again
    assert stage({"seed": 0}, {"x": "fx", "y": "fy2"}) == {"x": ["x1"], "y": ["y3"]}
    assert stage({"seed": 1}, {"x": "fx", "y": "fy2"}) == {"x": ["x4"], "y": ["y5"]}
    assert calls == [["x"], ["y"], ["y"], ["x"], ["y"]]


def test_quick_sets_only_the_settings_left_at_their_defaults():
    from gsae.study.compare import CompareRun, apply_quick, command_line

    run = CompareRun()
    run.compare.quick = True
    run.train.tokens, run.sae.k, run.eval.eval_tokens = 1234, [4], 100
    apply_quick(run)
    assert (run.train.tokens, run.sae.k, run.eval.eval_tokens) == (1234, [4], 100)
    assert run.compare.store_tokens == 30_000 and run.sae.beta == [0.0, 100.0]
    assert run.compare.sweep_beta == [] and run.steer.latents == 12
    assert run.train.dead_tokens == 20_000 and run.compare.out == "runs/compare-quick"
    assert command_line(run) == "gsae compare --quick --k 4 --tokens 1234 --eval_tokens 100"
