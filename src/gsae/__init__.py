"""gsae: Gradient Sparse Autoencoders (g-SAEs) for language-model activations."""

from gsae.errors import GsaeError
from gsae.formats import load
from gsae.sae import SAE, Provenance, SAEConfig

__all__ = ["SAE", "SAEConfig", "Provenance", "GsaeError", "load"]
__version__ = "0.1.0"
