"""Deterministic DDIM on an explicit timestep grid: encoding and (guided) decoding (paper §2.4).

A slice x_0 is encoded (DDIM inversion, η = 0) up to noise level D with the unconditional model
(:func:`ddim_encode`), then decoded back to level 0 with classifier-free guidance towards a
target class (:func:`ddim_decode`; :func:`ddim_decode_pair` decodes one latent guided and
unguided in one batched pass per step). :func:`unconditional_walk` is the shared loop of ε_θ(·, ∅)
moves that the encoder, the w = 0 decode and the classifier-guided decode
(:mod:`igconda.diffusion.classifier_guidance`) walk. The counterfactual of a slice and its anomaly
maps are built from these in :mod:`igconda.diffusion.counterfactual`; which (D, s, w) are valid
is :mod:`igconda.ddim_grid`'s rule.

Notation (<variable name> -> <symbol in Song et al. 2021 (DDIM) / the IgCONDA-PET paper>):

- ``noise_level`` -> D (the paper's "noise level"), in training-timestep units, 0 < D < T
- ``stride`` -> s; the explicit grid is τ = (0, s, 2s, …, D), so D/s steps each way
- ``t`` -> τ_k, a grid timestep; ``abar[t]`` -> ᾱ_t (``NoiseSchedule.alphas_cumprod``)
- ``eps`` -> ε_θ(x_t, t, c); label 0 -> c = ∅ (unconditional); ``target_label`` -> c
- ``guidance_scale`` -> w; guided noise ε̃ = ε_θ(x_t, t, ∅) + w · (ε_θ(x_t, t, c) − ε_θ(x_t, t, ∅))
- ``x0_pred`` -> f_θ(x_t) = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, "predicted x_0" (DDIM Eq. 12)
- one step from level t to level t' (either direction, η = 0):
  x_t' = √ᾱ_t' · f_θ(x_t) + √(1 − ᾱ_t') · ε (DDIM Eq. 12 with σ = 0; Eq. 13 as an ODE)

Why not MONAI's ``DDIMScheduler``: ``reversed_step`` moves by T // num_inference_steps and indexes
``alphas_cumprod[t + step]`` unguarded, so a strided encode raises an IndexError once t + s ≥ T,
and the MONAI anomaly-detection tutorial strides by setting fewer inference steps while its loop
still advances t by one, so the timestep the network sees and the ᾱ that moves the sample are in
different units. Here the grid is explicit, in training-timestep units, and encode and decode use
the same grid, which is what makes the inversion consistent. At s = 1 each step equals MONAI's
``reversed_step`` / ``step`` (with ``set_timesteps(T)``, η = 0, ``clip_sample=False``); the tests
check it.

Boundary convention (as MONAI's at s = 1): x_0 is identified with grid level t = 0, whose ᾱ_0 =
1 − β_0 < 1. The first encode step uses ε_θ(x_0, 0, ∅) and ᾱ_0 as the "current" level, and the last
decode step lands on level 0 (MONAI's ``step`` at t = 1 has prev_timestep = 0 ≥ 0, so its
``final_alpha_cumprod`` is never used). Encode and decode agree, so nothing is lost at the ends.

The predicted x_0 is never clipped: clipping makes the encoder non-invertible (a slice with
values near the clip range no longer maps back to itself), which shows up as false anomalies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from igconda.ddim_grid import check_counterfactual_params, check_grid, check_integer
from igconda.diffusion.schedule import NoiseSchedule
from igconda.models.unet import HEALTHY, UNCONDITIONAL
from igconda.precision import autocast, autocast_dtype


def check_images(x: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` unless ``x`` is a floating-point (B, 1, H, W) tensor."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, 1, H, W) tensor, got {shape}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_call(
    x: torch.Tensor,
    name: str,
    schedule: NoiseSchedule,
    noise_level: int,
    stride: int,
    guidance: tuple[float, int] | None = None,
) -> int:
    """The argument checks of encode / decode / counterfactual; returns the step count D / s.

    ``guidance``: (w, target_label) for the guided calls, None for encoding. (D, s, w) follow
    :mod:`igconda.ddim_grid`, with D < the schedule's T.
    """
    check_images(x, name)
    if guidance is None:
        return check_grid(noise_level, stride, schedule.num_train_timesteps)
    guidance_scale, target_label = guidance
    steps = check_counterfactual_params(noise_level, stride, guidance_scale,
                                        schedule.num_train_timesteps)
    if check_integer("target_label", target_label) not in (0, 1, 2):
        raise ValueError(f"target_label must be 0, 1 (healthy) or 2 (unhealthy), got {target_label}")
    return steps


def timestep_grid(
    noise_level: int, stride: int, *, num_train_timesteps: int | None = None
) -> torch.Tensor:
    """The explicit DDIM grid τ = (0, s, 2s, …, D).

    Args:
        noise_level: D in training-timestep units, > 0 and a multiple of ``stride``.
        stride: s >= 1.
        num_train_timesteps: T; when given, D < T is checked too.

    Returns:
        (D/s + 1,) int64 timesteps, increasing.
    """
    check_grid(noise_level, stride, num_train_timesteps)
    return torch.arange(0, noise_level + 1, stride, dtype=torch.int64)


def ddim_step(
    x: torch.Tensor, eps: torch.Tensor, abar_from: float, abar_to: float
) -> torch.Tensor:
    """One deterministic DDIM move (η = 0) from level ᾱ_from to level ᾱ_to, either direction.

    x_to = √ᾱ_to · (x − √(1 − ᾱ_from) ε) / √ᾱ_from + √(1 − ᾱ_to) · ε, computed as
    c_x · x + c_ε · ε with the two coefficients in float64.

    Args:
        x: (B, 1, H, W) sample at level ᾱ_from.
        eps: (B, 1, H, W) (guided) noise prediction at that level.
        abar_from: ᾱ of the current level.
        abar_to: ᾱ of the target level.

    Returns:
        (B, 1, H, W) sample at level ᾱ_to, in ``x``'s dtype.
    """
    coef_x = math.sqrt(abar_to / abar_from)
    coef_eps = math.sqrt(1.0 - abar_to) - math.sqrt(abar_to * (1.0 - abar_from) / abar_from)
    return x * coef_x + eps.to(x.dtype) * coef_eps


def _predict(model: nn.Module, x: torch.Tensor, t: int, labels: torch.Tensor, amp: bool) -> torch.Tensor:
    timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    with autocast(x.device, autocast_dtype(x.device, amp)):
        eps = model(x, timesteps, labels)
    # The trajectory stays in float32 even when the network runs in half precision.
    return eps.float()


@torch.inference_mode()
def ddim_encode(
    model: nn.Module,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise_level: int,
    stride: int,
    amp: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 → x_D with the unconditional model (label 0).

    D / s network evaluations: at each grid level τ_k = 0, s, …, D − s, predict
    ε_θ(x_{τ_k}, τ_k, ∅) and move to level τ_{k+1}.

    Args:
        model: ``model(x (B,1,H,W), t (B,), labels (B,)) -> ε (B,1,H,W)``, in eval mode.
        x0: (B, 1, H, W) slices (the training intensity range, [0, 1] after preprocessing).
        schedule: the noise schedule the model was trained with.
        noise_level: D in training-timestep units, 0 < D < T, a multiple of ``stride``.
        stride: s >= 1.
        amp: run the network under autocast where it pays (bf16 on GPUs that support it and
            on CPUs with bf16 units, fp16 on older GPUs; :mod:`igconda.precision`); the
            trajectory stays float32.
        callback: optional ``callback(t_reached, x)`` after each step (progress, debugging).

    Returns:
        (B, 1, H, W) float32 x_D.
    """
    steps = check_call(x0, "x0", schedule, noise_level, stride)
    return unconditional_walk(model, x0, schedule, range(0, steps * stride + 1, stride), amp=amp,
                              callback=callback)


