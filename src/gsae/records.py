"""Every typed, versioned result gsae writes as JSON, on one base class, `Record`.

Naming: `<What>Result` is a command's whole output, the unit that carries a schema version
("gsae.<what>/<n>") and is written as one JSON file (`EvalResult`, `SteerResult`,
`ComparisonResult`, `ScalingResult`); `<What>RunInfo` is a result's "run" block (what it ran on
and how); `<What>Record` is one row of its "results" (one SAE, in one inference mode).
`StudyResult` holds the fields every study result records first.

`Record.to_json()` is the JSON layout: a result's "schema" first, then the fields in order,
nested records as their own JSON. `Record.from_json(d)` reads it back: a result of an older
schema is first mapped onto the current layout (`upgrade`, per class; the input is not
changed), keys that name no field are ignored (a report's aggregates), fields with defaults may
be missing, and anything else that is missing gives a one-line GsaeError. The records are pure
data: this module imports nothing of torch, models or the study.
"""

from __future__ import annotations

import copy
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from gsae.errors import GsaeError

FULL_FORWARD = "full"  # gsae.hooks.FULL: the path every patched pass of a /1 result took
R = TypeVar("R", bound="Record")


@dataclass
class Record:
    """Base of every typed record: JSON out (`to_json`) and in (`from_json`), with the schema
    version and the migration of older versions for the records that are whole results."""

    SCHEMA: ClassVar[str | None] = None  # a whole result's schema; None for its parts
    OLD_SCHEMAS: ClassVar[tuple[str, ...]] = ()  # older schemas still read, through `upgrade`
    UNMARKED: ClassVar[str | None] = None  # what a dict without "schema" is read as (None: refused)
    OMIT_NONE: ClassVar[tuple[str, ...]] = ()  # fields left out of the JSON while None
    NOT_SAVED: ClassVar[tuple[str, ...]] = ()  # fields never written to the JSON
    KIND: ClassVar[str] = "record"  # what it is, in messages

    @property
    def schema(self) -> str | None:
        return self.SCHEMA

    def to_json(self) -> dict[str, Any]:
        """The JSON layout: "schema" first (whole results), then every field in order."""
        data = {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                if not (f.name in self.OMIT_NONE and getattr(self, f.name) is None)
                and f.name not in self.NOT_SAVED}
        return {"schema": self.SCHEMA, **data} if self.SCHEMA else data

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        """The record from its JSON of any readable schema (see the module docstring)."""
        data = cls.current(data) if cls.SCHEMA else data
        hints = typing.get_type_hints(cls)
        missing = [f.name for f in fields(cls) if f.name not in data and not _has_default(f)]
        if missing:
            raise GsaeError(f"not a gsae {cls.KIND}: it lacks {', '.join(missing)}")
        return cls(**{f.name: _typed(hints[f.name], data[f.name])
                      for f in fields(cls) if f.name in data})

    @classmethod
    def current(cls, data: dict[str, Any]) -> dict[str, Any]:
        """`data` in the layout of the current schema (a new dict; the input is not changed),
        with the fields added within it at their defaults (but those of OMIT_NONE that default
        to None, which stay left out); GsaeError if its schema is not readable."""
        found = data.get("schema", cls.UNMARKED)
        readable = (*cls.OLD_SCHEMAS, cls.SCHEMA)
        if found not in readable:
            raise GsaeError(f"not a gsae {cls.KIND} (schema {found!r}; readable: "
                            f"{', '.join(map(str, readable))})")
        if found != cls.SCHEMA:
            data = cls.upgrade(copy.deepcopy(data), found)
        defaults = {f.name: _default(f) for f in fields(cls) if _has_default(f)}
        return {**{k: v for k, v in defaults.items()  # as to_json leaves them out
                   if not (k in cls.OMIT_NONE and v is None)}, **data}

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        """Map a result of the older `schema` (a copy, free to change) onto the current layout."""
        return data


def _plain(value: Any) -> Any:
    """A field's JSON value: records as their JSON, containers walked, the rest copied."""
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def _typed(kind: Any, value: Any) -> Any:
    """A field's value read from JSON: a record type (or a list of one) read as that record."""
    if isinstance(kind, type) and issubclass(kind, Record):
        return kind.from_json(value)
    args = typing.get_args(kind)
    if typing.get_origin(kind) is list and isinstance(args[0], type) and \
            issubclass(args[0], Record):
        return [args[0].from_json(v) for v in value]
    return value


def _has_default(f: Field) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


# gsae eval --------------------------------------------------------------------------------------


@dataclass
class EvalRunInfo(Record):
    """What an evaluation ran on and how (the "run" block of an `EvalResult`)."""

    KIND: ClassVar[str] = "evaluation run"

    model: dict[str, Any]
    corpus: dict[str, Any] | None
    part: str
    contexts: int
    context_size: int
    context_tokens: int
    eval_tokens: int
    pool_tokens: int
    seed: int
    batch_size: int
    skip_first: int
    outlier_factor: float
    positions: dict[str, str]
    gradient: str
    model_dtype: str
    device: str
    versions: dict[str, str]
    seconds: float
    # per hook point: "above-hook" (patched passes ran the blocks above the hook only) or "full"
    forward: dict[str, str] = field(default_factory=dict)


