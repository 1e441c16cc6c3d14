"""SAELens / sparsify export and import, and the Hub paths, without the foreign packages.

Foreign folders are written by hand per the layouts in SAELens 6 and sparsify 1.3 and compared
with naive references of those libraries' encodings; test_interop.py runs the libraries
themselves. The Hub is replaced by stand-ins that copy from and to a local folder.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import stat
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import conftest
import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file

import gsae
from gsae import SAE, GsaeError, Provenance, SAEConfig, formats
from gsae.cli import main

D_IN, D_SAE, K = 12, 48, 5
HOOK = "model.layers.1"


make_sae = partial(conftest.make_sae, d_in=D_IN, n_latents=D_SAE, k=K, beta=50.0,
                   value_mode="score", seed=3, weights_seed=1, hook=HOOK,
                   model={"model": "tiny-llama"})


def inputs(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, D_IN, generator=gen), torch.randn(n, D_IN, generator=gen)


def dense(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gsae's gradient-free code as a dense [N, n_latents] tensor, and its reconstruction."""
    with torch.no_grad():
        values, indices, _ = sae.encode(x)
        code = torch.zeros(x.shape[0], sae.n_latents).scatter(1, indices, values)
        return code, sae.decode(values, indices)


def assert_same_sae(a: SAE, b: SAE) -> None:
    assert a.cfg == b.cfg and a.provenance == b.provenance
    for name, p in a.named_parameters():
        assert torch.equal(p, getattr(b, name)), name


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    """gsae-layout weights with decoder rows far from unit norm."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "W_enc": 0.5 * torch.randn(D_SAE, D_IN, generator=gen),
        "b_enc": 0.3 * torch.randn(D_SAE, generator=gen),
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * torch.rand(D_SAE, 1, generator=gen),
        "b_dec": 0.2 * torch.randn(D_IN, generator=gen),
    }


def write_folder(folder: Path, weights_name: str, tensors: dict, cfg: dict) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / weights_name))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def saelens_cfg(**changes) -> dict:
    cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "k": K, "rescale_acts_by_decoder_norm": False,
           "metadata": {"sae_lens_version": "6.54.12", "model_name": "gpt2-small",
                        "hook_name": "blocks.1.hook_resid_post", "context_size": 128}}
    return {**cfg, **changes}


def saelens_folder(root: Path, w: dict, **changes) -> Path:
    tensors = {"W_enc": w["W_enc"].t().contiguous(), "b_enc": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}
    return write_folder(root / "saelens", "sae_weights.safetensors", tensors,
                        saelens_cfg(**changes))


def sparsify_cfg(**changes) -> dict:
    cfg = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
           "num_latents": D_SAE, "k": K, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": D_IN}
    return {**cfg, **changes}


def sparsify_folder(root: Path, w: dict, **changes) -> Path:
    tensors = {"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}
    return write_folder(root / "layers.1", "sae.safetensors", tensors, sparsify_cfg(**changes))


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("fmt", ["saelens", "sparsify", "gsae"])
def test_export_round_trip_loses_nothing(tmp_path, fmt):
    sae = make_sae()
    folder = formats.export(sae, tmp_path / "out", fmt)
    loaded = gsae.load(folder)
    assert_same_sae(sae, loaded)
    x, g = inputs()
    for got, want in zip(loaded.encode(x, g), sae.encode(x, g)):
        assert torch.equal(got, want)


def test_saelens_export_layout(tmp_path):
    sae = make_sae()
    folder = formats.export_saelens(sae, tmp_path / "out")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert {k: list(v.shape) for k, v in tensors.items()} == {
        "W_enc": [D_IN, D_SAE], "b_enc": [D_SAE], "W_dec": [D_SAE, D_IN], "b_dec": [D_IN]}
    cfg = json.loads((folder / "cfg.json").read_text())
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "k", "dtype")} == {
        "architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K, "dtype": "float32"}
    assert (cfg["apply_b_dec_to_input"], cfg["rescale_acts_by_decoder_norm"]) == (True, False)
    assert (cfg["normalize_activations"], cfg["reshape_activations"]) == ("none", "none")
    meta = cfg["metadata"]
    assert (meta["model_name"], meta["hook_name"]) == ("tiny-llama", "blocks.1.hook_resid_post")
    assert meta["gsae"]["beta"] == 50.0 and meta["gsae"]["value_mode"] == "score"
    assert "gradient_definition" in meta["gsae"]


@pytest.mark.parametrize("model, hook, names", [
    ("smollm2-135m", "model.layers.15",
     ("HuggingFaceTB/SmolLM2-135M-Instruct", "blocks.15.hook_resid_post")),
    ("gpt2", "transformer.h.5", ("gpt2", "blocks.5.hook_resid_post")),
    ("EleutherAI/pythia-70m", "gpt_neox.layers.3",
     ("EleutherAI/pythia-70m", "blocks.3.hook_resid_post")),
    ("HuggingFaceTB/SmolLM2-135M", "model.layers.0",
     ("HuggingFaceTB/SmolLM2-135M", "blocks.0.hook_resid_post")),
    ("tiny-gpt2", "transformer.h.1.mlp", ("tiny-gpt2", "transformer.h.1.mlp")),
    ("/models/mine.gguf", "model.layers.12.self_attn", ("/models/mine.gguf",
                                                         "model.layers.12.self_attn")),
    ("tiny-llama", "model.layers.1x", ("tiny-llama", "model.layers.1x")),
    (None, None, (None, None)),
])
def test_saelens_export_names_what_transformer_lens_knows(tmp_path, model, hook, names):
    """SAELens's model_name and hook_name are TransformerLens's names where it has them (the
    Hub id, the residual stream after block N), gsae's otherwise; gsae reads its own back."""
    sae = make_sae()
    sae.provenance = Provenance(hook=hook, model=None if model is None else {"model": model})
    folder = formats.export_saelens(sae, tmp_path / "out")
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["hook_name"]) == names
    assert meta["gsae"]["provenance"]["hook"] == hook
    assert_same_sae(sae, gsae.load(folder))


