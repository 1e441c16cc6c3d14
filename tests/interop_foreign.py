"""Runs inside the separate environment that has the real SAELens and sparsify (test_interop.py).

Usage: `python interop_foreign.py WORKDIR`. WORKDIR holds `x.safetensors` (tensor `x`) and gsae's
exports `export/saelens` and `export/sparsify/<hook>`. This script
- loads the exports with SAELens's and sparsify's own loaders and encodes/decodes `x`;
- loads the SAELens export and saves it again with SAELens (`resaved/saelens`);
- builds SAEs with the libraries' own classes, random weights, and saves them with their own save
  functions under `native/` (TopK ones that gsae must load, and other kinds it must refuse);
and writes every result to `out.safetensors` (dense codes `*.code`, reconstructions `*.x_hat`),
the library versions to `versions.json`, and to `names.json` the model and hook names that
SAELens reads from the export with what TransformerLens calls them (`transformer_lens_names`).
"""

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from sae_lens import (
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig
from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES
from transformer_lens.utilities import get_act_name

D_IN, D_SAE, K = 12, 48, 5
HOOK = "model.layers.1"


def randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def saelens_outputs(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        code = sae.encode(x)
        return {"code": code, "x_hat": sae.decode(code), "forward": sae(x)}


def sparsify_outputs(coder: SparseCoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        acts, indices, _ = coder.encode(x)
        code = torch.zeros(x.shape[0], coder.num_latents).scatter(1, indices, acts)
        return {"code": code, "x_hat": coder.decode(acts, indices)}


def saelens_natives(root: Path) -> dict[str, SAE]:
    """TopK SAEs saved by SAELens, in the configurations gsae must reproduce."""
    meta = {"model_name": "tiny-llama", "hook_name": HOOK}
    plain = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=SAEMetadata(**meta)))
    folded = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=False,
                                   rescale_acts_by_decoder_norm=True,
                                   metadata=SAEMetadata(**meta)))
    training = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    for seed, sae in enumerate((plain, folded, training)):
        randomize(sae, seed)
    plain.save_model(root / "saelens_topk")
    folded.save_model(root / "saelens_topk_rescaled")
    training.save_inference_model(root / "saelens_topk_training")
    return {"saelens_topk": plain, "saelens_topk_rescaled": folded,
            "saelens_topk_training": SAE.load_from_disk(root / "saelens_topk_training")}


def transformer_lens_names(exported: SAE) -> dict:
    """The names SAELens read from gsae's export, TransformerLens's name of the residual stream
    after block 1, and whether TransformerLens's HookedTransformer knows some models."""
    models = ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "EleutherAI/pythia-70m")
    return {"saelens": {"model_name": exported.cfg.metadata.model_name,
                        "hook_name": exported.cfg.metadata.hook_name},
            "resid_post_1": get_act_name("resid_post", 1),
            "official": {name: name in OFFICIAL_MODEL_NAMES for name in models}}


def main(workdir: Path) -> None:
    x = load_file(str(workdir / "x.safetensors"))["x"]
    out: dict[str, torch.Tensor] = {}

    exported = SAE.load_from_disk(workdir / "export" / "saelens")
    out |= {f"export_saelens.{k}": v for k, v in saelens_outputs(exported, x).items()}
    exported.save_model(workdir / "resaved" / "saelens")
    (workdir / "names.json").write_text(json.dumps(transformer_lens_names(exported)))
    coder = SparseCoder.load_from_disk(workdir / "export" / "sparsify" / HOOK)
    out |= {f"export_sparsify.{k}": v for k, v in sparsify_outputs(coder, x).items()}
    coders = SparseCoder.load_many(str(workdir / "export" / "sparsify"), local=True)
    assert list(coders) == [HOOK], list(coders)

    native = workdir / "native"
    for name, sae in saelens_natives(native).items():
        out |= {f"{name}.{k}": v for k, v in saelens_outputs(sae, x).items()}
    coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K))
    randomize(coder, 10)
    coder.save_to_disk(native / "sparsify" / HOOK)
    out |= {f"sparsify_topk.{k}": v for k, v in sparsify_outputs(coder, x).items()}

    # Kinds gsae must refuse with a clear message.
    JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)).save_model(native / "saelens_jumprelu")
    StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)).save_model(native / "saelens_standard")
    transcoder = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, transcode=True))
    transcoder.save_to_disk(native / "sparsify_transcoder")

    save_file({k: v.contiguous() for k, v in out.items()}, str(workdir / "out.safetensors"))
    versions = {name: version(name) for name in ("sae-lens", "eai-sparsify", "torch")}
    versions["transformer-lens"] = version("transformer-lens")
    (workdir / "versions.json").write_text(json.dumps(versions))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
