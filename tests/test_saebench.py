"""`gsae eval --saebench DIR`: the files read by sae-bench 0.6.0's own pydantic model, their
numbers against naive computations on the tiny model, and the refusals."""

import dataclasses
import json

import pytest
import torch

from gsae import SAE, Provenance, SAEConfig
from gsae.cli import main
from gsae.evaluate import GRAD_FREE, EvalConfig, evaluate_contexts
from gsae.models import ModelConfig, model_identity
from gsae.saebench import FILE_SUFFIX, SCHEMA, file_names, weight_metrics, write_core
from gsae.text import DataConfig, corpus_identity
from gsae.tiny import tiny_llama, tiny_tokenizer

D = 64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def core_eval_output():
    """SAEBench's CoreEvalOutput (installed without its dependencies; it needs pydantic only)."""
    module = pytest.importorskip("sae_bench.evals.core.eval_output",
                                 reason="sae-bench is not installed (make test installs it)")
    return module.CoreEvalOutput


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(0, 512, (6, 20), generator=torch.Generator().manual_seed(0))


def make_sae(hook="1", beta=2.0, seed=0, outlier_factor=0.0, n_latents=96, k=6, model=None,
             data=None):
    meta = {"hook": hook, "skip_first": 1, "outlier_factor": outlier_factor,
            "model": model or {"model": "tiny-llama", "fingerprint": None}}
    if data is not None:
        meta |= {"corpus": corpus_identity(data), "context_size": data.context_size}
    sae = SAE(SAEConfig(n_latents=n_latents, k=k, beta=beta, seed=seed), D,
              provenance=Provenance.from_json(meta))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
    return sae


def validate(core_eval_output, path):
    """The file as SAEBench validates one (`validate_eval_output_format_str`), and as it reads
    back: every key a field of the model, no value coerced."""
    from pydantic import TypeAdapter

    text = path.read_text()
    parsed = TypeAdapter(core_eval_output).validate_json(text)
    assert json.loads(json.dumps(dataclasses.asdict(parsed))) == json.loads(text)
    return json.loads(text)


# A naive reference: a forward hook that zeroes the layer's output, float64 softmaxes -----------


def forward(model, tokens, layer, zero=False):
    """Logits and the layer's clean output; with `zero`, the output zeroed at every position."""
    seen = {}

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        seen["h"] = h.detach().clone()
        if not zero:
            return output
        return (torch.zeros_like(h), *output[1:]) if isinstance(output, tuple) else 0 * h

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=tokens).logits.double(), seen["h"]
    finally:
        handle.remove()


def naive_core(model, sae, contexts, batch_size, layer, skip=1):
    """SAEBench's core numbers on gsae's positions (outlier_factor 0: every position
    skip..T-2 is a row), computed directly."""
    T = contexts.shape[1]
    sums = dict.fromkeys(["ce", "kl", "l1", "in", "out", "out2", "dot", "legacy"], 0.0)
    rows = ce_tokens = 0
    fired = torch.zeros(sae.n_latents)
    contexts_fired = torch.zeros(sae.n_latents)
    for tokens in contexts.split(batch_size):
        clean, h = forward(model, tokens, layer)
        ablated, _ = forward(model, tokens, layer, zero=True)
        logp = clean.log_softmax(-1)[:, skip:T - 1]
        logq = ablated.log_softmax(-1)[:, skip:T - 1]
        targets = tokens[:, skip + 1:].unsqueeze(-1)
        sums["ce"] += -logq.gather(-1, targets).sum().item()
        sums["kl"] += (logp.exp() * (logp - logq)).sum().item()
        ce_tokens += targets.numel()
        x = h[:, skip:T - 1].reshape(-1, D)
        with torch.no_grad():
            values, indices, _ = sae.encode(x)
            x_hat = sae.decode(values, indices)
        code = torch.zeros(len(x), sae.n_latents).scatter(1, indices, values).double()
        x, x_hat = x.double(), x_hat.double()
        rows += len(x)
        sums["l1"] += code.sum().item()
        sums["in"] += x.norm(dim=1).sum().item()
        sums["out"] += x_hat.norm(dim=1).sum().item()
        sums["out2"] += (x_hat ** 2).sum().item()
        sums["dot"] += (x * x_hat).sum().item()
        spread = ((x - x.mean(0)) ** 2).sum(1)
        sums["legacy"] += (1 - ((x - x_hat) ** 2).sum(1) / spread).sum().item()
        fired += (code > 0).sum(0)
        contexts_fired += (code.reshape(len(tokens), T - 1 - skip, -1) > 0).any(1).sum(0)
    return {
        "ce_zero_all": sums["ce"] / ce_tokens, "kl_zero_all": sums["kl"] / ce_tokens,
        "l1": sums["l1"] / rows, "l2_norm_in": sums["in"] / rows,
        "l2_norm_out": sums["out"] / rows,
        "relative_reconstruction_bias": sums["out2"] / sums["dot"],
        "explained_variance_legacy": sums["legacy"] / rows,
        "fired": fired.long().tolist(), "contexts_fired": contexts_fired.long().tolist(),
    }


