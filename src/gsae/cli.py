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

from gsae.errors import GsaeError
from gsae.evaluate import EvalConfig, check_model, evaluate, format_table
from gsae.sae import SAE, SAEConfig
from gsae.source import ActivationSource, Batch, SourceConfig
from gsae.store import StoreConfig, StoreReader, StoreWriter, read_manifest
from gsae.text import DataConfig, batched_contexts, corpus_identity, token_contexts
from gsae.train import TrainConfig, Trainer

# ------------------------------------------------------------------ dataclass <-> argparse


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser, cls: type, sweep: bool = False) -> None:
    """Add one flag per field of the dataclass `cls`. With `sweep`, every flag also takes a
    comma-separated list of values (the run trains one SAE per combination)."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore
        kind = hints[f.name]
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        help_text = f"{f.metadata.get('help', '')} (default: {_show(default)})"
        if sweep:
            scalar = _scalar_parser(kind)
            group.add_argument(*flags, dest=f.name, default=[default], help=help_text,
                               type=lambda s, p=scalar: [p(v) for v in s.split(",") if v])
        elif kind is bool:
            group.add_argument(*flags, dest=f.name, default=default, help=help_text,
                               nargs="?", const=True, type=_parse_bool)
        elif typing.get_origin(kind) is list:
            group.add_argument(*flags, dest=f.name, default=default, help=help_text, nargs="+",
                               type=typing.get_args(kind)[0])
        else:
            group.add_argument(*flags, dest=f.name, default=default, help=help_text,
                               type=_scalar_parser(kind))


def _scalar_parser(kind: Any):
    if kind is bool:
        return _parse_bool
    optional = [k for k in typing.get_args(kind) if k is not type(None)]
    return optional[0] if optional else kind  # `str | None` parses as str


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def config_from_args(cls: type, args: argparse.Namespace):
    """Build the dataclass `cls` from the parsed flags."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


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
        if epoch > 0:
            tqdm.write(f"gsae: the {part} corpus is exhausted; starting pass {epoch + 1}")
        for tokens in batched_contexts(token_contexts(data_cfg, tokenizer, part), batch_size):
            if skip > 0:
                skip -= 1
                continue
            yield tokens


def _source_identity(source_cfg: SourceConfig, data_cfg: DataConfig) -> dict[str, Any]:
    return {"corpus": corpus_identity(data_cfg), "context_size": data_cfg.context_size,
            "skip_first": source_cfg.skip_first, "outlier_factor": source_cfg.outlier_factor,
            "autocast": source_cfg.autocast}


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
    """Train one SAE, or a sweep of them, from the language model or an activation store."""
    train_cfg = config_from_args(TrainConfig, args)
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
        metadata = {k: identity[k] for k in ("model", "corpus", "context_size", "skip_first",
                                              "outlier_factor", "autocast")}
        run_config["store"] = identity
    else:
        model_cfg, model, tokenizer, d_in, model_id = _load_model(args)
        source = ActivationSource(model, source_cfg, with_grad=any(c.beta > 0 for c in sweep))
        hooks = source.hook_names
        metadata = {"model": model_id, **_source_identity(source_cfg, data_cfg)}
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
    _print_train_summary(final, trainer, time.perf_counter() - t0)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Run the language model once and store activations and gradients for later training."""
    store_cfg = config_from_args(StoreConfig, args)
    data_cfg = config_from_args(DataConfig, args)
    source_cfg = config_from_args(SourceConfig, args)
    model_cfg, model, tokenizer, d_in, model_id = _load_model(args)
    source = ActivationSource(model, source_cfg, with_grad=True)
    identity = {"model": model_id, "hooks": source.hook_names, "d_in": d_in,
                "lm_batch_size": source_cfg.lm_batch_size,
                **_source_identity(source_cfg, data_cfg)}
    writer = StoreWriter(store_cfg.store, identity, store_cfg.store_dtype,
                         store_cfg.batches_per_shard)
    if writer.manifest["complete"] and writer.rows_done >= store_cfg.tokens:
        print(f"{store_cfg.store} is complete: {writer.rows_done} tokens")
        return 0
    writer.manifest["complete"] = False
    contexts = batched_contexts(token_contexts(data_cfg, tokenizer, "train"),
                                source_cfg.lm_batch_size)
    contexts = itertools.islice(contexts, writer.batches_done, None)
    bar = tqdm(total=store_cfg.tokens, initial=writer.rows_done, unit="tok", unit_scale=True,
               desc="cache", dynamic_ncols=True)
    pending: list[dict[str, Batch]] = []
    t0 = time.perf_counter()
    for tokens in contexts:
        if writer.rows_done >= store_cfg.tokens:
            break
        pending.append(source.batches(tokens))
        bar.update(len(next(iter(pending[-1].values()))))
        if len(pending) == store_cfg.batches_per_shard:
            writer.write_shard(pending)
            pending = []
    if pending:
        writer.write_shard(pending)
    writer.finish()
    bar.close()
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


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate SAE folders spliced into their language model, on held-out text."""
    from gsae.models import ModelConfig, load_model, model_identity

    eval_cfg = config_from_args(EvalConfig, args)
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
    result = evaluate(saes, model, tokenizer, data_cfg, eval_cfg, names=args.sae_dirs,
                      model_id=model_id)
    print(format_table(result))
    if eval_cfg.json:
        print(f"results written to {eval_cfg.json}")
    return 0


def _default_from_sae(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """Make these flags default to what the first SAE's metadata records."""
    for action in parser._actions:
        if action.dest in names:
            action.default = None
            text, fallback = action.help.rsplit(" (default: ", 1)
            action.help = f"{text} (default: the first SAE's, else {fallback}"


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