@dataclass
class EvalRecord(Record):
    """The numbers of one SAE in one inference mode (None: undefined, e.g. a 0/0 ratio)."""

    KIND: ClassVar[str] = "evaluation record"

    sae: str
    hook: str
    mode: str
    k: int
    beta: float
    value_mode: str
    n_latents: int
    d_in: int
    tokens: int
    outlier_tokens: int
    ce_tokens: int
    l0: float | None
    mse: float | None
    fvu: float | None
    explained_variance: float | None
    cosine: float | None
    l2_ratio: float | None
    ce_clean: float | None
    ce_spliced: float | None
    ce_increase: float | None
    ce_zero_ablation: float | None
    ce_mean_ablation: float | None
    ce_recovered_zero: float | None
    ce_recovered_mean: float | None
    kl: float | None
    first_order_abs: float | None
    first_order_ce_change: float | None
    first_order_correlation: float | None
    dead_latents: int
    dead_fraction: float
    dead_window_tokens: int
    firing_histogram: dict[str, Any]


@dataclass
class CoreRecord(Record):
    """What SAEBench's core evaluation reports beyond an `EvalRecord`, for one SAE in one
    inference mode, on the same rows and CE positions (`gsae.saebench` writes it;
    docs/evaluation.md defines it; None: undefined). Not part of the gsae.eval JSON."""

    sae: str
    mode: str
    ce_zero_all: float | None  # mean CE over the CE positions, the hook zeroed at every position
    kl_zero_all: float | None  # mean KL(clean || that model) over the CE positions
    l1: float | None  # mean over rows of the sum of the selected values (all >= 0)
    l2_norm_in: float | None  # mean over rows of ||x_i||
    l2_norm_out: float | None  # mean over rows of ||x_hat_i||
    relative_reconstruction_bias: float | None  # sum_i ||x_hat_i||^2 / sum_i x_i . x_hat_i
    # mean over rows of 1 - ||x_i - x_hat_i||^2 / ||x_i - m||^2, m the mean of the batch's rows
    explained_variance_legacy: float | None
    fired: list[int]  # per latent: rows where it was selected with a value > 0
    contexts_fired: list[int]  # per latent: contexts with at least one such row



@dataclass
class EvalResult(Record):
    """An evaluation (schema gsae.eval/2, the README defines it): the run info and one record
    per SAE per inference mode. A dict without a schema (a comparison's "eval" block) is read
    as /1."""

    SCHEMA: ClassVar[str | None] = "gsae.eval/2"
    OLD_SCHEMAS: ClassVar[tuple[str, ...]] = ("gsae.eval/1",)
    UNMARKED: ClassVar[str | None] = "gsae.eval/1"
    KIND: ClassVar[str] = "evaluation result"
    NOT_SAVED: ClassVar[tuple[str, ...]] = ("core",)

    run: EvalRunInfo
    results: list[EvalRecord]
    # with `core=True`: one `CoreRecord` per SAE per mode, for `gsae.saebench` (not saved here)
    core: list[CoreRecord] = field(default_factory=list)

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        """/1 runs all ran the full forward."""
        return _with_full_forward(data)


def _with_full_forward(data: dict[str, Any]) -> dict[str, Any]:
    """A /1 eval or steer result whose run info records the full forward at each hook."""
    data["run"].setdefault("forward", {r["hook"]: FULL_FORWARD for r in data["results"]})
    return data


# gsae steer -------------------------------------------------------------------------------------


@dataclass
class SteerRunInfo(Record):
    """What a steering run ran on and how (the "run" block of a `SteerResult`)."""

    KIND: ClassVar[str] = "steering run"

    model: dict[str, Any]
    corpus: dict[str, Any] | None
    part: str
    pool_contexts: int
    context_size: int
    contexts_a: list[int]
    contexts_b: list[int]
    settings: dict[str, Any]  # the SteerConfig
    protocol: dict[str, str]
    model_dtype: str
    device: str
    versions: dict[str, str]
    seconds: float
    # per hook point: "above-hook" (steered passes ran the blocks above the hook only) or "full"
    forward: dict[str, str] = field(default_factory=dict)


@dataclass
class SteerRecord(Record):
    """One SAE's steering: a summary per strength, and per sampled latent and strength its
    record (`latents`; a comparison's compact records hold `values` instead)."""

    OMIT_NONE: ClassVar[tuple[str, ...]] = ("latents", "values")
    KIND: ClassVar[str] = "steering record"

    sae: str
    hook: str
    k: int
    beta: float
    value_mode: str
    n_latents: int
    d_in: int
    pool_tokens: int
    live_latents: int
    sampled_latents: int
    median_x_norm: float
    summary: list[dict[str, Any]]
    latents: list[dict[str, Any]] | None = None
    values: list[dict[str, Any]] | None = None


