import dataclasses
from pathlib import Path

import pytest
import torch

from gsae.errors import GsaeError
from gsae.models import (
    ModelConfig,
    default_gguf_path,
    dense_cache_folder,
    hidden_size,
    hook_output_tensor,
    load_model,
    model_identity,
    num_layers,
    replace_hook_output,
    resolve_hook,
)
from gsae.text import DataConfig, token_contexts
from gsae.tiny import EOS_ID, tiny_gpt2, tiny_llama, tiny_tokenizer

# builder, decoder block list, final norm applied to the last block's output in hidden_states
ARCHS = {
    "llama": (tiny_llama, lambda m: m.model.layers, lambda m: m.model.norm, "model.layers"),
    "gpt2": (tiny_gpt2, lambda m: m.transformer.h, lambda m: m.transformer.ln_f, "transformer.h"),
}


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    build, layers, norm, prefix = ARCHS[request.param]
    return build(), layers, norm, prefix


def test_config_fields_have_help():
    for f in dataclasses.fields(ModelConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    "hook, index",
    [(0, 0), (1, 1), ("1", 1), (-1, 1), ("-2", 0), (" 0 ", 0), ("blocks.1.hook_resid_post", 1)],
)
def test_resolve_hook_layer_forms(arch, hook, index):
    model, layers, _, prefix = arch
    name, module = resolve_hook(model, hook)
    assert name == f"{prefix}.{index}"
    assert module is layers(model)[index]
    assert dict(model.named_modules())[name] is module


def test_resolve_hook_module_path(arch):
    model, layers, _, prefix = arch
    child_name, child = next(iter(layers(model)[1].named_children()))
    path = f"{prefix}.1.{child_name}"
    assert resolve_hook(model, path) == (path, child)


def test_hook_output_is_hidden_state(arch):
    model, layers, norm, _ = arch
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    seen = {}
    handles = [
        resolve_hook(model, i)[1].register_forward_hook(
            lambda mod, args, out, i=i: seen.__setitem__(i, hook_output_tensor(out))
        )
        for i in range(num_layers(model))
    ]
    reference = model(tokens, output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    assert torch.equal(seen[0], reference[1])
    # the model applies its final norm to the last block's output before reporting it
    torch.testing.assert_close(norm(model)(seen[1]), reference[2])


def test_replace_hook_output_in_forward_hook():
    model = tiny_llama()
    _, last = resolve_hook(model, -1)
    handle = last.register_forward_hook(
        lambda mod, args, out: replace_hook_output(out, torch.zeros_like(hook_output_tensor(out)))
    )
    logits = model(torch.tensor([[1, 2, 3]])).logits
    handle.remove()
    # RMSNorm of zeros is zero and the LM head has no bias: zero logits
    assert torch.equal(logits, torch.zeros_like(logits))
    assert model(torch.tensor([[1, 2, 3]])).logits.abs().sum() > 0


def test_num_layers_and_hidden_size(arch):
    model = arch[0]
    assert num_layers(model) == 2
    assert hidden_size(model) == 64


@pytest.mark.parametrize("hook", [2, -3, "5", "blocks.2.hook_resid_post"])
def test_layer_out_of_range(arch, hook):
    with pytest.raises(GsaeError) as info:
        resolve_hook(arch[0], hook)
    index = int(str(hook).split(".")[1] if "blocks" in str(hook) else hook)
    assert str(info.value) == (
        f"layer {index} is out of range: this model has 2 layers (0-1, or -2..-1)"
    )


@pytest.mark.parametrize("hook", ["model.layers.7.mlp", "mlp", "", "blocks.1.hook_resid_pre"])
def test_unknown_hook(hook):
    with pytest.raises(GsaeError, match="unknown hook point .*'model.layers.1'"):
        resolve_hook(tiny_llama(), hook)


def test_hook_output_structures():
    h, other, new = torch.ones(2, 3), torch.zeros(1), torch.full((2, 3), 5.0)
    assert hook_output_tensor(h) is h
    assert hook_output_tensor((h, other)) is h
    assert hook_output_tensor([h]) is h
    assert replace_hook_output(h, new) is new
    replaced = replace_hook_output((h, other), new)
    assert isinstance(replaced, tuple) and replaced[0] is new and replaced[1] is other
    replaced = replace_hook_output([h, other], new)
    assert isinstance(replaced, list) and replaced[0] is new and replaced[1] is other
    for bad in (None, (), ("x", h), {"a": h}):
        with pytest.raises(GsaeError, match="not a tensor"):
            hook_output_tensor(bad)
        with pytest.raises(GsaeError, match="not a tensor"):
            replace_hook_output(bad, new)


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


def test_sparsify_style_hook_names_resolve_inside_the_base_model():
    model = tiny_llama()
    assert resolve_hook(model, "layers.1") == ("model.layers.1", model.model.layers[1])
