"""Everything the browser reads from the rest of gsae: an SAE's recorded setup, the model and the
held-out contexts. Kept in one place so that renamed APIs change one file."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import Tensor

from gsae.errors import GsaeError
from gsae.evaluate import EvalConfig, eval_contexts
from gsae.sae import SAE
from gsae.source import SourceConfig
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
    """The SAE's provenance (typed `sae.provenance` or the older `sae.metadata` dict)."""
    prov = getattr(sae, "provenance", None)
    if prov is None:
        prov = sae.metadata
    elif dataclasses.is_dataclass(prov):
        prov = dataclasses.asdict(prov)
    if not prov.get("hook"):
        raise GsaeError(f"{name} records no hook point: it cannot be inspected on its model")
    return Recorded(
        hook=str(prov["hook"]),
        model=dict(prov.get("model") or {}),
        corpus=dict(prov.get("corpus") or {}),
        skip_first=int(prov.get("skip_first", SourceConfig.skip_first)),
        outlier_factor=float(prov.get("outlier_factor", SourceConfig.outlier_factor)),
        autocast=str(prov.get("autocast") or "none"),
    )


def recorded_configs(sae: SAE, name: str = "the SAE", model_cfg: Any = None,
                     data_cfg: DataConfig | None = None) -> tuple[Any, DataConfig]:
    """The ModelConfig and DataConfig of the model and corpus the SAE was trained on, unless
    given."""
    from gsae.models import ModelConfig

    rec = recorded(sae, name)
    if model_cfg is None:
        if not rec.model.get("model"):
            raise GsaeError(f"{name} does not record its model: pass --model")
        model_cfg = ModelConfig(model=rec.model["model"], revision=rec.model.get("revision"))
    if data_cfg is None:
        data_cfg = DataConfig(**{f.name: rec.corpus[f.name] for f in fields(DataConfig)
                                 if rec.corpus.get(f.name) is not None})
    return model_cfg, data_cfg


def load_sae(folder: str | Path) -> SAE:
    return SAE.load(folder)


def load_model(model_cfg: Any) -> tuple[Any, Any]:
    from gsae.models import load_model as load

    return load(model_cfg)


def held_out_contexts(data_cfg: DataConfig, tokenizer: Any, tokens: int, pool_tokens: int,
                      seed: int) -> Tensor:
    """Contexts of the corpus's evaluation split, chosen as `gsae eval` chooses them."""
    return eval_contexts(data_cfg, tokenizer,
                         EvalConfig(eval_tokens=tokens, pool_tokens=pool_tokens, seed=seed))


def hook_module(model: Any, hook: str) -> tuple[str, Any]:
    from gsae.models import resolve_hook

    return resolve_hook(model, hook)


def add_to_hook_output(output: Any, delta_of: Any) -> Any:
    """`output` with `delta_of(hidden)` added to its hidden-state tensor."""
    from gsae.models import hook_output_tensor, replace_hook_output

    h = hook_output_tensor(output)
    return replace_hook_output(output, h + delta_of(h).to(h.dtype))