@torch.inference_mode()
def ddim_decode(
    model: nn.Module,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise_level: int,
    stride: int,
    guidance_scale: float,
    target_label: int = HEALTHY,
    amp: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM decoding x_D → x̂_0 with classifier-free guidance towards a class.

    At each grid level τ_k = D, D − s, …, s the guided noise is

        ε̃ = ε_θ(x, τ_k, ∅) + w · (ε_θ(x, τ_k, c) − ε_θ(x, τ_k, ∅)),

    the reference code's form (w = 3 in the paper's experiments). The paper's Eq. 9 writes
    ε_c + w (ε_c − ε_∅), which is the same rule with w − 1 in place of w: the paper's w = 2 is
    this w = 3. Here w = 0 is the unconditional model and w = 1 the purely conditional one. The
    pair (∅, c) runs as ONE forward pass on the batch concatenated with itself, so decoding costs
    D / s forward passes of batch 2B (2 · D / s network evaluations). At w = 0 the conditional
    half would be multiplied by 0, so only ε_∅ is evaluated (batch B, exactly the same result).

    Args:
        model: the noise-prediction network, in eval mode.
        x_t: (B, 1, H, W) noisy slices at level D (from :func:`ddim_encode`).
        schedule: the noise schedule the model was trained with.
        noise_level: D, the level ``x_t`` is at.
        stride: s, the same as for encoding.
        guidance_scale: w >= 0.
        target_label: c, 1 = healthy (the counterfactual), 2 = unhealthy.
        amp: autocast for the network where it pays (see :func:`ddim_encode`).
        callback: optional ``callback(t_reached, x)`` after each step.

    Returns:
        (B, 1, H, W) float32 x̂_0 (not clipped).
    """
    steps = check_call(x_t, "x_t", schedule, noise_level, stride, (guidance_scale, target_label))
    if guidance_scale == 0:
        return unconditional_walk(model, x_t, schedule, _descending(steps, stride), amp=amp,
                                  callback=callback)
    abar = schedule.alphas_cumprod.tolist()
    x = x_t.float()
    batch = x.shape[0]
    labels = torch.cat([
        torch.full((batch,), UNCONDITIONAL, dtype=torch.long, device=x.device),
        torch.full((batch,), target_label, dtype=torch.long, device=x.device),
    ])
    for k in range(steps, 0, -1):
        t, t_prev = k * stride, (k - 1) * stride
        eps_uncond, eps_cond = _predict(model, torch.cat([x, x]), t, labels, amp).chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x = ddim_step(x, eps, abar[t], abar[t_prev])
        if callback is not None:
            callback(t_prev, x)
    return x


#: ``guide(x, t, eps) -> eps``: a correction of the noise prediction ε (B, 1, H, W) of the
#: sample x (B, 1, H, W) at grid level t, applied before the DDIM move (classifier guidance,
#: :mod:`igconda.diffusion.classifier_guidance`).
NoiseGuide = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def unconditional_walk(
    model: nn.Module,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    levels: Sequence[int],
    *,
    amp: bool = False,
    guide: NoiseGuide | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM moves with ε_θ(x, τ, ∅) alone along grid ``levels`` (either direction).

    Encoding walks τ = 0, s, …, D and the w = 0 decode walks D, D − s, …, 0: the same step
    from each level to the next (len(levels) − 1 evaluations of batch B). ``guide``, when
    given, replaces each ε by ``guide(x, τ, ε)`` before the move; the move is :func:`ddim_step`
    either way, so a guided decode walks exactly the grid and maths of the unguided one.

    Runs under the caller's grad mode (the public decoders use inference mode; a guide that
    needs gradients w.r.t. x must be called outside it and enable them itself).

    Args:
        model: ``model(x, t, labels)``, called with label 0 (∅).
        x: (B, 1, H, W) sample at level ``levels[0]``.
        schedule: the noise schedule the model was trained with.
        levels: grid timesteps in walking order, e.g. ``range(0, D + 1, s)``.
        amp: autocast for the network (see :func:`ddim_encode`).
        guide: optional correction of ε at each level.
        callback: optional ``callback(t_reached, x)`` after each step.

    Returns:
        (B, 1, H, W) float32 sample at level ``levels[-1]``.
    """
    abar = schedule.alphas_cumprod.tolist()
    x = x.float()
    labels = torch.full((x.shape[0],), UNCONDITIONAL, dtype=torch.long, device=x.device)
    for t, t_next in zip(levels[:-1], levels[1:], strict=True):
        eps = _predict(model, x, t, labels, amp)
        if guide is not None:
            eps = guide(x, t, eps)
        x = ddim_step(x, eps, abar[t], abar[t_next])
        if callback is not None:
            callback(t_next, x)
    return x


