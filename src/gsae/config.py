"""One config tree: nested dataclasses are the single source of every setting and default.

A command's settings are a dataclass whose fields are sections (themselves dataclasses, such as
`ModelConfig` or `TrainConfig`) and, for commands that take SAE folders, a positional list.
From that tree this module makes the command line and reads and writes config files:

- every field gets the flag `--section.field`; it also gets the short flag `--field` unless an
  earlier section of the same command already has a field of that name (first section wins);
- a field's `metadata` holds its help text and bounds (`min`, `above`, `max`, `below`,
  `choices`; a list must hold a value unless `may_be_empty`), `identity: False` for settings
  that say where or how a
  run executes rather than what it computes (output folder, device, resume), and
  `omit_at_default: True` for settings added after runs were recorded, whose default is what
  those runs did: at the default they are left out of identities and records, so those runs
  are still the same runs;
- a sweep section (`sweep_of(SAEConfig)`) has the same fields as lists: each flag takes a
  comma-separated list of values;
- a config file (JSON, or YAML when PyYAML is installed) holds the same tree, e.g.
  `{"model": {...}, "train": {"tokens": 500000}}`; flags given on the command line override it;
- `validate(tree)` is the one check of settings, whether they came from flags, a file or Python:
  `build` calls it, and so does every pipeline entry point. It checks each setting's type and
  bounds, then calls the `check()` method that a section or the tree may define for rules
  between its settings (a sweep section: the swept class's, for every combination).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, fields
from pathlib import Path
from typing import Any

from gsae.errors import GsaeError

SWEEP_MARK = "__sweep_of__"
# Top-level keys of a config file that are records, not settings (run.json keeps them).
RECORD_KEYS = ("command", "recorded", "schema")
INT64 = (-(2**63), 2**63 - 1)  # whole numbers end up in torch generators and tensors


# ---------------------------------------------------------------------------- field kinds


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_section(kind: Any) -> bool:
    return dataclasses.is_dataclass(kind) and isinstance(kind, type)


def _scalar_kind(kind: Any) -> Any:
    """`str | None` is read as str; list[T] as T."""
    if typing.get_origin(kind) is list:
        kind = typing.get_args(kind)[0]
    options = [k for k in typing.get_args(kind) if k is not type(None)]
    return options[0] if options else kind


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]


# -------------------------------------------------------------------------------- parsing


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


PARSERS: dict[Any, Callable[[str], Any]] = {
    bool: parse_bool, int: parse_int, float: parse_float, str: str,
}


def comma_list(parse: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """A parser of comma-separated values, each read by `parse`."""

    def parse_list(text: str) -> list[Any]:
        values = [parse(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values

    return parse_list


# ------------------------------------------------------------------------------ the tree


def sweep_of(cls: type) -> type:
    """A dataclass with the fields of `cls` as lists (default: a list of the one default):
    one value of each field per SAE, every combination trained."""
    hints = _hints(cls)
    specs = []
    for f in fields(cls):
        default = _default(f)
        specs.append((f.name, list[hints[f.name]],  # type: ignore[index]
                      dataclasses.field(default_factory=lambda d=default: [d],
                                        metadata=f.metadata)))
    sweep = dataclasses.make_dataclass(f"{cls.__name__}Sweep", specs)
    sweep.__doc__ = f"{(cls.__doc__ or '').strip().splitlines()[0]} Every field lists values."
    sweep.__module__ = cls.__module__
    setattr(sweep, SWEEP_MARK, cls)
    return sweep


def sweep_configs(sweep: Any) -> list[Any]:
    """One config of the swept class per combination of the listed values, in product order."""
    import itertools

    cls = getattr(type(sweep), SWEEP_MARK)
    names = [f.name for f in fields(cls)]
    values = [getattr(sweep, n) for n in names]
    return [cls(**dict(zip(names, combo))) for combo in itertools.product(*values)]


@dataclass(frozen=True)
class Setting:
    """One leaf of a command's tree: where it sits, its flags and how to read it."""

    section: str  # "" for a top-level field (e.g. the positional SAE folders)
    name: str
    field: Field
    kind: Any
    swept: bool

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    @property
    def positional(self) -> bool:
        return bool(self.field.metadata.get("positional"))


