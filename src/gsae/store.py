"""The on-disk store of (activation, gradient) pairs, so one language-model pass serves a sweep.

Layout of a store folder:

    identity.json                 what the store holds (model, hooks, corpus, dtype, ...)
    manifest.json                 version, identity, the finished shards, and whether complete
    shard-000000.safetensors      tensors "<hook>.x" and "<hook>.g", [rows, d_in] each

A shard holds the SAE rows of a fixed number of language-model batches. Shards are written to a
temporary name and renamed, then the manifest is rewritten (also atomically), so an interrupted
`gsae cache` leaves only complete shards and resumes after the last one listed. A folder that
holds a store of other settings, or other files, is refused unless `--overwrite` is given (which
deletes the old store's files first).

Each shard's sha256 is recorded in the manifest (version 2) and checked on every read (the file
is read once: its bytes are hashed and then parsed), so a shard damaged after it was written is
refused, naming the shard, rather than trained on; `sha256sum` checks the same by hand. Stores
of version 1 (no checksums, no identity.json) are still read, with a warning, their shards
checked by size only; they cannot be continued.

A store is read (trained on) only once its manifest says `"complete": true`, which `gsae cache`
writes when it has stored what it was asked for (or the corpus ran out), as every gsae version
has. While a store is written or extended its manifest says false, so a store that `gsae cache`
is still writing, or that an interrupted one left behind, is refused with a hint to finish it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from gsae.batch import GRADIENT_DEFINITION, Batch, no_rows_error
from gsae.errors import GsaeError
from gsae.io import atomic_output, claim_folder, read_json, write_json
from gsae.sae import Provenance

MANIFEST = "manifest.json"
IDENTITY = "identity.json"
STORE_VERSION = 2
READABLE_VERSIONS = (1, 2)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WHAT = "an activation store"


@dataclass
class StoreConfig:
    """Where and how `gsae cache` writes activations and gradients."""

    store: str = field(default="cache/store", metadata={"help": "folder of the store"})
    tokens: int = field(default=200_000, metadata={"help": "SAE rows (tokens) to store",
                                                   "min": 1})
    dtype: str = field(
        default="float16",
        metadata={"help": "storage type: float32 (exact), float16 or bfloat16 (half the size)",
                  "choices": ("float32", "float16", "bfloat16")},
    )
    batches_per_shard: int = field(
        default=8, metadata={"help": "language-model batches per shard file", "min": 1}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "delete any store in --store and start it again (other files there "
                          "are kept)"},
    )


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class StoreWriter:
    """Appends shards to a store folder; resumes a store whose identity matches."""

    def __init__(self, folder: str | Path, identity: dict[str, Any], dtype: str,
                 batches_per_shard: int, overwrite: bool = False):
        if dtype not in DTYPES:
            raise GsaeError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.folder = Path(folder)
        self.dtype = dtype
        self.batches_per_shard = batches_per_shard
        identity = {**identity, "dtype": dtype, "batches_per_shard": batches_per_shard,
                    "gradient_definition": GRADIENT_DEFINITION}
        if overwrite:
            remove_store_files(self.folder)
        elif (self.folder / MANIFEST).is_file() and not (self.folder / IDENTITY).is_file():
            raise GsaeError(f"{self.folder} holds a store of an older gsae (no {IDENTITY}): it "
                            "can be trained on but not continued; use another folder, or pass "
                            "--overwrite to rebuild it")
        claim_folder(self.folder, IDENTITY, identity, WHAT, overwrite)
        if (self.folder / MANIFEST).is_file():
            self.manifest = read_manifest(self.folder)
            check_shard_sizes(self.folder, self.manifest)
        else:
            self.manifest = {"version": STORE_VERSION, "identity": read_json(
                self.folder / IDENTITY, f"the identity of {WHAT}"), "shards": [],
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
                                "store them as bfloat16 or float32 (--store.dtype)")
            rows = x.shape[0] if rows is None else min(rows, x.shape[0])
            dropped[hook] = sum(c[hook].dropped_outliers for c in chunks)
        name = shard_name(len(self.manifest["shards"]))
        data = save_safetensors(tensors)
        with atomic_output(self.folder / name) as tmp:
            tmp.write_bytes(data)
        self.manifest["shards"].append(
            {"file": name, "bytes": len(data), "sha256": sha256_of(data),
             "batches": len(chunks), "rows": rows, "dropped_outliers": dropped,
             "rows_per_hook": {h: tensors[f"{h}.x"].shape[0]
                               for h in self.manifest["identity"]["hooks"]}}
        )
        self._write_manifest()

    def finish(self) -> None:
        self.manifest["complete"] = True
        self._write_manifest()

    def _write_manifest(self) -> None:
        write_json(self.folder / MANIFEST, self.manifest)


def check_shard_sizes(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a store whose listed shards are missing or of another size than recorded (a
    cheap check of every shard; their checksums are checked when they are read)."""
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise GsaeError(f"the store {folder} has a missing or damaged {shard['file']} (size "
                            "differs from its manifest); rebuild the store with gsae cache "
                            "--overwrite")


