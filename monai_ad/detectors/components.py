"""Pieces shared by the feature-based detectors (PatchCore, SimpleNet and later ones).

- ``PatchEmbedding``: the locally aware patch features of PatchCore/SimpleNet (docs/methods.md#patch-embedding).
- ``PatchFeatures``: a frozen backbone followed by ``PatchEmbedding`` (bf16 autocast on CUDA opt-in).
- ``greedy_coreset``: PatchCore's approximate greedy k-center coreset.
- ``GaussianBlur2d`` / ``gaussian_blur2d``: ``scipy.ndimage.gaussian_filter`` (mode ``reflect``) on the device.
- ``PatchScoreMap``: a patch-score grid → a pixel map (bilinear upsampling + Gaussian blur).
- ``roi_on_grid`` / ``max_in_roi``: restrict slice scores to the patches that overlap the ROI.

The training loop of the detectors that learn on a frozen network's outputs is ``monai_ad.detectors.feature_training``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_ad.networks.backbones import build_backbone


# ----------------------------------------------------------------------------- patch embedding
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


class PatchFeatures(nn.Module):
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

    def autocast(self, device: torch.device):
        if self.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
    with _single_cpu_thread(device):
        for i in range(k):
            index = torch.argmax(anchor).view(1)  # stays on the device: no host synchronisation per pick
            picked[i : i + 1] = index
            distance = torch.addmv(norms, points, points.index_select(0, index)[0], alpha=-2.0)
            distance += norms.index_select(0, index)
            torch.minimum(anchor, distance, out=anchor)
            anchor.index_fill_(0, index, -1.0)
    return picked.cpu()


@contextlib.contextmanager
def _single_cpu_thread(device: torch.device):
    """The greedy loop is thousands of small memory-bound operations: on the CPU, thread start-up and
    synchronisation cost more than they save (and far more when the cores are shared), so run it on one."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- smoothing and maps
def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian weights (radius ``int(truncate·σ + 0.5)``), normalised, float32."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return (kernel / kernel.sum()).float()


