"""f-AnoGAN (Schlegl et al. 2019, Medical Image Analysis 54:30-44): networks, saved models and
the anomaly method.

f-AnoGAN learns what healthy slices look like, then explains a new slice by the closest healthy
slice it can generate: a Wasserstein GAN with gradient penalty (generator G: z → slice, critic D)
is trained on healthy slices only; an encoder E (the paper's izi_f variant) is then trained, with
G and D frozen, so that G(E(x)) reproduces x. On an unhealthy slice G can only produce healthy
anatomy, and the residual |x − G(E(x))| is the anomaly map. The training lives in
:mod:`igconda.baselines.fanogan_training`.

Differences from the reference code (github.com/tSchlegl/f-AnoGAN, TensorFlow, 64 × 64 only):

* DCGAN-style networks (Radford et al. 2016: transposed 4 × 4 convolutions of stride 2 in G,
  strided 4 × 4 convolutions in D and E) instead of the reference's residual blocks, so that any
  power-of-two slice size from 8 up builds with the same code;
* the networks work in the slice value range [0, 1] (G ends in a sigmoid), not in [−1, 1] with
  a tanh: a slice's residual is then directly a map in [0, 1];
* the encoder is layer-normalised like the critic, where the reference uses batch norm: its maps
  then depend on nothing but the slice (no batch statistics, no running averages that lag the
  weights after a short training).

What is built: the networks, their training (per batch and per epoch, without Ray), the saved
folder, and :class:`FAnoGANMethod` (an :class:`igconda.anomaly_methods.AnomalyMethod` named
``fanogan``), trained by ``python -m ray_jobs.train_baseline --method fanogan``
(:class:`igconda.baselines.trainer_methods.FAnoGANBaseline`) and scored by ``python -m
ray_jobs.score_method --method fanogan``; what remains (issue 10) is the comparison stage.

Saved folder (written by :meth:`FAnoGANTrainer.save
<igconda.baselines.fanogan_training.FAnoGANTrainer.save>`)::

    fanogan.json            the FAnoGANConfig (named apart from an IgCONDA checkpoint's
                            config.yaml, so neither folder is ever taken for the other)
    generator.safetensors   G
    critic.safetensors      D
    encoder.safetensors     E
    train_state.pt          optimizers and step counters; torch.load(weights_only=True)
    metadata.json           step counters (the encoder's tells whether E was trained)
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.blocks import Convolution
from torch import nn

from igconda.checkpoint import CheckpointError, load_metadata, load_weights
from igconda.evaluation import FANOGAN
from igconda.slice_batch import batch_images

CONFIG_FILE = "fanogan.json"
GENERATOR_FILE = "generator.safetensors"
CRITIC_FILE = "critic.safetensors"
ENCODER_FILE = "encoder.safetensors"


@dataclass(frozen=True)
class FAnoGANConfig:
    """Network sizes and training settings of f-AnoGAN.

    Defaults are the reference code's (``wgangp_64x64.py``, ``z_encoding_izif.py``): z of 128
    values drawn from N(0, 1), 64 channels at the finest level, λ = 10, five critic updates per
    generator update, Adam with lr 1e-4 and betas (0, 0.9) for G and D (Gulrajani et al. 2017),
    RMSprop with lr 5e-5 for E, κ = 1.

    Attributes:
        image_size: slice height = width, a power of two ≥ 8.
        latent_dim: length of z.
        channels: channels at the finest hidden level; each coarser level doubles them.
        max_channels: cap on the channels of the coarsest levels.
        lambda_gp: weight λ of the gradient penalty.
        n_critic: critic updates per generator update.
        gan_lr, gan_betas: Adam settings of G and D.
        encoder_lr: RMSprop learning rate of E.
        kappa: weight κ of the critic-feature term of the encoder loss.
        seed: seeds the initial weights and every epoch's random draws.
    """

    image_size: int = 64
    latent_dim: int = 128
    channels: int = 64
    max_channels: int = 512
    lambda_gp: float = 10.0
    n_critic: int = 5
    gan_lr: float = 1e-4
    gan_betas: tuple[float, float] = (0.0, 0.9)
    encoder_lr: float = 5e-5
    kappa: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        size = self.image_size
        if size < 8 or size & (size - 1):
            raise ValueError(f"image_size must be a power of two ≥ 8, got {size}")
        if min(self.latent_dim, self.channels, self.max_channels, self.n_critic) < 1:
            raise ValueError("latent_dim, channels, max_channels and n_critic must be ≥ 1")
        if not (self.gan_lr > 0 and self.encoder_lr > 0):
            raise ValueError("learning rates must be positive")
        if len(self.gan_betas) != 2 or not all(0 <= b < 1 for b in self.gan_betas):
            raise ValueError(f"gan_betas must be two values in [0, 1), got {self.gan_betas}")
        if self.lambda_gp < 0 or self.kappa < 0:
            raise ValueError("lambda_gp and kappa must be ≥ 0")
        # JSON gives a list back; keep the frozen dataclass hashable and comparable.
        object.__setattr__(self, "gan_betas", tuple(float(b) for b in self.gan_betas))

    @property
    def levels(self) -> int:
        """Resolution doublings between the 4 × 4 base and the slice: log2(image_size) − 2."""
        return int(math.log2(self.image_size)) - 2

    def level_channels(self, level: int) -> int:
        """Channels at resolution 4 · 2**level (level 0 is 4 × 4, ``levels − 1`` is H/2)."""
        return min(self.channels * 2 ** (self.levels - 1 - level), self.max_channels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FAnoGANConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown f-AnoGAN config keys {unknown}; known: {sorted(known)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------
# MONAI's own GAN nets do not fit: monai.networks.nets.Generator feeds its linear projection of z
# into the first transposed convolution without a normalisation or activation and has no output
# activation, and monai.networks.nets.Critic averages its last feature map into the score, so it
# has no penultimate feature vector for the izi_f loss. The layers are MONAI Convolution blocks.

_LEAKY = ("leakyrelu", {"negative_slope": 0.2})
#: GroupNorm with one group normalises each sample over (C, H, W): the layer norm of the WGAN-GP
#: critic. Batch norm would couple the slices of a batch, which the per-sample gradient penalty
#: assumes they are not (Gulrajani et al. 2017, §4).
_LAYER_NORM = ("group", {"num_groups": 1})


def _downsampling_trunk(config: FAnoGANConfig) -> nn.Sequential:
    """(N, 1, S, S) → (N, C₀, 4, 4): stride-2 4 × 4 convolutions, leaky ReLU, layer norm after
    all but the first (DCGAN leaves the input layer unnormalised)."""
    blocks, in_channels = [], 1
    for level in reversed(range(config.levels)):
        out_channels = config.level_channels(level)
        blocks.append(Convolution(2, in_channels, out_channels, strides=2, kernel_size=4,
                                  padding=1, act=_LEAKY, norm=None if in_channels == 1 else _LAYER_NORM))
        in_channels = out_channels
    return nn.Sequential(*blocks)


class Generator(nn.Module):
    """G: z (N, latent_dim) → slices (N, 1, S, S) in [0, 1] (DCGAN generator, sigmoid output)."""

    def __init__(self, config: FAnoGANConfig) -> None:
        super().__init__()
        self.latent_dim, self.image_size = config.latent_dim, config.image_size
        first = config.level_channels(0)
        # (N, z, 1, 1) → (N, C₀, 4, 4): a 4 × 4 transposed convolution is DCGAN's projection.
        layers = [Convolution(2, config.latent_dim, first, strides=1, kernel_size=4, padding=0,
                              output_padding=0, is_transposed=True, act="relu", norm="batch")]
        for level in range(1, config.levels + 1):
            last = level == config.levels
            out_channels = 1 if last else config.level_channels(level)
            layers.append(Convolution(2, config.level_channels(level - 1), out_channels, strides=2,
                                      kernel_size=4, padding=1, output_padding=0, is_transposed=True,
                                      act="relu", norm="batch", conv_only=last))
        layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], self.latent_dim, 1, 1))


class Critic(nn.Module):
    """D: slices (N, 1, S, S) → (scores (N,), features (N, 16 · C₀)).

    ``features`` is the flattened last convolutional layer, the input of the final linear map:
    f_D of the izi_f loss. Both come from ``forward`` so that a DDP-wrapped critic gives both.
    """

    def __init__(self, config: FAnoGANConfig) -> None:
        super().__init__()
        self.trunk = _downsampling_trunk(config)
        self.score = nn.Linear(16 * config.level_channels(0), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x).flatten(1)
        return self.score(features).squeeze(1), features


class Encoder(nn.Module):
    """E: slices (N, 1, S, S) → z (N, latent_dim), unbounded (the reference's default)."""

    def __init__(self, config: FAnoGANConfig) -> None:
        super().__init__()
        self.trunk = _downsampling_trunk(config)
        self.to_latent = nn.Linear(16 * config.level_channels(0), config.latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.trunk(x).flatten(1))


def build_networks(config: FAnoGANConfig) -> tuple[Generator, Critic, Encoder]:
    """Fresh G, D and E; their initial weights come from ``config.seed`` only (the global torch
    RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return Generator(config), Critic(config), Encoder(config)


# --------------------------------------------------------------------------------------------
# The saved folder
# --------------------------------------------------------------------------------------------


@dataclass
class FAnoGANModels:
    """A saved f-AnoGAN: its config, G, D and E (eval mode) and the steps each was trained."""

    config: FAnoGANConfig
    generator: Generator
    critic: Critic
    encoder: Encoder
    metadata: dict[str, Any]

    @property
    def encoder_trained(self) -> bool:
        return int(self.metadata.get("encoder_steps", 0)) > 0


def load_fanogan_config(directory: str | Path) -> FAnoGANConfig:
    """The FAnoGANConfig stored in a saved folder; CheckpointError if there is none."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not an f-AnoGAN folder (no {CONFIG_FILE})")
    try:
        return FAnoGANConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def load_into(module: nn.Module, path: Path, device: str | torch.device = "cpu") -> None:
    """Load a ``.safetensors`` state dict into ``module``; CheckpointError naming the file if it
    is missing, damaged or does not fit the network."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name}")
    try:
        module.load_state_dict(load_weights(path, device))
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match the stored config: {err}") from None


def load_fanogan(directory: str | Path, device: str | torch.device = "cpu") -> FAnoGANModels:
    """Build G, D and E from the folder's config and load their weights (eval mode, on
    ``device``)."""
    directory = Path(directory)
    config = load_fanogan_config(directory)
    generator, critic, encoder = build_networks(config)
    for module, name in ((generator, GENERATOR_FILE), (critic, CRITIC_FILE), (encoder, ENCODER_FILE)):
        load_into(module, directory / name)
        module.to(device).eval()
    return FAnoGANModels(config, generator, critic, encoder, load_metadata(directory))


# --------------------------------------------------------------------------------------------
# The anomaly method
# --------------------------------------------------------------------------------------------


class FAnoGANMethod:
    """f-AnoGAN's anomaly map: the image residual |x − G(E(x))|, clipped to [0, 1].

    Follows :class:`igconda.anomaly_methods.AnomalyMethod`. The paper's score adds κ times the
    critic-feature residual, a number per slice, not per pixel; the map is the image residual
    alone, as in the paper's pixel-level results.

    Args:
        generator, encoder: trained G and E (put in eval mode on ``device`` here).
        device: where the networks run.
        batch_size: slices per forward pass.
    """

    names = (FANOGAN,)

    def __init__(self, generator: nn.Module, encoder: nn.Module, *,
                 device: str | torch.device = "cpu", batch_size: int = 256) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.device = torch.device(device)
        self.generator = generator.to(self.device).eval()
        self.encoder = encoder.to(self.device).eval()
        self.batch_size = int(batch_size)

    @classmethod
    def from_folder(cls, directory: str | Path, device: str | torch.device = "cpu",
                    batch_size: int = 256) -> FAnoGANMethod:
        """The method of a saved folder; CheckpointError if its encoder was never trained (a
        random E maps every slice to noise, and its maps would score as a baseline)."""
        models = load_fanogan(directory, device)
        if not models.encoder_trained:
            raise CheckpointError(f"{directory}: the f-AnoGAN encoder was never trained "
                                  "(metadata encoder_steps is 0); train it before scoring")
        return cls(models.generator, models.encoder, device=device, batch_size=batch_size)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) slices in [0, 1] → their healthy reconstructions G(E(x)), (N, H, W) float32."""
        size = self.generator.image_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"images must be (N, {size}, {size}) for this f-AnoGAN, "
                             f"got shape {images.shape}")
        out = np.empty(images.shape, dtype=np.float32)
        # np.require copies only when needed: Ray hands over read-only arrays, which torch rejects.
        x = torch.from_numpy(np.require(images, np.float32, ["C", "W"])).unsqueeze(1)
        with torch.inference_mode():
            for start in range(0, len(x), self.batch_size):
                chunk = x[start: start + self.batch_size].to(self.device)
                out[start: start + len(chunk)] = self.generator(self.encoder(chunk)).squeeze(1).cpu().numpy()
        return out

    def maps(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        images = batch_images(batch)
        residual = np.abs(images - self.reconstruct(images))
        return {FANOGAN: np.clip(residual, 0.0, 1.0).astype(np.float32, copy=False)}
