"""GANomaly's networks and losses: the encoder–decoder–encoder generator and the discriminator (built from the
DCGAN encoder and decoder of ``monai_ad.networks.dcgan``) and the generator's three-term loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# the detector and its tests import the DCGAN parts from here
from monai_ad.networks.dcgan import DCGANDecoder, DCGANEncoder, dcgan_init  # noqa: F401


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
