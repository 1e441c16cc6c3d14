"""gsae: Gradient Sparse Autoencoders (g-SAEs) for language-model activations."""

from gsae.errors import GsaeError
from gsae.formats import load
from gsae.sae import SAE, Provenance, SAEConfig
from gsae.version import __version__

__all__ = ["SAE", "SAEConfig", "Provenance", "GsaeError", "load", "__version__"]
