"""Strided DDIM: agreement with MONAI at s = 1, the closed form when strided, inversion,
guidance, batching of the guided pair, anomaly maps and invalid arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from igconda.ddim_grid import network_evaluations
from igconda.diffusion.counterfactual import anomaly_map, counterfactual, counterfactual_pair
from igconda.diffusion.ddim import ddim_decode, ddim_encode, ddim_step, timestep_grid
from igconda.diffusion.schedule import NoiseSchedule
from tests.diffusion import tiny_model

T = 50


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(T, 1e-4, 2e-2)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def monai_ddim() -> DDIMScheduler:
    scheduler = DDIMScheduler(num_train_timesteps=T, schedule="linear_beta", clip_sample=False)
    scheduler.set_timesteps(T)  # one training timestep per step: s = 1
    return scheduler


def _slices(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Smooth blobs in [0, 1] plus a little texture: slice-like, deterministic."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    blob = 0.3 + 0.5 * torch.exp(-3 * (xx**2 + yy**2))
    return (blob + 0.05 * torch.rand(batch, 1, 16, 16, generator=g)).clamp(0, 1)


class Recorder(torch.nn.Module):
    """Wraps a model and records (batch size, timesteps, labels) of each forward call."""

    def __init__(self, inner, force_label: int | None = None):
        super().__init__()
        self.inner, self.force_label, self.calls = inner, force_label, []

    def forward(self, x, t, labels):
        self.calls.append((x.shape[0], t.clone(), labels.clone()))
        if self.force_label is not None:
            labels = torch.full_like(labels, self.force_label)
        return self.inner(x, t, labels)


class Affine(torch.nn.Module):
    """A closed-form 'network': ε = 0.3 x + 0.01 t + 0.05 label (per pixel)."""

    def forward(self, x, t, labels):
        return 0.3 * x + 0.01 * t.view(-1, 1, 1, 1) + 0.05 * labels.view(-1, 1, 1, 1)


def test_timestep_grid_and_evaluations():
    assert timestep_grid(400, 20).tolist() == list(range(0, 401, 20))
    assert timestep_grid(np.int64(40), np.int32(20)).tolist() == [0, 20, 40]  # e.g. from Tune
    assert timestep_grid(4, 1).tolist() == [0, 1, 2, 3, 4]
    assert timestep_grid(6, 6).tolist() == [0, 6]
    assert network_evaluations(400, 1) == 1200  # the reference's 3 · D
    assert network_evaluations(400, 20) == 60


def test_encode_equals_monai_reversed_step(model, schedule, monai_ddim):
    x0 = _slices()
    D = 4
    ours = ddim_encode(model, x0, schedule, noise_level=D, stride=1)
    x = x0.clone()
    with torch.no_grad():
        for t in range(D):  # the reference's loop
            eps = model(x, torch.full((2,), t), torch.zeros(2, dtype=torch.long))
            x, _ = monai_ddim.reversed_step(eps, t, x)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=2e-5)
    # One step alone, from an arbitrary level: our update equals reversed_step.
    eps = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    a = schedule.alphas_cumprod
    for t in (0, 17, T - 2):
        expected, _ = monai_ddim.reversed_step(eps, t, x0)
        torch.testing.assert_close(ddim_step(x0, eps, a[t].item(), a[t + 1].item()), expected,
                                   rtol=1e-5, atol=1e-5)


def test_decode_equals_monai_step(model, schedule, monai_ddim):
    x_t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    D, w = 4, 3.0
    ours = ddim_decode(model, x_t, schedule, noise_level=D, stride=1, guidance_scale=w)
    x = x_t.clone()
    with torch.no_grad():
        for t in range(D, 0, -1):  # separate (unbatched) unconditional and conditional passes
            tt = torch.full((2,), t)
            eps_u = model(x, tt, torch.zeros(2, dtype=torch.long))
            eps_c = model(x, tt, torch.ones(2, dtype=torch.long))
            x, _ = monai_ddim.step(eps_u + w * (eps_c - eps_u), t, x, eta=0.0)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    eps = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    a = schedule.alphas_cumprod
    for t in (1, 23, T - 1):
        expected, _ = monai_ddim.step(eps, t, x_t, eta=0.0)
        torch.testing.assert_close(ddim_step(x_t, eps, a[t].item(), a[t - 1].item()), expected,
                                   rtol=1e-5, atol=1e-5)


def _closed_form(x, eps, a_from, a_to):
    x0_pred = (x - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
    return math.sqrt(a_to) * x0_pred + math.sqrt(1 - a_to) * eps


@pytest.mark.parametrize("D, s", [(9, 3), (48, 16), (49, 7)])
def test_strided_steps_equal_closed_form(schedule, D, s):
    """Strided grids, including ones reaching T - 1 where MONAI's reversed_step would index past T."""
    net, a = Affine(), schedule.alphas_cumprod.tolist()
    # Values up to 2.5: a clipped predicted x_0 (MONAI's default clip_sample) would break this.
    x0 = 2.5 * _slices(seed=4).double()
    w, c = 2.5, 1
    expected = x0.clone()
    for t in range(0, D, s):
        expected = _closed_form(expected, 0.3 * expected + 0.01 * t, a[t], a[t + s])
    encoded = ddim_encode(net, x0, schedule, noise_level=D, stride=s)
    torch.testing.assert_close(encoded.double(), expected, rtol=1e-5, atol=1e-5)
    x = encoded.double()
    for t in range(D, 0, -s):
        eps_u, eps_c = 0.3 * x + 0.01 * t, 0.3 * x + 0.01 * t + 0.05 * c
        x = _closed_form(x, eps_u + w * (eps_c - eps_u), a[t], a[t - s])
    decoded = ddim_decode(net, encoded, schedule, noise_level=D, stride=s, guidance_scale=w)
    torch.testing.assert_close(decoded.double(), x, rtol=1e-5, atol=1e-5)