def test_sparsify_export_layout(tmp_path):
    sae = make_sae()
    assert formats.export_sparsify(sae, tmp_path / "a") == tmp_path / "a" / HOOK
    folder = formats.export_sparsify(sae, tmp_path / "b", hookpoint="layers.1")
    assert folder == tmp_path / "b" / "layers.1"
    tensors = load_file(str(folder / "sae.safetensors"))
    assert {k: list(v.shape) for k, v in tensors.items()} == {
        "encoder.weight": [D_SAE, D_IN], "encoder.bias": [D_SAE], "W_dec": [D_SAE, D_IN],
        "b_dec": [D_IN]}
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg == {**sparsify_cfg(expansion_factor=16), "gsae": sae.config_dict()}
    sae.provenance = Provenance()
    with pytest.raises(GsaeError, match="records no hook point"):
        formats.export_sparsify(sae, tmp_path / "c")


def test_edited_export_is_refused(tmp_path):
    folder = formats.export_saelens(make_sae(), tmp_path / "out")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "k": K + 1}))
    with pytest.raises(GsaeError, match="changed after export"):
        gsae.load(folder)


def test_formats_registry_names_every_format(tmp_path):
    assert list(formats.FORMATS) == ["gsae", "saelens", "sparsify"]
    sae = make_sae()
    for name in formats.FORMATS:  # each format's loader recognises its own export only
        folder = formats.export(sae, tmp_path / name, name)
        raw = json.loads((folder / "cfg.json").read_text())
        found = [n for n, f in formats.FORMATS.items() if f.detect(folder, raw)]
        assert found == [name]


