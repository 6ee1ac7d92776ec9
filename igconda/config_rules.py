"""The allowed values, ranges and cross-field rules of a study config (:mod:`igconda.config`).

:func:`validate` runs when a :class:`~igconda.config.StudyConfig` is built (loaded, changed with
``replace``, or read back from a checkpoint) and raises ValueError naming the key, the value and
the rule; the config turns that into its :class:`~igconda.config.ConfigError`, prefixed with the
file. The counterfactual's (D, s, w) rule is :mod:`igconda.ddim_grid`'s and the ``baselines``
section's :func:`igconda.baselines.settings.validate_baselines`: both are called from here.
A new key's range check goes here, into its section's block (the order of the blocks is
the order in which problems are reported).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from igconda.baselines.settings import validate_baselines
from igconda.ddim_grid import Names, check_counterfactual_params, check_grid, check_guidance_scale
from igconda.map_kinds import MAP_KINDS

if TYPE_CHECKING:
    from igconda.config import StudyConfig

#: The class-conditioning paths of ``model.conditioning`` (see :class:`~igconda.config.ModelConfig`).
CONDITIONINGS = ("cross_attention", "class_embedding", "both")
#: The other value of ``model.conditioning``: no class input (the unconditional DPM of the
#: DPM + classifier guidance baseline, paper §3.3); kept apart from :data:`CONDITIONINGS`, whose
#: every path must make the class matter.
UNCONDITIONED = "none"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(cfg: StudyConfig) -> None:
    """Every rule of the sections and between them; ValueError naming the offending key."""
    p = cfg.preprocess
    _check(all(s > 0 for s in p.spacing_mm), "preprocess.spacing_mm must be positive")
    _check(all(c > 0 for c in p.crop_size), "preprocess.crop_size must be positive")
    _check(all(o > 0 for o in p.output_size), "preprocess.output_size must be positive")
    _check(0 < p.train_fraction < 1, "preprocess.train_fraction must be in (0, 1)")
    _check(0 <= p.valid_fraction < 1, "preprocess.valid_fraction must be in [0, 1)")
    # Training selects its best checkpoint by the validation loss: with no valid patients it would
    # train a whole epoch and then fail on the workers (train_loop: "the valid split is empty").
    _check(p.valid_fraction > 0,
           f"preprocess.valid_fraction {p.valid_fraction} leaves no validation patients, which training "
           f"needs to select its checkpoint: set it > 0 (the paper's is 0.056)")
    _check(p.train_fraction + p.valid_fraction < 1, "preprocess: train + valid fractions must be < 1")
    _check(p.tune_per_cohort >= 0, "preprocess.tune_per_cohort must be >= 0")
    _check(p.output_size[0] == p.output_size[1], "preprocess.output_size: slices must be square")
    _check(p.axial_extent in ("whole", "crop"),
           f"preprocess.axial_extent {p.axial_extent!r} must be 'whole' or 'crop'")
    _check(p.fov_centre in ("body", "array"),
           f"preprocess.fov_centre {p.fov_centre!r} must be 'body' or 'array'")
    _check(p.num_cpus_per_volume >= 0,
           f"preprocess.num_cpus_per_volume {p.num_cpus_per_volume} must be >= 0 (Ray CPUs per task)")
    m = cfg.model
    _check(len(m.attention) == len(m.channels) and set(m.attention) <= {"0", "1"},
           f"model.attention {m.attention!r} must have one 0/1 digit per level of channels {m.channels}")
    _check(all(c % m.norm_num_groups == 0 for c in m.channels),
           f"model.channels {m.channels} must be multiples of norm_num_groups {m.norm_num_groups}")
    # MONAI's ResnetBlock adds the timestep (+ class) embedding as a per-channel bias right before
    # a GroupNorm. With one channel per group the norm subtracts that bias exactly, so the network
    # never sees t nor the class embedding (measured: outputs at t = 50 and t = 400 differ by
    # 1e-6 relative, with channels = groups = 32), and the class token only leaks in through
    # zero-padded borders. Two or more channels per group keep the differences between them.
    _check(all(c // m.norm_num_groups >= 2 for c in m.channels),
           f"model.norm_num_groups {m.norm_num_groups} leaves one channel per GroupNorm group at "
           f"channels {m.channels}: that norm erases the timestep and class embeddings; use at most "
           f"{min(m.channels) // 2} groups (e.g. {max(1, min(m.channels) // 4)})")
    _check(all(c % m.num_head_channels == 0 for c in m.channels),
           f"model.channels {m.channels} must be multiples of num_head_channels {m.num_head_channels}")
    _check(m.conditioning in (*CONDITIONINGS, UNCONDITIONED),
           f"model.conditioning {m.conditioning!r} must be one of "
           f"{', '.join((*CONDITIONINGS, UNCONDITIONED))}")
    downsample = 2 ** (len(m.channels) - 1)
    _check(p.output_size[0] % downsample == 0,
           f"preprocess.output_size {p.output_size[:2]} must be divisible by {downsample} for {len(m.channels)} levels")
    t = cfg.train
    _check(t.epochs >= 1, "train.epochs must be >= 1")
    _check(t.batch_size >= 1, "train.batch_size must be >= 1")
    _check(t.lr > 0, "train.lr must be positive")
    _check(t.num_train_timesteps >= 2, "train.num_train_timesteps must be >= 2")
    _check(0 < t.beta_start < t.beta_end < 1, "train: need 0 < beta_start < beta_end < 1")
    _check(0 <= t.cond_drop_prob < 1, "train.cond_drop_prob must be in [0, 1)")
    _check(0 <= t.ema_decay < 1, "train.ema_decay must be in [0, 1)")
    _check(t.valid_every >= 1 and t.checkpoint_every >= 1, "train: valid_every and checkpoint_every must be >= 1")
    _check(t.num_workers >= 1, "train.num_workers must be >= 1")
    # Ray Train's FailureConfig: -1 restarts for ever, 0 never; other negatives mean nothing.
    _check(t.max_failures >= -1, f"train.max_failures {t.max_failures} must be >= 0 (restarts "
           f"after a worker failure) or -1 (restart for ever)")
    _check(t.materialize_max_mb >= 0, "train.materialize_max_mb must be >= 0 (0 = always stream)")
    _check(t.max_timestep == 0 or 2 <= t.max_timestep <= t.num_train_timesteps,
           f"train.max_timestep {t.max_timestep} must be 0 (all) or in [2, {t.num_train_timesteps}]")
    trained = t.max_timestep or t.num_train_timesteps
    # The counterfactual's (D, s, w) rule is igconda.ddim_grid's, against the timesteps trained.
    timesteps = "train.max_timestep" if t.max_timestep else "train.num_train_timesteps"
    i = cfg.infer
    check_counterfactual_params(i.noise_level, i.stride, i.guidance_scale, trained,
                                names=Names("infer.noise_level", "infer.stride",
                                            "infer.guidance_scale", timesteps))
    _check(i.batch_size >= 1 and i.concurrency >= 1, "infer: batch_size and concurrency must be >= 1")
    for key in ("num_gpus_per_actor", "num_cpus_per_actor"):
        _check(getattr(i, key) >= 0, f"infer.{key} {getattr(i, key)} must be >= 0 (Ray resources "
                                     f"per inference actor)")
    _check(i.torch_threads >= 0, f"infer.torch_threads {i.torch_threads} must be >= 0 (0 = one per CPU "
                                 f"the actor reserves)")
    _check(0 <= i.memory_fraction < 1, f"infer.memory_fraction {i.memory_fraction} must be in [0, 1) (0 = off)")
    _check(i.map_kind in MAP_KINDS, f"infer.map_kind {i.map_kind!r} must be one of {list(MAP_KINDS)}")
    _check(0 < i.threshold <= 1, f"infer.threshold τ={i.threshold} must be in (0, 1] (maps are in [0, 1])")
    u = cfg.tune
    _check(len(u.noise_levels) > 0 and len(u.guidance_scales) > 0, "tune: empty search space")
    tune_names = Names("tune.noise_levels", "tune.stride", "tune.guidance_scales", timesteps)
    for d in u.noise_levels:
        check_grid(d, u.stride, trained, names=tune_names)
    for w in u.guidance_scales:
        check_guidance_scale(w, names=tune_names)
    _check(u.num_samples >= 1,
           f"tune.num_samples {u.num_samples} must be >= 1 (trials per grid point or random draws)")
    for key in ("gpus_per_trial", "cpus_per_trial"):
        _check(getattr(u, key) >= 0, f"tune.{key} {getattr(u, key)} must be >= 0 (Ray resources per trial)")
    _check(u.search in ("grid", "random"), f"tune.search {u.search!r} must be 'grid' or 'random'")
    _check(u.max_slices >= 0, "tune.max_slices must be >= 0")
    _check(len(u.map_kinds) > 0 and set(u.map_kinds) <= set(MAP_KINDS)
           and len(set(u.map_kinds)) == len(u.map_kinds),
           f"tune.map_kinds {list(u.map_kinds)} must be distinct values of {list(MAP_KINDS)}")
    for section in ("phantoms", "preprocess", "train"):
        seed = getattr(cfg, section).seed
        # numpy's generators refuse negative seeds, deep inside a Ray task.
        _check(seed >= 0, f"{section}.seed {seed} must be >= 0")
    _check(cfg.phantoms.negative_controls >= 0, "phantoms.negative_controls must be >= 0")
    _check(cfg.phantoms.scan_length in ("anatomical", "fixed"),
           f"phantoms.scan_length {cfg.phantoms.scan_length!r} must be 'anatomical' or 'fixed'")
    _check(all(n >= 1 for n in cfg.phantoms.cohorts.values()), "phantoms.cohorts: counts must be >= 1")
    validate_baselines(cfg.baselines, cfg.train.num_train_timesteps, _check)
