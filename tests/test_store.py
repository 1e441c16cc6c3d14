"""The activation store: what it holds, resuming, identity, checksums, and older stores."""

import hashlib
import json
import os
import stat
import warnings

import pytest
import torch
from safetensors.torch import load_file

from gsae import SAE, Provenance
from gsae.batch import Batch
from gsae.cli import main
from gsae.errors import GsaeError
from gsae.models import ModelConfig, load_model
from gsae.source import ActivationSource, SourceConfig
from gsae.store import StoreReader, StoreWriter
from gsae.text import DataConfig, batched_contexts, token_contexts


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# End to end with the tiny model -----------------------------------------------------------------


def test_store_equals_stream_and_resumes_after_a_kill(corpus, tmp_path, capsys, monkeypatch):
    store_args = ["--model", "tiny-llama", "--dataset", corpus, "--context_size", "64",
                  "--hooks", "0", "1", "--lm_batch_size", "4", "--tokens", "2000",
                  "--store.dtype", "float32", "--batches_per_shard", "2"]
    code, _, err = run(["cache", "--store", str(tmp_path / "full"), *store_args], capsys)
    assert code == 0, err
    # The stored rows equal what the source streams for the same contexts, bitwise.
    model, tok = load_model(ModelConfig(model="tiny-llama"))
    source = ActivationSource(model, SourceConfig(hooks=["0", "1"]))
    data = DataConfig(dataset=corpus, context_size=64)
    first_two = list(batched_contexts(token_contexts(data, tok, "train"), 4))[:2]
    streamed = [source.batches(t) for t in first_two]
    shard = load_file(str(tmp_path / "full" / "shard-000000.safetensors"))
    for hook in ("model.layers.0", "model.layers.1"):
        assert torch.equal(shard[f"{hook}.x"], torch.cat([s[hook].x for s in streamed]))
        assert torch.equal(shard[f"{hook}.g"], torch.cat([s[hook].g for s in streamed]))
    # A run killed after its second shard, then rerun, gives the same store.
    real_write = StoreWriter.write_shard
    calls = []

    def dying_write(self, chunks):
        real_write(self, chunks)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(StoreWriter, "write_shard", dying_write)
    code, _, _ = run(["cache", "--store", str(tmp_path / "cut"), *store_args], capsys)
    assert code == 130
    monkeypatch.setattr(StoreWriter, "write_shard", real_write)
    code, _, err = run(["cache", "--store", str(tmp_path / "cut"), *store_args], capsys)
    assert code == 0, err
    full = json.loads((tmp_path / "full" / "manifest.json").read_text())
    cut = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert cut == full and len(full["shards"]) >= 3
    for s in full["shards"]:
        a = load_file(str(tmp_path / "full" / s["file"]))
        b = load_file(str(tmp_path / "cut" / s["file"]))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Training from the store.
    code, out, err = run(["train", "--store", str(tmp_path / "full"), "--hooks", "1",
                          "--out", str(tmp_path / "run"), "--tokens", "1500",
                          "--batch_tokens", "256", "--expansion_factor", "2", "--k", "4"],
                         capsys)
    assert code == 0, err
    sae = SAE.load(tmp_path / "run" / "model.layers.1" / "k4-beta100-z-x2-s0")
    assert sae.provenance.model == full["identity"]["model"]


def test_mismatched_and_corrupt_stores_are_refused(corpus, tmp_path, capsys):
    args = ["--model", "tiny-llama", "--dataset", corpus, "--context_size", "64",
            "--hooks", "1", "--lm_batch_size", "4", "--tokens", "600", "--store.dtype", "float32"]
    assert run(["cache", "--store", str(tmp_path / "s"), *args], capsys)[0] == 0
    code, _, err = run(["cache", "--store", str(tmp_path / "s"), *args[:-1], "float16"], capsys)
    assert code == 2 and "made with other settings (differs in: dtype;" in err
    shard = tmp_path / "s" / "shard-000000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    code, _, err = run(["train", "--store", str(tmp_path / "s"), "--hooks", "1",
                        "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "missing or damaged shard-000000.safetensors" in err
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    code, _, err = run(["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r")],
                       capsys)
    assert code == 2 and "manifest.json is truncated or not valid JSON" in err


# The store's files, directly -------------------------------------------------------------------