def settings(tree_cls: type) -> Iterator[Setting]:
    """Every leaf setting of a command's tree, sections in field order."""
    hints = _hints(tree_cls)
    for f in fields(tree_cls):
        kind = hints[f.name]
        if not is_section(kind):
            yield Setting("", f.name, f, kind, False)
            continue
        inner = _hints(kind)
        for g in fields(kind):
            yield Setting(f.name, g.name, g, inner[g.name], hasattr(kind, SWEEP_MARK))


# --------------------------------------------------------------------------- the command line


# Flags of earlier versions and what replaced them (docs/cli.md lists them too).
RENAMED_FLAGS = {
    "sae_device": "--train.device", "data_seed": "--shuffle_seed", "store_dtype": "--store.dtype",
    **{f"steer_{name}": f"--{name}" for name in ("latents", "alphas", "contexts", "pool",
                                                 "top_tokens")},
    **{f"steer_{name}": f"--{name} (gsae steer) or --steer.{name} (gsae compare)"
       for name in ("seed", "batch_size")},
    "steer_context_size": "--steer.context_size",
}


def renamed_hint(words: typing.Iterable[str]) -> str:
    """"; --old is now --new" for each renamed flag among `words` (flags or setting names)."""
    hints = []
    for word in words:
        name = word.lstrip("-").split("=", 1)[0].rsplit(".", 1)[-1]
        if name in RENAMED_FLAGS:
            hints.append(f"--{name} is now {RENAMED_FLAGS[name]}")
    return "".join(f"; {hint}" for hint in dict.fromkeys(hints))


class OneLineParser(argparse.ArgumentParser):
    """Bad flags give one line (what was wrong, where help is, the new name of a renamed
    flag), not the usage block."""

    def error(self, message: str) -> typing.NoReturn:
        hint = renamed_hint(message.split()) if "unrecognized arguments" in message else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")


def add_arguments(parser: argparse.ArgumentParser, tree_cls: type) -> None:
    """One flag per setting of `tree_cls` (see the module docstring), plus `--config FILE`.
    Nothing given is set in the namespace (argparse.SUPPRESS): `explicit_settings` reads what
    the user typed, and the tree's own defaults fill the rest."""
    defaults = tree_cls()
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="read settings from this JSON or YAML file (such as a run's "
                        "run.json); flags given here override it")
    groups: dict[str, Any] = {}
    names = flag_names(tree_cls)
    for s in settings(tree_cls):
        if s.positional:
            parser.add_argument(s.name, nargs=s.field.metadata.get("nargs", "+"),
                                metavar=s.field.metadata.get("metavar"),
                                help=s.field.metadata.get("help"))
            continue
        group = groups.get(s.section) if s.section else parser
        if group is None:
            doc = (type(getattr(defaults, s.section)).__doc__ or "").strip().splitlines()[0]
            group = groups[s.section] = parser.add_argument_group(s.section, doc)
        flags = list(dict.fromkeys([names[s.key], f"--{s.key}"]))
        value = getattr(getattr(defaults, s.section), s.name) if s.section else _default(s.field)
        help_text = f"{s.field.metadata.get('help', '')} (default: {_show(value)})"
        group.add_argument(*flags, dest=s.key, default=argparse.SUPPRESS, help=help_text,
                           **_argument_kind(s))


def flag_names(tree_cls: type) -> dict[str, str]:
    """The shortest flag of every setting, by dotted key: `--field` for the first section that
    has that field name, `--section.field` for the others."""
    taken = {"config", "help"}
    names = {}
    for s in settings(tree_cls):
        short = s.name not in taken
        taken.add(s.name)
        names[s.key] = f"--{s.name}" if short or not s.section else f"--{s.key}"
    return names


