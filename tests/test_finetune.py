"""`gsae finetune`: the KL loss against a float64 reference, held-out KL against the parent,
exact resume, on the tiny model."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_fit

import gsae
from gsae import SAE, GsaeError, SAEConfig
from gsae.evaluate import GRAD_AWARE, GRAD_FREE, EvalConfig, evaluate
from gsae.finetune import FinetuneTrainer, SplicingSource, spliced_losses
from gsae.hooks import hook_output_tensor, replace_hook_output
from gsae.models import ModelConfig
from gsae.pipeline import TrainRun, finetune, finetune_run, load_for_eval, train
from gsae.source import SourceConfig
from gsae.text import DataConfig
from gsae.tiny import tiny_llama
from gsae.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "model.layers.0"  # of tiny-llama's two blocks: block 1 runs above it


def random_sae(beta, seed=0):
    """An SAE with random biases too, so that every parameter gets a gradient."""
    sae = SAE(SAEConfig(n_latents=128, k=4, beta=beta, seed=seed), 64)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(128, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(64, generator=gen))
    return sae


def run_with_hook(model, layer, replace, tokens):
    """The model's logits with `replace(h)` as the output h of `layer` (the whole forward)."""
    def hook(_module, _inputs, output):
        return replace_hook_output(output, replace(hook_output_tensor(output)))

    handle = layer.register_forward_hook(hook)
    try:
        return model(input_ids=tokens, use_cache=False).logits
    finally:
        handle.remove()


def reference_kl(model, tokens, sae, beta):
    """KL(clean || spliced) in float64, written out: the model in float64, the gradient of the
    summed next-token cross-entropy at the hook, TopK on z + beta z |W_dec g|, the
    reconstruction written at positions 1 .. T-2, and the mean over the predictions made there
    of sum_v p log(p / q). Returns the KL and the SAE parameters (float64 leaves)."""
    model = copy.deepcopy(model).double()
    layer = model.model.layers[0]
    params = {n: p.detach().double().requires_grad_(True) for n, p in sae.named_parameters()}
    held = {}

    def as_leaf(h):
        held["h"] = h.detach().requires_grad_(True)
        return held["h"]

    clean = run_with_hook(model, layer, as_leaf, tokens)
    logp = F.log_softmax(clean, -1)
    ce = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).sum()
    (g_full,) = torch.autograd.grad(ce, held["h"])
    logp = logp.detach()
    x, g = held["h"].detach()[:, 1:-1], g_full[:, 1:-1]
    z = (x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"]
    score = z + beta * z * (g @ params["W_dec"].T).abs()
    chosen = score.topk(sae.k, dim=-1).indices
    values = torch.relu(z.gather(-1, chosen))
    x_hat = (values.unsqueeze(-1) * params["W_dec"][chosen]).sum(-2) + params["b_dec"]

    def spliced(h):
        return torch.cat([h[:, :1], x_hat, h[:, -1:]], dim=1)

    logq = F.log_softmax(run_with_hook(model, layer, spliced, tokens), -1)
    p = logp.exp()
    kl = (p * (logp - logq))[:, 1:-1].sum() / (tokens.shape[0] * (tokens.shape[1] - 2))
    return kl, params


def count_calls(modules):
    counts = {name: 0 for name in modules}
    handles = [m.register_forward_hook(lambda *_a, name=name: counts.__setitem__(
        name, counts[name] + 1)) for name, m in modules.items()]
    return counts, handles


@pytest.mark.parametrize("beta", [0.0, 5.0])
def test_the_kl_loss_and_its_gradient_match_a_float64_reference(beta):
    model = tiny_llama()
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    source = SplicingSource(model, SourceConfig(hooks=["0"], skip_first=1, outlier_factor=0.0),
                            with_grad=beta > 0)
    batch = source.batches(tokens)[HOOK]
    assert (batch.g is not None) == (beta > 0)
    sae = random_sae(beta)
    counts, handles = count_calls({"embedding": model.model.embed_tokens,
                                   "below": model.model.layers[0],
                                   "above": model.model.layers[1]})
    kl = spliced_losses(sae, batch).kl
    for handle in handles:
        handle.remove()
    assert counts == {"embedding": 0, "below": 0, "above": 1}  # only the block above the hook
    kl.backward()
    expected, params = reference_kl(model, tokens, sae, beta)
    expected.backward()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-4)
    assert expected.item() > 1e-4
    for name, p in sae.named_parameters():
        reference = params[name].grad
        assert reference.abs().max() > 0, name
        assert torch.allclose(p.grad.double(), reference, rtol=1e-3,
                              atol=1e-3 * reference.abs().max().item()), name
    assert all(p.grad is None for p in model.parameters())  # the model stays frozen


def test_a_model_that_requires_grad_is_refused():
    model = tiny_llama().requires_grad_(True)
    with pytest.raises(GsaeError, match="require grad"):
        SplicingSource(model, SourceConfig(hooks=["0"]), with_grad=False)


def test_the_saes_of_a_hook_share_one_pass_of_the_lower_layers(tmp_path):
    """Two SAEs fine-tuned on three batches of contexts: the layers below the hook run once per
    batch, the block above once in the clean pass and once per SAE."""
    model = tiny_llama()
    source = SplicingSource(model, SourceConfig(hooks=["0"], lm_batch_size=2), with_grad=True)
    cfg = TrainConfig(out=str(tmp_path), tokens=3 * 2 * 30, batch_tokens=2 * 30, lr=1e-3)
    trainer = FinetuneTrainer.create([(random_sae(0.0), HOOK), (random_sae(5.0, seed=1), HOOK)],
                                     cfg)
    counts, handles = count_calls({"below": model.model.layers[0],
                                   "above": model.model.layers[1]})
    batches = torch.randint(0, 256, (3, 2, 32), generator=torch.Generator().manual_seed(0))
    trainer.fit(source.stream(iter(batches)))
    for handle in handles:
        handle.remove()
    assert [m.step for m in trainer.members] == [3, 3]
    assert counts == {"below": 3, "above": 3 * (1 + 2)}


