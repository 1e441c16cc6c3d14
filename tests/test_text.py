import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gsae.errors import GsaeError
from gsae.text import (
    DataConfig,
    batched_contexts,
    clean_wikitext,
    corpus_identity,
    eval_count,
    load_documents,
    split_documents,
    token_contexts,
    wiki_articles,
)
from gsae.tiny import EOS_ID, tiny_tokenizer

DOCS = [f"Document {i}: " + "word " * (i * 7 % 50) for i in range(40)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_config_fields_have_help():
    for f in dataclasses.fields(DataConfig):
        assert f.metadata.get("help"), f.name


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First doc\nstill first.\n\n\n  \nSecond doc.\n \nThird.\n")
    docs = load_documents(DataConfig(dataset=str(path)))
    assert docs == ["First doc\nstill first.", "Second doc.", "Third."]


def test_jsonl_and_parquet(tmp_path):
    rows = [{"id": 1, "body": "alpha"}, {"id": 2, "body": None}, {"id": 3, "body": "gamma"}]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    assert load_documents(DataConfig(dataset=str(jsonl), text_column="body")) == ["alpha", "gamma"]
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    docs = load_documents(DataConfig(dataset=str(parquet), text_column="body"))
    assert docs == ["alpha", "gamma"]


def test_folder_reads_supported_files_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z1\n\nz2")
    (tmp_path / "a.txt").write_text("a1")
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "c1"}])
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_documents(DataConfig(dataset=str(tmp_path))) == ["a1", "c1", "z1", "z2"]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_missing_column_lists_columns(tmp_path, suffix):
    path = tmp_path / f"a.{suffix}"
    rows = [{"title": "t", "body": "b"}]
    if suffix == "jsonl":
        write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(GsaeError, match="has no column 'text': its columns are 'title', 'body'"):
        load_documents(DataConfig(dataset=str(path)))


def test_bad_inputs(tmp_path, hub_offline):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{not json\n')
    (tmp_path / "data.csv").write_text("text\nx\n")
    (tmp_path / "empty").mkdir()
    cases = {
        str(bad_json): "bad.jsonl:2 is not valid JSON",
        str(tmp_path / "data.csv"): "a data file must end in .txt, .jsonl, .parquet",
        str(tmp_path / "missing.jsonl"): "no such file or folder",
        str(tmp_path / "empty"): "holds no .txt, .jsonl, .parquet files",
        "no-such-org/no-such-dataset": "could not be loaded from the Hugging Face hub",
    }
    for dataset, message in cases.items():
        with pytest.raises(GsaeError, match=message):
            load_documents(DataConfig(dataset=dataset))
    for cfg in (DataConfig(eval_fraction=1.0), DataConfig(context_size=1)):
        with pytest.raises(GsaeError, match="must be"):
            split_documents(DOCS, cfg, "train")


def test_news_corpus():
    docs = load_documents(DataConfig(dataset="news"))
    assert 280 <= len(docs) <= 320
    assert all(d == d.strip() and len(d) > 100 for d in docs)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5])
def test_split_is_by_document_exact_and_deterministic(fraction):
    cfg = DataConfig(eval_fraction=fraction, split_seed=3)
    train, held = split_documents(DOCS, cfg, "train"), split_documents(DOCS, cfg, "eval")
    assert sorted(train + held) == sorted(DOCS) and not set(train) & set(held)
    assert len(held) == eval_count(len(DOCS), fraction) == round(len(DOCS) * fraction)
    # each part keeps the corpus order
    assert train == [d for d in DOCS if d in set(train)]
    assert held == [d for d in DOCS if d in set(held)]
    assert split_documents(list(DOCS), cfg, "eval") == held
    if fraction:
        other = split_documents(DOCS, dataclasses.replace(cfg, split_seed=4), "eval")
        assert other != held


def test_split_is_stable_when_documents_are_added():
    cfg = DataConfig(eval_fraction=0.25)
    held = set(split_documents(DOCS, cfg, "eval"))
    grown = set(split_documents(DOCS + ["new"] * 4, cfg, "eval"))
    assert len(held - grown) <= 1


def test_eval_count_keeps_both_parts():
    assert eval_count(2, 0.01) == 1
    assert eval_count(10, 0.99) == 9
    assert eval_count(1, 0.5) == 0
    assert eval_count(10, 0.0) == 0


