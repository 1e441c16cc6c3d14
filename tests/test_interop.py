"""gsae's exports opened by the real SAELens and sparsify, and their saved SAEs opened by gsae.

SAELens and sparsify live in a separate virtual environment (their dependencies, e.g.
transformer-lens, need not fit gsae's), which the first run creates under the gsae cache
(`$GSAE_CACHE/interop/venv-<hash of the pins>`, or `$GSAE_INTEROP_VENV`) and later runs reuse.
`interop_foreign.py` runs inside it once per session; these tests compare its outputs with gsae's.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gsae
from gsae import SAE, GsaeError, Provenance, SAEConfig, formats
from gsae.io import atomic_output, cache_root

pytestmark = pytest.mark.interop

# torch first: the CPU wheel that pip finds on this machine; sae-lens or eai-sparsify asking for
# `torch` alone would otherwise pull a CUDA build of several GB.
PINS = (("torch==2.13.0",), ("sae-lens==6.54.12", "eai-sparsify==1.3.3"))
SCRIPT = Path(__file__).with_name("interop_foreign.py")
HOOK = "model.layers.1"
D_IN, D_SAE, K = 12, 48, 5
TOL = {"rtol": 1e-5, "atol": 1e-5}


def interop_python() -> Path:
    """The Python of the SAELens + sparsify environment, created on first use (a few minutes)."""
    key = hashlib.sha256(repr((PINS, sys.version)).encode()).hexdigest()[:12]
    venv = Path(os.environ.get("GSAE_INTEROP_VENV") or cache_root() / "interop" / f"venv-{key}")
    python = venv / "bin" / "python"
    if python.exists():
        return python
    with atomic_output(venv) as tmp:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
        for group in PINS:
            subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", *group],
                           check=True)
    return python


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], SAE, torch.Tensor]:
    """Export a g-SAE, run the foreign script once; (workdir, its outputs, the g-SAE, x)."""
    workdir = tmp_path_factory.mktemp("interop")
    sae = SAE(SAEConfig(n_latents=D_SAE, k=K, beta=50.0, value_mode="score", seed=3), D_IN,
              provenance=Provenance(hook=HOOK, model={"model": "tiny-llama"}))
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=torch.Generator().manual_seed(1)))
        sae.b_dec.copy_(0.2 * torch.randn(D_IN, generator=torch.Generator().manual_seed(2)))
    formats.export_saelens(sae, workdir / "export" / "saelens")
    formats.export_sparsify(sae, workdir / "export" / "sparsify")
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, str(workdir / "x.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(interop_python()), str(SCRIPT), str(workdir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, load_file(str(workdir / "out.safetensors")), sae, x


def dense(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gsae's gradient-free code as a dense [N, n_latents] tensor, and its reconstruction."""
    with torch.no_grad():
        values, indices, _ = sae.encode(x)
        code = torch.zeros(x.shape[0], sae.n_latents, dtype=values.dtype)
        return code.scatter(1, indices, values), sae.decode(values, indices)


def assert_matches(sae: SAE, x: torch.Tensor, out: dict[str, torch.Tensor], name: str) -> None:
    code, x_hat = dense(sae, x)
    torch.testing.assert_close(code, out[f"{name}.code"], **TOL)
    torch.testing.assert_close(x_hat, out[f"{name}.x_hat"], **TOL)
    if f"{name}.forward" in out:
        torch.testing.assert_close(x_hat, out[f"{name}.forward"], **TOL)


def test_pinned_versions_ran(run):
    versions = json.loads((run[0] / "versions.json").read_text())
    pinned = dict(pin.split("==") for group in PINS for pin in group)
    versions.pop("transformer-lens")  # not pinned: what sae-lens installs (3.9.0 here)
    assert {k: v.split("+")[0] for k, v in versions.items()} == pinned


def test_saelens_reads_the_names_that_transformer_lens_has(run):
    """SAELens reads gsae's hook as TransformerLens's name of the residual stream after the
    block; the default model is not among HookedTransformer's models (docs/formats.md)."""
    names = json.loads((run[0] / "names.json").read_text())
    assert names["saelens"] == {"model_name": "tiny-llama", "hook_name": "blocks.1.hook_resid_post"}
    assert names["resid_post_1"] == "blocks.1.hook_resid_post"
    assert names["official"] == {"HuggingFaceTB/SmolLM2-135M-Instruct": False, "gpt2": True,
                                 "EleutherAI/pythia-70m": True}


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_foreign_loaders_reproduce_our_gradient_free_encoding(run, fmt):
    _, out, sae, x = run
    assert_matches(sae, x, out, f"export_{fmt}")


def test_saelens_resave_keeps_the_gsae_config(run):
    workdir, _, sae, _ = run
    loaded = gsae.load(workdir / "resaved" / "saelens")
    assert loaded.cfg == sae.cfg and loaded.provenance == sae.provenance
    for name, p in sae.named_parameters():
        assert torch.equal(p, getattr(loaded, name)), name


@pytest.mark.parametrize(
    "name, folder",
    [
        ("saelens_topk", "saelens_topk"),
        ("saelens_topk_rescaled", "saelens_topk_rescaled"),
        ("saelens_topk_training", "saelens_topk_training"),
        ("sparsify_topk", f"sparsify/{HOOK}"),
    ],
)
def test_gsae_loads_what_the_libraries_save(run, name, folder):
    workdir, out, _, x = run
    sae = gsae.load(workdir / "native" / folder)
    assert (sae.beta, sae.cfg.value_mode, sae.k, sae.n_latents) == (0.0, "z", K, D_SAE)
    assert_matches(sae, x, out, name)


@pytest.mark.parametrize(
    "folder, message",
    [
        ("saelens_jumprelu", "architecture 'jumprelu' is not supported"),
        ("saelens_standard", "architecture 'standard' is not supported"),
        ("sparsify_transcoder", "transcode = true is not supported"),
    ],
)
def test_gsae_refuses_other_kinds_the_libraries_save(run, folder, message):
    with pytest.raises(GsaeError, match=message):
        gsae.load(run[0] / "native" / folder)
