"""One validation path (`gsae.config.validate`): a bad setting gives the same one-line error
whether it came from a flag, a config file or a tree built in Python and passed to the
pipeline; a bare section checked by a library function names its settings without a section."""

import json
from dataclasses import dataclass, field, replace

import pytest

from gsae import pipeline
from gsae.cli import main
from gsae.config import build, validate
from gsae.errors import GsaeError
from gsae.models import ModelConfig, model_identity
from gsae.sae import SAE, Provenance, SAEConfig
from gsae.steer import SteerConfig, steer
from gsae.text import DataConfig, corpus_identity, split_documents


@pytest.fixture(scope="module")
def sae_dir(corpus, tmp_path_factory):
    """An SAE folder of the tiny model at layer 1 that records its corpus."""
    data = DataConfig(dataset=corpus, context_size=32)
    provenance = Provenance(hook="model.layers.1", model=model_identity(ModelConfig("tiny-llama")),
                            corpus=corpus_identity(data), context_size=32)
    return str(SAE(SAEConfig(n_latents=128, k=4), 64, provenance=provenance)
               .save(tmp_path_factory.mktemp("sae") / "sae"))


def study_runner(module: str, name: str):
    def run(tree):
        import importlib

        return getattr(importlib.import_module(f"gsae.study.{module}"), name)(tree)

    return run


def study_tree(module: str, name: str):
    def tree():
        import importlib

        return getattr(importlib.import_module(f"gsae.study.{module}"), name)()

    return tree


def serve(run):
    from gsae.browser.serve import serve as serve_run

    serve_run(run)


def inspect(run):
    from gsae.browser import run_inspect

    run_inspect(run)


def inspect_tree():
    from gsae.browser import InspectRun

    return InspectRun()


def serve_tree():
    from gsae.browser.serve import ServeRun

    return ServeRun()


# command, its tree, its pipeline function, whether it takes the SAE folder; then the bad
# settings as flags and as dotted keys with their values, and the one line expected
COMMANDS = {
    "train": (pipeline.TrainRun, pipeline.train, False),
    "cache": (pipeline.CacheRun, pipeline.cache, False),
    "eval": (pipeline.EvaluationRun, pipeline.run_evals, True),
    "steer": (pipeline.SteeringRun, pipeline.run_steer, True),
    "finetune": (pipeline.FinetuneRun, pipeline.finetune, True),
    "inspect": (inspect_tree, inspect, True),
    "serve": (serve_tree, serve, True),
    "compare": (study_tree("compare", "CompareRun"), study_runner("compare", "run_compare"),
                False),
    "study": (study_tree("scaling", "ScalingRun"), study_runner("scaling", "run_study"), False),
}
CASES = [
    ("train", ["--tokens", "0"], {"train.tokens": 0}, "--train.tokens must be at least 1, got 0"),
    ("train", ["--eval_fraction", "1"], {"data.eval_fraction": 1.0},
     "--data.eval_fraction must be less than 1, got 1.0"),
    ("train", ["--tokens", "512", "--batch_tokens", "1024"],
     {"train.tokens": 512, "train.batch_tokens": 1024},
     "--batch_tokens 1024 is more than --tokens 512: a step takes batch_tokens rows, so make it "
     "at most the budget"),
    ("train", ["--tokens", "4096", "--snapshots", "256", "5000"],
     {"train.tokens": 4096, "train.snapshots": [256, 5000]},
     "--snapshots 5000: beyond --tokens 4096, where training stops, so they would never be saved; "
     "give counts up to --tokens, or raise --tokens"),
    ("train", ["--context_size", "2"], {"data.context_size": 2},
     "--context_size 2 with --skip_first 1 leaves no position to train on: positions "
     "skip_first .. context_size-2 are used, so make context_size larger than skip_first + 1"),
    ("train", ["--n_latents", "8", "--k", "4,16"], {"sae.n_latents": [8], "sae.k": [4, 16]},
     "k must be between 1 and the number of latents (8), got 16"),
    ("cache", ["--tokens", "0"], {"store.tokens": 0}, "--store.tokens must be at least 1, got 0"),
    ("eval", ["--eval_tokens", "0"], {"eval.eval_tokens": 0},
     "--eval.eval_tokens must be at least 1, got 0"),
    ("eval", ["--unseen", "news", "news"], {"unseen": ["news", "news"]},
     "--unseen names 'news' twice or as the training corpus: name each corpus no SAE trained on "
     "once"),
    ("steer", ["--contexts", "8", "--pool", "10"], {"steer.contexts": 8, "steer.pool": 10},
     "pool (10) must hold the two sets of contexts (8 contexts each)"),
    ("steer", ["--alphas", "1", "0"], {"steer.alphas": [1.0, 0.0]},
     "--steer.alphas must be greater than 0, got 0.0"),
    ("steer", ["--latent", "3"], {"latent": 3},
     "--latent and --prompt go together: give both to steer one latent on your text, or "
     "neither for the steering evaluation"),
    ("finetune", ["--kl_weight", "2"], {"train.kl_weight": 2.0},
     "--train.kl_weight must be at most 1, got 2.0"),
    ("inspect", ["--tokens", "0"], {"inspect.tokens": 0},
     "--inspect.tokens must be at least 1, got 0"),
    ("inspect", ["--latents", "3,x"], {"inspect.latents": "3,x"},
     "latents is '3,x': give latent ids (whole numbers from 0) separated by commas, e.g. 12,977"),
    ("serve", ["--port", "-1"], {"port": -1}, "--port must be at least 0, got -1"),
    ("compare", ["--steer.context_size", "1"], {"steer.context_size": 1},
     "--steer.context_size 1 leaves no position to steer at: give 0 (the corpus's context size) "
     "or at least 2"),
    ("study", ["--unseen_tokens", "0"], {"study.unseen_tokens": 0},
     "--study.unseen_tokens must be at least 1, got 0"),
    ("train", ["--validation_fraction", "0.1"], {"train.validation_fraction": 0.1},
     "--validation_fraction 0.1 keeps shards of an activation store out of training: give "
     "--store as well"),
    ("study", ["--validation_fraction", "0.6"], {"study.validation_fraction": 0.6},
     "--study.validation_fraction must be at most 0.5, got 0.6"),
]


