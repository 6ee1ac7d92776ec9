"""ResNet-18 healthy/unhealthy classifier + HiResCAM anomaly maps (paper §3.3 baseline).

The paper fine-tunes an ImageNet-pretrained ResNet-18 to classify slices as healthy or
unhealthy and uses HiResCAM of the "unhealthy" logit as the anomaly map. Here:

* the network is MONAI's ``resnet18(spatial_dims=2, n_input_channels=1, num_classes=2)``. With
  MONAI's defaults (7×7 stem at stride 1, then max-pool) the last stage ``layer4`` is H/16 × W/16:
  4 × 4 for the 64 × 64 slices of the paper's preprocessing, which bounds how sharp the CAM is.
  At the CPU configs' 32 × 32 slices it is 2 × 2, so the explained stage is a setting
  (``baselines.hirescam_target_layer``; ``layer3`` keeps the paper's 4 × 4 grid there);
* the cross-entropy weighs the unhealthy class by ``ClassifierConfig.unhealthy_weight`` (the
  training job balances the train split's classes with it when ``train.balance_classes``, as
  IgCONDA's training oversamples them);
* ImageNet weights are never downloaded: :func:`build_classifier` accepts a local state dict (a
  torchvision ``resnet18`` checkpoint works: its RGB stem is summed to one channel and its
  1000-class head dropped), and trains from scratch otherwise. :func:`create_training` records
  which in the :class:`ClassifierConfig` saved with the checkpoint (the file's name and SHA-256,
  or empty for from scratch);
* HiResCAM (Draelos & Carin 2020) is written out with hooks instead of using ``pytorch-grad-cam``
  (PyPI ``grad-cam``): that package is not a dependency of the project, and it imports torchvision
  and OpenCV when loaded (``pytorch_grad_cam.utils.image``), two large dependencies for a method
  of a few lines. The formula is the same as its ``HiResCAM``: ``ReLU(Σ_c ∂y/∂A_c ⊙ A_c)`` at the
  target layer, min–max normalised per slice to [0, 1] (its ``scale_cam_image``); the map is
  upsampled bilinearly with torch before the normalisation rather than with ``cv2.resize`` after.

Training is one worker's epoch over decoded batches (:func:`train_epoch`, cross-entropy on the
slice labels; :func:`validation_sums` on held-out ones), then :func:`recompute_batchnorm`, then
:func:`save_classifier`; :func:`train_classifier` does all of it for slices held in memory.
:class:`HiResCamMethod` is the :class:`igconda.anomaly_methods.AnomalyMethod` named ``hirescam``.

Labels follow :mod:`igconda.data.schema`: 1 healthy, 2 unhealthy; the network's class index is
``label - 1``, so logit 1 is "unhealthy".

``python -m ray_jobs.train_baseline --method hirescam`` trains it with DDP over Ray Data shards
(:class:`igconda.baselines.trainers.HiResCamTrainer`) and ``python -m ray_jobs.score_method
--method hirescam`` scores it on the test split with a τ calibrated on tune; what remains (issue
10) is the comparison stage that reads every method's scores back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import resnet18
from torch import nn

from igconda import checkpoint as ckpt
from igconda.baselines.fitting import loss_sums, seeded
from igconda.baselines.fitting import train_epoch as fit_epoch
from igconda.data.schema import HEALTHY, UNHEALTHY
from igconda.evaluation import HIRESCAM
from igconda.slice_batch import batch_images
from igconda.train_loop import EpochStats

logger = logging.getLogger(__name__)

#: Network output index of the "unhealthy" class (schema label 2).
UNHEALTHY_INDEX = UNHEALTHY - 1


@dataclass(frozen=True)
class ClassifierConfig:
    """Settings of the classifier (stored in its checkpoint's ``config.yaml``).

    Attributes:
        widen_factor: channel multiplier (1.0 is the standard ResNet-18 the paper uses; smaller
            values give the cheap networks of the tests). Pretrained weights need 1.0.
        lr: Adam learning rate.
        seed: seeds the initial weights (of the parts no pretrained tensor replaces).
        pretrained_file: the name of the local file the initial weights came from (e.g.
            torchvision's ImageNet ``resnet18``); empty when trained from scratch. Set by
            :func:`create_training`.
        pretrained_sha256: that file's SHA-256; empty when trained from scratch.
        unhealthy_weight: the cross-entropy weight of an unhealthy slice (a healthy one weighs 1).
            Unhealthy slices are a minority of a whole-body scan (~10 % of the demo's): trained
            unweighted, the classifier calls most unhealthy slices healthy and its "unhealthy"
            logit has little positive evidence left to explain. ``n_healthy / n_unhealthy`` of the
            train split balances the classes without the extra steps of oversampling (the
            training job sets it so when ``train.balance_classes``).
    """

    widen_factor: float = 1.0
    lr: float = 1e-3
    seed: int = 0
    pretrained_file: str = ""
    pretrained_sha256: str = ""
    unhealthy_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.widen_factor > 0 or not self.lr > 0 or not self.unhealthy_weight > 0:
            raise ValueError(f"widen_factor, lr and unhealthy_weight must be positive; got "
                             f"{self.widen_factor}, {self.lr}, {self.unhealthy_weight}")

    @property
    def pretrained(self) -> bool:
        """Whether the initial weights came from a file rather than from scratch."""
        return bool(self.pretrained_sha256)


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def create_training(config: ClassifierConfig, *, weights: str | Path | None = None,
                    device: torch.device | str = "cpu",
                    ) -> tuple[nn.Module, torch.optim.Optimizer, ClassifierConfig]:
    """The network (seeded, from ``weights`` when given) on ``device``, its Adam optimiser, and
    ``config`` recording where the initial weights came from (what to save with the model).

    Args:
        config: the settings; its ``pretrained_*`` fields are replaced by this call's record.
        weights: optional local initial weights (see :func:`build_classifier`); never downloaded.
        device: where the network is put.
    """
    model = seeded(config.seed, lambda: build_classifier(weights, widen_factor=config.widen_factor))
    record = ({"pretrained_file": Path(weights).name, "pretrained_sha256": _sha256(Path(weights))}
              if weights is not None else {"pretrained_file": "", "pretrained_sha256": ""})
    model = model.to(device)
    return (model, torch.optim.Adam(model.parameters(), lr=config.lr),
            dataclasses.replace(config, **record))


def class_loss(unhealthy_weight: float = 1.0):
    """``batch_loss(model, batch)``: the batch's cross-entropy on its schema labels, an unhealthy
    slice weighted ``unhealthy_weight`` (a weighted mean: Σ wᵢ lossᵢ / Σ wᵢ)."""
    weight = torch.tensor([1.0, float(unhealthy_weight)])

    def batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["image"])
        return F.cross_entropy(logits, batch["label"] - 1, weight=weight.to(logits.device))

    return batch_loss


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                batches: Iterable[Mapping[str, torch.Tensor]], *,
                device: torch.device | str = "cpu", unhealthy_weight: float = 1.0) -> EpochStats:
    """One epoch of cross-entropy steps over batches with ``image`` (B, 1, H, W) and schema
    ``label`` (B,) (1 healthy / 2 unhealthy), as :func:`igconda.train_loop.decode_slice_batch`
    gives them, unhealthy slices weighted ``unhealthy_weight``. BatchNorm in training mode needs
    more than one value per channel: with layer4 at 1 × 1 (16 × 16 slices) a batch of one row
    fails, so drop a last partial batch of one."""
    return fit_epoch(model, optimizer, batches, class_loss(unhealthy_weight), device=device)


def validation_sums(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                    device: torch.device | str = "cpu", unhealthy_weight: float = 1.0,
                    ) -> tuple[float, int]:
    """Σ (batch cross-entropy × batch size) and the row count, in eval mode, weighted as in
    training so that the best checkpoint is chosen by the objective it was trained on."""
    return loss_sums(model, batches, class_loss(unhealthy_weight), device=device)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                        device: torch.device | str = "cpu") -> None:
    """Set BatchNorm's running statistics to plain averages over ``batches``' images.

    BatchNorm's running statistics trail the weights by an exponential average (momentum 0.1):
    after short trainings the eval-mode network can disagree with the trained one (a toy run
    here went from 100 % train-mode accuracy to chance). One pass over the training data with
    the final weights removes that lag; call it before saving the model for inference.
    """
    torch.optim.swa_utils.update_bn((b["image"].to(device) for b in batches), model)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    config: ClassifierConfig,
    *,
    epochs: int,
    batch_size: int,
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
) -> tuple[nn.Module, ClassifierConfig]:
    """Train the healthy/unhealthy ResNet-18 on slices held in memory (the epoch pieces above).

    Args:
        images: (N, H, W) scaled PET slices in [0, 1] (H, W ≥ 16).
        labels: (N,) schema labels, 1 healthy / 2 unhealthy.
        config: the settings (``seed`` also seeds the shuffling: bitwise reproducible on CPU).
        epochs: passes over the data.
        batch_size: slices per step (a last batch of one slice is left out of the epoch).
        device: where to train.
        weights: optional local initial weights (see :func:`build_classifier`).

    Returns:
        The trained model in eval mode on ``device``, and the config to save with it.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"need epochs ≥ 1, batch_size ≥ 1; got {epochs}, {batch_size}")
    x = _as_images(images)
    y = _class_indices(labels, x.shape[0]) + 1
    if x.shape[0] == 0:
        raise ValueError("no images to train on")
    model, optimizer, config = create_training(config, weights=weights, device=device)
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        batches = [{"image": x[idx], "label": y[idx]} for idx in order.split(batch_size)
                   if idx.numel() >= 2 or x.shape[0] < 2]
        stats = train_epoch(model, optimizer, batches, device=device,
                            unhealthy_weight=config.unhealthy_weight)
        logger.info("classifier epoch %d/%d: loss %.4f", epoch + 1, epochs,
                    stats.loss_sum / max(stats.samples, 1))
    recompute_batchnorm(model, [{"image": x[s: s + batch_size]}
                                for s in range(0, x.shape[0], batch_size)], device=device)
    return model.eval(), config


def save_classifier(directory: str | Path, model: nn.Module, config: ClassifierConfig, *,
                    optimizer: torch.optim.Optimizer | None = None, epoch: int = 0,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint folder: weights, ``config`` (with its pretrained-weights record),
    and ``{epoch, optimizer}`` to resume."""
    return ckpt.save_baseline_checkpoint(directory, method=HIRESCAM, settings=config, model=model,
                                         optimizer=optimizer, epoch=epoch, metadata=metadata)


def load_classifier(directory: str | Path, device: torch.device | str = "cpu",
                    ) -> tuple[nn.Module, ClassifierConfig]:
    """The network of a :func:`save_classifier` folder, in eval mode on ``device``, and its
    config. The optimiser state to resume is :func:`igconda.checkpoint.load_train_state`'s."""
    config, weights = ckpt.load_baseline_checkpoint(directory, method=HIRESCAM,
                                                    settings_type=ClassifierConfig)
    model = build_classifier(widen_factor=config.widen_factor)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ckpt.CheckpointError(f"{directory}: weights do not match the stored config: {err}"
                                   ) from None
    return model.to(device).eval(), config


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
