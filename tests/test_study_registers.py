"""The registers analyses of `gsae study` on hand-made numbers: the unigram KL, the quantile bins,
the per-token records, the rank correlation, and the registers report built from (and rebuilt
from) a synthetic study result."""

import json
import math

import pytest
import torch

from gsae.evaluate import GRAD_AWARE, GRAD_FREE, TokenLosses
from gsae.study.registers import bin_means, per_token_records, quantile_bins, unigram_kl
from gsae.study.registers_report import build_registers_report, spearman


def test_unigram_kl_by_hand():
    # P: tokens 0, 0, 1, 2 -> (1/2, 1/4, 1/4, 0); Q: reference 0, 1, 1, 1 smoothed by 0.5 over
    # a vocabulary of 4 -> counts (1.5, 3.5, 0.5, 0.5) / 6
    got = unigram_kl(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]), 4)
    q = [1.5 / 6, 3.5 / 6, 0.5 / 6]
    expected = 0.5 * math.log(0.5 / q[0]) + 0.25 * math.log(0.25 / q[1]) \
        + 0.25 * math.log(0.25 / q[2])
    assert got == pytest.approx(expected)
    assert unigram_kl(torch.tensor([3, 3]), torch.tensor([3] * 1000), 4) == pytest.approx(
        -math.log(1000.5 / 1002), abs=1e-9)


def test_quantile_bins_are_equally_populated_and_means_are_per_bin():
    values = torch.arange(10, dtype=torch.float64)  # 0..9, five bins of two
    edges, index = quantile_bins(values, 5)
    assert edges == pytest.approx([0, 1.8, 3.6, 5.4, 7.2, 9])
    assert index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert bin_means(values * 10, index, 5) == pytest.approx([5, 25, 45, 65, 85])
    assert bin_means(torch.ones(2), torch.tensor([0, 0]), 3) == [1.0, None, None]


def test_per_token_records_bin_the_increase_by_clean_ce_and_gradient_norm():
    losses = TokenLosses()
    clean = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    grad = torch.tensor([[40.0, 30.0], [20.0, 10.0]])  # the reverse order
    losses.add_clean(clean, grad)
    for mode in (GRAD_AWARE, GRAD_FREE):
        losses.add_spliced("a", mode, clean + torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
    found = per_token_records(losses, ["a"], bins=2)
    assert found["run"]["tokens"] == 4 and found["run"]["clean_ce"]["counts"] == [2, 2]
    (aware, free) = found["results"]
    assert free["mode"] == GRAD_FREE and free["ce_increase"] == pytest.approx(0.25)
    assert free["clean_ce"] == pytest.approx([0.15, 0.35])
    assert free["grad_norm"] == pytest.approx([0.35, 0.15])


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2, 3) and (1, 3, 2): 1 - 6 * 2 / (3 * 8) = 0.5
    assert spearman([1, 2, 3], [5, 9, 7]) == pytest.approx(0.5)
    # tied x ranks (1.5, 1.5, 3) against (1, 2, 3): 1.5 / sqrt(1.5 * 2)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3))
    assert spearman([1, 2], [1, 2]) is None and spearman([1, None, 2], [1, 2, 3]) is None


CORPORA = {"train": 0.0, "news": 0.001, "code": -0.05, "verse": -0.08}  # planted gradient-free gaps
KL = {"train": 0.02, "news": 0.3, "code": 1.5, "verse": 0.9}