@pytest.mark.parametrize("above_hook", [True, False])
@pytest.mark.parametrize("layer", [0, 1])
def test_core_numbers_match_a_naive_zero_ablating_hook(model, contexts, above_hook, layer):
    sae = make_sae(hook=str(layer), beta=3.0)
    result = evaluate_contexts([sae], model, contexts, EvalConfig(batch_size=4), names=["s"],
                               above_hook=above_hook, core=True)
    (core,) = [c for c in result.core if c.mode == GRAD_FREE]
    expected = naive_core(model, sae, contexts, 4, layer)
    for key, value in expected.items():
        got = getattr(core, key)
        if isinstance(value, list):
            assert got == value, key
        else:
            assert got == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert sum(core.contexts_fired) > 0 and core.contexts_fired != core.fired
    # the baseline is not the clean model (the random tiny model's CE is near log 512 either way)
    record = next(r for r in result.results if r.mode == GRAD_FREE)
    assert abs(core.ce_zero_all - record.ce_clean) > 1e-3 and core.kl_zero_all > 1e-3


def test_without_core_no_extra_pass_runs(model, contexts, monkeypatch):
    import gsae.evaluate

    calls = []
    monkeypatch.setattr(gsae.evaluate, "zero_all", lambda h: calls.append(1) or 0 * h)
    result = evaluate_contexts([make_sae()], model, contexts, EvalConfig(batch_size=3))
    assert result.core == [] and calls == []
    result = evaluate_contexts([make_sae()], model, contexts, EvalConfig(batch_size=3), core=True)
    assert len(result.core) == 2 and len(calls) == 2  # one pass per hook and batch


def test_weight_metrics_against_explicit_loops(monkeypatch):
    """Per latent: bias, encoder norm, encoder-decoder cosine and the largest cosine with
    another latent's row, in blocks of 7 latents as in blocks of COSINE_ROWS."""
    import gsae.saebench

    monkeypatch.setattr(gsae.saebench, "COSINE_ROWS", 7)
    sae = make_sae(n_latents=23)
    with torch.no_grad():
        sae.W_enc.normal_(generator=torch.Generator().manual_seed(4))
    got = weight_metrics(sae)
    enc, dec = sae.W_enc.detach().double(), sae.W_dec.detach().double()

    def cos(a, b):
        return (a @ b / (a.norm() * b.norm())).item()

    for i in range(23):
        assert got["encoder_bias"][i].item() == sae.b_enc[i].item()
        assert got["encoder_norm"][i].item() == pytest.approx(enc[i].norm().item(), rel=1e-6)
        assert got["encoder_decoder_cosine_sim"][i].item() == pytest.approx(
            cos(enc[i], dec[i]), abs=1e-6)
        for key, w in (("max_encoder_cosine_sim", enc), ("max_decoder_cosine_sim", dec)):
            best = max(cos(w[i], w[j]) for j in range(23) if j != i)
            assert got[key][i].item() == pytest.approx(best, abs=1e-6), key


# The files, end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus):
    """A tiny model folder and two SAE folders (a g-SAE at layer 1, TopK at layer 0)."""
    root = tmp_path_factory.mktemp("saebench")
    tiny_llama().save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    model_id = model_identity(ModelConfig(model=str(root / "tiny")))
    data = DataConfig(dataset=corpus, context_size=24)
    folders = []
    for hook, beta, name in (("1", 5.0, "k6-beta5"), ("0", 0.0, "k6-beta0")):
        sae = make_sae(hook=hook, beta=beta, outlier_factor=5.0, model=model_id, data=data)
        folders.append(str(sae.save(root / "run" / f"model.layers.{hook}" / name)))
    return root, folders


def run_eval(folders, out, *flags):
    return main(["eval", *folders, "--eval_tokens", "96", "--batch_size", "2", "--saebench",
                 str(out), "--json", str(out.parent / f"{out.name}.json"), *flags])