def rows_per_hook(manifest: dict[str, Any]) -> dict[str, int]:
    """The rows a store's finished shards hold at each hook."""
    hooks = manifest["identity"]["hooks"]
    return {hook: sum(s.get("rows_per_hook", {}).get(hook, s["rows"]) for s in manifest["shards"])
            for hook in hooks}


def refuse_empty_hooks(manifest: dict[str, Any], hooks: list[str], where: str, then: str
                       ) -> None:
    """Refuse a store that holds no row at one of `hooks` (training on it would wait forever)."""
    rows = rows_per_hook(manifest)
    empty = [hook for hook in hooks if rows.get(hook) == 0]
    if empty:
        raise no_rows_error(empty, manifest["identity"].get("outlier_factor", 0.0), where, then)


def remove_store_files(folder: Path) -> None:
    """Delete what a store consists of (manifest, identity, shards) from `folder`."""
    for name in (MANIFEST, IDENTITY):
        (folder / name).unlink(missing_ok=True)
    for shard in folder.glob("shard-*.safetensors"):
        shard.unlink()


def validation_shard_count(shards: int, fraction: float) -> int:
    """How many of a store's `shards` are kept out of training as its validation part: the
    rounded `fraction`, at least one when the fraction is positive; refused when no shard
    would be left to train on."""
    if fraction <= 0:
        return 0
    held = max(1, round(shards * fraction))
    if held >= shards:
        raise GsaeError(f"--validation_fraction {fraction:g} of a store of {shards} shard(s) "
                        f"leaves no shard to train on: use a larger store or a smaller fraction")
    return held


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a store folder, checked for readability."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise GsaeError(f"{folder} is not an activation store: {MANIFEST} is missing")
    manifest = read_json(path, f"the manifest of {WHAT}")
    if not isinstance(manifest, dict) or manifest.get("version") not in READABLE_VERSIONS \
            or "identity" not in manifest:
        raise GsaeError(f"{path} is not a gsae store manifest of version "
                        f"{' or '.join(map(str, READABLE_VERSIONS))}")
    return manifest


