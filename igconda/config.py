"""Study configuration: one frozen dataclass per stage, loaded from YAML and validated.

A YAML file has one optional mapping per section (``phantoms``, ``preprocess``, ``model``,
``train``, ``infer``, ``tune``, ``tracking``, ``baselines``; the last is declared in
:mod:`igconda.baselines.settings`); anything left out keeps the defaults below, which
are the paper's settings (Ahamed & Rahmim 2025, see ``configs/paper.yaml`` for section
references). Unknown keys and out-of-range values raise :class:`ConfigError` naming the file,
the key and the problem, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from igconda.baselines.settings import BaselinesConfig, validate_baselines
from igconda.io_utils import atomic_write
from igconda.map_kinds import MAP_KINDS

#: The class-conditioning paths of ``model.conditioning`` (see :class:`ModelConfig`).
CONDITIONINGS = ("cross_attention", "class_embedding", "both")
#: The other value of ``model.conditioning``: no class input (the unconditional DPM of the
#: DPM + classifier guidance baseline, paper §3.3); kept apart from :data:`CONDITIONINGS`, whose
#: every path must make the class matter.
UNCONDITIONED = "none"


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key and the problem."""


@dataclass(frozen=True)
class PhantomConfig:
    """Synthetic whole-body PET cohorts (``igconda.data.phantoms``)."""

    # cohort name -> number of patients; the external cohort is test-only.
    cohorts: dict[str, int] = field(
        default_factory=lambda: {
            "lymphoma": 10,
            "lung": 10,
            "melanoma": 10,
            "headneck": 10,
            "psma": 10,
            "sarcoma_ext": 6,
        }
    )
    negative_controls: int = 4
    shape: tuple[int, int, int] = (96, 96, 160)  # voxels (x, y, z); z only for scan_length "fixed"
    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    seed: int = 0
    # "anatomical": each patient's scan is as long as their body (vertex to mid-thigh, or to the
    # feet for cohorts whose disease reaches the legs; 0.8-2 m), so the number of slices varies;
    # "fixed": shape[2] slices with the body squeezed into them (0.6 m in older demos).
    scan_length: str = "anatomical"


@dataclass(frozen=True)
class PreprocessConfig:
    """Volume → slice transforms (paper §3.1) and the patient-level split."""

    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 3.0)
    # Field of view in voxels of spacing_mm. In-plane always; along z only for axial_extent
    # "crop", while "whole" uses crop_size[2] / output_size[2] as the output slice spacing.
    crop_size: tuple[int, int, int] = (192, 192, 288)
    output_size: tuple[int, int, int] = (64, 64, 96)
    # "whole": keep every axial slice (a per-patient number of slices of crop_size[2] *
    # spacing_mm[2] / output_size[2] mm); "crop": the paper's fixed centre crop of crop_size[2].
    axial_extent: str = "whole"
    # In-plane FOV centre: "body" (bounding box of the body in the axial projection) or "array"
    # (the array centre, as the paper's centre crop).
    fov_centre: str = "body"
    # Fractions of each internal cohort's patients; tune is then taken from test.
    train_fraction: float = 0.6
    valid_fraction: float = 0.1
    tune_per_cohort: int = 2
    seed: int = 0
    num_cpus_per_volume: float = 1.0
    # Multi-label masks (e.g. HECKTOR: 1 primary tumour, 2 lymph nodes): count every positive
    # integer label as lesion. Off by default, so an unexpected label is an error, not a lesion.
    binarize_mask: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """MONAI ``DiffusionModelUNet`` + class-token embedding (paper §2.2)."""

    channels: tuple[int, ...] = (64, 64, 64)
    # Variant name: one digit per level, 1 = attention; (011) is the paper's best.
    attention: str = "011"
    num_res_blocks: int = 1
    num_head_channels: int = 16
    embedding_dim: int = 64  # class token and cross-attention dimension
    # GroupNorm groups; every group must hold >= 2 channels (see validate: a one-channel group
    # erases the timestep and class embeddings, which MONAI adds as a per-channel bias).
    norm_num_groups: int = 32
    use_flash_attention: bool = False
    # How the class token reaches the network: "cross_attention" (the paper's: one token attended
    # to by the attention levels and MONAI's mid block), "class_embedding" (MONAI's
    # num_class_embeds: a learned vector added to the timestep embedding, so every residual block
    # sees the class; the unconditional token 0 is then a learned null vector), or "both";
    # "none" builds the same UNet without any class input (self-attention at the attention
    # levels), the unconditional DPM of the classifier-guidance baseline.
    conditioning: str = "cross_attention"