@pytest.mark.parametrize("fmt", ["gsae", "saelens", "sparsify"])
def test_export_refuses_a_folder_it_did_not_write(tmp_path, fmt):
    """An SAE's training folder (weights, log, checkpoint) is never mixed with an export."""
    other = SAE(SAEConfig(n_latents=D_SAE, k=K, seed=9), D_IN,
                provenance=Provenance(hook=HOOK))
    target = tmp_path / "out" / (HOOK if fmt == "sparsify" else "")
    other.save(target)
    (target / "log.jsonl").write_text("{}\n")
    (target / "checkpoint").mkdir()
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(GsaeError, match=f"{target} is not empty: .*pass --overwrite") as err:
        formats.export(make_sae(), tmp_path / "out", fmt)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in target.iterdir()) == before
    assert_same_sae(SAE.load(target), other)
    # With overwrite the folder holds the export alone: nothing of the old SAE is left.
    folder = formats.export(make_sae(), tmp_path / "out", fmt, overwrite=True)
    assert folder == target
    weights = "sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors"
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", weights]
    assert_same_sae(gsae.load(folder), make_sae())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_export_into_an_empty_folder_and_beside_other_hooks(tmp_path):
    (tmp_path / "empty").mkdir()
    assert formats.export(make_sae(), tmp_path / "empty", "saelens") == tmp_path / "empty"
    formats.export_sparsify(make_sae(), tmp_path / "sp", hookpoint="layers.0")
    formats.export_sparsify(make_sae(), tmp_path / "sp", hookpoint="layers.1")
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["layers.0", "layers.1"]


def test_exported_files_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        folder = formats.export(make_sae(), tmp_path / "out", "saelens")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o775
    for file in folder.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o664, file.name


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_foreign_weights_with_nan_are_refused(tmp_path, fmt):
    w = random_weights(seed=10)
    w["W_dec"][5, 2] = float("nan")
    folder = saelens_folder(tmp_path, w) if fmt == "saelens" else sparsify_folder(tmp_path, w)
    with pytest.raises(GsaeError, match=f"{folder} .*: the weights W_dec hold NaN or infinite"):
        gsae.load(folder)


# ------------------------------------------------------------------ foreign folders by hand


def saelens_reference(w: dict, x: torch.Tensor, apply_b_dec: bool, rescale: bool):
    """SAELens 6's TopKSAE.encode / decode, written out densely."""
    hidden = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"].t() + w["b_enc"]
    norms = w["W_dec"].norm(dim=1)
    if rescale:
        hidden = hidden * norms
    top = hidden.topk(K, dim=1)
    code = torch.zeros_like(hidden).scatter(1, top.indices, top.values.relu())
    return code, (code / norms if rescale else code) @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_topk_folder_encodes_as_saelens(tmp_path, apply_b_dec, rescale):
    w = random_weights(seed=4)
    folder = saelens_folder(tmp_path, w, apply_b_dec_to_input=apply_b_dec,
                            rescale_acts_by_decoder_norm=rescale)
    sae = gsae.load(folder)
    assert (sae.beta, sae.cfg.value_mode, sae.k, sae.n_latents) == (0.0, "z", K, D_SAE)
    assert sae.provenance.hook == "blocks.1.hook_resid_post" and sae.provenance.model is None
    assert sae.provenance.imported_from["format"] == "saelens"
    if not rescale:  # the decoder is kept as it is, not renormalised
        assert torch.equal(sae.W_dec, w["W_dec"])
    x, _ = inputs()
    for got, want in zip(dense(sae, x), saelens_reference(w, x, apply_b_dec, rescale)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sparsify_topk_folder_encodes_as_sparsify(tmp_path):
    w = random_weights(seed=5)
    w["b_enc"][: D_SAE - 3] -= 20.0  # most rows have fewer than k positive pre-activations
    sae = gsae.load(sparsify_folder(tmp_path, w))
    assert (sae.beta, sae.k, sae.n_latents, sae.provenance.hook) == (0.0, K, D_SAE, "layers.1")
    assert torch.equal(sae.W_dec, w["W_dec"])
    x, _ = inputs()
    # sparsify: ReLU first, then the top k; ties among zeros are filled arbitrarily.
    acts = torch.relu((x - w["b_dec"]) @ w["W_enc"].t() + w["b_enc"])
    top = acts.topk(K, dim=1)
    code = torch.zeros_like(acts).scatter(1, top.indices, top.values)
    assert (code > 0).sum(1).min() < K
    got_code, got_x_hat = dense(sae, x)
    torch.testing.assert_close(got_code, code, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x_hat, code @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "changes, extra, message",
    [
        ({"architecture": "jumprelu"}, {"threshold": torch.zeros(D_SAE)},
         "architecture 'jumprelu' is not supported: gsae loads TopK SAEs"),
        ({"architecture": "standard"}, {}, "architecture 'standard' is not supported"),
        ({"architecture": None}, {}, "has no 'architecture'"),
        ({"normalize_activations": "layer_norm"}, {},
         "normalize_activations = 'layer_norm' is not supported"),
        ({"reshape_activations": "hook_z"}, {}, "reshape_activations = 'hook_z' is not supported"),
        ({}, {"scaling_factor": torch.full((D_SAE,), 2.0)}, "scaling factor is not supported"),
        ({"d_sae": D_SAE + 1}, {}, r"the weights do not fit the config \(d_in 12, 49 latents\)"),
        ({"dtype": "int8"}, {}, "unknown dtype"),
    ],
)
def test_unsupported_saelens_folders_are_refused(tmp_path, changes, extra, message):
    folder = saelens_folder(tmp_path, random_weights(seed=6), **changes)
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**tensors, **extra}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(GsaeError, match=message):
        gsae.load(folder)


