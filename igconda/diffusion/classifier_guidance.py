"""Healthy counterfactuals by DDIM with classifier guidance: the DPM + CG baseline (paper §3.3).

After Wolleb et al. 2022 ("Diffusion models for medical anomaly detection"), the baseline
IgCONDA-PET compares against: an UNCONDITIONAL diffusion model (the same UNet as IgCONDA with
``model.conditioning: none``) and a separate classifier of noised slices p_φ(y | x_t, t)
(:class:`igconda.models.noisy_classifier.NoisyClassifier`). A slice x_0 is encoded to noise level
D with the deterministic DDIM encoder (:func:`igconda.diffusion.ddim.ddim_encode`, no
guidance), then decoded back with the noise prediction shifted along the classifier's gradient
towards "healthy" (Dhariwal & Nichol 2021, §4.2, the DDIM form of classifier guidance):

    ε̂ = ε_θ(x_t, t) − scale · √(1 − ᾱ_t) · ∇_{x_t} log p_φ(healthy | x_t, t)

The anomaly map is |x_0 − x̂_0| clipped to [0, 1] (``dpm_cg``, the paper's; the baseline's
anomaly method is :class:`igconda.baselines.dpm_classifier_guidance.DPMClassifierGuidanceMethod`).

Why the shift lowers unhealthy evidence: the DDIM step predicts x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t,
so subtracting scale · √(1 − ᾱ_t) · ∇ log p from ε moves x̂_0 by + scale · (1 − ᾱ_t) / √ᾱ_t ·
∇ log p: up the classifier's healthy log-probability, most at high noise, hardly at all near t = 0.

Notation: ``noise_level`` D, ``stride`` s, ``abar[t]`` ᾱ_t and the grid τ = (0, s, …, D) as in
:mod:`igconda.diffusion.ddim`; ``scale`` is Dhariwal & Nichol's gradient scale s (named
``scale`` here because s is the stride). The paper's baseline uses D = 200 and scale 6.

Reuse, not copies: the decode is :func:`igconda.diffusion.ddim.unconditional_walk` on the
descending grid with a ``guide`` that shifts ε before each :func:`~igconda.diffusion.ddim.
ddim_step`; at scale 0 no guide is passed, so the decode IS the unguided DDIM decode
(``ddim_decode(..., guidance_scale=0)``), bit for bit. Cost per slice: D/s DPM evaluations to
encode, D/s to decode, plus D/s forward + backward passes of the (small) classifier.

What is built: the classifier and its training functions (:mod:`igconda.diffusion.
classifier_training`), the unconditional DPM (``model.conditioning: none``, trained by
:mod:`igconda.diffusion.training` and :class:`igconda.train_loop.TrainingSession` unchanged: the
UNet ignores the labels), this guided decode and the ``dpm_cg`` anomaly method with its
classifier checkpoint. What remains (issue 10): a Ray Train job for the classifier (per epoch:
:func:`~igconda.diffusion.classifier_training.train_classifier_epoch`); tuning D and scale on the
tune split with the Ray Tune job (``tuning/``), beside IgCONDA's (D, w); and the comparison stage
that scores ``dpm_cg`` with the other methods on the test split.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from igconda.diffusion.counterfactual import anomaly_map
from igconda.diffusion.ddim import NoiseGuide, ddim_encode, timestep_grid, unconditional_walk
from igconda.diffusion.schedule import NoiseSchedule
from igconda.models.noisy_classifier import class_indices
from igconda.models.unet import HEALTHY

#: The paper's DPM + CG settings (§3.3): noise level D and gradient scale.
PAPER_NOISE_LEVEL, PAPER_SCALE = 200, 6.0


def guidance_gradient(
    classifier: nn.Module, x: torch.Tensor, t: int, target_label: int = HEALTHY
) -> torch.Tensor:
    """∇_x log p_φ(target | x, t) of each slice.

    One backward pass of the batch's summed log-probabilities gives each slice its own gradient,
    because in eval mode the classifier treats slices independently (GroupNorm and attention
    are per slice; dropout is off).

    Args:
        classifier: ``classifier(x (B,1,H,W), t (B,)) -> (B, 2)`` logits, in eval mode.
        x: (B, 1, H, W) samples at grid level t (inference tensors are fine: copied here).
        t: the timestep of ``x``.
        target_label: schema label of the class to move towards (1 healthy).

    Returns:
        (B, 1, H, W) float32 gradient.
    """
    target = int(class_indices(torch.tensor([target_label]))[0])
    timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    # Gradients even when a caller runs everything under inference mode (as the DDIM decoders
    # do): inside it, autograd records nothing, and an inference tensor (what ddim_encode
    # returns) cannot require grad, so the input is copied into a fresh leaf outside it.
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().float().clone().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, timesteps).float(), dim=1)
        (grad,) = torch.autograd.grad(log_probs[:, target].sum(), x_in)
    return grad


def classifier_guide(
    classifier: nn.Module, schedule: NoiseSchedule, scale: float, target_label: int = HEALTHY
) -> NoiseGuide:
    """The ``guide`` of :func:`~igconda.diffusion.ddim.unconditional_walk` for classifier guidance:
    ``guide(x, t, ε) = ε − scale · √(1 − ᾱ_t) · ∇_x log p_φ(target | x, t)``."""
    abar = schedule.alphas_cumprod.tolist()  # float64 → Python floats, as ddim_step uses them

    def guide(x: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        grad = guidance_gradient(classifier, x, t, target_label)
        return eps - (scale * math.sqrt(1.0 - abar[t])) * grad.to(eps.dtype)

    return guide


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) \
            or scale < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


@torch.no_grad()
def classifier_guided_decode(
    model: nn.Module,
    classifier: nn.Module,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise_level: int,
    stride: int,
    scale: float,
    target_label: int = HEALTHY,
    amp: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM decoding x_D → x̂_0 of the unconditional DPM with classifier guidance.

    Walks τ = D, D − s, …, 0 (the grid of :func:`~igconda.diffusion.ddim.ddim_encode`), shifting
    ε_θ(x, τ) by the classifier's gradient before each step. Runs under ``no_grad`` (not inference
    mode): each step needs one gradient of the classifier w.r.t. its input.

    Args:
        model: the unconditional DPM, ``model(x, t, labels)`` (labels ignored or 0 = ∅), eval mode.
        classifier: the noisy classifier, in eval mode (its dropout would make decoding random).
        x_t: (B, 1, H, W) latents at level D.
        schedule: the noise schedule both networks were trained with.
        noise_level: D, 0 < D < T, a multiple of ``stride``.
        stride: s >= 1, the same as for encoding.
        scale: gradient scale >= 0; 0 is the unguided decode.
        target_label: 1 = healthy (the counterfactual), 2 = unhealthy.
        amp: autocast the DPM where it pays (:mod:`igconda.precision`); the classifier and its
            gradient stay float32.
        callback: optional ``callback(t_reached, x)`` after each step.

    Returns:
        (B, 1, H, W) float32 x̂_0 (not clipped).
    """
    if not isinstance(x_t, torch.Tensor) or x_t.ndim != 4 or not x_t.dtype.is_floating_point:
        raise ValueError(f"x_t must be a floating-point (B, 1, H, W) tensor, "
                         f"got {getattr(x_t, 'shape', x_t)}")
    scale = _check_scale(scale)
    class_indices(torch.tensor([target_label]))  # refuses anything but 1 or 2 before the walk
    if classifier.training:
        raise ValueError("put the classifier in eval mode (classifier.eval()): its dropout would "
                         "make the guided decode random")
    levels = timestep_grid(noise_level, stride,
                           num_train_timesteps=schedule.num_train_timesteps).flip(0).tolist()
    guide = classifier_guide(classifier, schedule, scale, target_label) if scale > 0 else None
    return unconditional_walk(model, x_t, schedule, levels, amp=amp, guide=guide, callback=callback)


