"""The trainer of each trained baseline (no Ray): one :class:`~igconda.baselines.trainer_base.
BaselineTrainer` per ``--method`` of ``python -m ray_jobs.train_baseline``, around the method's
own per-epoch functions (see the table in :mod:`igconda.baselines.trainers`, which builds them
from a study config).
"""

from __future__ import annotations

from pathlib import Path

import torch

from igconda import checkpoint as ckpt
from igconda.baselines import resnet_classifier, supervised
from igconda.baselines.dpm_classifier_guidance import ARCHITECTURE_KEY, save_noisy_classifier
from igconda.baselines.fanogan_training import (
    FAnoGANTrainer,
    encoder_loss,
    frozen,
    healthy_images,
)
from igconda.baselines.fitting import seeded
from igconda.baselines.trainer_base import BaselineTrainer, NetworkTrainer, Sums, train_state
from igconda.data.schema import HEALTHY
from igconda.diffusion.classifier_training import evaluate_classifier, train_classifier_epoch
from igconda.diffusion.schedule import NoiseSchedule
from igconda.evaluation import HIRESCAM
from igconda.models.noisy_classifier import NoisyClassifier
from igconda.train_loop import TRAIN_COLUMNS, VALID_COLUMNS, epoch_generator, validation_draw


class HiResCamTrainer(NetworkTrainer):
    """ResNet-18 on the slice labels (cross-entropy, the classes weighted as its settings say);
    BatchNorm refreshed before validation."""

    method, module = HIRESCAM, resnet_classifier
    save_fn = staticmethod(resnet_classifier.save_classifier)
    min_batch_rows = 2
    needs_batchnorm_pass = True

    def __init__(self, study, settings, device, rank):
        super().__init__(study, settings, device, rank)
        weights = study.baselines.hirescam_weights or None
        self.model, self.optimizer, self.settings = resnet_classifier.create_training(
            settings, weights=weights, device=device)

    def loss_options(self):
        return {"unhealthy_weight": self.settings.unhealthy_weight}

    def recompute_batchnorm(self, batches):
        resnet_classifier.recompute_batchnorm(self.model, batches, device=self.device)


class SupervisedTrainer(NetworkTrainer):
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
        self.optimizer.load_state_dict(train_state(directory)["optimizer"])
        self._restore_progress(directory)