def test_monai_reversed_step_cannot_stride_to_the_top(schedule):
    """Why ddim.py has its own loop: MONAI's reversed_step indexes past T once t + s >= T."""
    scheduler = DDIMScheduler(num_train_timesteps=T, schedule="linear_beta", clip_sample=False)
    scheduler.set_timesteps(T // 10)  # step size 10
    x = _slices()
    with pytest.raises(IndexError):
        scheduler.reversed_step(torch.zeros_like(x), T - 5, x)
    # Ours encodes to the highest level the grid allows without touching ᾱ beyond T - 1.
    assert ddim_encode(Affine(), x, schedule, noise_level=T - 1, stride=7).isfinite().all()


def test_inversion_reconstructs_input_at_w0(model, schedule):
    x0 = _slices(batch=3)
    D = 4
    x_t = ddim_encode(model, x0, schedule, noise_level=D, stride=1)
    x_hat = ddim_decode(model, x_t, schedule, noise_level=D, stride=1, guidance_scale=0.0)
    moved = (x_t - x0).abs().max().item()
    error = (x_hat - x0).abs().max().item()
    assert moved > 0.05  # the encoding really went somewhere ...
    assert error < 0.01 and error < 0.15 * moved  # ... and came back
    # With guidance the decoder leaves the inversion path: the counterfactual differs.
    guided = counterfactual(model, x0, schedule, noise_level=D, stride=1, guidance_scale=5.0)
    assert (guided - x_hat).abs().max().item() > 3 * error


@pytest.mark.parametrize("w, label", [(0.0, 0), (1.0, 1)])
def test_guidance_endpoints(model, schedule, w, label):
    """w = 0 is the unconditional model, w = 1 the purely conditional one."""
    x_t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    guided = ddim_decode(model, x_t, schedule, noise_level=4, stride=2, guidance_scale=w)
    single = ddim_decode(Recorder(model, force_label=label), x_t, schedule, noise_level=4,
                         stride=2, guidance_scale=0.0)
    torch.testing.assert_close(guided, single, rtol=1e-5, atol=1e-5)
    other = ddim_decode(Recorder(model, force_label=1 - label), x_t, schedule, noise_level=4,
                        stride=2, guidance_scale=0.0)
    assert (guided - other).abs().max().item() > 1e-3


def test_target_label_is_used(model, schedule):
    x_t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    rec = Recorder(model)
    healthy = ddim_decode(rec, x_t, schedule, noise_level=4, stride=2, guidance_scale=3.0)
    unhealthy = ddim_decode(model, x_t, schedule, noise_level=4, stride=2, guidance_scale=3.0,
                            target_label=2)
    assert rec.calls[0][2].tolist() == [0, 0, 1, 1]
    assert (healthy - unhealthy).abs().max().item() > 1e-3


def test_guided_pair_is_one_batched_pass(model, schedule):
    B, D, s = 2, 12, 4
    rec = Recorder(model)
    counterfactual(rec, _slices(batch=B), schedule, noise_level=D, stride=s, guidance_scale=3.0)
    encode, decode = rec.calls[: D // s], rec.calls[D // s:]
    assert len(rec.calls) == 2 * D // s
    assert [int(t[0]) for _, t, _ in encode] == [0, 4, 8]
    assert all(n == B and (lab == 0).all() for n, _, lab in encode)
    assert [int(t[0]) for _, t, _ in decode] == [12, 8, 4]
    for n, t, lab in decode:
        assert n == 2 * B
        assert lab.tolist() == [0] * B + [1] * B
        assert (t == t[0]).all()
    assert sum(n for n, _, _ in rec.calls) == network_evaluations(D, s) * B


def test_anomaly_map():
    x0 = torch.tensor([0.9, 0.2, 0.5, 1.0]).view(1, 1, 2, 2)
    x_hat = torch.tensor([0.4, 0.5, 0.5, -0.5]).view(1, 1, 2, 2)
    torch.testing.assert_close(anomaly_map(x0, x_hat).flatten(), torch.tensor([0.5, 0.3, 0.0, 1.0]))
    torch.testing.assert_close(anomaly_map(x0, x_hat, kind="hot").flatten(),
                               torch.tensor([0.5, 0.0, 0.0, 1.0]))
    assert anomaly_map(x0, x_hat).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="kind"):
        anomaly_map(x0, x_hat, kind="square")
    with pytest.raises(ValueError, match="differ in shape"):
        anomaly_map(x0, x_hat[..., :1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_level=T), "must be < the model's training timesteps"),
        (dict(noise_level=T + 10, stride=5), "must be < the model's training timesteps"),
        (dict(noise_level=0), "must be > 0"),
        (dict(noise_level=-4), "must be > 0"),
        (dict(stride=0), "stride s=0 must be >= 1"),
        (dict(noise_level=10, stride=4), "multiple of stride"),
        (dict(noise_level=4.0), "must be an integer"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(target_label=3), "target_label"),
        (dict(x0=torch.zeros(16, 16)), r"\(B, 1, H, W\)"),
        (dict(x0=torch.zeros(1, 1, 1, 16, 16)), r"\(B, 1, H, W\)"),
        (dict(x0=torch.zeros(1, 1, 16, 16, dtype=torch.long)), "floating-point"),
    ],
)
def test_invalid_arguments(model, schedule, kwargs, match):
    args = dict(x0=_slices(), noise_level=4, stride=1, guidance_scale=3.0, target_label=1)
    args.update(kwargs)
    rec = Recorder(model)
    with pytest.raises(ValueError, match=match):
        counterfactual(rec, args.pop("x0"), schedule, **args)
    assert rec.calls == []  # failed before any network evaluation


