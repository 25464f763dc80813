"""GANomaly's networks and losses: DCGAN encoders and decoder, the encoder–decoder–encoder generator, the
discriminator and the generator's three-term loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _halvings(size: int) -> int:
    """Stride-2 convolutions from ``size`` down to 4 × 4."""
    return max(0, (size // 4).bit_length() - 1)


class DCGANEncoder(nn.Module):
    """``[B, C, S, S]`` (S a power of two, at least 8) → ``[B, latent_dim, 1, 1]``: a 4 × 4 stride-2 convolution to
    ``width`` channels with leaky ReLU (0.2), then stride-2 convolutions doubling the channels with BatchNorm and
    leaky ReLU down to 4 × 4, then a 4 × 4 convolution to ``latent_dim``. ``features`` is the output before it."""

    def __init__(self, size: int, in_channels: int, latent_dim: int, width: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        channels = width
        for _ in range(_halvings(size) - 1):
            layers += [nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels * 2),
                       nn.LeakyReLU(0.2, inplace=True)]  # fmt: skip
            channels *= 2
        self.features = nn.Sequential(*layers)
        self.last = nn.Conv2d(channels, latent_dim, 4, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.features(x))


class DCGANDecoder(nn.Module):
    """``[B, latent_dim, 1, 1]`` → ``[B, C, S, S]`` in [−1, 1]: the encoder mirrored with transposed convolutions,
    BatchNorm and ReLU, ending in tanh."""

    def __init__(self, size: int, out_channels: int, latent_dim: int, width: int):
        super().__init__()
        channels = width * 2 ** (_halvings(size) - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, channels, 4, 1, 0, bias=False), nn.BatchNorm2d(channels),
                                   nn.ReLU(inplace=True)]  # fmt: skip
        while channels > width:
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2),
                       nn.ReLU(inplace=True)]  # fmt: skip
            channels //= 2
        layers += [nn.ConvTranspose2d(width, out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: convolution weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)


class GANomalyGenerator(nn.Module):
    """Encoder → decoder → encoder: ``x`` → (reconstruction x̂, latent z of x, latent z' of x̂)."""

    def __init__(self, size: int, channels: int, latent_dim: int, width: int):
        super().__init__()
        self.encoder = DCGANEncoder(size, channels, latent_dim, width)
        self.decoder = DCGANDecoder(size, channels, latent_dim, width)
        self.reencoder = DCGANEncoder(size, channels, latent_dim, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent = self.encoder(x)
        reconstruction = self.decoder(latent)
        return reconstruction, latent, self.reencoder(reconstruction)


class GANomalyDiscriminator(nn.Module):
    """A DCGAN encoder with one output: ``x`` → (real/fake probability ``[B]``, features before the last layer)."""

    def __init__(self, size: int, channels: int, width: int):
        super().__init__()
        self.encoder = DCGANEncoder(size, channels, 1, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder.features(x)
        return torch.sigmoid(self.encoder.last(features)).flatten(), features


LATENT_LOSSES = ("l2", "smooth_l1")


def generator_loss(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    image: torch.Tensor,
    reconstruction: torch.Tensor,
    latent: torch.Tensor,
    latent_again: torch.Tensor,
    weights: tuple[float, float, float] = (1.0, 50.0, 1.0),
    latent_loss: str = "l2",
) -> torch.Tensor:
    """``w_adv · MSE(f(x), f(x̂)) + w_con · L1(x, x̂) + w_enc · L2(z, z')`` (``latent_loss`` ``smooth_l1``: the
    Smooth-L1 latent term anomalib uses instead)."""
    adversarial = F.mse_loss(fake_features.float(), real_features.float())
    contextual = F.l1_loss(reconstruction.float(), image.float())
    if latent_loss == "l2":
        encoder = F.mse_loss(latent_again.float(), latent.float())
    else:
        encoder = F.smooth_l1_loss(latent_again.float(), latent.float())
    w_adv, w_con, w_enc = weights
    return w_adv * adversarial + w_con * contextual + w_enc * encoder


def discriminator_loss(real_probability: torch.Tensor, fake_probability: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of real slices as 1 and reconstructions as 0, averaged over the two."""
    real = F.binary_cross_entropy(real_probability.float(), torch.ones_like(real_probability, dtype=torch.float32))
    fake = F.binary_cross_entropy(fake_probability.float(), torch.zeros_like(fake_probability, dtype=torch.float32))
    return 0.5 * (real + fake)


def latent_distance(latent: torch.Tensor, latent_again: torch.Tensor) -> torch.Tensor:
    """GANomaly's score: the mean over latent dimensions of ``(z − z')²``, ``[B]``."""
    return (latent.float() - latent_again.float()).pow(2).flatten(1).mean(1)
