"""Hook points, and the intervention harness against plain forward hooks on the whole model."""

import pytest
import torch
from conftest import tiny_gpt_neox

from gsae import hooks
from gsae.errors import GsaeError
from gsae.hooks import (
    ABOVE_HOOK,
    FULL,
    Intervention,
    add,
    decoder_layers,
    hook_output_tensor,
    num_layers,
    replace_hook_output,
    resolve_hook,
    splice,
)
from gsae.names import transformer_lens_hook
from gsae.tiny import tiny_gpt2, tiny_llama

# builder, decoder block list, final norm applied to the last block's output in hidden_states
ARCHS = {
    "llama": (tiny_llama, lambda m: m.model.layers, lambda m: m.model.norm, "model.layers"),
    "gpt2": (tiny_gpt2, lambda m: m.transformer.h, lambda m: m.transformer.ln_f, "transformer.h"),
}


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    build, layers, norm, prefix = ARCHS[request.param]
    return build(), layers, norm, prefix


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


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_transformer_lens_names_the_residual_stream_after_each_block(family):
    """A layer's hook point, as gsae records it, is TransformerLens's blocks.N.hook_resid_post,
    which gsae resolves back to the same module; other modules get no TransformerLens name."""
    from conftest import tiny_families

    model = tiny_families()[family]()
    for index in range(num_layers(model)):
        name, module = resolve_hook(model, index)
        assert transformer_lens_hook(name) == f"blocks.{index}.hook_resid_post"
        assert resolve_hook(model, f"blocks.{index}.hook_resid_post") == (name, module)
        child = next(n for n, _ in module.named_children())
        assert transformer_lens_hook(f"{name}.{child}") is None


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


def test_num_layers(arch):
    assert num_layers(arch[0]) == 2


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


def test_sparsify_style_hook_names_resolve_inside_the_base_model():
    model = tiny_llama()
    assert resolve_hook(model, "layers.1") == ("model.layers.1", model.model.layers[1])


# The intervention harness ------------------------------------------------------------------------


def reference_logits(model, module, tokens, change):
    """Logits of the whole model with `change` applied to `module`'s output by a forward hook."""

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        new = change(h.clone())
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=tokens).logits
    finally:
        handle.remove()


def recorded(intervention, model, tokens):
    with intervention.record(tokens) as clean, torch.no_grad():
        model(input_ids=tokens)
    return clean


TOKENS = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(2))


def test_above_hook_logits_equal_the_whole_model_with_the_same_patch(family_model):
    model = family_model
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(TOKENS.shape, generator=gen) < 0.5
    for layer in range(num_layers(model)):
        _, module = resolve_hook(model, layer)
        intervention = Intervention(model, module)
        assert intervention.forward == ABOVE_HOOK
        clean = recorded(intervention, model, TOKENS)
        rows = torch.randn(int(mask.sum()), 64, generator=gen)

        def write(h, rows=rows):
            h[mask] = rows
            return h

        expected = reference_logits(model, module, TOKENS, write)
        torch.testing.assert_close(clean.logits(splice(mask, rows)), expected)
        delta = torch.randn(*TOKENS.shape, 64, generator=gen)
        expected = reference_logits(model, module, TOKENS, lambda h, d=delta: h + d)
        torch.testing.assert_close(clean.logits(add(delta)), expected)
        # The zero patch gives back the clean logits.
        with torch.no_grad():
            plain = model(input_ids=TOKENS).logits
        torch.testing.assert_close(clean.logits(lambda h: h), plain)


def test_repeated_batches_patch_each_copy(family_model):
    """Steering runs several vectors in one pass: the recorded contexts repeated."""
    model = family_model
    _, module = resolve_hook(model, 0)
    clean = recorded(Intervention(model, module), model, TOKENS)
    delta = torch.randn(2 * 3, 9, 64, generator=torch.Generator().manual_seed(4))
    expected = reference_logits(model, module, TOKENS.repeat(2, 1), lambda h: h + delta)
    torch.testing.assert_close(clean.logits(add(delta), repeat=2), expected)


def test_other_hook_points_and_models_run_the_whole_forward(monkeypatch):
    model = tiny_llama()
    name, layers = decoder_layers(model)
    mlp = layers[0].mlp
    mask = torch.zeros(TOKENS.shape, dtype=torch.bool)
    mask[:, 3] = True
    rows = torch.zeros(3, 64)
    for intervention in (Intervention(model, mlp), Intervention(model, layers[0], False)):
        assert intervention.forward == FULL
        clean = recorded(intervention, model, TOKENS)

        def write(h):
            h[mask] = 0.0
            return h

        expected = reference_logits(model, intervention.module, TOKENS, write)
        torch.testing.assert_close(clean.logits(splice(mask, rows)), expected)
    monkeypatch.delitem(hooks.FINAL_NORMS, "llama")
    assert Intervention(model, layers[0]).forward == FULL


def test_patched_pass_needs_a_recorded_clean_pass():
    model = tiny_gpt_neox()
    intervention = Intervention(model, resolve_hook(model, 0)[1])
    with intervention.record(TOKENS) as clean:
        pass
    with pytest.raises(RuntimeError, match="no clean forward"):
        clean.logits(lambda h: h)


@pytest.mark.real_model
def test_above_hook_logits_on_the_default_model(real_model):
    model, _ = real_model
    tokens = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(7))
    _, module = resolve_hook(model, 15)
    intervention = Intervention(model, module)
    assert intervention.forward == ABOVE_HOOK and len(intervention.suffix.layers) == 14
    clean = recorded(intervention, model, tokens)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, 1:-1] = True
    rows = torch.zeros(int(mask.sum()), 576)

    def write(h):
        h[mask] = 0.0
        return h

    expected = reference_logits(model, module, tokens, write)
    torch.testing.assert_close(clean.logits(splice(mask, rows)), expected)
