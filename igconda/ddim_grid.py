"""The (D, s, w) rule of a DDIM counterfactual, in one torch-free place (configs check it too).

A counterfactual encodes a slice to noise level D and decodes it back on the explicit grid
τ = 0, s, 2s, …, D (:mod:`igconda.diffusion.ddim`), guided with scale w. So:

- D and s are integers (NumPy integers too: they come from Tune search spaces and DataFrames);
- 0 < D < T, T the timesteps the network was trained on (it has never seen t ≥ T);
- s ≥ 1 and s divides D, so that encode and decode walk the same grid;
- w is a finite number ≥ 0 (the reference code's form; 0 is the unconditional decode).

Every caller checks through :func:`check_grid` / :func:`check_guidance_scale` /
:func:`check_counterfactual_params`: the DDIM functions, the inference predictor, the
study config's ``infer``, ``tune`` and ``baselines.dpm_cg_*`` keys (the inference job's resolved
settings are a validated config), and the tuning search space.
They differ only in how the message names the values (:class:`Names`: a config's keys or the
function's arguments), so every one of them refuses the same (D, s, w) with the same words.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Names:
    """How the messages name D, s, w and T: the arguments (default) or a config's keys."""

    noise_level: str = "noise_level"
    stride: str = "stride"
    guidance_scale: str = "guidance_scale"
    timesteps: str = "the model's training timesteps"


#: The names of the DDIM functions' arguments.
ARGUMENTS = Names()


def check_integer(name: str, value: object) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer (not a bool)."""
    # numbers.Integral admits NumPy integers (from Tune search spaces or DataFrames), not floats.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_grid(noise_level: object, stride: object, num_train_timesteps: int | None = None, *,
               names: Names = ARGUMENTS) -> int:
    """Check (D, s) (and D < T when T is given); return the number of steps D / s each way.

    Raises:
        ValueError: naming the value (as ``names`` says) and the fix.
    """
    noise_level = check_integer(f"{names.noise_level} D", noise_level)
    stride = check_integer(f"{names.stride} s", stride)
    if noise_level <= 0:
        raise ValueError(f"{names.noise_level} D={noise_level} must be > 0")
    if stride < 1:
        raise ValueError(f"{names.stride} s={stride} must be >= 1 (DDIM steps every s timesteps)")
    if num_train_timesteps is not None and noise_level >= num_train_timesteps:
        raise ValueError(
            f"{names.noise_level} D={noise_level} must be < {names.timesteps} "
            f"T={num_train_timesteps} (the network has never seen t >= T)"
        )
    if noise_level % stride != 0:
        raise ValueError(
            f"{names.noise_level} D={noise_level} must be a multiple of {names.stride} s={stride} "
            f"so that encode and decode share the grid 0, s, ..., D (try D="
            f"{noise_level - noise_level % stride} or a stride that divides {noise_level})"
        )
    return noise_level // stride


def check_guidance_scale(guidance_scale: object, *, names: Names = ARGUMENTS) -> float:
    """``guidance_scale`` as a float; ValueError unless it is a finite number >= 0."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"{names.guidance_scale} w={guidance_scale!r} must be a finite number "
                         ">= 0 (0: the unconditional decode)")
    return float(guidance_scale)


def check_counterfactual_params(noise_level: object, stride: object, guidance_scale: object,
                                num_train_timesteps: int | None = None, *,
                                names: Names = ARGUMENTS) -> int:
    """The whole rule: :func:`check_grid` then :func:`check_guidance_scale`; returns D / s."""
    steps = check_grid(noise_level, stride, num_train_timesteps, names=names)
    check_guidance_scale(guidance_scale, names=names)
    return steps


def network_evaluations(noise_level: int, stride: int, *, unguided_decode: bool = False) -> int:
    """Network evaluations per slice for one counterfactual: 3 · D / s, or 4 · D / s with the
    unguided decode.

    D / s unconditional evaluations to encode plus D / s guided pairs (two evaluations each, run
    as one batched forward pass) to decode: 3 · D / s, the reference's procedure (s = 1, D = 400:
    1200). igconda's predictor and tuning also decode the same encoding at w = 0 (the control and
    the guidance maps), one more evaluation per step batched with the pair: 4 · D / s
    (``unguided_decode=True``).
    """
    return (4 if unguided_decode else 3) * check_grid(noise_level, stride)
