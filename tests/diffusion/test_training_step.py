"""The training objective: loss decreases, condition dropout rate, fixed validation draw, EMA."""

from __future__ import annotations

import pytest
import torch

from igconda.diffusion.schedule import NoiseSchedule
from igconda.diffusion.training import (
    amp_settings,
    diffusion_loss,
    drop_conditions,
    fixed_validation_draw,
    make_ema,
    train_step,
)
from tests.diffusion import tiny_model

T = 10


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(T, 1e-4, 2e-2)


def _batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 16, 16, generator=g)
    labels = torch.randint(1, 3, (n,), generator=g)
    return x0, labels


def test_loss_decreases_on_fixed_batch(schedule):
    model = tiny_model()
    x0, labels = _batch()
    t, noise = fixed_validation_draw(8, (1, 16, 16), T, seed=1)
    with torch.no_grad():
        before = diffusion_loss(model, schedule, x0, labels, cond_drop_prob=0.0, timesteps=t, noise=noise)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(2)
    losses = [
        train_step(model, optimizer, schedule, x0, labels, cond_drop_prob=0.15, generator=g)
        for _ in range(30)
    ]
    with torch.no_grad():
        after = diffusion_loss(model, schedule, x0, labels, cond_drop_prob=0.0, timesteps=t, noise=noise)
    assert all(isinstance(v, float) for v in losses)
    assert after.item() < 0.7 * before.item()
    assert sum(losses[-5:]) < sum(losses[:5])


def test_condition_dropping_rate():
    labels = torch.full((20000,), 2)
    g = torch.Generator().manual_seed(0)
    dropped = drop_conditions(labels, 0.15, g)
    rate = (dropped == 0).float().mean().item()
    assert abs(rate - 0.15) < 0.01  # 5 standard errors at n = 20000
    assert set(dropped.unique().tolist()) == {0, 2}
    assert (drop_conditions(labels, 0.0, g) == 2).all()
    assert torch.equal(labels, torch.full((20000,), 2))  # input untouched


def test_loss_sees_dropped_labels(schedule):
    """The model receives label 0 for about p of the samples."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, labels):
            seen.append(labels.clone())
            return torch.zeros_like(x)

    x0 = torch.zeros(4000, 1, 2, 2)
    labels = torch.ones(4000, dtype=torch.long)
    diffusion_loss(Spy(), schedule, x0, labels, cond_drop_prob=0.3,
                   generator=torch.Generator().manual_seed(0))
    assert abs((seen[0] == 0).float().mean().item() - 0.3) < 0.03


def test_fixed_validation_draw_is_reproducible(schedule):
    model = tiny_model()
    x0, labels = _batch()
    t1, n1 = fixed_validation_draw(8, (1, 16, 16), T, seed=7)
    t2, n2 = fixed_validation_draw(8, (1, 16, 16), T, seed=7)
    assert torch.equal(t1, t2) and torch.equal(n1, n2)
    assert t1.dtype == torch.int64 and n1.shape == (8, 1, 16, 16)
    assert int(t1.min()) >= 0 and int(t1.max()) < T
    with torch.no_grad():
        a = diffusion_loss(model, schedule, x0, labels, cond_drop_prob=0.0, timesteps=t1, noise=n1)
        b = diffusion_loss(model, schedule, x0, labels, cond_drop_prob=0.0, timesteps=t2, noise=n2)
        # A fresh random draw gives a different value: the fixed draw is what makes it comparable.
        c = diffusion_loss(model, schedule, x0, labels, cond_drop_prob=0.0,
                           generator=torch.Generator().manual_seed(99))
    assert a.item() == b.item()
    assert a.item() != c.item()
    _, n3 = fixed_validation_draw(8, (1, 16, 16), T, seed=8)
    assert not torch.equal(n1, n3)


def test_generator_makes_train_step_reproducible(schedule):
    x0, labels = _batch()
    results = []
    for _ in range(2):
        model = tiny_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(3)
        results.append([train_step(model, opt, schedule, x0, labels, cond_drop_prob=0.15, generator=g)
                        for _ in range(3)])
    assert results[0] == results[1]


def test_ema_tracks_weights(schedule):
    model = tiny_model()
    assert make_ema(model, 0.0) is None
    ema = make_ema(model, 0.9)
    start = [p.detach().clone() for p in ema.module.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x0, labels = _batch()
    for _ in range(3):
        train_step(model, opt, schedule, x0, labels, cond_drop_prob=0.0, ema=ema)
    # EMA weights moved, but lag behind the live weights.
    ema_params = [p.detach() for p in ema.module.parameters()]
    live = [p.detach() for p in model.parameters()]
    moved = sum(float((e - s).abs().sum()) for e, s in zip(ema_params, start, strict=True))
    lag = sum(float((e - p).abs().sum()) for e, p in zip(ema_params, live, strict=True))
    assert moved > 0 and lag > 0
    assert int(ema.n_averaged) == 3
    with pytest.raises(ValueError, match="decay"):
        make_ema(model, 1.0)


def test_amp_settings_on_cpu_follow_the_bf16_units(monkeypatch):
    monkeypatch.setenv("IGCONDA_CPU_BF16", "0")
    assert amp_settings("cpu") == (None, None)
    monkeypatch.setenv("IGCONDA_CPU_BF16", "1")
    assert amp_settings("cpu") == (torch.bfloat16, None)
    assert amp_settings("cpu", enabled=False) == (None, None)


def test_bf16_train_step_on_cpu_close_to_fp32(schedule):
    """A bf16-autocast step on the CPU moves the weights like an fp32 step (loss within 2 %)."""
    x0, labels = _batch()
    losses = {}
    for dtype in (None, torch.bfloat16):
        model = tiny_model()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        generator = torch.Generator().manual_seed(0)
        losses[dtype] = [train_step(model, opt, schedule, x0, labels, cond_drop_prob=0.15,
                                    amp_dtype=dtype, generator=generator) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses[torch.bfloat16])))
    for fp32, bf16 in zip(losses[None], losses[torch.bfloat16], strict=True):
        assert abs(bf16 - fp32) <= 0.02 * fp32


def test_invalid_inputs(schedule):
    model = tiny_model()
    x0, labels = _batch(4)
    with pytest.raises(ValueError, match="x0 must be"):
        diffusion_loss(model, schedule, x0[:, 0], labels, cond_drop_prob=0.1)
    with pytest.raises(ValueError, match="labels must have shape"):
        diffusion_loss(model, schedule, x0, labels[:2], cond_drop_prob=0.1)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        diffusion_loss(model, schedule, x0, labels, cond_drop_prob=1.0)
    with pytest.raises(ValueError, match="timesteps must have shape"):
        diffusion_loss(model, schedule, x0, labels, cond_drop_prob=0.1, timesteps=torch.zeros(3))
    with pytest.raises(ValueError, match="noise shape"):
        diffusion_loss(model, schedule, x0, labels, cond_drop_prob=0.1, noise=torch.zeros(4, 1, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_step_mixed_precision_on_gpu(schedule):
    model = tiny_model().cuda()
    x0, labels = _batch()
    amp_dtype, scaler = amp_settings("cuda")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = [train_step(model, opt, schedule, x0.cuda(), labels.cuda(), cond_drop_prob=0.15,
                         amp_dtype=amp_dtype, scaler=scaler) for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
    with pytest.raises(ValueError, match="GradScaler"):
        train_step(model, opt, schedule, x0.cuda(), labels.cuda(), cond_drop_prob=0.1,
                   amp_dtype=torch.float16, scaler=None)
