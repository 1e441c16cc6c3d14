"""Atomic writes, JSON and tensor files, folder identity, and the versions block."""

import json
import math
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from gsae.errors import GsaeError
from gsae.io import (
    atomic_output,
    claim_folder,
    differing_keys,
    file_fingerprint,
    files_fingerprint,
    read_json,
    save_tensors,
    versions,
    write_json,
)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


# Atomic writes ----------------------------------------------------------------------------------


def _dead_pid() -> int:
    pid = 999_999
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_atomic_output_appears_only_complete(tmp_path):
    final = tmp_path / "model"
    with atomic_output(final) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        assert not final.exists()
    assert (final / "config.json").read_text() == "{}"
    assert list(tmp_path.iterdir()) == [final]


def test_atomic_output_failure_leaves_nothing(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_output(final) as tmp:
        tmp.mkdir()
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_cleans_stale_and_keeps_live_temps(tmp_path):
    final = tmp_path / "model"
    stale = tmp_path / f".model.tmp-{_dead_pid()}-abcd"
    live = tmp_path / f".model.tmp-{os.getpid()}-beef"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "config.json").write_text("half")
    with atomic_output(final) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and live.exists()
    assert (final / "config.json").read_text() == "{}"


def test_atomic_output_keeps_the_first_writer(tmp_path):
    final = tmp_path / "model"
    with atomic_output(final) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("second")
        final.mkdir()
        (final / "config.json").write_text("first")
    assert (final / "config.json").read_text() == "first"
    assert list(tmp_path.iterdir()) == [final]


def test_atomic_output_replaces_a_file(tmp_path):
    final = tmp_path / "a.txt"
    final.write_text("old")
    with atomic_output(final) as tmp:
        tmp.write_text("new")
    assert final.read_text() == "new" and list(tmp_path.iterdir()) == [final]


def test_atomic_output_replace_swaps_a_whole_folder(tmp_path):
    final = tmp_path / "sae"
    final.mkdir()
    (final / "log.jsonl").write_text("old")
    with atomic_output(final, replace=True) as tmp:
        tmp.mkdir()
        (tmp / "cfg.json").write_text("{}")
    assert [p.name for p in final.iterdir()] == ["cfg.json"]
    assert list(tmp_path.iterdir()) == [final]


def test_written_files_follow_the_umask(tmp_path, umask_027):
    save_tensors(tmp_path / "w.safetensors", {"a": torch.arange(3.0)})
    write_json(tmp_path / "x.json", {"a": 1})
    with atomic_output(tmp_path / "folder") as tmp:
        tmp.mkdir()
        os.close(os.open(tmp / "inner", os.O_CREAT | os.O_WRONLY, 0o600))
    assert mode(tmp_path / "w.safetensors") == 0o640
    assert mode(tmp_path / "x.json") == 0o640
    assert mode(tmp_path / "folder") == 0o750 and mode(tmp_path / "folder" / "inner") == 0o640
    os.umask(0o002)
    save_tensors(tmp_path / "w.safetensors", {"a": torch.arange(3.0)})
    assert mode(tmp_path / "w.safetensors") == 0o664


# JSON and tensors -------------------------------------------------------------------------------


def test_json_round_trip_and_nan_refused(tmp_path):
    path = write_json(tmp_path / "sub" / "x.json", {"a": [1, 2.5], "b": None})
    assert read_json(path, "a test record") == {"a": [1, 2.5], "b": None}
    assert path.read_text().endswith("\n")
    with pytest.raises(ValueError):
        write_json(path, {"a": math.nan})
    assert read_json(path, "a test record") == {"a": [1, 2.5], "b": None}  # old file kept
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


@pytest.mark.parametrize("text, message", [
    (None, r"x.json is missing: it should hold the thing$"),
    ('{"a": [1, 2', r"x.json is truncated or not valid JSON \(.* at line 1\): it should hold"),
    ("not json", r"x.json is truncated or not valid JSON"),
])
def test_read_json_errors_name_the_file(tmp_path, text, message):
    if text is not None:
        (tmp_path / "x.json").write_text(text)
    with pytest.raises(GsaeError, match=message) as err:
        read_json(tmp_path / "x.json", "the thing")
    assert str(tmp_path / "x.json") in str(err.value) and "\n" not in str(err.value)


def test_save_tensors_writes_contiguous_cpu_copies(tmp_path):
    t = torch.arange(12.0).reshape(3, 4)
    save_tensors(tmp_path / "t.safetensors", {"t": t.t(), "p": torch.nn.Parameter(t)})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(loaded["t"], t.t()) and torch.equal(loaded["p"], t)


# Folder identity --------------------------------------------------------------------------------


def test_claim_folder_new_same_and_different(tmp_path):
    folder = tmp_path / "run"
    identity = {"model": {"name": "m", "rev": None}, "k": [1, 2], "lr": 0.1}
    file = claim_folder(folder, "id.json", identity, "a test run")
    assert json.loads(file.read_text()) == identity
    (folder / "work.txt").write_text("progress")
    claim_folder(folder, "id.json", dict(identity), "a test run")  # the same: continue
    assert (folder / "work.txt").exists()
    other = {**identity, "model": {"name": "m", "rev": "v2"}, "lr": 0.2}
    with pytest.raises(GsaeError) as err:
        claim_folder(folder, "id.json", other, "a test run")
    message = str(err.value)
    assert message.startswith(f"{folder} holds a test run made with other settings")
    assert "differs in: lr, model.rev;" in message and str(file) in message
    assert "--overwrite" in message and "\n" not in message
    claim_folder(folder, "id.json", other, "a test run", overwrite=True)
    assert json.loads(file.read_text()) == other


def test_claim_folder_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(GsaeError, match=f"{tmp_path} is not empty but does not hold a store: .*"
                       "--overwrite"):
        claim_folder(tmp_path, "id.json", {"a": 1}, "a store")
    assert not (tmp_path / "id.json").exists()
    claim_folder(tmp_path, "id.json", {"a": 1}, "a store", overwrite=True)
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "id.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_folder(empty, "id.json", {"a": 1}, "a store")
    assert (empty / "id.json").exists()


def test_differing_keys():
    assert differing_keys({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 5}, "e": 0}) == [
        "b.c", "b.d", "e"]
    assert differing_keys({"a": [1]}, {"a": [1]}) == []


# Records ----------------------------------------------------------------------------------------


def test_versions_block():
    found = versions()
    assert {"gsae", "torch", "transformers", "python"} <= set(found)
    assert found["torch"] == torch.__version__


def test_fingerprints(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * (3 << 20))
    b.write_bytes(b"x" * (3 << 20))
    assert file_fingerprint(a) == file_fingerprint(b)
    b.write_bytes(b"x" * ((3 << 20) - 1) + b"y")  # the last MiB differs
    assert file_fingerprint(a) != file_fingerprint(b)
    first = files_fingerprint(tmp_path, [a, b])
    assert files_fingerprint(tmp_path, [b, a]) == first
    b.rename(tmp_path / "c.bin")
    assert files_fingerprint(tmp_path, [a, tmp_path / "c.bin"]) != first
