"""Text corpora: loading and cleaning documents, the train/eval split, tokenising and packing.

`DataConfig.dataset` names the corpus:

- `wiki` (default): about 100 English Wikipedia articles from a MediaWiki dump shipped in the
  gensim wheel, stripped of markup (cached as JSONL under `$GSAE_CACHE`, else `~/.cache/gsae`);
- `news`: about 300 news articles from the same wheel (`lee_background.cor`, one per line);
- a register (`gsae.registers`): `code`, `legal`, `verse` or `german`, texts unlike
  encyclopedic prose that Python or Debian packages install (docs/registers.md);
- a `.txt` file: documents separated by blank lines (a file without blank lines is one
  document; a lone CR breaks a line as LF does); for multi-paragraph documents use `.jsonl`;
- a `.jsonl` file: one JSON object per line, the text in `text_column`;
- a `.parquet` file: the text in column `text_column`;
- a folder: every such file under it, in sorted path order;
- otherwise a Hugging Face dataset name, streamed (`split=hf_split`).

Documents are split into train and eval by document, never inside one; the token stream of a part
is the concatenation of its documents each followed by EOS, cut into `context_size` contexts.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from gsae.config import validate
from gsae.errors import GsaeError
from gsae.io import atomic_output, cache_root, file_fingerprint, files_fingerprint
from gsae.registers import REGISTERS, register_documents, register_fingerprint

EMBEDDED = {
    "wiki": "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "news": "test/test_data/lee_background.cor",
}
FILE_TYPES = (".txt", ".jsonl", ".parquet")
ACCEPTED_DATASETS = (
    "'wiki' or 'news' (embedded), a register (" + ", ".join(map(repr, REGISTERS)) + "), "
    "a .txt, .jsonl or .parquet file, a folder of such files, "
    "or a Hugging Face dataset name"
)
WIKI_CLEANING_VERSION = 1
MIN_ARTICLE_CHARS = 500


@dataclass
class DataConfig:
    """Which text to read and how to cut it into token contexts."""

    dataset: str = field(default="wiki", metadata={"help": f"the text corpus: {ACCEPTED_DATASETS}"})
    text_column: str = field(
        default="text", metadata={"help": "column holding the text (jsonl, parquet, hub datasets)"}
    )
    hf_split: str = field(default="train", metadata={"help": "split of a Hugging Face dataset"})
    context_size: int = field(default=128, metadata={"help": "tokens per context", "min": 2})
    eval_fraction: float = field(
        default=0.1, metadata={"help": "fraction of documents held out for evaluation (0 <= f < 1)",
                                "min": 0, "below": 1}
    )
    split_seed: int = field(default=0, metadata={"help": "seed of the train/eval document split"})
    encoding: str = field(
        default="utf-8",
        metadata={"help": "text encoding of .txt and .jsonl files (e.g. latin-1); text that is "
                  "not valid in it is refused"},
    )


# Documents --------------------------------------------------------------------------------------


def embedded_path(alias: str) -> Path:
    """The file of an embedded corpus inside the gensim wheel, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / EMBEDDED[alias]).is_file():
            return Path(folder) / EMBEDDED[alias]
    raise GsaeError(
        f"the embedded corpus {alias!r} needs the gensim wheel: "
        "pip install --no-deps gensim==4.4.0 (or name another dataset)"
    )


def resolve_dataset(cfg: DataConfig) -> tuple[str, str]:
    """Where `cfg.dataset` comes from: (kind, where), kind one of embedded, register, file,
    folder, hub."""
    name = cfg.dataset
    if name in EMBEDDED:
        return "embedded", name
    if name in REGISTERS:
        return "register", name
    path = Path(name).expanduser()
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        if path.suffix not in FILE_TYPES:
            raise GsaeError(
                f"cannot read {name!r}: a data file must end in {', '.join(FILE_TYPES)}"
            )
        return "file", str(path)
    if name.startswith((".", "/", "~")) or path.suffix in FILE_TYPES:
        raise GsaeError(f"no such file or folder: {name!r}; a dataset is {ACCEPTED_DATASETS}")
    return "hub", name