def test_cli_writes_files_that_saebench_reads(setup, core_eval_output, capsys):
    root, folders = setup
    out = root / "bench"
    assert run_eval(folders, out) == 0, capsys.readouterr().err
    assert f"SAEBench core results written to {out}" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["k6-beta0" + FILE_SUFFIX, "k6-beta5" + FILE_SUFFIX]
    gsae_json = json.loads((root / "bench.json").read_text())
    for folder in folders:
        data = validate(core_eval_output, out / f"{folder.rsplit('/', 1)[1]}{FILE_SUFFIX}")
        (record,) = [r for r in gsae_json["results"] if r["sae"] == folder
                     and r["mode"] == GRAD_FREE]
        check_mapping(data, record, gsae_json["run"])


def check_mapping(data, record, run):
    """The file's fields against gsae's record of the same SAE, and SAEBench's scores against
    the file's own baselines."""
    m = {k: v for group in data["eval_result_metrics"].values() for k, v in group.items()}
    assert m["ce_loss_with_sae"] == record["ce_spliced"]
    assert m["ce_loss_without_sae"] == record["ce_clean"]
    assert m["kl_div_with_sae"] == record["kl"]
    assert m["ce_loss_score"] == pytest.approx(
        (m["ce_loss_with_ablation"] - m["ce_loss_with_sae"])
        / (m["ce_loss_with_ablation"] - m["ce_loss_without_sae"]))
    assert m["kl_div_score"] == pytest.approx(
        (m["kl_div_with_ablation"] - m["kl_div_with_sae"]) / m["kl_div_with_ablation"])
    # SAEBench's ablation zeroes every position, gsae's only the spliced ones; at the last block
    # (only the final norm and head above it, per position) the CE positions cannot tell
    same = record["hook"] == "model.layers.1" and record["outlier_tokens"] == 0
    assert (m["ce_loss_with_ablation"] == record["ce_zero_ablation"]) == same
    assert m["explained_variance"] == record["explained_variance"]
    assert m["mse"] == pytest.approx(record["mse"] * D)
    assert (m["cossim"], m["l2_ratio"], m["l0"]) == (record["cosine"], record["l2_ratio"],
                                                     record["l0"])
    assert m["frac_alive"] == 1 - record["dead_fraction"]
    assert m["total_tokens_eval_reconstruction"] == run["context_tokens"] == 4 * 24
    details = data["eval_result_details"]
    assert [d["index"] for d in details] == list(range(96))
    fired = [round(d["feature_density"] * record["tokens"]) for d in details]
    assert sum(fired) == pytest.approx(record["l0"] * record["tokens"])
    for d, f in zip(details, fired):  # firings per context it fired in; -1 when it never fired
        assert d["consistent_activation_heuristic"] == -1 if f == 0 else \
            1 <= d["consistent_activation_heuristic"] <= f
    config = data["eval_config"]
    assert (config["context_size"], config["batch_size_prompts"]) == (24, 2)
    assert config["n_eval_reconstruction_batches"] == 2
    assert data["sae_cfg_dict"]["architecture"] == "topk" and data["sae_cfg_dict"]["k"] == 6
    extra = data["eval_result_unstructured"]
    assert extra["schema"] == SCHEMA and extra["mode"] == GRAD_FREE
    assert [r["mode"] for r in extra["gsae_eval"]["results"]] == ["grad-aware", "grad-free"]


def test_foreign_files_are_kept_unless_overwrite(setup, capsys):
    root, folders = setup
    out = root / "shared"
    out.mkdir()
    foreign = out / ("k6-beta5" + FILE_SUFFIX)
    foreign.write_text('{"eval_type_id": "core", "from": "elsewhere"}')
    assert run_eval(folders[:1], out) == 2
    err = capsys.readouterr().err
    assert "not a gsae.saebench/1* result that gsae wrote" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert "elsewhere" in foreign.read_text() and not (root / "shared.json").exists()
    assert run_eval(folders[:1], out, "--overwrite") == 0
    first = json.loads(foreign.read_text())
    assert first["eval_result_unstructured"]["schema"] == SCHEMA
    assert run_eval(folders[:1], out) == 0  # gsae's own file is replaced without --overwrite
    assert json.loads(foreign.read_text())["eval_id"] != first["eval_id"]


def test_a_file_for_the_folder_is_refused(setup, capsys):
    root, folders = setup
    (root / "afile").write_text("x")
    assert run_eval(folders[:1], root / "afile") == 2
    err = capsys.readouterr().err
    assert "which is a file, not a folder" in err and len(err.strip().splitlines()) == 1


