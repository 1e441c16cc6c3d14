"""Registers (`gsae.registers`): the cleaning rules on hand-written samples, each loader on its
real files (skipped when the package that installs them is absent), and the one-line error that
names the missing package."""

import hashlib
import os
import re
import sysconfig
from pathlib import Path

import pytest

import gsae.registers as registers
from gsae.cli import main
from gsae.errors import GsaeError
from gsae.registers import (
    REGISTERS,
    code_module,
    fortune_cookies,
    licence_text,
    register_documents,
    register_files,
    tidy_lines,
)
from gsae.text import DataConfig, corpus_identity, load_documents, resolve_dataset


def test_fortune_cookies_split_at_percent_lines_and_drop_overstrikes_and_attributions():
    text = ("Roses are red,\n  violets are blue.  \n\t\t-- Anon\n%\n"
            "_\bb_\bo_\bl_\bd and pl'\bain\n%\n%\n   \n%\n"
            "Line one\n\n\n\nline two\n--not an attribution\n%")
    assert fortune_cookies(text) == ["Roses are red,\n  violets are blue.", "bold and plain",
                                     "Line one\n\nline two\n--not an attribution"]


def test_tidy_lines_and_the_one_document_rules():
    assert tidy_lines("\n\na  \r\nb\rc\n\n\n\nd\t\n\n") == "a\nb\nc\n\nd"
    assert licence_text("Terms\f\n\n\f\nEnd\n") == ["Terms\n\nEnd"]
    assert code_module("def f():  \n    return 1\n\n\n\n\nx = f()\n") == [
        "def f():\n    return 1\n\nx = f()"]
    assert code_module("\n \n") == [] and licence_text("\f") == []


def _skip_without(name):
    try:
        return register_files(name)
    except GsaeError as err:
        pytest.skip(f"the register {name!r} is not installed here: {err}")


def _in_hash_order(docs):
    keys = [hashlib.sha256(d.encode()).hexdigest() for d in docs]
    return keys == sorted(keys)


@pytest.mark.parametrize("name", list(REGISTERS))
def test_each_register_loads_clean_documents_in_hash_order(name):
    _skip_without(name)
    docs = register_documents(name)
    assert len(docs) >= 10 and _in_hash_order(docs)
    text = "\n".join(docs)
    assert "\b" not in text and "\r" not in text and not re.search(r"[ \t]$", text, re.M)
    assert not re.search(r"^%$", text, re.M) and "\n\n\n" not in text
    assert load_documents(DataConfig(dataset=name)) == docs
    assert resolve_dataset(DataConfig(dataset=name)) == ("register", name)
    assert sum(len(d) for d in docs) > 100_000  # enough for 16,384 evaluation tokens


def test_code_is_every_top_level_module_of_the_standard_library():
    folder = sysconfig.get_paths()["stdlib"]
    expected = sorted(f for f in os.listdir(folder) if f.endswith(".py")
                      and Path(folder, f).read_text(encoding="utf-8").strip())
    docs = register_documents("code")
    assert len(docs) == len(expected)
    assert Path(folder, "this.py").read_text(encoding="utf-8").strip() in docs


def test_legal_holds_each_licence_text_once():
    _skip_without("legal")
    folder = "/usr/share/common-licenses"
    distinct = {os.path.realpath(os.path.join(folder, f)) for f in os.listdir(folder)}
    assert len(register_documents("legal")) == len(distinct)
    assert sum("GNU GENERAL PUBLIC LICENSE" in d.split("\n")[0].strip()
               for d in register_documents("legal")) == 3  # versions 1, 2 and 3


def test_verse_has_one_document_per_cookie():
    files = _skip_without("verse")
    raw = files[0].read_text(encoding="utf-8")
    separators = sum(1 for line in raw.split("\n") if line.strip() == "%")
    docs = register_documents("verse")
    # every cookie but those left empty (none in this file) and a final empty piece
    assert separators <= len(docs) <= separators + 1


