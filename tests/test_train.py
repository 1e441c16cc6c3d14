"""The trainer on synthetic sparse data with a known dictionary."""

import json

import pytest
import torch

from gsae import SAE, GsaeError, SAEConfig
from gsae.batch import Batch
from gsae.train import ShuffleBuffer, TrainConfig, TrainedSAE, Trainer, default_lr, lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")


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


def two_hook_chunks(n_chunks, seed=0):
    """Chunks for two hook points with different row counts, so that the SAEs of the two hooks
    step (and ask for checkpoints) at different moments."""
    a = sparse_chunks(n_chunks, rows=200, seed=seed)
    b = sparse_chunks(n_chunks, rows=136, seed=seed + 1, grad=False)
    for ca, cb in zip(a, b):
        yield {"a": Batch(ca["h"].x, ca["h"].g, "a", dropped_outliers=1),
               "b": Batch(cb["h"].x, None, "b")}


def resumable_trainer(out, resume=False):
    sweep = [SAEConfig(n_latents=64, k=4, beta=1.0), SAEConfig(n_latents=32, k=2, beta=0.0)]
    cfg = TrainConfig(out=str(out), tokens=128 * 30, batch_tokens=128, shuffle_tokens=512,
                      lr=1e-2, warmup_steps=3, dead_tokens=300, checkpoint_every=4, log_every=3,
                      resume=resume)
    return Trainer.create([(SAE(c, 16), h) for h in ("a", "b") for c in sweep], cfg)


class Killed(Exception):
    pass


def chunks_after(done, kill_at=None):
    """The chunks a run resumed after `done` chunks reads; with `kill_at`, the run is "killed"
    when it asks for chunk number `kill_at`."""
    for i, chunk in enumerate(two_hook_chunks(40)):
        if i == kill_at:
            raise Killed
        if i >= done:
            yield chunk


def records(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (folder / "log.jsonl").open()]


def assert_same_runs(trainer, reference):
    for m, ref in zip(trainer.members, reference.members):
        assert m.step == ref.step and m.tokens == ref.tokens
        for name, p in ref.sae.named_parameters():
            assert torch.equal(p, getattr(m.sae, name)), (m.name, name)
        assert records(m.folder) == records(ref.folder), m.name  # nothing lost or repeated


def test_a_run_killed_anywhere_resumes_to_the_same_weights(tmp_path):
    """Interrupted before its first checkpoint, just after one, and between two, a run resumed
    from its checkpoint ends with the weights and logs of an uninterrupted run, bit for bit."""
    reference = resumable_trainer(tmp_path / "ref")
    reference.fit(two_hook_chunks(40))
    out = tmp_path / "cut"
    trainer = resumable_trainer(out)
    for kill_at in (2, 9, 10, 17):
        with pytest.raises(Killed):
            trainer.fit(chunks_after(trainer.chunks_done, kill_at))
        trainer = resumable_trainer(out, resume=True)
        assert trainer.chunks_done <= kill_at
    assert trainer.chunks_done > 0 and trainer.rows_seen > 0
    trainer.fit(chunks_after(trainer.chunks_done))
    assert trainer.finished and trainer.dropped_outliers == reference.dropped_outliers
    assert_same_runs(trainer, reference)


