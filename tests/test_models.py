import dataclasses
from pathlib import Path

import pytest
import torch

from gsae.errors import GsaeError
from gsae.hooks import num_layers
from gsae.models import (
    ModelConfig,
    default_gguf_path,
    dense_cache_folder,
    hidden_size,
    load_model,
    model_identity,
)
from gsae.text import DataConfig, token_contexts
from gsae.tiny import EOS_ID, tiny_gpt2, tiny_llama, tiny_tokenizer


def test_config_fields_have_help():
    for f in dataclasses.fields(ModelConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_hidden_size(build):
    assert hidden_size(build()) == 64


def test_tiny_tokenizer_is_byte_level():
    tok = tiny_tokenizer()
    text = "Grüße, world!\n\nZ"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.pad_token_id == EOS_ID
    assert tok("a<|endoftext|>b")["input_ids"] == [97, EOS_ID, 98]
    assert len(tok) <= 512


def test_tiny_models_are_frozen_and_seeded():
    for build in (tiny_llama, tiny_gpt2):
        model = build()
        assert not model.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
        same, other = build(seed=0), build(seed=1)
        first = next(model.parameters())
        assert torch.equal(first, next(same.parameters()))
        assert not torch.equal(first, next(other.parameters()))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_load_tiny_alias(name):
    model, tok = load_model(ModelConfig(model=name, dtype="bfloat16"))
    assert not model.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    assert tok.pad_token_id == EOS_ID
    assert model_identity(ModelConfig(model=name))["kind"] == "tiny"


def test_load_local_folder_and_identity(tmp_path):
    reference = tiny_llama(seed=3)
    reference.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    cfg = ModelConfig(model=str(tmp_path / "m"))
    model, tok = load_model(cfg)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    tokens = torch.tensor([tok("some text")["input_ids"]])
    assert torch.equal(model(tokens).logits, reference(tokens).logits)

    identity = model_identity(cfg)
    assert identity["kind"] == "folder" and identity["path"] == str(tmp_path / "m")
    assert identity == model_identity(cfg)
    tiny_llama(seed=4).save_pretrained(tmp_path / "m")
    assert model_identity(cfg)["fingerprint"] != identity["fingerprint"]


@pytest.mark.parametrize(
    "cfg, message",
    [
        (ModelConfig(model="./no/such/model"), "'./no/such/model' does not exist"),
        (ModelConfig(model="weights.gguf"), "'weights.gguf' does not exist"),
        (ModelConfig(model="tiny-llama", dtype="float64"), "unknown dtype 'float64'"),
        (ModelConfig(model="tiny-llama", device="gpu"), "unknown device 'gpu'"),
    ],
)
def test_bad_model_config(cfg, message):
    with pytest.raises(GsaeError, match=message):
        load_model(cfg)


def test_folder_without_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(GsaeError, match="is not a model folder .*a .gguf file"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_unknown_hub_model(hub_offline):
    with pytest.raises(GsaeError, match="could not be loaded locally or on the Hugging Face hub"):
        load_model(ModelConfig(model="no-such-org/no-such-model"))
    assert model_identity(ModelConfig(model="no-such-org/no-such-model"))["path"] is None


# The embedded default model ---------------------------------------------------------------------


@pytest.mark.real_model
def test_default_model(real_model):
    model, tok = real_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert num_layers(model) == 30 and hidden_size(model) == 576
    assert model.config.vocab_size == 49152 and len(tok) == 49152
    assert not any(p.requires_grad for p in model.parameters())
    folder = dense_cache_folder(default_gguf_path())
    assert (folder / "config.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    identity = model_identity(ModelConfig())
    assert identity["kind"] == "gguf" and Path(identity["path"]) == default_gguf_path()
    assert len(identity["fingerprint"]) == 64

    prompt = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt.input_ids.shape[1] :])

    context = next(token_contexts(DataConfig(), tok, "eval"))
    assert context.shape == (128,)
    with torch.no_grad():
        loss = model(context[None], labels=context[None]).loss.item()
    assert 2.0 < loss < 4.5
