"""The Ray Tune search space over the noise level D and the guidance scale w (paper Fig. 5).

Two layouts of the same grid are offered, because they trade trial count for work shared:

- ``group_by_noise_level=False``: one trial per (D, w) pair — the most parallelism, each trial
  encodes its slices to level D and decodes once.
- ``group_by_noise_level=True`` (the driver's default for grid search): one trial per D that
  decodes every w. DDIM encoding with the unconditional model does not depend on w, so the
  encoding (D / s network evaluations per slice) is done once instead of once per w; decoding
  (2 D / s evaluations per slice, guided pair batched) is still done per w. The result is the
  same full D × w grid.

``search: random`` samples ``num_samples`` (D, w) pairs from the same discrete values (a cheaper
partial sweep; D stays a multiple of the stride by construction). Sampled pairs may repeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from igconda.config import ConfigError, TuneConfig
from igconda.ddim_grid import Names, check_grid, check_guidance_scale

#: Keys of a trial's ``config`` dict.
NOISE_LEVEL = "noise_level"
GUIDANCE_SCALE = "guidance_scale"
GUIDANCE_SCALES = "guidance_scales"

#: How :func:`validate_space`'s messages name D, s, w and T.
SPACE_NAMES = Names("tune.noise_levels", "tune.stride", "tune.guidance_scales",
                    "the checkpoint's training timesteps")


def validate_space(
    noise_levels: Sequence[int],
    guidance_scales: Sequence[float],
    stride: int,
    num_train_timesteps: int,
) -> None:
    """Check that every (D, w) of the space can be run by the DDIM counterfactual.

    The study config validates the tune section against its own ``train.num_train_timesteps``,
    but the search runs against a checkpoint whose T may differ (a tune YAML given beside a
    checkpoint), so the driver re-checks against the checkpoint's T. Each (D, s) and w is
    checked by :mod:`igconda.ddim_grid`'s rule, the one the config and the DDIM code apply.

    Args:
        noise_levels: candidate D values, in training-timestep units.
        guidance_scales: candidate w values (the reference code's form, w >= 0).
        stride: DDIM stride s; every D must be a multiple of it.
        num_train_timesteps: the checkpoint's T; every D must be < T.

    Raises:
        ConfigError: naming the offending value.
    """
    if not noise_levels:
        raise ConfigError("tune.noise_levels is empty")
    if not guidance_scales:
        raise ConfigError("tune.guidance_scales is empty")
    try:
        for d in noise_levels:
            check_grid(d, stride, num_train_timesteps, names=SPACE_NAMES)
        for w in guidance_scales:
            check_guidance_scale(w, names=SPACE_NAMES)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if len(set(noise_levels)) != len(noise_levels):
        raise ConfigError(f"tune.noise_levels has duplicates: {list(noise_levels)}")
    if len(set(guidance_scales)) != len(guidance_scales):
        raise ConfigError(f"tune.guidance_scales has duplicates: {list(guidance_scales)}")


def build_param_space(
    config: TuneConfig,
    num_train_timesteps: int,
    *,
    group_by_noise_level: bool = True,
) -> tuple[dict[str, Any], int]:
    """The ``param_space`` and ``num_samples`` for ``tune.Tuner``.

    Args:
        config: the study's tune section.
        num_train_timesteps: the checkpoint's T (see :func:`validate_space`).
        group_by_noise_level: for grid search, one trial per D that evaluates every w (shared
            encoding). Ignored by random search, whose trials are single sampled pairs.

    Returns:
        ``(param_space, num_samples)``. A grouped trial's config has ``noise_level`` and the full
        list ``guidance_scales``; any other trial's has ``noise_level`` and ``guidance_scale``.

    Raises:
        ConfigError: an invalid space or search name.
    """
    from ray import tune  # Ray only at the edge: igconda.config users need not import it

    validate_space(config.noise_levels, config.guidance_scales, config.stride, num_train_timesteps)
    noise_levels = [int(d) for d in config.noise_levels]
    scales = [float(w) for w in config.guidance_scales]
    if config.search == "grid":
        if group_by_noise_level:
            space = {NOISE_LEVEL: tune.grid_search(noise_levels), GUIDANCE_SCALES: scales}
        else:
            space = {NOISE_LEVEL: tune.grid_search(noise_levels),
                     GUIDANCE_SCALE: tune.grid_search(scales)}
        # The objective is deterministic (DDIM, fixed slices): repeating the grid adds nothing.
        return space, 1
    if config.search == "random":
        if config.num_samples < 1:
            raise ConfigError(f"tune.num_samples must be >= 1 for random search, got {config.num_samples}")
        space = {NOISE_LEVEL: tune.choice(noise_levels), GUIDANCE_SCALE: tune.choice(scales)}
        return space, config.num_samples
    raise ConfigError(f"tune.search {config.search!r} must be 'grid' or 'random'")


def grid_size(config: TuneConfig, *, group_by_noise_level: bool = True) -> tuple[int, int]:
    """``(number of trials, number of (D, w) evaluations)`` the search will run."""
    if config.search == "random":
        return config.num_samples, config.num_samples
    pairs = len(config.noise_levels) * len(config.guidance_scales)
    return (len(config.noise_levels) if group_by_noise_level else pairs), pairs


def trial_pairs(trial_config: dict[str, Any]) -> tuple[int, list[float]]:
    """``(D, [w, ...])`` that one trial evaluates, for either layout of the space."""
    if NOISE_LEVEL not in trial_config:
        raise KeyError(f"trial config has no {NOISE_LEVEL!r}: {trial_config}")
    if GUIDANCE_SCALES in trial_config:
        return int(trial_config[NOISE_LEVEL]), [float(w) for w in trial_config[GUIDANCE_SCALES]]
    if GUIDANCE_SCALE in trial_config:
        return int(trial_config[NOISE_LEVEL]), [float(trial_config[GUIDANCE_SCALE])]
    raise KeyError(f"trial config has neither {GUIDANCE_SCALE!r} nor {GUIDANCE_SCALES!r}: {trial_config}")