def load_documents(cfg: DataConfig) -> Sequence[str] | Iterator[str]:
    """The corpus's documents in a stable order.

    Local and embedded corpora come as a list; a hub dataset as a lazy stream.
    """
    kind, where = resolve_dataset(cfg)
    if kind == "embedded":
        return [a["text"] for a in wiki_articles()] if where == "wiki" else _news_articles()
    if kind == "register":
        return register_documents(where)
    if kind == "file":
        return list(_read_file(Path(where), cfg.text_column, cfg.encoding))
    if kind == "folder":
        files = _data_files(Path(where))
        return [doc for file in files for doc in _read_file(file, cfg.text_column, cfg.encoding)]
    return _hub_documents(cfg)


def _data_files(folder: Path) -> list[Path]:
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix in FILE_TYPES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise GsaeError(f"the folder {str(folder)!r} holds no {', '.join(FILE_TYPES)} files")
    return files


def _read_file(path: Path, column: str, encoding: str = "utf-8") -> Iterator[str]:
    if path.suffix == ".txt":
        text = re.sub(r"\r(?!\n)", "\n", _decoded(path, encoding))  # a lone CR breaks a line
        yield from (doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip())
    elif path.suffix == ".jsonl":
        yield from _column(_jsonl_rows(path, encoding), column, str(path))
    else:
        yield from _parquet_texts(path, column)


def _decoded(path: Path, encoding: str) -> str:
    """The text of a file without a leading byte-order mark, refusing bytes that are not valid
    in `encoding` (rather than training on replacement characters) and NUL characters (binary
    data, or text in another encoding such as UTF-16)."""
    text = _decoded_bytes(path, encoding)
    if "\0" in text:
        raise GsaeError(f"{path} holds a NUL character (at character {text.index(chr(0))}): it "
                        "is binary, or text in another encoding; name it with --encoding, e.g. "
                        "--encoding utf-16")
    return text.removeprefix("\ufeff")


def _decoded_bytes(path: Path, encoding: str) -> str:
    try:
        return path.read_bytes().decode(encoding)
    except LookupError:
        raise GsaeError(f"unknown text encoding {encoding!r}: use a Python codec name such as "
                        "utf-8 or latin-1") from None
    except UnicodeDecodeError as err:
        raise GsaeError(f"{path} is not valid {encoding} text (byte {err.start}: {err.reason}); "
                        "name its encoding with --encoding, e.g. --encoding latin-1") from None


def _jsonl_rows(path: Path, encoding: str = "utf-8") -> Iterator[dict[str, Any]]:
    for number, line in enumerate(_decoded(path, encoding).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise GsaeError(
                f"{path}:{number} is not valid JSON ({error.msg}); "
                "a .jsonl file holds one JSON object per line"
            ) from error
        if not isinstance(row, dict):
            raise GsaeError(f"{path}:{number} is not a JSON object: a .jsonl row must be one")
        yield row


def _parquet_texts(path: Path, column: str) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except pyarrow.ArrowException as err:
        raise GsaeError(f"{path} is not a readable parquet file ({str(err).splitlines()[0]}); "
                        f"a dataset is {ACCEPTED_DATASETS}") from None
    names = table.schema_arrow.names
    if column not in names:
        raise _missing_column(column, str(path), names)
    for batch in table.iter_batches(columns=[column]):
        yield from _column(({column: v} for v in batch.column(0).to_pylist()), column, str(path))


def _column(rows: Iterable[dict[str, Any]], column: str, where: str) -> Iterator[str]:
    for row in rows:
        if column not in row:
            raise _missing_column(column, where, list(row))
        text = row[column]
        if text is not None and not isinstance(text, str):
            raise GsaeError(f"column {column!r} of {where} holds {type(text).__name__}, not text")
        if text and text.strip():
            yield text


def _missing_column(column: str, where: str, columns: Iterable[str]) -> GsaeError:
    return GsaeError(
        f"{where} has no column {column!r}: its columns are {', '.join(map(repr, columns))}; "
        "set text_column to one of them"
    )


def _hub_documents(cfg: DataConfig) -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(cfg.dataset, split=cfg.hf_split, streaming=True)
    except Exception as error:  # not found, no network, bad split: all mean "cannot load"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise GsaeError(
            f"dataset {cfg.dataset!r} is not a local path and could not be loaded from the "
            f"Hugging Face hub ({reason}); a dataset is {ACCEPTED_DATASETS}"
        ) from error
    if stream.features is not None and cfg.text_column not in stream.features:
        raise _missing_column(cfg.text_column, cfg.dataset, stream.features)
    return _column(stream, cfg.text_column, cfg.dataset)


