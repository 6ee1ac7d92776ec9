"""The DPM + classifier guidance baseline as an anomaly method, and its classifier checkpoint.

:class:`DPMClassifierGuidanceMethod` follows :class:`igconda.anomaly_methods.AnomalyMethod`: it turns
a batch of slices into the ``dpm_cg`` map |x − x̂| of
:func:`igconda.diffusion.classifier_guidance.classifier_guided_counterfactual` (paper §3.3).

It needs two checkpoints, both in the folder layout of :mod:`igconda.checkpoint`:

- the unconditional DPM: a training checkpoint of a study with ``model.conditioning: none``,
  loaded with :func:`igconda.checkpoint.load_model`;
- the noisy classifier (:func:`save_noisy_classifier`): ``config.yaml`` is the study it was
  trained for (its noise schedule and slice size), ``model.safetensors`` its weights,
  ``train_state.pt`` optional, and ``metadata.json`` holds its architecture under
  ``"noisy_classifier"`` (:class:`~igconda.models.noisy_classifier.NoisyClassifierConfig`), since
  the study config has no section for it. ``load_model`` refuses this folder (its weights are no
  UNet), so the two cannot be swapped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igconda import checkpoint as ckpt
from igconda.config import StudyConfig
from igconda.diffusion.classifier_guidance import (
    PAPER_NOISE_LEVEL,
    PAPER_SCALE,
    classifier_guided_counterfactual,
    dpm_cg_map,
)
from igconda.diffusion.schedule import NoiseSchedule
from igconda.evaluation import DPM_CG
from igconda.models.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from igconda.slice_batch import batch_images

#: The ``metadata.json`` key that holds the classifier's architecture.
ARCHITECTURE_KEY = "noisy_classifier"


def save_noisy_classifier(
    directory: str | Path,
    classifier: NoisyClassifier,
    config: StudyConfig,
    *,
    train_state: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a classifier checkpoint folder atomically (:func:`igconda.checkpoint.save_checkpoint`).

    Args:
        directory: the checkpoint folder (replaced if it exists).
        classifier: the classifier (or its DDP wrapper).
        config: the study whose DPM it guides (its schedule is checked when loading the pair).
        train_state: optional optimizer/epoch state (``torch.load(weights_only=True)``-safe).
        metadata: optional facts (epoch, losses, run ids); the architecture is added.
    """
    module = getattr(classifier, "module", classifier)
    return ckpt.save_checkpoint(
        directory, model=module, config=config, train_state=train_state,
        metadata={**(metadata or {}), ARCHITECTURE_KEY: module.config.to_dict()})


def load_noisy_classifier(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[NoisyClassifier, StudyConfig]:
    """The classifier of a :func:`save_noisy_classifier` folder, in eval mode on ``device``,
    and the study config stored with it.

    Raises:
        CheckpointError: not a classifier checkpoint, a damaged file, or weights that do not fit
            the stored architecture.
    """
    directory = Path(directory)
    config = ckpt.load_checkpoint_config(directory)
    architecture = ckpt.load_metadata(directory).get(ARCHITECTURE_KEY)
    if not isinstance(architecture, dict):
        raise ckpt.CheckpointError(
            f"{directory}: not a noisy-classifier checkpoint (no {ARCHITECTURE_KEY!r} in "
            f"{ckpt.METADATA_FILE})")
    try:
        classifier = NoisyClassifier(NoisyClassifierConfig.from_dict(architecture))
    except (TypeError, ValueError) as err:
        raise ckpt.CheckpointError(f"{directory}: bad classifier architecture: {err}") from None
    weights = directory / ckpt.MODEL_FILE
    if not weights.is_file():
        raise ckpt.CheckpointError(f"{directory}: no {ckpt.MODEL_FILE} in checkpoint")
    try:
        classifier.load_state_dict(ckpt.load_weights(weights))
    except RuntimeError as err:
        raise ckpt.CheckpointError(f"{weights}: weights do not match the stored architecture: "
                                   f"{err}") from None
    return classifier.to(device).eval(), config


def _as_slices(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) numpy slices → (N, 1, H, W) float32 tensor."""
    # np.require copies only when needed: Ray hands over read-only arrays, which torch rejects.
    return torch.from_numpy(np.require(images, np.float32, ["C", "W"])).unsqueeze(1)


def _schedule_settings(config: StudyConfig) -> tuple[int, float, float]:
    return config.train.num_train_timesteps, config.train.beta_start, config.train.beta_end


class DPMClassifierGuidanceMethod:
    """DPM + classifier guidance (paper §3.3): ``dpm_cg`` = |x − x̂| clipped to [0, 1].

    Args:
        model: the unconditional DPM, in eval mode on ``device``.
        classifier: the noisy classifier, on ``device`` (put in eval mode here).
        schedule: the noise schedule both were trained with.
        noise_level: D (the paper's 200); stride: s (1 reproduces a full DDIM walk);
            scale: the gradient scale (the paper's 6). See
            :func:`~igconda.diffusion.classifier_guidance.classifier_guided_decode`.
        device: where the networks run.
        amp: autocast the DPM where it pays (:mod:`igconda.precision`).
    """

    names = (DPM_CG,)

    def __init__(self, model: torch.nn.Module, classifier: torch.nn.Module, schedule: NoiseSchedule,
                 *, noise_level: int = PAPER_NOISE_LEVEL, stride: int = 1,
                 scale: float = PAPER_SCALE, device: str | torch.device = "cpu",
                 amp: bool = False) -> None:
        self.model, self.classifier, self.schedule = model, classifier.eval(), schedule
        self.noise_level, self.stride, self.scale = int(noise_level), int(stride), float(scale)
        self.device, self.amp = torch.device(device), bool(amp)

    @classmethod
    def from_checkpoints(cls, dpm_dir: str | Path, classifier_dir: str | Path, *,
                         device: str | torch.device = "cpu", **settings: Any
                         ) -> DPMClassifierGuidanceMethod:
        """The method from a DPM checkpoint and a classifier checkpoint (``settings``: D, stride,
        scale, amp). Raises CheckpointError when their noise schedules differ: the classifier
        would then judge x_t at noise levels it was never shown."""
        model, dpm_config = ckpt.load_model(dpm_dir, device)
        classifier, classifier_config = load_noisy_classifier(classifier_dir, device)
        if _schedule_settings(dpm_config) != _schedule_settings(classifier_config):
            raise ckpt.CheckpointError(
                f"{classifier_dir}: the classifier's schedule (T, beta_start, beta_end) "
                f"{_schedule_settings(classifier_config)} differs from the DPM's "
                f"{_schedule_settings(dpm_config)} in {dpm_dir}")
        return cls(model, classifier, NoiseSchedule.from_config(dpm_config.train), device=device,
                   **settings)

    def counterfactuals(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) slices in [0, 1] → (N, H, W) float32 classifier-guided counterfactuals x̂."""
        if images.ndim != 3:
            raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
        if len(images) == 0:
            return np.zeros_like(images, dtype=np.float32)
        x0 = _as_slices(images).to(self.device)
        x_hat = classifier_guided_counterfactual(
            self.model, self.classifier, x0, self.schedule, noise_level=self.noise_level,
            stride=self.stride, scale=self.scale, amp=self.amp)
        return x_hat.float().squeeze(1).cpu().numpy()

    def maps(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Numpy columns of the slice schema → ``{"dpm_cg": (N, H, W) float32 in [0, 1]}``."""
        images = batch_images(batch)
        x_hat = self.counterfactuals(images)
        return {DPM_CG: dpm_cg_map(_as_slices(images), _as_slices(x_hat)).squeeze(1).numpy()}
