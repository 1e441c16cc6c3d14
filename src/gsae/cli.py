"""The `gsae` command. Every flag is a field of one of the config dataclasses, with its default."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gsae import distributed
from gsae.errors import GsaeError
from gsae.evaluate import EvalConfig, check_model, evaluate, format_table
from gsae.sae import SAE, SAEConfig
from gsae.source import ActivationSource, SourceConfig, source_identity
from gsae.store import StoreConfig, StoreReader, fill_store, read_manifest
from gsae.text import DataConfig, batched_contexts, token_contexts
from gsae.train import TrainConfig, Trainer, data_parallel

# ------------------------------------------------------------------ dataclass <-> argparse


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser, cls: type, sweep: bool = False,
                    section: str | None = None) -> None:
    """Add one flag per field of the dataclass `cls`. With `sweep`, every flag also takes a
    comma-separated list of values (the run trains one SAE per combination). With `section`,
    a field's flag is `--section.field`, plus `--field` unless an earlier flag has that name."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore
        kind = hints[f.name]
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        dest = f.name
        if section:
            flags = [f"--{section}.{f.name}"] + [
                flag for flag in flags if flag not in parser._option_string_actions]
            dest = f"{section}.{f.name}"
        help_text = f"{f.metadata.get('help', '')} (default: {_show(default)})"
        if sweep:
            scalar = _scalar_parser(kind)
            group.add_argument(*flags, dest=dest, default=[default], help=help_text,
                               type=lambda s, p=scalar: [p(v) for v in s.split(",") if v])
        elif kind is bool:
            group.add_argument(*flags, dest=dest, default=default, help=help_text,
                               nargs="?", const=True, type=_parse_bool)
        elif typing.get_origin(kind) is list:
            group.add_argument(*flags, dest=dest, default=default, help=help_text,
                               nargs="*" if f.metadata.get("may_be_empty") else "+",
                               type=typing.get_args(kind)[0])
        else:
            group.add_argument(*flags, dest=dest, default=default, help=help_text,
                               type=_scalar_parser(kind))


def _scalar_parser(kind: Any):
    if kind is bool:
        return _parse_bool
    optional = [k for k in typing.get_args(kind) if k is not type(None)]
    return optional[0] if optional else kind  # `str | None` parses as str


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def config_from_args(cls: type, args: argparse.Namespace, section: str | None = None):
    """Build the dataclass `cls` from the parsed flags (of `add_config_args` with `section`)."""
    prefix = f"{section}." if section else ""
    return cls(**{f.name: getattr(args, prefix + f.name) for f in fields(cls)})


def sweep_from_args(args: argparse.Namespace) -> list[SAEConfig]:
    """One SAEConfig per combination of the listed values."""
    names = [f.name for f in fields(SAEConfig)]
    values = [getattr(args, n) for n in names]
    return [SAEConfig(**dict(zip(names, combo))) for combo in itertools.product(*values)]


# ------------------------------------------------------------------------------ commands


def _load_model(args: argparse.Namespace):
    from gsae.models import ModelConfig, hidden_size, load_model, model_identity

    model_cfg = config_from_args(ModelConfig, args)
    model, tokenizer = load_model(model_cfg)
    return model_cfg, model, tokenizer, hidden_size(model), model_identity(model_cfg)


def context_batches(data_cfg: DataConfig, tokenizer, batch_size: int, part: str = "train",
                    skip: int = 0) -> Iterator[Any]:
    """Batches of token contexts, starting again at the corpus start whenever it runs out;
    the first `skip` batches are passed over (to resume a run)."""
    for epoch in itertools.count():
        if epoch > 0 and distributed.is_main():
            tqdm.write(f"gsae: the {part} corpus is exhausted; starting pass {epoch + 1}")
        for tokens in batched_contexts(token_contexts(data_cfg, tokenizer, part), batch_size):
            if skip > 0:
                skip -= 1
                continue
            yield tokens


