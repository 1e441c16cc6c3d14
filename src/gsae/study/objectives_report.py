"""The objectives report of `gsae study`: which gradient-informed SAE beats TopK once trained,
and what it costs.

`build_objectives_report(results, folder)` takes the results of a study whose SAEs include
objective variants (the Fisher term, KL fine-tuned twins; schema "gsae.scaling/2") and writes
README.md, results.json (the results plus an `objectives` section with every number shown) and
three plots: CE increase against training tokens, CE increase against FVU at the last snapshot
(the Pareto view), and each variant's CE-increase reduction against TopK per seed.

The verdict is the scaling report's objectives rule (`scaling_report.reduction`): a variant
holds when its CE increase at the last snapshot is at least 20% below TopK's on every corpus for
every seed. The cost per variant is built from measured parts: the store stage (shared by every
SAE), the training steps (seconds per step of each variant, timed side by side in one run, times
the steps taken), the fine-tuning stage split over its SAEs, and the evaluation stages split
over the snapshots they evaluated. Across seeds a number is "mean ± half-range".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.ticker import AutoLocator, ScalarFormatter

from gsae.errors import GsaeError
from gsae.evaluate import GRAD_FREE
from gsae.study.plots import save_png
from gsae.study.report import duration_text, pm, write_report_files
from gsae.study.results import rounded, spread
from gsae.study.scaling_report import (
    OBJECTIVE_REDUCTION,
    Curves,
    _color,
    _panels,
    _steering,
    objective_lines,
    pct,
    per_seed_reductions,
    plot_metric,
    reduction,
    verdicts,
)

PLOTS = {"ce_increase_vs_tokens.png": "spliced CE increase against training tokens, every "
                                      "variant (mean line, min-max band over seeds)",
         "pareto_ce_vs_fvu.png": "spliced CE increase against FVU at the last snapshot, one "
                                 "point per seed (the Pareto view)",
         "reduction_vs_topk.png": "each variant's CE-increase reduction against TopK at the "
                                  "last snapshot, per seed, with the 20% bar"}
METRICS = {"ce_increase": "CE increase", "kl": "KL", "fvu": "FVU", "l0": "L0",
           "dead_fraction": "dead", "first_order_abs": "first-order effect"}
PUBLISHED_TOKENS = 10**8  # the low end of published SAEs' training budgets


# Numbers -----------------------------------------------------------------------------------------


def last_snapshot_table(cv: Curves, found: dict[str, Any]) -> dict[str, Any]:
    """Per corpus and series: every metric of METRICS at the last snapshot (spread over seeds)
    and the reduction against TopK (from the verdicts `found`)."""
    out: dict[str, Any] = {}
    for corpus in cv.corpora:
        for s in cv.series():
            label = s.label(len(cv.ks) > 1)
            row = {key: spread(cv.values(corpus, s, key, cv.last)) for key in METRICS}
            row["reduction"] = found[corpus].get(label, {}).get("reduction")
            out.setdefault(corpus, {})[label] = row
    return out


def costs(cv: Curves) -> dict[str, Any]:
    """Seconds per SAE of each variant (first k), by stage, from the measured parts."""
    d = cv.data
    stages, step = d["stage_seconds"], d.get("cost", {}).get("step_seconds", {})
    train = d["settings"]["train"]
    evals = [f"eval_{c}" for c in cv.corpora]
    snapshots = {(name, count) for (_, name, _, count) in cv.records}
    per_eval = sum(stages.get(e, 0.0) for e in evals) / max(1, len(snapshots))
    twins = [s for s in cv.saes.values() if s.get("finetuned_from")]
    per_twin = stages.get("finetune", 0.0) / len(twins) if twins else 0.0
    out: dict[str, Any] = {"store": stages.get("store", 0.0), "evaluation_per_snapshot": per_eval,
                           "finetune_per_sae": per_twin, "variants": {}}
    for v in cv.variants:
        names = cv.names(v, cv.ks[0])
        if not names:
            continue
        sae = cv.saes[names[0]]
        parent = cv.saes.get(sae.get("finetuned_from") or "", sae)
        trained_tokens = parent_tokens(sae, train["tokens"])
        seconds = step.get(_first_seed(parent["name"]))
        training = None if seconds is None else \
            seconds * math.ceil(trained_tokens / train["batch_tokens"])
        evaluated = len({s["requested_tokens"] for s in sae["snapshots"]}) or 1
        out["variants"][v.label] = {
            "step_seconds": seconds, "trained_tokens": trained_tokens, "training": training,
            "finetune": per_twin if sae.get("finetuned_from") else 0.0,
            "evaluation": per_eval * evaluated, "evaluated_snapshots": evaluated}
    return out


def other_k_table(cv: Curves) -> dict[str, Any]:
    """With --extra_k: per corpus, k and series of the variants trained at every k, the CE
    increase at the last snapshot (spread over seeds) and, but for TopK, the reduction against
    TopK of the same k and seed with the objectives' rule. Empty without --extra_k."""
    shown = [v for v in cv.variants
             if cv.extra_ks and all(cv.names(v, k) for k in cv.extra_ks)]
    out: dict[str, Any] = {}
    for corpus in cv.corpora if shown else []:
        for s in cv.series(cv.all_ks, shown):
            row = {"ce_increase": spread(cv.values(corpus, s, "ce_increase", cv.last))}
            if s.variant != cv.topk:
                row.update(reduction(cv, corpus, s))
            out.setdefault(corpus, {}).setdefault(str(s.k), {})[s.label(False)] = row
    return out


