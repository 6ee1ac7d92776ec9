"""ResNet-18 healthy/unhealthy classifier + HiResCAM anomaly maps (paper §3.3 baseline).

The paper fine-tunes an ImageNet-pretrained ResNet-18 to classify slices as healthy or
unhealthy and uses HiResCAM of the "unhealthy" logit as the anomaly map. Here:

* the network is MONAI's ``resnet18(spatial_dims=2, n_input_channels=1, num_classes=2)``. With
  MONAI's defaults (7×7 stem at stride 1, then max-pool) the last stage ``layer4`` is H/16 × W/16:
  4 × 4 for the 64 × 64 slices of the paper's preprocessing, which bounds how sharp the CAM is;
* ImageNet weights cannot be downloaded in every environment: :func:`build_classifier` accepts a
  local state dict (a torchvision ``resnet18`` checkpoint works: its RGB stem is summed to one
  channel and its 1000-class head dropped), and trains from scratch otherwise;
* HiResCAM (Draelos & Carin 2020) is written out with hooks instead of using ``pytorch-grad-cam``:
  that package needs torchvision, which does not import beside the torch build pinned here, and the
  method is a few lines: ``ReLU(Σ_c ∂y/∂A_c ⊙ A_c)`` at the target layer, upsampled bilinearly
  and min–max normalised per slice to [0, 1] (pytorch-grad-cam's ``scale_cam_image`` convention).

Labels follow :mod:`igconda.data.schema`: 1 healthy, 2 unhealthy; the network's class index is
``label - 1``, so logit 1 is "unhealthy".
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import resnet18
from torch import nn

from igconda.data.schema import HEALTHY, UNHEALTHY

logger = logging.getLogger(__name__)

#: Network output index of the "unhealthy" class (schema label 2).
UNHEALTHY_INDEX = UNHEALTHY - 1


def build_classifier(weights: str | Path | None = None, *, widen_factor: float = 1.0) -> nn.Module:
    """MONAI ResNet-18 for 1-channel 2D slices and 2 classes, optionally from local weights.

    Args:
        weights: path to a ``state_dict`` saved with ``torch.save`` (a raw dict or one under a
            ``"state_dict"`` key), e.g. torchvision's ImageNet ``resnet18``. A 3-channel stem is
            summed over its input channels; tensors whose shape does not fit (the ImageNet head)
            are skipped and logged. ``None`` leaves MONAI's random initialisation.
        widen_factor: channel multiplier (1.0 is the standard ResNet-18 the paper uses; smaller
            values give the cheap networks of the tests). Pretrained weights need 1.0.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: the file holds no tensor that fits a ResNet-18 backbone.
    """
    if not widen_factor > 0:
        raise ValueError(f"widen_factor must be positive, got {widen_factor}")
    model = resnet18(spatial_dims=2, n_input_channels=1, num_classes=2, widen_factor=widen_factor)
    if weights is None:
        return model
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    own = model.state_dict()
    usable, skipped = {}, []
    for key, tensor in state.items():
        key = key.removeprefix("module.")  # DataParallel / DDP checkpoints
        if key == "conv1.weight" and tensor.ndim == 4 and tensor.shape[1] == 3:
            tensor = tensor.sum(dim=1, keepdim=True)  # RGB stem → grayscale, preserving response
        if key in own and own[key].shape == tensor.shape:
            usable[key] = tensor
        else:
            skipped.append(key)
    backbone = [k for k in own if not k.startswith("fc.")]
    if sum(k in usable for k in backbone) < len(backbone) // 2:
        raise ValueError(
            f"{path} does not look like ResNet-18 weights: only {len(usable)} of {len(own)} "
            f"tensors fit (skipped e.g. {skipped[:3]})"
        )
    model.load_state_dict(usable, strict=False)
    logger.info("loaded %d tensors from %s; skipped %s; kept initial %s", len(usable), path,
                skipped, sorted(set(own) - set(usable)))
    return model


def _class_indices(labels: np.ndarray, n: int) -> torch.Tensor:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have one value per image, shape ({n},); got {labels.shape}")
    if not np.isin(labels, (HEALTHY, UNHEALTHY)).all():
        raise ValueError(
            f"labels must be schema labels {HEALTHY} (healthy) / {UNHEALTHY} (unhealthy); "
            f"got values {np.unique(labels)[:5]}"
        )
    return torch.as_tensor(labels.astype(np.int64) - 1)


def _as_images(images: np.ndarray) -> torch.Tensor:
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be a (N, H, W) batch of slices, got shape {images.shape}")
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    return torch.as_tensor(images, dtype=torch.float32)[:, None]


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
    widen_factor: float = 1.0,
) -> nn.Module:
    """Train the healthy/unhealthy ResNet-18 with Adam and cross-entropy.

    Args:
        images: (N, H, W) scaled PET slices in [0, 1] (H, W ≥ 16).
        labels: (N,) schema labels, 1 healthy / 2 unhealthy.
        epochs: passes over the data.
        batch_size: slices per step.
        lr: Adam learning rate.
        seed: seeds the initialisation and the shuffling (bitwise reproducible on CPU).
        device: where to train.
        weights: optional local initial weights (see :func:`build_classifier`).
        widen_factor: channel multiplier of the network (1.0 = standard ResNet-18).

    Returns:
        The trained model in eval mode, on ``device``.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs ≥ 1, batch_size ≥ 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    x = _as_images(images)
    y = _class_indices(labels, x.shape[0])
    if x.shape[0] == 0:
        raise ValueError("no images to train on")
    torch.manual_seed(seed)  # the initialisation draws from the global generator
    model = build_classifier(weights, widen_factor=widen_factor).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        total = 0.0
        for start in range(0, x.shape[0], batch_size):
            idx = order[start: start + batch_size]
            if idx.numel() < 2 and x.shape[0] >= 2:
                continue  # BatchNorm cannot train on a batch of one
            logits = model(x[idx].to(device))
            loss = F.cross_entropy(logits, y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * idx.numel()
        logger.info("classifier epoch %d/%d: loss %.4f", epoch + 1, epochs, total / x.shape[0])
    # BatchNorm's running statistics trail the weights by an exponential average (momentum 0.1):
    # after short trainings the eval-mode network can disagree with the trained one (a toy run
    # here went from 100 % train-mode accuracy to chance). One pass that recomputes them as a
    # plain average over the training data for the final weights removes that lag.
    with torch.no_grad():
        batches = (x[s: s + batch_size].to(device) for s in range(0, x.shape[0], batch_size))
        torch.optim.swa_utils.update_bn(batches, model)
    return model.eval()


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
        model: a classifier from :func:`train_classifier` / :func:`build_classifier`.
        images: (N, H, W) scaled PET slices.
        target_layer: name of the module whose activation is explained (a child of ``model``).
        class_index: the explained logit (default 1, "unhealthy").
        batch_size: slices per forward/backward pass.

    Returns:
        (N, H, W) float32 in [0, 1].
    """
    x = _as_images(images)
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
