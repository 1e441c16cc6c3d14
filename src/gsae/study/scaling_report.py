"""The report of `gsae study`: learning curves of TopK and g-SAEs, the verdict at the longest
training, and whether the g-SAE-minus-TopK gap in spliced CE increase shrinks, holds or grows.

`build_scaling_report(results, folder)` takes the study's results (schema "gsae.scaling/2") and
writes README.md, results.json (the results plus the curves, gaps and verdicts) and the plots.
Schema /2 (`gsae.records.ScalingResult`) keys the corpora by "train" and by each unseen corpus's
name; a /1 file (one unseen corpus under the key "unseen") is read through
`ScalingResult.upgrade`, which renames that key.
Across seeds a number is "mean ± half-range" ((max - min) / 2), as in `gsae compare`'s report.

The trend rule (`trend`): the gap of each seed is the g-SAE's CE increase minus that of the TopK
SAE of the same seed (they trained on the same batches). Its direction is the sign of the mean
gap at the first snapshot. Each seed's change from the first to the last snapshot is measured in
that direction (positive: the gap moves away from zero). If the mean change is within
`TOLERANCE` (20%) of the first mean gap's size, the gap **holds**; beyond it, it **grows** or
**shrinks** when every seed's change has that sign, and is **unclear** when the seeds disagree.
A gap that shrinks past zero is said to reverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from gsae.errors import GsaeError
from gsae.evaluate import GRAD_FREE, MODES
from gsae.records import ScalingResult
from gsae.study.plots import save_png
from gsae.study.report import duration_text, pm, write_report_files
from gsae.study.results import (
    COLORS,
    MODE_NAMES,
    Variant,
    mean_of,
    spread,
    verdict,
)

TOLERANCE = 0.2
OBJECTIVE_REDUCTION = 0.2  # the objectives rule: this share below TopK on every corpus and seed
PANELS_PER_ROW = 3
METRICS = {"ce_increase": "Spliced CE increase (nats)",
           "fvu": "FVU (fraction of variance unexplained)",
           "dead_fraction": "Dead fraction (never selected in the evaluation tokens)"}
PLOTS = {
    "ce_increase_vs_tokens.png": "spliced CE increase against training tokens",
    "fvu_vs_tokens.png": "FVU against training tokens",
    "dead_fraction_vs_tokens.png": "dead fraction against training tokens",
    "gap_vs_tokens.png": "the g-SAE-minus-TopK CE gap against training tokens",
}


# Indexing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One line of the curves: a variant at one k, in one inference mode."""

    variant: Variant
    k: int
    mode: str

    def label(self, many_k: bool) -> str:
        at_k = f", k = {self.k}" if many_k else ""
        if self.variant.beta == 0:
            return f"{self.variant.label}{at_k}"
        return f"{self.variant.label}{at_k}, {MODE_NAMES[self.mode]}"