def test_invalid_grid_helpers():
    with pytest.raises(ValueError, match="multiple of stride"):
        timestep_grid(10, 3)
    with pytest.raises(ValueError, match="must be < the model's"):
        timestep_grid(10, 1, num_train_timesteps=10)
    with pytest.raises(ValueError, match="stride"):
        network_evaluations(10, 0)
    with pytest.raises(ValueError, match="x_t must be"):
        ddim_decode(Affine(), torch.zeros(2, 16, 16), NoiseSchedule.linear(10, 1e-4, 2e-2),
                    noise_level=2, stride=1, guidance_scale=1.0)


def test_runs_without_autograd_and_keeps_dtype(model, schedule):
    x0 = _slices().double()
    x_hat = counterfactual(model, x0, schedule, noise_level=2, stride=1, guidance_scale=3.0)
    assert x_hat.dtype == torch.float64 and not x_hat.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_amp_on_gpu_close_to_fp32(schedule):
    net = tiny_model().cuda()
    x0 = _slices().cuda()
    full = counterfactual(net, x0, schedule, noise_level=8, stride=2, guidance_scale=3.0)
    half = counterfactual(net, x0, schedule, noise_level=8, stride=2, guidance_scale=3.0, amp=True)
    assert (full - half).abs().max().item() < 0.05


def test_cpu_bf16_counterfactual_close_to_fp32(model, schedule, monkeypatch):
    """bf16 autocast of the network only: the counterfactual stays float32 and within 0.05."""
    x0 = _slices()
    full = counterfactual(model, x0, schedule, noise_level=8, stride=2, guidance_scale=3.0)
    monkeypatch.setenv("IGCONDA_CPU_BF16", "1")
    half = counterfactual(model, x0, schedule, noise_level=8, stride=2, guidance_scale=3.0, amp=True)
    assert half.dtype == torch.float32
    assert 0 < (full - half).abs().max().item() < 0.05


# ---- the guided/unguided pair and the map kinds -----------------------------------------------


