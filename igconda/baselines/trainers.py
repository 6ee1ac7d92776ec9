"""Building one worker's trainer of a trained baseline from a study config (no Ray).

``python -m ray_jobs.train_baseline`` drives every trained baseline with the same Ray Train loop
(:mod:`ray_jobs.train_baseline_worker`); what differs per method is a
:class:`~igconda.baselines.trainer_base.BaselineTrainer` (the interface) of
:mod:`igconda.baselines.trainer_methods` around the method's own per-epoch functions:

=================  ==========================================  ===============================
``--method``       per-epoch functions                          checkpoint folder (scored as)
=================  ==========================================  ===============================
``hirescam``       :mod:`~igconda.baselines.resnet_classifier`   ``save_classifier`` (hirescam)
``supervised``     :mod:`~igconda.baselines.supervised`          ``save_supervised`` (supervised)
``fanogan``        :mod:`~igconda.baselines.fanogan_training`    f-AnoGAN folder (fanogan)
``dpm_classifier`` :mod:`~igconda.diffusion.classifier_training` ``save_noisy_classifier``
                                                                 (dpm_cg, with a DPM trained by
                                                                 ``ray_jobs.train`` with
                                                                 ``model.conditioning: none``)
=================  ==========================================  ===============================

This module owns which ``--method`` names which trainer, the settings each is built with from
the study config's ``baselines`` section (:mod:`igconda.baselines.settings`;
:func:`method_settings`, :func:`create_trainer`), and the check that a checkpoint can be resumed
(:func:`check_resumable`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from igconda import checkpoint as ckpt
from igconda.baselines import resnet_classifier, supervised
from igconda.baselines.fanogan import FAnoGANConfig
from igconda.baselines.trainer_base import BaselineTrainer, train_state
from igconda.baselines.trainer_methods import (
    FAnoGANBaseline,
    HiResCamTrainer,
    NoisyClassifierTrainer,
    SupervisedTrainer,
)
from igconda.config import ConfigError, StudyConfig
from igconda.data.schema import healthy_per_unhealthy
from igconda.models.noisy_classifier import NoisyClassifierConfig

#: ``--method`` values of the training job.
TRAINED_METHODS = ("hirescam", "supervised", "fanogan", "dpm_classifier")


def unhealthy_weight(study: StudyConfig, class_counts: Mapping[int, int] | None) -> float:
    """The loss weight of an unhealthy slice that balances the classes of a train split with
    ``class_counts`` (slices per schema label) when ``train.balance_classes``, else 1."""
    ratio = healthy_per_unhealthy(class_counts or {})
    return ratio if study.train.balance_classes and ratio else 1.0


def method_settings(study: StudyConfig, method: str, slice_size: tuple[int, int],
                    class_counts: Mapping[int, int] | None = None) -> Any:
    """The method's settings dataclass from the study's ``baselines`` section.

    Args:
        study: the study config. method: one of :data:`TRAINED_METHODS`.
        slice_size: (H, W) of the data's slices (f-AnoGAN and the noisy classifier are sized
            for it).
        class_counts: slices per schema label of the train split; with ``train.balance_classes``
            the HiResCAM classifier's loss weighs the classes by them (:func:`unhealthy_weight`).

    Raises:
        ConfigError: the settings do not build (the message names the ``baselines`` keys).
    """
    b = study.baselines
    try:
        if method == "hirescam":
            return resnet_classifier.ClassifierConfig(
                widen_factor=b.hirescam_widen_factor, lr=b.hirescam_lr, seed=b.seed,
                unhealthy_weight=unhealthy_weight(study, class_counts))
        if method == "supervised":
            return supervised.SupervisedConfig(channels=b.supervised_channels,
                                               strides=b.supervised_strides,
                                               num_res_units=b.supervised_num_res_units,
                                               lr=b.supervised_lr, seed=b.seed)
        if method == "fanogan":
            if slice_size[0] != slice_size[1]:
                raise ValueError(f"f-AnoGAN needs square slices, the data's are {slice_size}")
            return FAnoGANConfig(image_size=slice_size[0], latent_dim=b.fanogan_latent_dim,
                                 channels=b.fanogan_channels, n_critic=b.fanogan_n_critic,
                                 gan_lr=b.fanogan_gan_lr, encoder_lr=b.fanogan_encoder_lr,
                                 seed=b.seed)
        if method == "dpm_classifier":
            return NoisyClassifierConfig(image_size=tuple(slice_size),
                                         channels=b.classifier_channels,
                                         attention=b.classifier_attention,
                                         num_head_channels=b.classifier_num_head_channels,
                                         norm_num_groups=b.classifier_norm_num_groups)
    except ValueError as err:
        prefix = "classifier" if method == "dpm_classifier" else method
        raise ConfigError(f"baselines.{prefix}_*: {err}") from None
    raise ConfigError(f"unknown baseline {method!r}; known: {', '.join(TRAINED_METHODS)}")


_TRAINERS: dict[str, type[BaselineTrainer]] = {
    "hirescam": HiResCamTrainer, "supervised": SupervisedTrainer, "fanogan": FAnoGANBaseline,
    "dpm_classifier": NoisyClassifierTrainer}


def trainer_class(method: str) -> type[BaselineTrainer]:
    """The :class:`BaselineTrainer` of a ``--method``; ConfigError for an unknown one."""
    if method not in _TRAINERS:
        raise ConfigError(f"unknown baseline {method!r}; known: {', '.join(TRAINED_METHODS)}")
    return _TRAINERS[method]


def create_trainer(method: str, study: StudyConfig, slice_size: tuple[int, int],
                   device: torch.device | str = "cpu", rank: int = 0,
                   class_counts: Mapping[int, int] | None = None) -> BaselineTrainer:
    """A fresh trainer (initial weights from ``baselines.seed``, the same on every rank);
    ``class_counts`` as :func:`method_settings` takes them."""
    return trainer_class(method)(study, method_settings(study, method, slice_size, class_counts),
                                 torch.device(device), rank)


def check_resumable(directory: str | Path) -> None:
    """Refuse a checkpoint a ``--resume`` cannot continue from, naming the damaged file:
    every ``.safetensors`` header and ``train_state.pt`` must read (cheap: no tensor is loaded)."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except SafetensorError as err:
            raise ckpt.CheckpointError(f"{path}: damaged ({err}); resume from an earlier "
                                       "checkpoint or start again") from None
    train_state(directory)