class Curves:
    """The study's records indexed by corpus, SAE, mode and snapshot."""

    def __init__(self, data: dict[str, Any]):
        data = self.data = ScalingResult.current(data)
        self.saes = {s["name"]: s for s in data["saes"]}
        curve = [s for s in data["saes"] if not s["extra_k"]]
        self.variants = sorted({Variant.of(s) for s in curve})
        self.topk = Variant(0.0, "z")
        self.g_variants = [v for v in self.variants if v.beta > 0]
        self.others = [v for v in self.variants if v != self.topk]  # each compared with TopK
        self.ks = sorted({int(s["k"]) for s in curve})
        self.all_ks = sorted({int(s["k"]) for s in data["saes"]})
        self.extra_ks = [k for k in self.all_ks if k not in self.ks]  # --extra_k
        self.counts = sorted({int(snap["requested_tokens"]) for s in curve
                              for snap in s["snapshots"]})
        self.last = self.counts[-1] if self.counts else 0
        self.records = {(corpus, r["variant"], r["mode"], int(r["snapshot"])): r
                        for corpus, part in data["eval"].items() for r in part["results"]}
        self.corpora = list(data["eval"])  # "train" first, then the unseen corpora

    def series(self, ks: list[int] | None = None, variants: list[Variant] | None = None
               ) -> list[Series]:
        """TopK once (its two modes are one computation), each g-SAE in both modes; at the
        curve's k and of every variant unless told."""
        return [Series(v, k, m) for k in (ks or self.ks) for v in (variants or self.variants)
                for m in ((GRAD_FREE,) if v.beta == 0 else MODES)]

    def names(self, variant: Variant, k: int) -> list[str]:
        """The SAEs of one variant and k, in seed order."""
        found = [s for s in self.saes.values() if Variant.of(s) == variant and s["k"] == k]
        return [s["name"] for s in sorted(found, key=lambda s: s["seed"])]

    def values(self, corpus: str, s: Series, key: str, count: int) -> list[float]:
        """One number per seed (seeds without the record left out)."""
        found = [self.records.get((corpus, n, s.mode, count)) for n in self.names(s.variant, s.k)]
        return [r[key] for r in found if r is not None and r.get(key) is not None]

    def gaps(self, corpus: str, s: Series, count: int) -> list[float]:
        """Per seed: the g-SAE's CE increase minus that of TopK of the same k and seed (seeds
        where either is undefined left out)."""
        base = {self.saes[n]["seed"]: self.records.get((corpus, n, GRAD_FREE, count))
                for n in self.names(self.topk, s.k)}
        out = []
        for name in self.names(s.variant, s.k):
            mine, theirs = self.records.get((corpus, name, s.mode, count)), \
                base.get(self.saes[name]["seed"])
            if mine and theirs and None not in (mine["ce_increase"], theirs["ce_increase"]):
                out.append(mine["ce_increase"] - theirs["ce_increase"])
        return out

    def gap_series(self) -> list[Series]:
        return [s for s in self.series() if s.variant != self.topk]

    def corpus_title(self, corpus: str) -> str:
        info = self.data["corpora"][corpus]
        part = ("held-out split" if info["part"] == "eval"
                else "its first tokens; no SAE trained on any of it")
        return f"`{info['name']}` ({part})"


def largest_gap(data: dict[str, Any], corpora: list[str]) -> str:
    """Of `corpora`, the one where the first g-SAE's gradient-free gap to TopK (mean over seeds)
    at the last snapshot is lowest: where the g-SAE gains most."""
    cv = Curves(data)
    series = Series(cv.g_variants[0], cv.ks[0], GRAD_FREE)
    gaps = {c: mean_of(found) for c in corpora if (found := cv.gaps(c, series, cv.last))}
    if not gaps:
        raise GsaeError(f"no gap to TopK was measured on {', '.join(corpora)}")
    return min(gaps, key=lambda c: gaps[c])


# The rule ----------------------------------------------------------------------------------------


def trend(first: list[float], last: list[float], tolerance: float = TOLERANCE
          ) -> dict[str, Any]:
    """Whether a gap (paired per seed between the first and the last snapshot) shrinks, holds
    or grows along the curve; the rule is in the module docstring."""
    if not first or len(first) != len(last):
        return {"trend": "not measured"}
    start = mean_of(first)
    direction = 1.0 if start >= 0 else -1.0
    changes = [direction * (b - a) for a, b in zip(first, last)]
    moved = mean_of(changes)
    relative = moved / abs(start) if start != 0 else (0.0 if moved == 0 else
                                                       math.copysign(math.inf, moved))
    if abs(relative) <= tolerance:
        word = "holds"
    elif all(c > 0 for c in changes) and moved > 0:
        word = "grows"
    elif all(c < 0 for c in changes) and moved < 0:
        word = "shrinks"
    else:
        word = "unclear (the seeds disagree)"
    return {"trend": word, "first": spread(first), "last": spread(last),
            "relative_change": relative if math.isfinite(relative) else None,
            "tolerance": tolerance, "reverses": direction * mean_of(last) < 0}