def nested(values: dict) -> dict:
    """Dotted keys as a config file's tree."""
    tree: dict = {}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        (tree.setdefault(section, {}) if section else tree)[name] = value
    return tree


def cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gsae")]
    assert len(lines) == 1, lines
    return lines[0].removeprefix("gsae: error: ")


def python_error(command, values, sae_dir, tmp_path) -> str:
    """The error of the pipeline function on a tree built in Python (no `build`)."""
    tree_cls, run, with_sae = COMMANDS[command]
    tree = tree_cls()
    if with_sae:
        tree.saes = [sae_dir]
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(tree, section) if section else tree, name, value)
    with pytest.raises(GsaeError) as info:
        run(tree)
    return str(info.value)


@pytest.mark.parametrize("command, flags, values, line", CASES,
                         ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_a_bad_setting_gives_one_line_from_flags_a_file_and_python(
        command, flags, values, line, sae_dir, corpus, tmp_path, capsys):
    head = [command, *([sae_dir] if COMMANDS[command][2] else [])]
    if command in ("train", "cache"):
        head += ["--model", "tiny-llama", "--dataset", corpus]
    out = ["--out", str(tmp_path / "out")] if command in ("compare", "study") else []
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(nested(values)))
    from_flags = cli_error([*head, *out, *flags], capsys)
    from_file = cli_error([*head, *out, "--config", str(config)], capsys)
    from_python = python_error(command, values, sae_dir, tmp_path)
    assert from_flags == from_file == from_python == line
    assert not (tmp_path / "out").exists()
    with pytest.raises(GsaeError) as built:  # refused while the tree is built, before any work
        saes = {"saes": [sae_dir]} if COMMANDS[command][2] else {}
        build(type(COMMANDS[command][0]()), {**saes, **nested(values)})
    assert str(built.value) == line


