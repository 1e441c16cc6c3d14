"""The registers report of `gsae study --unseen A B ...`: where the g-SAE's gap to TopK lies across
texts unlike the training text.

`build_registers_report(results, folder)` takes the study's results (schema "gsae.scaling/2",
with its `distances` and `per_token` sections) and writes README.md, results.json (the results
plus a `registers` section with every number shown) and two plots. It shows the gap per corpus at
every snapshot with each seed's value, the gap at the last snapshot against the corpus's distance
to the training text, the per-token analysis, and the verdicts of the scaling report
(`gsae.study.scaling_report.verdicts`) per corpus. Across seeds a number is "mean ± half-range".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from gsae.errors import GsaeError
from gsae.evaluate import GRAD_FREE
from gsae.study.plots import save_png
from gsae.study.registers import KEYS
from gsae.study.report import duration_text, pm, write_report_files
from gsae.study.results import COLORS, mean_of, rounded, spread
from gsae.study.scaling_report import Curves, Series, verdicts

PLOTS = {"gap_vs_distance.png": "the gap at the last snapshot against each corpus's distance "
                                "to the training text",
         "per_token_gap.png": "the gap by quantile of the clean per-token CE and of |g|"}
DISTANCES = {"unigram_kl": "unigram KL to the training split (nats)",
             "ce_clean": "the model's clean CE (nats)",
             "topk_fvu": "TopK's FVU"}


# Numbers -----------------------------------------------------------------------------------------


def by_seed(cv: Curves, corpus: str, s: Series, count: int) -> dict[str, float]:
    """The gap of each seed (g-SAE minus TopK of the same seed), keyed by seed."""
    seeds = [cv.saes[n]["seed"] for n in cv.names(s.variant, s.k)
             if cv.records.get((corpus, n, s.mode, count))]
    return {str(seed): gap for seed, gap in zip(seeds, cv.gaps(corpus, s, count))}


def distance_row(cv: Curves, corpus: str) -> dict[str, Any]:
    """The corpus's distances: unigram KL (from the study's distance stage), the clean CE and
    TopK's FVU (from the evaluation records at the last snapshot, mean over seeds)."""
    topk = Series(cv.topk, cv.ks[0], GRAD_FREE)
    measured = cv.data["distances"].get("corpora", {}).get(corpus, {})
    clean = cv.values(corpus, topk, "ce_clean", cv.last)
    return {"unigram_kl": measured.get("unigram_kl"),
            "ce_clean": clean[0] if clean else None,
            "topk_fvu": mean_of(cv.values(corpus, topk, "fvu", cv.last)) if clean else None}


def per_token_rows(cv: Curves, corpus: str, key: str, s: Series) -> list[dict[str, Any]]:
    """Per quantile bin of `key`: its range and tokens, TopK's and the g-SAE's mean CE increase,
    the gap per seed, and the bin's contribution to the mean gap over all tokens."""
    part = cv.data["per_token"][corpus]
    run, records = part["run"], {(r["variant"], r["mode"]): r for r in part["results"]}
    edges, counts = run[key]["edges"], run[key]["counts"]
    base = {cv.saes[n]["seed"]: records.get((n, GRAD_FREE)) for n in cv.names(cv.topk, s.k)}
    rows = []
    for b, count in enumerate(counts):
        pairs = [(records[(n, s.mode)][key][b], base[cv.saes[n]["seed"]][key][b])
                 for n in cv.names(s.variant, s.k)
                 if (n, s.mode) in records and base.get(cv.saes[n]["seed"])]
        gaps = [mine - theirs for mine, theirs in pairs]
        rows.append({"low": edges[b], "high": edges[b + 1], "tokens": count,
                     "topk": spread(t for _, t in pairs), "g_sae": spread(m for m, _ in pairs),
                     "gap": spread(gaps),
                     "contribution": mean_of(gaps) * count / run["tokens"] if gaps else None})
    return rows


