"""Filling an activation store from the language model (what `gsae cache` runs): the source
over the training split, its rows appended to the store shard by shard.

Apart from `gsae.store`, so that reading a store (training from it) needs neither the source nor
the tokenizer, and with them transformers.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from gsae.batch import Batch
from gsae.errors import GsaeError
from gsae.models import hidden_size
from gsae.source import ActivationSource, source_identity
from gsae.store import StoreConfig, StoreReader, StoreWriter, refuse_empty_hooks
from gsae.text import DataConfig, batched_contexts, token_contexts


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
    writer = StoreWriter(cfg.store, store_identity(source, data_cfg, model_id), cfg.dtype,
                         cfg.batches_per_shard, cfg.overwrite)
    if writer.manifest["complete"] and writer.rows_done >= cfg.tokens:
        return writer
    writer.manifest["complete"] = False
    contexts = batched_contexts(token_contexts(data_cfg, tokenizer, "train"),
                                source.cfg.lm_batch_size)
    contexts = itertools.islice(contexts, writer.batches_done, None)
    bar = tqdm(total=cfg.tokens, initial=writer.rows_done, unit="tok", unit_scale=True,
               desc="cache", dynamic_ncols=True)
    pending: list[dict[str, Batch]] = []
    pending_rows = 0  # rows of the shard being gathered: they count towards cfg.tokens too
    for tokens in contexts:
        if writer.rows_done + pending_rows >= cfg.tokens:
            break
        pending.append(source.batches(tokens))
        pending_rows += len(next(iter(pending[-1].values())))
        bar.update(len(next(iter(pending[-1].values()))))
        if len(pending) == cfg.batches_per_shard:
            writer.write_shard(pending)
            pending, pending_rows = [], 0
    if pending:
        writer.write_shard(pending)
    bar.close()
    refuse_empty_hooks(writer.manifest, writer.manifest["identity"]["hooks"],
                       "the corpus's training split gave", " (with --overwrite, to replace the "
                       f"store of no tokens in {cfg.store})")
    writer.finish()
    return writer


def validation_contexts(reader: StoreReader, data_cfg: DataConfig,
                        tokenizer: PreTrainedTokenizerBase, tokens: int) -> torch.Tensor:
    """The first ceil(tokens / context_size) token contexts of the store's validation part (the
    contexts its validation shards were made from, which training from it with the same
    --validation_fraction never reads), cut from `data_cfg`'s training split as the store was."""
    span = reader.validation_contexts()
    if not span:
        raise GsaeError(f"the store {reader.folder} was read without a validation part: give "
                        "--validation_fraction above 0")
    wanted = min(len(span), math.ceil(tokens / data_cfg.context_size))
    stream = token_contexts(data_cfg, tokenizer, "train")
    chosen = list(itertools.islice(stream, span.start, span.start + wanted))
    # the span counts whole batches: a store that read the split to its end may have a last
    # batch of fewer contexts, so up to one batch short at the span's end is the corpus's end
    short = wanted - len(chosen)
    end_of_split = span.start + wanted == span.stop and short < int(
        reader.identity["lm_batch_size"])
    if short and (not chosen or not end_of_split):
        raise GsaeError(f"the training split of {data_cfg.dataset!r} has fewer contexts than "
                        f"the store {reader.folder} was made from: it is not this store's corpus")
    return torch.stack(chosen)
