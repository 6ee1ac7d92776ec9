"""The healthy counterfactual of a slice and the anomaly maps made from it (paper §2.4).

:func:`counterfactual` encodes a slice x_0 to noise level D with the unconditional model and
decodes it back with classifier-free guidance towards a target class (1, healthy); what the
decoder changes is what the model thinks makes the slice unhealthy, so the paper's anomaly map is
|x_0 − x̂_0| (:func:`anomaly_map`).

That map also holds the coarse round trip's own error (at large strides most of its score), so
:func:`counterfactual_pair` decodes the same latent guided (x̂_w) and unguided (x̂_∅, w = 0) on the
same grid, batched in one forward pass per step, and :func:`anomaly_maps` offers maps of what
guidance alone changed beside the paper's, plus the w = 0 controls |x_0 − x̂_∅| and
max(x_0 − x̂_∅, 0). The kinds are named in :mod:`igconda.map_kinds`; the DDIM walks, notation and
boundary conventions are :mod:`igconda.diffusion.ddim`'s.
"""

from __future__ import annotations

import torch
from torch import nn

from igconda.diffusion.ddim import (
    check_call,
    check_images,
    ddim_decode,
    ddim_decode_pair,
    ddim_encode,
)
from igconda.diffusion.schedule import NoiseSchedule
from igconda.map_kinds import CONTROL, CONTROL_HOT, MAP_KINDS
from igconda.models.unet import HEALTHY

AnomalyKind = str  # one of MAP_KINDS