def _store_hooks(requested: list[str], stored: list[str]) -> list[str]:
    """Match requested hook points to a store's: by full name or by layer index."""
    chosen = []
    for hook in requested:
        match = [h for h in stored if h == hook or h.rsplit(".", 1)[-1] == hook.lstrip("+")]
        if len(match) != 1:
            raise GsaeError(f"hook {hook!r} is not in the store, which holds {stored}")
        chosen.append(match[0])
    return chosen


def cmd_train(args: argparse.Namespace) -> int:
    """Train one SAE, or a sweep of them, from the language model or an activation store;
    under torchrun, data-parallel or with the sweep split across the ranks."""
    distributed.init()
    args.device = distributed.local_device(args.device)
    train_cfg = config_from_args(TrainConfig, args)
    train_cfg.sae_device = distributed.local_device(train_cfg.sae_device or args.device)
    data_cfg = config_from_args(DataConfig, args)
    source_cfg = config_from_args(SourceConfig, args)
    sweep = sweep_from_args(args)
    t0 = time.perf_counter()
    run_config: dict[str, Any] = {"command": "train", "train": asdict(train_cfg),
                                  "sweep": [asdict(c) for c in sweep]}
    if train_cfg.store:
        reader = StoreReader(train_cfg.store, _store_hooks(source_cfg.hooks,
                                                           read_manifest(train_cfg.store)
                                                           ["identity"]["hooks"]))
        d_in, hooks, identity = reader.d_in, reader.hooks, reader.identity
        metadata = reader.sae_metadata
        run_config["store"] = identity
    else:
        model_cfg, model, tokenizer, d_in, model_id = _load_model(args)
        source = ActivationSource(model, source_cfg, with_grad=any(c.beta > 0 for c in sweep),
                                  split_across_ranks=data_parallel(train_cfg))
        hooks = source.hook_names
        metadata = {"model": model_id, **source_identity(source_cfg, data_cfg)}
        run_config.update(model=asdict(model_cfg), data=asdict(data_cfg),
                          source=asdict(source_cfg))
    for cfg in sweep:
        cfg.validate(d_in)
    saes = [(SAE(replace(cfg), d_in, metadata={**metadata, "hook": hook}), hook)
            for hook in hooks for cfg in sweep]
    trainer = Trainer.create(saes, train_cfg, run_config)
    if train_cfg.store:
        chunks = reader.chunks(seed=train_cfg.data_seed, skip=trainer.chunks_done)
    else:
        contexts = context_batches(data_cfg, tokenizer, source_cfg.lm_batch_size,
                                   skip=trainer.chunks_done)
        chunks = source.stream(contexts)
    final = trainer.fit(chunks)
    if distributed.is_main():
        _print_train_summary(final, trainer, time.perf_counter() - t0)
    distributed.shutdown()
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Run the language model once and store activations and gradients for later training."""
    store_cfg = config_from_args(StoreConfig, args)
    data_cfg = config_from_args(DataConfig, args)
    source_cfg = config_from_args(SourceConfig, args)
    model_cfg, model, tokenizer, d_in, model_id = _load_model(args)
    source = ActivationSource(model, source_cfg, with_grad=True)
    t0 = time.perf_counter()
    writer = fill_store(store_cfg, source, data_cfg, tokenizer, model_id)
    size = sum(f.stat().st_size for f in Path(store_cfg.store).glob("shard-*"))
    if writer.rows_done < store_cfg.tokens:
        print(f"gsae: the corpus ran out after {writer.rows_done} tokens", file=sys.stderr)
    print(f"stored {writer.rows_done} tokens x {len(source.hook_names)} hook(s) in "
          f"{len(writer.manifest['shards'])} shards, {size / 2**20:.1f} MiB "
          f"({size / 2**20 / max(1, writer.rows_done) * 1e6:.0f} MiB per million tokens), "
          f"{time.perf_counter() - t0:.0f} s, in {store_cfg.store}")
    return 0


def _print_train_summary(final: list[dict[str, Any]], trainer: Trainer, wall: float) -> None:
    outliers = trainer.dropped_outliers
    total = outliers + trainer.rows_seen
    print(f"\ntrained {len(final)} SAE(s) in {wall:.0f} s; outlier tokens dropped: {outliers} "
          f"of {total} ({100 * outliers / max(1, total):.3f}%)")
    header = f"{'SAE':<48} {'tokens':>9} {'FVU':>7} {'L0':>6} {'dead':>6} {'beta|d.g|':>9}"
    print(header)
    for r in final:
        print(f"{r['name']:<48} {r.get('tokens', 0):>9} {r.get('fvu', float('nan')):>7.4f} "
              f"{r.get('l0', float('nan')):>6.1f} {r.get('dead_fraction', float('nan')):>6.3f} "
              f"{r.get('effect', 0.0):>9.3g}")
    print(f"saved under {trainer.cfg.out}")


def _recorded_setup(args: argparse.Namespace) -> tuple[list[SAE], DataConfig, Any, Any,
                                                      dict[str, Any]]:
    """The SAEs of `args.sae_dirs` with the model, tokenizer and corpus settings recorded in the
    first one's metadata (any flag given overrides them), checked to match every SAE."""
    from gsae.models import ModelConfig, load_model, model_identity

    saes = [SAE.load(folder) for folder in args.sae_dirs]
    recorded = saes[0].metadata
    model_args = {f.name: getattr(args, f.name) for f in fields(ModelConfig)}
    if model_args["model"] is None:
        trained = recorded.get("model") or {}
        if not trained.get("model"):
            raise GsaeError(f"{args.sae_dirs[0]} does not record its model: pass --model")
        model_args["model"] = trained["model"]
        model_args["revision"] = model_args["revision"] or trained.get("revision")
    model_cfg = ModelConfig(**model_args)
    model_id = model_identity(model_cfg)
    check_model(saes, model_id)
    corpus = recorded.get("corpus") or {}
    data_cfg = DataConfig(**{
        f.name: next(v for v in (getattr(args, f.name), corpus.get(f.name), f.default)
                     if v is not None)
        for f in fields(DataConfig)
    })
    model, tokenizer = load_model(model_cfg)
    return saes, data_cfg, model, tokenizer, model_id


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate SAE folders spliced into their language model, on held-out text."""
    eval_cfg = config_from_args(EvalConfig, args)
    saes, data_cfg, model, tokenizer, model_id = _recorded_setup(args)
    result = evaluate(saes, model, tokenizer, data_cfg, eval_cfg, names=args.sae_dirs,
                      model_id=model_id)
    print(format_table(result))
    if eval_cfg.json:
        print(f"results written to {eval_cfg.json}")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    """Steer with latents of SAE folders in held-out contexts and measure the output change."""
    from gsae.evaluate import write_json
    from gsae.steer import SteerConfig, steer
    from gsae.steer import format_table as steer_table

    steer_cfg = config_from_args(SteerConfig, args, "steer")
    saes, data_cfg, model, tokenizer, model_id = _recorded_setup(args)
    result = steer(saes, model, tokenizer, data_cfg, steer_cfg, names=args.sae_dirs,
                   model_id=model_id)
    print(steer_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"results written to {args.json}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train, evaluate and steer TopK and g-SAEs over a grid, and write the report."""
    from gsae.compare import CompareConfig, apply_quick, run_compare
    from gsae.models import ModelConfig
    from gsae.steer import SteerConfig

    configs = [config_from_args(cls, args)
               for cls in (CompareConfig, ModelConfig, DataConfig, SourceConfig)]
    configs.append(config_from_args(SteerConfig, args, "steer"))
    if configs[0].quick:
        apply_quick(*configs)
    t0 = time.perf_counter()
    report = run_compare(*configs)
    print(f"report written to {report} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _default_from_sae(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """Make these flags default to what the first SAE's metadata records."""
    for action in parser._actions:
        if action.dest in names:
            action.default = None
            text, fallback = action.help.rsplit(" (default: ", 1)
            action.help = f"{text} (default: the first SAE's, else {fallback}"


def cmd_export(args: argparse.Namespace) -> int:
    """Write an SAE (any folder or repo id that SAE.load reads) as a SAELens, sparsify or gsae
    folder."""
    from gsae.formats import export

    folder = export(SAE.load(args.sae_dir), args.out_dir, args.format, args.hookpoint)
    print(f"wrote a {args.format} SAE folder: {folder}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Upload an SAE to a Hugging Face Hub model repo, in the chosen format."""
    from gsae.formats import push

    url = push(args.sae_dir, args.repo_id, format=args.format, subfolder=args.subfolder,
               hookpoint=args.hookpoint, private=args.private, token=args.token)
    print(f"uploaded: {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from gsae.models import ModelConfig

    parser = argparse.ArgumentParser(prog="gsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train g-SAEs / TopK SAEs (a sweep when flags list values)")
    for cls in (ModelConfig, DataConfig, SourceConfig, TrainConfig):
        add_config_args(p, cls)
    add_config_args(p, SAEConfig, sweep=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cache", help="store activations and gradients for training sweeps")
    for cls in (ModelConfig, DataConfig, SourceConfig, StoreConfig):
        add_config_args(p, cls)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("eval", help="evaluate SAEs spliced into their model on held-out text")
    p.add_argument("sae_dirs", nargs="+", metavar="SAE_DIR",
                   help="SAE folders, all of one model (any hook points)")
    for cls in (ModelConfig, DataConfig, EvalConfig):
        add_config_args(p, cls)
    _default_from_sae(p, ["model", *(f.name for f in fields(DataConfig))])
    p.set_defaults(func=cmd_eval)

    from gsae.compare import CompareConfig
    from gsae.steer import SteerConfig

    p = sub.add_parser("steer", help="steer with SAE latents in held-out contexts and measure "
                       "how much the output moves")
    p.add_argument("sae_dirs", nargs="+", metavar="SAE_DIR",
                   help="SAE folders, all of one model (any hook points)")
    for cls in (ModelConfig, DataConfig):
        add_config_args(p, cls)
    add_config_args(p, SteerConfig, section="steer")
    p.add_argument("--json", default="", help="also write the result as JSON to this file")
    _default_from_sae(p, ["model", *(f.name for f in fields(DataConfig))])
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("compare", help="TopK vs g-SAEs over a grid of k, beta, value modes and "
                       "seeds: train, evaluate, steer, and write a report")
    for cls in (CompareConfig, ModelConfig, DataConfig, SourceConfig):
        add_config_args(p, cls)
    add_config_args(p, SteerConfig, section="steer")
    p.set_defaults(func=cmd_compare)

    from gsae.formats import EXPORT_FORMATS

    hookpoint_help = "sparsify layout: the SAE's folder name (default: the SAE's recorded hook)"
    p = sub.add_parser("export", help="write an SAE as a SAELens, sparsify or gsae folder")
    p.add_argument("sae_dir", metavar="SAE_DIR", help="SAE folder or Hugging Face repo id")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="format to write")
    p.add_argument("--hookpoint", help=hookpoint_help)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload an SAE to a Hugging Face Hub model repo")
    p.add_argument("sae_dir", metavar="SAE_DIR", help="SAE folder or Hugging Face repo id")
    p.add_argument("repo_id", metavar="REPO_ID", help="the model repo, owner/name")
    p.add_argument("--format", default="gsae", choices=EXPORT_FORMATS,
                   help="format to upload (default: gsae)")
    p.add_argument("--subfolder", help="folder inside the repo (default: its root)")
    p.add_argument("--hookpoint", help=hookpoint_help)
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    p.set_defaults(func=cmd_push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gsae` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GsaeError as err:
        print(f"gsae: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gsae: interrupted; the last checkpoint is kept (rerun with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