def _news_articles() -> list[str]:
    lines = embedded_path("news").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


# Wikipedia --------------------------------------------------------------------------------------

_DROP_SECTIONS = re.compile(
    r"^==+\s*(see also|references|notes|external links|further reading|bibliography|sources"
    r"|citations|footnotes)\s*==+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_DISAMBIGUATION = re.compile(r"\{\{\s*(disambig\w*|dab|hndis|geodis|set index)", re.IGNORECASE)
_REFS = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_LINK_NAMESPACE = re.compile(r"^\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
_LEFTOVERS = [
    (re.compile(r"\{\{[^{}]*\}\}"), ""),  # templates the parser could not read
    (re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]"), r"\1"),  # links: keep the shown text
    (re.compile(r"</?[a-zA-Z][^<>]*>"), ""),  # HTML tags
    (re.compile(r"^\s*(\{\||\|\}|\||!|\{\{|\}\}|\[\[).*$", re.MULTILINE), ""),  # table rows
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r" *\n *"), "\n"),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _drop_tables(text: str) -> str:
    """Remove `{| ... |}` wiki tables, nested ones included, line by line."""
    kept, depth = [], 0
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif depth and stripped.startswith("|}"):
            depth -= 1
        elif not depth:
            kept.append(line)
    return "\n".join(kept)


def clean_wikitext(wikitext: str) -> str:
    """Plain prose from MediaWiki markup: no templates, references, tables, files or categories.

    Sections from "See also" / "References" / "External links" onwards are dropped.
    """
    import mwparserfromhell

    end = _DROP_SECTIONS.search(wikitext)
    text = _drop_tables(_REFS.sub("", wikitext[: end.start()] if end else wikitext))
    code = mwparserfromhell.parse(text)
    for link in code.filter_wikilinks():
        if _LINK_NAMESPACE.match(str(link.title)):
            try:
                code.remove(link)
            except ValueError:  # inside a link removed already
                pass
    text = code.strip_code(normalize=True, collapse=True)
    for pattern, replacement in _LEFTOVERS:
        text = pattern.sub(replacement, text)
    return text.strip()


def _wiki_pages(path: Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of the real articles: main namespace, not redirects nor disambiguations."""
    with bz2.open(path) as f:
        for _, element in ET.iterparse(f):
            if not element.tag.endswith("}page"):
                continue
            title = element.findtext("{*}title") or ""
            text = element.findtext("{*}revision/{*}text") or ""
            if (
                element.findtext("{*}ns") == "0"
                and element.find("{*}redirect") is None
                and not text.lstrip().upper().startswith("#REDIRECT")
                and "(disambiguation)" not in title
                and not _DISAMBIGUATION.search(text)
            ):
                yield title, text
            element.clear()


def wiki_articles() -> list[dict[str, str]]:
    """The embedded Wikipedia articles as {"title", "text"}, cleaned once and cached as JSONL."""
    source = embedded_path("wiki")
    name = f"wiki-v{WIKI_CLEANING_VERSION}-{file_fingerprint(source)[:16]}.jsonl"
    final = cache_root() / "corpora" / name
    if not final.is_file():
        articles = [
            {"title": title, "text": text}
            for title, wikitext in _wiki_pages(source)
            if len(text := clean_wikitext(wikitext)) >= MIN_ARTICLE_CHARS
        ]
        with atomic_output(final) as tmp:
            tmp.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in articles))
    with open(final, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# Split, tokenise, pack ----------------------------------------------------------------------------


def _unit_hash(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def eval_count(n_docs: int, eval_fraction: float) -> int:
    """How many of `n_docs` documents are held out: the rounded fraction, keeping both parts
    non-empty when there are at least two documents and the fraction is positive."""
    count = round(n_docs * eval_fraction)
    if eval_fraction > 0 and n_docs >= 2:
        count = min(max(count, 1), n_docs - 1)
    return count


def split_documents(
    docs: Sequence[str] | Iterable[str], cfg: DataConfig, part: Literal["train", "eval"]
) -> Sequence[str] | Iterator[str]:
    """The documents of one part, in their original order, deterministic given `cfg.split_seed`.

    For a sequence, exactly `eval_count(len(docs), eval_fraction)` documents go to eval: those
    whose index has the smallest seeded hash. For a stream (a hub dataset, length unknown), a
    document goes to eval when the seeded hash of its text falls below `eval_fraction`.
    """
    validate(cfg)
    if part not in ("train", "eval"):
        raise GsaeError(f"unknown part {part!r}: use 'train' or 'eval'")
    want_eval = part == "eval"
    if isinstance(docs, Sequence):
        ranked = sorted(range(len(docs)), key=lambda i: _unit_hash(cfg.split_seed, str(i)))
        held = set(ranked[: eval_count(len(docs), cfg.eval_fraction)])
        return [doc for i, doc in enumerate(docs) if (i in held) == want_eval]
    return (d for d in docs if (_unit_hash(cfg.split_seed, d) < cfg.eval_fraction) == want_eval)


def token_contexts(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, part: Literal["train", "eval"] = "train"
) -> Iterator[torch.Tensor]:
    """1-D LongTensors of exactly `cfg.context_size` token ids, packed from one part's documents.

    The token stream is each document's ids (with whatever special tokens the tokenizer adds by
    default) followed by EOS, concatenated in document order; the final partial context is
    dropped. Raises GsaeError at the end of iteration if the part yields no context at all.
    """
    if tokenizer.eos_token_id is None:
        raise GsaeError("the tokenizer has no EOS token, which separates documents: set one")
    docs = split_documents(load_documents(cfg), cfg, part)
    return _pack(docs, tokenizer, cfg, part)


def _pack(
    docs: Iterable[str], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, part: str
) -> Iterator[torch.Tensor]:
    size, buffer, total, start = cfg.context_size, [], 0, 0
    for doc in docs:
        ids = tokenizer(doc, verbose=False)["input_ids"]
        buffer.extend(ids)
        buffer.append(tokenizer.eos_token_id)
        total += len(ids) + 1
        start = 0
        while len(buffer) - start >= size:
            yield torch.tensor(buffer[start : start + size], dtype=torch.long)
            start += size
        del buffer[:start]
    if total < size:
        raise GsaeError(
            f"the corpus {cfg.dataset!r} has {total} tokens in its {part} split, "
            f"fewer than one context of {size} tokens"
        )


def batched_contexts(
    contexts: Iterable[torch.Tensor], batch_size: int, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """Stack consecutive contexts into [batch_size, T] batches (the last one may be smaller)."""
    if batch_size < 1:
        raise GsaeError(f"batch_size is {batch_size}: it must be at least 1")
    batch: list[torch.Tensor] = []
    for context in contexts:
        batch.append(context)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch and not drop_last:
        yield torch.stack(batch)


def corpus_fingerprint(cfg: DataConfig, whole: bool = True) -> str | None:
    """The content hash of a local or embedded corpus (None for a hub dataset): of every byte,
    or with `whole` false as gsae recorded it before, of the first and last MiB of each file
    (the same for files of at most 2 MiB, such as the embedded corpora)."""
    kind, where = resolve_dataset(cfg)
    if kind == "embedded":
        return file_fingerprint(embedded_path(where), whole)
    if kind == "register":
        return register_fingerprint(where)
    if kind == "file":
        return file_fingerprint(where, whole)
    if kind == "folder":
        return files_fingerprint(where, _data_files(Path(where)), whole)
    return None


def corpus_identity(cfg: DataConfig) -> dict[str, Any]:
    """A JSON-able record of the corpus and its cutting, with a fingerprint of local files."""
    kind, _ = resolve_dataset(cfg)
    fingerprint = corpus_fingerprint(cfg)
    return {
        "dataset": cfg.dataset,
        "kind": kind,
        "text_column": cfg.text_column,
        "hf_split": cfg.hf_split if kind == "hub" else None,
        "context_size": cfg.context_size,
        "eval_fraction": cfg.eval_fraction,
        "split_seed": cfg.split_seed,
        "fingerprint": fingerprint,
        "wiki_cleaning_version": WIKI_CLEANING_VERSION if cfg.dataset == "wiki" else None,
        **({"encoding": cfg.encoding} if cfg.encoding != "utf-8" and kind in ("file", "folder")
           else {}),
    }