def synthetic():
    """Two seeds of TopK and a g-SAE at counts 100 and 200 on four corpora. TopK's CE increase is
    0.5 (+0.01 for seed 1); the g-SAE's gradient-free gap is CORPORA's at 200 and half of it at
    100, with seed 1 0.004 lower; gradient-aware adds 0.1. Per token, on verse: five bins whose
    gap is all in the top bin."""
    saes, records = [], {c: [] for c in CORPORA}
    for beta in (0.0, 100.0):
        for seed in (0, 1):
            name = f"b{beta:g}-s{seed}"
            saes.append({"name": name, "k": 32, "beta": beta, "value_mode": "z", "seed": seed,
                         "n_latents": 64, "extra_k": False,
                         "snapshots": [{"requested_tokens": n, "tokens": n} for n in (100, 200)]})
            for corpus, gap in CORPORA.items():
                for n in (100, 200):
                    for mode in (GRAD_AWARE, GRAD_FREE):
                        ours = (gap * n / 200 - 0.004 * seed + (0.1 if mode == GRAD_AWARE else 0)
                                if beta else 0.0)
                        records[corpus].append({
                            "sae": f"{name}@{n}", "variant": name, "snapshot": n, "mode": mode,
                            "ce_increase": 0.5 + 0.01 * seed + ours, "ce_clean": 3.0 + KL[corpus],
                            "fvu": 0.2 + KL[corpus] / 10, "dead_fraction": 0.0})
    per_token = {"run": {"tokens": 100, "bins": 5, **{
        key: {"edges": [0, 1, 2, 3, 4, 5], "counts": [20] * 5} for key in ("clean_ce",
                                                                           "grad_norm")}},
        "results": []}
    for s in saes:
        for mode in (GRAD_AWARE, GRAD_FREE):
            top = -0.4 if s["beta"] else 0.0  # the g-SAE gains 0.4 nats in the top bin only
            per_token["results"].append({
                "sae": f"{s['name']}@200", "variant": s["name"], "snapshot": 200, "mode": mode,
                "ce_increase": 0.5 + top / 5, "clean_ce": [0.5] * 4 + [0.5 + top],
                "grad_norm": [0.5 + top] + [0.5] * 4})
    return {
        "schema": "gsae.scaling/2", "command": "gsae study --unseen news code verse",
        "created": "2026-12-01 00:00 UTC", "versions": {"gsae": "0.1.0"},
        "machine": {"description": "2 CPU cores"}, "wall_seconds": 10.0,
        "stage_seconds": {"store": 1.0}, "model": {"model": "tiny"}, "hook": "model.layers.1",
        "store": {}, "corpora": {c: {"name": "wiki" if c == "train" else c,
                                     "part": "eval" if c == "train" else "all"} for c in CORPORA},
        "settings": {}, "saes": saes,
        "eval": {c: {"run": {}, "results": r} for c, r in records.items()},
        "steer": {"run": {}, "results": []},
        "distances": {"corpora": {c: {"unigram_kl": KL[c]} for c in CORPORA}},
        "per_token": {"verse": per_token},
    }


def test_registers_report_on_planted_gaps_and_its_rebuild(tmp_path):
    report = build_registers_report(synthetic(), tmp_path / "a")
    text = report.read_text()
    written = json.loads((tmp_path / "a" / "results.json").read_text())
    label = "g-SAE β=100 (z), gradient-free"
    gaps = written["registers"]["gaps"][label]
    assert gaps["verse"]["200"] == pytest.approx({"0": -0.08, "1": -0.084})
    assert gaps["code"]["100"] == pytest.approx({"0": -0.025, "1": -0.029})
    summary = written["registers"]["summary"][label]
    # news: seed 0 +0.001, seed 1 -0.003 (a mean below zero, not every seed)
    assert summary["every_seed_below_zero"] == ["code", "verse"]
    # mean gaps train -0.002, news -0.001, code -0.052, verse -0.082: ranks 3, 4, 2, 1 against
    # KL's 1, 2, 4, 3 -> rho = 1 - 6 * (4 + 4 + 4 + 4) / (4 * 15) = -0.6
    assert summary["rank_correlation"]["unigram_kl"] == pytest.approx(-0.6)
    distances = written["registers"]["distances"]
    assert distances["code"] == pytest.approx({"unigram_kl": 1.5, "ce_clean": 4.5,
                                               "topk_fvu": 0.35})
    rows = written["registers"]["per_token"]["verse"][label]["clean_ce"]
    assert [r["gap"]["mean"] for r in rows] == pytest.approx([0, 0, 0, 0, -0.4])
    assert sum(r["contribution"] for r in rows) == pytest.approx(-0.08)
    assert "**-0.082** (-0.080, -0.084)" in text and "2 of 3 unseen corpora" in text
    assert (tmp_path / "a" / "gap_vs_distance.png").stat().st_size > 0
    # rebuilt from its own results.json: the same report
    again = build_registers_report(written, tmp_path / "b")
    assert again.read_text() == text