def test_saelens_unit_scaling_factor_is_ignored(tmp_path):
    w = random_weights(seed=7)
    folder = saelens_folder(tmp_path, w)
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**tensors, "scaling_factor": torch.ones(D_SAE)},
              str(folder / "sae_weights.safetensors"))
    assert torch.equal(gsae.load(folder).W_enc, w["W_enc"])


@pytest.mark.parametrize(
    "changes, drop, message",
    [
        ({"activation": "groupmax"}, None, "activation 'groupmax' is not supported"),
        ({"transcode": True}, None, "transcode = true is not supported"),
        ({"skip_connection": True}, None, "skip_connection = true is not supported"),
        ({}, "W_dec", r"missing \['W_dec'\]"),
    ],
)
def test_unsupported_sparsify_folders_are_refused(tmp_path, changes, drop, message):
    folder = sparsify_folder(tmp_path, random_weights(seed=8), **changes)
    tensors = load_file(str(folder / "sae.safetensors"))
    tensors.pop(drop, None)
    save_file(tensors, str(folder / "sae.safetensors"))
    with pytest.raises(GsaeError, match=message):
        gsae.load(folder)


def test_folders_that_are_no_sae(tmp_path):
    with pytest.raises(GsaeError, match="not a gsae SAE folder, nor a SAELens or sparsify"):
        gsae.load(tmp_path)
    sparsify_folder(tmp_path, random_weights(seed=9))
    with pytest.raises(GsaeError, match="holds several SAEs .*: layers.1"):
        gsae.load(tmp_path)
    with pytest.raises(GsaeError, match="neither a folder nor a Hugging Face repo id"):
        gsae.load(tmp_path / "missing")
    # SAE.load reads gsae's own folders only, and says what reads the others.
    with pytest.raises(GsaeError, match="not a gsae SAE config .*other formats with gsae.load"):
        SAE.load(tmp_path / "layers.1")


# ------------------------------------------------------------------------------------- hub


@pytest.fixture
def hub(tmp_path, monkeypatch) -> SimpleNamespace:
    """Stand-ins for the Hub: `remote/<repo_id>/...` is the repo, downloads copy what the
    allow-patterns select into a fresh snapshot folder; every call is recorded."""
    state = SimpleNamespace(remote=tmp_path / "remote", calls=[])

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, **_):
        state.calls.append(("download", repo_id, revision, allow_patterns))
        if repo_id == "owner/offline":
            raise LocalEntryNotFoundError("no connection")
        snapshot = tmp_path / "snapshots" / f"{len(state.calls)}"
        for file in (state.remote / repo_id).rglob("*"):
            name = file.relative_to(state.remote / repo_id).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, snapshot / name)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **_):
        state.calls.append(("create", repo_id, private, exist_ok, self.token))

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, **_):
        state.calls.append(("upload", repo_id, path_in_repo))
        shutil.copytree(folder_path, state.remote / repo_id / (path_in_repo or ""),
                        dirs_exist_ok=True)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.chdir(tmp_path)  # so that repo ids are never existing local folders
    return state