def _reflect_index(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source indices of scipy's ``reflect`` (half-sample symmetric: ``d c b a | a b c d | d c b a``) extension,
    valid for any ``radius``, also larger than ``size``."""
    index = torch.arange(-radius, size + radius, device=device)
    period = 2 * size
    index = torch.remainder(index, period)
    return torch.where(index < size, index, period - 1 - index)


def gaussian_blur2d(
    x: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0, kernel: torch.Tensor | None = None
) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=truncate)`` over the last two axes of
    ``x [..., H, W]``, as two 1-D convolutions on ``x``'s device (float32 in, float32 out)."""
    if sigma <= 0:
        return x
    if kernel is None:
        kernel = gaussian_kernel1d(sigma, truncate)
    kernel = kernel.to(device=x.device, dtype=torch.float32)
    radius = (kernel.numel() - 1) // 2
    shape = x.shape
    h, w = shape[-2:]
    y = x.reshape(-1, 1, h, w).float()
    y = y.index_select(3, _reflect_index(w, radius, y.device))
    y = F.conv2d(y, kernel.view(1, 1, 1, -1))
    y = y.index_select(2, _reflect_index(h, radius, y.device))
    y = F.conv2d(y, kernel.view(1, 1, -1, 1))
    return y.reshape(shape)


class GaussianBlur2d(nn.Module):
    """Module form of ``gaussian_blur2d`` (σ in pixels; the kernel is a non-persistent buffer)."""

    def __init__(self, sigma: float = 4.0, truncate: float = 4.0):
        super().__init__()
        self.sigma, self.truncate = float(sigma), float(truncate)
        kernel = gaussian_kernel1d(sigma, truncate) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_blur2d(x, self.sigma, self.truncate, self.kernel) if self.sigma > 0 else x

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, truncate={self.truncate}"


def upsample_blur_matrix(
    size_in: int, size_out: int, sigma: float = 4.0, truncate: float = 4.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[size_out, size_in]``: 1-D linear upsampling (``align_corners=False``, as ``F.interpolate``) followed by
    the Gaussian blur of ``gaussian_blur2d`` (reflect borders), as one matrix. Both steps are linear and
    separable, so ``M_h · grid · M_wᵀ`` equals bilinear upsampling of ``grid`` followed by the 2-D blur."""
    basis = torch.eye(size_in, dtype=torch.float64)[:, None, :]  # size_in signals of length size_in
    up = F.interpolate(basis, size=size_out, mode="linear", align_corners=False)[:, 0]  # [size_in, size_out]
    if sigma > 0:
        kernel = gaussian_kernel1d(sigma, truncate).double()
        radius = (kernel.numel() - 1) // 2
        padded = up.index_select(1, _reflect_index(size_out, radius, up.device))
        up = F.conv1d(padded[:, None], kernel.view(1, 1, -1))[:, 0]
    return up.t().contiguous().to(device=device, dtype=torch.float32)


class PatchScoreMap(nn.Module):
    """Patch scores ``[B, h, w]`` → pixel map ``[B, image_size, image_size]``: bilinear upsampling
    (``align_corners=False``) then a Gaussian blur of ``sigma`` pixels (the PatchCore/SimpleNet anomaly map), as two
    matrix products; the per-axis matrices are cached per grid size and device."""

    def __init__(self, image_size: int, sigma: float = 4.0):
        super().__init__()
        self.image_size, self.sigma = int(image_size), float(sigma)
        self._matrices: dict[tuple, torch.Tensor] = {}

    def _matrix(self, size_in: int, device: torch.device) -> torch.Tensor:
        key = (size_in, str(device))
        if key not in self._matrices:
            self._matrices[key] = upsample_blur_matrix(size_in, self.image_size, self.sigma, device=device)
        return self._matrices[key]

    def forward(self, grid_scores: torch.Tensor) -> torch.Tensor:
        h, w = grid_scores.shape[-2:]
        rows, cols = self._matrix(h, grid_scores.device), self._matrix(w, grid_scores.device)
        return rows @ grid_scores.float() @ cols.t()

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, sigma={self.sigma}"


def roi_on_grid(roi: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor | None:
    """Which cells of an ``h×w`` patch grid overlap the ROI ``[B, 1, H, W]``: ``[B, h·w]`` bool (or None)."""
    if roi is None:
        return None
    return (F.adaptive_max_pool2d(roi.float(), grid) > 0).flatten(1)


def max_in_roi(scores: torch.Tensor, roi_grid: torch.Tensor | None) -> torch.Tensor:
    """Per-slice maximum of patch scores ``[B, N]`` over the patches in the ROI; a slice without any ROI
    patch falls back to all its patches."""
    if roi_grid is None:
        return scores.amax(1)
    keep = roi_grid | ~roi_grid.any(1, keepdim=True)
    return torch.where(keep, scores, torch.full_like(scores, -math.inf)).amax(1)


def max_in_roi_map(pixel: torch.Tensor, roi: torch.Tensor | None) -> torch.Tensor:
    """Per-slice maximum of pixel maps ``[B, H, W]`` inside the ROI ``[B, 1, H, W]`` (``max_in_roi`` on pixels:
    a slice without ROI pixels falls back to its whole map). The slice score of PaDiM and RD4AD."""
    return max_in_roi(pixel.flatten(1), None if roi is None else roi[:, 0].flatten(1) > 0)


def cuda_autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when ``enabled``; a no-op context elsewhere (the CPU stays float32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# the analogues of ResNet layer1 / layer2 / layer3 (strides 4, 8, 16): PaDiM's layers and RD4AD's teacher levels
LAYER1_TO_3: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("blocks.1", "blocks.2", "blocks.4"),
    "vgg16": ("relu3_3", "relu4_3", "relu5_3"),
    "resnet18": ("layer1", "layer2", "layer3"),
    "wide_resnet50_2": ("layer1", "layer2", "layer3"),
}
