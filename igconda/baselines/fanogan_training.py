"""f-AnoGAN training without Ray: the WGAN-GP stage, then the izi_f encoder stage.

The two stages of Schlegl et al. (2019), §2.2-2.3:

1. **WGAN-GP on healthy slices** (Gulrajani et al. 2017): each batch is one critic update,
   ``L_D = mean D(G(z)) − mean D(x) + λ · mean (‖∇D(x̂)‖₂ − 1)²`` with x̂ drawn uniformly on the
   segments between real and generated slices, and every ``n_critic``-th critic update is
   followed by a generator update, ``L_G = −mean D(G(z))``. Adam, lr 1e-4, betas (0, 0.9).
2. **izi_f encoder** with G and D frozen:
   ``L_E = MSE(x, G(E(x))) + κ · MSE(f_D(x), f_D(G(E(x))))``, f_D the critic's penultimate
   features; RMSprop, lr 5e-5 (the reference code's optimizer and rate).

Both stages see healthy slices only: f-AnoGAN's premise is a model of normal anatomy. Batches
are dicts of :func:`igconda.train_loop.decode_slice_batch` (``image`` (B, 1, H, W), ``label``
(B,)); unhealthy rows are dropped and counted (:attr:`EpochStats.unhealthy_skipped`), so a job
can feed the train split as it is, and a batch without labels is refused.

:class:`FAnoGANTrainer` holds the three networks and their optimizers of one worker, like
:class:`igconda.train_loop.TrainingSession`: its ``train_gan_epoch`` / ``train_encoder_epoch``
are what a Ray Train worker calls, and ``save`` / ``restore`` write and read the folder of
:mod:`igconda.baselines.fanogan`. The draws of epoch ``e`` on rank ``r`` come from a generator
seeded with ``(seed, e, r)``, so a restored run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from igconda import checkpoint as ckpt
from igconda.baselines.fanogan import (
    CONFIG_FILE,
    CRITIC_FILE,
    ENCODER_FILE,
    GENERATOR_FILE,
    FAnoGANConfig,
    build_networks,
    load_fanogan_config,
    load_into,
)
from igconda.data.schema import HEALTHY
from igconda.io_utils import replace_dir
from igconda.train_loop import epoch_generator

# --------------------------------------------------------------------------------------------
# One update each
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Within the block, ``modules`` are in eval mode and their parameters need no gradient;
    both are restored afterwards. Gradients still flow *through* them to what feeds them."""
    params = [p for m in modules for p in m.parameters()]
    flags, modes = [p.requires_grad for p in params], [m.training for m in modules]
    for p in params:
        p.requires_grad_(False)
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def sample_latent(n: int, latent_dim: int, rng: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:
    """z ~ N(0, I), (n, latent_dim) (the reference's ``RAND_SAMPLING = 'normal'``)."""
    return torch.randn(n, latent_dim, generator=rng, device=device)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     rng: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP's penalty, mean over the batch of (‖∇ₓ D(x̂)‖₂ − 1)², without the weight λ.

    Args:
        critic: returns ``(scores (N,), features)`` for (N, 1, H, W) slices.
        real, fake: (N, 1, H, W) slices; x̂ = α · real + (1 − α) · fake, α ~ U(0, 1) per slice.
        rng: draws α.

    Returns:
        A scalar with a graph back to the critic's parameters (``create_graph``), so that the
        critic's loss can be differentiated through it.
    """
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=rng, device=real.device)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    scores, _ = critic(mixed)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def critic_step(generator: nn.Module, critic: nn.Module, optimizer: torch.optim.Optimizer,
                real: torch.Tensor, *, latent_dim: int, lambda_gp: float,
                rng: torch.Generator | None = None) -> dict[str, float]:
    """One critic update on a batch of real (N, 1, H, W) slices and as many generated ones.

    Returns:
        ``critic_loss`` (L_D), ``wasserstein`` (mean D(x) − mean D(G(z)), the critic's estimate
        of the distance, which should shrink as G improves) and ``gradient_penalty``.
    """
    with torch.no_grad():
        fake = generator(sample_latent(real.shape[0], latent_dim, rng, real.device))
    real_scores, _ = critic(real)
    fake_scores, _ = critic(fake)
    penalty = gradient_penalty(critic, real, fake, rng)
    distance = real_scores.mean() - fake_scores.mean()
    loss = -distance + lambda_gp * penalty
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"critic_loss": loss.item(), "wasserstein": distance.item(),
            "gradient_penalty": penalty.item()}


def generator_step(generator: nn.Module, critic: nn.Module, optimizer: torch.optim.Optimizer,
                   batch_size: int, *, latent_dim: int, device: torch.device,
                   rng: torch.Generator | None = None) -> dict[str, float]:
    """One generator update, L_G = −mean D(G(z)) over ``batch_size`` draws of z (critic frozen,
    so its parameters collect no gradient). Returns ``generator_loss``."""
    # The critic has no layer that behaves differently in eval mode (layer norm, leaky ReLU).
    with frozen(critic):
        scores, _ = critic(generator(sample_latent(batch_size, latent_dim, rng, device)))
        loss = -scores.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"generator_loss": loss.item()}


def encoder_loss(generator: nn.Module, critic: nn.Module, encoder: nn.Module, real: torch.Tensor,
                 kappa: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The izi_f loss of real (N, 1, H, W) slices: ``(L_E, {"image_loss", "feature_loss"})``.

    Both terms are means over their elements, as in the reference (``MSE`` over pixels, and over
    the critic's features)."""
    reconstruction = generator(encoder(real))
    _, real_features = critic(real)
    _, reconstruction_features = critic(reconstruction)
    image = F.mse_loss(reconstruction, real)
    feature = F.mse_loss(reconstruction_features, real_features)
    return image + kappa * feature, {"image_loss": image.item(), "feature_loss": feature.item()}


def encoder_step(generator: nn.Module, critic: nn.Module, encoder: nn.Module,
                 optimizer: torch.optim.Optimizer, real: torch.Tensor,
                 kappa: float) -> dict[str, float]:
    """One encoder update with G and D frozen: eval mode (G's batch norm uses, and keeps, its
    running statistics) and no gradient for their parameters. Returns ``encoder_loss`` and its
    two terms."""
    with frozen(generator, critic):
        encoder.train()
        loss, parts = encoder_loss(generator, critic, encoder, real, kappa)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"encoder_loss": loss.item(), **parts}


