"""Frozen-backbone patch features shared by the feature-embedding detectors (PatchCore, SimpleNet, PaDiM, ...).

- ``PatchEmbedding``: the locally aware patch features of PatchCore/SimpleNet (docs/methods.md#patch-embedding).
- ``PatchFeatures``: a frozen backbone followed by ``PatchEmbedding`` (bf16 autocast on CUDA opt-in).
- ``greedy_coreset``: PatchCore's approximate greedy k-center coreset.
- ``LAYER1_TO_3``: each backbone's analogues of ResNet layer1–3.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_ad.components.autocast import Autocast
from monai_ad.components.cpu_threads import single_cpu_thread
from monai_ad.networks.backbones import build_backbone


class PatchEmbedding(nn.Module):
    """Locally aware patch features from several backbone layers (PatchCore / SimpleNet, docs/methods.md).

    Per layer ``[B, C, h, w]``: unfold ``patch_size``² neighbourhoods (stride 1, zero padding), flatten each
    patch in ``(C, kh, kw)`` order and ``adaptive_avg_pool1d`` it to ``pre_dim``; deeper grids are bilinearly
    resized to the first layer's grid (``align_corners=False``). The layers' vectors are concatenated
    (layer-major) and ``adaptive_avg_pool1d``-ed to ``target_dim``. No learned projection.

    Computed without any of those intermediate tensors, with the same numbers: unfolding and both poolings are
    linear maps across channels, so for each layer they fold into one fixed convolution kernel
    ``[target_dim, C, k, k]``; the resize acts across positions and commutes with them, so the layers' convolved
    maps are resized and summed. The reference code resizes the unfolded ``C·k²``-channel patches; this resizes
    ``target_dim`` channels. The maps are kept channels-last, so the ``[B, h·w, target_dim]`` result is a view.

    ``forward(features) -> (patches [B, h·w, target_dim], (h, w))`` with ``(h, w)`` the first layer's grid.
    """

    def __init__(self, pre_dim: int, target_dim: int, patch_size: int = 3):
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd and positive, got {patch_size}")
        self.pre_dim, self.target_dim, self.patch_size = int(pre_dim), int(target_dim), int(patch_size)
        self._kernels: dict[tuple, list[torch.Tensor]] = {}

    def _folded_kernels(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer ``[target_dim, C, k, k]``: row ``o`` is the weight each ``(C, kh, kw)`` patch entry of that
        layer has in output ``o`` after both ``adaptive_avg_pool1d`` steps."""
        channels = tuple(int(f.shape[1]) for f in features)
        key = (channels, features[0].device, features[0].dtype)
        if key not in self._kernels:
            k, pre = self.patch_size, self.pre_dim
            final = _pooling_matrix(len(channels) * pre, self.target_dim)  # [target_dim, L·pre_dim]
            self._kernels[key] = [
                (final[:, i * pre : (i + 1) * pre] @ _pooling_matrix(c * k * k, pre))
                .reshape(self.target_dim, c, k, k)
                .to(features[0].device, features[0].dtype)
                for i, c in enumerate(channels)
            ]
        return self._kernels[key]

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        if not features:
            raise ValueError("PatchEmbedding needs at least one feature map")
        b, grid = features[0].shape[0], (int(features[0].shape[-2]), int(features[0].shape[-1]))
        total = None
        for feature, kernel in zip(features, self._folded_kernels(features)):
            mapped = F.conv2d(feature.contiguous(memory_format=torch.channels_last), kernel, padding=self.patch_size // 2)
            if tuple(mapped.shape[-2:]) != grid:
                mapped = F.interpolate(mapped, size=grid, mode="bilinear", align_corners=False)
            total = mapped if total is None else total.add_(mapped)
        return total.permute(0, 2, 3, 1).reshape(b, grid[0] * grid[1], self.target_dim), grid

    def extra_repr(self) -> str:
        return f"pre_dim={self.pre_dim}, target_dim={self.target_dim}, patch_size={self.patch_size}"


def _pooling_matrix(n: int, m: int) -> torch.Tensor:
    """``[m, n]`` float64: ``adaptive_avg_pool1d`` from ``n`` to ``m`` entries as a matrix."""
    return F.adaptive_avg_pool1d(torch.eye(n, dtype=torch.float64)[None], m)[0].t()


def default_embedding_dim(channels: Sequence[int], paper_dim: int) -> int:
    """The paper's dimension (PatchCore 1024, SimpleNet 1536 with WideResNet-50-2) unless the backbone's layers
    hold fewer channels in total: then that total (pooling *up* to more dimensions only repeats entries)."""
    return int(min(paper_dim, sum(channels)))


class PatchFeatures(Autocast, nn.Module):
    """A frozen backbone + ``PatchEmbedding``: ``[B, 1, H, W]`` → ``([B, h·w, dim] float32, (h, w))``.

    ``pre_dim`` / ``target_dim`` default to ``default_embedding_dim(channels, paper_dim)``. With ``amp`` the
    backbone runs under bf16 autocast on CUDA (never on the CPU); the embedding is computed in float32. It is off
    by default: with EfficientNet-Lite0 on an H100, bf16 gave no backbone speed-up and moved PatchCore slice
    scores by a large fraction of their range (``benchmarks/RESULTS.md``).
    Always runs without gradients (the backbone is frozen; the features are inputs of what is trained).
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str | int] | None,
        weights: str | None,
        allow_random_weights: bool,
        pre_dim: int | None,
        target_dim: int | None,
        paper_dim: int,
        patch_size: int = 3,
        amp: bool = False,
    ):
        super().__init__()
        self.backbone = build_backbone(backbone, layers, weights, allow_random_weights)
        dim = default_embedding_dim(self.backbone.channels, paper_dim)
        self.embed = PatchEmbedding(int(pre_dim or dim), int(target_dim or dim), patch_size)
        self.dim = self.embed.target_dim
        self.stride = self.backbone.strides[0]
        self.amp = bool(amp)

    def grid_size(self, image_size: int) -> tuple[int, int]:
        """The patch grid of a square slice (what ``forward`` returns as ``(h, w)``)."""
        with torch.no_grad():
            maps = self.backbone(torch.zeros(1, 1, image_size, image_size, device=self.backbone.mean.device))
        return int(maps[0].shape[-2]), int(maps[0].shape[-1])

    @torch.no_grad()
    def backbone_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's feature maps, as scoring computes them (channels-last, bf16 with ``amp`` on CUDA)."""
        with self.autocast(x.device):
            return self.backbone(x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return self.embed([m.float() for m in self.backbone_maps(x)])


# ----------------------------------------------------------------------------- coreset
@torch.no_grad()
def greedy_coreset(
    features: torch.Tensor,
    ratio: float,
    projection_dim: int = 128,
    n_starts: int = 10,
    seed: int = 0,
    device: torch.device | str | None = None,
    chunk_size: int = 1 << 16,
) -> torch.Tensor:
    """Indices (CPU ``int64``, in pick order) of PatchCore's approximate greedy k-center coreset.

    As the official ``ApproximateGreedyCoresetSampler``: features ``[N, D]`` (any float dtype, any device) are
    projected by a random bias-free linear map to ``projection_dim`` (``nn.Linear``'s default uniform
    initialisation; skipped when ``D <= projection_dim``, where it could only distort distances); each point's
    anchor distance starts as its mean L2 distance to ``n_starts`` random points; then ``⌊ratio·N⌋`` times the
    point with the largest anchor distance is picked and every anchor distance becomes the minimum of itself
    and the distance to the pick. Picks are distinct (a picked point is never picked again, even among exact
    duplicates). Projection is done ``chunk_size`` rows at a time on ``device`` (default: the features'),
    where the greedy loop then runs on the ``[N, projection_dim]`` float32 projections. Seeded by ``seed``.
    """
    n, dim = features.shape
    k = int(math.floor(ratio * n))
    if ratio >= 1 or k >= n:
        return torch.arange(n)
    k = max(1, k)
    device = torch.device(device) if device is not None else features.device
    gen = torch.Generator().manual_seed(int(seed))
    if dim > projection_dim:
        bound = 1.0 / math.sqrt(dim)
        projection = (torch.rand(dim, projection_dim, generator=gen) * 2 - 1).mul_(bound).to(device)
    else:
        projection = None
    width = projection_dim if projection is not None else dim
    points = torch.empty(n, width, device=device, dtype=torch.float32)
    for start in range(0, n, chunk_size):
        block = features[start : start + chunk_size].to(device=device, dtype=torch.float32, non_blocking=True)
        points[start : start + chunk_size] = block @ projection if projection is not None else block
    starts = torch.randperm(n, generator=gen)[: min(n_starts, n)].to(device)
    anchor = torch.empty(n, device=device, dtype=torch.float32)
    for start in range(0, n, chunk_size):
        anchor[start : start + chunk_size] = torch.cdist(points[start : start + chunk_size], points[starts]).mean(1)
    # from here on squared distances: the argmax and the running minimum are unchanged by squaring, and
    # ‖x‖² + ‖p‖² − 2·x·p is one matrix-vector product per pick
    anchor.square_()
    norms = points.square().sum(1)
    picked = torch.empty(k, dtype=torch.long, device=device)
    with single_cpu_thread(device):
        for i in range(k):
            index = torch.argmax(anchor).view(1)  # stays on the device: no host synchronisation per pick
            picked[i : i + 1] = index
            distance = torch.addmv(norms, points, points.index_select(0, index)[0], alpha=-2.0)
            distance += norms.index_select(0, index)
            torch.minimum(anchor, distance, out=anchor)
            anchor.index_fill_(0, index, -1.0)
    return picked.cpu()


# the analogues of ResNet layer1 / layer2 / layer3 (strides 4, 8, 16): PaDiM's layers and RD4AD's teacher levels
LAYER1_TO_3: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("blocks.1", "blocks.2", "blocks.4"),
    "vgg16": ("relu3_3", "relu4_3", "relu5_3"),
    "resnet18": ("layer1", "layer2", "layer3"),
    "wide_resnet50_2": ("layer1", "layer2", "layer3"),
}


def layers_or_layer1_to_3(backbone: str, layers: Sequence[str | int] | None) -> list[str | int] | None:
    """``layers`` as a list; when none are given, the backbone's layer1–3 analogues (``LAYER1_TO_3``), or ``None``
    (the backbone's own default) for a backbone without them."""
    if layers is None:
        layers = LAYER1_TO_3.get(backbone)
    return None if layers is None else list(layers)
