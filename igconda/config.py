"""Study configuration: one frozen dataclass per stage, loaded from YAML and validated.

A YAML file has one optional mapping per section (``phantoms``, ``preprocess``, ``model``,
``train``, ``infer``, ``tune``, ``tracking``, ``baselines``; the last is declared in
:mod:`igconda.baselines.settings`); anything left out keeps the defaults below, which
are the paper's settings (Ahamed & Rahmim 2025, see ``configs/paper.yaml`` for section
references). Unknown keys and out-of-range values raise :class:`ConfigError` naming the file,
the key and the problem, so a typo never silently falls back to a default.

This module owns the sections (one dataclass each, their defaults and what each key means),
:class:`StudyConfig`, and reading and writing YAML; the allowed values and ranges of the keys
are :mod:`igconda.config_rules`' (run on every :class:`StudyConfig` built).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from igconda.baselines.settings import BaselinesConfig
from igconda.config_rules import validate
from igconda.io_utils import atomic_write
from igconda.map_kinds import MAP_KINDS


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
    # GroupNorm groups; every group must hold >= 2 channels (igconda.config_rules: a one-channel group
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
    # Intra-op threads of each actor's network on a CPU; 0 = Ray's default, one per reserved CPU
    # (OMP_NUM_THREADS). More than reserved is for a lone actor: Ray Data's Parquet readers need
    # a whole free CPU to be scheduled at all (see ray_jobs.infer_config.actor_cpu_warning), but
    # they are busy only briefly, so the network may use that CPU's core too.
    torch_threads: int = 0
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
        try:
            validate(self)  # igconda.config_rules
        except ValueError as err:
            raise ConfigError(str(err)) from None

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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw mappings of a YAML study config file, parsed once (not yet validated: pass them
    to :func:`from_dict`). Raises ConfigError naming the file when it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None


def _with_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``data`` with nested ``overrides`` merged in, section by section (a new dict)."""
    if not overrides:
        return data  # as read: from_dict names a top level that is not a mapping
    merged = dict(data)
    for section, values in (overrides or {}).items():
        merged[section] = {**(merged.get(section) or {}), **values}
    return merged


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Load a YAML study config (``None`` = paper defaults), then apply nested ``overrides``."""
    data = read_config_file(path) if path is not None else {}
    return from_dict(_with_overrides(data, overrides), str(path) if path is not None else "<defaults>")


def apply_overrides(config: StudyConfig, overrides: dict[str, Any] | None,
                    source: str = "<overrides>") -> StudyConfig:
    """``config`` with nested ``{section: {key: value}}`` overrides applied and validated, as
    :func:`load_config` applies them to a file (``source`` names it in errors): a config
    already loaded is not read again."""
    return from_dict(_with_overrides(config.to_dict(), overrides), source)


def save_config(config: StudyConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (atomically: temp file then rename)."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text), suffix=".tmp")
