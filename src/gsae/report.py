"""The report of `gsae compare`: PNG plots, a markdown report and a JSON of all numbers.

`build_report(results, folder)` takes the comparison's results (schema "gsae.compare/1": the run's
settings, the SAEs of the grid, their evaluation records and steering summaries) and writes
`README.md`, `results.json` (the results plus every aggregate the tables and claims show) and
the plots. Across seeds a number is shown as "mean ± half-range": the half-range is
(max - min) / 2 over the seeds, so every seed lies within mean ± 2 half-ranges, and with two
seeds within mean ± half-range exactly.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter
from PIL import Image

from gsae.errors import GsaeError
from gsae.evaluate import GRAD_AWARE, GRAD_FREE, MODES

SCHEMA = "gsae.compare/1"
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
    """A column of the comparison: TopK (beta = 0) or a g-SAE with its beta and value mode."""

    beta: float
    value_mode: str

    @classmethod
    def of(cls, record: dict[str, Any]) -> Variant:
        beta = float(record["beta"])
        return cls(beta, "z" if beta == 0 else record["value_mode"])

    @property
    def label(self) -> str:
        return "TopK" if self.beta == 0 else f"g-SAE β={self.beta:g} ({self.value_mode})"


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
        if data.get("schema") != SCHEMA:
            raise GsaeError(f"not a gsae compare result (schema {data.get('schema')!r})")
        self.data = data
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


def claims_markdown(c: dict[str, Any]) -> list[str]:
    """The claims section: one paragraph per claim, written from the numbers."""
    if "note" in c:
        return [f"No claim can be tested: {c['note']}."]
    k, best = c["k"], c["best_g_sae"]
    ce, dead = c["ce_increase"], c["dead_fraction"]
    lines = [
        f"The best g-SAE is the variant with the lowest mean spliced CE increase at k = {k} "
        f"(gradient-aware inference, the paper's setting): **{best}**; claim 1 also names the "
        "best under gradient-free inference. They are chosen on the same evaluation data, "
        "which favours them slightly. Numbers are mean ± half-range over seeds.",
        "",
        f"1. **Downstream loss at equal k: {ce['verdict_gradient-aware']}** with gradient-aware "
        f"inference, **{ce['verdict_gradient-free']}** with gradient-free inference. At k = {k} "
        f"the spliced CE increase is {_pm(ce['topk'])} nats for TopK, "
        f"{_pm(ce['gradient-aware'])} for {ce['best_gradient-aware']} with gradient-aware "
        f"inference and {_pm(ce['gradient-free'])} for {ce['best_gradient-free']} with "
        "gradient-free inference. "
        f"Over the {ce['k_values']} values of k, the best g-SAE at each k has the lower mean at "
        f"{ce['k_where_best_g_sae_is_lower']['gradient-aware']} (gradient-aware) and "
        f"{ce['k_where_best_g_sae_is_lower']['gradient-free']} (gradient-free).",
        f"2. **Fewer dead latents: {dead['verdict']}.** At k = {k} the fraction of latents "
        f"never selected in {dead['window_tokens']} evaluation tokens is {_pm(dead['topk'])} "
        f"for TopK and {_pm(dead['gradient-aware'])} for {best} (gradient-aware selection, as "
        f"in training; {_pm(dead['gradient-free'])} gradient-free)"
        + (f"; over the {dead['all_g_saes']['n']} g-SAE variants the mean ranges from "
           f"{_num(dead['all_g_saes']['min'])} to {_num(dead['all_g_saes']['max'])}."
           if dead["all_g_saes"] and dead["all_g_saes"]["n"] > 1 else ".")
        + f" Over the {ce['k_values']} values of k, the best g-SAE at each k (as in claim 1, "
          "gradient-aware) has fewer dead latents than TopK at "
          f"{dead['k_where_best_g_sae_has_fewer']}.",
    ]
    if "steering" in c:
        s = c["steering"]
        lines.append(
            f"3. **Steering moves the output more: {s['verdict']}.** At k = {k}, adding "
            f"{s['alpha_multiple']:g} × the typical activation of a latent's decoder direction "
            f"gives a median KL(steered || clean) of {_pm(s['kl']['topk'])} nats for TopK and "
            f"{_pm(s['kl']['g_sae'])} for {best}; the median gain in log-probability of the "
            f"promoted tokens is {_pm(s['logprob_gain']['topk'])} and "
            f"{_pm(s['logprob_gain']['g_sae'])} nats. The strengths follow the latents' typical "
            f"activations, whose medians are {_pm(s['typical_activation']['topk'])} (TopK) and "
            f"{_pm(s['typical_activation']['g_sae'])} (g-SAE).")
    lines.append(
        "4. **Interpretability and other model sizes: not measured** here (one model, no "
        "interpretability evaluation).")
    if "value_mode" in c:
        modes = c["value_mode"]
        ranked = sorted(modes, key=lambda m: modes[m]["mean"] if modes[m] else math.inf)
        first, second = ranked[0], ranked[1]
        lines += ["", f"Value mode: at k = {k}, the best g-SAE keeping `{first}` has a spliced CE "
                  f"increase of {_pm(modes[first])} and the best keeping `{second}` "
                  f"{_pm(modes[second])} (gradient-aware): `{first}` is better here."]
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _pm(s: dict[str, float] | None) -> str:
    """"mean ± half-range" of a spread."""
    return "-" if s is None else f"{_num(s['mean'])} ± {s['half_range']:.2g}"


# Markdown ------------------------------------------------------------------------------------


def table(title: str, columns: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]
          ) -> list[str]:
    """A markdown table under a bold title line."""
    return [f"**{title}**", "", "| " + " | ".join(["k", *columns]) + " |",
            "|" + "---:|" * (len(columns) + 1),
            *("| " + " | ".join([label, *cells]) + " |" for label, cells in rows), ""]


def markdown(res: Results, agg: dict[str, Any], c: dict[str, Any]) -> str:
    """The report as markdown."""
    d, s = res.data, res.data["settings"]
    labels = [v.label for v in res.variants]
    hook = d.get("hook", "?")
    corpus = s["data"]["dataset"]
    model = (d.get("model") or {}).get("model", s["model"]["model"])
    lines = [
        f"# TopK vs gradient SAEs (g-SAEs) on {model}, {hook}, corpus `{corpus}`",
        "",
        f"Made by `gsae compare` (gsae {d['versions']['gsae']}) on {d.get('created', '?')}, in "
        f"{_duration(d['wall_seconds'])} on {d.get('machine', {}).get('description', '?')}.",
        "",
        "```", d["command"], "```",
        "",
        "## The paper's claims, as measured here",
        "",
        *claims_markdown(c),
        "",
        "## Setup",
        "",
        *_setup(res),
        "",
        "## Plots",
        "",
    ]
    for name, what in PLOTS.items():
        lines += [f"![{what}]({name})", ""]
    lines += ["## Tables", "",
              "Mean ± half-range over seeds (the half-range is (max - min) / 2; seeds "
              f"{', '.join(str(x) for x in sorted({sa['seed'] for sa in d['saes']}))}). "
              "TopK's two inference modes are the same computation.", ""]
    for mode in MODES:
        lines += [f"### {MODE_TITLES[mode].capitalize()}", ""]
        for key, title, unit in EVAL_METRICS:
            cells = agg["eval"][MODE_NAMES[mode]][key]
            lines += table(f"{title} ({unit}), {MODE_NAMES[mode]}", labels,
                           [(str(k), [_pm(cells[lab][str(k)]) for lab in labels])
                            for k in res.ks])
    lines += ["### Steering (gradient-free encoding)", "",
              "Per SAE, the median over its sampled latents; then mean ± half-range of those "
              "medians over seeds.", ""]
    for alpha, per_metric in agg["steer"].items():
        for key, title, unit in STEER_METRICS:
            cells = per_metric[key]
            lines += table(f"{title} ({unit}), median per latent, alpha = {alpha} × typical "
                           "activation", labels,
                           [(str(k), [_pm(cells[lab][str(k)]) for lab in labels])
                            for k in res.ks])
    lines += table("Mean β·|d_i·g| of the selected latents during training (last log interval)",
                   labels, [(str(k), [_pm(agg["train_effect"][lab][str(k)]) for lab in labels])
                            for k in res.ks])
    lines += ["## Files", "",
              "`results.json` holds every number above and more: the settings, each SAE's "
              "training summary, evaluation records (both inference modes) and steering "
              "summaries with the per-latent values, the aggregates of the tables and the "
              "claims. Definitions: the gsae README (Evaluation, Steering evaluation, "
              "Comparing TopK and g-SAEs).", ""]
    return "\n".join(lines)


def _setup(res: Results) -> list[str]:
    d, s = res.data, res.data["settings"]
    cmp, train, steer = s["compare"], s["train"], s["steer"]
    versions = ", ".join(f"{k} {v}" for k, v in d["versions"].items())
    stages = ", ".join(f"{k} {_duration(v)}" for k, v in d.get("stage_seconds", {}).items())
    first = next(iter(res.saes.values()))
    rows = [
        ("model", f"{s['model']['model']} ({s['model']['dtype']}, {s['model']['device']})"),
        ("hook", d.get("hook", "?")),
        ("corpus", f"`{s['data']['dataset']}`, contexts of {s['data']['context_size']} "
                   f"tokens, {s['source']['skip_first']} leading position(s) skipped, outlier "
                   f"factor {s['source']['outlier_factor']}"),
        ("grid", f"k {_list(cmp['k'])}; beta {_list(cmp['beta'])}"
                 + (f", and {_list(cmp['sweep_beta'])} at k {res.fixed_k} only"
                    if cmp.get("sweep_beta") else "") + "; value modes "
                 f"{_list(cmp['value_mode'])}; seeds {_list(cmp['seed'])}: {len(res.saes)} SAEs "
                 "(TopK trained once per k and seed)"),
        ("width", f"{first['n_latents']} latents"),
        ("training", f"{train['tokens']} tokens per SAE from a store of "
                     f"{d.get('store_tokens', '?')} tokens, batches of {train['batch_tokens']}, "
                     f"lr {train['lr'] or 'auto'}, AuxK {train['auxk_coef']:.4g}, dead after "
                     f"{train['dead_tokens']} tokens; all SAEs see the same batches"),
        ("evaluation", f"{d['eval']['run']['contexts']} held-out contexts "
                       f"({d['eval']['run']['context_tokens']} tokens)"),
        ("steering", f"{_sampled(res, steer['latents'])} per SAE, strengths "
                     f"{_list(steer['alphas'])} × typical activation, sets A and B of "
                     f"{steer['contexts']} contexts of {d['steer']['run']['context_size']}"
                     f" tokens from a pool of {d['steer']['run']['pool_contexts']}, "
                     f"{steer['top_tokens']} promoted tokens"),
        ("versions", versions),
        ("wall time", f"{_duration(d['wall_seconds'])} ({stages})"),
    ]
    return ["| setting | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]


def _sampled(res: Results, wanted: int) -> str:
    counts = [r["sampled_latents"] for r in res.steer.values()]
    if counts and min(counts) < wanted:
        return (f"{wanted} live latents (fewer where an SAE has fewer live latents: "
                f"{min(counts)} at least)")
    return f"{wanted} live latents"


def _list(values: Sequence[Any]) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# Plots ---------------------------------------------------------------------------------------


def _style(res: Results, variant: Variant) -> dict[str, Any]:
    """TopK in black; a g-SAE coloured by its beta, its value mode in marker and line style."""
    if variant.beta == 0:
        return {"color": "black", "marker": "o", "linestyle": "-"}
    betas = sorted({v.beta for v in res.variants if v.beta > 0})
    score = variant.value_mode == "score"
    return {"color": COLORS[betas.index(variant.beta) % len(COLORS)],
            "marker": "^" if score else "s", "linestyle": "--" if score else "-"}


def _plain_log_ticks(ax) -> None:
    """Log-scale y tick labels as plain numbers (0.02, 0.05, 1) rather than powers of ten."""
    formatter = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(formatter)
    ax.yaxis.set_minor_formatter(formatter)


def _errorbar(ax, xs: list[float], per_x: list[list[float]], style: dict[str, Any], label: str
              ) -> None:
    """Individual seeds as faint points, the mean as a line with min-max error bars."""
    kept = [(x, ys) for x, ys in zip(xs, per_x) if ys]
    if not kept:
        return
    for x, ys in kept:
        ax.scatter([x] * len(ys), ys, color=style["color"], marker=style["marker"], s=14,
                   alpha=0.35, linewidths=0)
    means = [sum(ys) / len(ys) for _, ys in kept]
    ax.errorbar([x for x, _ in kept], means,
                yerr=[[m - min(ys) for m, (_, ys) in zip(means, kept)],
                      [max(ys) - m for m, (_, ys) in zip(means, kept)]],
                capsize=3, markersize=5, label=label, **style)


def _plot_vs(res: Results, path: Path, key: str, ylabel: str, x_key: str) -> None:
    """A metric against L0 (or k), one panel per inference mode, one line per variant."""
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    title = next(t for k, t, _ in EVAL_METRICS if k == key)
    for ax, mode in zip(axes, MODES):
        for v in res.k_variants:
            xs = [_mean(res.eval_values(v, mode, k, "l0")) if x_key == "l0" else k
                  for k in res.ks]
            per_x = [res.eval_values(v, mode, k, key) for k in res.ks]
            _errorbar(ax, xs, per_x, _style(res, v), v.label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(res.ks, [str(k) for k in res.ks])
        ax.minorticks_off()
        ax.set_xlabel("L0 (active latents per token)" if x_key == "l0" else "k")
        ax.set_title(MODE_TITLES[mode], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{title}: mean and min-max over seeds (points: single seeds)")
    _save(fig, path)


def _plot_steering(res: Results, path: Path) -> None:
    """Distributions of the per-latent steering effects: one box per variant and k (seeds
    pooled), each seed's median as a diamond; one column per strength."""
    fig = Figure(figsize=(6 * max(1, len(res.alphas)), 8.5), layout="constrained")
    axes = fig.subplots(2, max(1, len(res.alphas)), squeeze=False)
    width = 0.8 / len(res.k_variants)
    for col, alpha in enumerate(res.alphas):
        for row, (key, title, unit) in enumerate(STEER_METRICS):
            ax = axes[row][col]
            for vi, v in enumerate(res.k_variants):
                style = _style(res, v)
                boxes, positions = [], []
                for ki, k in enumerate(res.ks):
                    seeds = res.steer_values(v, k, alpha, key)
                    pooled = [x for seed in seeds for x in seed if key != "kl" or x > 0]
                    if not pooled:
                        continue
                    pos = ki + (vi - (len(res.k_variants) - 1) / 2) * width
                    boxes.append(pooled)
                    positions.append(pos)
                    medians = [_median(seed) for seed in seeds if seed]
                    ax.scatter([pos] * len(medians), medians, marker="D", s=16, zorder=3,
                               color=style["color"], edgecolors="black", linewidths=0.5)
                if boxes:
                    bp = ax.boxplot(boxes, positions=positions, widths=width * 0.85,
                                    patch_artist=True, showfliers=False, manage_ticks=False)
                    for patch in bp["boxes"]:
                        patch.set_facecolor(style["color"])
                        patch.set_alpha(0.45)
                        patch.set_hatch("//" if v.value_mode == "score" else "")
                    for median in bp["medians"]:
                        median.set_color("black")
            ax.set_xticks(range(len(res.ks)), [f"k = {k}" for k in res.ks])
            if key == "kl":
                ax.set_yscale("log")
                _plain_log_ticks(ax)
            ax.set_ylabel(f"{title} ({unit})")
            ax.set_title(f"alpha = {alpha:g} × typical activation", fontsize=10)
            ax.grid(alpha=0.3, axis="y")
    handles = [Patch(facecolor=_style(res, v)["color"], alpha=0.45, label=v.label,
                     hatch="//" if v.value_mode == "score" else "") for v in res.k_variants]
    handles.append(Line2D([], [], marker="D", color="gray", markeredgecolor="black",
                          linestyle="", label="median of one seed's latents"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4),
               fontsize=8)
    fig.suptitle("Steering effects per latent (boxes: quartiles and 1.5 IQR whiskers over the "
                 "latents of all seeds)")
    _save(fig, path)