def classifier_guided_counterfactual(
    model: nn.Module,
    classifier: nn.Module,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise_level: int,
    stride: int,
    scale: float,
    target_label: int = HEALTHY,
    amp: bool = False,
) -> torch.Tensor:
    """Encode each slice to D without guidance, decode it with classifier guidance.

    Args:
        model: the unconditional DPM, in eval mode.
        classifier: the noisy classifier, in eval mode.
        x0: (B, 1, H, W) slices in [0, 1].
        schedule: the noise schedule both networks were trained with.
        noise_level: D; stride: s; scale: the gradient scale (see :func:`classifier_guided_decode`).
        target_label: 1 = healthy counterfactual (default), 2 = unhealthy.
        amp: autocast the DPM where it pays.

    Returns:
        (B, 1, H, W) counterfactual x̂_0, in ``x0``'s dtype.
    """
    # Check the decode's own arguments before the (long) encode, which checks x0, D and s.
    _check_scale(scale)
    class_indices(torch.tensor([target_label]))
    x_t = ddim_encode(model, x0, schedule, noise_level=noise_level, stride=stride, amp=amp)
    x_hat = classifier_guided_decode(model, classifier, x_t, schedule, noise_level=noise_level,
                                     stride=stride, scale=scale, target_label=target_label, amp=amp)
    return x_hat.to(x0.dtype)


def dpm_cg_map(x0: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The baseline's anomaly map |x_0 − x̂_0| clipped to [0, 1], (B, 1, H, W) float32: the
    ``abs`` map of :func:`igconda.diffusion.counterfactual.anomaly_map` of the classifier-guided decode."""
    return anomaly_map(x0, x_hat, "abs")
