"""The examples of README.md and docs/*.md work as written.

- Every `gsae` command line of their shell blocks (```bash, ```sh, ```console and unlabelled
  blocks; `make demo` is the command the Makefile runs, `torchrun ... -m gsae ...` the part
  after `-m gsae`) is parsed by the real parser and its values checked as the command checks
  them, so an unknown flag or a bad value fails here.
- Those that can run here do, in one folder, rewritten onto the tiny test model with tiny
  budgets (`TINY`), shell examples first and in reading order (`ORDER`), so that a later
  example finds what an earlier one made; a command that the docs give twice runs once. What
  does not run, and why, is in `PARSE_ONLY`.
- Then the Python blocks run as one session in the same order (a later block may use what an
  earlier one defined, such as the README's `x`, `g` and `folders`), with the default model
  and corpus replaced by the tiny ones and a run folder of their own where a block trains
  what a shell example already trained. Blocks that need other libraries, the network or
  hours (`SKIP_PYTHON`) are compiled and their gsae imports checked.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib
import io
import json
import re
import shlex
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from gsae import GsaeError, config
from gsae.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Reading order of the files whose examples build on each other; the rest follow, by name.
ORDER = ["README.md", "docs/training.md", "docs/cli.md", "docs/finetune.md",
         "docs/evaluation.md", "docs/steering.md", "docs/inspect.md", "docs/formats.md"]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)

# The tiny rewrite: appended to a command as `--section.field value` where its config tree has
# the setting (the last flag wins, so these replace the docs' budgets). The SAE settings (k,
# beta, width, seed) stay as written: they name the SAE folders the docs refer to.
HOOK = "1"
TINY = {
    "model.model": "tiny-llama", "data.dataset": "{corpus}", "data.context_size": "32",
    "source.hooks": HOOK, "source.lm_batch_size": "4",
    "train.tokens": "512", "train.batch_tokens": "128", "train.shuffle_tokens": "256",
    "store.tokens": "1024",
    "eval.eval_tokens": "256", "eval.pool_tokens": "1024",
    "steer.pool": "8", "steer.contexts": "2", "steer.context_size": "32",
    "inspect.tokens": "256", "inspect.pool_tokens": "1024", "inspect.top_latents": "2",
    "inspect.random_latents": "2", "inspect.continuation_tokens": "2",
}
# Sections that eval, steer, inspect and finetune take from what the SAEs record.
RECORDED_SECTIONS = ("model.", "data.", "source.")
# Commands that are parsed but not run here, and why.
PARSE_ONLY = {
    "compare": "hours on the default model; tests/test_study.py runs it small",
    "study": "hours on the default model; tests/test_study_*.py run it small",
    "serve": "a server that runs until stopped; tests/test_serve.py drives it",
    "push": "uploads to the Hugging Face Hub (tests/test_formats.py uses a stand-in)",
}
SKIP_PYTHON = [
    (re.compile(r"^(from|import) (sae_lens|sparsify)\b", re.MULTILINE),
     "needs SAELens or sparsify (tests/test_interop.py runs them)"),
    (re.compile(r"load_hub|hf://"), "downloads from the Hugging Face Hub"),
    (re.compile(r"run_compare|run_study"), "hours on the default model"),
]


@dataclass(frozen=True)
class Example:
    """One command line or Python block of the docs."""

    file: str  # relative to the repository
    line: int  # where the command line, or the Python block, starts
    text: str  # the command line (continuations joined) or the block's code
    argv: tuple[str, ...] = ()  # the gsae arguments of a command line
    why_not_run: str = ""

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


# ---------------------------------------------------------------------------- extraction


def blocks(path: Path) -> Iterator[tuple[str, int, str]]:
    """(language, line of the fence, body) of every fenced block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    for match in BLOCK.finditer(text):
        yield match.group(1).lower(), text.count("\n", 0, match.start()) + 1, match.group(2)


def joined_lines(body: str) -> Iterator[tuple[int, str]]:
    """The lines of a block with their line in it (from 1), a line ending in a backslash
    joined with the next."""
    pending, first = "", 0
    for number, line in enumerate(body.splitlines(), 1):
        first = first or number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield first, pending + line
        pending, first = "", 0


def command_lines(body: str, names: dict[str, str]) -> Iterator[tuple[int, str]]:
    """The command lines of a shell block with their line in it: console prompts dropped,
    `$NAME` replaced by what an earlier `NAME=value` line of the file set (in `names`)."""
    for number, line in joined_lines(body):
        line = re.sub(r"^\s*\$ ", "", line).strip()
        assignment = re.fullmatch(r"(\w+)=(\S+)", line)
        if assignment:
            names[assignment.group(1)] = assignment.group(2)
            continue
        for name, value in names.items():
            line = re.sub(rf"\$\{{?{name}\b}}?", value, line)
        if line and not line.startswith("#"):
            yield number, line


