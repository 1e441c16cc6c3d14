"""`gsae inspect`: a static feature browser (plain HTML, CSS and inline SVG) of one SAE, with an
optional second SAE to compare against, plus `latents.json` and a delphi latent cache."""

from __future__ import annotations

import json
import math
import posixpath
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gsae.browser import examples as ex
from gsae.browser import render
from gsae.browser.collect import (
    Encoded,
    choose_pages,
    encode_contexts,
    latent_map,
    latent_numbers,
    top_activating_tokens,
)
from gsae.browser.delphi import write_delphi_cache
from gsae.browser.logits import norm_description, promoted_tokens, top_tokens
from gsae.browser.pairs import NEAR_COSINE, pair_latents, pair_records
from gsae.browser.setup import Recorded, held_out_contexts, recorded
from gsae.browser.steering import continuations
from gsae.config import validate
from gsae.errors import GsaeError
from gsae.formats import load
from gsae.hooks import resolve_hook
from gsae.io import atomic_output, holds_folder
from gsae.models import ModelConfig
from gsae.pipeline import CHANGED_CORPUS_HELP, load_for_eval
from gsae.sae import SAE
from gsae.text import DataConfig

SCHEMA = "gsae.inspect/1"
INDEX_PROMOTED, PAGE_TOKENS, ROWS_PER_PAGE = 3, 10, 100
OVER = ("over the encoded tokens: the SAE's data positions of the held-out contexts "
        "(skip_first <= t <= T-2, outliers left out)")
# The index table: (sort key, header, record field, significant digits, tooltip).
COLUMNS = (
    ("latent", "latent", "latent", 0, "The latent's index in the SAE (0-based). Linked where "
     "it has a page; 'dead': it never fires on the encoded tokens."),
    ("freq", "density %", "density_percent", 3, "Firing density, in percent: the share of "
     "encoded tokens on which the SAE selects this latent with a value > 0 (with the SAE's "
     "training-time selection), x 100; " + OVER + "."),
    ("max", "max act", "max_activation", 3, "Largest activation (the latent's value, in the "
     "units of the hook's residual stream along its unit decoder direction) " + OVER + "."),
    ("mean", "mean act", "mean_activation", 3, "Mean of the latent's non-zero activations, "
     "over the tokens where it fires."),
    ("abs_effect", "mean |effect|", "mean_abs_loss_effect", 3, "Mean |value * (d_i . g)| over "
     "the tokens where it fires: the size of the latent's first-order effect on the summed "
     "next-token loss, in nats (g = dL/dx of the clean model for the true next tokens)."),
    ("effect", "mean &beta;|d&middot;g|", "mean_effect", 3, "Mean of beta * |d_i . g| over the "
     "tokens where it fires: the gradient term of a g-SAE's selection score (a multiplier, no "
     "unit); empty for a plain TopK SAE."),
    ("novel", "not-TopK share", "novel_share", 3, "Share (0 to 1) of the latent's firings that "
     "plain TopK selection (beta = 0, same weights) would not have made; g-SAE only."),
    ("tokens", "top activating tokens", "top_tokens", 0, "The tokens on which the latent's "
     "summed activation is largest (the token at the firing position), largest first; "
     + OVER + ". The filter box searches these and the promoted tokens."),
    ("promoted", "top promoted tokens", "promoted", 0, "The tokens whose logits the latent's "
     "decoder direction raises most on the direct path (final norm's gain applied, later "
     "layers skipped); a property of the weights, not of the text."),
)
DEFINITIONS = {
    "fires": "the latent is selected with a value > 0 on a token; the SAE's data positions "
    "only (skip_first <= t <= T-2, outliers left out)",
    "selection": "the SAE's training-time selection: for a g-SAE gradient-aware, with the clean "
    "model's loss gradient g for the true next tokens",
    "frequency": "firings / encoded tokens",
    "mean_activation": "mean of the latent's non-zero values",
    "mean_effect": "mean of beta * |d_i . g| over the latent's firings (g-SAE only)",
    "novel_share": "share of the latent's firings that plain TopK (beta = 0 on the same weights) "
    "would not have selected (g-SAE only)",
    "typical_activation": "mean of the latent's non-zero values under gradient-free selection, "
    "as gsae steer defines it",
    "steering_unit": "the typical activation; for a latent that fires only under "
    "gradient-aware selection, its mean activation there (steering_unit_source says which)",
    "loss_effect": "per token: value * (d_i . g), the first-order change of the summed "
    "next-token loss from the latent's contribution",
    "dead": "never fires on the inspected tokens",
}