def aggregates(cv: Curves) -> dict[str, Any]:
    """Every number of the report: per g-SAE series the gap per corpus and snapshot by seed;
    per corpus its distances; the per-token rows of each analysed corpus."""
    series = {s.label(False): s for s in cv.gap_series() if s.k == cv.ks[0]}
    return {
        "gaps": {label: {c: {str(n): by_seed(cv, c, s, n) for n in cv.counts}
                         for c in cv.corpora} for label, s in series.items()},
        "distances": {c: distance_row(cv, c) for c in cv.corpora},
        "per_token": {c: {label: {key: per_token_rows(cv, c, key, s) for key in KEYS}
                          for label, s in series.items()} for c in cv.data["per_token"]},
    }


def summary(cv: Curves, agg: dict[str, Any], found: dict[str, Any]) -> dict[str, Any]:
    """Per g-SAE series: the unseen corpora where every seed's gap at the last snapshot is below
    zero, and the rank correlation over all corpora between the gap and each distance."""
    unseen = [c for c in cv.corpora if c != "train"]
    out = {}
    for label, per_corpus in agg["gaps"].items():
        last = {c: mean_of(list(per_corpus[c][str(cv.last)].values())) for c in cv.corpora}
        below = [c for c in unseen if per_corpus[c][str(cv.last)]
                 and max(per_corpus[c][str(cv.last)].values()) < 0]
        out[label] = {"every_seed_below_zero": below, "unseen": unseen, "rank_correlation": {
            key: spearman([agg["distances"][c][key] for c in cv.corpora],
                          [last[c] for c in cv.corpora]) for key in DISTANCES},
            "verdicts": {c: found.get(c, {}).get(label, {}).get("verdict") for c in cv.corpora}}
    return out


