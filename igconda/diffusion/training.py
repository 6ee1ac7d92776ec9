"""The DDPM training objective with classifier-free guidance (paper §2.3), pure PyTorch.

Notation (<variable name> -> <symbol in the paper>):

- ``x0`` -> x_0, a clean slice; ``labels`` -> c ∈ {1 healthy, 2 unhealthy}; 0 -> ∅ (unconditional)
- ``timesteps`` -> t ~ U{0, …, T − 1}; ``noise`` -> ε ~ N(0, I)
- ``model(x_t, t, c)`` -> ε_θ(x_t, t, c), the predicted noise
- ``cond_drop_prob`` -> p_uncond: c is replaced by ∅ with this probability (0.15 in the paper), so
  one network learns both ε_θ(x_t, t, c) and ε_θ(x_t, t, ∅) for guidance at inference
- loss -> ‖ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t, c)‖² averaged over pixels and batch (Ho et al. Eq. 14)

Nothing here knows about Ray: :mod:`ray_jobs.train` wraps the model in DDP and calls
:func:`train_step` per batch, and :func:`diffusion_loss` with a :func:`fixed_validation_draw` for
validation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from igconda.diffusion.schedule import NoiseSchedule
from igconda.models.unet import UNCONDITIONAL
from igconda.precision import autocast, autocast_dtype


def _check_batch(x0: torch.Tensor, labels: torch.Tensor) -> None:
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (B, C, H, W), got shape {tuple(x0.shape)}")
    if labels.ndim != 1 or labels.shape[0] != x0.shape[0]:
        raise ValueError(f"labels must have shape ({x0.shape[0]},), got {tuple(labels.shape)}")


def _draw_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    # A generator only draws on its own device; draw there, then move to the data's device.
    return generator.device if generator is not None else fallback


def drop_conditions(
    labels: torch.Tensor, cond_drop_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by 0 (unconditional) independently with probability ``cond_drop_prob``.

    Args:
        labels: (B,) integer class tokens.
        cond_drop_prob: p in [0, 1).
        generator: optional RNG for reproducible draws.

    Returns:
        (B,) long labels, a new tensor.
    """
    if not 0.0 <= cond_drop_prob < 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
    labels = labels.long()
    # Draw even when p == 0 so that the RNG stream (and so every later draw) does not depend on p.
    u = torch.rand(labels.shape, generator=generator, device=_draw_device(generator, labels.device))
    drop = u.to(labels.device) < cond_drop_prob
    return torch.where(drop, torch.full_like(labels, UNCONDITIONAL), labels)


