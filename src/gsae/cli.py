"""The `gsae` command. Each command's flags are generated from its config tree (`gsae.config`);
the command only parses them and calls the library (`gsae.pipeline`, `gsae.study`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsae import config, pipeline
from gsae.errors import GsaeError


@dataclass(frozen=True)
class Command:
    """One subcommand: its config tree, its help line and what runs it."""

    tree: Callable[[], type]  # imported lazily: the study needs the optional plotting extra
    help: str
    run: Callable[[Any], int]
    recorded_defaults: bool = False  # model and data default to what the first SAE records
    recorded_source: bool = False  # and so do the hooks (every SAE's) and the positions
    interrupted: str = "interrupted"


def cmd_train(run: pipeline.TrainRun) -> int:
    summary = pipeline.train(run)
    if summary.main_rank:
        print(summary.table())
    return 0


def cmd_finetune(run: pipeline.FinetuneRun) -> int:
    summary = pipeline.finetune(run)
    if summary.main_rank:
        print(summary.table())
    return 0


def cmd_cache(run: pipeline.CacheRun) -> int:
    summary = pipeline.cache(run)
    if summary.corpus_ran_out:
        print(f"gsae: the corpus ran out after {summary.rows} tokens", file=sys.stderr)
    print(summary.line())
    if summary.rows > run.store.tokens:
        print(f"gsae: {summary.rows - run.store.tokens} tokens more than "
              f"--tokens {run.store.tokens}: the store holds whole batches of --lm_batch_size "
              f"{run.source.lm_batch_size} contexts", file=sys.stderr)
    return 0


def cmd_eval(run: pipeline.EvaluationRun) -> int:
    from gsae.evaluate import format_table

    for i, (name, result) in enumerate(pipeline.run_evals(run).items()):
        if run.unseen:  # one table per corpus, the held-out split first
            print(f"\n{name}: {'its held-out split' if i == 0 else 'all of it (unseen)'}")
        print(format_table(result))
    if run.eval.json:
        print(f"results written to {run.eval.json}")
    if run.saebench:
        print(f"SAEBench core results written to {run.saebench}")
    return 0


def cmd_steer(run: pipeline.SteeringRun) -> int:
    from gsae.steer import format_prompt_steering, format_table

    if run.prompt or run.latent >= 0:
        print("\n".join(map(format_prompt_steering, pipeline.run_steer_prompt(run))))
        return 0

    print(format_table(pipeline.run_steer(run)))
    if run.json:
        print(f"results written to {run.json}")
    return 0


def cmd_compare(run: Any) -> int:
    from gsae.study.compare import run_compare

    report, seconds = run_compare(run)
    print(f"report written to {report} ({seconds:.0f} s)")
    return 0


def cmd_study(run: Any) -> int:
    from gsae.study.scaling import run_study

    report, seconds = run_study(run)
    print(f"report written to {report} ({seconds:.0f} s)")
    return 0


def cmd_inspect(run: Any) -> int:
    from gsae.browser import run_inspect

    start = time.perf_counter()
    out = run_inspect(run)
    print(f"wrote {out / 'index.html'} ({time.perf_counter() - start:.0f} s)")
    return 0


def cmd_serve(run: Any) -> int:
    from gsae.browser.serve import serve

    serve(run)
    return 0


def _serve_tree() -> type:
    from gsae.browser.serve import ServeRun

    return ServeRun


def _inspect_tree() -> type:
    from gsae.browser import InspectRun

    return InspectRun


def _compare_tree() -> type:
    try:
        from gsae.study.compare import CompareRun
    except ImportError as err:
        raise GsaeError(f"gsae compare needs the plotting extra ({err.name} is missing): "
                        "pip install 'gsae[plots]'") from None
    return CompareRun


def _study_tree() -> type:
    try:
        from gsae.study.scaling import ScalingRun
    except ImportError as err:
        raise GsaeError(f"gsae study needs the plotting extra ({err.name} is missing): "
                        "pip install 'gsae[plots]'") from None
    return ScalingRun


COMMANDS: dict[str, Command] = {
    "train": Command(lambda: pipeline.TrainRun, "train g-SAEs / TopK SAEs (a sweep when the "
                     "SAE flags list values)", cmd_train,
                     interrupted="interrupted; the last checkpoint is kept (rerun with --resume)"),
    "finetune": Command(lambda: pipeline.FinetuneRun, "fine-tune trained SAEs on the spliced "
                        "model's next-token distribution (KL) plus FVU", cmd_finetune,
                        recorded_defaults=True, recorded_source=True,
                        interrupted="interrupted; the last checkpoint is kept (rerun with "
                        "--resume)"),
    "cache": Command(lambda: pipeline.CacheRun, "store activations and gradients for training "
                     "sweeps", cmd_cache,
                     interrupted="interrupted; finished shards are kept (rerun the same command "
                     "to continue)"),
    "eval": Command(lambda: pipeline.EvaluationRun, "evaluate SAEs spliced into their model on "
                    "held-out text", cmd_eval, recorded_defaults=True),
    "steer": Command(lambda: pipeline.SteeringRun, "steer with SAE latents in held-out contexts "
                     "and measure how much the output moves", cmd_steer, recorded_defaults=True),
    "compare": Command(_compare_tree, "TopK vs g-SAEs over a grid of k, beta, value modes and "
                       "seeds: train, evaluate, steer, and write a report", cmd_compare,
                       interrupted="interrupted; finished stages are kept (rerun the same "
                       "command to continue)"),
    "study": Command(_study_tree, "learning curves of TopK vs g-SAEs: train with snapshots "
                     "over seeds, evaluate every snapshot on held-out and unseen text, and "
                     "write a report", cmd_study,
                     interrupted="interrupted; finished stages are kept (rerun the same "
                     "command to continue)"),
    "inspect": Command(_inspect_tree, "write a static feature browser of an SAE's latents "
                       "(HTML pages, latents.json, a delphi latent cache)", cmd_inspect,
                       recorded_defaults=True),
    "serve": Command(_serve_tree, "a local page to read your own text through SAEs: per-token "
                     "activations and loss effects, a token's top latents, steering",
                     cmd_serve, recorded_defaults=True, interrupted="stopped"),
}


# ------------------------------------------------------------------- export and push


def cmd_export(args: argparse.Namespace) -> int:
    from gsae.formats import export, load

    folder = export(load(args.sae_dir), args.out_dir, args.format, args.hookpoint,
                    overwrite=args.overwrite, source=args.sae_dir)
    print(f"wrote a {args.format} SAE folder: {folder}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from gsae.formats import push

    url = push(args.sae_dir, args.repo_id, format=args.format, subfolder=args.subfolder,
               hookpoint=args.hookpoint, private=args.private, token=args.token)
    print(f"uploaded: {url}")
    return 0


def _add_format_commands(sub: Any) -> None:
    from gsae.formats import EXPORT_FORMATS

    hookpoint_help = "sparsify layout: the SAE's folder name (default: the SAE's recorded hook)"
    p = sub.add_parser("export", help="write an SAE as a SAELens, sparsify or gsae folder")
    p.add_argument("sae_dir", metavar="SAE_DIR", help="SAE folder or Hugging Face repo id")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="format to write")
    p.add_argument("--hookpoint", help=hookpoint_help)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the SAE folder if OUT_DIR already holds one (or other files)")
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


# --------------------------------------------------------------------------------- main


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `gsae` parser, with the config flags of the command `only` (building every tree
    would import the optional study package for nothing; `gsae --help` needs none)."""
    parser = config.OneLineParser(prog="gsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=config.OneLineParser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if only == name:
            config.add_arguments(p, command.tree())
    _add_format_commands(sub)
    return parser


def settings_of(command: Command, args: argparse.Namespace) -> Any:
    """The command's config tree: defaults, then what the SAEs record (eval, steer), then
    --config FILE, then the flags given."""
    tree = command.tree()
    explicit = config.explicit_settings(args, tree)
    base = config.read_file(args.config) if "config" in vars(args) else {}
    if command.recorded_defaults:
        saes = explicit.get("saes") or base.get("saes") or []
        given_model = "model.model" in explicit or "model" in base.get("model", {})
        recorded = pipeline.recorded_settings(saes, need_model=not given_model,
                                              with_source=command.recorded_source)
        base = {**base, **{k: {**v, **base.get(k, {})} for k, v in recorded.items()}}
    return config.build(tree, base, explicit)


def os_error_line(err: OSError, tree: Any) -> str:
    """An OSError as one line that names the flag whose path it concerns, if any (a full
    disk under --out, say)."""
    where = f": {err.filename}" if err.filename else ""
    flag = flag_of_path(tree, err.filename) if tree is not None and err.filename else None
    return f"{flag + ': ' if flag else ''}{err.strerror or err}{where}"


def flag_of_path(tree: Any, path: str | os.PathLike) -> str | None:
    """The flag (with its value) of the setting of `tree` whose path holds `path`: the most
    specific one, or None."""
    target = Path(path).absolute()
    found: list[tuple[int, str]] = []
    names = config.flag_names(type(tree))
    for s in config.settings(type(tree)):
        value = getattr(getattr(tree, s.section), s.name) if s.section else getattr(tree, s.name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item and target.is_relative_to(Path(item).absolute()):
                flag = s.field.metadata.get("metavar", s.key) if s.positional else names[s.key]
                found.append((len(Path(item).absolute().parts), f"{flag} {item}"))
    return max(found)[1] if found else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gsae` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    command = COMMANDS.get(chosen or "")
    tree = None
    try:
        try:
            args = build_parser(only=chosen if command else None).parse_args(argv)
        except SystemExit as done:  # --help, or a flag argparse could not read (one line)
            return int(done.code or 0)
        if command is None:
            return args.func(args)
        tree = settings_of(command, args)
        return command.run(tree)
    except GsaeError as err:
        print(f"gsae: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a path that cannot be written: nothing half-written
        print(f"gsae: error: {os_error_line(err, tree)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        message = command.interrupted if command else "interrupted"
        print(f"gsae: {message}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
