"""The config tree: flags generated from nested dataclasses, config files, bounds, identity."""

import json

import pytest

from gsae import GsaeError
from gsae.config import (
    OneLineParser,
    add_arguments,
    build,
    explicit_settings,
    flag_names,
    identity,
    read_file,
    sweep_configs,
    to_dict,
)
from gsae.pipeline import EvaluationRun, TrainRun


def parse(tree_cls, argv, base=None):
    parser = OneLineParser(prog="gsae test")
    add_arguments(parser, tree_cls)
    args = parser.parse_args(argv)
    return build(tree_cls, base, explicit_settings(args, tree_cls))


def test_short_flags_belong_to_the_first_section_and_dotted_flags_always_work():
    names = flag_names(TrainRun)
    assert names["sae.k"] == "--k" and names["train.tokens"] == "--tokens"
    assert names["model.device"] == "--device" and names["train.device"] == "--train.device"
    assert names["sae.seed"] == "--seed" and names["train.shuffle_seed"] == "--shuffle_seed"
    run = parse(TrainRun, ["--k", "8", "--train.device", "cuda:1", "--device", "cpu",
                           "--train.tokens", "5000", "--model.model", "tiny-gpt2"])
    assert run.sae.k == [8] and run.train.device == "cuda:1" and run.model.device == "cpu"
    assert run.train.tokens == 5000 and run.model.model == "tiny-gpt2"
    # Settings not given keep the dataclasses' defaults.
    assert run.train.batch_tokens == TrainRun().train.batch_tokens


def test_sweep_flags_take_comma_lists_and_give_the_product_in_order():
    run = parse(TrainRun, ["--k", "8,16", "--beta", "0,20.5", "--value_mode", "z"])
    combos = [(c.k, c.beta, c.value_mode) for c in sweep_configs(run.sae)]
    assert combos == [(8, 0.0, "z"), (8, 20.5, "z"), (16, 0.0, "z"), (16, 20.5, "z")]


def test_a_config_file_round_trips_and_flags_override_it(tmp_path):
    run = parse(TrainRun, ["--k", "4,8", "--tokens", "5000", "--hooks", "3", "7",
                           "--lr", "0.001", "--resume"])
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"command": "train", **to_dict(run)}))
    again = build(TrainRun, read_file(path))
    assert again == run
    overridden = parse(TrainRun, ["--tokens", "7000"], base=read_file(path))
    assert overridden.train.tokens == 7000 and overridden.sae.k == [4, 8]
    assert overridden.source.hooks == ["3", "7"]


def test_yaml_config_files(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  tokens: 3000\nsae:\n  k: [16, 32]\n  beta: 0\n")
    run = build(TrainRun, read_file(path))
    assert run.train.tokens == 3000 and run.sae.k == [16, 32] and run.sae.beta == [0.0]


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--train.lr must be at least 0, got -1.0"),
    (["--tokens", "0"], "--train.tokens must be at least 1, got 0"),
    (["--batch_tokens", "-5"], "--train.batch_tokens must be at least 1"),
    (["--decay_fraction", "1.5"], "--train.decay_fraction must be at most 1"),
    (["--outlier_factor", "-2"], "--source.outlier_factor must be at least 0"),
    (["--autocast", "fp8"], "--source.autocast must be one of none, bf16"),
    (["--b_dec_init", "zeros"], "--train.b_dec_init must be one of geometric_median, mean"),
    (["--dtype", "int8"], "--model.dtype must be one of float32, bfloat16, float16"),
])
def test_out_of_range_settings_are_refused_with_the_flag(argv, message):
    with pytest.raises(GsaeError) as err:
        parse(TrainRun, argv)
    assert message in str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "argument --lr/--train.lr: expected a finite number, got 'nan'"),
    (["--lr", "inf"], "expected a finite number, got 'inf'"),
    (["--k", "abc"], "argument --k/--sae.k: expected a whole number, got 'abc'"),
    (["--tokens", "1e5"], "argument --tokens/--train.tokens: expected a whole number"),
    (["--resume", "maybe"], "expected true or false, got 'maybe'"),
])
def test_unreadable_values_are_one_line_naming_the_flag_and_type(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(TrainRun, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1


def test_config_file_errors_name_the_file_and_setting(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"train": {"tokenz": 5}}')
    with pytest.raises(GsaeError, match="unknown setting 'train.tokenz'"):
        build(TrainRun, read_file(path))
    path.write_text('{"train": {"tokens": "many"}}')
    with pytest.raises(GsaeError, match="--train.tokens in the config file must be int"):
        build(TrainRun, read_file(path))
    path.write_text('{"train": {"tokens": 5')
    with pytest.raises(GsaeError, match="bad.json is not valid json"):
        read_file(path)
    with pytest.raises(GsaeError, match="does not exist"):
        read_file(tmp_path / "missing.json")


def test_identity_leaves_out_where_and_how_a_run_executes():
    a = TrainRun()
    b = TrainRun()
    b.train.out, b.train.device, b.train.resume, b.model.device = "/elsewhere", "cuda", True, "mps"
    b.train.keep_training_state = True
    assert identity(a) == identity(b)
    b.train.tokens += 1
    assert identity(a) != identity(b)


def test_positional_sae_folders():
    run = parse(EvaluationRun, ["a", "b", "--eval_tokens", "64", "--seed", "3"])
    assert run.saes == ["a", "b"] and run.eval.eval_tokens == 64 and run.eval.seed == 3


# Behaviour that deliberately broken code once got past -------------------------------------------


@pytest.mark.parametrize("tree, message", [
    ({"train": {"tokens": True}}, "--train.tokens in the config file must be int, got True"),
    ({"sae": {"k": [4, False]}}, "--sae.k in the config file must be int, got False"),
    ({"train": {"lr": True}}, "--train.lr in the config file must be float, got True"),
    ({"train": {"resume": 1}}, "--train.resume in the config file must be bool, got 1"),
    ({"train": {"tokens": 5.0}}, "--train.tokens in the config file must be int, got 5.0"),
])
def test_a_bool_is_not_a_number_nor_a_number_a_bool(tmp_path, tree, message):
    import re

    path = tmp_path / "run.json"
    path.write_text(json.dumps(tree))
    with pytest.raises(GsaeError, match=re.escape(message)):
        build(TrainRun, read_file(path))


def test_settings_built_in_python_refuse_a_bool_for_a_number():
    from gsae.config import validate

    run = TrainRun()
    run.train.tokens = True
    with pytest.raises(GsaeError, match="--train.tokens .*must be int, got True"):
        validate(run)
    run = TrainRun()
    run.train.lr = 1  # a whole number is a float setting's value
    validate(run)
    assert build(TrainRun, {"train": {"lr": 1}}).train.lr == 1.0
    assert isinstance(build(TrainRun, {"train": {"lr": 1}}).train.lr, float)
