"""SAEBench's core evaluation format: per SAE, one JSON file that sae-bench 0.6.0's
`sae_bench.evals.core.eval_output.CoreEvalOutput` reads (`gsae eval --saebench DIR`).

The numbers are those of `gsae.evaluate` run with `core=True`, for the grad-free mode (the
encoder SAEBench itself would run): gsae's rows and CE positions, SAEBench's ablation baseline
(the hook zeroed at every position) and its scores. docs/evaluation.md maps every field and
says where gsae's definitions differ from SAEBench's code. A file is recognised as gsae's by
`eval_result_unstructured.schema`; any other file is replaced only with `overwrite`.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gsae.errors import GsaeError
from gsae.evaluate import GRAD_FREE, short_labels
from gsae.formats import saelens_config
from gsae.io import check_output_file, write_json
from gsae.records import CoreRecord, EvalRecord, EvalResult, EvalRunInfo
from gsae.sae import SAE

SAEBENCH_VERSION = "0.6.0"  # the sae-bench release whose CoreEvalOutput the files follow
SCHEMA = "gsae.saebench/1"  # eval_result_unstructured.schema of the files gsae writes
SCHEMA_KEY = ("eval_result_unstructured", "schema")
FILE_SUFFIX = "_eval_results.json"  # SAEBench's file names: <release>_<id>_eval_results.json
EVAL_TYPE = "core"
MODE = GRAD_FREE
UNDEFINED = -1.0  # what SAEBench writes for an undefined number (NaN), e.g. a 0/0 score
UNKNOWN = "Unknown"  # SAEBench's value for a commit hash it cannot tell
COSINE_ROWS = 1024  # latents per block of the pairwise cosine similarities


# Files ------------------------------------------------------------------------------------------


def file_names(names: Sequence[str]) -> list[str]:
    """The file of each SAE (named as in the evaluation): the shortest path suffix of its name
    that tells the SAEs apart, '/' and other characters outside [A-Za-z0-9._-] made '_'."""
    labels = [re.sub(r"[^A-Za-z0-9._-]+", "_", label) for label in short_labels(list(names))]
    if len(set(labels)) != len(labels):
        raise GsaeError(f"the SAEs {list(names)} would share SAEBench file names {labels}: "
                        "evaluate them in separate runs")
    return [f"{label}{FILE_SUFFIX}" for label in labels]


def check_folder(folder: str | Path, names: Sequence[str], overwrite: bool = False) -> None:
    """Refuse, before any work, a --saebench folder whose files cannot be written, or that
    holds a file of one of these names that gsae did not write (unless `overwrite`)."""
    for file in file_names(names):
        check_output_file(Path(folder) / file, "--saebench", SCHEMA, overwrite, SCHEMA_KEY)


def write_core(folder: str | Path, result: EvalResult, saes: Sequence[SAE],
               overwrite: bool = False) -> list[Path]:
    """Write one SAEBench core file per SAE of `result` (evaluated with `core=True`, `saes` in
    the order evaluated) into `folder`; returns the paths."""
    names = list(dict.fromkeys(record.sae for record in result.results))
    if not result.core:
        raise GsaeError("the evaluation has no SAEBench numbers: evaluate with core=True")
    if len(saes) != len(names):
        raise GsaeError(f"{len(saes)} SAEs given for the {len(names)} SAEs evaluated")
    check_folder(folder, names, overwrite)
    eval_id, now = str(uuid.uuid4()), int(time.time() * 1000)
    paths = []
    for sae, name, file in zip(saes, names, file_names(names)):
        paths.append(write_json(Path(folder) / file,
                                core_output(result, sae, name, eval_id, now)))
    return paths


# The file's content -----------------------------------------------------------------------------


def core_output(result: EvalResult, sae: SAE, name: str, eval_id: str,
                datetime_epoch_millis: int) -> dict[str, Any]:
    """The CoreEvalOutput of one SAE of `result` as a JSON-ready dict."""
    record = _one(result.results, name)
    core = _one(result.core, name)
    density = _density(core, record)
    weights = weight_metrics(sae)
    return {
        "eval_type_id": EVAL_TYPE,
        "eval_config": eval_config(result.run),
        "eval_id": eval_id,
        "datetime_epoch_millis": datetime_epoch_millis,
        "eval_result_metrics": metrics(record, core, result.run, density, weights),
        "eval_result_details": feature_details(core, density, weights),
        "sae_bench_commit_hash": UNKNOWN,
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": saelens_config(sae),
        "eval_result_unstructured": {
            "schema": SCHEMA,
            "format": f"sae_bench.evals.core.eval_output.CoreEvalOutput of sae-bench "
                      f"{SAEBENCH_VERSION}",
            "sae": name,
            "mode": MODE,
            "gsae_eval": {"run": asdict(result.run),
                          "results": [asdict(r) for r in result.results if r.sae == name]},
        },
    }


def eval_config(run: EvalRunInfo) -> dict[str, Any]:
    """CoreEvalConfig: the evaluation's settings under SAEBench's names, every metric on."""
    batches = math.ceil(run.contexts / run.batch_size)
    return {
        "model_name": str(run.model.get("model") or ""),
        "llm_dtype": run.model_dtype,
        "batch_size_prompts": run.batch_size,
        "n_eval_reconstruction_batches": batches,
        "n_eval_sparsity_variance_batches": batches,
        "dataset": str((run.corpus or {}).get("dataset") or ""),
        "context_size": run.context_size,
        "compute_kl": True,
        "compute_ce_loss": True,
        "compute_l2_norms": True,
        "compute_sparsity_metrics": True,
        "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": True,
        "compute_featurewise_weight_based_metrics": True,
        "exclude_special_tokens_from_reconstruction": False,  # SAEBench's default
        "verbose": False,  # SAEBench's default
    }


def metrics(record: EvalRecord, core: CoreRecord, run: EvalRunInfo, density: Tensor,
            weights: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """CoreMetricCategories: the seven groups of scalar metrics."""
    r, c = record, core
    return {
        "model_behavior_preservation": _numbers({
            "kl_div_score": score(c.kl_zero_all, r.kl, 0.0),
            "kl_div_with_ablation": c.kl_zero_all,
            "kl_div_with_sae": r.kl,
        }),
        "model_performance_preservation": _numbers({
            "ce_loss_score": score(c.ce_zero_all, r.ce_spliced, r.ce_clean),
            "ce_loss_with_ablation": c.ce_zero_all,
            "ce_loss_with_sae": r.ce_spliced,
            "ce_loss_without_sae": r.ce_clean,
        }),
        "reconstruction_quality": _numbers({
            "explained_variance": r.explained_variance,
            "explained_variance_legacy": c.explained_variance_legacy,
            "mse": None if r.mse is None else r.mse * r.d_in,
            "cossim": r.cosine,
        }),
        "shrinkage": _numbers({
            "l2_norm_in": c.l2_norm_in,
            "l2_norm_out": c.l2_norm_out,
            "l2_ratio": r.l2_ratio,
            "relative_reconstruction_bias": c.relative_reconstruction_bias,
        }),
        "sparsity": _numbers({"l0": r.l0, "l1": c.l1}),
        "token_stats": {"total_tokens_eval_reconstruction": run.context_tokens,
                        "total_tokens_eval_sparsity_variance": run.context_tokens},
        "misc_metrics": _numbers(misc_metrics(density, weights)),
    }


def score(ablated: float | None, with_sae: float | None, without: float | None) -> float | None:
    """SAEBench's normalised score (ablated - with_sae) / (ablated - without): 1 when the SAE
    changes nothing, 0 when it is as bad as the ablation; None when undefined."""
    if ablated is None or with_sae is None or without is None or ablated == without:
        return None
    return (ablated - with_sae) / (ablated - without)


def misc_metrics(density: Tensor, weights: dict[str, Tensor]) -> dict[str, float]:
    """MiscMetrics: the share of latents above 1% and 10% density (also weighted by density),
    the share that fired at all, and the mean nearest-neighbour cosines."""
    total = density.sum().item()
    return {
        "freq_over_1_percent": (density > 0.01).double().mean().item(),
        "freq_over_10_percent": (density > 0.1).double().mean().item(),
        "normalized_freq_over_1_percent":
            density[density > 0.01].sum().item() / total if total > 0 else 0.0,
        "normalized_freq_over_10_percent":
            density[density > 0.1].sum().item() / total if total > 0 else 0.0,
        "average_max_encoder_cosine_sim": weights["max_encoder_cosine_sim"].mean().item(),
        "average_max_decoder_cosine_sim": weights["max_decoder_cosine_sim"].mean().item(),
        "frac_alive": (density > 0).double().mean().item(),
    }


def feature_details(core: CoreRecord, density: Tensor, weights: dict[str, Tensor]
                    ) -> list[dict[str, float]]:
    """CoreFeatureMetric of every latent: its density, firings per context it fired in, and
    its encoder and decoder weights' statistics."""
    fired = torch.tensor(core.fired, dtype=torch.float64)
    contexts = torch.tensor(core.contexts_fired, dtype=torch.float64)
    columns = {"feature_density": density, "consistent_activation_heuristic": fired / contexts,
               **weights}
    lists = {key: [_number(v) for v in column.tolist()] for key, column in columns.items()}
    return [{"index": i, **{key: values[i] for key, values in lists.items()}}
            for i in range(len(core.fired))]