def healthy_images(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The healthy rows of a decoded batch: ``(images (B', 1, H, W), unhealthy rows dropped)``.

    Raises:
        ValueError: the batch has no ``label`` column (health cannot be checked).
    """
    if "label" not in batch:
        raise ValueError("f-AnoGAN trains on healthy slices only and this batch has no 'label' "
                         f"to tell them (it has {sorted(batch)})")
    healthy = torch.as_tensor(batch["label"]).to(batch["image"].device) == HEALTHY
    return batch["image"][healthy], int((~healthy).sum())


# --------------------------------------------------------------------------------------------
# The trainer of one worker
# --------------------------------------------------------------------------------------------


@dataclass
class EpochStats:
    """What one worker saw in one epoch of either stage (summed across workers by the caller).

    ``totals[k]`` is Σ over updates of (loss k × rows of that update) and ``rows[k]`` the rows
    behind it: a generator loss exists for one batch in ``n_critic``, so each key has its own.
    """

    totals: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    healthy_rows: int = 0
    unhealthy_skipped: int = 0
    seconds: float = 0.0

    def add(self, losses: Mapping[str, float], n: int) -> None:
        for key, value in losses.items():
            self.totals[key] = self.totals.get(key, 0.0) + value * n
            self.rows[key] = self.rows.get(key, 0) + n

    def means(self) -> dict[str, float]:
        return {key: self.totals[key] / self.rows[key] for key in self.totals if self.rows[key]}


@dataclass
class FAnoGANTrainer:
    """G, D, E and their optimizers on one worker, with save and restore.

    Build it with :meth:`create` (or :meth:`from_folder` to continue a saved run), run
    :meth:`train_gan_epoch` until G is good, then :meth:`train_encoder_epoch`.

    Attributes:
        config: the f-AnoGAN settings (saved with the weights).
        generator, critic, encoder: the networks (unwrapped; a Ray job may wrap them in DDP).
        gan_optimizers: Adam of G and of D; encoder_optimizer: RMSprop of E.
        critic_steps, generator_steps, encoder_steps: updates so far (the generator updates
            after every ``n_critic``-th critic update, counted across epochs).
        gan_epoch, encoder_epoch: completed epochs of each stage.
        history: per-epoch metrics, filled by the caller and saved with the state.
    """

    config: FAnoGANConfig
    generator: nn.Module
    critic: nn.Module
    encoder: nn.Module
    generator_optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer
    encoder_optimizer: torch.optim.Optimizer
    device: torch.device
    rank: int = 0
    critic_steps: int = 0
    generator_steps: int = 0
    encoder_steps: int = 0
    gan_epoch: int = 0
    encoder_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def create(cls, config: FAnoGANConfig, device: str | torch.device = "cpu",
               rank: int = 0) -> FAnoGANTrainer:
        """A fresh trainer: weights from ``config.seed`` (identical on every rank)."""
        device = torch.device(device)
        generator, critic, encoder = (m.to(device) for m in build_networks(config))
        betas = config.gan_betas
        return cls(config=config, generator=generator, critic=critic, encoder=encoder,
                   generator_optimizer=torch.optim.Adam(generator.parameters(), config.gan_lr, betas),
                   critic_optimizer=torch.optim.Adam(critic.parameters(), config.gan_lr, betas),
                   encoder_optimizer=torch.optim.RMSprop(encoder.parameters(), config.encoder_lr),
                   device=device, rank=rank)

    @classmethod
    def from_folder(cls, directory: str | Path, device: str | torch.device = "cpu",
                    rank: int = 0) -> FAnoGANTrainer:
        """A trainer that continues the run saved in ``directory``."""
        trainer = cls.create(load_fanogan_config(directory), device, rank)
        trainer.restore(directory)
        return trainer

    def _batches(self, batches: Iterable[Mapping[str, torch.Tensor]],
                 stats: EpochStats) -> Iterator[torch.Tensor]:
        """The healthy images of each batch, on the device; counts what it drops."""
        size = self.config.image_size
        for batch in batches:
            images, skipped = healthy_images(batch)
            stats.unhealthy_skipped += skipped
            if images.shape[1:] != (1, size, size):
                raise ValueError(f"f-AnoGAN was built for (B, 1, {size}, {size}) slices, "
                                 f"got {tuple(images.shape)}")
            if len(images):
                stats.healthy_rows += len(images)
                yield images.to(self.device, non_blocking=True)

    def train_gan_epoch(self, batches: Iterable[Mapping[str, torch.Tensor]], epoch: int) -> EpochStats:
        """One pass of the WGAN-GP stage: a critic update per batch, a generator update after
        every ``n_critic``-th.

        Args:
            batches: this worker's decoded batches (``image``, ``label``).
            epoch: the 1-based epoch number (seeds the draws).
        """
        rng = epoch_generator(self.config.seed, epoch, self.rank, self.device)
        stats, start = EpochStats(), time.perf_counter()
        self.generator.train()
        self.critic.train()
        for real in self._batches(batches, stats):
            stats.add(critic_step(self.generator, self.critic, self.critic_optimizer, real,
                                  latent_dim=self.config.latent_dim,
                                  lambda_gp=self.config.lambda_gp, rng=rng), len(real))
            self.critic_steps += 1
            if self.critic_steps % self.config.n_critic == 0:
                stats.add(generator_step(self.generator, self.critic, self.generator_optimizer,
                                         len(real), latent_dim=self.config.latent_dim,
                                         device=self.device, rng=rng), len(real))
                self.generator_steps += 1
        stats.seconds = time.perf_counter() - start
        self.gan_epoch = epoch
        return stats

    def train_encoder_epoch(self, batches: Iterable[Mapping[str, torch.Tensor]],
                            epoch: int) -> EpochStats:
        """One pass of the izi_f stage: an encoder update per batch, G and D unchanged."""
        stats, start = EpochStats(), time.perf_counter()
        for real in self._batches(batches, stats):
            stats.add(encoder_step(self.generator, self.critic, self.encoder,
                                   self.encoder_optimizer, real, self.config.kappa), len(real))
            self.encoder_steps += 1
        stats.seconds = time.perf_counter() - start
        self.encoder_epoch = epoch
        return stats

    # ---- the saved folder ----------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        return {"critic_steps": self.critic_steps, "generator_steps": self.generator_steps,
                "encoder_steps": self.encoder_steps, "gan_epoch": self.gan_epoch,
                "encoder_epoch": self.encoder_epoch}

    def train_state(self) -> dict[str, Any]:
        """Optimizers, counters and history (tensors and plain values: ``weights_only`` loads it)."""
        return {"generator_optimizer": self.generator_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "encoder_optimizer": self.encoder_optimizer.state_dict(),
                "history": list(self.history), **self.counters()}

    def save(self, directory: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write the folder atomically (beside it, then swapped in with
        :func:`igconda.io_utils.replace_dir`)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
            for module, name in ((self.generator, GENERATOR_FILE), (self.critic, CRITIC_FILE),
                                 (self.encoder, ENCODER_FILE)):
                module = getattr(module, "module", module)  # unwrap DDP
                save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                          str(tmp / name))
            torch.save(self.train_state(), tmp / ckpt.STATE_FILE)
            meta = {**self.counters(), "torch_version": torch.__version__, **(metadata or {})}
            (tmp / ckpt.METADATA_FILE).write_text(json.dumps(meta, indent=2))
            replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def restore(self, directory: str | Path) -> None:
        """Load weights, optimizers and counters; CheckpointError if the folder was made with
        another config or lacks a file."""
        directory = Path(directory)
        stored = load_fanogan_config(directory)
        if stored != self.config:
            raise ckpt.CheckpointError(f"{directory}: saved with config {stored}, which differs "
                                       f"from this trainer's {self.config}")
        for module, name in ((self.generator, GENERATOR_FILE), (self.critic, CRITIC_FILE),
                             (self.encoder, ENCODER_FILE)):
            load_into(getattr(module, "module", module), directory / name, self.device)
        state = ckpt.load_train_state(directory)
        if state is None:
            raise ckpt.CheckpointError(f"{directory}: no {ckpt.STATE_FILE}; cannot resume training")
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.encoder_optimizer.load_state_dict(state["encoder_optimizer"])
        for key in self.counters():
            setattr(self, key, int(state[key]))
        self.history = list(state.get("history", []))
