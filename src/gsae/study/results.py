"""The comparison's results: indexing by variant, mode, k and seed; aggregates; the claims.

Schema "gsae.compare/2" (`gsae.records.ComparisonResult`) holds the run's whole config tree under
"settings" (the sections of `gsae compare`: compare, model, data, source, sae, train, eval,
steer); "gsae.compare/1" files (settings with the grid under "compare" and `steer_`-prefixed
steering fields) are read through `ComparisonResult.upgrade`, which maps them onto the /2 layout
in memory. Across seeds a number is shown as "mean ± half-range": (max - min) / 2 over the seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gsae.evaluate import GRAD_AWARE, GRAD_FREE, MODES
from gsae.records import ComparisonResult

MODE_TITLES = {
    GRAD_AWARE: "gradient-aware inference (g of the true next tokens: uses the labels)",
    GRAD_FREE: "gradient-free inference (beta = 0 on the same weights)",
}
MODE_NAMES = {GRAD_AWARE: "gradient-aware", GRAD_FREE: "gradient-free"}
# key in the evaluation records, title, unit
EVAL_METRICS = [
    ("ce_increase", "Spliced CE increase", "nats"),
    ("ce_recovered_zero", "CE recovered (vs zero-ablation)", "fraction"),
    ("fvu", "FVU", "fraction of variance unexplained"),
    ("l0", "L0", "active latents per token"),
    ("dead_fraction", "Dead fraction", "fraction of latents never selected"),
    ("kl", "KL(clean || spliced)", "nats"),
]
STEER_METRICS = [
    ("kl", "KL(steered || clean)", "nats"),
    ("logprob_gain", "Log-prob gain of the promoted tokens", "nats"),
]
PLOTS = {
    "ce_increase_vs_l0.png": "spliced CE increase against L0",
    "ce_recovered_vs_l0.png": "fraction of CE recovered against L0",
    "fvu_vs_l0.png": "FVU against L0",
    "dead_fraction_vs_k.png": "dead fraction against k",
    "steering.png": "steering-effect distributions",
    "beta_sweep.png": "the beta sweep at fixed k",
}
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
          "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]



@dataclass(frozen=True, order=True)
class Variant:
    """A column of a comparison or study: TopK (beta = 0) or a g-SAE with its beta and value
    mode; either with the Fisher term (its lambda) or KL fine-tuned at the end, if it was."""

    beta: float
    value_mode: str
    fisher_coef: float = 0.0
    finetuned: bool = False

    @classmethod
    def of(cls, record: dict[str, Any]) -> Variant:
        beta = float(record["beta"])
        return cls(beta, "z" if beta == 0 else record["value_mode"],
                   float(record.get("fisher_coef") or 0.0), bool(record.get("finetuned_from")))

    @property
    def label(self) -> str:
        base = "TopK" if self.beta == 0 else f"g-SAE β={self.beta:g} ({self.value_mode})"
        fisher = f" + Fisher λ={self.fisher_coef:g}" if self.fisher_coef else ""
        return base + fisher + (" + KL fine-tuning" if self.finetuned else "")

    @property
    def objective(self) -> bool:
        """Whether it changes TopK's or the g-SAE's training objective (Fisher term, KL)."""
        return bool(self.fisher_coef) or self.finetuned


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
    """Mean, min, max, half-range and count of the given numbers (None entries left out)."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None
    low, high = min(kept), max(kept)
    return {"mean": sum(kept) / len(kept), "min": low, "max": high,
            "half_range": (high - low) / 2, "n": len(kept)}


def compact_steering(record: dict[str, Any]) -> dict[str, Any]:
    """A steering record of `gsae.steer` without its per-latent details: the summary, and per
    strength the per-latent KL and gain values (for the distribution plots)."""
    short = {k: v for k, v in record.items() if k != "latents"}
    short["values"] = [
        {"alpha_multiple": m,
         **{key: [_round(r[key]) for r in record["latents"]
                  if r["alpha_multiple"] == m and r["kl"] is not None]
            for key, _, _ in STEER_METRICS}}
        for m in dict.fromkeys(r["alpha_multiple"] for r in record["latents"])
    ]
    return short


def _round(value: float, digits: int = 5) -> float:
    return float(f"{value:.{digits}g}")


