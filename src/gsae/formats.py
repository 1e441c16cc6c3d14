"""SAE folder formats (gsae, SAELens, sparsify) and the Hugging Face Hub.

`FORMATS` maps each format's name to how it is recognised, loaded and exported;
`load(path_or_hub_id)` (also `gsae.load`) reads any of them, `export` writes any of them.

Export writes a folder that SAELens (`SAE.load_from_disk`) or sparsify
(`SparseCoder.load_from_disk`) opens with its own loader. Those tools encode without a gradient,
so they run a g-SAE as plain TopK (beta = 0) on the same weights; the full gsae config (beta,
value mode, gradient definition, model, hook) rides along in the folder's `cfg.json` (SAELens:
`metadata.gsae`; sparsify: a top-level `gsae` object, which its loader drops with a one-line
notice), so gsae loading its own export restores the g-SAE exactly. SAELens's own `model_name`
and `hook_name` are TransformerLens's names where it has them (`saelens_names`).

Import reads SAELens and sparsify TopK folders into a gsae `SAE` (beta = 0) whose gradient-free
encoding equals theirs. Both tools keep the top k pre-activations and zero the negative ones
(SAELens: TopK then ReLU; sparsify: ReLU then TopK), as gsae does; they differ only in which
zero-valued latents fill the k slots when fewer than k pre-activations are positive, which
changes no value and no reconstruction. SAELens options that only reparametrise the weights
(`rescale_acts_by_decoder_norm`, `apply_b_dec_to_input = false`) are folded into them; options
that change the computation (input normalisation, other architectures, transcoders) are refused.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from gsae.errors import GsaeError
from gsae.io import atomic_output, holds_folder, read_json, save_tensors, write_json
from gsae.names import DEFAULT_HUB_ID, DEFAULT_MODEL, transformer_lens_hook
from gsae.sae import (
    CONFIG_FILE,
    FORMAT_NAME,
    SAE,
    WEIGHTS_FILE,
    Provenance,
    SAEConfig,
    check_weight_shapes,
    config_from_record,
    read_weights,
)

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
# The config layout written here is SAELens 6's; declaring it keeps SAELens's loader off its
# pre-6.0 upgrade path.
SAELENS_CONFIG_VERSION = "6.0.0"
SPARSIFY_TENSORS = {"encoder.weight": "W_enc", "encoder.bias": "b_enc", "W_dec": "W_dec",
                    "b_dec": "b_dec"}
# gsae's names of models that have another name on the Hugging Face Hub, the name that
# TransformerLens (and so SAELens's model_name) uses; every other name is kept as it is.
HUB_IDS = {DEFAULT_MODEL: DEFAULT_HUB_ID}
HUB_PREFIX = "hf://"
HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/]+))?(?:/(?P<subfolder>.+))?$")
HUB_FORMS = "'hf://owner/repo[@revision][/subfolder]' or 'owner/repo[/subfolder]'"
ACCEPTED_FOLDERS = (
    f"give a folder with {CONFIG_FILE} and {WEIGHTS_FILE} (gsae or sparsify) or "
    f"{SAELENS_WEIGHTS_FILE} (SAELens), or a Hugging Face repo id {HUB_FORMS}"
)
NOT_AN_SAE = f"is not a gsae SAE folder, nor a SAELens or sparsify TopK one: {ACCEPTED_FOLDERS}"


@dataclass(frozen=True)
class ExportPlan:
    """What an exporter writes: one folder holding a weights file and cfg.json."""

    folder: Path
    weights_file: str
    tensors: dict[str, Tensor]
    config: dict[str, Any]


@dataclass(frozen=True)
class Format:
    """One SAE folder format: how to recognise, read and write it.

    `detect(folder, config)` says whether a folder with this cfg.json is in the format,
    `load(folder, config, device)` reads it, `plan(sae, out_dir, hookpoint)` says what its
    export writes.
    """

    name: str
    detect: Callable[[Path, dict[str, Any]], bool]
    load: Callable[[Path, dict[str, Any], str | torch.device], SAE]
    plan: Callable[[SAE, Path, str | None], ExportPlan]


# ---------------------------------------------------------------------------------- export


def plan_gsae(sae: SAE, out_dir: Path, hookpoint: str | None = None) -> ExportPlan:
    """gsae's own folder, as `SAE.save` writes it."""
    return ExportPlan(out_dir, WEIGHTS_FILE, dict(sae.named_parameters()), sae.config_dict())