def diffusion_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    cond_drop_prob: float,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE of one batch, with condition dropout.

    Random draws, in this order and from ``generator`` when given: timesteps (unless given), noise
    (unless given), the condition-drop mask. For a validation loss that is comparable across epochs,
    pass the same ``timesteps`` and ``noise`` every time (see :func:`fixed_validation_draw`) and
    ``cond_drop_prob=0.0``, which makes the loss a deterministic function of the weights.

    Args:
        model: ``model(x_t (B,1,H,W), t (B,), labels (B,)) -> ε̂ (B,1,H,W)``, e.g.
            :class:`igconda.models.ConditionalUNet` (or its DDP wrapper).
        schedule: the noise schedule the model is trained with.
        x0: (B, 1, H, W) clean images.
        labels: (B,) class tokens (1 healthy, 2 unhealthy).
        cond_drop_prob: probability of replacing a label by 0 (0.15 in the paper).
        generator: optional RNG for the draws.
        timesteps: optional (B,) integer timesteps in [0, T).
        noise: optional (B, 1, H, W) ε.

    Returns:
        Scalar float32 loss (computed in float32 even under autocast).
    """
    _check_batch(x0, labels)
    batch, device = x0.shape[0], x0.device
    draw_on = _draw_device(generator, device)
    if timesteps is None:
        timesteps = torch.randint(
            0, schedule.num_train_timesteps, (batch,), generator=generator, device=draw_on
        )
    elif timesteps.shape != (batch,):
        raise ValueError(f"timesteps must have shape ({batch},), got {tuple(timesteps.shape)}")
    timesteps = timesteps.to(device).long()
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=draw_on, dtype=torch.float32)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    noise = noise.to(device=device, dtype=x0.dtype)
    labels = drop_conditions(labels.to(device), cond_drop_prob, generator)

    x_t = schedule.add_noise(x0, noise, timesteps)
    predicted = model(x_t, timesteps, labels)
    return F.mse_loss(predicted.float(), noise.float())


def fixed_validation_draw(
    num_samples: int, shape: tuple[int, ...], num_train_timesteps: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed (timesteps, noise) draw per validation sample, reproducible from ``seed``.

    Index the result by each sample's position in the validation set (or any stable per-sample
    index) so that every epoch, and every worker, scores a sample with the same t and ε.

    Args:
        num_samples: N, the number of validation samples.
        shape: one sample's shape, e.g. (1, H, W).
        num_train_timesteps: T.
        seed: RNG seed.

    Returns:
        timesteps (N,) int64 in [0, T) and noise (N, *shape) float32, on the CPU.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.randint(0, num_train_timesteps, (num_samples,), generator=generator)
    noise = torch.randn((num_samples, *shape), generator=generator, dtype=torch.float32)
    return timesteps, noise


def amp_settings(
    device: torch.device | str, enabled: bool = True
) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """The mixed-precision settings for :func:`train_step` on ``device``.

    The dtype follows :func:`igconda.precision.autocast_dtype`: bf16 on GPUs that support it and
    on CPUs with bf16 matrix units (no scaler needed: bf16 has float32's range), fp16 with a
    ``GradScaler`` on older GPUs (fp16 gradients underflow without one), plain fp32 elsewhere or
    when ``enabled`` is False.

    Returns:
        (amp_dtype, scaler): pass both to :func:`train_step`.
    """
    dtype = autocast_dtype(device, enabled)
    if dtype == torch.float16:
        return dtype, torch.amp.GradScaler("cuda")
    return dtype, None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    cond_drop_prob: float,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    ema: AveragedModel | None = None,
) -> float:
    """One optimisation step on one batch: forward, backward, optimizer step (and EMA update).

    Args:
        model: the (possibly DDP-wrapped) noise-prediction network, put in train mode here.
        optimizer: e.g. ``torch.optim.Adam(model.parameters(), lr)``.
        schedule: the noise schedule.
        x0: (B, 1, H, W) clean images, on the model's device.
        labels: (B,) class tokens.
        cond_drop_prob: probability of training a sample unconditionally.
        scaler: a ``torch.amp.GradScaler``; required with ``amp_dtype=torch.float16``.
        amp_dtype: autocast dtype of the network (``torch.bfloat16`` or ``torch.float16``);
            None = fp32. See :func:`amp_settings`. The loss is reduced in float32.
        generator: optional RNG for timesteps, noise and condition dropping.
        ema: optional :func:`make_ema` average, updated after the optimizer step.

    Returns:
        The batch loss as a Python float.
    """
    if amp_dtype == torch.float16 and scaler is None:
        raise ValueError("fp16 autocast needs a torch.amp.GradScaler (see amp_settings)")
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(x0.device, amp_dtype):
        loss = diffusion_loss(
            model, schedule, x0, labels, cond_drop_prob=cond_drop_prob, generator=generator
        )
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if ema is not None:
        ema.update_parameters(getattr(model, "module", model))
    return float(loss.detach())


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights, or None when ``decay`` is 0.

    Built on ``torch.optim.swa_utils`` (``AveragedModel`` + ``get_ema_multi_avg_fn``); update it
    after each optimizer step with ``ema.update_parameters(model)`` (done by :func:`train_step`
    when passed) and use ``ema.module`` for validation and inference. Pass the unwrapped module,
    not its DDP wrapper.

    Args:
        model: the network to average (deep-copied; the copy lives on the same device).
        decay: EMA decay in [0, 1); 0 disables EMA, as ``TrainConfig.ema_decay`` does.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    if decay == 0.0:
        return None
    return AveragedModel(
        getattr(model, "module", model),
        multi_avg_fn=get_ema_multi_avg_fn(decay),
        use_buffers=True,
    )
