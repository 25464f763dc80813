"""Frozen backbone + patch embedding: the feature front end shared by PatchCore and SimpleNet."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from monai_ad.detectors.components import PatchEmbedding
from monai_ad.networks.backbones import build_backbone


class BackboneFeatures(nn.Module):
    """``[B, 1, H, W]`` slices → patch features ``[B, h·w, dim]`` and the grid ``(h, w)``.

    ``pre_dim`` / ``target_dim`` default to ``min(default_dim, sum of layer channels)``: the papers' sizes with
    WideResNet-50-2 (1024 for PatchCore, 1536 for SimpleNet), and no pointless up-pooling with small backbones.
    On CUDA the backbone runs under bf16 autocast when ``amp``; patch features come out in float32.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str] | None,
        weights: str | None,
        allow_random_weights: bool,
        pre_dim: int | None,
        target_dim: int | None,
        default_dim: int,
        amp: bool = True,
    ):
        super().__init__()
        self.backbone = build_backbone(backbone, layers, weights, allow_random_weights)
        dim = min(default_dim, sum(self.backbone.channels))
        self.embed = PatchEmbedding(int(pre_dim or dim), int(target_dim or dim))
        self.dim = self.embed.target_dim
        self.amp = amp

    def _autocast(self, x: torch.Tensor):
        if self.amp and x.is_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        with self._autocast(x):
            maps = self.backbone(x)
        return self.embed([m.float() for m in maps])