def _plot_beta_sweep(res: Results, path: Path) -> None:
    """Metrics against beta at the fixed k: one line per value mode and inference mode, all
    starting from TopK at beta = 0."""
    k = res.fixed_k
    topk = Variant(0.0, "z")
    modes = sorted({v.value_mode for v in res.variants if v.beta > 0},
                   key=lambda m: (m != "z", m))
    betas = sorted({v.beta for v in res.variants})
    panels = [(key, f"{title} ({unit})") for key, title, unit in EVAL_METRICS
              if key in ("ce_increase", "fvu", "dead_fraction")]
    fig = Figure(figsize=(4.4 * (len(panels) + 1), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels) + 1)
    colors = {m: ("tab:purple", "tab:green")[i % 2] for i, m in enumerate(modes)}

    def variants_of(mode: str) -> list[Variant]:
        """TopK, then the g-SAEs of one value mode, by beta."""
        chosen = [topk if b == 0 else Variant(b, mode) for b in betas]
        return [v for v in chosen if v in res.variants]

    for ax, (key, ylabel) in zip(axes, panels):
        for vm in modes:
            for mode in MODES:
                vs = variants_of(vm)
                style = {"color": colors[vm], "marker": "o",
                         "linestyle": "-" if mode == GRAD_AWARE else "--"}
                _errorbar(ax, [v.beta for v in vs], [res.eval_values(v, mode, k, key)
                                                     for v in vs],
                          style, f"{vm}, {MODE_NAMES[mode]}")
        ax.set_ylabel(ylabel)
        low, high = ax.dataLim.y0, ax.dataLim.y1
        if key == "fvu" and low > 0 and high / low > 20:  # a diverged variant flattens the rest
            ax.set_yscale("log")
    ax = axes[-1]
    if res.alphas:
        alpha = res.alphas[0]
        for vm in modes:
            vs = variants_of(vm)
            _errorbar(ax, [v.beta for v in vs],
                      [res.steer_summary(v, k, alpha, "kl", "median") for v in vs],
                      {"color": colors[vm], "marker": "o", "linestyle": "-"}, vm)
        ax.set_ylabel(f"median KL(steered || clean) (nats)\nalpha = {alpha:g} × typical "
                      "activation")
        ax.legend(fontsize=8, title="value mode", title_fontsize=8)
    positive = [b for b in betas if b > 0]
    for ax in axes:
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
        ax.set_xticks(betas, [f"{b:g}" for b in betas])
        ax.minorticks_off()
        ax.set_xlabel("beta (0 = TopK)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="value mode, inference", title_fontsize=8)
    fig.suptitle(f"The beta sweep at k = {k}: mean and min-max over seeds")
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    """Write the figure as a palette PNG (256 colours): a third of the RGBA file's size."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100)
    Image.open(buffer).quantize(256).save(path, optimize=True)


def _rounded(value: Any) -> Any:
    """`value` with every float rounded to 6 significant digits (lists and dicts walked)."""
    if isinstance(value, float):
        return _round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# Entry point ---------------------------------------------------------------------------------


def build_report(results: dict[str, Any], folder: str | Path) -> Path:
    """Write the report folder: README.md, results.json and the PNG plots. Returns the
    markdown file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    res = Results(results)
    agg = res.aggregates()
    found = claims(res)
    units = {key: f"{title} ({unit})" for key, title, unit in EVAL_METRICS}
    _plot_vs(res, folder / "ce_increase_vs_l0.png", "ce_increase", units["ce_increase"], "l0")
    _plot_vs(res, folder / "ce_recovered_vs_l0.png", "ce_recovered_zero",
             units["ce_recovered_zero"], "l0")
    _plot_vs(res, folder / "fvu_vs_l0.png", "fvu", units["fvu"], "l0")
    _plot_vs(res, folder / "dead_fraction_vs_k.png", "dead_fraction", units["dead_fraction"], "k")
    _plot_steering(res, folder / "steering.png")
    _plot_beta_sweep(res, folder / "beta_sweep.png")
    full = {**results, "aggregates": agg, "claims": found}
    (folder / "results.json").write_text(
        json.dumps(_rounded(full), separators=(",", ":"), allow_nan=False) + "\n")
    report = folder / "README.md"
    report.write_text(markdown(res, agg, found))
    return report