FILES = ["cfg.json", "sae.safetensors", "sae_weights.safetensors"]


@pytest.mark.parametrize(
    "name, revision, subfolder",
    [
        ("hf://owner/repo@v1/saes/one", "v1", "saes/one"),
        ("owner/repo/saes/one", None, "saes/one"),
        ("hf://owner/repo", None, None),
    ],
)
def test_load_by_repo_id(hub, name, revision, subfolder):
    sae = make_sae()
    formats.export_saelens(sae, hub.remote / "owner" / "repo" / (subfolder or ""))
    assert_same_sae(gsae.load(name), sae)
    prefix = f"{subfolder}/" if subfolder else ""
    assert hub.calls == [("download", "owner/repo", revision, [prefix + f for f in FILES])]


def test_load_hub_sparsify_layout(hub):
    sae = make_sae()
    formats.export_sparsify(sae, hub.remote / "owner" / "repo")
    with pytest.raises(GsaeError, match="holds no cfg.json: name the subfolder"):
        formats.load_hub("owner/repo")
    assert_same_sae(formats.load_hub("owner/repo", subfolder=HOOK, revision="main"), sae)
    assert hub.calls[-1] == ("download", "owner/repo", "main", [f"{HOOK}/{f}" for f in FILES])


def test_hub_failure_is_one_clear_error(hub):
    message = "owner/offline/sub is no local folder, and could not download hf://owner/offline/sub"
    with pytest.raises(GsaeError, match=message + ".*no connection"):
        gsae.load("owner/offline/sub")


@pytest.mark.parametrize(
    "fmt, subfolder, folder",
    [("gsae", None, ""), ("saelens", "saes/one", "saes/one"), ("sparsify", None, HOOK)],
)
def test_push_then_load(hub, tmp_path, fmt, subfolder, folder):
    sae = make_sae()
    sae.save(tmp_path / "local")
    url = formats.push(tmp_path / "local", "me/saes", format=fmt, subfolder=subfolder,
                       private=True, token="secret")
    assert url == "https://hub.invalid/me/saes/commit/1"
    assert hub.calls == [("create", "me/saes", True, True, "secret"),
                         ("upload", "me/saes", subfolder)]
    assert_same_sae(formats.load_hub("me/saes", subfolder=folder or None), sae)


# ------------------------------------------------------------------------------------- CLI


def test_cli_export_and_push(hub, tmp_path, capsys):
    sae = make_sae()
    sae.save(tmp_path / "local")
    assert main(["export", str(tmp_path / "local"), "--format", "saelens",
                 str(tmp_path / "out")]) == 0
    assert_same_sae(gsae.load(tmp_path / "out"), sae)
    assert main(["export", str(tmp_path / "out"), str(tmp_path / "sp"), "--format", "sparsify",
                 "--hookpoint", "layers.1"]) == 0
    assert_same_sae(gsae.load(tmp_path / "sp" / "layers.1"), sae)
    assert main(["push", str(tmp_path / "out"), "me/saes", "--format", "sparsify"]) == 0
    assert "uploaded: https://hub.invalid/me/saes/commit/1" in capsys.readouterr().out
    assert_same_sae(gsae.load(f"hf://me/saes/{HOOK}"), sae)
    assert main(["export", str(tmp_path / "nothing-here"), str(tmp_path / "x"),
                 "--format", "saelens"]) == 2
    assert "gsae: error:" in capsys.readouterr().err
    # Exporting over another SAE's folder is refused, naming --overwrite, which replaces it.
    other = tmp_path / "other"
    SAE(SAEConfig(n_latents=D_SAE, k=K), D_IN).save(other)
    (other / "log.jsonl").write_text("{}\n")
    assert main(["export", str(tmp_path / "local"), str(other), "--format", "gsae"]) == 2
    err = capsys.readouterr().err
    assert f"{other} is not empty" in err and "--overwrite" in err and err.count("\n") == 1
    assert main(["export", str(tmp_path / "local"), str(other), "--format", "gsae",
                 "--overwrite"]) == 0
    assert not (other / "log.jsonl").exists()
    assert_same_sae(SAE.load(other), sae)


