"""gsae: Gradient Sparse Autoencoders (g-SAEs) for language-model activations."""

from typing import Any

from gsae.errors import GsaeError
from gsae.formats import load
from gsae.sae import SAE, Provenance, SAEConfig
from gsae.version import __version__

__all__ = ["SAE", "SAEConfig", "Provenance", "GsaeError", "activations", "load", "__version__"]


def __getattr__(name: str) -> Any:
    """`gsae.activations`, imported on first use: it runs a language model, and importing
    transformers up front would make every `import gsae.<module>` pay for it."""
    if name == "activations":
        from gsae.states import activations

        return activations
    raise AttributeError(f"module 'gsae' has no attribute {name!r}")
