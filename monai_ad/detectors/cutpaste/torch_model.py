"""CutPaste's networks: the ImageNet backbone with a projection head and 3-way classifier, and the Gaussian
density (mean, Ledoit–Wolf-shrunk covariance, Mahalanobis distance) of its embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monai_ad.networks.backbones import FeatureExtractor

CLASSES = ("normal", "cutpaste", "scar")


class ProjectionNet(nn.Module):
    """``backbone`` (one trainable feature level) → global average pooling → the embedding; a projection head of
    ``head_layers`` × (Linear ``head_width`` + BatchNorm + ReLU) then Linear ``embedding_dim`` + BatchNorm + ReLU,
    and a linear classifier over ``CLASSES``. ``forward(x)`` gives ``(embedding, logits)``."""

    def __init__(
        self, backbone: FeatureExtractor, head_layers: int = 8, head_width: int = 512, embedding_dim: int = 128
    ):
        super().__init__()
        self.backbone = backbone
        widths = [backbone.channels[0], *([head_width] * head_layers), embedding_dim]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        self.head = nn.Sequential(*layers)
        self.classifier = nn.Linear(widths[-1], len(CLASSES))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[0].float().mean((2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(x)
        return embedding, self.classifier(self.head(embedding))


def ledoit_wolf_covariance(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The Ledoit–Wolf (2004) shrunk covariance of rows ``x [n, d]`` and its shrinkage: ``(1 − s)·S + s·μ·I`` with
    ``S`` the maximum-likelihood covariance, ``μ = tr(S)/d`` and ``s = min(β², δ²)/δ²``, ``δ² = ‖S − μI‖²/d``,
    ``β² = (Σ_k ‖x_k‖⁴/n − ‖S‖²)/(n·d)`` (``x`` centred), as scikit-learn's ``LedoitWolf``."""
    x = x.double()
    n, d = x.shape
    centred = x - x.mean(0)
    sample = centred.t() @ centred / n
    mu = torch.trace(sample) / d
    delta = (sample - mu * torch.eye(d, dtype=x.dtype, device=x.device)).pow(2).sum() / d
    beta = (centred.pow(2).sum(1).pow(2).sum() / n - sample.pow(2).sum()) / (n * d)
    shrinkage = 0.0 if float(delta) == 0 else float(torch.clamp(beta, max=delta) / delta)
    covariance = (1 - shrinkage) * sample
    covariance.diagonal().add_(shrinkage * mu)
    return covariance, shrinkage


class GaussianDensity(nn.Module):
    """A Gaussian fitted on embeddings (L2-normalised first): ``forward`` gives each row's Mahalanobis distance."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.empty(0))  # sized when fitted
        self.register_buffer("precision", torch.empty(0, 0))

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> "GaussianDensity":
        x = F.normalize(embeddings.double(), dim=1)
        covariance, _ = ledoit_wolf_covariance(x)
        self.mean = x.mean(0).float()
        self.precision = torch.linalg.pinv(covariance, hermitian=True).float()
        return self

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        delta = F.normalize(embeddings.float(), dim=1) - self.mean
        return ((delta @ self.precision) * delta).sum(1).clamp_min(0.0).sqrt()