# Aggregation --------------------------------------------------------------------------------------


class Results:
    """The comparison's records, indexed by variant, inference mode, k and seed."""

    def __init__(self, data: dict[str, Any]):
        data = self.data = ComparisonResult.current(data)
        self.saes = {s["name"]: s for s in data["saes"]}
        self.variants = sorted({Variant.of(s) for s in data["saes"]},
                               key=lambda v: (v.beta, v.value_mode != "z", v.value_mode))
        self.ks = sorted({int(s["k"]) for s in data["saes"]})
        at_k = {v: {int(s["k"]) for s in data["saes"] if Variant.of(s) == v}
                for v in self.variants}
        # The variants trained at every k (the beta sweep's others exist at the fixed k only).
        self.k_variants = [v for v in self.variants if len(at_k[v]) == len(self.ks)]
        fixed = int(data["settings"]["compare"].get("fixed_k", 0))
        self.fixed_k = fixed if fixed in self.ks else self.ks[len(self.ks) // 2]
        self.eval = {(r["sae"], r["mode"]): r for r in data["eval"]["results"]}
        self.steer = {r["sae"]: r for r in data["steer"]["results"]}
        self.alphas = list(dict.fromkeys(row["alpha_multiple"] for r in self.steer.values()
                                         for row in r["summary"]))

    def names(self, variant: Variant, k: int) -> list[str]:
        """The SAEs of one variant and k, in seed order."""
        found = [s for s in self.saes.values() if Variant.of(s) == variant and s["k"] == k]
        return [s["name"] for s in sorted(found, key=lambda s: s["seed"])]

    def eval_values(self, variant: Variant, mode: str, k: int, key: str) -> list[float]:
        return [self.eval[(n, mode)][key] for n in self.names(variant, k)
                if (n, mode) in self.eval and self.eval[(n, mode)][key] is not None]

    def steer_summary(self, variant: Variant, k: int, alpha: float, key: str, stat: str
                      ) -> list[float]:
        """One number per seed: the statistic of the per-latent values of that seed's SAE."""
        out = []
        for name in self.names(variant, k):
            for row in self.steer.get(name, {}).get("summary", []):
                if row["alpha_multiple"] == alpha and row[key] is not None:
                    out.append(row[key][stat])
        return out

    def steer_values(self, variant: Variant, k: int, alpha: float, key: str) -> list[list[float]]:
        """The per-latent values, one list per seed."""
        out = []
        for name in self.names(variant, k):
            for row in self.steer.get(name, {}).get("values", []):
                if row["alpha_multiple"] == alpha:
                    out.append(row[key])
        return out

    def train_values(self, variant: Variant, k: int, key: str) -> list[float]:
        return [self.saes[n]["train"][key] for n in self.names(variant, k)
                if self.saes[n].get("train", {}).get(key) is not None]

    def aggregates(self) -> dict[str, Any]:
        """Every number the tables show: mean, min, max and half-range over seeds, by variant
        label and k."""

        def by_variant(values: Callable[[Variant, int], list[float]]) -> dict[str, Any]:
            return {v.label: {str(k): spread(values(v, k)) for k in self.ks}
                    for v in self.variants}

        out: dict[str, Any] = {
            "eval": {MODE_NAMES[mode]: {key: by_variant(
                lambda v, k, mode=mode, key=key: self.eval_values(v, mode, k, key))
                for key, _, _ in EVAL_METRICS} for mode in MODES},
            "steer": {f"{alpha:g}": {key: by_variant(
                lambda v, k, alpha=alpha, key=key: self.steer_summary(v, k, alpha, key, "median"))
                for key, _, _ in STEER_METRICS} for alpha in self.alphas},
            "train_effect": by_variant(lambda v, k: self.train_values(v, k, "effect")),
        }
        if self.alphas:
            out["typical_activation"] = by_variant(lambda v, k: self.steer_summary(
                v, k, self.alphas[0], "typical_activation", "median"))
        return out


# Claims ----------------------------------------------------------------------------------------


def verdict(base: dict[str, float] | None, other: dict[str, float] | None,
            higher_is_better: bool) -> str:
    """Whether `other` beats `base`: "held" when its mean is better and every seed of it beats
    every seed of `base`, "inconclusive" when only the mean is better, else "did not hold"."""
    if base is None or other is None:
        return "not measured"
    sign = 1 if higher_is_better else -1
    if sign * (other["mean"] - base["mean"]) <= 0:
        return "did not hold"
    separated = other["min"] > base["max"] if higher_is_better else other["max"] < base["min"]
    return "held" if separated else "inconclusive (better mean, but the seeds' ranges overlap)"


def claims(res: Results) -> dict[str, Any]:
    """The paper's claims, each as the measured numbers and a verdict, at the fixed k."""
    k, topk = res.fixed_k, Variant(0.0, "z")
    g_variants = [v for v in res.variants if v.beta > 0]
    if topk not in res.variants or not g_variants:
        return {"k": k, "note": "the grid needs TopK (beta 0) and at least one g-SAE"}

    def stat(v: Variant, mode: str, key: str, kk: int = k) -> dict[str, float] | None:
        return spread(res.eval_values(v, mode, kk, key))

    def mean_or_inf(s: dict[str, float] | None) -> float:
        return s["mean"] if s else math.inf

    def best_at(mode: str, kk: int) -> Variant:
        return min(g_variants, key=lambda v: mean_or_inf(stat(v, mode, "ce_increase", kk)))

    def k_where_best_is_lower(mode: str, key: str) -> int:
        """At how many k the best g-SAE of that k (by CE increase) has a lower mean `key`."""
        return sum(mean_or_inf(stat(best_at(mode, kk), mode, key, kk))
                   < mean_or_inf(stat(topk, mode, key, kk)) for kk in res.ks)

    best_by_mode = {m: best_at(m, k) for m in MODES}
    best = best_by_mode[GRAD_AWARE]
    out: dict[str, Any] = {"k": k, "best_g_sae": best.label}
    wins = {MODE_NAMES[m]: k_where_best_is_lower(m, "ce_increase") for m in MODES}
    out["ce_increase"] = {
        "topk": stat(topk, GRAD_FREE, "ce_increase"),
        **{MODE_NAMES[m]: stat(v, m, "ce_increase") for m, v in best_by_mode.items()},
        **{f"best_{MODE_NAMES[m]}": v.label for m, v in best_by_mode.items()},
        **{f"verdict_{MODE_NAMES[m]}": verdict(stat(topk, m, "ce_increase"),
                                               stat(v, m, "ce_increase"), False)
           for m, v in best_by_mode.items()},
        "k_where_best_g_sae_is_lower": wins, "k_values": len(res.ks),
    }
    out["dead_fraction"] = {
        "topk": stat(topk, GRAD_FREE, "dead_fraction"),
        **{MODE_NAMES[m]: stat(best, m, "dead_fraction") for m in MODES},
        "verdict": verdict(stat(topk, GRAD_AWARE, "dead_fraction"),
                           stat(best, GRAD_AWARE, "dead_fraction"), False),
        "all_g_saes": spread(s["mean"] for v in g_variants
                             if (s := stat(v, GRAD_AWARE, "dead_fraction"))),
        "window_tokens": next((r["dead_window_tokens"] for r in res.eval.values()), None),
        "k_where_best_g_sae_has_fewer": k_where_best_is_lower(GRAD_AWARE, "dead_fraction"),
    }
    if res.alphas:
        alpha = res.alphas[0]
        steer = {key: {"topk": spread(res.steer_summary(topk, k, alpha, key, "median")),
                       "g_sae": spread(res.steer_summary(best, k, alpha, key, "median"))}
                 for key in ("kl", "logprob_gain", "typical_activation")}
        steer["alpha_multiple"] = alpha
        steer["verdict"] = verdict(steer["kl"]["topk"], steer["kl"]["g_sae"], True)
        out["steering"] = steer
    modes = sorted({v.value_mode for v in g_variants})
    if len(modes) > 1:
        out["value_mode"] = {
            m: min((stat(v, GRAD_AWARE, "ce_increase") for v in g_variants
                    if v.value_mode == m), key=mean_or_inf) for m in modes}
    return out



def rounded(value: Any) -> Any:
    """`value` with every float rounded to 6 significant digits (lists and dicts walked)."""
    if isinstance(value, float):
        return _round(value, 6)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def mean_of(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def median_of(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