def test_a_kill_between_the_parts_of_a_checkpoint_resumes_the_previous_one(tmp_path,
                                                                           monkeypatch):
    reference = resumable_trainer(tmp_path / "ref")
    reference.fit(two_hook_chunks(40))
    out = tmp_path / "cut"
    trainer = resumable_trainer(out)
    real_save = TrainedSAE.save_checkpoint

    def save_then_die(self, moment, run_state):
        if moment == 3 and self is trainer.members[2]:
            raise Killed  # the run-level part and two SAEs hold moment 3, the others moment 2
        real_save(self, moment, run_state)

    monkeypatch.setattr(TrainedSAE, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        trainer.fit(two_hook_chunks(40))
    monkeypatch.setattr(TrainedSAE, "save_checkpoint", real_save)
    trainer = resumable_trainer(out, resume=True)
    assert trainer.moment == 2
    assert sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint"]
    trainer.fit(chunks_after(trainer.chunks_done))
    assert_same_runs(trainer, reference)


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


def test_wandb_gets_exactly_the_records_of_log_jsonl(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log

    def log(run, data, *args, **kwargs):
        logged.append(dict(data))
        return real_log(run, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    sweep = [SAEConfig(n_latents=64, k=4, beta=1.0), SAEConfig(n_latents=32, k=2, beta=0.0)]
    trainer = make_trainer(tmp_path, sweep, tokens=256 * 12, wandb_project="gsae-test")
    trainer.fit(sparse_chunks(12))
    for m in trainer.members:
        prefix = m.name + "/"
        sent = [{k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}
                for d in logged]
        written = [json.loads(line) for line in m.log_file.open()]
        assert [d for d in sent if d] == written and len(written) >= 3
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_snapshots_hold_the_weights_at_their_token_counts(tmp_path, monkeypatch):
    """A snapshot equals the weights an uninterrupted run (without snapshots) has right after
    the step that reaches its token count."""
    cfg = SAEConfig(n_latents=64, k=4, beta=1.0)
    with_snapshots = make_trainer(tmp_path / "a", [cfg], tokens=256 * 30,
                                  snapshots=[256 * 7, 1000, 256 * 30])
    with_snapshots.fit(sparse_chunks(30))
    plain = make_trainer(tmp_path / "b", [cfg], tokens=256 * 30)
    seen = {}
    real_step = Trainer._train_step

    def step_and_copy(self, m, batch):
        real_step(self, m, batch)
        seen[m.tokens] = {n: p.detach().clone() for n, p in m.sae.named_parameters()}

    monkeypatch.setattr(Trainer, "_train_step", step_and_copy)
    plain.fit(sparse_chunks(30))
    folder = with_snapshots.members[0].folder
    for requested, reached in ((256 * 7, 256 * 7), (1000, 1024), (256 * 30, 256 * 30)):
        snap = folder / "snapshots" / f"tokens-{requested}"
        assert json.loads((snap / "snapshot.json").read_text())["tokens"] == reached
        loaded = SAE.load(snap)
        for name, p in loaded.named_parameters():
            assert torch.equal(p, seen[reached][name]), (requested, name)
    assert len(list((folder / "snapshots").iterdir())) == 3


def test_default_lr_scales_with_the_inverse_root_of_the_width():
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(4 * 2**14) == pytest.approx(1e-4)


def test_the_trainer_follows_its_schedule_step_by_step(tmp_path, monkeypatch):
    """One SAE, 12 steps of 256 rows: b_dec is initialised once (from the first batch); the
    learning rate of step s is base * lr_factor(s, tokens // batch_tokens, ...), reaching the
    decay's end at the last step; latents count as dead from exactly dead_tokens tokens without
    firing; checkpoints are taken at multiples of checkpoint_every."""
    cfg = SAEConfig(n_latents=64, k=4, beta=1.0)
    trainer = make_trainer(tmp_path, [cfg], tokens=256 * 12, warmup_steps=3,
                           decay_fraction=0.5, dead_tokens=512, checkpoint_every=4,
                           shuffle_tokens=512)
    m = trainer.members[0]
    with torch.no_grad():
        m.sae.b_enc[-8:] = -1e4  # these 8 latents never fire
    inits, lrs, dead, checkpoints = [], [], [], []
    real_init, real_forward = SAE.init_b_dec, SAE.forward
    real_save = Trainer._save_checkpoints

    def init(self, *args, **kwargs):
        inits.append(1)
        return real_init(self, *args, **kwargs)

    def forward(self, x, grad=None, dead_mask=None, **kwargs):
        lrs.append(m.opt.param_groups[0]["lr"])
        dead.append(int(dead_mask.sum()))
        return real_forward(self, x, grad, dead_mask=dead_mask, **kwargs)

    def save(self, finished):
        checkpoints.append((m.step, finished))
        return real_save(self, finished)

    monkeypatch.setattr(SAE, "init_b_dec", init)
    monkeypatch.setattr(SAE, "forward", forward)
    monkeypatch.setattr(Trainer, "_save_checkpoints", save)
    trainer.fit(sparse_chunks(12))
    assert len(inits) == 1 and len(lrs) == 12
    base = default_lr(64) if not trainer.cfg.lr else trainer.cfg.lr
    assert lrs == pytest.approx([base * lr_factor(s, 12, 3, 0.5) for s in range(12)])
    assert lrs[-1] == pytest.approx(base / 6)  # (12 - 11) / (12 - 6) of the base
    # since_fired reaches 512 = dead_tokens after 2 steps of 256 rows: dead from step index 2.
    assert dead[:2] == [0, 0] and all(d >= 8 for d in dead[2:])
    assert [s for s, finished in checkpoints if not finished] == [4, 8]


# Behaviour that deliberately broken code once got past -------------------------------------------


def test_a_kill_before_the_old_checkpoints_go_resumes_the_newest(tmp_path, monkeypatch):
    """Killed when every part holds checkpoint 3 and still its checkpoint 2, a run resumes from
    checkpoint 3 (nothing done is redone) and ends as the uninterrupted run."""
    import gsae.train

    reference = resumable_trainer(tmp_path / "ref")
    reference.fit(two_hook_chunks(40))
    out = tmp_path / "cut"
    trainer = resumable_trainer(out)
    real_remove = gsae.train._remove_part

    def die_before_removing_the_old(folder):
        final = folder.with_name(folder.name.removesuffix(gsae.train.OLD))
        if folder.name.endswith(gsae.train.OLD) and folder.exists() \
                and json.loads((final / "state.json").read_text())["moment"] == 3:
            raise Killed
        real_remove(folder)

    monkeypatch.setattr(gsae.train, "_remove_part", die_before_removing_the_old)
    with pytest.raises(Killed):
        trainer.fit(two_hook_chunks(40))
    monkeypatch.setattr(gsae.train, "_remove_part", real_remove)
    assert len(list(out.rglob("checkpoint" + gsae.train.OLD))) == 1 + len(trainer.members)
    resumed = resumable_trainer(out, resume=True)
    assert resumed.moment == 3 and resumed.chunks_done == trainer.chunks_done
    assert [m.step for m in resumed.members] == [m.step for m in trainer.members]
    resumed.fit(chunks_after(resumed.chunks_done))
    assert_same_runs(resumed, reference)


@pytest.mark.parametrize("d_in, k_aux, expected", [(16, None, 8), (1, None, 1), (16, 3, 3)])
def test_auxk_takes_half_the_input_width_of_dead_latents_by_default(d_in, k_aux, expected,
                                                                    tmp_path):
    """The AuxK term reconstructs the residual with the top d_in // 2 dead latents (at least
    one) unless --k_aux says how many: with every latent dead, exactly that many latents of each
    row get an AuxK gradient."""
    given = {} if k_aux is None else {"k_aux": k_aux}  # None: the default
    cfg = TrainConfig(out=str(tmp_path), **given)
    m = TrainedSAE(SAE(SAEConfig(n_latents=32, k=2, beta=0.0), d_in), "h", tmp_path, cfg)
    x = torch.randn(1, d_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.sae.b_enc.copy_(torch.arange(32.0))  # every pre-activation positive and distinct
    out = m.sae(x, None, dead_mask=torch.ones(32, dtype=torch.bool), k_aux=m.k_aux)
    out.auxk_loss.backward()
    assert int((m.sae.b_enc.grad != 0).sum()) == expected


def test_the_shuffle_buffer_emits_half_when_full_and_every_row_at_the_end():
    buf = ShuffleBuffer(capacity=8, batch_size=2, seed=0)
    assert list(buf.add(Batch(torch.arange(7.0)[:, None], None))) == []
    out = list(buf.add(Batch(torch.tensor([[7.0]]), None)))
    assert [len(b) for b in out] == [2, 2] and buf.rows == 4
    assert ShuffleBuffer(capacity=3, batch_size=4, seed=0).capacity == 8  # two batches at least
    # at the end of the data every row left comes out, the last batch short if need be
    assert [len(b) for b in buf.flush()] == [2, 2]
    assert list(buf.add(Batch(torch.tensor([[8.0]]), None))) == []
    (last,) = buf.flush()
    assert last.x.flatten().tolist() == [8.0] and buf.rows == 0


def test_the_logged_effect_is_the_mean_beta_d_g_of_the_selected_latents(tmp_path, monkeypatch):
    """log.jsonl's `effect` of a step: beta |d_i . g| averaged over rows and kept latents, with
    the decoder rows as they were when the step selected them."""
    trainer = make_trainer(tmp_path, [SAEConfig(n_latents=64, k=4, beta=2.0)],
                           tokens=256 * 4, shuffle_tokens=512, log_every=1)
    expected = []
    real_forward = SAE.forward

    def forward(self, x, grad=None, **kwargs):
        W_dec = self.W_dec.detach().clone()
        out = real_forward(self, x, grad, **kwargs)
        dots = (W_dec[out.indices] * grad[:, None, :]).sum(-1)  # [N, k]: d_i . g
        expected.append((2.0 * dots.abs()).mean().item())
        return out

    monkeypatch.setattr(SAE, "forward", forward)
    trainer.fit(sparse_chunks(4))
    log = [json.loads(line) for line in (trainer.members[0].folder / "log.jsonl").open()]
    assert len(expected) == 4
    assert [r["effect"] for r in log] == pytest.approx(expected, rel=1e-5)


def test_each_sae_of_a_two_hook_run_trains_exactly_its_budget(tmp_path):
    """Hooks whose chunks hold different row counts reach the budget at different chunks: each
    SAE stops at the budget (30 steps of 128 rows), none short of it and none beyond."""
    trainer = resumable_trainer(tmp_path / "run")
    final = trainer.fit(two_hook_chunks(40))
    assert [(m.step, m.tokens) for m in trainer.members] == [(30, 128 * 30)] * 4
    assert [r["tokens"] for r in final] == [128 * 30] * 4


def test_the_logged_outlier_fraction_counts_outliers_among_all_rows(tmp_path):
    """Chunks of 256 kept rows that each dropped 64 outliers: 64 of every 320 rows, 0.2."""
    def with_outliers(chunks):
        for chunk in chunks:
            yield {"h": Batch(chunk["h"].x, chunk["h"].g, "h", dropped_outliers=64)}

    trainer = make_trainer(tmp_path, [SAEConfig(n_latents=64, k=4, beta=1.0)], tokens=256 * 4,
                           shuffle_tokens=512, log_every=1)
    trainer.fit(with_outliers(sparse_chunks(6)))
    log = [json.loads(line) for line in (trainer.members[0].folder / "log.jsonl").open()]
    assert log and all(r["outlier_fraction"] == pytest.approx(0.2) for r in log)


def test_lr_zero_trains_at_the_width_scaled_default_rate(tmp_path):
    """--lr 0 (the default) means 2e-4 / sqrt(n_latents / 2^14): 3.2e-3 for 64 latents."""
    trainer = make_trainer(tmp_path, [SAEConfig(n_latents=64, k=4, beta=1.0)], tokens=256 * 4,
                           shuffle_tokens=512, lr=0.0, warmup_steps=0, decay_fraction=0.0,
                           log_every=1)
    before = trainer.members[0].sae.W_dec.detach().clone()
    trainer.fit(sparse_chunks(4))
    log = [json.loads(line) for line in (trainer.members[0].folder / "log.jsonl").open()]
    assert [r["lr"] for r in log] == pytest.approx([3.2e-3] * 4)
    assert not torch.equal(trainer.members[0].sae.W_dec, before)


def test_a_budget_that_is_not_whole_batches_decays_over_every_step_it_takes(tmp_path,
                                                                            monkeypatch):
    """3172 tokens in batches of 256 take 13 steps (the last one reaches the budget); the
    schedule spans those 13, so the last step still learns (at 1/7 of the base rate, the
    decay covering steps 6..12), rather than taking a step at rate 0."""
    trainer = make_trainer(tmp_path, [SAEConfig(n_latents=64, k=4, beta=1.0)],
                           tokens=256 * 12 + 100, warmup_steps=3, decay_fraction=0.5,
                           shuffle_tokens=512)
    m = trainer.members[0]
    lrs = []
    real_forward = SAE.forward

    def forward(self, *args, **kwargs):
        lrs.append(m.opt.param_groups[0]["lr"])
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(SAE, "forward", forward)
    trainer.fit(sparse_chunks(14))
    assert m.step == 13 and m.tokens == 256 * 13
    assert lrs[-1] == pytest.approx(1e-2 / 7)
    assert lrs == pytest.approx([1e-2 * lr_factor(s, 13, 3, 0.5) for s in range(13)])


@pytest.mark.parametrize("method", ["geometric_median", "mean"])
def test_b_dec_starts_at_the_first_batchs_geometric_median_or_mean(tmp_path, monkeypatch,
                                                                   method):
    """A few far rows pull the mean away; the geometric median (where the unit vectors to the
    rows sum to zero) stays with the bulk. b_dec starts at the one asked for."""
    def with_far_rows(chunks):
        for chunk in chunks:
            x = chunk["h"].x.clone()
            x[:8] += 200.0
            yield {"h": Batch(x, chunk["h"].g, "h")}

    trainer = make_trainer(tmp_path, [SAEConfig(n_latents=64, k=4, beta=1.0)], tokens=256,
                           shuffle_tokens=512, b_dec_init=method)
    seen = []
    real_forward = SAE.forward

    def forward(self, x, *args, **kwargs):
        seen.append((x.clone(), self.b_dec.detach().clone()))
        return real_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(SAE, "forward", forward)
    trainer.fit(with_far_rows(sparse_chunks(2)))
    x, b_dec = seen[0]
    if method == "mean":
        assert torch.allclose(b_dec, x.mean(0), atol=1e-5)
    else:
        pull = torch.nn.functional.normalize(x - b_dec, dim=1).sum(0).norm() / len(x)
        assert pull < 0.01 and (b_dec - x.mean(0)).norm() > 1.0


def test_step_timing_takes_the_median_of_interleaved_rounds_after_the_warmup(monkeypatch):
    import gsae.train as train_module

    # a fake clock: a step of an SAE with k latents kept takes k seconds in round r, plus r
    clock = [0.0]
    calls: list[tuple[int, int]] = []
    rounds = {"r": -1}

    def fake_step(self, m, batch):
        if m is self.members[0]:
            rounds["r"] += 1
        calls.append((m.sae.cfg.k, rounds["r"], id(batch)))
        clock[0] += m.sae.cfg.k + [100, 50, 1, 7, 3][rounds["r"]]

    monkeypatch.setattr(train_module.Trainer, "_train_step", fake_step)
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock[0])
    batches = [Batch(torch.randn(8, 4), torch.randn(8, 4), "h") for _ in range(5)]
    configs = [SAEConfig(k=2, n_latents=8, beta=0), SAEConfig(k=5, n_latents=8, beta=0)]
    got = train_module.step_seconds(configs, batches, TrainConfig(tokens=64, batch_tokens=8))
    # rounds 0 and 1 (warm-up) dropped; medians of k + (1, 7, 3) = k + 3
    assert got == [5.0, 8.0]
    # interleaved, round by round, round r on batches[r]
    assert calls == [(k, r, id(batches[r])) for r in range(5) for k in (2, 5)]
    with pytest.raises(GsaeError, match="more than 2 batches, got 2"):
        train_module.step_seconds(configs, batches[:2], TrainConfig(tokens=64, batch_tokens=8))