def test_pair_decode_equals_two_separate_decodes_in_one_3b_pass(model, schedule):
    from igconda.diffusion.ddim import ddim_decode_pair

    B, D, s, w = 2, 12, 4, 3.0
    x_t = ddim_encode(model, _slices(batch=B, seed=3), schedule, noise_level=D, stride=s)
    rec = Recorder(model)
    guided, unguided = ddim_decode_pair(rec, x_t, schedule, noise_level=D, stride=s,
                                        guidance_scale=w)
    torch.testing.assert_close(guided, ddim_decode(model, x_t, schedule, noise_level=D, stride=s,
                                                   guidance_scale=w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unguided, ddim_decode(model, x_t, schedule, noise_level=D, stride=s,
                                                     guidance_scale=0.0), rtol=1e-5, atol=1e-5)
    assert (guided - unguided).abs().max().item() > 1e-3  # the trajectories really separate
    assert len(rec.calls) == D // s
    for n, t, labels in rec.calls:
        assert n == 3 * B and (t == t[0]).all()
        assert labels.tolist() == [0] * B + [1] * B + [0] * B


def test_pair_at_w0_is_one_trajectory_and_costs_one_pass_per_step(model, schedule):
    from igconda.diffusion.ddim import ddim_decode_pair

    x_t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    rec = Recorder(model)
    guided, unguided = ddim_decode_pair(rec, x_t, schedule, noise_level=4, stride=2,
                                        guidance_scale=0.0)
    assert torch.equal(guided, unguided)
    assert [n for n, _, _ in rec.calls] == [2, 2]


def test_map_kinds_shapes_ranges_and_w0_identities(model, schedule):
    from igconda.diffusion.counterfactual import anomaly_maps
    from igconda.map_kinds import CONTROL, CONTROL_HOT, MAP_KINDS

    x0 = _slices(batch=3, seed=4)
    kwargs = dict(noise_level=4, stride=2)
    guided, unguided = counterfactual_pair(model, x0, schedule, guidance_scale=5.0, **kwargs)
    maps = anomaly_maps(x0, guided, unguided)
    assert set(maps) == {*MAP_KINDS, CONTROL, CONTROL_HOT}
    for kind, m in maps.items():
        assert m.shape == x0.shape and m.dtype == torch.float32, kind
        assert m.min() >= 0 and m.max() <= 1, kind
    assert maps["guidance_abs"].max() > 1e-3
    torch.testing.assert_close(maps["abs"], (x0 - guided).abs().clamp(0, 1))
    torch.testing.assert_close(maps["guidance"], (unguided - guided).clamp(0, 1))
    assert (maps["hot"] <= maps["abs"]).all() and (maps["guidance"] <= maps["guidance_abs"]).all()
    # Deterministic: the same seedless DDIM run gives the same maps.
    again = anomaly_maps(x0, *counterfactual_pair(model, x0, schedule, guidance_scale=5.0, **kwargs))
    for kind in maps:
        assert torch.equal(maps[kind], again[kind]), kind
    # At w = 0 guidance changes nothing: the guidance maps are exactly 0, the control is abs.
    at0 = anomaly_maps(x0, *counterfactual_pair(model, x0, schedule, guidance_scale=0.0, **kwargs))
    assert not at0["guidance"].any() and not at0["guidance_abs"].any()
    assert torch.equal(at0[CONTROL], at0["abs"])
    assert at0["abs"].max() > 0  # the round trip's error is not zero: the control shows it
    # The control does not depend on w.
    torch.testing.assert_close(maps[CONTROL], at0[CONTROL], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown anomaly map kind"):
        anomaly_maps(x0, guided, unguided, kinds=("square",))


def test_one_sided_control_matches_the_hot_map_at_w0(model, schedule):
    """At w = 0 the hot map equals its own control max(x − x̂_∅, 0), as abs equals |x − x̂_∅|."""
    from igconda.diffusion.counterfactual import anomaly_maps, counterfactual_pair

    x0 = _slices()
    guided, unguided = counterfactual_pair(model, x0, schedule, noise_level=4, stride=2, guidance_scale=0.0)
    maps = anomaly_maps(x0, guided, unguided, ("abs", "hot"))
    torch.testing.assert_close(maps["hot"], maps["w0_hot"])
    torch.testing.assert_close(maps["abs"], maps["w0"])
    assert bool((maps["w0_hot"] <= maps["w0"] + 1e-7).all())


def test_guided_and_unguided_pair_costs_four_evaluations_per_step(model, schedule):
    """The predictor's and tuning's decode pair: D/s encode + 3 per decode step (the count the
    jobs and benchmarks report as evaluations per slice)."""
    B, D, s = 2, 12, 4
    rec = Recorder(model)
    counterfactual_pair(rec, _slices(batch=B), schedule, noise_level=D, stride=s, guidance_scale=3.0)
    assert sum(n for n, _, _ in rec.calls) == network_evaluations(D, s, unguided_decode=True) * B == 12 * B