def counterfactual_pair(
    model: nn.Module,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise_level: int,
    stride: int,
    guidance_scale: float,
    target_label: int = HEALTHY,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode once, decode guided and unguided: ``(x̂_w, x̂_∅)`` of each slice.

    4 · D / s network evaluations per slice (D / s to encode, 3 · D / s for the pair; 2 · D / s
    at w = 0), against 6 · D / s for two separate counterfactuals
    (:func:`igconda.ddim_grid.network_evaluations` with ``unguided_decode=True``).

    Args:
        model: the noise-prediction network, in eval mode.
        x0: (B, 1, H, W) slices.
        schedule: the noise schedule the model was trained with.
        noise_level: D, 0 < D < T, a multiple of ``stride``.
        stride: s >= 1.
        guidance_scale: w >= 0.
        target_label: 1 = healthy counterfactual (default), 2 = unhealthy.
        amp: autocast for the network where it pays.

    Returns:
        ``(x_hat_guided, x_hat_unguided)``, both (B, 1, H, W) in ``x0``'s dtype.
    """
    check_call(x0, "x0", schedule, noise_level, stride, (guidance_scale, target_label))
    x_t = ddim_encode(model, x0, schedule, noise_level=noise_level, stride=stride, amp=amp)
    guided, unguided = ddim_decode_pair(
        model, x_t, schedule, noise_level=noise_level, stride=stride,
        guidance_scale=guidance_scale, target_label=target_label, amp=amp,
    )
    return guided.to(x0.dtype), unguided.to(x0.dtype)


def counterfactual(
    model: nn.Module,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise_level: int,
    stride: int,
    guidance_scale: float,
    target_label: int = HEALTHY,
    amp: bool = False,
) -> torch.Tensor:
    """The counterfactual x̂_0 of each slice: encode to D unconditionally, decode with guidance.

    3 · D / s network evaluations per slice (see :func:`igconda.ddim_grid.network_evaluations`).

    Args:
        model: the noise-prediction network, in eval mode.
        x0: (B, 1, H, W) slices.
        schedule: the noise schedule the model was trained with.
        noise_level: D, 0 < D < T, a multiple of ``stride``.
        stride: s >= 1 (1 reproduces the reference).
        guidance_scale: w >= 0, in the reference code's form (see :func:`~igconda.diffusion.ddim.ddim_decode`).
        target_label: 1 = healthy counterfactual (default), 2 = unhealthy.
        amp: autocast for the network where it pays.

    Returns:
        (B, 1, H, W) counterfactual x̂_0, in ``x0``'s dtype.
    """
    # Validate everything, w included, before the (long) encode: a bad w fails in milliseconds.
    check_call(x0, "x0", schedule, noise_level, stride, (guidance_scale, target_label))
    x_t = ddim_encode(model, x0, schedule, noise_level=noise_level, stride=stride, amp=amp)
    x_hat = ddim_decode(
        model, x_t, schedule, noise_level=noise_level, stride=stride,
        guidance_scale=guidance_scale, target_label=target_label, amp=amp,
    )
    return x_hat.to(x0.dtype)


def anomaly_map(x0: torch.Tensor, x_hat: torch.Tensor, kind: AnomalyKind = "abs") -> torch.Tensor:
    """The anomaly map of slices and their counterfactuals, clipped to [0, 1].

    ``"abs"``: |x_0 − x̂_0|, the paper's map. ``"hot"``: max(x_0 − x̂_0, 0), only where the slice is
    brighter than its healthy counterfactual (PET lesions are hot); reported beside the paper's
    map, never instead of it.

    Args:
        x0: (B, 1, H, W) slices in [0, 1].
        x_hat: (B, 1, H, W) counterfactuals.
        kind: "abs" or "hot".

    Returns:
        (B, 1, H, W) float32 map in [0, 1].
    """
    check_images(x0, "x0")
    check_images(x_hat, "x_hat")
    if x0.shape != x_hat.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and x_hat {tuple(x_hat.shape)} differ in shape")
    diff = x0.float() - x_hat.float()
    if kind == "abs":
        diff = diff.abs()
    elif kind == "hot":
        diff = diff.clamp(min=0.0)
    else:
        raise ValueError(f"anomaly map kind must be 'abs' or 'hot', got {kind!r}")
    return diff.clamp(0.0, 1.0)


def anomaly_maps(
    x0: torch.Tensor,
    x_hat: torch.Tensor,
    x_hat_unguided: torch.Tensor,
    kinds: tuple[str, ...] = MAP_KINDS,
) -> dict[str, torch.Tensor]:
    """Every requested map kind of one guided/unguided decode pair, plus the w = 0 control.

    With x̂_w the guided and x̂_∅ the unguided decode of the same encoding
    (:func:`counterfactual_pair`), all clipped to [0, 1]:

    - ``"abs"``: |x − x̂_w|, the paper's map;
    - ``"hot"``: max(x − x̂_w, 0), where the slice is brighter than its healthy counterfactual;
    - ``"guidance"``: max(x̂_∅ − x̂_w, 0), what guidance towards healthy removed. The round
      trip's own error (present in both decodes) cancels, which |x − x̂_w| cannot do;
    - ``"guidance_abs"``: |x̂_∅ − x̂_w|, everything guidance changed;
    - :data:`CONTROL` (``"w0"``, always present): |x − x̂_∅|, the round trip's error alone;
    - :data:`CONTROL_HOT` (``"w0_hot"``, always present): max(x − x̂_∅, 0), its one-sided form,
      the control of ``"hot"``.

    Args:
        x0: (B, 1, H, W) slices in [0, 1].
        x_hat: (B, 1, H, W) guided counterfactuals x̂_w.
        x_hat_unguided: (B, 1, H, W) unguided decodes x̂_∅ of the same latents.
        kinds: a subset of :data:`MAP_KINDS`.

    Returns:
        ``{kind: (B, 1, H, W) float32 map}`` for each kind, ``"w0"`` and ``"w0_hot"``.
    """
    for name, x in (("x0", x0), ("x_hat", x_hat), ("x_hat_unguided", x_hat_unguided)):
        check_images(x, name)
        if x.shape != x0.shape:
            raise ValueError(f"{name} {tuple(x.shape)} and x0 {tuple(x0.shape)} differ in shape")
    unknown = [k for k in kinds if k not in MAP_KINDS]
    if unknown:
        raise ValueError(f"unknown anomaly map kind(s) {unknown}; known: {list(MAP_KINDS)}")
    x, guided, unguided = x0.float(), x_hat.float(), x_hat_unguided.float()
    raw = {
        "abs": lambda: (x - guided).abs(),
        "hot": lambda: (x - guided).clamp(min=0.0),
        "guidance": lambda: (unguided - guided).clamp(min=0.0),
        "guidance_abs": lambda: (unguided - guided).abs(),
    }
    maps = {kind: raw[kind]().clamp(0.0, 1.0) for kind in kinds}
    maps[CONTROL] = (x - unguided).abs().clamp(0.0, 1.0)
    maps[CONTROL_HOT] = (x - unguided).clamp(0.0, 1.0)
    return maps
