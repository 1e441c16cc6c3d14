"""The comparison's plots (matplotlib, saved as palette PNGs)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter
from PIL import Image

from gsae.evaluate import GRAD_AWARE, MODES
from gsae.study.results import (
    COLORS,
    EVAL_METRICS,
    MODE_NAMES,
    MODE_TITLES,
    STEER_METRICS,
    Results,
    Variant,
    mean_of,
    median_of,
)


def write_plots(res: Results, folder: Path) -> None:
    """Every plot of the report (the names in `PLOTS`) into `folder`."""
    units = {key: f"{title} ({unit})" for key, title, unit in EVAL_METRICS}
    _plot_vs(res, folder / "ce_increase_vs_l0.png", "ce_increase", units["ce_increase"], "l0")
    _plot_vs(res, folder / "ce_recovered_vs_l0.png", "ce_recovered_zero",
             units["ce_recovered_zero"], "l0")
    _plot_vs(res, folder / "fvu_vs_l0.png", "fvu", units["fvu"], "l0")
    _plot_vs(res, folder / "dead_fraction_vs_k.png", "dead_fraction", units["dead_fraction"], "k")
    _plot_steering(res, folder / "steering.png")
    _plot_beta_sweep(res, folder / "beta_sweep.png")


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
            xs = [mean_of(res.eval_values(v, mode, k, "l0")) if x_key == "l0" else k
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
    save_png(fig, path)


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
                    medians = [median_of(seed) for seed in seeds if seed]
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
    save_png(fig, path)


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
    save_png(fig, path)


def save_png(fig: Figure, path: Path) -> None:
    """Write the figure as a palette PNG (256 colours): a third of the RGBA file's size."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100)
    Image.open(buffer).quantize(256).save(path, optimize=True)


