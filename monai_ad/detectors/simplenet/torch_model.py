"""SimpleNet's trainable parts: the feature adaptor, the discriminator and its truncated L1 loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feature_adaptor(dim: int) -> nn.Linear:
    """One Linear(D→D) with bias and no activation, Xavier-normal weights."""
    adaptor = nn.Linear(dim, dim)
    nn.init.xavier_normal_(adaptor.weight)
    return adaptor


class Discriminator(nn.Sequential):
    """Linear(D→hidden) + BatchNorm1d + LeakyReLU(0.2) + Linear(hidden→1, no bias), Xavier-normal weights."""

    def __init__(self, dim: int, hidden: int = 1024):
        super().__init__(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1, bias=False)
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)


def truncated_l1_loss(true_scores: torch.Tensor, fake_scores: torch.Tensor, margin: float) -> torch.Tensor:
    """mean(max(0, m − D(true))) + mean(max(0, D(fake) + m))."""
    return F.relu(margin - true_scores).mean() + F.relu(fake_scores + margin).mean()