def test_german_reads_every_file_but_the_ascii_art():
    files = _skip_without("german")
    assert "asciiart" not in {f.name for f in files} and "zitate" in {f.name for f in files}
    assert any("ß" in d or "ü" in d for d in register_documents("german")[:50])


def test_a_missing_package_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(registers, "FORTUNES", tmp_path / "none")
    with pytest.raises(GsaeError, match="apt-get install fortunes-de$"):
        register_documents("german")
    assert main(["cache", "--model", "tiny-llama", "--dataset", "verse", "--hooks", "1",
                 "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "apt-get install fortunes" in err


def test_the_fingerprint_follows_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(registers, "FORTUNES", tmp_path)
    poems = tmp_path / "songs-poems"
    poems.write_text("A verse\n%\nAnother\n")
    first = corpus_identity(DataConfig(dataset="verse"))
    assert first["kind"] == "register" and register_documents("verse") == sorted(
        ["A verse", "Another"], key=lambda d: hashlib.sha256(d.encode()).hexdigest())
    poems.write_text("A verse\n%\nChanged\n")
    assert corpus_identity(DataConfig(dataset="verse"))["fingerprint"] != first["fingerprint"]


# `gsae eval --unseen`: the same SAEs on corpora they never saw --------------------------------


def test_eval_with_unseen_corpora_evaluates_each_from_its_start(corpus, tmp_path, capsys):
    import json

    import torch

    from gsae.evaluate import EvalConfig, evaluate_contexts
    from gsae.models import ModelConfig, load_model, model_identity
    from gsae.sae import SAE, Provenance, SAEConfig

    data = DataConfig(dataset=str(corpus), context_size=32)
    provenance = Provenance(hook="model.layers.1", model=model_identity(ModelConfig("tiny-llama")),
                            corpus=corpus_identity(data), context_size=32)
    folder = SAE(SAEConfig(n_latents=128, k=4), 64, provenance=provenance).save(tmp_path / "sae")
    out = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--eval_tokens", "64", "--unseen", "code", "legal",
                 "--unseen_tokens", "96", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "code: all of it (unseen)" in printed and "its held-out split" in printed
    saved = json.loads(out.read_text())
    assert saved["run"]["part"] == "eval" and list(saved["unseen"]) == ["code", "legal"]
    # an independent packing: the first documents of code, each followed by EOS, cut in 32s
    model, tokenizer = load_model(ModelConfig("tiny-llama"))
    ids = [t for doc in register_documents("code")[:3]
           for t in [*tokenizer(doc)["input_ids"], tokenizer.eos_token_id]]
    contexts = torch.tensor(ids[:96]).view(3, 32)
    expected = evaluate_contexts([SAE.load(folder)], model, contexts, EvalConfig())
    code = saved["unseen"]["code"]
    assert code["run"]["part"] == "all" and code["run"]["contexts"] == 3
    assert code["run"]["corpus"]["dataset"] == "code"
    assert code["results"][0]["ce_increase"] == pytest.approx(
        expected.results[0].ce_increase, rel=1e-5)
    assert main(["eval", str(folder), "--unseen", "code", "code"]) == 2
    assert "name each corpus no SAE trained on once" in capsys.readouterr().err


def test_a_study_with_a_missing_register_stops_before_any_work(corpus, tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.setattr(registers, "FORTUNES", tmp_path / "none")
    out = tmp_path / "study"
    # a small study, so that one that did not check first would soon reach the evaluation
    assert main(["study", "--model", "tiny-llama", "--dataset", corpus, "--hooks", "1",
                 "--context_size", "32", "--out", str(out), "--store_tokens", "256",
                 "--tokens", "256", "--snapshots", "256", "--batch_tokens", "128",
                 "--n_latents", "0", "--expansion_factor", "2", "--seed", "0",
                 "--unseen", "news", "verse"]) == 2
    assert "apt-get install fortunes" in capsys.readouterr().err
    assert not (out / "store").exists()
