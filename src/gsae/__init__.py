"""gsae: Gradient Sparse Autoencoders (g-SAEs) for language-model activations."""

from gsae.errors import GsaeError
from gsae.sae import SAE, SAEConfig

__all__ = ["SAE", "SAEConfig", "GsaeError"]
__version__ = "0.1.0"