def test_file_names_tell_the_saes_apart():
    assert file_names(["a/x/k4", "b/x/k4", "hf://o/r"]) == [
        f"a_x_k4{FILE_SUFFIX}", f"b_x_k4{FILE_SUFFIX}", f"hf_o_r{FILE_SUFFIX}"]
    with pytest.raises(ValueError, match="share SAEBench file names"):
        file_names(["a b", "a_b"])


def test_write_core_needs_the_core_numbers(model, contexts, tmp_path):
    result = evaluate_contexts([make_sae()], model, contexts, EvalConfig(), names=["s"])
    with pytest.raises(ValueError, match="core=True"):
        write_core(tmp_path, result, [make_sae()])


def test_each_number_goes_under_its_saebench_name():
    from types import SimpleNamespace

    from gsae.saebench import eval_config, metrics

    record = SimpleNamespace(kl=0.2, ce_spliced=3.0, ce_clean=2.5, explained_variance=0.7,
                             mse=0.01, d_in=64, cosine=0.9, l2_ratio=0.95, l0=6.0)
    core = SimpleNamespace(kl_zero_all=1.0, ce_zero_all=5.0, explained_variance_legacy=0.65,
                           l2_norm_in=10.0, l2_norm_out=9.0, relative_reconstruction_bias=0.97,
                           l1=4.5)
    run = SimpleNamespace(context_tokens=120, contexts=5, batch_size=2,
                          model={"model": "tiny-llama"}, model_dtype="bfloat16",
                          corpus={"dataset": "wiki"}, context_size=24)
    # six latents: dead, below 1%, exactly 1%, 5%, exactly 10%, 50% of the rows
    density = torch.tensor([0.0, 0.005, 0.01, 0.05, 0.1, 0.5], dtype=torch.float64)
    weights = {"max_encoder_cosine_sim": torch.tensor([0.1, 0.3]),
               "max_decoder_cosine_sim": torch.tensor([0.5, 0.9])}
    m = {k: v for group in metrics(record, core, run, density, weights).values()
         for k, v in group.items()}
    expected = {
        "kl_div_score": 0.8, "ce_loss_score": 0.8,  # (1 - 0.2) / 1, (5 - 3) / (5 - 2.5)
        "explained_variance": 0.7, "explained_variance_legacy": 0.65, "mse": 0.64,
        "cossim": 0.9, "l2_ratio": 0.95, "l2_norm_in": 10.0, "l2_norm_out": 9.0,
        "relative_reconstruction_bias": 0.97, "l0": 6.0, "l1": 4.5,
        "total_tokens_eval_reconstruction": 120, "total_tokens_eval_sparsity_variance": 120,
        "freq_over_1_percent": 3 / 6, "freq_over_10_percent": 1 / 6,  # strictly above
        "normalized_freq_over_1_percent": 0.65 / 0.665,
        "normalized_freq_over_10_percent": 0.5 / 0.665,
        "average_max_encoder_cosine_sim": 0.2, "average_max_decoder_cosine_sim": 0.7,
        "frac_alive": 5 / 6}
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
    config = eval_config(run)
    assert config["n_eval_reconstruction_batches"] == 3  # 5 contexts in batches of 2
    assert config["n_eval_sparsity_variance_batches"] == 3
    assert (config["model_name"], config["llm_dtype"], config["dataset"]) == (
        "tiny-llama", "bfloat16", "wiki")
    assert config["exclude_special_tokens_from_reconstruction"] is False


def test_undefined_numbers_are_written_as_saebench_writes_a_nan():
    from gsae.saebench import UNDEFINED, _number, score

    assert score(1.0, 0.5, 1.0) is None  # the ablation changes nothing: 0 / 0
    assert score(2.0, 1.5, 1.0) == 0.5 and score(None, 1.0, 0.0) is None
    assert [_number(v) for v in (float("inf"), float("-inf"), float("nan"), None, 0.25)] == [
        UNDEFINED, UNDEFINED, UNDEFINED, UNDEFINED, 0.25]


def test_write_core_needs_one_sae_per_sae_evaluated(model, contexts, tmp_path):
    from gsae.errors import GsaeError

    result = evaluate_contexts([make_sae()], model, contexts, EvalConfig(), names=["s"],
                               core=True)
    with pytest.raises(GsaeError, match="2 SAEs given for the 1 SAEs evaluated"):
        write_core(tmp_path, result, [make_sae(), make_sae(seed=1)])
    assert not list(tmp_path.iterdir())
