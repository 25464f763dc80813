"""DCGAN-style convolutional encoder and decoder (Radford et al., ICLR 2016), shared by the adversarial
detectors: GANomaly's generator and discriminator, f-AnoGAN's generator, critic and encoder.

The networks work on square slices whose side is a power of two (at least 8), halving (or doubling) it with
4 × 4 stride-2 convolutions between the slice and 4 × 4; ``padded_size`` gives the side a slice is padded to and
``to_tanh_range`` / ``from_tanh_range`` move slices in [0, 1] to and from the decoder's tanh range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "layer")


def padded_size(image_size: int) -> int:
    """The power of two the slices are zero-padded to (the DCGAN networks halve down to 4 × 4)."""
    return max(8, 1 << (int(image_size) - 1).bit_length())


def to_tanh_range(image: torch.Tensor) -> torch.Tensor:
    """Slices ``[B, C, S, S]`` in [0, 1] → [−1, 1] (the decoder's tanh range), zero-padded (black, as the
    surround) at the bottom and right to ``padded_size(S)``."""
    pad = padded_size(image.shape[-1]) - image.shape[-1]
    return F.pad(image, (0, pad, 0, pad)) * 2 - 1


def from_tanh_range(output: torch.Tensor, image_size: int) -> torch.Tensor:
    """A decoder's output in [−1, 1] → [0, 1] in float32, cropped back to ``image_size`` (``to_tanh_range``
    undone)."""
    return ((output.float() + 1) / 2)[..., :image_size, :image_size]


def _halvings(size: int) -> int:
    """Stride-2 convolutions from ``size`` down to 4 × 4."""
    return max(0, (size // 4).bit_length() - 1)


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm, or a layer norm over (C, H, W) with a per-channel affine (a WGAN-GP critic: the gradient penalty
    is taken per sample, which batch statistics would mix)."""
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(1, channels)


class DCGANEncoder(nn.Module):
    """``[B, C, S, S]`` (S a power of two, at least 8) → ``[B, latent_dim, 1, 1]``: a 4 × 4 stride-2 convolution to
    ``width`` channels with leaky ReLU (0.2), then stride-2 convolutions doubling the channels with a normalisation
    (``norm``: ``"batch"``, or ``"layer"`` for a WGAN-GP critic) and leaky ReLU down to 4 × 4, then a 4 × 4
    convolution to ``latent_dim``. ``features`` is the output before it."""

    def __init__(self, size: int, in_channels: int, latent_dim: int, width: int, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        channels = width
        for _ in range(_halvings(size) - 1):
            layers += [nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False), _norm(norm, channels * 2),
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
    """DCGAN initialisation: convolution weights N(0, 0.02), normalisation weights N(1, 0.02) and biases 0."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
        elif isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)