@pytest.mark.parametrize("command", ["compare", "study"])
def test_the_studies_refuse_a_pool_without_room_for_both_sets(command, tmp_path, capsys):
    """The sampled evaluation's rule (not checked while building: steering one latent on a
    prompt draws no sets), checked by the studies before any work."""
    line = "pool (6) must hold the two sets of contexts (4 contexts each)"
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"steer": {"pool": 6}}))
    out = ["--out", str(tmp_path / "out")]
    assert cli_error([command, *out, "--steer.pool", "6"], capsys) == line
    assert cli_error([command, *out, "--config", str(config)], capsys) == line
    assert python_error(command, {"steer.pool": 6}, "", tmp_path) == line
    assert not (tmp_path / "out").exists()


def test_steering_one_latent_on_a_prompt_draws_no_sets(sae_dir):
    run = pipeline.SteeringRun(saes=[sae_dir], latent=3, prompt="hi")
    run.steer.pool = 4
    validate(run)
    run.latent, run.prompt = -1, ""
    with pytest.raises(GsaeError, match=r"^pool \(4\) must hold"):
        validate(run)


@pytest.mark.parametrize("command, values, line", [
    ("train", {"source.hooks": []}, "--source.hooks must list at least one value, got []"),
    ("train", {"sae.k": []}, "--sae.k must list at least one value, got []"),
    ("steer", {"steer.alphas": []}, "--steer.alphas must list at least one value, got []"),
])
def test_an_empty_list_from_a_file_or_python_is_refused_as_flags_refuse_it(
        command, values, line, sae_dir, corpus, tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(nested(values)))
    head = [command, *([sae_dir] if COMMANDS[command][2] else [])]
    assert cli_error([*head, "--config", str(config)], capsys) == line
    assert python_error(command, values, sae_dir, tmp_path) == line


def test_a_bare_section_is_checked_by_the_library_the_same_way_without_a_section():
    with pytest.raises(GsaeError, match=r"^--fisher_coef must be at least 0, got -0.5$"):
        SAE(SAEConfig(n_latents=8, k=2, fisher_coef=-0.5), 4)
    with pytest.raises(GsaeError, match=r"^--eval_fraction must be less than 1, got 1.0$"):
        split_documents(["a", "b"], DataConfig(eval_fraction=1.0), "train")
    with pytest.raises(GsaeError, match=r"^pool \(3\) must hold"):
        steer(saes=[], model=None, tokenizer=None, data_cfg=DataConfig(), cfg=SteerConfig(pool=3))
    with pytest.raises(GsaeError, match=r"^--steer.context_size 1 leaves no position"):
        validate(SteerConfig(context_size=1))


def test_a_section_check_runs_for_every_combination_of_a_sweep():
    run = pipeline.TrainRun()
    run.sae.n_latents, run.sae.expansion_factor, run.sae.k = [0, 8], [2], [4, 9]
    with pytest.raises(GsaeError, match=r"\(8\), got 9$"):
        validate(run)
    run.sae.k = [4, 8]
    validate(run)


@dataclass
class _Bounded:
    low: float = field(default=0.0, metadata={"min": 0})
    positive: float = field(default=1.0, metadata={"above": 0})
    high: float = field(default=1.0, metadata={"max": 1})
    share: float = field(default=0.5, metadata={"below": 1})
    count: int = 0
    name: str = ""


@pytest.mark.parametrize("setting, edge, beyond, message", [
    ("low", 0.0, -1e-9, "must be at least 0"), ("positive", 1e-9, 0.0, "must be greater than 0"),
    ("high", 1.0, 1.000001, "must be at most 1"), ("share", 0.999999, 1.0, "must be less than 1"),
    ("count", -2**63, -2**63 - 1, "must fit in 64 bits"),
    ("count", 2**63 - 1, 2**63, "must fit in 64 bits")])
def test_each_bound_admits_its_edge_and_refuses_just_beyond(setting, edge, beyond, message):
    validate(replace(_Bounded(), **{setting: edge}))
    with pytest.raises(GsaeError, match=f"^--{setting} {message}"):
        validate(replace(_Bounded(), **{setting: beyond}))


def test_a_long_value_is_cut_in_the_message():
    with pytest.raises(GsaeError) as error:
        validate(replace(_Bounded(), count="x" * 200))
    text = str(error.value)
    assert len(text) < 150 and text.endswith("...")