def verdicts(cv: Curves) -> dict[str, Any]:
    """Per corpus and g-SAE series: CE increase of TopK and the g-SAE at the last snapshot,
    whether the g-SAE is lower (`gsae.study.results.verdict`), the gap there, and its trend
    from the first to the last snapshot."""
    out: dict[str, Any] = {}
    many_k = len(cv.ks) > 1
    for corpus in cv.corpora:
        for s in cv.gap_series():
            topk = Series(cv.topk, s.k, GRAD_FREE)
            base, mine = (spread(cv.values(corpus, x, "ce_increase", cv.last))
                          for x in (topk, s))
            out.setdefault(corpus, {})[s.label(many_k)] = {
                "tokens": cv.last, "topk": base, "g_sae": mine,
                "verdict": verdict(base, mine, higher_is_better=False),
                "gap": spread(cv.gaps(corpus, s, cv.last)),
                **trend(cv.gaps(corpus, s, cv.counts[0]), cv.gaps(corpus, s, cv.last)),
                "first_tokens": cv.counts[0], **reduction(cv, corpus, s)}
    return out


def per_seed_reductions(cv: Curves, corpus: str, s: Series) -> list[float]:
    """Per seed at the last snapshot, 1 - (the series' CE increase / TopK's of the same k and
    seed); seeds where either is undefined are left out."""
    base = {cv.saes[n]["seed"]: cv.records.get((corpus, n, GRAD_FREE, cv.last))
            for n in cv.names(cv.topk, s.k)}
    found = []
    for name in cv.names(s.variant, s.k):
        mine, theirs = cv.records.get((corpus, name, s.mode, cv.last)), \
            base.get(cv.saes[name]["seed"])
        if mine and theirs and mine["ce_increase"] is not None and theirs["ce_increase"]:
            found.append(1 - mine["ce_increase"] / theirs["ce_increase"])
    return found


def reduction(cv: Curves, corpus: str, s: Series) -> dict[str, Any]:
    """The per-seed reductions' spread, and whether every seed reaches OBJECTIVE_REDUCTION (the
    objectives' rule)."""
    found = per_seed_reductions(cv, corpus, s)
    return {"reduction": spread(found),
            # rounded: exactly 20% holds, though 1 - 0.4 / 0.5 is 0.19999999999999996 in floats
            "every_seed_reduced": bool(found) and all(round(r, 9) >= OBJECTIVE_REDUCTION
                                                      for r in found)}


def aggregates(cv: Curves) -> dict[str, Any]:
    """Every number the plots and tables show: per corpus, series and snapshot, the spread over
    seeds of each metric and of the gap; and at the last snapshot, by k (with --extra_k)."""
    many_k = len(cv.ks) > 1
    curves = {corpus: {s.label(many_k): {key: {str(n): spread(cv.values(corpus, s, key, n))
                                                for n in cv.counts} for key in METRICS}
                       for s in cv.series()} for corpus in cv.corpora}
    gaps = {corpus: {s.label(many_k): {str(n): spread(cv.gaps(corpus, s, n)) for n in cv.counts}
                     for s in cv.gap_series()} for corpus in cv.corpora}
    by_k = {corpus: {s.label(False): {str(k): spread(cv.values(
        corpus, Series(s.variant, k, s.mode), "ce_increase", cv.last)) for k in cv.all_ks}
        for s in cv.series() if s.k == cv.ks[0]} for corpus in cv.corpora}
    return {"curves": curves, "gaps": gaps, "ce_increase_by_k": by_k, "steering": _steering(cv)}


def _steering(cv: Curves) -> dict[str, Any]:
    """Median KL(steered || clean) per SAE at the first strength, spread over seeds, by
    variant and k (last snapshot)."""
    by_sae = {r["variant"]: r for r in cv.data["steer"]["results"]}
    out: dict[str, Any] = {}
    for v in cv.variants:
        for k in cv.all_ks:
            medians = []
            for name in cv.names(v, k):
                rows = by_sae.get(name, {}).get("summary", [])
                if rows and rows[0]["kl"] is not None:
                    medians.append(rows[0]["kl"]["median"])
            out.setdefault(v.label, {})[str(k)] = spread(medians)
    return out


# Plots -------------------------------------------------------------------------------------------


