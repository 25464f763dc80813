"""The network of the synthetic-anomaly detector: a MONAI 2-D U-Net that maps a slice (``C`` channels, 2.5-D
when ``C`` neighbouring slices) and its liver ROI to one logit per pixel, the anomaly's presence."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet
from torch import nn


class AnomalySegmenter(nn.Module):
    """``monai.networks.nets.UNet`` (2-D, ``levels`` resolutions with channels ``width·2^i``, strided
    convolutions down, transposed convolutions up, ``res_units`` residual units per block, BatchNorm, PReLU) on
    ``in_channels`` image channels plus the ROI as one more channel (so the network knows where the liver ends
    whatever fills the outside). ``forward(image [B, C, H, W], roi [B, 1, H, W]) -> logits [B, 1, H, W]``.

    ``H`` and ``W`` must be multiples of ``2^(levels − 1)``. Weights are kept channels-last (faster convolutions on
    the CPU); inputs are converted to it.
    """

    def __init__(self, in_channels: int = 1, width: int = 16, levels: int = 4, res_units: int = 0, dropout: float = 0.0):
        super().__init__()
        if levels < 2:
            raise ValueError(f"the U-Net needs at least 2 levels, got {levels}")
        self.in_channels, self.levels = int(in_channels), int(levels)
        self.unet = UNet(
            spatial_dims=2,
            in_channels=self.in_channels + 1,
            out_channels=1,
            channels=tuple(int(width) * 2**i for i in range(self.levels)),
            strides=(2,) * (self.levels - 1),
            num_res_units=int(res_units),
            norm="batch",
            dropout=float(dropout),
        )
        self.to(memory_format=torch.channels_last)

    @property
    def multiple(self) -> int:
        """Spatial sizes the network takes are multiples of this."""
        return 2 ** (self.levels - 1)

    def forward(self, image: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image, roi.to(image.dtype)], 1).contiguous(memory_format=torch.channels_last)
        return self.unet(x)


__all__ = ["AnomalySegmenter"]
