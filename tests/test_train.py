"""The trainer on synthetic sparse data with a known dictionary."""

import json

import pytest
import torch

from gsae import SAE, GsaeError, SAEConfig
from gsae.source import Batch
from gsae.train import ShuffleBuffer, TrainConfig, Trainer, lr_factor


def sparse_chunks(n_chunks, rows=256, d=16, n_atoms=48, active=3, seed=0, grad=True):
    """Rows that are sums of `active` atoms of a fixed random dictionary, plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    for _ in range(n_chunks):
        idx = torch.rand(rows, n_atoms, generator=gen).argsort(1)[:, :active]
        coef = torch.rand(rows, active, generator=gen) * 3 + 1
        x = torch.einsum("na,nad->nd", coef, atoms[idx]) + 0.01 * torch.randn(rows, d,
                                                                               generator=gen)
        g = 0.1 * torch.randn(rows, d, generator=gen) if grad else None
        yield {"h": Batch(x, g, "h")}


def make_trainer(tmp_path, sweep, **train_kwargs):
    kwargs = dict(out=str(tmp_path / "run"), tokens=256 * 60, batch_tokens=256,
                  shuffle_tokens=1024, lr=1e-2, warmup_steps=5, dead_tokens=2000,
                  checkpoint_every=20, log_every=5)
    kwargs.update(train_kwargs)
    cfg = TrainConfig(**kwargs)
    saes = [(SAE(c, 16), "h") for c in sweep]
    return Trainer.create(saes, cfg)


def test_training_lowers_fvu_and_keeps_decoder_unit_norm(tmp_path):
    trainer = make_trainer(tmp_path, [SAEConfig(n_latents=64, k=4, beta=1.0)], tokens=256 * 100)
    sae = trainer.members[0].sae
    chunks = list(sparse_chunks(100))
    first = chunks[0]["h"]
    with torch.no_grad():
        sae.init_b_dec(first.x)
        fvu_before = sae(first.x, first.g).fvu.item()
    final = trainer.fit(iter(chunks))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    with torch.no_grad():
        fvu_after = sae(first.x, first.g).fvu.item()
    assert fvu_before > 0.5 and fvu_after < 0.4 * fvu_before
    assert final[0]["tokens"] == 256 * 100 and final[0]["fvu"] < 0.3
    log = [json.loads(line) for line in (trainer.members[0].folder / "log.jsonl").open()]
    assert log[-1]["step"] == 100 and log[0]["fvu"] > log[-1]["fvu"]
    loaded = SAE.load(trainer.members[0].folder)
    assert torch.equal(loaded.W_dec, sae.W_dec)


def test_sweep_trained_together_equals_one_by_one(tmp_path):
    sweep = [SAEConfig(n_latents=64, k=k, beta=b, seed=s)
             for k, b, s in [(4, 0.0, 0), (4, 2.0, 0), (8, 2.0, 1), (2, 0.5, 2)]]
    together = make_trainer(tmp_path / "all", sweep, tokens=256 * 12)
    together.fit(sparse_chunks(12))
    for i, cfg in enumerate(sweep):
        alone = make_trainer(tmp_path / f"one{i}", [cfg], tokens=256 * 12)
        alone.fit(sparse_chunks(12))
        for name, p in alone.members[0].sae.named_parameters():
            assert torch.equal(p, getattr(together.members[i].sae, name)), (i, name)


def test_resume_continues_from_the_checkpoint(tmp_path):
    cfg = SAEConfig(n_latents=64, k=4, beta=1.0)
    first = make_trainer(tmp_path, [cfg], tokens=256 * 40)
    first.fit(sparse_chunks(24))  # the data ends early: a run cut short
    member = first.members[0]
    assert member.step == 24
    weights = {n: p.clone() for n, p in member.sae.named_parameters()}
    # A kill between the two renames of a checkpoint swap leaves only the previous one.
    (member.folder / "checkpoint").rename(member.folder / "checkpoint.old")
    again = make_trainer(tmp_path, [cfg], tokens=256 * 40, resume=True)
    m = again.members[0]
    assert m.step == 24 and again.chunks_done == 24
    for name, p in m.sae.named_parameters():
        assert torch.equal(p, weights[name])
    assert m.opt.state[m.sae.W_dec]["exp_avg"].abs().sum() > 0  # optimiser state restored
    again.fit(sparse_chunks(40, seed=0))
    assert m.tokens == 256 * 40


def test_non_finite_data_stops_with_the_step(tmp_path):
    trainer = make_trainer(tmp_path, [SAEConfig(n_latents=64, k=4, beta=1.0)],
                           shuffle_tokens=512)
    chunks = list(sparse_chunks(6))
    chunks[4]["h"].g[3, 2] = float("nan")
    with pytest.raises(GsaeError, match=r"non-finite gradient values in the data at step \d+"):
        trainer.fit(iter(chunks))


def test_shuffle_buffer_mixes_and_loses_nothing():
    buf = ShuffleBuffer(capacity=40, batch_size=10, seed=0)
    out = []
    for i in range(10):
        out += list(buf.add(Batch(torch.full((8, 1), float(i)), None)))
    out += list(buf.flush())
    rows = torch.cat([b.x for b in out]).flatten()
    assert sorted(rows.tolist()) == sorted(float(i) for i in range(10) for _ in range(8))
    assert all(len(b) == 10 for b in out[:-1])
    assert len(set(out[0].x.flatten().tolist())) > 2  # a batch mixes several chunks


def test_lr_schedule():
    assert lr_factor(0, 100, 10, 0.2) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.2) == 1.0
    assert lr_factor(50, 100, 10, 0.2) == 1.0
    assert lr_factor(90, 100, 10, 0.2) == pytest.approx(0.5)