@dataclass(frozen=True)
class TrainConfig:
    """DDPM training with classifier-free guidance (paper §2.3, §3.2)."""

    epochs: int = 1000
    batch_size: int = 64
    lr: float = 1e-5
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    cond_drop_prob: float = 0.15
    ema_decay: float = 0.0  # 0 disables EMA (the paper uses none)
    valid_every: int = 1  # epochs between validation passes
    checkpoint_every: int = 1  # epochs between checkpoints
    num_workers: int = 1
    use_gpu: bool = False
    amp: bool = True  # autocast where it pays: GPUs, CPUs with bf16 units (igconda.precision)
    max_failures: int = 2
    seed: int = 0
    # Splits whose Parquet files total at most this many MiB are read once into Ray's object
    # store (Dataset.materialize) instead of re-read from storage every epoch; 0 = always stream.
    materialize_max_mb: int = 2048
    # Show each unhealthy slice round(n_healthy / n_unhealthy) times per epoch (they are ~10 % of
    # a whole-body scan's slices); the paper trains on the slices as they come.
    balance_classes: bool = False
    # Draw training timesteps from {0, ..., max_timestep - 1} instead of {0, ..., T - 1}; 0 = all T.
    # Counterfactuals only ever evaluate t <= D (the largest noise level tuned or inferred), so
    # steps spent on t > D teach the network nothing inference uses. Every D must be < this.
    max_timestep: int = 0
    compile: bool = False  # torch.compile the network in place (igconda.accel); see RESULTS.md


@dataclass(frozen=True)
class InferConfig:
    """Counterfactual generation (paper §2.4) and batch inference resources."""

    noise_level: int = 400  # D, in training-timestep units
    guidance_scale: float = 3.0  # w, the reference code's form eps_u + w (eps_c - eps_u)
    stride: int = 1  # s; the reference steps every timestep
    batch_size: int = 32
    concurrency: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    use_amp: bool = True  # as train.amp (igconda.precision)
    # The anomaly map kind (igconda.map_kinds) and the threshold τ of its binary lesion mask.
    # Both are untuned defaults: a study replaces them (and D, w) by what tuning chose on the tune
    # split (tune/best.json, <study>/model/tuning.json). 0.1 is the lowest τ of the paper's ⌈DSC⌉
    # grid; diffusion maps are low-amplitude, so a higher default would mostly predict nothing.
    map_kind: str = "abs"
    threshold: float = 0.1
    # igconda.accel: torch.compile the network; replay the DDIM loop's fixed shapes from CUDA
    # graphs (CUDA only, ignored elsewhere); > 0: each actor's batch from this fraction of its
    # free GPU memory and the measured per-slice activation memory (0 = batch_size; CPU: batch_size).
    compile: bool = False
    cuda_graphs: bool = False
    memory_fraction: float = 0.0


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune search over (D, w) on the tune split (paper Fig. 5)."""

    noise_levels: tuple[int, ...] = (100, 200, 300, 400, 500, 600)
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    stride: int = 10
    # Map kinds tuning chooses from with (D, w) (igconda.map_kinds); the paper's "abs" and the
    # w = 0 control are always scored and reported beside the chosen one.
    map_kinds: tuple[str, ...] = MAP_KINDS
    max_slices: int = 0  # 0 = every unhealthy tune slice
    search: str = "grid"  # "grid" (every pair) or "random" (num_samples pairs drawn from the grid)
    num_samples: int = 1
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow destination; the default is a SQLite store ``<output>/mlflow.db``."""

    tracking_uri: str = ""  # empty = sqlite:///<output>/mlflow.db
    experiment: str = "igconda"


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study needs; saved inside every checkpoint."""

    phantoms: PhantomConfig = field(default_factory=PhantomConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, section: str, **changes: Any) -> StudyConfig:
        """A copy with some values of one section changed (validated)."""
        new_section = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, **{section: new_section})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), round-trips through :func:`from_dict`."""
        return to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def to_plain(obj: Any) -> Any:
    """Nested dicts, lists and tuples as YAML-safe dicts and lists (tuples become lists)."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, item_type, where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


_SECTIONS = {f.name: f for f in dataclasses.fields(StudyConfig)}


def from_dict(data: dict[str, Any] | None, source: str = "<dict>") -> StudyConfig:
    """Build a validated :class:`StudyConfig` from nested mappings (missing keys = defaults)."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    sections: dict[str, Any] = {}
    for name, values in data.items():
        if name not in _SECTIONS:
            raise ConfigError(
                f"{source}: unknown section {name!r} (known: {', '.join(sorted(_SECTIONS))})"
            )
        section_type = _SECTIONS[name].default_factory  # type: ignore[misc]
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping")
        hints = typing.get_type_hints(section_type)
        known = {f.name for f in dataclasses.fields(section_type)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {name}.{key} (known: {', '.join(sorted(known))})"
                )
            kwargs[key] = _coerce(value, hints[key], f"{source}: {name}.{key}")
        sections[name] = section_type(**kwargs)
    try:
        return StudyConfig(**sections)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Load a YAML study config (``None`` = paper defaults), then apply nested ``overrides``."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
    for section, values in (overrides or {}).items():
        data.setdefault(section, {})
        data[section] = {**(data[section] or {}), **values}
    return from_dict(data, source)


