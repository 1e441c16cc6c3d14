"""Activations and gradients from the frozen model, checked against finite differences."""

import math

import pytest
import torch

from gsae.hooks import resolve_hook
from gsae.source import ActivationSource, SourceConfig, next_token_loss, outlier_mask
from gsae.tiny import tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def reference_loss(logits, tokens):
    """L written out: the sum over sequences and positions t < T-1 of -log p(token t+1)."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return -log_probs[:, :-1].gather(2, tokens[:, 1:, None]).sum()


def loss_with_delta(model, tokens, hook, position, delta):
    """The summed next-token loss with `delta` added to the hook's output at one position."""
    _, module = resolve_hook(model, hook)

    def add(_m, _i, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[position] += delta
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = module.register_forward_hook(add)
    try:
        with torch.no_grad():
            return reference_loss(model(input_ids=tokens).logits, tokens).item()
    finally:
        handle.remove()


# GPT-2 runs wholly in float64 here; Llama's RMSNorm computes in float32 even in a float64
# model, which limits the agreement (the same 4e-4 was seen on the real SmolLM2).
@pytest.mark.parametrize("arch, eps, rel", [("gpt2", 1e-5, 2e-5), ("llama", 1e-4, 2e-3)])
def test_gradient_matches_finite_differences(arch, eps, rel):
    model = BUILDERS[arch]().double()
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    source = ActivationSource(model, SourceConfig(hooks=["0", "1"]))
    states = source.hidden_states(tokens)
    gen = torch.Generator().manual_seed(1)
    for hook in states:
        g = states[hook][1]
        for _ in range(4):
            b, t = int(torch.randint(0, 2, (1,), generator=gen)), int(
                torch.randint(0, 11, (1,), generator=gen))
            direction = torch.randn(g.shape[-1], generator=gen, dtype=torch.float64)
            plus = loss_with_delta(model, tokens, hook, (b, t), eps * direction)
            minus = loss_with_delta(model, tokens, hook, (b, t), -eps * direction)
            fd = (plus - minus) / (2 * eps)
            assert fd == pytest.approx((g[b, t].double() * direction).sum().item(), rel=rel,
                                       abs=1e-9)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients formed


def test_next_token_loss_hand_computed():
    """Two positions predicting tokens 2 and 0 from logits whose probabilities are known."""
    logits = torch.log(torch.tensor([[[0.1, 0.2, 0.7], [0.5, 0.25, 0.25], [1.0, 1.0, 1.0]]]))
    tokens = torch.tensor([[1, 2, 0]])
    expected = -math.log(0.7) - math.log(0.5)
    assert next_token_loss(logits, tokens).item() == pytest.approx(expected, rel=1e-6)


def test_gradient_does_not_depend_on_batch_size():
    model = tiny_llama()
    tokens = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(2))
    source = ActivationSource(model, SourceConfig(hooks=["1"]))
    (x_all, g_all), = source.hidden_states(tokens).values()
    (x_one, g_one), = source.hidden_states(tokens[1:2]).values()
    assert torch.allclose(x_all[1], x_one[0], atol=1e-5)
    assert torch.allclose(g_all[1], g_one[0], atol=1e-6)
    # The last position predicts nothing inside the context: its gradient is exactly zero.
    assert torch.count_nonzero(g_all[:, -1]) == 0


def test_activation_only_run_stops_at_the_last_hook():
    model = tiny_llama()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    tokens = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(3))
    with_grad = ActivationSource(model, SourceConfig(hooks=["0"])).hidden_states(tokens)
    calls.clear()
    no_grad = ActivationSource(model, SourceConfig(hooks=["0"]), with_grad=False)
    states = no_grad.hidden_states(tokens)
    assert calls == []
    name = next(iter(states))
    assert states[name][1] is None
    assert torch.allclose(states[name][0], with_grad[name][0])
    expected = model(input_ids=tokens, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(states[name][0], expected, atol=1e-5)


def test_batches_keep_the_right_positions():
    model = tiny_llama()
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(4))
    source = ActivationSource(model, SourceConfig(hooks=["1"], skip_first=2, outlier_factor=0))
    (x, g), = source.hidden_states(tokens).values()
    (batch,) = source.batches(tokens).values()
    assert torch.equal(batch.x, x[:, 2:8].reshape(-1, x.shape[-1]))
    assert torch.equal(batch.g, g[:, 2:8].reshape(-1, x.shape[-1]))
    assert batch.dropped_outliers == 0


def test_outlier_mask_hand_computed():
    x = torch.zeros(5, 2)
    x[:, 0] = torch.tensor([1.0, 2.0, 3.0, 100.0, 2.5])  # median norm 2.5
    assert outlier_mask(x, 10.0).tolist() == [True, True, True, False, True]
    assert outlier_mask(x, 0).all()


def test_bf16_autocast_gradient_agrees_with_fp32():
    model = tiny_llama()
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    (x32, g32), = ActivationSource(model, SourceConfig(hooks=["1"])).hidden_states(tokens).values()
    cfg = SourceConfig(hooks=["1"], autocast="bf16")
    (x16, g16), = ActivationSource(model, cfg).hidden_states(tokens).values()
    cos = torch.nn.functional.cosine_similarity(g32[:, :-1].flatten(), g16[:, :-1].flatten(), 0)
    assert cos > 0.98
    assert torch.allclose(x16, x32, rtol=0.05, atol=0.05)


def test_training_positions_apply_the_outlier_factor_to_the_median_norm():
    """Norms 1, 2, 3, 4, 10 at the candidate positions (median 3): factor 2 keeps norms up to
    6, factor 4 up to 12; positions 0 and T-1 are never data."""
    from gsae.source import training_positions

    norms = torch.tensor([[100.0, 1, 2, 3, 4, 10, 100.0]])
    x = torch.zeros(1, 7, 3)
    x[..., 0] = norms
    mask, outliers = training_positions(x, skip_first=1, outlier_factor=2.0)
    assert mask.tolist() == [[False, True, True, True, True, False, False]] and outliers == 1
    mask, outliers = training_positions(x, skip_first=1, outlier_factor=4.0)
    assert mask.tolist() == [[False, True, True, True, True, True, False]] and outliers == 0