def _descending(steps: int, stride: int) -> range:
    """The decode grid D, D − s, …, 0 (D = steps · s)."""
    return range(steps * stride, -1, -stride)


@torch.inference_mode()
def ddim_decode_pair(
    model: nn.Module,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise_level: int,
    stride: int,
    guidance_scale: float,
    target_label: int = HEALTHY,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one latent twice on the same grid: guided towards c (x̂_w) and unguided (x̂_∅).

    The two trajectories separate after the first step, so they need their own noise
    predictions: each step runs ONE forward pass of batch 3B, (x_w, ∅), (x_w, c), (x_∅, ∅), i.e.
    3 · D / s network evaluations for both decodes instead of 2 · D / s + D / s in two loops
    over the network. At w = 0 both are the same trajectory; it is decoded once and returned
    twice, so x̂_w and x̂_∅ are then identical to the last bit.

    Args:
        model: the noise-prediction network, in eval mode.
        x_t: (B, 1, H, W) latents at level D (from :func:`ddim_encode`).
        schedule: the noise schedule the model was trained with.
        noise_level: D, the level ``x_t`` is at.
        stride: s, the same as for encoding.
        guidance_scale: w >= 0 (the reference code's form, see :func:`ddim_decode`).
        target_label: c, 1 = healthy (the counterfactual), 2 = unhealthy.
        amp: autocast for the network where it pays (see :func:`ddim_encode`).

    Returns:
        ``(x_hat_guided, x_hat_unguided)``, both (B, 1, H, W) float32, not clipped.
    """
    steps = check_call(x_t, "x_t", schedule, noise_level, stride, (guidance_scale, target_label))
    if guidance_scale == 0:
        x_hat = unconditional_walk(model, x_t, schedule, _descending(steps, stride), amp=amp)
        return x_hat, x_hat.clone()
    abar = schedule.alphas_cumprod.tolist()
    guided = x_t.float()
    unguided = guided.clone()
    batch = guided.shape[0]
    device = guided.device
    labels = torch.cat([
        torch.full((batch,), UNCONDITIONAL, dtype=torch.long, device=device),
        torch.full((batch,), target_label, dtype=torch.long, device=device),
        torch.full((batch,), UNCONDITIONAL, dtype=torch.long, device=device),
    ])
    for k in range(steps, 0, -1):
        t, t_prev = k * stride, (k - 1) * stride
        eps_u, eps_c, eps_0 = _predict(model, torch.cat([guided, guided, unguided]), t, labels,
                                       amp).chunk(3)
        guided = ddim_step(guided, eps_u + guidance_scale * (eps_c - eps_u), abar[t], abar[t_prev])
        unguided = ddim_step(unguided, eps_0, abar[t], abar[t_prev])
    return guided, unguided
