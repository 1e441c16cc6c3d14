"""The typed results (`gsae.records`): the committed results.json files of every schema load,
with numbers read by hand from the JSON; JSON round trips; the base class's rules."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from gsae.errors import GsaeError
from gsae.hooks import FULL
from gsae.records import (
    FULL_FORWARD,
    ComparisonResult,
    EvalResult,
    EvalRunInfo,
    Record,
    ScalingResult,
    SteerResult,
)
from gsae.study.registers_report import build_registers_report

RESULTS = Path(__file__).parents[1] / "docs" / "results"


def committed(name: str) -> dict:
    return json.loads((RESULTS / name / "results.json").read_text())


def test_the_committed_comparison_of_schema_1_loads():
    data = committed("")
    result = ComparisonResult.from_json(data)
    assert data["schema"] == "gsae.compare/1" and result.schema == "gsae.compare/2"
    assert result.command == "gsae compare --report docs/results"
    assert (result.hook, result.store_tokens, result.wall_seconds) == ("model.layers.15", 153187,
                                                                        4729.4)
    s = result.settings  # /1 settings moved to their /2 sections
    assert s["sae"]["k"] == [8, 16, 32, 64] and s["sae"]["expansion_factor"] == [16]
    assert s["compare"]["sweep_beta"] == [30.0, 1000.0] and "k" not in s["compare"]
    assert s["steer"]["latents"] == 16 and s["train"]["shuffle_seed"] == 0
    assert s["train"]["device"] == "cpu" and s["eval"]["eval_tokens"] == 8192
    assert len(result.saes) == 32 and result.saes[0]["train"]["fvu"] == 0.744412
    assert data["settings"]["steer"]["steer_latents"] == 16  # the input is not changed
    assert ComparisonResult.from_json(result.to_json()) == result


def test_the_comparisons_eval_and_steer_blocks_load_as_schema_1():
    data = committed("")
    evaluated = EvalResult.from_json(data["eval"])
    first = evaluated.results[0]
    assert len(evaluated.results) == 64 and (first.sae, first.mode) == ("k8-beta0-z-x16-s0",
                                                                         "grad-aware")
    assert (first.ce_increase, first.fvu, first.dead_latents) == (3.23417, 0.755407, 2448)
    assert evaluated.run.forward == {"model.layers.15": "full"}
    steered = SteerResult.from_json(data["steer"])
    assert len(steered.results) == 32 and steered.run.settings["latents"] == 16
    assert steered.run.settings["alphas"] == [1.0, 4.0] and steered.results[0].latents is None
    assert "values" in steered.results[0].to_json() and "latents" not in \
        steered.results[0].to_json()


def test_the_committed_scaling_study_of_schema_1_loads():
    data = committed("scaling")
    result = ScalingResult.from_json(data)
    assert data["schema"] == "gsae.scaling/1" and result.schema == "gsae.scaling/2"
    assert list(result.corpora) == ["train", "news"] and list(result.eval) == ["train", "news"]
    assert result.corpora["news"]["corpus_contexts"] == 588
    assert (result.store["rows"], result.store["repeated_rows"]) == (545479, 775)
    first = result.eval["news"]["results"][0]
    assert (first["variant"], first["snapshot"], first["ce_increase"]) == (
        "k32-beta0-z-n9216-s0", 150000, 1.37836)
    assert result.distances == {} and result.per_token == {}  # added within /2
    assert [s["requested_tokens"] for s in result.saes[0]["snapshots"]] == [
        150000, 300000, 600000, 1200000, 2400000]
    assert "unseen" in data["eval"]  # the input is not changed
    assert ScalingResult.from_json(result.to_json()) == result


def test_the_committed_registers_study_of_schema_2_loads():
    data = committed("registers")
    result = ScalingResult.from_json(data)
    assert list(result.eval) == ["train", "news", "code", "legal", "verse", "german"]
    assert result.distances["corpora"]["code"]["unigram_kl"] == 4.11694
    assert result.distances["reference_tokens"] == 554240
    assert list(result.per_token) == ["train", "code"]  # code: the largest gradient-free gap
    assert result.eval["german"]["results"][0]["ce_increase"] == 1.48992
    assert result.wall_seconds == 14700.1 and result.store["repeated_rows"] == 667
    run = EvalResult.from_json({**data["eval"]["code"], "schema": "gsae.eval/2"}).run
    assert run.part == "all" and run.corpus["dataset"] == "code"


def test_the_committed_registers_report_rebuilds_byte_identical(tmp_path):
    build_registers_report(committed("registers"), tmp_path)
    for name in ("README.md", "results.json", "gap_vs_distance.png", "per_token_gap.png"):
        assert (tmp_path / name).read_bytes() == (RESULTS / "registers" / name).read_bytes(), name


def test_a_result_is_written_schema_first_with_every_field():
    data = committed("")
    result = ComparisonResult.from_json(data)
    written = result.to_json()
    assert list(written) == ["schema", *[k for k in data if k not in ("schema", "aggregates",
                                                                       "claims")]]
    assert written["schema"] == "gsae.compare/2"


def test_unreadable_schemas_and_missing_fields_give_one_line():
    with pytest.raises(GsaeError, match=r"not a gsae compare result \(schema 'gsae.eval/2'; "
                       r"readable: gsae.compare/1, gsae.compare/2\)"):
        ComparisonResult.from_json({"schema": "gsae.eval/2"})
    with pytest.raises(GsaeError, match="not a gsae study result .schema None"):
        ScalingResult.from_json({})
    data = committed("registers")
    del data["corpora"]
    with pytest.raises(GsaeError, match="^not a gsae study result: it lacks corpora$"):
        ScalingResult.from_json(data)


@dataclass
class _Row(Record):
    KIND: ClassVar[str] = "row"
    name: str
    extra: list[int] | None = None
    OMIT_NONE: ClassVar[tuple[str, ...]] = ("extra",)


@dataclass
class _Table(Record):
    SCHEMA: ClassVar[str | None] = "gsae.table/3"
    OLD_SCHEMAS: ClassVar[tuple[str, ...]] = ("gsae.table/1", "gsae.table/2")
    UNMARKED: ClassVar[str | None] = "gsae.table/1"
    rows: list[_Row]
    head: _Row
    note: dict = field(default_factory=dict)

    @classmethod
    def upgrade(cls, data, schema):
        data.setdefault("head", {"name": f"was {schema}"})
        return data


def test_the_base_class_reads_nested_records_and_migrates_old_schemas():
    table = _Table([_Row("a"), _Row("b", [1])], _Row("h"))
    assert table.to_json() == {"schema": "gsae.table/3", "rows": [{"name": "a"},
                               {"name": "b", "extra": [1]}], "head": {"name": "h"}, "note": {}}
    assert _Table.from_json(table.to_json()) == table
    old = {"schema": "gsae.table/2", "rows": [{"name": "a", "unknown": 1}]}
    assert _Table.from_json(old) == _Table([_Row("a")], _Row("was gsae.table/2"))
    assert "head" not in old  # a copy was upgraded
    assert _Table.from_json({"rows": []}).head == _Row("was gsae.table/1")  # unmarked: /1
    with pytest.raises(GsaeError, match="^not a gsae row: it lacks name$"):
        _Table.from_json({**table.to_json(), "head": {}})


def test_the_records_name_the_hooks_full_forward():
    assert FULL_FORWARD == FULL


@dataclass
class _Scratch(Record):
    NOT_SAVED: ClassVar[tuple[str, ...]] = ("scratch",)
    name: str
    scratch: list[int] = field(default_factory=list)
    tags: dict = field(default_factory=dict)


def test_fields_never_saved_stay_out_and_a_part_fills_its_defaults():
    assert _Scratch("a", [1, 2], {"t": 1}).to_json() == {"name": "a", "tags": {"t": 1}}
    assert _Scratch.from_json({"name": "a"}) == _Scratch("a")  # a part: no schema, no upgrade
    run = EvalRunInfo.from_json(committed("")["eval"]["run"])  # recorded before "forward"
    assert run.forward == {}


def test_an_unmarked_eval_block_keeps_the_forward_it_recorded():
    block = committed("")["eval"]
    assert "schema" not in block and "forward" not in block["run"]
    block["run"]["forward"] = {"model.layers.15": "above-hook"}
    assert EvalResult.from_json(block).run.forward == {"model.layers.15": "above-hook"}
    del block["run"]["forward"]
    assert EvalResult.from_json(block).run.forward == {"model.layers.15": FULL_FORWARD}


def test_the_committed_objectives_report_rebuilds_byte_identical(tmp_path):
    from gsae.study.objectives_report import build_objectives_report

    data = committed("objectives")
    sweep = data["fisher_sweep"]
    assert sweep["chosen"] == 0.001 and sweep["validation_contexts"] == [3904, 3968]
    build_objectives_report(data, tmp_path)
    for name in ("README.md", "results.json", "ce_increase_vs_tokens.png",
                 "pareto_ce_vs_fvu.png", "reduction_vs_topk.png"):
        assert (tmp_path / name).read_bytes() == (RESULTS / "objectives" / name).read_bytes(), name