@dataclass
class InspectConfig:
    """What the feature browser reads and how many latents get a page."""

    out: str = field(default="inspect", metadata={"help": "folder to write the site into"})
    tokens: int = field(default=12_288, metadata={
        "help": "held-out tokens to encode (rounded up to whole contexts; as gsae eval)",
        "min": 1})
    pool_tokens: int = field(default=262_144, metadata={
        "help": "contexts are a seeded sample of the evaluation split's first this-many tokens",
        "min": 0})
    top_latents: int = field(default=32, metadata={
        "help": "pages for this many of the most frequent latents", "min": 0})
    random_latents: int = field(default=32, metadata={
        "help": "pages for a seeded random sample of this many other live latents", "min": 0})
    latents: str = field(default="", metadata={
        "help": "pages also for these latents, by id, comma-separated (e.g. 12,977)"})
    contexts_per_latent: int = field(default=10, metadata={
        "help": "top-activating contexts shown per latent", "min": 1})
    quantiles: int = field(default=4, metadata={
        "help": "quantile bins of a latent's activations with sampled examples", "min": 1})
    contexts_per_quantile: int = field(default=2, metadata={
        "help": "examples shown per quantile bin", "min": 0})
    continuation_tokens: int = field(default=10, metadata={
        "help": "tokens generated per steered continuation (0: no continuations)", "min": 0})
    neighbours: int = field(default=3, metadata={
        "help": "nearest latents by decoder cosine listed from the --compare SAE", "min": 1})
    compare: str = field(default="", metadata={
        "help": "a second SAE folder (same model and width) to compare latents against"})
    seed: int = field(default=0, metadata={"help": "seed of the contexts and random pages"})
    batch_size: int = field(default=8, metadata={"help": "contexts per language-model batch",
                                                 "min": 1})
    overwrite: bool = field(default=False, metadata={
        "help": "replace --out if it already holds a site or other files"})

    def check(self) -> None:
        """The rule `gsae.config.validate` adds to the fields' bounds: `latents` lists ids."""
        self.requested_latents()

    def requested_latents(self, n_latents: int | None = None) -> list[int]:
        """The ids of `latents`, checked against the SAE's `n_latents` when given."""
        parts = [p.strip() for p in str(self.latents).split(",") if p.strip()]
        if not all(p.isdigit() for p in parts):
            raise GsaeError(f"latents is {self.latents!r}: give latent ids (whole numbers from "
                            "0) separated by commas, e.g. 12,977")
        ids = [int(p) for p in parts]
        if n_latents is not None and any(i >= n_latents for i in ids):
            raise GsaeError(f"latents {[i for i in ids if i >= n_latents]} do not exist: the SAE "
                            f"has latents 0 to {n_latents - 1}")
        return ids