def _color(cv: Curves, s: Series) -> str:
    """TopK in black; each g-SAE in two colours, one per inference mode."""
    if s.variant == cv.topk:
        return "black"
    return COLORS[(2 * cv.others.index(s.variant) + (s.mode == GRAD_FREE)) % len(COLORS)]


DOT = {"marker": "o", "markersize": 4}


def _marker(s: Series) -> dict[str, Any]:
    """A fine-tuned twin is one point at the end: a large star; the Fisher term hollow squares,
    so that a variant on top of its counterpart still shows; dots otherwise."""
    if s.variant.finetuned:
        return {"marker": "*", "markersize": 11}
    return {"marker": "s", "markersize": 5, "markerfacecolor": "none"} \
        if s.variant.fisher_coef else DOT


def _band(ax: Any, xs: list[int], per_x: list[list[float]], color: str, style: str,
          label: str, marker: dict[str, Any] = DOT) -> None:
    """The mean over seeds as a line (with `marker`'s plot settings), the min-max range as a
    band."""
    kept = [(x, ys) for x, ys in zip(xs, per_x) if ys]
    if not kept:
        return
    x = [p for p, _ in kept]
    ax.plot(x, [mean_of(ys) for _, ys in kept], color=color, linestyle=style, label=label,
            **marker)
    ax.fill_between(x, [min(ys) for _, ys in kept], [max(ys) for _, ys in kept], color=color,
                    alpha=0.18, linewidth=0)