def spearman(xs: list[float | None], ys: list[float]) -> float | None:
    """Spearman's rank correlation of the pairs with both values known (None below 3 pairs or
    when a side is constant); ties get their mean rank."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y == y]
    if len(pairs) < 3:
        return None
    rx, ry = _ranks([x for x, _ in pairs]), _ranks([y for _, y in pairs])
    mx, my = mean_of(rx), mean_of(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else None


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


# Plots -------------------------------------------------------------------------------------------


def plot_gap_vs_distance(cv: Curves, agg: dict[str, Any], path: Path) -> None:
    """One panel per distance: the gap at the last snapshot (mean, min-max over seeds) of each
    g-SAE series against it, one labelled point per corpus."""
    fig = Figure(figsize=(6.2 * len(DISTANCES), 4.6), layout="constrained")
    axes = fig.subplots(1, len(DISTANCES), squeeze=False)[0]
    for ax, (key, title) in zip(axes, DISTANCES.items()):
        ax.axhline(0.0, color="gray", linewidth=1)
        for i, (label, per_corpus) in enumerate(agg["gaps"].items()):
            for c in cv.corpora:
                x, seeds = agg["distances"][c][key], list(per_corpus[c][str(cv.last)].values())
                if x is None or not seeds:
                    continue
                y = mean_of(seeds)
                ax.errorbar([x], [y], yerr=[[y - min(seeds)], [max(seeds) - y]], fmt="o",
                            color=COLORS[i % len(COLORS)], capsize=3,
                            label=label if c == cv.corpora[0] else None)
                ax.annotate(cv.data["corpora"][c]["name"], (x, y), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("CE gap, g-SAE minus TopK (nats)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"The gap at {cv.last:,} tokens against each corpus's distance to the training "
                 "text (mean, min-max over seeds)")
    save_png(fig, path)


def plot_per_token(cv: Curves, agg: dict[str, Any], path: Path) -> None:
    """One panel per key (clean CE, |g|): the gap per quantile bin, a line per analysed corpus
    and g-SAE series (mean, min-max band over seeds)."""
    fig = Figure(figsize=(6.2 * len(KEYS), 4.6), layout="constrained")
    axes = fig.subplots(1, len(KEYS), squeeze=False)[0]
    lines = [(c, label, by_key) for c, per_series in agg["per_token"].items()
             for label, by_key in per_series.items()]
    for ax, (key, title) in zip(axes, KEYS.items()):
        ax.axhline(0.0, color="gray", linewidth=1)
        for i, (c, label, by_key) in enumerate(lines):
            rows = [r for r in by_key[key] if r["gap"]]
            xs = [b + 1 for b, r in enumerate(by_key[key]) if r["gap"]]
            color = COLORS[i % len(COLORS)]
            ax.plot(xs, [r["gap"]["mean"] for r in rows], marker="o", color=color,
                    label=f"{cv.data['corpora'][c]['name']}: {label}")
            ax.fill_between(xs, [r["gap"]["min"] for r in rows],
                            [r["gap"]["max"] for r in rows], color=color, alpha=0.18,
                            linewidth=0)
        ax.set_xticks(range(1, 1 + max((len(by_key[key]) for _, _, by_key in lines), default=0)))
        ax.set_xlabel(f"quantile bin of the {title} (1: lowest)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("CE gap in the bin (nats)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"Per-token gap, g-SAE minus TopK, at {cv.last:,} tokens")
    save_png(fig, path)


# Markdown ----------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _seeds(values: dict[str, float]) -> str:
    if not values:
        return "-"
    shown = ", ".join(f"{v:+.3f}" for v in values.values())
    return f"**{mean_of(list(values.values())):+.3f}** ({shown})"


def _title(cv: Curves, corpus: str) -> str:
    return f"`{cv.data['corpora'][corpus]['name']}`" + (" (held-out)" if corpus == "train"
                                                         else "")


def verdict_lines(cv: Curves, agg: dict[str, Any], found: dict[str, Any],
                  summed: dict[str, Any]) -> list[str]:
    lines = []
    for label, s in summed.items():
        lines += [f"**{label}** at {cv.last:,} training tokens per SAE:", ""]
        for c in cv.corpora:
            v = found.get(c, {}).get(label, {})
            lines.append(f"- {_title(cv, c)}: gap {_seeds(agg['gaps'][label][c][str(cv.last)])} "
                         f"nats (seeds in order); spliced CE increase {pm(v.get('g_sae'))} "
                         f"against TopK's {pm(v.get('topk'))}; lower than TopK: "
                         f"**{v.get('verdict', 'not measured')}**.")
        below = s["every_seed_below_zero"]
        rho = ", ".join(f"{DISTANCES[k].split(' (')[0]} {_num(r, 2)}"
                        for k, r in s["rank_correlation"].items())
        lines += ["", f"Every seed's gap is below zero on {len(below)} of {len(s['unseen'])} "
                  f"unseen corpora ({', '.join(below) or 'none'}). Rank correlation over all "
                  f"{len(cv.corpora)} corpora of the gap with the distance: {rho} (negative: "
                  "the farther the text, the more the g-SAE gains).", ""]
    return lines


def gap_tables(cv: Curves, agg: dict[str, Any]) -> list[str]:
    lines = []
    for label, per_corpus in agg["gaps"].items():
        lines += [f"**{label}**: gap by training tokens; mean (each seed)", ""]
        lines += _table(["tokens", *(_title(cv, c) for c in cv.corpora)],
                        [[f"{n:,}", *(_seeds(per_corpus[c][str(n)]) for c in cv.corpora)]
                         for n in cv.counts])
    return lines


def headline(cv: Curves) -> str:
    """The series the distance table shows: the first g-SAE's gradient-free inference."""
    return Series(cv.g_variants[0], cv.ks[0], GRAD_FREE).label(False)


def distance_table(cv: Curves, agg: dict[str, Any]) -> list[str]:
    label = headline(cv)
    head = ["corpus", *(DISTANCES[k] for k in DISTANCES), f"gap at {cv.last:,} ({label})"]
    return _table(head, [[_title(cv, c), *(_num(agg["distances"][c][k]) for k in DISTANCES),
                          _seeds(agg["gaps"][label][c][str(cv.last)])] for c in cv.corpora])