def test_stream_split_hashes_documents():
    cfg = DataConfig(eval_fraction=0.3)
    stream = [f"streamed document {i}" for i in range(2000)]
    train = list(split_documents(iter(stream), cfg, "train"))
    held = list(split_documents(iter(stream), cfg, "eval"))
    assert sorted(train + held) == sorted(stream) and not set(train) & set(held)
    assert 0.25 < len(held) / len(stream) < 0.35
    # a document's part depends on its text, not its position
    assert list(split_documents(iter(stream[::-1]), cfg, "eval")) == held[::-1]


def naive_contexts(docs, tokenizer, size):
    stream = []
    for doc in docs:
        stream += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    return [stream[i : i + size] for i in range(0, len(stream) - size + 1, size)]


@pytest.mark.parametrize("size", [16, 100, 500])
def test_packing_matches_naive_concatenation(tmp_path, size):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    cfg = DataConfig(dataset=str(path), context_size=size, eval_fraction=0.2)
    tok = tiny_tokenizer()
    for part in ("train", "eval"):
        got = list(token_contexts(cfg, tok, part))
        expected = naive_contexts(split_documents(DOCS, cfg, part), tok, size)
        assert expected and [c.tolist() for c in got] == expected
        assert all(c.dtype == torch.long and c.shape == (size,) for c in got)
    assert EOS_ID in torch.cat(got).tolist()


def test_too_short_corpus(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abc\n\ndefgh\n\nij")  # 3 documents: 3 + 5 + 2 bytes and one EOS each
    tok = tiny_tokenizer()
    contexts = token_contexts(DataConfig(dataset=str(path), eval_fraction=0.0), tok)
    with pytest.raises(GsaeError) as info:
        list(contexts)
    assert str(info.value) == (
        f"the corpus '{path}' has 13 tokens in its train split, "
        "fewer than one context of 128 tokens"
    )
    empty_eval = token_contexts(DataConfig(dataset=str(path), eval_fraction=0.0), tok, "eval")
    with pytest.raises(GsaeError, match="has 0 tokens in its eval split"):
        next(empty_eval)


def test_batched_contexts():
    contexts = [torch.full((4,), i) for i in range(7)]
    batches = list(batched_contexts(iter(contexts), 3))
    assert [b.shape for b in batches] == [(3, 4), (3, 4), (1, 4)]
    assert torch.equal(torch.cat(batches), torch.stack(contexts))
    assert len(list(batched_contexts(iter(contexts), 3, drop_last=True))) == 2


def test_corpus_identity(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    cfg = DataConfig(dataset=str(tmp_path), context_size=64)
    identity = corpus_identity(cfg)
    assert identity["kind"] == "folder" and identity["context_size"] == 64
    assert json.loads(json.dumps(identity)) == identity
    assert corpus_identity(cfg) == identity
    (tmp_path / "a.txt").write_text("two")
    assert corpus_identity(cfg)["fingerprint"] != identity["fingerprint"]
    assert corpus_identity(DataConfig())["kind"] == "embedded"


def test_clean_wikitext():
    wikitext = (
        "{{Infobox thing|name=X}}'''Aardvark''' is a [[mammal|burrowing mammal]] in "
        "[[Africa]].<ref>{{cite web|url=x}}</ref> It eats ants.<ref name=a/>\n"
        "[[File:Aardvark.jpg|thumb|An aardvark]]\n"
        "{| class=wikitable\n|-\n| cell || cell\n|}\n"
        "== Diet ==\nTermites, <!-- hidden --> mostly.\n[[Category:Mammals]]\n"
        "== References ==\n* A book\n"
    )
    assert clean_wikitext(wikitext) == (
        "Aardvark is a burrowing mammal in Africa. It eats ants.\n\nDiet\nTermites, mostly."
    )


@pytest.mark.real_model
def test_wiki_corpus():
    articles = wiki_articles()
    assert 80 <= len(articles) <= 130
    texts = [a["text"] for a in articles]
    assert 2_000_000 < sum(map(len, texts)) < 3_500_000
    assert all(len(t) >= 500 for t in texts)
    for marker in ("[[", "{{", "<ref", "{|", "]]", "}}"):
        assert not any(marker in t for t in texts), marker
    docs = load_documents(DataConfig())
    assert docs == texts
    train, held = (split_documents(docs, DataConfig(), part) for part in ("train", "eval"))
    assert len(held) == round(0.1 * len(docs)) and sorted(train + held) == sorted(texts)
    assert not set(train) & set(held)