HOOKS = ["h.0", "h.1"]
D = 6


def identity(**changes):
    return {"model": {"model": "m"}, "hooks": HOOKS, "d_in": D, "corpus": {"dataset": "c"},
            "context_size": 8, "skip_first": 1, "outlier_factor": 5.0, "autocast": "none",
            **changes}


def chunk(seed, rows=5):
    gen = torch.Generator().manual_seed(seed)
    return {h: Batch(torch.randn(rows, D, generator=gen), torch.randn(rows, D, generator=gen), h,
                     dropped_outliers=seed) for h in HOOKS}


def write_store(folder, n_shards=3, **kwargs):
    writer = StoreWriter(folder, identity(), "float32", 2, **kwargs)
    chunks = [chunk(i) for i in range(2 * n_shards)]
    for i in range(n_shards):
        writer.write_shard(chunks[2 * i: 2 * i + 2])
    writer.finish()
    return chunks


def test_shards_hold_the_rows_and_their_checksums(tmp_path):
    chunks = write_store(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["complete"]
    assert json.loads((tmp_path / "s" / "identity.json").read_text()) == manifest["identity"]
    reader = StoreReader(tmp_path / "s")
    for i, entry in enumerate(manifest["shards"]):
        data = (tmp_path / "s" / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data) and entry["rows"] == 10
        got = reader.read_shard(entry["file"])
        for h in HOOKS:
            want = chunks[2 * i: 2 * i + 2]
            assert torch.equal(got[h].x, torch.cat([c[h].x for c in want]))
            assert torch.equal(got[h].g, torch.cat([c[h].g for c in want]))
            assert got[h].dropped_outliers == 4 * i + 1
    assert reader.provenance("h.1") == Provenance(hook="h.1", model={"model": "m"},
                                                  corpus={"dataset": "c"}, context_size=8)


def test_a_damaged_shard_of_the_same_size_is_refused(tmp_path):
    write_store(tmp_path / "s")
    shard = tmp_path / "s" / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x10  # one bit of one stored value
    shard.write_bytes(bytes(data))
    reader = StoreReader(tmp_path / "s")  # the size still matches
    reader.read_shard("shard-000000.safetensors")
    with pytest.raises(GsaeError) as err:
        reader.read_shard("shard-000001.safetensors")
    message = str(err.value)
    assert message.startswith(f"the store shard {shard} is damaged (its sha256 differs")
    assert "gsae cache --overwrite" in message and "\n" not in message


def test_version_1_stores_are_read_with_a_warning_but_not_continued(tmp_path):
    chunks = write_store(tmp_path / "s")
    # The layout before checksums: version 1, no sha256, no identity.json.
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["version"] = 1
    for entry in manifest["shards"]:
        del entry["sha256"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "s" / "identity.json").unlink()
    with pytest.warns(UserWarning, match="records no checksums"):
        reader = StoreReader(tmp_path / "s")
    got = reader.read_shard("shard-000002.safetensors")
    assert torch.equal(got["h.0"].x, torch.cat([c["h.0"].x for c in chunks[4:6]]))
    with pytest.raises(GsaeError, match="store of an older gsae .*--overwrite"):
        StoreWriter(tmp_path / "s", identity(), "float32", 2)
    write_store(tmp_path / "s", overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert StoreReader(tmp_path / "s").manifest["version"] == 2


def test_a_store_is_not_mixed_with_other_files_or_settings(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(GsaeError, match=f"{folder} is not empty but does not hold an activation "
                       "store: .*--overwrite"):
        StoreWriter(folder, identity(), "float32", 2)
    write_store(tmp_path / "t")
    with pytest.raises(GsaeError, match=r"made with other settings \(differs in: context_size, "
                       r"model.model;.*--overwrite"):
        StoreWriter(tmp_path / "t", identity(context_size=16, model={"model": "n"}), "float32", 2)
    # The same settings continue the store; --overwrite starts it again.
    assert StoreWriter(tmp_path / "t", identity(), "float32", 2).rows_done == 30
    writer = StoreWriter(tmp_path / "t", identity(context_size=16), "float32", 2, overwrite=True)
    assert writer.rows_done == 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["identity.json",
                                                                  "manifest.json"]


def test_store_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_store(tmp_path / "s", n_shards=1)
    finally:
        os.umask(old)
    for file in (tmp_path / "s").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o640, file.name


def test_each_pass_reads_every_row_once_in_a_new_order(tmp_path):
    write_store(tmp_path / "s", n_shards=4)
    reader = StoreReader(tmp_path / "s")
    stream = reader.chunks(seed=3)
    passes = [torch.cat([next(stream)["h.0"].x for _ in range(4)]) for _ in range(3)]
    every_row = {tuple(r.tolist()) for r in passes[0]}
    for rows in passes:
        as_tuples = [tuple(r.tolist()) for r in rows]
        assert len(as_tuples) == 40 and len(set(as_tuples)) == 40  # no row lost or repeated
        assert set(as_tuples) == every_row
    orders = {tuple(tuple(r.tolist()) for r in rows) for rows in passes}
    assert len(orders) >= 2  # the passes do not all repeat one order
    assert reader.repeated_rows("h.0") == 0


def test_repeated_rows_are_counted(tmp_path):
    writer = StoreWriter(tmp_path / "s", identity(), "float32", 2)
    twice = chunk(7)
    writer.write_shard([chunk(1), twice])
    writer.write_shard([twice, chunk(2)])  # a document read twice: its 5 rows again
    writer.finish()
    assert StoreReader(tmp_path / "s").repeated_rows("h.0") == 5


# Behaviour that deliberately broken code once got past -------------------------------------------


def test_a_larger_token_count_extends_a_finished_store(corpus, tmp_path, capsys):
    """A store stops at the first batch that reaches its token count; a finished store asked
    for more tokens is continued after its last shard and ends as a store built with the larger
    count at once; asked for fewer, it is left as it is."""
    args = ["--model", "tiny-llama", "--dataset", corpus, "--context_size", "32", "--hooks", "1",
            "--lm_batch_size", "4", "--store.dtype", "float32", "--batches_per_shard", "1"]

    def cache(store, tokens):
        code, _, err = run(["cache", "--store", str(tmp_path / store), *args, "--tokens",
                            str(tokens)], capsys)
        assert code == 0, err
        return json.loads((tmp_path / store / "manifest.json").read_text())

    (first,) = cache("grown", 1)["shards"]
    assert cache("exact", first["rows"])["shards"] == [first]
    grown = cache("grown", 450)
    assert grown == cache("direct", 450) and len(grown["shards"]) > 2
    assert sum(s["rows"] for s in grown["shards"]) >= 450
    assert cache("grown", 150) == grown


@pytest.mark.parametrize("shards, fraction, held", [(10, 0.1, 1), (10, 0.14, 1), (10, 0.16, 2),
                                                    (3, 0.01, 1), (4, 0.5, 2), (5, 0.0, 0)])
def test_the_validation_part_is_the_last_rounded_share_of_shards(tmp_path, shards, fraction,
                                                                  held):
    write_store(tmp_path / "s", n_shards=shards)
    names = [f"shard-{i:06d}.safetensors" for i in range(shards)]
    reader = StoreReader(tmp_path / "s", validation_fraction=fraction)
    assert reader.shards == names[:shards - held]
    assert reader.validation_shards == names[shards - held:]
    assert reader.rows == 10 * (shards - held)
    # 2 batches per shard, lm_batch_size contexts per batch
    per_batch = 3
    reader.identity["lm_batch_size"] = per_batch
    assert reader.validation_contexts() == range(2 * per_batch * (shards - held),
                                                 2 * per_batch * shards)


def test_training_never_reads_the_validation_shards(tmp_path):
    write_store(tmp_path / "s", n_shards=4)
    held = StoreReader(tmp_path / "s").read_shard("shard-000003.safetensors")["h.0"].x
    stream = StoreReader(tmp_path / "s", validation_fraction=0.25).chunks(seed=1)
    seen = torch.cat([next(stream)["h.0"].x for _ in range(3 * 5)])  # five passes
    held_rows = {tuple(r.tolist()) for r in held}
    assert len({tuple(r.tolist()) for r in seen}) == 30
    assert not held_rows & {tuple(r.tolist()) for r in seen}


def test_a_validation_part_that_leaves_nothing_to_train_on_is_refused(tmp_path):
    write_store(tmp_path / "s", n_shards=1)
    with pytest.raises(GsaeError, match="leaves no shard to train on"):
        StoreReader(tmp_path / "s", validation_fraction=0.5)
