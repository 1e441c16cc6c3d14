"""What the browser takes from the rest of gsae: an SAE's recorded setup (as `gsae eval` reads
it) and the held-out contexts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor

from gsae.config import build
from gsae.evaluate import EvalConfig, eval_contexts, recorded_hook
from gsae.models import ModelConfig
from gsae.pipeline import EvaluationRun, recorded_settings
from gsae.sae import SAE
from gsae.text import DataConfig


@dataclasses.dataclass
class Recorded:
    """What an SAE records about the data it was trained on."""

    hook: str
    model: dict[str, Any]
    corpus: dict[str, Any]
    skip_first: int
    outlier_factor: float
    autocast: str


def recorded(sae: SAE, name: str = "the SAE") -> Recorded:
    """The SAE's provenance, with the hook point it needs."""
    prov = sae.provenance
    return Recorded(hook=recorded_hook(sae, name), model=dict(prov.model or {}),
                    corpus=dict(prov.corpus or {}), skip_first=prov.skip_first,
                    outlier_factor=prov.outlier_factor, autocast=prov.autocast)


def recorded_configs(sae_dir: str | Path, model_cfg: ModelConfig | None = None,
                     data_cfg: DataConfig | None = None) -> tuple[ModelConfig, DataConfig]:
    """The model and data configs the SAE records (as `gsae eval` reads them), unless given."""
    if model_cfg is not None and data_cfg is not None:
        return model_cfg, data_cfg
    tree = build(EvaluationRun, recorded_settings([str(sae_dir)], need_model=model_cfg is None))
    return model_cfg or tree.model, data_cfg or tree.data


def held_out_contexts(data_cfg: DataConfig, tokenizer: Any, tokens: int, pool_tokens: int,
                      seed: int) -> Tensor:
    """Contexts of the corpus's evaluation split, chosen as `gsae eval` chooses them."""
    return eval_contexts(data_cfg, tokenizer,
                         EvalConfig(eval_tokens=tokens, pool_tokens=pool_tokens, seed=seed))

