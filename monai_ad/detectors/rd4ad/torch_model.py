"""Reverse distillation (RD4AD, Deng & Li, CVPR 2022): the torch model, apart from its training loop.

hq-deng/RD4AD (method and choices: ``README.md`` beside this module), with every width following the teacher's
channel counts ``c1, c2, c3`` (levels at strides ``s, 2s, 4s``; WideResNet-50-2: 256, 512, 1024):

- **One-class bottleneck, MFF.** Level 1 → conv3×3 stride 2 (c1→c2) + BN + ReLU → conv3×3 stride 2 (c2→c3)
  + BN + ReLU; level 2 → conv3×3 stride 2 (c2→c3) + BN + ReLU; concatenated with level 3 → 3·c3 channels.
- **One-class bottleneck, OCE.** One ResNet stage of ``oce_blocks`` (3) bottleneck blocks with stride 2,
  output 2·c3 channels (2048 for WideResNet-50-2); the first block's skip path is a 1×1 stride-2 conv + BN.
  The reference's unused ``conv4``/``bn4`` and its attention-free "Attn" naming are left out.
- **Student decoder.** A mirror of the teacher: stages of ``decoder_blocks`` (3, 4, 6) bottleneck blocks going
  2·c3 → c3 → c2 → c1, each stage's first block upsampling ×2 with a 2×2 stride-2 transposed conv (in the
  3×3 slot, and on the skip path with BN). Outputs pair with the teacher's levels 3, 2, 1.
- **Bottleneck blocks** are torchvision's (1×1 → 3×3 → 1×1, BN after each, ReLU, residual): inner width =
  ``out // 4 · width_factor`` (``width_factor`` 2 is the *wide* ResNet's; 1024 for 2048 out as the paper).
  Convolutions get torchvision's Kaiming-normal (fan-out) initialisation, BN weight 1 / bias 0; transposed
  convolutions keep PyTorch's default, as in the reference (which only re-initialises ``nn.Conv2d``).

``distillation_loss``: Σ over levels of the batch mean of 1 − cos(flatten(tᵢ), flatten(sᵢ)) per sample.
``anomaly_map``: per level 1 − per-pixel cosine, bilinear upsampling (``align_corners=True``), summed
(official test) or multiplied (anomalib / BMAD); the Gaussian smoothing is the detector's.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_ad.components.maps import MAP_MODES, cosine_distance_map  # noqa: F401  (MAP_MODES: the detector checks it)
from monai_ad.networks.backbones import FeatureExtractor



def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class BottleneckBlock(nn.Module):
    """A ResNet bottleneck ``in → width → out`` with ``resample``: ``"down"`` (stride-2 3×3 conv, 1×1 stride-2
    skip), ``"up"`` (2×2 stride-2 transposed conv, transposed-conv skip) or ``None`` (identity skip when the
    widths agree, else a 1×1 conv skip)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, resample: str | None = None):
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}")
        if resample == "up":
            middle: nn.Module = nn.ConvTranspose2d(width, width, kernel_size=2, stride=2, bias=False)
        else:
            middle = nn.Conv2d(width, width, 3, stride=2 if resample == "down" else 1, padding=1, bias=False)
        self.body = nn.Sequential(
            *_conv_bn(in_channels, width, 1), middle, nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            *_conv_bn(width, out_channels, 1, relu=False),
        )  # fmt: skip
        if resample == "up":
            self.skip: nn.Module = nn.Sequential(
                nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        elif resample == "down" or in_channels != out_channels:
            self.skip = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, 2 if resample == "down" else 1, False))
        else:
            self.skip = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.skip(x))