def plan_saelens(sae: SAE, out_dir: Path, hookpoint: str | None = None) -> ExportPlan:
    """A SAELens TopK folder (`cfg.json`, `sae_weights.safetensors`). SAELens stores `W_enc` as
    [d_in, d_sae]; everything else keeps gsae's layout."""
    tensors = {
        "W_enc": sae.W_enc.detach().t(),
        "b_enc": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    return ExportPlan(out_dir, SAELENS_WEIGHTS_FILE, tensors, saelens_config(sae))


def saelens_config(sae: SAE) -> dict[str, Any]:
    """The SAELens 6 `cfg.json` of a TopK SAE with these weights, gsae's config in its
    metadata."""
    metadata = {
        "sae_lens_version": SAELENS_CONFIG_VERSION,
        **saelens_names(sae.provenance),
        "context_size": sae.provenance.context_size,
        "gsae": sae.config_dict(),
    }
    return {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "k": sae.k,
        "rescale_acts_by_decoder_norm": False,
        "metadata": metadata,
    }


def saelens_names(provenance: Provenance) -> dict[str, str | None]:
    """SAELens's `model_name` and `hook_name` of an SAE, in TransformerLens's terms where it
    has them: the model's Hugging Face id (the embedded default's is SmolLM2-135M-Instruct's)
    and `blocks.N.hook_resid_post` for a decoder block's output; otherwise gsae's own names
    (a tiny test model, a local folder or file; any other module path). gsae's names stay in
    the export's `metadata.gsae`, which is what gsae reads back."""
    model = (provenance.model or {}).get("model")
    hook = provenance.hook
    return {"model_name": HUB_IDS.get(model, model),
            "hook_name": (transformer_lens_hook(hook) or hook) if hook else hook}


def plan_sparsify(sae: SAE, out_dir: Path, hookpoint: str | None = None) -> ExportPlan:
    """sparsify's layout, `out_dir/<hookpoint>/{cfg.json, sae.safetensors}`; `hookpoint`
    defaults to the hook the SAE records."""
    hookpoint = hookpoint or sae.provenance.hook
    if not hookpoint:
        raise GsaeError("the SAE records no hook point: give one (sparsify names the SAE's "
                        "folder after it, e.g. 'model.layers.15')")
    check_relative_name(hookpoint, "--hookpoint")
    tensors = {name: getattr(sae, attr).detach() for name, attr in SPARSIFY_TENSORS.items()}
    cfg = {
        "activation": "topk",
        "expansion_factor": sae.cfg.expansion_factor,
        "normalize_decoder": True,
        "num_latents": sae.n_latents,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.d_in,
        "gsae": sae.config_dict(),
    }
    return ExportPlan(out_dir / hookpoint, WEIGHTS_FILE, tensors, cfg)


def export(sae: SAE, out_dir: str | Path, format: str, hookpoint: str | None = None,
           overwrite: bool = False, source: str | Path | None = None) -> Path:
    """Write `sae` in `format` (a key of FORMATS) under `out_dir`; return the SAE's folder.

    `hookpoint` is used by the sparsify layout only (its SAE folder is `out_dir/<hookpoint>`).
    An SAE folder that exists and is not empty is refused, since it may hold another SAE, its
    log or checkpoint; `overwrite` replaces it, with everything in it, as one rename. The
    folder `sae` was loaded from (`source`), or one holding it, is never replaced.
    """
    if format not in FORMATS:
        raise GsaeError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    plan = FORMATS[format].plan(sae, Path(out_dir), hookpoint)
    if source is not None and holds_folder(plan.folder, Path(source)):
        raise GsaeError(f"{plan.folder} holds the SAE being exported ({source}), which the "
                        "export would replace: export into another folder")
    if plan.folder.is_dir() and any(plan.folder.iterdir()) and not overwrite:
        raise GsaeError(f"{plan.folder} is not empty: export into a new or empty folder, or "
                        "pass --overwrite to replace it and everything in it")
    if plan.folder.exists() and not plan.folder.is_dir():
        raise GsaeError(f"{plan.folder} is a file: export into a folder")
    with atomic_output(plan.folder, replace=True) as tmp:
        save_tensors(tmp / plan.weights_file, plan.tensors)
        write_json(tmp / CONFIG_FILE, plan.config)
    return plan.folder


def export_saelens(sae: SAE, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `sae` as a SAELens TopK folder in `out_dir` (see `plan_saelens`)."""
    return export(sae, out_dir, "saelens", overwrite=overwrite)


def export_sparsify(sae: SAE, out_dir: str | Path, hookpoint: str | None = None,
                    overwrite: bool = False) -> Path:
    """Write `sae` in sparsify's layout under `out_dir`; return `out_dir/<hookpoint>`."""
    return export(sae, out_dir, "sparsify", hookpoint, overwrite)


# ---------------------------------------------------------------------------------- import


def load(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE from a folder in any format of FORMATS (gsae, SAELens or sparsify TopK) or
    from a Hugging Face repo id (HUB_FORMS) holding one; a local folder wins over a repo id."""
    folder = Path(path)
    if folder.is_dir():
        return load_folder(folder, device)
    hub = parse_hub_id(str(path))
    if hub is None:
        raise GsaeError(f"{path} is neither a folder nor a Hugging Face repo id: "
                        f"{ACCEPTED_FOLDERS}")
    try:
        return load_hub(*hub, device=device)
    except GsaeError as err:
        raise GsaeError(f"{path} is no local folder, and {err}") from err


def load_folder(folder: Path, device: str | torch.device = "cpu") -> SAE:
    """Load the SAE folder `folder` with the first format of FORMATS that recognises it."""
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        inner = sorted(p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file())
        if inner:
            raise GsaeError(f"{folder} holds several SAEs (sparsify layout): load one of its "
                            f"subfolders: {', '.join(inner)}")
        raise GsaeError(f"{folder} {NOT_AN_SAE}")
    raw = read_json(cfg_file, "an SAE's config")
    if not isinstance(raw, dict):
        raise GsaeError(f"{cfg_file} holds no JSON object: {folder} {NOT_AN_SAE}")
    for fmt in FORMATS.values():
        if fmt.detect(folder, raw):
            return fmt.load(folder, raw, device)
    raise GsaeError(f"{folder} {NOT_AN_SAE}")


def _is_gsae(folder: Path, raw: dict[str, Any]) -> bool:
    return raw.get("format") == FORMAT_NAME


def _is_saelens(folder: Path, raw: dict[str, Any]) -> bool:
    return (folder / SAELENS_WEIGHTS_FILE).is_file()


def _is_sparsify(folder: Path, raw: dict[str, Any]) -> bool:
    if not (folder / WEIGHTS_FILE).is_file():
        return False
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            return "encoder.weight" in f.keys()
    except Exception:  # a damaged file is reported by the loader that claims it, or as no SAE
        return False


def _load_gsae(folder: Path, raw: dict[str, Any], device: str | torch.device) -> SAE:
    return SAE.load(folder, device=device)


def _load_saelens(folder: Path, raw: dict[str, Any], device: str | torch.device) -> SAE:
    where = f"{folder} (SAELens)"
    architecture = raw.get("architecture")
    if architecture is None:
        raise GsaeError(f"{where}: the config has no 'architecture' (written before SAELens 6); "
                        "load it with SAELens 6 and save it again")
    if architecture != "topk":
        raise GsaeError(f"{where}: architecture {architecture!r} is not supported: gsae loads "
                        "TopK SAEs ('topk') only")
    for option in ("normalize_activations", "reshape_activations"):
        if raw.get(option, "none") != "none":
            raise GsaeError(f"{where}: {option} = {raw[option]!r} is not supported: gsae "
                            "encodes the activations as they are ('none')")
    tensors = read_weights(folder / SAELENS_WEIGHTS_FILE)
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not bool((scaling == 1).all()):
        raise GsaeError(f"{where}: a fine-tuning scaling factor is not supported")
    _check_tensor_names(tensors, {"W_enc", "b_enc", "W_dec", "b_dec"}, where)
    dtype = _parse_dtype(raw.get("dtype", "float32"), where)
    # Fold in float64: the reparametrised weights give SAELens's activations and reconstruction.
    w_enc, b_enc, w_dec, b_dec = (tensors[n].double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    w_enc = w_enc.t()
    if not raw.get("apply_b_dec_to_input", True):
        # SAELens encodes x, gsae x - b_dec: (x - b_dec) W + (b_enc + W b_dec) = x W + b_enc.
        b_enc = b_enc + w_enc @ b_dec
    if raw.get("rescale_acts_by_decoder_norm", False):
        # SAELens selects and returns z * |d_i| and decodes with d_i / |d_i|: fold the norms.
        norms = w_dec.norm(dim=1).clamp_min(1e-8)
        w_enc, b_enc, w_dec = w_enc * norms[:, None], b_enc * norms, w_dec / norms[:, None]
    weights = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    meta = raw.get("metadata") or {}
    # Its model_name is usually a TransformerLens alias, not a model gsae loads: it stays in
    # imported_from only, and evaluation asks for the model.
    provenance = Provenance(hook=meta.get("hook_name"), context_size=meta.get("context_size"),
                            imported_from={"format": "saelens", "config": raw})
    return _build(weights, dtype, raw.get("d_sae"), raw.get("k"), meta.get("gsae"), provenance,
                  where, device)


def _load_sparsify(folder: Path, raw: dict[str, Any], device: str | torch.device) -> SAE:
    where = f"{folder} (sparsify)"
    if raw.get("activation", "topk") != "topk":
        raise GsaeError(f"{where}: activation {raw['activation']!r} is not supported: gsae loads "
                        "TopK SAEs ('topk') only")
    for option in ("transcode", "skip_connection"):
        if raw.get(option, False):
            raise GsaeError(f"{where}: {option} = true is not supported: gsae loads sparse "
                            "autoencoders without transcoding or skip connections")
    tensors = read_weights(folder / WEIGHTS_FILE)
    _check_tensor_names(tensors, set(SPARSIFY_TENSORS), where)
    dtype = tensors["encoder.weight"].dtype
    weights = {attr: tensors[name] for name, attr in SPARSIFY_TENSORS.items()}
    d_in = weights["b_dec"].shape[0]
    n_latents = raw.get("num_latents") or d_in * raw.get("expansion_factor", 32)
    provenance = Provenance(hook=folder.name,
                            imported_from={"format": "sparsify", "config": raw})
    return _build(weights, dtype, n_latents, raw.get("k", 32), raw.get("gsae"), provenance,
                  where, device)


def _check_tensor_names(tensors: dict[str, Tensor], expected: set[str], where: str) -> None:
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise GsaeError(f"{where}: expected the tensors {', '.join(sorted(expected))} of a TopK "
                        f"SAE; missing {missing or 'none'}, unexpected {extra or 'none'}")


def _parse_dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise GsaeError(f"{where}: unknown dtype {name!r}: use a floating-point torch dtype "
                        "such as 'float32'")
    return dtype


def _build(weights: dict[str, Tensor], dtype: torch.dtype, n_latents: Any, k: Any,
           record: dict[str, Any] | None, provenance: Provenance, where: str,
           device: str | torch.device) -> SAE:
    """A gsae SAE with the given weights: beta = 0, or the g-SAE config in `record` (gsae's own
    export), which must agree with the folder's config."""
    d_in = weights["b_dec"].shape[0]
    if not isinstance(n_latents, int) or not isinstance(k, int):
        raise GsaeError(f"{where}: the config must give the number of latents and k as integers, "
                        f"got {n_latents!r} and {k!r}")
    cfg = SAEConfig(n_latents=n_latents, k=k, beta=0.0, value_mode="z")
    if record is not None:
        cfg, recorded_d_in = config_from_record(record, where)
        found = (recorded_d_in, cfg.latents_for(d_in), cfg.k)
        if found != (d_in, n_latents, k):
            raise GsaeError(f"{where}: its gsae record (d_in, latents, k) = {found} disagrees "
                            f"with the folder's own config {(d_in, n_latents, k)}: the folder "
                            "was changed after export; delete the 'gsae' entry to load it as TopK")
        provenance = Provenance.from_json(record.get("provenance", record.get("metadata")), where)
    check_weight_shapes(weights, cfg.latents_for(d_in), d_in, where)
    sae = SAE(cfg, d_in, device=device, dtype=dtype, provenance=provenance, initialize=False)
    sae.load_weights({name: t.to(dtype) for name, t in weights.items()}, where)
    return sae


FORMATS: dict[str, Format] = {
    "gsae": Format("gsae", _is_gsae, _load_gsae, plan_gsae),
    "saelens": Format("saelens", _is_saelens, _load_saelens, plan_saelens),
    "sparsify": Format("sparsify", _is_sparsify, _load_sparsify, plan_sparsify),
}
EXPORT_FORMATS = tuple(FORMATS)


# ------------------------------------------------------------------------------------- hub


def parse_hub_id(name: str) -> tuple[str, str | None, str | None] | None:
    """Split `hf://owner/repo[@revision][/subfolder]` (the `hf://` is optional) into
    (repo_id, subfolder, revision); None if `name` has neither form."""
    match = HUB_ID.match(name.removeprefix(HUB_PREFIX))
    if match is None:
        return None
    return match["repo"], match["subfolder"], match["revision"]


def load_hub(repo_id: str, subfolder: str | None = None, revision: str | None = None,
             device: str | torch.device = "cpu") -> SAE:
    """Download the SAE in `subfolder` of the Hugging Face model repo `repo_id` (only its config
    and weights) and load it; any of the three formats."""
    from huggingface_hub import snapshot_download

    check_hub_names(repo_id, subfolder)
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [prefix + name for name in (CONFIG_FILE, WEIGHTS_FILE, SAELENS_WEIGHTS_FILE)]
    where = HUB_PREFIX + repo_id + (f"@{revision}" if revision else "") + f"/{prefix}".rstrip("/")
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except (OSError, ValueError) as err:
        raise GsaeError(f"could not download {where} from the Hugging Face Hub: "
                        f"{_first_line(err)}") from err
    folder = Path(snapshot) / prefix
    if not (folder / CONFIG_FILE).is_file():
        raise GsaeError(f"{where} holds no {CONFIG_FILE}: name the subfolder of the SAE "
                        f"({HUB_FORMS})")
    return load_folder(folder, device)


def check_hub_names(repo_id: str, subfolder: str | None) -> None:
    """Refuse '.' and '..' in a repo id or its subfolder: they name no repo, and a subfolder
    with '..' would lead out of the downloaded repo into other files on this machine."""
    parts = [*repo_id.split("/"), *(subfolder or "").strip("/").split("/")]
    if any(part in (".", "..") for part in parts):
        where = repo_id + (f"/{subfolder}" if subfolder else "")
        raise GsaeError(f"{where!r} is not a Hugging Face repo id: '.' and '..' name no repo or "
                        f"subfolder (a repo id is {HUB_FORMS}; a local folder must exist)")


def check_relative_name(name: str, flag: str) -> None:
    """Refuse a folder name that would lead outside the folder it is meant to be in."""
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or not parts:
        raise GsaeError(f"{flag} {name!r} must be a relative name inside the output (no '..', "
                        "not absolute)")


def push(sae_dir: str | Path, repo_id: str, *, format: str = FORMAT_NAME,
         subfolder: str | None = None, hookpoint: str | None = None, private: bool = False,
         token: str | None = None) -> str:
    """Upload the SAE loaded from `sae_dir` to the Hugging Face model repo `repo_id` (created if
    needed) in `format`, under `subfolder` (sparsify's layout adds the hook point's folder).
    Returns the commit's URL."""
    from huggingface_hub import HfApi

    if subfolder:
        check_relative_name(subfolder, "--subfolder")
    sae = load(sae_dir)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "upload"
        export(sae, staging, format, hookpoint)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=staging,
                                       path_in_repo=subfolder or None,
                                       commit_message=f"Upload {format} SAE with gsae")
        except (OSError, ValueError) as err:
            raise GsaeError(f"could not upload to {repo_id} on the Hugging Face Hub: "
                            f"{_first_line(err)}") from err
    return str(commit.commit_url)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
