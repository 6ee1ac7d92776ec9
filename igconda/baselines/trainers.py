"""One worker's training of a trained baseline, behind one interface (no Ray).

``python -m ray_jobs.train_baseline`` drives every trained baseline with the same Ray Train loop
(:mod:`ray_jobs.train_baseline_worker`); what differs per method lives here, as a
:class:`BaselineTrainer` around the method's own per-epoch functions:

=================  ==========================================  ===============================
``--method``       per-epoch functions                          checkpoint folder (scored as)
=================  ==========================================  ===============================
``hirescam``       :mod:`~igconda.baselines.classifier_cam`      ``save_classifier`` (hirescam)
``supervised``     :mod:`~igconda.baselines.supervised`          ``save_supervised`` (supervised)
``fanogan``        :mod:`~igconda.baselines.fanogan_training`    f-AnoGAN folder (fanogan)
``dpm_classifier`` :mod:`~igconda.diffusion.classifier_training` ``save_noisy_classifier``
                                                                 (dpm_cg, with a DPM trained by
                                                                 ``ray_jobs.train`` with
                                                                 ``model.conditioning: none``)
=================  ==========================================  ===============================

Batches are :func:`igconda.train_loop.decode_slice_batch` dicts (``image`` (B, 1, H, W),
``label`` (B,), ``row_key`` (B,) on validation batches, ``mask`` (B, 1, H, W) when
:attr:`BaselineTrainer.with_mask`). A trainer returns per-epoch *sums* (``{key: (total, rows)}``)
so that the job can add them over workers before dividing. The settings come from the study
config's ``baselines`` section (:mod:`igconda.baselines.settings`) via :func:`method_settings`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from igconda import checkpoint as ckpt
from igconda.baselines import classifier_cam, supervised
from igconda.baselines.dpm_classifier_guidance import ARCHITECTURE_KEY, save_noisy_classifier
from igconda.baselines.fanogan import FAnoGANConfig
from igconda.baselines.fanogan_training import (
    FAnoGANTrainer,
    encoder_loss,
    frozen,
    healthy_images,
)
from igconda.baselines.fitting import seeded
from igconda.config import ConfigError, StudyConfig
from igconda.data.schema import HEALTHY, healthy_per_unhealthy
from igconda.diffusion.classifier_training import evaluate_classifier, train_classifier_epoch
from igconda.diffusion.schedule import NoiseSchedule
from igconda.models.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from igconda.train_loop import TRAIN_COLUMNS, VALID_COLUMNS, epoch_generator, validation_draw

#: ``--method`` values of the training job.
TRAINED_METHODS = ("hirescam", "supervised", "fanogan", "dpm_classifier")
Sums = dict[str, tuple[float, float]]


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
            return classifier_cam.ClassifierConfig(
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


def rows_of_rank(batches: Iterable[Mapping[str, torch.Tensor]], rank: int,
                 world_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The rows of each batch with ``row_key % world_size == rank`` (empty batches skipped):
    every worker reads the whole valid split and each row is scored by exactly one worker."""
    for batch in batches:
        mine = batch["row_key"] % world_size == rank
        if bool(mine.any()):
            yield {k: v[mine.to(v.device)] for k, v in batch.items()}