def _stage(in_channels: int, out_channels: int, blocks: int, resample: str, width_factor: int) -> nn.Sequential:
    width = max(1, out_channels // 4 * width_factor)
    first = BottleneckBlock(in_channels, width, out_channels, resample)
    return nn.Sequential(first, *[BottleneckBlock(out_channels, width, out_channels) for _ in range(blocks - 1)])


class OneClassBottleneck(nn.Module):
    """MFF (levels 1 and 2 brought to level 3 by strided 3×3 convs, concatenated) + OCE (one stride-2 stage)."""

    def __init__(self, channels: Sequence[int], blocks: int = 3, width_factor: int = 2):
        super().__init__()
        c1, c2, c3 = (int(c) for c in channels)
        self.level1 = nn.Sequential(*_conv_bn(c1, c2, 3, 2), *_conv_bn(c2, c3, 3, 2))
        self.level2 = nn.Sequential(*_conv_bn(c2, c3, 3, 2))
        self.encoder = _stage(3 * c3, 2 * c3, blocks, "down", width_factor)
        self.out_channels = 2 * c3

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        fused = torch.cat([self.level1(features[0]), self.level2(features[1]), features[2]], dim=1)
        return self.encoder(fused)


class StudentDecoder(nn.Module):
    """Upsampling stages 2·c3 → c3 → c2 → c1; ``forward`` returns the maps for levels 1, 2, 3 (teacher order)."""

    def __init__(self, channels: Sequence[int], blocks: Sequence[int] = (3, 4, 6), width_factor: int = 2):
        super().__init__()
        c1, c2, c3 = (int(c) for c in channels)
        widths = [2 * c3, c3, c2, c1]
        self.stages = nn.ModuleList(
            _stage(widths[i], widths[i + 1], int(blocks[i]), "up", width_factor) for i in range(3)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[::-1]


def init_resnet_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: Kaiming-normal (fan-out, ReLU) convolutions, BN weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ReverseDistillation(nn.Module):
    """Frozen teacher → one-class bottleneck → student decoder.

    ``forward(x [B, 1, H, W]) -> (teacher maps, student maps)``, three levels each, shallowest first.
    ``student_maps(teacher_maps)`` runs only the trainable part (what training on cached teacher maps uses).
    """

    def __init__(
        self,
        teacher: FeatureExtractor,
        oce_blocks: int = 3,
        decoder_blocks: Sequence[int] = (3, 4, 6),
        width_factor: int = 2,
    ):
        super().__init__()
        if len(teacher.channels) != 3:
            raise ValueError(f"reverse distillation needs three teacher levels, got {len(teacher.channels)}")
        s1, s2, s3 = teacher.strides
        if not (s2 == 2 * s1 and s3 == 2 * s2):
            raise ValueError(f"the teacher's levels must be at strides s, 2s, 4s, got {teacher.strides}")
        self.teacher = teacher
        self.bottleneck = OneClassBottleneck(teacher.channels, oce_blocks, width_factor)
        self.decoder = StudentDecoder(teacher.channels, decoder_blocks, width_factor)
        init_resnet_weights(self.bottleneck)
        init_resnet_weights(self.decoder)

    def student_maps(self, teacher_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.decoder(self.bottleneck(teacher_maps))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            teacher_maps = self.teacher(x)
        return teacher_maps, self.student_maps(teacher_maps)


def distillation_loss(teacher_maps: Sequence[torch.Tensor], student_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over levels of mean over the batch of 1 − cos(flatten(t), flatten(s)), in float32."""
    loss = torch.zeros((), device=teacher_maps[0].device)
    for t, s in zip(teacher_maps, student_maps):
        cosine = F.cosine_similarity(t.flatten(1).float(), s.flatten(1).float(), dim=1)
        loss = loss + (1 - cosine).mean()
    return loss


def anomaly_map(
    teacher_maps: Sequence[torch.Tensor], student_maps: Sequence[torch.Tensor], size: int, mode: str = "sum"
) -> torch.Tensor:
    """``[B, size, size]``: RD4AD's map, ``cosine_distance_map`` with ``align_corners=True`` (hq-deng/RD4AD)."""
    return cosine_distance_map(teacher_maps, student_maps, size, mode, align_corners=True)