# ------------------------------------------------------ defaults, dtypes and bad input


def test_saelens_config_without_optional_keys_takes_saelens_defaults(tmp_path):
    # SAELens 6's defaults: dtype float32, apply_b_dec_to_input true, no rescaling by the
    # decoder norms; the context size comes from its metadata
    w = random_weights(seed=11)
    folder = saelens_folder(tmp_path, w)
    cfg = json.loads((folder / "cfg.json").read_text())
    for key in ("dtype", "apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
        del cfg[key]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = gsae.load(folder)
    assert sae.W_dec.dtype == torch.float32 and sae.provenance.context_size == 128
    x, _ = inputs()
    for got, want in zip(dense(sae, x), saelens_reference(w, x, True, False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sparsify_config_without_optional_keys_takes_sparsify_defaults(tmp_path):
    # sparsify 1.3's defaults: activation topk, expansion_factor 32 (num_latents 0), k 32
    gen = torch.Generator().manual_seed(12)
    n = D_IN * 32
    tensors = {"encoder.weight": torch.randn(n, D_IN, generator=gen),
               "encoder.bias": torch.randn(n, generator=gen),
               "W_dec": torch.randn(n, D_IN, generator=gen),
               "b_dec": torch.randn(D_IN, generator=gen)}
    sae = gsae.load(write_folder(tmp_path / "layers.2", "sae.safetensors", tensors, {}))
    assert (sae.n_latents, sae.k, sae.beta) == (n, 32, 0.0)


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_a_bfloat16_sae_exports_and_loads_as_bfloat16(tmp_path, fmt):
    sae = make_sae().to(torch.bfloat16)
    sae.provenance.context_size = 64
    folder = formats.export(sae, tmp_path / "out", fmt)
    written = json.loads((folder / "cfg.json").read_text())
    if fmt == "saelens":
        assert written["dtype"] == "bfloat16" and written["metadata"]["context_size"] == 64
        raw = {**written}
        raw.pop("metadata")  # read as a foreign folder: the dtype from the config alone
        (folder / "cfg.json").write_text(json.dumps(raw))
    else:
        written.pop("gsae")
        (folder / "cfg.json").write_text(json.dumps(written))
    loaded = gsae.load(folder)
    assert loaded.W_dec.dtype == torch.bfloat16
    assert torch.equal(loaded.W_dec, sae.W_dec)


@pytest.mark.parametrize("changes, scaling, message", [
    ({"normalize_activations": "expected_average_only_in"}, None,
     "normalize_activations = 'expected_average_only_in' is not supported"),
    ({}, "one_not_unit", "scaling factor is not supported"),
    ({"k": "5"}, None, "the number of latents and k as integers"),
])
def test_more_saelens_folders_that_are_refused(tmp_path, changes, scaling, message):
    folder = saelens_folder(tmp_path, random_weights(seed=13), **changes)
    if scaling:
        factor = torch.ones(D_SAE)
        factor[7] = 2.0  # one latent scaled: not a no-op
        tensors = load_file(str(folder / "sae_weights.safetensors"))
        save_file({**tensors, "scaling_factor": factor}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(GsaeError, match=message):
        gsae.load(folder)


def test_configs_and_targets_that_are_refused(tmp_path):
    folder = sparsify_folder(tmp_path, random_weights(seed=14))
    (folder / "cfg.json").write_text("[1, 2]")
    with pytest.raises(GsaeError, match="holds no JSON object"):
        gsae.load(folder)
    target = tmp_path / "file"
    target.write_text("mine")
    with pytest.raises(GsaeError, match="is a file: export into a folder"):
        formats.export(make_sae(), target, "saelens")
    assert target.read_text() == "mine"
    for repo, subfolder in (("owner/.", None), ("owner/repo", "./x"), ("./repo", None)):
        with pytest.raises(GsaeError, match="'.' and '..' name no repo"):
            formats.check_hub_names(repo, subfolder)
