"""DDAD's network and maps: the paper's convolutional autoencoder (optionally with a per-pixel log-variance output,
AE-U), its loss, and the intra- and inter-discrepancy maps of the two ensembles."""

from __future__ import annotations

import torch
from torch import nn

HALVINGS = 4  # stride-2 convolutions between the input and the bottleneck grid


def _down(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _up(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DDADAutoencoder(nn.Module):
    """``[N, C, S, S]`` (S a multiple of 16) → reconstruction ``[N, C, S, S]`` and, with ``uncertainty`` (AE-U),
    a log-variance ``[N, C, S, S]``.

    Encoder: four 4 × 4 stride-2 convolutions of ``width`` × (1, 2, 4, 4) channels (16/32/64/64 in the paper),
    each with BatchNorm and ReLU; the ``S/16`` grid flattened, a linear map to ``fc_width`` (2048) with BatchNorm
    and ReLU, then to ``latent_dim`` (16). Decoder: the mirror image, linear maps back to the grid, three
    transposed convolutions with BatchNorm and ReLU and a last one to the output channels (no activation).
    """

    def __init__(self, size: int, channels: int = 1, width: int = 16, fc_width: int = 2048, latent_dim: int = 16,
                 uncertainty: bool = True):  # fmt: skip
        super().__init__()
        widths = [width, width * 2, width * 4, width * 4]
        self.grid = size // 2**HALVINGS
        self.uncertainty = bool(uncertainty)
        self.channels = channels
        layers: list[nn.Module] = []
        for cin, cout in zip([channels, *widths[:-1]], widths):
            layers += _down(cin, cout)
        self.encoder = nn.Sequential(*layers)
        flat = widths[-1] * self.grid * self.grid
        self.to_latent = nn.Sequential(
            nn.Linear(flat, fc_width), nn.BatchNorm1d(fc_width), nn.ReLU(inplace=True), nn.Linear(fc_width, latent_dim)
        )
        self.from_latent = nn.Sequential(
            nn.Linear(latent_dim, fc_width), nn.BatchNorm1d(fc_width), nn.ReLU(inplace=True),
            nn.Linear(fc_width, flat), nn.BatchNorm1d(flat), nn.ReLU(inplace=True),
        )  # fmt: skip
        layers = []
        for cin, cout in zip(widths[:0:-1], widths[-2::-1]):
            layers += _up(cin, cout)
        outputs = channels * (2 if self.uncertainty else 1)
        layers.append(nn.ConvTranspose2d(widths[0], outputs, 4, 2, 1))
        self.decoder = nn.Sequential(*layers)
        self.bottleneck_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = self.to_latent(self.encoder(x).flatten(1))
        grid = self.from_latent(z).view(-1, self.bottleneck_channels, self.grid, self.grid)
        out = self.decoder(grid)
        if self.uncertainty:
            return out[:, : self.channels], out[:, self.channels :]
        return out, None


def reconstruction_loss(x: torch.Tensor, reconstruction: torch.Tensor, log_var: torch.Tensor | None) -> torch.Tensor:
    """The mean squared error per pixel; for AE-U the heteroscedastic loss ``exp(−logvar) · err + logvar``, averaged
    over the pixels."""
    err = (x.float() - reconstruction.float()).pow(2)
    if log_var is None:
        return err.mean()
    log_var = log_var.float()
    return (torch.exp(-log_var) * err + log_var).mean()


def intra_discrepancy(ndm: torch.Tensor) -> torch.Tensor:
    """``[B, C, S, S]``: the standard deviation over the NDM's reconstructions ``[K, B, C, S, S]`` (unbiased, as
    ``torch.std``)."""
    return ndm.float().std(0)


def inter_discrepancy(ndm: torch.Tensor, udm: torch.Tensor, ndm_log_var: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, C, S, S]``: ``|mean(UDM) − mean(NDM)|`` over the reconstructions ``[K, B, C, S, S]`` of each ensemble;
    with AE-U divided by the NDM's predicted standard deviation ``sqrt(mean_k exp(logvar_k))``."""
    difference = (udm.float().mean(0) - ndm.float().mean(0)).abs()
    if ndm_log_var is None:
        return difference
    return difference / ndm_log_var.float().exp().mean(0).sqrt()