def parent_tokens(sae: dict[str, Any], tokens: int) -> int:
    """The tokens an SAE trained on the reconstruction objective: all of them, or for a
    fine-tuned twin the parent's snapshot it started from."""
    start = sae.get("finetuned_at")
    return int(start) if start else tokens


def _first_seed(name: str) -> str:
    """The name of the seed-0 SAE of the same settings (the step timing's key)."""
    head, _, _ = name.partition("+")
    return head.rsplit("-s", 1)[0] + "-s0"


# Plots -------------------------------------------------------------------------------------------


def plot_pareto(cv: Curves, path: Path) -> None:
    """CE increase against FVU at the last snapshot: one point per seed, per series."""
    fig, axes = _panels(cv, f"CE increase against FVU at {cv.last:,} tokens (lower left is "
                            "better): one point per seed", "spliced CE increase (nats)")
    for ax, corpus in zip(axes, cv.corpora):
        ax.set_xscale("linear")  # the panels come with training-token ticks: plain ones here
        ax.xaxis.set_major_locator(AutoLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("FVU")
        for s in cv.series():
            fvu = cv.values(corpus, s, "fvu", cv.last)
            ce = cv.values(corpus, s, "ce_increase", cv.last)
            if fvu and len(fvu) == len(ce):
                ax.scatter(fvu, ce, color=_color(cv, s), s=24,
                           marker="o" if s.mode == GRAD_FREE else "^",
                           label=s.label(len(cv.ks) > 1))
    axes[-1].legend(fontsize=7, loc="best")
    save_png(fig, path)


def plot_reduction(cv: Curves, path: Path) -> None:
    """Per series, each seed's reduction of the CE increase against TopK at the last snapshot,
    and the 20% bar that a variant must clear on every corpus for every seed."""
    fig, axes = _panels(cv, f"CE increase reduction against TopK at {cv.last:,} tokens, per "
                            f"seed (a variant holds above {OBJECTIVE_REDUCTION:.0%} everywhere)",
                        "reduction (1 - variant / TopK)")
    series = cv.gap_series()
    for ax, corpus in zip(axes, cv.corpora):
        ax.set_xscale("linear")
        ax.set_xticks(range(len(series)), [s.label(len(cv.ks) > 1) for s in series],
                      rotation=35, ha="right", fontsize=7)
        ax.set_xlabel("")
        ax.axhline(OBJECTIVE_REDUCTION, color="green", linestyle=":", linewidth=1)
        ax.axhline(0.0, color="gray", linewidth=1)
        for i, s in enumerate(series):
            found = per_seed_reductions(cv, corpus, s)
            if found:
                ax.bar(i, sum(found) / len(found), color=_color(cv, s), alpha=0.35)
                ax.scatter([i] * len(found), found, color=_color(cv, s), s=16, zorder=3)
    save_png(fig, path)


# Markdown ----------------------------------------------------------------------------------------


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def sweep_lines(d: dict[str, Any]) -> list[str]:
    sweep = d.get("fisher_sweep") or {}
    if not sweep:
        return ["No Fisher sweep was run: the Fisher term's lambda was given (--fisher_coef).", ""]
    first, stop = sweep["validation_contexts"]
    rows = [[f"{r['fisher_coef']:g}" + (" (chosen)" if r["fisher_coef"] == sweep["chosen"]
                                        else ""),
             *(f"{r[k]:.4f}" if r.get(k) is not None else "n/a"
               for k in ("ce_increase", "kl", "fvu", "dead_fraction"))]
            for r in sweep["results"]]
    return [f"TopK SAEs (`{sweep['sae']}` and the same with each lambda) trained for "
            f"{sweep['tokens']:,} tokens on the store without its last "
            f"{sweep['validation_fraction']:.0%} of shards, scored on the wiki *training* split's "
            f"contexts {first:,}..{stop - 1:,} (the contexts those shards were made from, which "
            "no SAE of the sweep read; the evaluation split is not touched). lambda* is the "
            "lowest CE increase among lambda > 0; lambda 0 is the reference.", "",
            *_table(["lambda", "CE increase", "KL", "FVU", "dead"], rows),
            f"Sweep time: {duration_text(sum(sweep['stage_seconds'].values()))} "
            f"({', '.join(f'{k} {duration_text(v)}' for k, v in sweep['stage_seconds'].items())}).",
            ""]


def metric_lines(cv: Curves, table: dict[str, Any]) -> list[str]:
    lines = []
    for corpus in cv.corpora:
        rows = [[label, *(pm(row[k]) for k in METRICS), pct(row["reduction"])
                 if row["reduction"] else "(TopK)"] for label, row in table[corpus].items()]
        lines += [f"**{cv.corpus_title(corpus)} at {cv.last:,} tokens**", "",
                  *_table(["variant", *METRICS.values(), "CE reduction vs TopK"], rows)]
    return lines


def cost_lines(cv: Curves, cost: dict[str, Any]) -> list[str]:
    rows = []
    own = {label: (c["training"] or 0.0) + c["finetune"] for label, c in cost["variants"].items()}
    topk = own.get(cv.topk.label) or None
    for label, c in cost["variants"].items():
        parts = {"store": cost["store"], "training": c["training"] or 0.0,
                 "fine-tuning": c["finetune"], "evaluation": c["evaluation"]}
        total = sum(parts.values())
        step = f"{c['step_seconds'] * 1000:.0f} ms" if c["step_seconds"] else "not timed"
        rows.append([label, step, *(f"{duration_text(v)} ({v / total:.0%})" if total else "n/a"
                                    for v in parts.values()), duration_text(total),
                     f"{own[label] / topk:.2f}x" if topk else "n/a"])
    return ["Wall time per SAE of each variant: the store stage in full (every variant here "
            "trains from the one store of x and g; a TopK-only user could store x alone), its "
            "training steps (the step time measured side by side with the other variants in one "
            "run, times the steps it took), the fine-tuning stage split evenly over its SAEs, and "
            "the evaluation stages split evenly over the snapshots they evaluated, times the "
            "variant's evaluated snapshots. Shares are of the variant's total; the last column "
            "is training plus fine-tuning against TopK's training. The stage times are sums over "
            "every invocation of the study, each under the machine's load of its time (see the "
            "machine record in results.json), while the step times are one side-by-side "
            "measurement: compare the training and fine-tuning columns as orders of size.", "",
            *_table(["variant", "step", "store", "training", "fine-tuning", "evaluation",
                     "total", "training + fine-tuning vs TopK"], rows)]


def budget_lines(cv: Curves, by_k: dict[str, Any]) -> list[str]:
    d = cv.data
    tokens = d["settings"]["train"]["tokens"]
    variants = {v.label for v in cv.variants}
    shown = list(by_k[cv.corpora[0]][str(cv.extra_ks[0])]) if by_k else []
    at_other_k = [f"At k = {', '.join(map(str, cv.extra_ks))} (last snapshot only): "
                  f"{', '.join(shown)}."] if shown else []
    missing = []
    if not any(v.finetuned for v in cv.variants):
        missing.append("the KL fine-tuned variants (e, f: --finetune_fraction)")
    if not cv.extra_ks:
        missing.append("other values of k (--extra_k)")
    return [f"Each SAE trained on {tokens:,} tokens: {PUBLISHED_TOKENS / tokens:.0f} times fewer "
            f"than the {PUBLISHED_TOKENS:.0e} tokens at the low end of published SAEs. The "
            f"variants measured: {', '.join(sorted(variants))}.", *at_other_k,
            *([f"Not run within this budget: {'; '.join(missing)}."] if missing else []), ""]


def other_k_lines(cv: Curves, by_k: dict[str, Any]) -> list[str]:
    if not by_k:
        return []
    rows = []
    for k, per_series in by_k[cv.corpora[0]].items():
        for label in per_series:
            cells = [by_k[c][k][label] for c in cv.corpora]
            compared = "reduction" in cells[0]
            verdict = "(TopK)" if not compared else \
                "**holds**" if all(c["every_seed_reduced"] for c in cells) else "does not hold"
            rows.append([k, label, *(pm(c["ce_increase"]) for c in cells),
                         *(pct(c["reduction"]) if compared else "" for c in cells), verdict])
    head = ["k", "variant", *(f"CE increase, {c}" for c in cv.corpora),
            *(f"reduction vs TopK, {c}" for c in cv.corpora), "verdict"]
    return ["## Other values of k", "",
            f"The variants trained at every k (`--extra_k`, the same {cv.last:,} tokens, the last "
            "snapshot evaluated) against TopK of the same k and seed, by the same rule; the rows "
            f"at k = {', '.join(map(str, cv.ks))} repeat the tables above. CE increase: mean ± "
            "half-range over seeds (nats); reduction: mean (min..max) over seeds.", "",
            *_table(head, rows)]


def steering_lines(cv: Curves) -> list[str]:
    steered = _steering(cv)
    rows = [[label, *(pm(by_k.get(str(k))) for k in cv.all_ks)] for label, by_k in steered.items()]
    return ["Steering with each SAE's last snapshot (`gsae steer`'s settings of the command): the "
            "median over steered latents of KL(steered || clean) at the first strength, per SAE, "
            "mean ± half-range over seeds (nats; larger: the latent moves the model more).", "",
            *_table(["variant", *(f"k = {k}" for k in cv.all_ks)], rows)]


def markdown(cv: Curves, table: dict[str, Any], cost: dict[str, Any],
             found: dict[str, Any], by_k: dict[str, Any]) -> str:
    d = cv.data
    stages = ", ".join(f"{k} {duration_text(v)}" for k, v in d["stage_seconds"].items())
    return "\n".join([
        f"# Objectives: gradient-informed SAEs against TopK on {d['model'].get('model', '?')}, "
        f"{d['hook']}", "",
        f"Made by `gsae study` (gsae {d['versions']['gsae']}) on {d['created']}, on "
        f"{d['machine']['description']}. Time per stage, summed over every run of the command "
        f"that worked on the study folder: {stages}.", "",
        "```", d["command"], "```", "",
        *objective_lines(cv, found, every_variant=True),
        "## Budget", "", *budget_lines(cv, by_k),
        "## The Fisher sweep", "", *sweep_lines(d),
        "## Every metric at the last snapshot", "", *metric_lines(cv, table),
        *other_k_lines(cv, by_k),
        "## Cost", "", *cost_lines(cv, cost),
        "## Steering", "", *steering_lines(cv),
        "## Plots", "", *(f"![{what}]({name})\n" for name, what in PLOTS.items()),
        "`results.json` holds every number above and the evaluation records of every "
        "snapshot.", ""])


# Entry point -------------------------------------------------------------------------------------


def build_objectives_report(results: dict[str, Any], folder: str | Path) -> Path:
    """Write the objectives report: README.md, results.json and the plots. Returns the
    markdown file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cv = Curves(rounded(results))  # as results.json keeps them: a rebuild shows the same digits
    if not cv.counts or not any(v.objective for v in cv.variants):
        raise GsaeError("the study's results hold no objective variant (--fisher_coef above 0, "
                        "--fisher_sweep or --finetune_fraction) to report")
    found = verdicts(cv)
    table, cost, by_k = last_snapshot_table(cv, found), costs(cv), other_k_table(cv)
    plot_metric(cv, "ce_increase", folder / "ce_increase_vs_tokens.png")
    plot_pareto(cv, folder / "pareto_ce_vs_fvu.png")
    plot_reduction(cv, folder / "reduction_vs_topk.png")
    full = {**{k: v for k, v in cv.data.items() if k not in ("aggregates", "verdicts")},
            "objectives": {"last_snapshot": table, "cost": cost,
                           **({"other_k": by_k} if by_k else {}),
                           "verdicts": {c: {label: {k: v[k] for k in ("reduction",
                                                                      "every_seed_reduced")}
                                            for label, v in found[c].items()}
                                        for c in cv.corpora}}}
    return write_report_files(folder, full, markdown(cv, table, cost, found, by_k))
