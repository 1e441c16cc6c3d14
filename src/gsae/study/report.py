"""The report of `gsae compare`: PNG plots, a markdown report and a JSON of all numbers.

`build_report(results, folder)` takes the comparison's results (schema "gsae.compare/2" or /1:
the run's settings, the SAEs of the grid, their evaluation records and steering summaries) and
writes
`README.md`, `results.json` (the results plus every aggregate the tables and claims show) and
the plots. Across seeds a number is shown as "mean ± half-range": the half-range is
(max - min) / 2 over the seeds, so every seed lies within mean ± 2 half-ranges, and with two
seeds within mean ± half-range exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gsae.evaluate import MODES
from gsae.io import atomic_output
from gsae.study.plots import write_plots
from gsae.study.results import (
    EVAL_METRICS,
    MODE_NAMES,
    MODE_TITLES,
    PLOTS,
    STEER_METRICS,
    Results,
    claims,
    rounded,
)


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
        f"the spliced CE increase is {pm(ce['topk'])} nats for TopK, "
        f"{pm(ce['gradient-aware'])} for {ce['best_gradient-aware']} with gradient-aware "
        f"inference and {pm(ce['gradient-free'])} for {ce['best_gradient-free']} with "
        "gradient-free inference. "
        f"Over the {ce['k_values']} values of k, the best g-SAE at each k has the lower mean at "
        f"{ce['k_where_best_g_sae_is_lower']['gradient-aware']} (gradient-aware) and "
        f"{ce['k_where_best_g_sae_is_lower']['gradient-free']} (gradient-free).",
        f"2. **Fewer dead latents: {dead['verdict']}.** At k = {k} the fraction of latents "
        f"never selected in {dead['window_tokens']} evaluation tokens is {pm(dead['topk'])} "
        f"for TopK and {pm(dead['gradient-aware'])} for {best} (gradient-aware selection, as "
        f"in training; {pm(dead['gradient-free'])} gradient-free)"
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
            f"gives a median KL(steered || clean) of {pm(s['kl']['topk'])} nats for TopK and "
            f"{pm(s['kl']['g_sae'])} for {best}; the median gain in log-probability of the "
            f"promoted tokens is {pm(s['logprob_gain']['topk'])} and "
            f"{pm(s['logprob_gain']['g_sae'])} nats. The strengths follow the latents' typical "
            f"activations, whose medians are {pm(s['typical_activation']['topk'])} (TopK) and "
            f"{pm(s['typical_activation']['g_sae'])} (g-SAE).")
    lines.append(
        "4. **Interpretability and other model sizes: not measured** here (one model, no "
        "interpretability evaluation).")
    if "value_mode" in c:
        modes = c["value_mode"]
        ranked = sorted(modes, key=lambda m: modes[m]["mean"] if modes[m] else math.inf)
        first, second = ranked[0], ranked[1]
        lines += ["", f"Value mode: at k = {k}, the best g-SAE keeping `{first}` has a spliced CE "
                  f"increase of {pm(modes[first])} and the best keeping `{second}` "
                  f"{pm(modes[second])} (gradient-aware): `{first}` is better here."]
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def pm(s: dict[str, float] | None) -> str:
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
        f"{duration_text(d['wall_seconds'])} on {d.get('machine', {}).get('description', '?')}.",
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
                           [(str(k), [pm(cells[lab][str(k)]) for lab in labels])
                            for k in res.ks])
    lines += ["### Steering (gradient-free encoding)", "",
              "Per SAE, the median over its sampled latents; then mean ± half-range of those "
              "medians over seeds.", ""]
    for alpha, per_metric in agg["steer"].items():
        for key, title, unit in STEER_METRICS:
            cells = per_metric[key]
            lines += table(f"{title} ({unit}), median per latent, alpha = {alpha} × typical "
                           "activation", labels,
                           [(str(k), [pm(cells[lab][str(k)]) for lab in labels])
                            for k in res.ks])
    lines += table("Mean β·|d_i·g| of the selected latents during training (last log interval)",
                   labels, [(str(k), [pm(agg["train_effect"][lab][str(k)]) for lab in labels])
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
    cmp, train, steer = s["sae"] | s["compare"], s["train"], s["steer"]
    versions = ", ".join(f"{k} {v}" for k, v in d["versions"].items())
    stages = ", ".join(f"{k} {duration_text(v)}" for k, v in d.get("stage_seconds", {}).items())
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
        ("wall time", f"{duration_text(d['wall_seconds'])} ({stages})"),
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


def duration_text(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"



# Entry point ---------------------------------------------------------------------------------


def build_report(results: dict[str, Any], folder: str | Path) -> Path:
    """Write the report folder: README.md, results.json and the PNG plots. Returns the
    markdown file. `results` is written as given (an old schema stays old), with the
    aggregates and claims added."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    res = Results(results)
    agg = res.aggregates()
    found = claims(res)
    write_plots(res, folder)
    full = {**results, "aggregates": agg, "claims": found}
    return write_report_files(folder, full, markdown(res, agg, found))


def write_report_files(folder: Path, results: dict[str, Any], text: str) -> Path:
    """A report's results.json (floats to 6 significant digits, compact) and README.md, each
    written atomically; returns the README."""
    with atomic_output(folder / "results.json") as tmp:
        tmp.write_text(json.dumps(rounded(results), separators=(",", ":"), allow_nan=False)
                       + "\n")
    report = folder / "README.md"
    with atomic_output(report) as tmp:
        tmp.write_text(text)
    return report