def per_token_lines(cv: Curves, agg: dict[str, Any]) -> list[str]:
    if not agg["per_token"]:
        return ["Not run: give `--per_token train largest_gap` (or corpus names).", ""]
    lines = []
    for c, per_series in agg["per_token"].items():
        tokens = cv.data["per_token"][c]["run"]["tokens"]
        for label, by_key in per_series.items():
            for key, title in KEYS.items():
                lines += [f"**{_title(cv, c)}, {label}, by quantile of the {title}** "
                          f"({tokens:,} token positions)", ""]
                lines += _table(
                    ["bin", "range", "tokens", "TopK CE increase", "g-SAE CE increase", "gap",
                     "contribution to the mean gap"],
                    [[str(b + 1), f"{r['low']:.3g} - {r['high']:.3g}", f"{r['tokens']:,}",
                      pm(r["topk"]), pm(r["g_sae"]), pm(r["gap"]), _num(r["contribution"], 3)]
                     for b, r in enumerate(by_key[key])])
    return lines


def markdown(cv: Curves, agg: dict[str, Any], found: dict[str, Any],
             summed: dict[str, Any]) -> str:
    d = cv.data
    stages = ", ".join(f"{k} {duration_text(v)}" for k, v in d["stage_seconds"].items())
    return "\n".join([
        f"# Where the gradient pays: TopK vs g-SAEs across registers on "
        f"{d['model'].get('model', '?')}, {d['hook']}", "",
        f"Made by `gsae study` (gsae {d['versions']['gsae']}) on {d['created']}, on "
        f"{d['machine']['description']}. Time per stage, summed over every run of the command: "
        f"{stages}; {duration_text(d['wall_seconds'])} in all.", "",
        "```", d["command"], "```", "",
        "The gap is the g-SAE's spliced CE increase minus that of the TopK SAE of the same seed "
        "(below 0: the g-SAE keeps the model's loss better). Each unseen corpus is evaluated on "
        "its first tokens; no SAE trained on any of it. The corpora: "
        "[docs/registers.md](../../registers.md).", "",
        "## Verdict", "", *verdict_lines(cv, agg, found, summed),
        "## The gap along training", "", *gap_tables(cv, agg),
        "## The gap against the distance to the training text", "",
        "Unigram KL: of the evaluated tokens' frequencies against the training split's (add-0.5 "
        "smoothed); clean CE: the model alone on the evaluated tokens; TopK's FVU: mean over "
        f"seeds at {cv.last:,} tokens.", "",
        *distance_table(cv, agg),
        *(f"![{what}]({name})\n" for name, what in PLOTS.items()),
        "## Which tokens carry the gap", "",
        "The last snapshots evaluated once more, keeping each position's losses: positions are "
        "put in five equally populated bins of the clean per-token CE, and of |g| (the norm of "
        "the gradient of the summed next-token CE at the hook, at that position). The "
        "contribution of a bin is its mean gap times its share of the positions: the "
        "contributions add up to the mean gap over all positions.", "",
        *per_token_lines(cv, agg),
        "`results.json` holds every number above.", ""])


# Entry point -------------------------------------------------------------------------------------


def build_registers_report(results: dict[str, Any], folder: str | Path) -> Path:
    """Write the registers report: README.md, results.json and the plots. Returns the
    markdown file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cv = Curves(rounded(results))  # as results.json keeps them: a rebuild shows the same digits
    if not cv.counts or not cv.g_variants:
        raise GsaeError("the study's results hold no snapshots of TopK and a g-SAE to report")
    agg, found = aggregates(cv), verdicts(cv)
    summed = summary(cv, agg, found)
    plot_gap_vs_distance(cv, agg, folder / "gap_vs_distance.png")
    plot_per_token(cv, agg, folder / "per_token_gap.png")
    full = {**{k: v for k, v in cv.data.items() if k not in ("aggregates", "verdicts")},
            "registers": {**agg, "summary": summed}}
    return write_report_files(folder, full, markdown(cv, agg, found, summed))