def _argument_kind(s: Setting) -> dict[str, Any]:
    scalar = PARSERS.get(_scalar_kind(s.kind), str)
    if s.swept:
        return {"type": comma_list(scalar), "metavar": "V[,V...]"}
    metavar = s.name.upper()
    if typing.get_origin(s.kind) is list:
        return {"type": scalar, "metavar": metavar,
                "nargs": "*" if s.field.metadata.get("may_be_empty") else "+"}
    if scalar is parse_bool:
        return {"type": parse_bool, "nargs": "?", "const": True, "metavar": "BOOL"}
    return {"type": scalar, "metavar": metavar}


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def explicit_settings(args: argparse.Namespace, tree_cls: type) -> dict[str, Any]:
    """The settings the user gave on the command line, by dotted key."""
    given = vars(args)
    return {s.key: given[s.key] for s in settings(tree_cls) if s.key in given}


# ------------------------------------------------------------------------- building trees


def build(tree_cls: type, base: Mapping[str, Any] | None = None,
          explicit: Mapping[str, Any] | None = None, where: str = "the command line") -> Any:
    """The tree `tree_cls` from its defaults, then `base` (a nested dict, e.g. a config file),
    then `explicit` (dotted keys, e.g. flags); every setting is type- and bounds-checked."""
    tree = tree_cls()
    for key, value in _flatten(base or {}, tree_cls, "the config file"):
        assign(tree, key, value, "the config file")
    for key, value in (explicit or {}).items():
        assign(tree, key, value, where)
    validate(tree)
    return tree


def assign(tree: Any, key: str, value: Any, where: str = "") -> None:
    """Set the dotted setting `key` of `tree`, coercing JSON values to the field's type."""
    by_key = {s.key: s for s in settings(type(tree))}
    if key not in by_key:
        known = ", ".join(sorted(by_key))
        raise GsaeError(f"unknown setting {key!r} in {where}{renamed_hint([key])}; known "
                        f"settings: {known}")
    s = by_key[key]
    target = getattr(tree, s.section) if s.section else tree
    setattr(target, s.name, _coerce(value, s, where))


def _flatten(data: Mapping[str, Any], tree_cls: type, where: str) -> Iterator[tuple[str, Any]]:
    sections = {f.name for f in fields(tree_cls) if is_section(_hints(tree_cls)[f.name])}
    for name, value in data.items():
        if name in RECORD_KEYS:
            continue
        if name in sections:
            if not isinstance(value, Mapping):
                raise GsaeError(f"{where}: section {name!r} must be an object of settings")
            yield from ((f"{name}.{k}", v) for k, v in value.items())
        else:
            yield name, value


def _coerce(value: Any, s: Setting, where: str) -> Any:
    listed = s.swept or typing.get_origin(s.kind) is list
    if listed:
        items = value if isinstance(value, list) else [value]
        return [_coerce_scalar(v, s, where) for v in items]
    return _coerce_scalar(value, s, where)