@dataclass
class InspectRun:
    """Everything `gsae inspect` needs; model and data default to what the SAE records."""

    saes: list[str] = field(default_factory=list, metadata={
        "positional": True, "metavar": "SAE_DIR", "nargs": 1, "help": "the SAE folder to inspect"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    allow_changed_corpus: bool = field(default=False, metadata={"help": CHANGED_CORPUS_HELP})


def run_inspect(run: InspectRun) -> Path:
    """`gsae inspect`: the site of the run's SAE in `run.inspect.out`."""
    validate(run)
    return inspect(run.saes[0], run.inspect, run.model, run.data, run.allow_changed_corpus)


def inspect(sae_dir: str | Path, cfg: InspectConfig, model_cfg: Any = None,
            data_cfg: Any = None, allow_changed_corpus: bool = False) -> Path:
    """Write the feature browser of the SAE folder `sae_dir` into `cfg.out`, on held-out text
    of the model and corpus it records (or `model_cfg` / `data_cfg` where given), loaded as
    `gsae eval` loads them (`gsae.pipeline.load_for_eval`)."""
    validate(cfg)
    _check_out(Path(cfg.out), cfg.overwrite, read=[Path(sae_dir), Path(cfg.compare or sae_dir)])
    loaded = load_for_eval([str(sae_dir)], model_cfg, data_cfg, allow_changed_corpus)
    other = load(cfg.compare) if cfg.compare else None
    contexts = held_out_contexts(loaded.data, loaded.tokenizer, cfg.tokens, cfg.pool_tokens,
                                 cfg.seed)
    run = {"model": loaded.model_cfg.model, "corpus": loaded.data.dataset, "part": "eval"}
    return inspect_contexts(loaded.saes[0], loaded.model, loaded.tokenizer, contexts, cfg, other,
                            names=(str(sae_dir), cfg.compare), run=run)


def inspect_contexts(sae: SAE, model: nn.Module, tokenizer: Any, contexts: Tensor,
                     cfg: InspectConfig, other: SAE | None = None,
                     names: tuple[str, str] = ("sae", "compare"),
                     run: dict[str, Any] | None = None) -> Path:
    """Write the site for `sae` (and `other`, to compare) on token contexts [n, T]."""
    validate(cfg)
    _check_out(Path(cfg.out), cfg.overwrite)
    requested = cfg.requested_latents(sae.n_latents)
    start = time.perf_counter()
    members = [(sae, recorded(sae, names[0]))]
    if other is not None:
        if other.d_in != sae.d_in:
            raise GsaeError(f"the --compare SAE has input width {other.d_in}, the inspected one "
                            f"{sae.d_in}: decoder cosines need the same width")
        members.append((other, recorded(other, names[1])))
        _check_same_model(*(rec for _, rec in members), names)
    encoded = encode_contexts(model, contexts, members, cfg.batch_size)
    encode_seconds = time.perf_counter() - start
    sites = [Site(s, rec, enc, name, folder)
             for (s, rec), enc, name, folder in zip(members, encoded, names, ("", "compare"))]
    sites[0].pages = choose_pages(sites[0].numbers, cfg.top_latents, cfg.random_latents,
                                  cfg.seed, requested)
    if other is not None:
        link_neighbours(sites[0], sites[1], cfg.neighbours)
    spell = Speller(tokenizer)
    run = {**(run or {}), "contexts": contexts.shape[0], "context_size": contexts.shape[1],
           "norm": norm_description(model)}
    out = Path(cfg.out)
    with _site_folder(out) as folder:
        for site in sites:
            site.prepare(model, tokenizer, contexts, cfg, spell)
        steer_pages(sites, model, tokenizer, cfg.continuation_tokens)
        if other is not None:
            compare_sites(sites[0], sites[1], folder)
        run["seconds_encoding"] = round(encode_seconds, 1)
        run["seconds_pages"] = round(time.perf_counter() - start - encode_seconds, 1)
        for site in sites:
            run["seconds"] = round(time.perf_counter() - start, 1)
            site.write(folder, contexts, cfg, run, sites, spell)
    return out


# One SAE's part of the site ---------------------------------------------------------------------


class Speller:
    """Token id -> text, cached."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token])
        return self.cache[token]


class Site:
    def __init__(self, sae: SAE, rec: Recorded, enc: Encoded, name: str, folder: str):
        self.sae, self.rec, self.enc, self.name, self.folder = sae, rec, enc, name, folder
        self.numbers = latent_numbers(enc, sae.n_latents)
        self.pages: list[int] = []
        self.neighbours: dict[int, list[tuple[int, float]]] = {}
        self.partner: Site | None = None
        self.details: dict[int, dict[str, Any]] = {}
        self.steered = True
        self.steer_only: set[int] | None = None  # None: every page
        self.pairing: dict[str, Any] | None = None  # with --compare: pairs.pair_records

    def page_path(self, latent: int) -> str:
        digits = len(str(self.sae.n_latents - 1))
        return posixpath.join(self.folder, "latents", f"{latent:0{digits}d}.html")

    def local_path(self, latent: int) -> str:
        """The page's path from the folder of this SAE's index and latents.json."""
        return posixpath.relpath(self.page_path(latent), self.folder or ".")

    def index_path(self) -> str:
        return posixpath.join(self.folder, "index.html")

    def prepare(self, model: nn.Module, tokenizer: Any, contexts: Tensor, cfg: InspectConfig,
                spell: Speller) -> None:
        """Promoted tokens of every latent; examples and steering of the paged ones."""
        W_dec = self.sae.W_dec.detach().float()
        up, _ = promoted_tokens(model, W_dec, INDEX_PROMOTED)
        self.promoted = [[spell(int(t)) for t in row] for row in up]
        self.activating = [[spell(t) for t in row] for row in top_activating_tokens(
            self.enc, contexts, self.sae.n_latents, INDEX_PROMOTED)]
        self.hook_name, self.module = resolve_hook(model, self.rec.hook)
        self.steered = cfg.continuation_tokens > 0
        if not self.pages:
            return
        up, up_v, down, down_v = top_tokens(model, W_dec[self.pages], PAGE_TOKENS)
        for row, latent in enumerate(self.pages):
            self.details[latent] = {
                "promoted": _token_list(up[row], up_v[row], spell),
                "suppressed": _token_list(down[row], down_v[row], spell),
                "steering": [],  # filled by steer_pages
                **self._examples(latent, contexts, cfg, spell),
            }

    def to_steer(self) -> dict[int, float]:
        """The paged latents to steer (with --compare, the compared SAE's partners of the
        inspected pages only), with their steering units; dead latents have none."""
        chosen = self.pages if self.steer_only is None else \
            [i for i in self.pages if i in self.steer_only]
        units = {i: self.steering_unit(i)[0] for i in chosen}
        return {i: unit for i, unit in units.items() if math.isfinite(unit)}

    def _examples(self, latent: int, contexts: Tensor, cfg: InspectConfig, spell: Speller
                  ) -> dict[str, Any]:
        act, loss = latent_map(self.enc, latent)
        top = [ex.strip(contexts, act, loss, c, p, spell)
               for c, p in ex.top_positions(act, cfg.contexts_per_latent)]
        bins = [(lo, hi, [ex.strip(contexts, act, loss, c, p, spell) for c, p in chosen])
                for lo, hi, chosen in ex.quantile_positions(
                    act, cfg.quantiles, cfg.contexts_per_quantile, cfg.seed + latent)]
        counts, edges = ex.histogram(act)
        return {"top": top, "bins": bins, "histogram": {"counts": counts, "edges": edges}}

    def steering_unit(self, latent: int) -> tuple[float, str]:
        """The activation the steering strengths multiply, and where it comes from."""
        typical = self.numbers["typical_activation"][latent].item()
        if not math.isnan(typical):
            return typical, "gradient-free typical activation"
        return self.numbers["mean_activation"][latent].item(), "gradient-aware mean activation"

    # Writing ---------------------------------------------------------------------------------

    def write(self, folder: Path, contexts: Tensor, cfg: InspectConfig, run: dict[str, Any],
              sites: list[Site], spell: Speller) -> None:
        records = self.records()
        target = folder / self.folder
        (target / "latents").mkdir(parents=True, exist_ok=True)
        (target / "index.html").write_text(self.index_html(records, run, sites))
        for latent in self.pages:
            (folder / self.page_path(latent)).write_text(self.latent_html(latent, run))
        write_json(target / "latents.json", _json_safe({
            "schema": SCHEMA, "sae": self.summary(), "run": run, "definitions": DEFINITIONS,
            **({"pairing": self.pairing} if self.pairing else {}),
            "latents": records,
            "pages": {str(i): self.details_json(i) for i in self.pages},
        }))
        write_delphi_cache(target / "delphi", self.enc, contexts, self.hook_name, self.rec,
                           self.sae.n_latents, str(run.get("model", "")), cfg.batch_size)

    def summary(self) -> dict[str, Any]:
        sae = self.sae
        return {"name": self.name, "hook": self.rec.hook, "k": sae.k, "beta": sae.beta,
                "value_mode": sae.cfg.value_mode, "n_latents": sae.n_latents, "d_in": sae.d_in,
                "encoded_tokens": self.enc.rows}

    def records(self) -> list[dict[str, Any]]:
        """The index record of every latent (made once, after `prepare`)."""
        if not hasattr(self, "_records"):
            columns = {name: values.tolist() for name, values in self.numbers.items()}
            self._records = [self.record(i, {name: v[i] for name, v in columns.items()})
                             for i in range(self.sae.n_latents)]
        return self._records

    def record(self, latent: int, n: dict[str, float] | None = None) -> dict[str, Any]:
        if n is None:
            n = {name: values[latent].item() for name, values in self.numbers.items()}
        dead = n["count"] == 0
        return {
            "latent": latent, "count": int(n["count"]), "frequency": n["frequency"],
            "density_percent": 100 * n["frequency"],
            "log10_frequency": None if dead else math.log10(n["frequency"]),
            "mean_activation": n["mean_activation"], "max_activation": n["max_activation"],
            "typical_activation": n["typical_activation"], "mean_effect": n["mean_effect"],
            "mean_abs_loss_effect": n["mean_abs_loss_effect"],
            "novel_share": n["novel_share"], "dead": dead,
            "top_tokens": self.activating[latent], "promoted": self.promoted[latent],
            "page": self.local_path(latent) if latent in self.details else None,
        }

    def details_json(self, latent: int) -> dict[str, Any]:
        d = self.details[latent]
        where = [{"context": s.context, "position": s.position, "activation": s.activation}
                 for s in d["top"]]
        return {
            "histogram": d["histogram"], "promoted": d["promoted"], "suppressed": d["suppressed"],
            "top_examples": where,
            "quantile_examples": [
                {"low": lo, "high": hi, "examples": [
                    {"context": s.context, "position": s.position, "activation": s.activation}
                    for s in strips]} for lo, hi, strips in d["bins"]],
            "neighbours": [{"latent": j, "cosine": c} for j, c in self.neighbours.get(latent, [])],
            "steering": d["steering"], "steering_unit": self.steering_unit(latent)[0],
            "steering_unit_source": self.steering_unit(latent)[1],
        }

    def index_html(self, records: list[dict[str, Any]], run: dict[str, Any],
                   sites: list[Site]) -> str:
        here = self.index_path()
        dead = sum(r["dead"] for r in records)
        others = " | ".join(
            f'<a href="{_href(here, s.index_path())}">{"compared" if s.folder else "inspected"} '
            f"SAE: {_esc(s.name)}</a>" for s in sites if s is not self)
        rows = "\n".join(self._index_row(r, here) for r in records)
        body = (
            f"<h1>Latents of {_esc(self.name)}</h1>"
            + self.pairing_note(here) + f"<p>{others}</p>"
            + render.key_values({**_flat(self.summary()), **_flat(run),
                                 "dead latents": f"{dead} of {len(records)}",
                                 "pages": len(self.pages)})
            + "<h2>Firing frequencies</h2>" + self.frequency_histogram(records)
            + f'<p class="note">{dead} dead latents (never fire) are left out of the histogram '
            "and marked <span class=badge>dead</span> in the table. Click a column header to "
            "sort; hover it for what the column measures. Type a latent id (or ids, "
            "comma-separated) or a piece of a token in the box to filter. The view is kept in "
            "the address (index.html#sort=freq,desc&amp;q=the&amp;page=2); latents with a page "
            "are linked. Values come from " + _esc(DEFINITIONS["selection"]) + ".</p>"
            + '<div class="controls"><input id="filter" type="search" placeholder="latent id or '
            'token, e.g. 977 or Paris"> <button id="prev">&larr; previous</button> '
            '<button id="next">next &rarr;</button> <span id="pageinfo"></span></div>'
            + '<table id="latents"><thead><tr>'
            + "".join(f'<th data-key="{key}" title="{_esc(tip)}"'
                      f'{" class=l" if digits == 0 else ""}>{label}</th>'
                      for key, label, _, digits, tip in COLUMNS)
            + "</tr></thead><tbody>\n" + rows + "</tbody></table>"
            + f"<script>{render.table_script(ROWS_PER_PAGE)}</script>"
        )
        return render.page(f"{self.name}: latents", body, _href(here, "style.css"))

    def pairing_note(self, here: str) -> str:
        """The near-identical warning and the link to the paired comparison, if compared."""
        if not self.pairing:
            return ""
        link = f'<a href="{_href(here, "compare.html")}">latents paired across the two SAEs</a>'
        return f"{_near_identical_banner(self.pairing)}<p>{link}</p>"

    def _index_row(self, r: dict[str, Any], here: str) -> str:
        label = str(r["latent"])
        if r["page"]:
            label = f'<a href="{r["page"]}">{label}</a>'
        if r["dead"]:
            label += ' <span class="badge">dead</span>'
        tds = "".join(f'<td data-v="{render.sort_value(r[name])}">{render.fmt(r[name], d)}</td>'
                      for _, _, name, d, _ in COLUMNS if d)
        token_cells = "".join(f'<td class="l">{_esc(" ".join(repr(t) for t in r[name]))}</td>'
                              for name in ("top_tokens", "promoted"))
        searched = "\n".join(t.replace("\n", "\u23ce") for t in r["top_tokens"] + r["promoted"])
        return (f'<tr{" class=dead" if r["dead"] else ""} data-latent="{r["latent"]}" '
                f'data-tokens="{_esc(searched)}"><td class="l" data-v="{r["latent"]}">'
                f'{label}</td>{tds}{token_cells}</tr>')

    def frequency_histogram(self, records: list[dict[str, Any]]) -> str:
        logs = [r["log10_frequency"] for r in records if not r["dead"]]
        if not logs:
            return "<p>every latent is dead</p>"
        low, high = math.floor(min(logs) * 4), math.floor(max(logs) * 4) + 1
        edges = [i / 4 for i in range(low, high + 1)]
        counts = [sum(a <= v < b for v in logs) for a, b in zip(edges, edges[1:])]
        return render.histogram_svg(counts, edges, "log10 firing frequency", width=560)

    def latent_html(self, latent: int, run: dict[str, Any]) -> str:
        here, r, d = self.page_path(latent), self.record(latent), self.details[latent]
        top_act = r["max_activation"] or 0.0
        parts = [
            f'<p><a href="{_href(here, self.index_path())}">&larr; all latents</a></p>',
            f"<h1>Latent {latent} of {_esc(self.name)}</h1>",
            render.key_values({
                "firings": f'{r["count"]} of {self.enc.rows} tokens',
                "density": f'{render.fmt(r["density_percent"])} %',
                "log10 frequency": render.fmt(r["log10_frequency"]),
                "mean |value * (d.g)| (nats)": render.fmt(r["mean_abs_loss_effect"]),
                "top activating tokens": " ".join(repr(t) for t in r["top_tokens"]),
                "mean / max activation": f'{render.fmt(r["mean_activation"])} / '
                f'{render.fmt(r["max_activation"])}',
                "typical activation (gradient-free)": render.fmt(r["typical_activation"]),
                "mean beta |d.g|": render.fmt(r["mean_effect"]),
                "share not selected by plain TopK": render.fmt(r["novel_share"]),
            }),
            "<h2>Activation histogram</h2>",
            render.histogram_svg(d["histogram"]["counts"], d["histogram"]["edges"],
                                 "activation (non-zero values)"),
            "<h2>Promoted and suppressed tokens</h2>",
            f'<p class="note">Direct path to the logits: {_esc(run["norm"])}; the layers after '
            "the hook are skipped. Values: logit change per unit of the direction.</p>",
            '<div class="cols">'
            + render.token_table("promoted", [t["token"] for t in d["promoted"]],
                                 [t["logit"] for t in d["promoted"]])
            + render.token_table("suppressed", [t["token"] for t in d["suppressed"]],
                                 [t["logit"] for t in d["suppressed"]]) + "</div>",
            self._neighbours_html(latent),
            self._steering_html(latent, d["steering"], self.steering_unit(latent))
            if self.steered
            else "<h2>Steering</h2><p>Not run (--continuation_tokens 0).</p>",
            "<h2>Top-activating contexts</h2>",
            '<p class="note">Hover a token for its activation and its first-order loss effect '
            "value * (d_i . g) (negative: the latent lowers the next-token loss). Grey tokens "
            "were not encoded.</p>",
            *[render.strip_html(s, top_act) for s in d["top"]],
            "<h2>Examples by activation quantile</h2>",
        ]
        for lo, hi, strips in d["bins"]:
            parts.append(f"<h3>activation {render.fmt(lo)} to {render.fmt(hi)}</h3>")
            parts.extend(render.strip_html(s, top_act) for s in strips)
        return render.page(f"latent {latent}", "\n".join(parts), _href(here, "style.css"))

    def _neighbours_html(self, latent: int) -> str:
        if self.partner is None:
            return ""
        here, rows = self.page_path(latent), []
        for j, cosine in self.neighbours.get(latent, []):
            label = str(j)
            if j in self.partner.pages:
                label = f'<a href="{_href(here, self.partner.page_path(j))}">{j}</a>'
            rows.append(f'<tr><td class="l">{label}</td><td>{cosine:.3f}</td></tr>')
        return (f"<h2>Nearest latents in {_esc(self.partner.name)}</h2><table><tr><th "
                f'class="l">latent</th><th>decoder cosine</th></tr>{"".join(rows)}</table>')

    def _steering_html(self, latent: int, steering: list[dict[str, Any]],
                       unit: tuple[float, str]) -> str:
        if not steering and self.steer_only is not None and latent not in self.steer_only:
            return ("<h2>Steering</h2><p>Not run: with --compare, continuations are made for "
                    "the inspected SAE's pages and their partners (best match by decoder "
                    "cosine) here; this latent is a further neighbour.</p>")
        if not steering:
            return ("<h2>Steering</h2><p>None: the latent never fired, so it has no typical "
                    "activation to steer with.</p>")
        rows = "".join(
            f'<tr><td class="l">{_esc(p["prompt"])}</td><td>{c["multiple"]:g}x</td>'
            f'<td>{c["alpha"]:.3g}</td><td class="l">{_esc(repr(c["text"]))}</td></tr>'
            for p in steering for c in p["continuations"])
        return ("<h2>Steering</h2><p class=note>Greedy continuations with alpha * d_i added at "
                f"the hook from position skip_first on; alpha = multiple x {unit[0]:.4g}, the "
                f"{unit[1]}.</p>"
                '<table><tr><th class="l">prompt</th><th>multiple</th><th>alpha</th>'
                f'<th class="l">continuation</th></tr>{rows}</table>')


# Pairs across the two SAEs --------------------------------------------------------------------

PAIR_COLUMNS = (
    ("latent", "latent", "A latent of the inspected SAE (linked where it has a page)."),
    ("partner", "partner", "Its partner: the compared SAE's latent with the largest decoder "
     "cosine (linked where it has a page)."),
    ("cosine", "decoder cosine", "Cosine of the two unit decoder directions (-1 to 1)."),
    ("mutual", "mutual", "1 when each is the other's best match by decoder cosine, else 0."),
    ("density", "density % A / B", "Firing density in percent of the encoded tokens, "
     "inspected / compared SAE, each with its own training-time selection."),
    ("ddensity", "\u0394 density (pp)", "Density of the inspected latent minus its partner's, "
     "in percentage points of the encoded tokens."),
    ("effect", "mean |effect| A / B", "Mean |value * (d_i . g)| over the tokens where each "
     "fires: the first-order effect on the summed next-token loss, in nats."),
    ("deffect", "\u0394 mean |effect|", "Mean |effect| of the inspected latent minus its "
     "partner's, in nats."),
    ("overlap", "token overlap", "Jaccard overlap (0 to 1) of the two latents' top "
     "activating tokens."),
    ("tokens", "top activating tokens A | B", "Each latent's tokens of largest summed "
     "activation over the encoded tokens."),
)


def compare_sites(main: Site, other: Site, folder: Path) -> None:
    """Pair every latent of `main` with one of `other` (`pairs.pair_latents`), keep the pairs
    for latents.json and the index pages, and write compare.html."""
    found = pair_latents(main.sae.W_dec.detach().cpu(), other.sae.W_dec.detach().cpu())
    records = pair_records(found, main.records(), other.records())
    summary = {"rule": PAIRING_RULE, "compared": other.name,
               "median_cosine": found.cosine.median().item(),
               "mutual_share": found.mutual.double().mean().item(),
               "near_cosine": NEAR_COSINE, "near_share": found.near_share(),
               "near_identical": found.near_identical()}
    main.pairing, other.pairing = {**summary, "pairs": records}, summary
    (folder / "compare.html").write_text(_compare_html(main, other, records, summary))


PAIRING_RULE = ("each latent of the inspected SAE is paired with the compared SAE's latent of "
                "largest decoder cosine; mutual: each is the other's best match")


def _near_identical_banner(summary: dict[str, Any]) -> str:
    share = f'{100 * summary["near_share"]:.1f}%'
    if summary["near_identical"]:
        return (f'<p class="banner"><b>The two SAEs are near-identical:</b> {share} of the '
                f'latents have a partner at decoder cosine &ge; {summary["near_cosine"]} '
                f'(median {summary["median_cosine"]:.4f}). Differences between paired latents '
                "come from how they select tokens, not from different directions.</p>")
    return (f'<p class="note">{share} of the latents have a partner at decoder cosine &ge; '
            f'{summary["near_cosine"]} (median {summary["median_cosine"]:.3f}).</p>')


def _compare_html(main: Site, other: Site, records: list[dict[str, Any]],
                  summary: dict[str, Any]) -> str:
    rows = "\n".join(_pair_row(main, other, r) for r in records)
    body = (
        f"<h1>{_esc(main.name)} against {_esc(other.name)}</h1>"
        + _near_identical_banner(summary)
        + f'<p><a href="index.html">inspected SAE</a> | <a href="{other.index_path()}">'
        f'compared SAE</a></p><p class="note">Pairing: {_esc(PAIRING_RULE)}. '
        f'{100 * summary["mutual_share"]:.1f}% of the pairs are mutual. A is the inspected '
        "SAE, B the compared one. Sort by a header; filter by latent id or token.</p>"
        + '<div class="controls"><input id="filter" type="search" placeholder="latent id or '
        'token"> <button id="prev">&larr; previous</button> <button id="next">next &rarr;'
        '</button> <span id="pageinfo"></span></div><table id="latents"><thead><tr>'
        + "".join(f'<th data-key="{key}" title="{_esc(tip)}"'
                  f'{" class=l" if key in ("latent", "tokens") else ""}>{label}</th>'
                  for key, label, tip in PAIR_COLUMNS)
        + "</tr></thead><tbody>\n" + rows + "</tbody></table>"
        + f"<script>{render.table_script(ROWS_PER_PAGE)}</script>")
    return render.page(f"{main.name} against {other.name}", body, "style.css")


def _pair_row(main: Site, other: Site, r: dict[str, Any]) -> str:
    i, j = r["latent"], r["partner"]
    a = f'<a href="{main.page_path(i)}">{i}</a>' if i in main.details else str(i)
    b = f'<a href="{other.page_path(j)}">{j}</a>' if j in other.details else str(j)
    density, effect = r["density_percent"], r["mean_abs_loss_effect"]
    cells = [(r["cosine"], f'{r["cosine"]:.4f}'), (int(r["mutual"]), "yes" if r["mutual"] else ""),
             (density[0], f"{render.fmt(density[0])} / {render.fmt(density[1])}"),
             (r["density_percent_difference"], render.fmt(r["density_percent_difference"])),
             (effect[0], f"{render.fmt(effect[0])} / {render.fmt(effect[1])}"),
             (r["mean_abs_loss_effect_difference"],
              render.fmt(r["mean_abs_loss_effect_difference"])),
             (r["token_overlap"], render.fmt(r["token_overlap"]))]
    tds = "".join(f'<td data-v="{render.sort_value(v)}">{shown}</td>' for v, shown in cells)
    tokens = [" ".join(repr(t) for t in side) for side in r["top_tokens"]]
    searched = "\n".join(t.replace("\n", "\u23ce") for t in sum(r["top_tokens"], []))
    return (f'<tr data-latent="{i}" data-tokens="{_esc(searched)}"><td class="l" '
            f'data-v="{i}">{a}</td><td data-v="{j}">{b}</td>{tds}<td class="l">'
            f"{_esc(tokens[0])} | {_esc(tokens[1])}</td></tr>")


def steer_pages(sites: list[Site], model: nn.Module, tokenizer: Any, new_tokens: int) -> None:
    """Greedy continuations for the latents `Site.to_steer` picks, in one batch per prompt for
    all sites that share a hook (a decoding step's cost is mostly fixed, not per row)."""
    if not new_tokens:
        return
    groups: dict[tuple[str, int], list[Site]] = {}
    for site in sites:
        groups.setdefault((site.hook_name, site.rec.skip_first), []).append(site)
    for (_, skip_first), members in groups.items():
        units = {(s, i): unit for s, site in enumerate(members)
                 for i, unit in site.to_steer().items()}
        directions = {(s, i): members[s].sae.W_dec.detach().float()[i] for s, i in units}
        steering = continuations(model, members[0].module, tokenizer, directions, units,
                                 skip_first, new_tokens)
        for (s, i), rows in steering.items():
            members[s].details[i]["steering"] = rows


def _check_same_model(a: Recorded, b: Recorded, names: tuple[str, str]) -> None:
    """Refuse two SAEs whose recorded model fingerprints differ."""
    prints = [rec.model.get("fingerprint") for rec in (a, b)]
    if None not in prints and prints[0] != prints[1]:
        raise GsaeError(f"{names[1]} was trained on another model than {names[0]} (their "
                        "recorded model fingerprints differ): compare SAEs of one model")


def link_neighbours(main: Site, other: Site, count: int) -> None:
    """Nearest latents by decoder cosine, both ways; the other SAE gets pages for the nearest
    latents of every paged latent of the main one."""
    main.partner, other.partner = other, main
    a = torch.nn.functional.normalize(main.sae.W_dec.detach().float().cpu(), dim=1)
    b = torch.nn.functional.normalize(other.sae.W_dec.detach().float().cpu(), dim=1)
    main.neighbours = _nearest(a[main.pages], b, count, main.pages)
    other.pages = sorted({j for near in main.neighbours.values() for j, _ in near})
    other.steer_only = {near[0][0] for near in main.neighbours.values() if near}
    other.neighbours = _nearest(b[other.pages], a, count, other.pages)


def _nearest(rows: Tensor, against: Tensor, count: int, latents: list[int]
             ) -> dict[int, list[tuple[int, float]]]:
    if not latents:
        return {}
    cos = rows @ against.T
    top = cos.topk(min(count, against.shape[0]), dim=1)
    return {latent: list(zip(top.indices[r].tolist(), top.values[r].tolist()))
            for r, latent in enumerate(latents)}


# Helpers --------------------------------------------------------------------------------------


def _token_list(ids: Tensor, values: Tensor, spell: Speller) -> list[dict[str, Any]]:
    return [{"id": int(i), "token": spell(int(i)), "logit": float(v)} for i, v in zip(ids, values)]


def _href(from_page: str, to: str) -> str:
    return posixpath.relpath(to, posixpath.dirname(from_page) or ".")


def _esc(text: str) -> str:
    return render.escape(str(text))


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not isinstance(v, (dict, list))}


def write_json(path: Path, obj: Any) -> None:
    """Compact JSON: without `indent`, json uses its C encoder (several times faster on the
    index of a large SAE)."""
    path.write_text(json.dumps(_json_safe(obj), allow_nan=False, separators=(",", ":")) + "\n")


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# Files that mark what gsae writes besides a site: an SAE, a training run, a store.
NOT_A_SITE = ("cfg.json", "run.json", "manifest.json", "identity.json")


def _check_out(out: Path, overwrite: bool, read: list[Path] | None = None) -> None:
    """Refuse, before any work, an output folder that holds files (a site or anything else)
    unless `overwrite`; even then, one that holds a folder in `read` (the SAEs inspected) or
    anything gsae writes that is not a site (an SAE, a run, a store) is never replaced."""
    if out.exists() and not out.is_dir():
        raise GsaeError(f"--out {out} is a file: give a folder")
    held = next((f for f in read or [] if holds_folder(out, f)), None)
    if held is not None:
        raise GsaeError(f"--out {out} holds the SAE {held} that is inspected: write the site "
                        "into another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GsaeError(f"{out} is not empty: choose a new --out folder, or pass --overwrite to "
                        "replace it and everything in it")
    other = next((p for p in out.rglob("*") if p.name in NOT_A_SITE), None) \
        if out.is_dir() else None
    if other is not None:
        raise GsaeError(f"--out {out} holds {other.relative_to(out)}, a file of an SAE, a run "
                        "or a store, not of a site: --overwrite replaces only a site, so "
                        "choose another --out")


@contextmanager
def _site_folder(out: Path) -> Iterator[Path]:
    """A fresh folder to build the site in, which replaces `out` whole only when it is
    complete: an interrupted run leaves `out` as it was."""
    with atomic_output(out, replace=True) as tmp:
        tmp.mkdir()
        (tmp / "style.css").write_text(render.STYLE)
        yield tmp

