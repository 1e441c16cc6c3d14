"""SAE data as every stage passes it on: rows of activations `x` with their loss gradients `g`.

The source makes batches, the store writes and reads them, the trainer and the SAE consume them.
This module sits below all of them, so that the SAE, the trainer and the store's reading side
need none of the source's imports (which load transformers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gsae.errors import GsaeError

# What `g` is, recorded in SAEs, stores and results: the loss of `gsae.source.next_token_loss`.
GRADIENT_DEFINITION = (
    "g = dL/dx at the hook, L = sum over predicted positions of each sequence's next-token "
    "cross-entropy (not averaged), clean model"
)


@dataclass
class Batch:
    """SAE training data from one hook point: rows are tokens."""

    x: Tensor  # [N, d] activations
    g: Tensor | None  # [N, d] dL/dx, None when gradients were not computed
    hook: str = ""
    dropped_outliers: int = 0

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device) -> Batch:
        """The same batch with its tensors on `device`."""
        g = None if self.g is None else self.g.to(device)
        return Batch(self.x.to(device), g, self.hook, self.dropped_outliers)


def no_rows_error(hooks: list[str], outlier_factor: float, where: str, then: str = ""
                  ) -> GsaeError:
    """The error for data that holds no row at `hooks` (`where` says whose, with its verb):
    with at least one position per context (`check_positions`), only the outlier filter can
    have dropped every token."""
    return GsaeError(
        f"{where} no token at {', '.join(hooks)}: --outlier_factor {outlier_factor:g} dropped "
        "every one (it drops tokens whose activation norm exceeds that multiple of the batch's "
        "median norm); use 0 to keep all, or a value of at least 1, which keeps at least half"
        + then)