class StoreReader:
    """Reads a store's shards as chunks (one dict hook -> Batch per shard)."""

    def __init__(self, folder: str | Path, hooks: list[str] | None = None,
                 validation_fraction: float = 0.0):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.identity = self.manifest["identity"]
        stored = self.identity["hooks"]
        self.hooks = list(stored) if not hooks else hooks
        missing = [h for h in self.hooks if h not in stored]
        if missing:
            raise GsaeError(f"the store {self.folder} has no hook {missing}; it holds {stored}")
        if self.manifest["shards"]:  # before the completeness check: caching on won't help
            refuse_empty_hooks(self.manifest, self.hooks, f"the store {self.folder} holds",
                               " (rebuild the store with gsae cache --overwrite)")
        if self.manifest.get("complete") is not True:
            raise GsaeError(f"the store {self.folder} is incomplete: gsae cache is still writing "
                            "it or was stopped before it finished; finish it by running the same "
                            f"gsae cache command (--store {self.folder}) again")
        self.shards = [s["file"] for s in self.manifest["shards"]]
        if not self.shards:
            raise GsaeError(f"the store {self.folder} holds no finished shard yet")
        held = validation_shard_count(len(self.shards), validation_fraction)
        # the last shards hold the contexts the store read last: a validation part of the
        # training split that `chunks` never yields
        kept = len(self.shards) - held
        self.shards, self.validation_shards = self.shards[:kept], self.shards[kept:]
        self._entries = {s["file"]: s for s in self.manifest["shards"]}
        if self.manifest["version"] < 2:
            warnings.warn(f"the store {self.folder} was written by an older gsae and records no "
                          "checksums: its shards are checked by size only", stacklevel=2)
        check_shard_sizes(self.folder, self.manifest)

    @property
    def d_in(self) -> int:
        return int(self.identity["d_in"])

    @property
    def rows(self) -> int:
        """The rows that training reads (the validation shards' rows excluded)."""
        return sum(self._entries[name]["rows"] for name in self.shards)

    def validation_contexts(self) -> range:
        """The indices, in the training split's sequence of token contexts, of the contexts
        that the validation shards were made from (empty without a validation part): shards
        hold consecutive batches of `lm_batch_size` contexts (the last batch may be short)."""
        per_batch = int(self.identity["lm_batch_size"])
        start = per_batch * sum(self._entries[name]["batches"] for name in self.shards)
        held = sum(self._entries[name]["batches"] for name in self.validation_shards)
        return range(start, start + per_batch * held)

    def provenance(self, hook: str) -> Provenance:
        """What an SAE trained on this store's rows at `hook` records about its data."""
        recorded = ("model", "corpus", "context_size", "skip_first", "outlier_factor", "autocast")
        return Provenance.from_json({**{k: self.identity[k] for k in recorded}, "hook": hook})

    def read_shard(self, name: str) -> dict[str, Batch]:
        """One shard as float32 batches, one per hook, after checking its checksum."""
        path = self.folder / name
        entry = self._entries[name]
        tensors = self._load_checked(path, entry)
        other = {t.shape[-1] for key, t in tensors.items()
                 if key.rsplit(".", 1)[0] in self.hooks} - {self.d_in}
        if other:
            raise GsaeError(f"the store shard {path} holds rows of width {min(other)}, but the "
                            f"store's manifest records d_in {self.d_in}; rebuild the store with "
                            "gsae cache --overwrite")
        try:
            return {h: Batch(tensors[f"{h}.x"].float(), tensors[f"{h}.g"].float(), h,
                             dropped_outliers=entry["dropped_outliers"][h]) for h in self.hooks}
        except KeyError as err:
            raise GsaeError(f"the store shard {path} lacks the tensor {err}; delete the store "
                            "and rebuild it with gsae cache") from None

    def _load_checked(self, path: Path, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise GsaeError(f"the store shard {path} cannot be read ({err.strerror}); rebuild "
                            "the store with gsae cache --overwrite") from None
        expected = entry.get("sha256")
        if expected is not None and sha256_of(data) != expected:
            raise GsaeError(f"the store shard {path} is damaged (its sha256 differs from the "
                            "manifest's); rebuild the store with gsae cache --overwrite")
        try:
            return load_safetensors(data)
        except Exception as err:  # safetensors raises several types for damaged files
            raise GsaeError(f"the store shard {path} is unreadable or corrupt ({err}); "
                            "rebuild the store with gsae cache --overwrite") from None

    def repeated_rows(self, hook: str) -> int:
        """How many rows of `hook` repeat an earlier row exactly (the same activation bytes):
        0 for a store of distinct token positions. A corpus read twice, or duplicated
        documents, would show here."""
        seen: set[bytes] = set()
        repeats = 0
        for name in self.shards:
            rows = self.read_shard(name)[hook].x.numpy()
            for row in rows:
                digest = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
                repeats += digest in seen
                seen.add(digest)
        return repeats

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