def _coerce_scalar(value: Any, s: Setting, where: str) -> Any:
    kind = _scalar_kind(s.kind)
    optional = type(None) in typing.get_args(s.kind)
    if value is None and optional:
        return None
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) or (
        kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise GsaeError(f"--{s.key} in {where} must be {kind.__name__}, got {_brief(value)}")
    return float(value) if kind is float else value


# ---------------------------------------------------------------------------- validation


def validate(tree: Any) -> None:
    """Raise a one-line GsaeError for the first setting of `tree` that cannot run: the same
    error whether the settings came from flags, a file or Python. First every setting's type
    and bounds (`check_settings`), then the rules between settings: the `check()` method of
    each section that has one, then the tree's own. A section alone (an `SAEConfig`, say) is
    validated as a tree of its settings, which are then named without a section (`--k`)."""
    check_settings(tree)
    for part in [*_sections(tree), tree]:
        for one in sweep_configs(part) if hasattr(type(part), SWEEP_MARK) else [part]:
            if callable(getattr(one, "check", None)):
                one.check()


def _sections(tree: Any) -> list[Any]:
    hints = _hints(type(tree))
    return [getattr(tree, f.name) for f in fields(tree) if is_section(hints[f.name])]


def check_settings(tree: Any) -> None:
    """Raise GsaeError for any setting of the wrong type, outside its bounds (`min`, `above`,
    `max`, `below`, `choices`), for numbers not finite, or an empty list that may not be
    empty (the positional SAE folders excepted: they may be filled in later)."""
    for s in settings(type(tree)):
        value = getattr(getattr(tree, s.section), s.name) if s.section else getattr(tree, s.name)
        listed = s.swept or typing.get_origin(s.kind) is list
        if listed != isinstance(value, list):
            raise GsaeError(f"--{s.key} must be {'a list' if listed else 'one value'}, "
                            f"got {_brief(value)}")
        if listed and not value and not (s.positional or s.field.metadata.get("may_be_empty")):
            raise GsaeError(f"--{s.key} must list at least one value, got []")
        for item in value if isinstance(value, list) else [value]:
            _coerce_scalar(item, s, "the settings")
            problem = _out_of_bounds(item, s.field.metadata)
            if problem:
                raise GsaeError(f"--{s.key} {problem}, got {_brief(item)}")


def _brief(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: a message stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _out_of_bounds(value: Any, meta: Mapping[str, Any]) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        return "must fit in 64 bits (from -2^63 to 2^63-1)"
    if "choices" in meta and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if "min" in meta and value < meta["min"]:
        return f"must be at least {meta['min']}"
    if "above" in meta and not value > meta["above"]:
        return f"must be greater than {meta['above']}"
    if "max" in meta and value > meta["max"]:
        return f"must be at most {meta['max']}"
    if "below" in meta and not value < meta["below"]:
        return f"must be less than {meta['below']}"
    return None


# ------------------------------------------------------------------------------ files


def read_file(path: str | Path) -> dict[str, Any]:
    """A config file's tree as a nested dict: JSON, or YAML (.yaml/.yml) with PyYAML."""
    path = Path(path)
    if path.is_dir():
        raise GsaeError(f"config file {path} is a folder: give a JSON or YAML file")
    if not path.is_file():
        raise GsaeError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise GsaeError(f"config file {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                        "save it as UTF-8") from None
    try:
        data = _read_yaml(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except ImportError:
        raise GsaeError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use "
                        "JSON") from None
    except _AliasUsed as err:
        raise GsaeError(f"config file {path} uses the YAML alias *{err}: gsae config files may "
                        "not use aliases (they can expand without bound); write the values "
                        "out") from None
    except Exception as err:  # json and yaml raise several types for malformed text
        raise GsaeError(f"config file {path} is not valid {path.suffix[1:] or 'JSON'}: "
                        f"{str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise GsaeError(f"config file {path} must hold an object of sections")
    return data


class _AliasUsed(Exception):
    """A YAML alias was met (its anchor's name is the message)."""


def _read_yaml(text: str) -> Any:
    """YAML read with the safe loader, refusing aliases: a few lines of nested aliases
    expand to gigabytes (the "billion laughs")."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise _AliasUsed(self.peek_event().anchor)
            return super().compose_node(parent, index)

    loader = NoAliasLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def to_dict(tree: Any) -> dict[str, Any]:
    """The tree as a nested dict of plain JSON values (what a config file holds)."""
    return dataclasses.asdict(tree)


def identity(tree: Any) -> dict[str, Any]:
    """The tree without the settings marked `identity: False` (where and how a run executes):
    what two runs must share to be the same run."""
    out: dict[str, Any] = {}
    for s in settings(type(tree)):
        if s.field.metadata.get("identity", True):
            value = getattr(getattr(tree, s.section), s.name) if s.section else \
                getattr(tree, s.name)
            if not _left_out(s.field, value):
                out.setdefault(s.section or "", {})[s.name] = value
    return json.loads(json.dumps(out))


def section_record(section: Any) -> dict[str, Any]:
    """One section's settings as a dict (e.g. an SAE config in a run's record), without the
    `omit_at_default` settings that sit at their default."""
    values = dataclasses.asdict(section)
    return {f.name: values[f.name] for f in fields(section) if not _left_out(f, values[f.name])}


def _left_out(f: Field, value: Any) -> bool:
    """Whether a setting added after runs were recorded sits at its default (see the module
    docstring); a sweep field's default is the list of the one default."""
    return bool(f.metadata.get("omit_at_default")) and value == _default(f)