def weight_metrics(sae: SAE) -> dict[str, Tensor]:
    """Per latent: encoder bias and norm, cosine of its encoder and decoder rows, and the
    largest cosine of its encoder (decoder) row with any other latent's."""
    w_enc, w_dec = sae.W_enc.detach().float().cpu(), sae.W_dec.detach().float().cpu()
    return {
        "encoder_bias": sae.b_enc.detach().float().cpu(),
        "encoder_norm": w_enc.norm(dim=1),
        "encoder_decoder_cosine_sim": F.cosine_similarity(w_enc, w_dec, dim=1),
        "max_encoder_cosine_sim": max_cosine(w_enc),
        "max_decoder_cosine_sim": max_cosine(w_dec),
    }


def max_cosine(rows: Tensor) -> Tensor:
    """For each row, its largest cosine similarity with any other row (-inf for a lone row),
    a block of rows at a time."""
    unit = F.normalize(rows, dim=1)
    best = torch.empty(len(unit))
    for start in range(0, len(unit), COSINE_ROWS):
        sims = unit[start:start + COSINE_ROWS] @ unit.T
        own = torch.arange(len(sims))
        sims[own, own + start] = -math.inf
        best[start:start + len(sims)] = sims.max(dim=1).values
    return best


# Helpers ----------------------------------------------------------------------------------------


def _one(records: Sequence[Any], name: str) -> Any:
    return next(r for r in records if r.sae == name and r.mode == MODE)


def _density(core: CoreRecord, record: EvalRecord) -> Tensor:
    """Per latent: the share of the rows in which it fired."""
    return torch.tensor(core.fired, dtype=torch.float64) / max(1, record.tokens)


def _number(value: float | None) -> float:
    """A float for SAEBench: an undefined or non-finite number is UNDEFINED, as SAEBench
    writes a NaN."""
    return float(value) if value is not None and math.isfinite(value) else UNDEFINED


def _numbers(values: dict[str, float | None]) -> dict[str, float]:
    return {key: _number(value) for key, value in values.items()}