def _panels(cv: Curves, title: str, ylabel: str) -> tuple[Figure, list[Any]]:
    cols = min(len(cv.corpora), PANELS_PER_ROW)
    rows = math.ceil(len(cv.corpora) / cols)
    fig = Figure(figsize=(6.2 * cols, 4.6 * rows), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(cv.corpora):]:
        ax.set_visible(False)
    axes = axes[:len(cv.corpora)]
    for ax, corpus in zip(axes, cv.corpora):
        ax.set_xscale("log")
        ax.set_xticks(cv.counts, [f"{n:,}" for n in cv.counts], rotation=30, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("training tokens per SAE")
        ax.set_title(cv.corpus_title(corpus).replace("`", ""), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[::cols]:
        ax.set_ylabel(ylabel)
    fig.suptitle(title)
    return fig, axes


def plot_metric(cv: Curves, key: str, path: Path) -> None:
    """A metric against training tokens, one panel per corpus: every series, mean and
    min-max over seeds."""
    fig, axes = _panels(cv, f"{METRICS[key]}: mean and min-max over seeds", METRICS[key])
    many_k = len(cv.ks) > 1
    for ax, corpus in zip(axes, cv.corpora):
        for s in cv.series():
            _band(ax, cv.counts, [cv.values(corpus, s, key, n) for n in cv.counts],
                  _color(cv, s), "--" if s.mode == GRAD_FREE and s.variant.beta else "-",
                  s.label(many_k), _marker(s))
    axes[-1].legend(fontsize=8)
    save_png(fig, path)


def plot_gap(cv: Curves, path: Path) -> None:
    """The g-SAE-minus-TopK CE gap against training tokens, one panel per corpus, with every
    seed's gap as a thin line and the min-max band."""
    fig, axes = _panels(cv, "g-SAE minus TopK spliced CE increase (below 0: the g-SAE is "
                        "better): mean and min-max over seeds", "CE gap (nats)")
    many_k = len(cv.ks) > 1
    for ax, corpus in zip(axes, cv.corpora):
        ax.axhline(0.0, color="gray", linewidth=1)
        for s in cv.gap_series():
            color, style = _color(cv, s), "--" if s.mode == GRAD_FREE else "-"
            per_x = [cv.gaps(corpus, s, n) for n in cv.counts]
            _band(ax, cv.counts, per_x, color, style, s.label(many_k))
            for seed in range(min(map(len, per_x), default=0)):
                ax.plot(cv.counts, [ys[seed] for ys in per_x], color=color, linestyle=style,
                        linewidth=0.6, alpha=0.5)
    axes[-1].legend(fontsize=8)
    save_png(fig, path)


def write_plots(cv: Curves, folder: Path) -> None:
    """Every plot of `PLOTS` into `folder`."""
    for key in METRICS:
        plot_metric(cv, key, folder / f"{key}_vs_tokens.png")
    plot_gap(cv, folder / "gap_vs_tokens.png")


# Markdown ----------------------------------------------------------------------------------------


def _tokens(n: int) -> str:
    return f"{n:,}"


def trend_phrase(word: str) -> str:
    """"the gap **grows**", or for a trend that is no verb, "the gap's trend is **...**"."""
    if word in ("shrinks", "holds", "grows"):
        return f"the gap **{word}**"
    return f"the gap's trend is **{word}**"


def verdict_lines(cv: Curves, found: dict[str, Any]) -> list[str]:
    """One paragraph per corpus: the verdict at the longest training and the trend."""
    lines = []
    for corpus, per_series in found.items():
        lines.append(f"**{cv.corpus_title(corpus)}**, after {_tokens(cv.last)} training tokens "
                     "per SAE (mean ± half-range over seeds):")
        lines.append("")
        for label, v in per_series.items():
            reversal = " and changes sign" if v.get("reverses") else ""
            lines.append(
                f"- {label}: spliced CE increase {pm(v['g_sae'])} nats against TopK's "
                f"{pm(v['topk'])}; lower than TopK: **{v['verdict']}**. The gap (g-SAE minus "
                f"TopK, per seed) is {pm(v['gap'])} nats; from {_tokens(v['first_tokens'])} to "
                f"{_tokens(v['tokens'])} tokens {trend_phrase(v['trend'])}{reversal} (from "
                f"{pm(v.get('first'))}).")
        lines.append("")
    return lines


def objective_lines(cv: Curves, found: dict[str, Any], every_variant: bool = False
                    ) -> list[str]:
    """The objectives' verdicts: a series holds when, on every corpus, every seed's CE increase
    at the last snapshot is at least OBJECTIVE_REDUCTION below TopK's of the same seed. Only the
    objective variants, unless `every_variant` (the g-SAEs without one too)."""
    series = [s for s in cv.gap_series() if every_variant or s.variant.objective]
    if not series:
        return []
    many_k, corpora = len(cv.ks) > 1, cv.corpora
    rows = []
    for s in series:
        entries = [found[c][s.label(many_k)] for c in corpora]
        holds = all(e["every_seed_reduced"] for e in entries)
        rows.append([s.label(many_k), *(pct(e["reduction"]) for e in entries),
                     "**holds**" if holds else "does not hold"])
    return ["## Objectives", "",
            f"A variant **holds** when its spliced CE increase at {_tokens(cv.last)} tokens is at "
            f"least {OBJECTIVE_REDUCTION:.0%} below TopK's on every corpus, for every seed. The "
            "cells give the reduction (1 - variant / TopK, per seed: mean, min..max).", "",
            *_table("CE increase reduction against TopK", ["variant", *corpora, "verdict"],
                    rows)]


def pct(s: dict[str, float] | None) -> str:
    if not s:
        return "n/a"
    return f"{s['mean']:+.1%} ({s['min']:+.1%}..{s['max']:+.1%})"


def _table(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    return [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---:|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def tables(cv: Curves, agg: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for corpus in cv.corpora:
        lines += [f"### {cv.corpus_title(corpus)}", ""]
        for key, title in METRICS.items():
            cols = agg["curves"][corpus]
            lines += _table(title, ["tokens", *cols], [[_tokens(n), *(
                pm(cols[c][key][str(n)]) for c in cols)] for n in cv.counts])
        gaps = agg["gaps"][corpus]
        lines += _table("CE gap, g-SAE minus TopK (nats)", ["tokens", *gaps],
                        [[_tokens(n), *(pm(gaps[c][str(n)]) for c in gaps)]
                         for n in cv.counts])
    return lines


def other_k_lines(cv: Curves, agg: dict[str, Any]) -> list[str]:
    if not cv.extra_ks:
        return ["Not run: no --extra_k was given, so only k = "
                f"{', '.join(map(str, cv.ks))} was trained.", ""]
    lines = []
    for corpus in cv.corpora:
        cols = agg["ce_increase_by_k"][corpus]
        lines += _table(f"Spliced CE increase at {_tokens(cv.last)} tokens, "
                        f"{cv.corpus_title(corpus)}", ["k", *cols],
                        [[str(k), *(pm(cols[c][str(k)]) for c in cols)] for k in cv.all_ks])
    return lines


def markdown(cv: Curves, agg: dict[str, Any], found: dict[str, Any]) -> str:
    d, s = cv.data, cv.data["settings"]
    store = d["store"]
    stages = ", ".join(f"{k} {duration_text(v)}" for k, v in d["stage_seconds"].items())
    steer_cols = list(agg["steering"])
    lines = [
        f"# Learning curves: TopK vs g-SAEs on {d['model'].get('model', '?')}, {d['hook']}",
        "",
        f"Made by `gsae study` (gsae {d['versions']['gsae']}) on {d['created']}, on "
        f"{d['machine']['description']}. Time per stage, measured and summed over every run of "
        f"the command that worked on it: {stages}; {duration_text(d['wall_seconds'])} in all.",
        "", "```", d["command"], "```", "",
        "## Verdict", "",
        *verdict_lines(cv, found),
        "How the trend is decided: per seed, the gap is the g-SAE's spliced CE increase minus "
        "that of the TopK SAE of the same seed. Its direction is the sign of the mean gap at the "
        "first snapshot; each seed's change to the last snapshot is taken in that direction. "
        f"Within ±{TOLERANCE:.0%} of the first mean gap's size the gap *holds*; beyond that it "
        "*grows* or *shrinks* if every seed changed that way, else it is *unclear*.",
        "",
        *objective_lines(cv, found),
        "## Data", "",
        f"- Training: {_tokens(s['train']['tokens'])} tokens per SAE in batches of "
        f"{_tokens(s['train']['batch_tokens'])}, from a store of {_tokens(store['rows'])} tokens "
        f"of `{s['data']['dataset']}` ({store['passes']:g} passes, each shard order and row mix "
        f"new); snapshots at {', '.join(_tokens(n) for n in cv.counts)} tokens (the step that "
        "reaches each count).",
        *([f"- The training split ran out at {_tokens(store['rows'])} tokens, before "
           f"--store_tokens {_tokens(s['study']['store_tokens'])}."]
          if store["rows"] < s.get("study", {}).get("store_tokens", 0) else []),
        f"- Repeated rows in the store (exactly equal activation rows): "
        f"{store['repeated_rows']} of {_tokens(store['rows'])}.",
        f"- SAEs: {len(d['saes'])}, {_tokens(d['saes'][0]['n_latents'])} latents, seeds "
        f"{', '.join(str(x) for x in s['sae']['seed'])}.",
        *(f"- {cv.corpus_title(c)}: {d['eval'][c]['run']['contexts']} contexts of "
          f"{d['eval'][c]['run']['context_size']} tokens" for c in cv.corpora),
        "",
        "## Plots", "",
        *(f"![{what}]({name})\n" for name, what in PLOTS.items()),
        "## Tables", "",
        *tables(cv, agg),
        "## Other values of k", "",
        *other_k_lines(cv, agg),
        "## Steering at the last snapshot", "",
        *_table("Median KL(steered || clean) per SAE at the first strength (nats)",
                ["k", *steer_cols], [[str(k), *(pm(agg["steering"][c][str(k)])
                                                for c in steer_cols)] for k in cv.all_ks]),
        "`results.json` holds every number above and the evaluation records of every "
        "snapshot.", ""]
    return "\n".join(lines)


# Entry point -------------------------------------------------------------------------------------


def build_scaling_report(results: dict[str, Any], folder: str | Path) -> Path:
    """Write the report folder: README.md, results.json and the PNG plots. Returns the
    markdown file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cv = Curves(results)
    results = cv.data
    if not cv.counts or not cv.g_variants:
        raise GsaeError("the study's results hold no snapshots of TopK and a g-SAE to report")
    agg, found = aggregates(cv), verdicts(cv)
    write_plots(cv, folder)
    full = {**results, "aggregates": agg, "verdicts": found}
    return write_report_files(folder, full, markdown(cv, agg, found))

