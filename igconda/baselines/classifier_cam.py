"""HiResCAM anomaly maps of the ResNet-18 slice classifier (paper §3.3 baseline, method
``hirescam``).

The paper uses HiResCAM of the classifier's "unhealthy" logit as the anomaly map; the classifier
(network, training, checkpoint) is :mod:`igconda.baselines.resnet_classifier`'s.

HiResCAM (Draelos & Carin 2020) is written out with hooks instead of using ``pytorch-grad-cam``
(PyPI ``grad-cam``): that package is not a dependency of the project, and it imports torchvision
and OpenCV when loaded (``pytorch_grad_cam.utils.image``), two large dependencies for a method
of a few lines. The formula is the same as its ``HiResCAM``: ``ReLU(Σ_c ∂y/∂A_c ⊙ A_c)`` at the
target layer, min–max normalised per slice to [0, 1] (its ``scale_cam_image``); the map is
upsampled bilinearly with torch before the normalisation rather than with ``cv2.resize`` after.

:class:`HiResCamMethod` is the :class:`igconda.anomaly_methods.AnomalyMethod` named ``hirescam``;
``python -m ray_jobs.score_method --method hirescam`` scores it on the test split with a τ
calibrated on tune.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from igconda.baselines.resnet_classifier import UNHEALTHY_INDEX, as_images, load_classifier
from igconda.evaluation import HIRESCAM
from igconda.slice_batch import batch_images


def hirescam_maps(
    model: nn.Module,
    images: np.ndarray,
    *,
    target_layer: str = "layer4",
    class_index: int = UNHEALTHY_INDEX,
    batch_size: int = 64,
) -> np.ndarray:
    """HiResCAM of one class for a batch of slices, as anomaly maps in [0, 1].

    ``cam = ReLU(Σ_c ∂y_k/∂A_c ⊙ A_c)`` where ``A`` is the target layer's activation and ``y_k``
    the class logit; unlike Grad-CAM the gradient is not averaged over space, so the map shows the
    locations that actually raised the logit. Each map is upsampled bilinearly to (H, W) and
    min–max normalised; a map with no positive evidence is all zeros.

    Args:
        model: a classifier of :mod:`igconda.baselines.resnet_classifier` (trained or loaded).
        images: (N, H, W) scaled PET slices.
        target_layer: name of the module whose activation is explained (a child of ``model``).
        class_index: the explained logit (default 1, "unhealthy").
        batch_size: slices per forward/backward pass.

    Returns:
        (N, H, W) float32 in [0, 1].
    """
    x = as_images(images)
    layer = dict(model.named_modules()).get(target_layer)
    if layer is None:
        raise ValueError(f"model has no module {target_layer!r}")
    device = next(model.parameters()).device
    saved: dict[str, torch.Tensor] = {}

    def keep_activation(_module, _inputs, output):
        output.retain_grad()  # the gradient w.r.t. this activation is what HiResCAM needs
        saved["activation"] = output

    was_training = model.training
    model.eval()  # BatchNorm on running statistics: slices in a batch do not interact
    handle = layer.register_forward_hook(keep_activation)
    out = np.empty((x.shape[0], x.shape[2], x.shape[3]), dtype=np.float32)
    try:
        for start in range(0, x.shape[0], batch_size):
            # The input needs a graph even if the weights are frozen, so that A gets a gradient.
            batch = x[start: start + batch_size].to(device).requires_grad_(True)
            with torch.enable_grad():
                logits = model(batch)
                if not 0 <= class_index < logits.shape[1]:
                    raise ValueError(f"class_index {class_index} outside 0..{logits.shape[1] - 1}")
                model.zero_grad(set_to_none=True)
                # Slices are independent in eval mode, so one backward of the sum gives each
                # slice's own gradient.
                logits[:, class_index].sum().backward()
            act = saved["activation"]
            cam = F.relu((act.grad * act).sum(dim=1, keepdim=True)).detach()
            cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
            flat = cam.flatten(1)
            lo = flat.min(dim=1).values[:, None, None]
            span = flat.max(dim=1).values[:, None, None] - lo
            cam = torch.where(span > 0, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))
            out[start: start + batch.shape[0]] = cam.cpu().numpy()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return out


class HiResCamMethod:
    """The classifier's HiResCAM of the "unhealthy" logit as an anomaly method.

    Args:
        model: a trained classifier on its device (its mode is restored after each batch).
        target_layer: the explained module (default ``layer4``, the paper's last stage).
        batch_size: slices per forward/backward pass.
    """

    names = (HIRESCAM,)

    def __init__(self, model: nn.Module, *, target_layer: str = "layer4", batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.model, self.target_layer, self.batch_size = model, target_layer, int(batch_size)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, *, device: torch.device | str = "cpu",
                        target_layer: str = "layer4", batch_size: int = 64) -> HiResCamMethod:
        return cls(load_classifier(directory, device)[0], target_layer=target_layer,
                   batch_size=batch_size)

    def maps(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {HIRESCAM: hirescam_maps(self.model, batch_images(batch), target_layer=self.target_layer,
                                        batch_size=self.batch_size)}
