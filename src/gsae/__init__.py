"""gsae: Gradient Sparse Autoencoders (g-SAEs) for language-model activations."""

from gsae.errors import GsaeError
from gsae.formats import load
from gsae.sae import SAE, Provenance, SAEConfig
from gsae.states import activations
from gsae.version import __version__

__all__ = ["SAE", "SAEConfig", "Provenance", "GsaeError", "activations", "load", "__version__"]