def gsae_argv(line: str) -> tuple[str, ...] | None:
    """The arguments after `gsae` (or `python -m gsae`, `torchrun ... -m gsae`); `make demo`
    is the Makefile's demo command; None for any other command. Optional parts written as
    `[--flag value]` are given, other `[...]` parts left out."""
    if not re.match(r"(gsae|make|torchrun|python3?)\s", line + " "):
        return None  # not a command line (a formula, a JSON schema)
    line = re.sub(r"\[(--[^\]]*)\]", r"\1", line)
    line = re.sub(r"\[[^\]]*\]", "", line)
    words = shlex.split(line, comments=True)
    if words[:2] == ["make", "demo"]:
        return makefile_demo()
    if words and words[0] == "gsae":
        return tuple(words[1:])
    for i in range(len(words) - 1):
        if words[i:i + 2] == ["-m", "gsae"]:
            return tuple(words[i + 2:])
    return None


@functools.cache
def makefile_demo() -> tuple[str, ...]:
    recipe = re.search(r"^demo:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "the Makefile has no demo recipe"
    words = shlex.split(recipe.group(1))
    assert words[0].endswith("/gsae"), words
    return tuple(words[1:])


def why_not_run(line: str, argv: tuple[str, ...]) -> str:
    if argv and argv[0] in PARSE_ONLY:
        return PARSE_ONLY[argv[0]]
    if "torchrun" in line.split()[0] or "cuda" in argv:
        return "torchrun and GPUs; tests/test_distributed.py runs two ranks"
    if re.search(r"<[^>]*>|path/to/", line):
        return "a placeholder stands for the user's own path"
    return ""


def shell_examples(path: Path) -> Iterator[Example]:
    file, names = str(path.relative_to(ROOT)), {}
    for language, line, body in blocks(path):
        if language not in SHELL_LANGUAGES:
            continue
        for number, command in command_lines(body, names):
            argv = gsae_argv(re.sub(r"<[^>]*>", "PLACEHOLDER", command))
            if argv is not None:
                yield Example(file, line + number, command, argv, why_not_run(command, argv))


def python_examples(path: Path) -> Iterator[Example]:
    file = str(path.relative_to(ROOT))
    for language, line, body in blocks(path):
        if language == "python":
            skip = next((why for pattern, why in SKIP_PYTHON if pattern.search(body)), "")
            yield Example(file, line, body, why_not_run=skip)


def config_examples(path: Path) -> Iterator[Example]:
    """The ```json blocks that are config files (they name their command)."""
    file = str(path.relative_to(ROOT))
    for language, line, body in blocks(path):
        if language == "json" and re.match(r'\s*\{\s*"command"', body):
            yield Example(file, line, body)


def in_order(paths: list[Path]) -> list[Path]:
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(paths, key=lambda p: (rank.get(str(p.relative_to(ROOT)), len(ORDER)), p))


SHELL = [e for path in in_order(MARKDOWN) for e in shell_examples(path)]
PYTHON = [e for path in in_order(MARKDOWN) for e in python_examples(path)]
CONFIG_FILES = [e for path in MARKDOWN for e in config_examples(path)]


# ------------------------------------------------------------------------------- parsing


class Refused(Exception):
    """The parser refused a command line (its one-line message is the text)."""


def parse(argv: tuple[str, ...]) -> tuple[Any, Any]:
    """The parsed arguments of a gsae command line and, for the config commands, its config
    tree built and checked as the command builds it (a --config file is not read)."""
    name = argv[0] if argv else ""
    command = COMMANDS.get(name)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser(only=name if command else None).parse_args(list(argv))
    except SystemExit as done:
        if done.code:
            raise Refused(err.getvalue().strip()) from None
        return None, None  # --help
    if command is None:
        return args, None
    tree_cls = command.tree()
    return args, config.build(tree_cls, {}, config.explicit_settings(args, tree_cls))


@pytest.mark.parametrize("example", SHELL, ids=lambda e: e.id)
def test_every_gsae_command_of_the_docs_parses(example: Example) -> None:
    try:
        parse(example.argv)
    except Refused as err:
        pytest.fail(f"{example.id}: `{example.text}` is refused: {err}")


@pytest.mark.parametrize("example", CONFIG_FILES, ids=lambda e: e.id)
def test_config_file_examples_build(example: Example) -> None:
    data = json.loads(example.text)
    config.build(COMMANDS[data["command"]].tree(), data, where=example.id)


def test_the_examples_are_found() -> None:
    """The extraction itself: a change of the docs' block syntax must not make it find
    nothing (and so check nothing)."""
    files = {e.file for e in SHELL}
    assert {"README.md", "docs/training.md", "docs/formats.md", "docs/steering.md",
            "docs/scaling-out.md"} <= files
    assert len(SHELL) >= 40 and sum(not e.why_not_run for e in SHELL) >= 20
    assert len(PYTHON) >= 10 and sum(not e.why_not_run for e in PYTHON) >= 6
    assert len(CONFIG_FILES) >= 1
    assert ("train",) in {e.argv for e in SHELL}  # make demo, from the Makefile
    steer = next(e for e in SHELL if "--prompt" in e.argv)
    assert steer.argv[-2:] == ("--new_tokens", "20")  # an optional [--flag value], given


def test_a_misspelled_flag_or_a_bad_value_is_refused() -> None:
    """The check finds what it is for: these are refused with the parser's one line."""
    for argv, message in [(("train", "--k", "32", "--bta", "0"), "unrecognized arguments"),
                          (("train", "--k", "0"), "--sae.k must be at least 1"),
                          (("eval", "runs/x", "--eval_tokens", "many"), "whole number"),
                          (("export", "a", "b", "--format", "tl"), "invalid choice")]:
        with pytest.raises((Refused, GsaeError), match=message):
            parse(argv)


# ------------------------------------------------------------------------------- running


def tiny_argv(argv: tuple[str, ...], corpus: str) -> list[str]:
    """`argv` on the tiny model with tiny budgets: `TINY` appended where the command has the
    setting, the default model's hook 15 named as the tiny model's hook 1."""
    words = [w.replace("layers.15", f"layers.{HOOK}") for w in argv]
    command = COMMANDS.get(words[0])
    if command is None or "--help" in words:
        return words
    keys = {s.key for s in config.settings(command.tree())}
    for key, value in TINY.items():
        if key in keys and not (command.recorded_defaults and key.startswith(RECORDED_SECTIONS)):
            words += [f"--{key}", value.format(corpus=corpus)]
    return words


def run_command(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def run_shell_examples(corpus: str) -> dict[str, str]:
    """Run every runnable shell example in order; the error output of each that failed, by
    id (a command given twice, with the same arguments once rewritten, runs once)."""
    failed, seen = {}, set()
    for example in SHELL:
        if example.why_not_run:
            continue
        argv = tiny_argv(example.argv, corpus)
        try:
            args = parse(tuple(argv))[0]  # None for --help
        except (Refused, GsaeError) as err:
            failed[example.id] = f"`{' '.join(argv)}` is refused: {err}"
            continue
        key = json.dumps(sorted(vars(args).items()), default=str) if args else " ".join(argv)
        if key in seen:
            continue
        seen.add(key)
        code, err = run_command(argv)
        if code != 0:
            failed[example.id] = f"`{' '.join(argv)}` exited with {code}: {err[-2000:]}"
    return failed


def tiny_python(code: str, number: int) -> str:
    """Python block `number` on the tiny model's hook, training into a folder of its own (a
    shell example, or another block, trained the same run into the folder it names)."""
    code = code.replace("layers.15", f"layers.{HOOK}")
    return re.sub(r"""(run\.train\.out\s*=\s*["'])([^"']+)""", rf"\1\2-py{number}", code)


def tiny_defaults(monkeypatch: pytest.MonkeyPatch, corpus: str) -> None:
    """The Python API's defaults made the tiny rewrite's: `TrainRun()` is what `gsae train`
    gives with the flags of `TINY`, and `gsae.activations` reads the tiny model."""
    import gsae
    import gsae.pipeline
    from gsae.states import activations

    tiny_run = parse(tuple(tiny_argv(("train",), corpus)))[1]
    monkeypatch.setattr(gsae.pipeline, "TrainRun", lambda: copy.deepcopy(tiny_run))
    monkeypatch.setattr(gsae, "activations", functools.partial(activations, model="tiny-llama"))


def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def run_python_examples() -> dict[str, str]:
    """Run the runnable Python blocks in order in one namespace; the traceback of each that
    failed, by id."""
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    failed = {}
    for number, example in enumerate(PYTHON):
        if example.why_not_run:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                exec(compile(tiny_python(example.text, number), example.id, "exec"), namespace)
        except Exception:
            failed[example.id] = traceback.format_exc(limit=-3)
    return failed


@pytest.fixture(scope="module")
def ran(corpus, tmp_path_factory):
    """Every runnable example run once, in a fresh folder: the failures by id, the folder."""
    folder = tmp_path_factory.mktemp("docs-examples")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        hub_offline(patch)  # a path that is no folder fails at once, not after retries
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            failed = run_shell_examples(corpus)
            tiny_defaults(patch, corpus)
            failed.update(run_python_examples())
        finally:
            torch.set_num_threads(threads)
    return failed, folder


RUN = [e for e in SHELL + PYTHON if not e.why_not_run]


@pytest.mark.parametrize("example", RUN, ids=lambda e: e.id)
def test_the_docs_examples_run_on_the_tiny_model(ran, example: Example) -> None:
    failed, _ = ran
    assert example.id not in failed, failed[example.id]


def test_the_python_training_examples_train_what_the_command_does(ran) -> None:
    """README and training.md: "the same training in Python" gives the command's SAE, bit for
    bit."""
    from gsae import SAE

    _, folder = ran
    sae = Path(f"model.layers.{HOOK}") / "k32-beta0-z-x16-s0"
    command = SAE.load(folder / "runs/topk" / sae).state_dict()
    runs = sorted((folder / "runs").glob("topk-py*"))
    assert len(runs) == 2
    for run in runs:
        python = SAE.load(run / sae).state_dict()
        assert all(command[name].equal(python[name]) for name in command), run.name


@pytest.mark.parametrize("example", PYTHON, ids=lambda e: e.id)
def test_python_examples_compile_and_import_what_gsae_has(example: Example) -> None:
    tree = ast.parse(example.text, example.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gsae":
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{example.id}: {node.module} has no {missing}"
