"""The on-disk store of (activation, gradient) pairs, so one language-model pass serves a sweep.

Layout of a store folder:

    manifest.json                 what was computed, from what, and the list of finished shards
    shard-000000.safetensors      tensors "<hook>.x" and "<hook>.g", [rows, d_in] each

A shard holds the SAE rows of a fixed number of language-model batches. Shards are written to a
temporary name and renamed, then the manifest is rewritten (also atomically), so an interrupted
`gsae cache` leaves only complete shards and resumes after the last one listed.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from gsae.errors import GsaeError
from gsae.models import hidden_size
from gsae.sae import GRADIENT_DEFINITION
from gsae.source import ActivationSource, Batch, source_identity
from gsae.text import DataConfig, batched_contexts, token_contexts

MANIFEST = "manifest.json"
STORE_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StoreConfig:
    """Where and how `gsae cache` writes activations and gradients."""

    store: str = field(default="cache/store", metadata={"help": "folder of the store"})
    tokens: int = field(default=200_000, metadata={"help": "SAE rows (tokens) to store"})
    store_dtype: str = field(
        default="float16",
        metadata={"help": "storage type: float32 (exact), float16 or bfloat16 (half the size)"},
    )
    batches_per_shard: int = field(
        default=8, metadata={"help": "language-model batches per shard file"}
    )


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


class StoreWriter:
    """Appends shards to a store folder; resumes a store whose identity matches."""

    def __init__(self, folder: str | Path, identity: dict[str, Any], dtype: str,
                 batches_per_shard: int):
        if dtype not in DTYPES:
            raise GsaeError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.folder = Path(folder)
        self.dtype = dtype
        self.batches_per_shard = batches_per_shard
        identity = {**identity, "dtype": dtype, "batches_per_shard": batches_per_shard,
                    "gradient_definition": GRADIENT_DEFINITION}
        manifest_file = self.folder / MANIFEST
        if manifest_file.exists():
            self.manifest = read_manifest(self.folder)
            if self.manifest["identity"] != identity:
                diff = sorted(k for k in set(identity) | set(self.manifest["identity"])
                              if identity.get(k) != self.manifest["identity"].get(k))
                raise GsaeError(
                    f"{self.folder} holds a store made with other settings (differs in: "
                    f"{', '.join(diff)}); use another folder or delete it"
                )
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise GsaeError(f"{self.folder} is not empty and holds no store; choose a new folder")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.manifest = {"version": STORE_VERSION, "identity": identity, "shards": [],
                             "complete": False}
            self._write_manifest()

    @property
    def batches_done(self) -> int:
        """Language-model batches already stored (to skip when resuming)."""
        return sum(s["batches"] for s in self.manifest["shards"])

    @property
    def rows_done(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    def write_shard(self, chunks: list[dict[str, Batch]]) -> None:
        """Store the rows of several language-model batches as one shard."""
        tensors: dict[str, torch.Tensor] = {}
        rows = None
        dropped: dict[str, int] = {}
        for hook in self.manifest["identity"]["hooks"]:
            x = torch.cat([c[hook].x for c in chunks])
            g_parts = [c[hook].g for c in chunks]
            if any(g is None for g in g_parts):
                raise GsaeError("the store needs gradients: run the source with gradients on")
            tensors[f"{hook}.x"] = x.to(DTYPES[self.dtype]).contiguous()
            tensors[f"{hook}.g"] = torch.cat(g_parts).to(DTYPES[self.dtype]).contiguous()  # type: ignore[arg-type]
            if not all(torch.isfinite(tensors[f"{hook}.{t}"]).all() for t in "xg"):
                raise GsaeError(f"activations or gradients at {hook} overflow {self.dtype}; "
                                "store them as bfloat16 or float32 (--store_dtype)")
            rows = x.shape[0] if rows is None else min(rows, x.shape[0])
            dropped[hook] = sum(c[hook].dropped_outliers for c in chunks)
        index = len(self.manifest["shards"])
        name = shard_name(index)
        tmp = self.folder / (name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(self.folder / name)
        self.manifest["shards"].append(
            {"file": name, "bytes": (self.folder / name).stat().st_size,
             "batches": len(chunks), "rows": rows, "dropped_outliers": dropped,
             "rows_per_hook": {h: tensors[f"{h}.x"].shape[0]
                               for h in self.manifest["identity"]["hooks"]}}
        )
        self._write_manifest()

    def finish(self) -> None:
        self.manifest["complete"] = True
        self._write_manifest()

    def _write_manifest(self) -> None:
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2) + "\n")
        tmp.replace(self.folder / MANIFEST)



def store_identity(source: ActivationSource, data_cfg: DataConfig, model_id: dict[str, Any]
                   ) -> dict[str, Any]:
    """What a store made by `source` from `data_cfg`'s corpus holds (before the storage
    settings that StoreWriter adds)."""
    return {"model": model_id, "hooks": source.hook_names, "d_in": hidden_size(source.model),
            "lm_batch_size": source.cfg.lm_batch_size, **source_identity(source.cfg, data_cfg)}


def fill_store(cfg: StoreConfig, source: ActivationSource, data_cfg: DataConfig,
               tokenizer: PreTrainedTokenizerBase, model_id: dict[str, Any]) -> StoreWriter:
    """Run `source` over the training split until the store `cfg.store` holds `cfg.tokens` rows
    (or the corpus ends). A store of the same identity is continued after its last shard; a
    complete one that is large enough is returned as it is."""
    writer = StoreWriter(cfg.store, store_identity(source, data_cfg, model_id), cfg.store_dtype,
                         cfg.batches_per_shard)
    if writer.manifest["complete"] and writer.rows_done >= cfg.tokens:
        return writer
    writer.manifest["complete"] = False
    contexts = batched_contexts(token_contexts(data_cfg, tokenizer, "train"),
                                source.cfg.lm_batch_size)
    contexts = itertools.islice(contexts, writer.batches_done, None)
    bar = tqdm(total=cfg.tokens, initial=writer.rows_done, unit="tok", unit_scale=True,
               desc="cache", dynamic_ncols=True)
    pending: list[dict[str, Batch]] = []
    for tokens in contexts:
        if writer.rows_done >= cfg.tokens:
            break
        pending.append(source.batches(tokens))
        bar.update(len(next(iter(pending[-1].values()))))
        if len(pending) == cfg.batches_per_shard:
            writer.write_shard(pending)
            pending = []
    if pending:
        writer.write_shard(pending)
    writer.finish()
    bar.close()
    return writer


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a store folder, checked for readability."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise GsaeError(f"{folder} is not an activation store: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GsaeError(f"{path} is corrupt ({err.msg} at line {err.lineno})") from None
    if manifest.get("version") != STORE_VERSION or "identity" not in manifest:
        raise GsaeError(f"{path} is not a gsae store manifest of version {STORE_VERSION}")
    return manifest


class StoreReader:
    """Reads a store's shards as chunks (one dict hook -> Batch per shard)."""

    def __init__(self, folder: str | Path, hooks: list[str] | None = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.identity = self.manifest["identity"]
        stored = self.identity["hooks"]
        self.hooks = list(stored) if not hooks else hooks
        missing = [h for h in self.hooks if h not in stored]
        if missing:
            raise GsaeError(f"the store {self.folder} has no hook {missing}; it holds {stored}")
        self.shards = [s["file"] for s in self.manifest["shards"]]
        if not self.shards:
            raise GsaeError(f"the store {self.folder} holds no finished shard yet")
        for shard in self.manifest["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                raise GsaeError(f"the store {self.folder} has a missing or damaged "
                                f"{shard['file']} (size differs from its manifest); delete "
                                "the store and rebuild it with gsae cache")

    @property
    def d_in(self) -> int:
        return int(self.identity["d_in"])

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def sae_metadata(self) -> dict[str, Any]:
        """What an SAE trained on this store records about its data (its hook aside)."""
        return {k: self.identity[k] for k in ("model", "corpus", "context_size", "skip_first",
                                              "outlier_factor", "autocast")}

    def read_shard(self, name: str) -> dict[str, Batch]:
        """One shard as float32 batches, one per hook."""
        path = self.folder / name
        dropped = next(s for s in self.manifest["shards"] if s["file"] == name)["dropped_outliers"]
        try:
            with safe_open(str(path), framework="pt") as f:
                return {h: Batch(f.get_tensor(f"{h}.x").float(), f.get_tensor(f"{h}.g").float(),
                                 h, dropped_outliers=dropped[h]) for h in self.hooks}
        except Exception as err:  # safetensors raises several types for damaged files
            raise GsaeError(f"the store shard {path} is unreadable or corrupt ({err}); "
                            "delete it from the store and rerun gsae cache") from None

    def chunks(self, seed: int = 0, skip: int = 0) -> Iterator[dict[str, Batch]]:
        """Shards in a random order, pass after pass (a new order each pass), without end;
        the first `skip` chunks are passed over without being read."""
        for epoch in range(1 << 62):
            order = torch.randperm(len(self.shards),
                                   generator=torch.Generator().manual_seed(seed + epoch))
            for i in order.tolist():
                if skip > 0:
                    skip -= 1
                    continue
                yield self.read_shard(self.shards[i])