# -------------------------------------------------------------------------- on the pipeline


VARIANTS = ("k4-beta0-z-x2-s0", "k4-beta10-z-x2-s0")


@pytest.fixture(scope="module")
def parents(corpus, tmp_path_factory):
    """A TopK SAE and a g-SAE at hook 1 of tiny-llama, trained briefly with MSE."""
    out = tmp_path_factory.mktemp("parents")
    run = TrainRun(model=ModelConfig(model="tiny-llama"),
                   data=DataConfig(dataset=corpus, context_size=32))
    run.source.hooks, run.source.lm_batch_size = ["1"], 4
    run.sae.expansion_factor, run.sae.k, run.sae.beta = [2], [4], [0.0, 10.0]
    run.train.out = str(out)
    run.train.tokens, run.train.batch_tokens, run.train.shuffle_tokens = 3072, 256, 512
    run.train.lr = 3e-3
    with torch.random.fork_rng(devices=[]):
        train(run)
    return [str(out / "model.layers.1" / v) for v in VARIANTS]


def finetuning(parents, out, **train_kwargs):
    run = finetune_run(parents)
    run.train.out = str(out)
    run.train.tokens, run.train.lr, run.train.warmup_steps = 1200, 1e-2, 2
    for key, value in train_kwargs.items():
        setattr(run.train, key, value)
    return run


def test_finetuning_lowers_held_out_kl_against_the_parent(parents, tmp_path):
    """Both SAEs of the hook, fine-tuned together on the KL term alone, keep the spliced
    model's held-out next-token distribution closer to the clean one than their parents did
    (same k; the evaluation code measures it), in both inference modes."""
    summary = finetune(finetuning(parents, tmp_path / "ft", kl_weight=1.0))
    children = [str(tmp_path / "ft" / "model.layers.1" / v) for v in VARIANTS]
    assert [r["name"] for r in summary.records] == [f"model.layers.1/{v}" for v in VARIANTS]
    setup = load_for_eval(parents + children)
    result = evaluate(setup.saes, setup.model, setup.tokenizer, setup.data,
                      EvalConfig(eval_tokens=2048), names=parents + children)
    kl = {(r.sae, r.mode): r.kl for r in result.results}
    for parent, child in zip(parents, children):
        assert gsae.load(child).k == gsae.load(parent).k == 4
        for mode in (GRAD_AWARE, GRAD_FREE):
            assert kl[child, mode] < 0.9 * kl[parent, mode], (child, mode, kl)
    log = [json.loads(line) for line in open(f"{children[0]}/log.jsonl")]
    assert {"kl", "mse", "fvu", "l0"} <= set(log[-1])


def test_the_fine_tuned_folder_records_its_parent(parents, tmp_path):
    """The fine-tuned SAE is a normal folder recording its parent, with snapshots as in
    training (a step takes 8 contexts of 30 positions at most)."""
    finetune(finetuning(parents[:1], tmp_path / "ft", tokens=480, snapshots=[60]))
    folder = tmp_path / "ft" / "model.layers.1" / VARIANTS[0]
    child, parent = gsae.load(folder), gsae.load(parents[0])
    snapshot = gsae.load(folder / "snapshots" / "tokens-60")
    for name, p in parent.state_dict().items():
        assert not torch.equal(snapshot.state_dict()[name], p), name
        assert not torch.equal(snapshot.state_dict()[name], child.state_dict()[name]), name
    recorded = child.provenance.finetuned_from
    assert recorded["folder"] == parents[0] and recorded["tokens"] == 480
    assert len(recorded["weights"]) == 64
    assert child.provenance.hook == parent.provenance.hook == "model.layers.1"
    assert child.provenance.corpus == parent.provenance.corpus
    run = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert run["command"] == "finetune"
    assert run["saes"] == parents[:1] and run["recorded"]["parent_weights"] == [recorded["weights"]]


def weights(folder):
    return SAE.load(folder).state_dict()


def records(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in open(folder / "log.jsonl")]


def test_an_interrupted_finetune_resumes_to_the_same_weights(parents, tmp_path, monkeypatch):
    """Interrupted after some batches (past a checkpoint), a fine-tuning run resumed with
    --resume ends with the weights and logs of the uninterrupted run, bit for bit."""
    def run_in(out, **kwargs):
        return finetuning(parents, out, checkpoint_every=2, log_every=1, **kwargs)

    finetune(run_in(tmp_path / "ref"))
    import gsae.pipeline

    interrupt_fit(monkeypatch, gsae.pipeline.FinetuneTrainer, 3)
    with pytest.raises(KeyboardInterrupt):
        finetune(run_in(tmp_path / "cut"))
    monkeypatch.undo()
    part = tmp_path / "cut" / "model.layers.1" / VARIANTS[0] / "checkpoint"
    assert {"balance.json", "optimizer.safetensors"} <= {p.name for p in part.iterdir()}
    summary = finetune(run_in(tmp_path / "cut", resume=True))
    assert summary.records[0]["step"] == 5
    assert [p.name for p in part.iterdir()] == ["state.json"]  # finished: the state dropped
    assert not list(Path(parents[0]).glob("checkpoint/*.safetensors"))  # parents need none
    for variant in VARIANTS:
        ref, cut = (tmp_path / run / "model.layers.1" / variant for run in ("ref", "cut"))
        expected, got = weights(ref), weights(cut)
        assert all(torch.equal(got[name], expected[name]) for name in expected), variant
        assert records(cut) == records(ref), variant