class BaselineTrainer:
    """The networks, optimizers and progress of one worker for one baseline.

    Attributes:
        with_mask: batches must carry ``mask`` (decode with ``mask=True``).
        train_columns, valid_columns: the slice columns read from each split.
        min_batch_rows: smaller training batches are skipped (BatchNorm needs 2 rows).
        train_filter: a Ray Data expression the train split is filtered by before sharding, or
            None.
        oversample: with ``train.balance_classes``, each epoch repeats the unhealthy slices to
            balance the classes, as IgCONDA's training does (for a network whose loss has no
            class weight: the supervised UNet learns lesions only from unhealthy slices).
        ddp_modules: attribute names of the networks the job wraps in DDP.
        sync_optimizers: optimizers whose gradients the job averages over workers before each
            step (for networks DDP cannot wrap).
        epoch: completed epochs; best_valid_loss, history: as saved in every checkpoint.
    """

    with_mask = False
    train_columns: tuple[str, ...] = TRAIN_COLUMNS
    valid_columns: tuple[str, ...] = VALID_COLUMNS
    min_batch_rows = 1
    train_filter: str | None = None
    oversample = False
    ddp_modules: tuple[str, ...] = ("model",)
    needs_batchnorm_pass = False

    def __init__(self, study: StudyConfig, settings: Any, device: torch.device, rank: int) -> None:
        self.study, self.settings, self.device, self.rank = study, settings, device, rank
        self.epoch, self.best_valid_loss, self.history = 0, math.inf, []
        self.sync_optimizers: list[torch.optim.Optimizer] = []

    @property
    def total_epochs(self) -> int:
        return self.study.baselines.epochs

    def train_epoch(self, batches: Iterable[Mapping[str, torch.Tensor]], epoch: int) -> Sums:
        """One epoch over this worker's batches → ``{metric: (total, rows)}`` (``train_loss``
        always; the same keys on every worker)."""
        raise NotImplementedError

    def validation_sums(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[float, int] | None:
        """(Σ loss × rows, rows) over validation batches, or None when this epoch's model has no
        comparable validation loss (f-AnoGAN's WGAN-GP stage)."""
        raise NotImplementedError

    def recompute_batchnorm(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Refresh BatchNorm statistics from training batches (only if ``needs_batchnorm_pass``)."""

    def save(self, directory: Path, metadata: dict[str, Any]) -> Path:
        raise NotImplementedError

    def restore(self, directory: Path) -> None:
        raise NotImplementedError

    def progress(self) -> dict[str, Any]:
        """What every checkpoint records of the run (its ``metadata.json``)."""
        return {"epoch": self.epoch, "best_valid_loss": self.best_valid_loss,
                "history": list(self.history)}

    def _restore_progress(self, directory: Path) -> None:
        meta = ckpt.load_metadata(directory)
        self.epoch = int(meta.get("epoch", 0))
        self.best_valid_loss = float(meta.get("best_valid_loss", math.inf))
        self.history = list(meta.get("history", []))


class _NetworkTrainer(BaselineTrainer):
    """One network trained by a module with ``train_epoch`` / ``validation_sums`` and a
    ``save_*`` / checkpoint folder of :func:`igconda.checkpoint.save_baseline_checkpoint`."""

    module: Any  # classifier_cam or supervised
    save_fn: Any

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments of the module's ``train_epoch`` / ``validation_sums``."""
        return {}

    def train_epoch(self, batches, epoch):
        batches = (b for b in batches if len(b["image"]) >= self.min_batch_rows)
        stats = self.module.train_epoch(self.model, self.optimizer, batches, device=self.device,
                                        **self.loss_options())
        self.epoch = epoch
        return {"train_loss": (stats.loss_sum, stats.samples)}

    def validation_sums(self, batches):
        return self.module.validation_sums(self.model, batches, device=self.device,
                                           **self.loss_options())

    def save(self, directory, metadata):
        return type(self).save_fn(directory, self.model, self.settings, optimizer=self.optimizer,
                                  epoch=self.epoch, metadata={**self.progress(), **metadata})

    def restore(self, directory):
        settings, weights = ckpt.load_baseline_checkpoint(
            directory, method=self.method, settings_type=type(self.settings), device=self.device)
        getattr(self.model, "module", self.model).load_state_dict(weights)
        self.settings = settings
        self.optimizer.load_state_dict(_train_state(directory)["optimizer"])
        self._restore_progress(directory)


class HiResCamTrainer(_NetworkTrainer):
    """ResNet-18 on the slice labels (cross-entropy, the classes weighted as its settings say);
    BatchNorm refreshed before validation."""

    method, module = classifier_cam.HIRESCAM, classifier_cam
    save_fn = staticmethod(classifier_cam.save_classifier)
    min_batch_rows = 2
    needs_batchnorm_pass = True

    def __init__(self, study, settings, device, rank):
        super().__init__(study, settings, device, rank)
        weights = study.baselines.hirescam_weights or None
        self.model, self.optimizer, self.settings = classifier_cam.create_training(
            settings, weights=weights, device=device)

    def loss_options(self):
        return {"unhealthy_weight": self.settings.unhealthy_weight}

    def recompute_batchnorm(self, batches):
        classifier_cam.recompute_batchnorm(self.model, batches, device=self.device)


class SupervisedTrainer(_NetworkTrainer):
    """The MONAI UNet on the lesion masks (Dice + BCE), for ``baselines.supervised_epochs``
    (0: ``baselines.epochs``), its unhealthy slices oversampled with ``train.balance_classes``."""

    method, module = supervised.SUPERVISED, supervised
    save_fn = staticmethod(supervised.save_supervised)
    with_mask = True
    oversample = True
    train_columns = (*TRAIN_COLUMNS, "mask")
    valid_columns = (*VALID_COLUMNS, "mask")

    def __init__(self, study, settings, device, rank):
        super().__init__(study, settings, device, rank)
        self.model, self.optimizer = supervised.create_training(settings, device)

    @property
    def total_epochs(self) -> int:
        return self.study.baselines.supervised_epochs or self.study.baselines.epochs


class FAnoGANBaseline(BaselineTrainer):
    """f-AnoGAN: ``baselines.epochs`` WGAN-GP epochs, then ``fanogan_encoder_epochs`` izi_f
    encoder epochs. Only encoder epochs have a validation loss (the izi_f loss on the valid
    split's healthy slices, G and D fixed), so the best checkpoint always has a trained encoder.

    DDP cannot wrap G and D: the critic's gradient penalty differentiates through D twice and the
    generator update freezes D's parameters, which DDP's gradient buckets do not allow. The job
    averages gradients over workers before each optimizer step instead (``sync_optimizers``),
    which is what DDP computes; the weights start identical (seeded) and stay so.
    """

    method = "fanogan"
    ddp_modules = ()
    # f-AnoGAN models healthy anatomy; FAnoGANTrainer drops unhealthy rows of every batch, and
    # dropping them before sharding also gives every worker full batches and the same number of
    # steps, which averaging gradients over workers needs.
    train_filter = f"label == {HEALTHY}"

    def __init__(self, study, settings, device, rank):
        super().__init__(study, settings, device, rank)
        self.inner = FAnoGANTrainer.create(settings, device, rank)
        self.sync_optimizers = [self.inner.generator_optimizer, self.inner.critic_optimizer,
                                self.inner.encoder_optimizer]

    @property
    def total_epochs(self):
        return self.study.baselines.epochs + self.study.baselines.encoder_epochs

    def _gan_stage(self, epoch: int) -> bool:
        return epoch <= self.study.baselines.epochs

    def train_epoch(self, batches, epoch):
        if self._gan_stage(epoch):
            stats = self.inner.train_gan_epoch(batches, epoch)
            keys, main = ("critic_loss", "wasserstein", "gradient_penalty", "generator_loss"), "critic_loss"
        else:
            stats = self.inner.train_encoder_epoch(batches, epoch - self.study.baselines.epochs)
            keys, main = ("encoder_loss", "image_loss", "feature_loss"), "encoder_loss"
        self.epoch = epoch
        sums: Sums = {k: (stats.totals.get(k, 0.0), stats.rows.get(k, 0)) for k in keys}
        return {"train_loss": sums[main], **sums}

    @torch.no_grad()
    def validation_sums(self, batches):
        if self._gan_stage(self.epoch):
            return None
        total, count = 0.0, 0
        inner = self.inner
        with frozen(inner.generator, inner.critic, inner.encoder):
            for batch in batches:
                images, _ = healthy_images(batch)
                if len(images):
                    loss, _ = encoder_loss(inner.generator, inner.critic, inner.encoder,
                                           images.to(self.device), self.settings.kappa)
                    total, count = total + float(loss) * len(images), count + len(images)
        return total, count

    def save(self, directory, metadata):
        self.inner.history = list(self.history)
        return self.inner.save(directory, {**self.progress(), **metadata})

    def restore(self, directory):
        self.inner.restore(directory)
        self._restore_progress(directory)


class NoisyClassifierTrainer(BaselineTrainer):
    """The noisy classifier p(y | x_t, t) of DPM + classifier guidance, on the DPM's schedule
    (``train`` section of the same study); validated at fixed per-row draws."""

    method = "dpm_classifier"

    def __init__(self, study, settings, device, rank):
        super().__init__(study, settings, device, rank)
        self.model = seeded(study.baselines.seed, lambda: NoisyClassifier(settings)).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=study.baselines.classifier_lr)
        self.schedule = NoiseSchedule.from_config(study.train)

    def train_epoch(self, batches, epoch):
        generator = epoch_generator(self.study.baselines.seed, epoch, self.rank, self.device)
        stats = train_classifier_epoch(self.model, self.optimizer, self.schedule, batches,
                                       generator=generator, device=self.device)
        self.epoch = epoch
        return {"train_loss": (stats.loss_sum, stats.samples),
                "train_accuracy": (stats.correct, stats.samples)}

    def validation_sums(self, batches):
        total = None
        for batch in batches:
            x0 = batch["image"].to(self.device)
            timesteps, noise = validation_draw(batch["row_key"].cpu(), tuple(x0.shape[1:]),
                                               self.schedule.num_train_timesteps,
                                               self.study.baselines.seed)
            total = evaluate_classifier(self.model, self.schedule, x0, batch["label"].to(self.device),
                                        timesteps=timesteps.to(self.device),
                                        noise=noise.to(self.device), stats=total)
        return (total.loss_sum, total.samples) if total is not None else (0.0, 0)

    def save(self, directory, metadata):
        return save_noisy_classifier(directory, self.model, self.study,
                                     train_state={"epoch": self.epoch,
                                                  "optimizer": self.optimizer.state_dict()},
                                     metadata={**self.progress(), **metadata})

    def restore(self, directory):
        stored = ckpt.load_metadata(directory).get(ARCHITECTURE_KEY)
        if stored != self.settings.to_dict():
            raise ckpt.CheckpointError(f"{directory}: classifier architecture {stored} differs from "
                                       f"the run's {self.settings.to_dict()}")
        module = getattr(self.model, "module", self.model)
        module.load_state_dict(ckpt.load_weights(Path(directory) / ckpt.MODEL_FILE, self.device))
        self.optimizer.load_state_dict(_train_state(directory)["optimizer"])
        self._restore_progress(directory)


def _train_state(directory: str | Path) -> dict[str, Any]:
    state = ckpt.load_train_state(directory)
    if state is None:
        raise ckpt.CheckpointError(f"{directory}: no {ckpt.STATE_FILE}; cannot resume training")
    return state


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
    _train_state(directory)