@dataclass
class SteerResult(Record):
    """A steering run (schema gsae.steer/2, the README defines it): the run info and one
    record per SAE. A dict without a schema (a comparison's "steer" block) is read as /1."""

    SCHEMA: ClassVar[str | None] = "gsae.steer/2"
    OLD_SCHEMAS: ClassVar[tuple[str, ...]] = ("gsae.steer/1",)
    UNMARKED: ClassVar[str | None] = "gsae.steer/1"
    KIND: ClassVar[str] = "steering result"

    run: SteerRunInfo
    results: list[SteerRecord]

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        """/1 settings lose their steer_ prefix; /1 runs all ran the full forward."""
        run = data["run"]
        run["settings"] = {k.removeprefix("steer_"): v for k, v in run["settings"].items()}
        return _with_full_forward(data)


# The studies ------------------------------------------------------------------------------------


@dataclass
class StudyResult(Record):
    """What every study result records first: the command, when, with which versions, on
    which machine and how long, on which model and hook."""

    command: str
    created: str
    versions: dict[str, str]
    machine: dict[str, Any]
    wall_seconds: float
    stage_seconds: dict[str, float]
    model: dict[str, Any]
    hook: str


@dataclass
class ComparisonResult(StudyResult):
    """What `gsae compare` measured (schema gsae.compare/2): the run's settings, its SAEs,
    their evaluation and steering records, and where and how long it ran. `to_json` is the
    layout of results.json before the report adds its aggregates and claims (which
    `from_json` leaves out)."""

    SCHEMA: ClassVar[str | None] = "gsae.compare/2"
    OLD_SCHEMAS: ClassVar[tuple[str, ...]] = ("gsae.compare/1",)
    KIND: ClassVar[str] = "compare result"

    store_tokens: int
    settings: dict[str, Any]  # the config tree of the run, section by section
    saes: list[dict[str, Any]]  # name, folder, k, beta, value_mode, seed, n_latents, train
    eval: dict[str, Any]  # {"run": the evaluation's run info, "results": its records}
    steer: dict[str, Any]  # {"run": ..., "results": compact steering records}

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        """/1 onto /2: the grid moves from the "compare" settings to "sae", the settings compare
        re-declared move to their sections, and the steering, shuffle-seed and SAE-device
        fields lose their old names."""
        s = data["settings"]
        cmp = s["compare"]
        s["sae"] = {"k": cmp.pop("k"), "beta": cmp.pop("beta"),
                    "value_mode": cmp.pop("value_mode"), "seed": cmp.pop("seed"),
                    "expansion_factor": [cmp.pop("expansion_factor")], "n_latents": [0]}
        for name in ("tokens", "batch_tokens", "lr", "dead_tokens"):
            cmp.pop(name, None)
        s["eval"]["eval_tokens"] = cmp.pop("eval_tokens", s["eval"]["eval_tokens"])
        s["steer"] = {k.removeprefix("steer_"): v for k, v in s["steer"].items()}
        renamed = {"data_seed": "shuffle_seed", "sae_device": "device"}
        s["train"] = {renamed.get(k, k): v for k, v in s["train"].items()}
        data["schema"] = cls.SCHEMA
        return data


@dataclass
class ScalingResult(StudyResult):
    """What `gsae study` measured (schema gsae.scaling/2): settings, store check, SAEs with
    their snapshots, evaluation records per corpus ("train": the training corpus's held-out
    split; then each unseen corpus by its name) and steering at the last snapshot. Every
    evaluation and steering record carries "variant" (the SAE) and "snapshot" (its requested
    token count). `distances` and `per_token` were added within /2 (empty when missing), then
    `fisher_sweep` and `cost` (left out when not measured)."""

    SCHEMA: ClassVar[str | None] = "gsae.scaling/2"
    OLD_SCHEMAS: ClassVar[tuple[str, ...]] = ("gsae.scaling/1",)
    KIND: ClassVar[str] = "study result"
    OMIT_NONE: ClassVar[tuple[str, ...]] = ("fisher_sweep", "cost")  # results without them

    store: dict[str, Any]  # folder, rows, repeated_rows, passes
    corpora: dict[str, Any]  # "train" / each unseen name: name, part, corpus identity
    settings: dict[str, Any]
    saes: list[dict[str, Any]]  # as in compare, plus extra_k and snapshots
    eval: dict[str, Any]  # corpus key -> {"run": ..., "results": [...]}
    steer: dict[str, Any]
    # per corpus: the unigram KL of its evaluated tokens to the training split's
    distances: dict[str, Any] = field(default_factory=dict)
    # per corpus: the last snapshots' CE increase by quantile bins of clean CE and |g|
    per_token: dict[str, Any] = field(default_factory=dict)
    # the Fisher sweep that chose lambda (validation part, lambdas, chosen); None: none
    fisher_sweep: dict[str, Any] | None = None
    # seconds of one training step per variant, measured side by side; None: not measured
    cost: dict[str, Any] | None = None

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        """/1 onto /2: the corpus key "unseen" becomes the unseen corpus's name."""
        name = data["corpora"]["unseen"]["name"]
        for section in ("corpora", "eval", "verdicts"):
            if "unseen" in data.get(section, {}):
                data[section] = {name if k == "unseen" else k: v
                                 for k, v in data[section].items()}
        data["schema"] = cls.SCHEMA
        return data