def save_config(config: StudyConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (atomically: temp file then rename)."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text), suffix=".tmp")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: StudyConfig) -> None:
    """Cross-field checks; raises ConfigError with the offending key."""
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
    _check(t.materialize_max_mb >= 0, "train.materialize_max_mb must be >= 0 (0 = always stream)")
    _check(t.max_timestep == 0 or 2 <= t.max_timestep <= t.num_train_timesteps,
           f"train.max_timestep {t.max_timestep} must be 0 (all) or in [2, {t.num_train_timesteps}]")
    trained = t.max_timestep or t.num_train_timesteps
    i = cfg.infer
    _check(0 < i.noise_level < trained,
           f"infer.noise_level D={i.noise_level} must be in (0, {trained}): the model is trained on "
           f"t < {trained} (train.max_timestep / num_train_timesteps)")
    _check(i.stride >= 1 and i.noise_level % i.stride == 0,
           f"infer.stride s={i.stride} must be >= 1 and divide noise_level D={i.noise_level}")
    _check(i.guidance_scale >= 0, "infer.guidance_scale must be >= 0")
    _check(i.batch_size >= 1 and i.concurrency >= 1, "infer: batch_size and concurrency must be >= 1")
    _check(i.num_gpus_per_actor >= 0 and i.num_cpus_per_actor >= 0,
           f"infer: num_gpus_per_actor {i.num_gpus_per_actor} and num_cpus_per_actor "
           f"{i.num_cpus_per_actor} must be >= 0 (Ray resources per inference actor)")
    _check(0 <= i.memory_fraction < 1, f"infer.memory_fraction {i.memory_fraction} must be in [0, 1) (0 = off)")
    _check(i.map_kind in MAP_KINDS, f"infer.map_kind {i.map_kind!r} must be one of {list(MAP_KINDS)}")
    _check(0 < i.threshold <= 1, f"infer.threshold τ={i.threshold} must be in (0, 1] (maps are in [0, 1])")
    u = cfg.tune
    _check(len(u.noise_levels) > 0 and len(u.guidance_scales) > 0, "tune: empty search space")
    # Checked before the noise levels, whose divisibility test would divide by a zero stride.
    _check(u.stride >= 1, f"tune.stride s={u.stride} must be >= 1 (DDIM steps every s timesteps)")
    _check(u.num_samples >= 1,
           f"tune.num_samples {u.num_samples} must be >= 1 (trials per grid point or random draws)")
    _check(u.gpus_per_trial >= 0 and u.cpus_per_trial >= 0,
           f"tune: gpus_per_trial {u.gpus_per_trial} and cpus_per_trial {u.cpus_per_trial} must be "
           f">= 0 (Ray resources per trial)")
    for d in u.noise_levels:
        _check(0 < d < trained and d % u.stride == 0,
               f"tune.noise_levels: D={d} must be in (0, {trained}) (trained timesteps) and divisible "
               f"by tune.stride={u.stride}")
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
