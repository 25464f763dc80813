"""Deep SVDD's networks and objectives: the paper's LeNet-style encoder on 32 × 32 windows of a slice, the mirrored
decoder of its autoencoder pre-training, the windows themselves, the centre and the two losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monai_ad.components.maps import square_windows

WINDOW = 32  # the paper's input size: the encoder describes a window of this many pixels
STRIDE = 8  # scoring places a window on every cell of this size
CENTRE_EPS = 0.1  # centre coordinates closer to 0 than this are pushed to ±CENTRE_EPS
FLAT = 1e-2  # the smallest contrast a window is divided by (a flat window outside the liver stays near 0)


def _block(in_channels: int, out_channels: int) -> list[nn.Module]:
    """5 × 5 convolution without bias and BatchNorm without affine parameters (a bias would let the network map
    every input onto the centre), leaky ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=False),
        nn.BatchNorm2d(out_channels, eps=1e-4, affine=False),
        nn.LeakyReLU(),
    ]


class LeNetEncoder(nn.Module):
    """``[N, C, 32, 32]`` → ``[N, latent_dim]``: three blocks of 32, 64 and 128 channels, each with a 2× max-pool,
    then a bias-free linear map of the 128 × 4 × 4 grid."""

    def __init__(self, in_channels: int = 1, latent_dim: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((in_channels, 32), (32, 64), (64, 128)):
            layers += [*_block(cin, cout), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.project = nn.Linear(128 * 4 * 4, latent_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x).flatten(1))


class LeNetDecoder(nn.Module):
    """The encoder mirrored, ``[N, latent_dim]`` → ``[N, C, 32, 32]`` (contrast-normalised windows), for the
    autoencoder pre-training that initialises the encoder."""

    def __init__(self, out_channels: int = 1, latent_dim: int = 128):
        super().__init__()
        self.unproject = nn.Linear(latent_dim, 128 * 4 * 4, bias=False)
        layers: list[nn.Module] = [nn.BatchNorm2d(128, eps=1e-4, affine=False), nn.LeakyReLU()]
        for cin, cout in ((128, 64), (64, 32)):
            layers += [nn.Upsample(scale_factor=2), *_block(cin, cout)]
        layers += [nn.Upsample(scale_factor=2), nn.Conv2d(32, out_channels, 5, padding=2, bias=False)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.unproject(z).view(-1, 128, 4, 4))


def windows_around(image: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``[B, C, 32, 32]``: the window of each slice ``[B, C, H, W]`` centred on its pixel ``centres [B, 2]`` (row,
    col); the slice is extended by its border values where a window reaches past it."""
    half = WINDOW // 2
    padded = F.pad(image, (half, half, half, half), mode="replicate")
    # in the padded slice, the window centred on (r, c) starts at (r, c)
    return square_windows(padded, centres.round().long(), WINDOW)


def window_grid(image: torch.Tensor) -> torch.Tensor:
    """``[B · H/8 · W/8, C, 32, 32]``: a window centred on every 8 × 8 cell of the slices (row-major), the slice
    extended by its border values."""
    b, c, h, w = image.shape
    pad = (WINDOW - STRIDE) // 2  # the window of cell k spans pixels 8k − 12 … 8k + 20: centred on the cell
    padded = F.pad(image, (pad, pad, pad, pad), mode="replicate")
    columns = F.unfold(padded, WINDOW, stride=STRIDE)  # [B, C·32·32, cells]
    return columns.transpose(1, 2).reshape(-1, c, WINDOW, WINDOW)


def global_contrast_normalisation(windows: torch.Tensor) -> torch.Tensor:
    """Each window minus its mean, divided by its mean absolute deviation (the paper's L1 global contrast
    normalisation of every input), ``FLAT`` at least."""
    centred = windows - windows.mean((1, 2, 3), keepdim=True)
    return centred / centred.abs().mean((1, 2, 3), keepdim=True).clamp_min(FLAT)


def centre_away_from_zero(mean: torch.Tensor, eps: float = CENTRE_EPS) -> torch.Tensor:
    """The centre c from the mean initial representation: coordinates within ``eps`` of 0 are set to ±``eps``
    (their sign kept), so that the trivial all-zero output is not at the centre."""
    near = mean.abs() < eps
    return torch.where(near & (mean < 0), -eps, torch.where(near & (mean > 0), eps, mean))


def squared_distances(representations: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``‖φ − c‖²`` of each row of ``[N, D]``."""
    return (representations.float() - centre).pow(2).sum(-1)


def one_class_loss(distances: torch.Tensor) -> torch.Tensor:
    """One-class Deep SVDD: the mean squared distance to the centre."""
    return distances.mean()


def soft_boundary_loss(distances: torch.Tensor, radius: torch.Tensor, nu: float) -> torch.Tensor:
    """Soft-boundary Deep SVDD: ``R² + 1/ν · mean(max(0, ‖φ − c‖² − R²))``."""
    return radius.pow(2) + F.relu(distances - radius.pow(2)).mean() / nu


def soft_boundary_radius(distances: torch.Tensor, nu: float) -> torch.Tensor:
    """The radius the soft-boundary objective moves to: the (1 − ν)-quantile of the distances ``‖φ − c‖``."""
    return torch.quantile(distances.detach().float().sqrt().flatten(), 1 - nu)
