"""The ``baselines`` section of a study config: how the trained baselines are trained and scored.

Torch-free (``igconda.config`` imports it to declare the section, ``igconda.config_rules`` to
validate it). Keys are flat,
prefixed by the method they belong to, so that the section has the same one-level shape as
every other (``StudyConfig.flat()`` gives ``baselines.<key>`` MLflow params). The defaults are
CPU-sized: networks of the baselines' published shapes but few epochs; a study on GPUs raises
``epochs``. The per-method settings dataclasses (``ClassifierConfig``, ``SupervisedConfig``,
``FAnoGANConfig``, ``NoisyClassifierConfig``) are built from this section by
:func:`igconda.baselines.trainers.method_settings`, whose own checks also run before training.

Used by ``python -m ray_jobs.train_baseline`` (training) and ``python -m ray_jobs.score_method``
(the ``score_batch_size`` and the ``dpm_cg_*`` decoding settings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from igconda.ddim_grid import Names, check_grid

#: The ResNet-18 stages ``baselines.hirescam_target_layer`` may name.
HIRESCAM_LAYERS = ("layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class BaselinesConfig:
    """Training and scoring settings of the trained baselines (paper §3.3).

    Common: ``epochs`` (f-AnoGAN: its WGAN-GP stage), ``batch_size`` (slices per step per
    worker), ``seed`` (initial weights and draws), ``score_batch_size`` (slices per scoring call).
    ``hirescam_*``: ResNet-18 classifier (``hirescam_weights``: a local torchvision ``resnet18``
    state dict to start from, "" = from scratch; never downloaded; ``hirescam_target_layer``: the
    stage HiResCAM explains at scoring time, ``layer4`` the paper's last one, which is H/16 × W/16:
    4 × 4 at the paper's 64 × 64 slices but 2 × 2 at 32 × 32, where ``layer3`` keeps the paper's
    4 × 4 grid). ``supervised_*``: the MONAI UNet upper bound (``supervised_epochs``: its own
    budget, 0 = as many as ``epochs``). ``fanogan_*``: f-AnoGAN; ``fanogan_encoder_epochs`` is its izi_f encoder
    stage, run after the WGAN-GP stage (0 = as many as ``epochs``). ``classifier_*``: the noisy
    classifier of DPM + classifier guidance. ``dpm_cg_*``: its decoding at scoring time, D
    (``dpm_cg_noise_level``, 0 = T / 5, the paper's 200 of T = 1000), stride s, gradient scale;
    ``dpm_cg_noise_levels`` × ``dpm_cg_scales``: the grid ``python -m ray_jobs.tune --method
    dpm_cg`` searches on the tune split (empty: not tuned, the single values above are used).
    """

    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    score_batch_size: int = 64
    hirescam_lr: float = 1e-3
    hirescam_widen_factor: float = 1.0
    hirescam_weights: str = ""
    hirescam_target_layer: str = "layer4"
    supervised_epochs: int = 0
    supervised_lr: float = 1e-3
    supervised_channels: tuple[int, ...] = (32, 64, 128, 256)
    supervised_strides: tuple[int, ...] = (2, 2, 2)
    supervised_num_res_units: int = 2
    fanogan_encoder_epochs: int = 0
    fanogan_latent_dim: int = 128
    fanogan_channels: int = 64
    fanogan_n_critic: int = 5
    fanogan_gan_lr: float = 1e-4
    fanogan_encoder_lr: float = 5e-5
    classifier_lr: float = 1e-4
    classifier_channels: tuple[int, ...] = (32, 64, 64)
    classifier_attention: str = "011"
    classifier_num_head_channels: int = 64
    classifier_norm_num_groups: int = 16
    dpm_cg_noise_level: int = 0
    dpm_cg_stride: int = 1
    dpm_cg_scale: float = 6.0
    dpm_cg_noise_levels: tuple[int, ...] = ()
    dpm_cg_scales: tuple[float, ...] = ()

    @property
    def encoder_epochs(self) -> int:
        """Epochs of f-AnoGAN's encoder stage."""
        return self.fanogan_encoder_epochs or self.epochs

    def dpm_cg_decoding(self, num_train_timesteps: int) -> tuple[int, int, float]:
        """(D, s, scale) of the ``dpm_cg`` decoding for a DPM trained on T timesteps."""
        return (self.dpm_cg_noise_level or max(1, num_train_timesteps // 5), self.dpm_cg_stride,
                self.dpm_cg_scale)


def validate_baselines(b: BaselinesConfig, num_train_timesteps: int,
                       check: Callable[[bool, str], None]) -> None:
    """Range checks of the section; ``check(ok, message)`` raises the config's error."""
    check(b.epochs >= 1 and b.fanogan_encoder_epochs >= 0 and b.supervised_epochs >= 0,
          f"baselines.epochs {b.epochs} must be >= 1 and baselines.fanogan_encoder_epochs "
          f"{b.fanogan_encoder_epochs}, supervised_epochs {b.supervised_epochs} >= 0 "
          "(0 = as many as epochs)")
    check(b.hirescam_target_layer in HIRESCAM_LAYERS,
          f"baselines.hirescam_target_layer {b.hirescam_target_layer!r} must be one of "
          f"{', '.join(HIRESCAM_LAYERS)} (the ResNet-18's stages)")
    # BatchNorm of the ResNet-18 needs 2 values per channel at 1 × 1 (16 × 16 slices).
    check(b.batch_size >= 2 and b.score_batch_size >= 1,
          f"baselines.batch_size {b.batch_size} must be >= 2, score_batch_size "
          f"{b.score_batch_size} >= 1")
    check(b.seed >= 0, f"baselines.seed {b.seed} must be >= 0")
    for key in ("hirescam_lr", "hirescam_widen_factor", "supervised_lr", "fanogan_gan_lr",
                "fanogan_encoder_lr", "classifier_lr", "dpm_cg_scale"):
        check(getattr(b, key) > 0, f"baselines.{key} {getattr(b, key)} must be positive")
    d, s, _ = b.dpm_cg_decoding(num_train_timesteps)
    names = Names(noise_level="baselines.dpm_cg_noise_level(s)", stride="baselines.dpm_cg_stride",
                  timesteps="train.num_train_timesteps")
    for level in (d, *b.dpm_cg_noise_levels):
        try:  # the DDIM grid's (D, s) rule, igconda.ddim_grid's
            check_grid(level, s, num_train_timesteps, names=names)
        except ValueError as err:
            check(False, str(err))
    check(all(scale > 0 for scale in b.dpm_cg_scales),
          f"baselines.dpm_cg_scales {list(b.dpm_cg_scales)} must be positive")
    check(bool(b.dpm_cg_noise_levels) == bool(b.dpm_cg_scales),
          "baselines.dpm_cg_noise_levels and dpm_cg_scales are the tuning grid: give both or "
          "neither")
