"""UTRAD's networks and losses: the U-shaped multi-level transformer that reconstructs frozen feature tokens, its
scale head, the training loss and the multi-scale distance map."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def concatenate_levels(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feature maps of several backbone levels → ``[B, ΣC, h, w]`` float32 at the first (finest) level's grid, the
    deeper ones repeated by nearest-neighbour upsampling (what the reference code's unfold/fold concatenation gives
    for integer stride ratios)."""
    grid = tuple(maps[0].shape[-2:])
    parts = [m.float() if tuple(m.shape[-2:]) == grid else F.interpolate(m.float(), size=grid, mode="nearest")
             for m in maps]  # fmt: skip
    return torch.cat(parts, dim=1).contiguous()


def to_windows(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Tokens on a square grid ``[B, g, g, C]`` → non-overlapping ``size × size`` windows
    ``[B·(g/size)², size², C]`` (windows in row-major order of the grid, tokens row-major inside a window)."""
    b, g, _, c = grid.shape
    p = g // size
    return grid.view(b, p, size, p, size, c).permute(0, 1, 3, 2, 4, 5).reshape(b * p * p, size * size, c)


def from_windows(windows: torch.Tensor, batch: int, size: int) -> torch.Tensor:
    """The inverse of ``to_windows``: ``[B·p², size², C]`` → ``[B, p·size, p·size, C]``."""
    c = windows.shape[-1]
    p = math.isqrt(windows.shape[0] // batch)
    return windows.view(batch, p, p, size, size, c).permute(0, 1, 3, 2, 4, 5).reshape(batch, p * size, p * size, c)


class UTransformer(nn.Module):
    """UTRAD's U-shaped transformer: ``[B, input_dim, g, g]`` features → (reconstruction ``[B, input_dim, g, g]``,
    scale ``[B, 1, g, g]``), with ``g`` the product of ``patch_sizes``.

    A 1×1 convolution (no bias) maps the features to ``d_model``-wide tokens and a position table over the whole grid
    is added. Going down, level ``i`` splits the token grid into ``patch_sizes[i]``² windows; each window, behind a
    zero token and with a window position table added, passes a transformer encoder. The encoded zero token of each
    window becomes that window's one token on the next, coarser, grid; the window's other tokens pass a bottleneck
    (``d_model → d_model/4 → d_model``, LayerNorm, GELU) and are kept for the way up. Going up from the single
    token left, level ``i``'s decoder takes learned queries (one per window position) and attends to the window's
    coarse token and its kept bottleneck tokens; its outputs become the tokens of the finer grid. A 1×1 convolution
    (no bias) maps the final tokens back to ``input_dim``; a head of 1×1 convolutions with BatchNorm and leaky ReLU
    predicts, from the detached tokens, the reconstruction error at each position (the scale).

    The position tables are random and fixed (buffers): the reference code adds its embeddings' ``.data``, so they
    never receive a gradient. As in the reference, one final LayerNorm is shared by the encoders of every level and
    another by the decoders.
    """

    def __init__(
        self,
        input_dim: int,
        patch_sizes: Sequence[int] = (4, 4, 4),
        d_model: int = 512,
        heads: int = 8,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        feedforward_dim: int = 2048,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.patch_sizes = [int(s) for s in patch_sizes]
        self.grid = math.prod(self.patch_sizes)
        self.input_dim, self.d_model = int(input_dim), int(d_model)
        self.input_projection = nn.Conv2d(input_dim, d_model, kernel_size=1, bias=False)
        self.register_buffer("grid_position", torch.randn(1, d_model, self.grid, self.grid))
        for level, size in enumerate(self.patch_sizes):
            self.register_buffer(f"window_position{level}", torch.randn(size * size, d_model))
        self.queries = nn.ParameterList([nn.Parameter(torch.randn(size * size, d_model)) for size in self.patch_sizes])
        self.dropout = nn.Dropout(dropout)
        encoder_norm, decoder_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

        def encoder() -> nn.TransformerEncoder:
            layer = nn.TransformerEncoderLayer(d_model, heads, feedforward_dim, dropout, "gelu", batch_first=True)
            return nn.TransformerEncoder(layer, encoder_layers, encoder_norm, enable_nested_tensor=False)

        def decoder() -> nn.TransformerDecoder:
            layer = nn.TransformerDecoderLayer(d_model, heads, feedforward_dim, dropout, "gelu", batch_first=True)
            return nn.TransformerDecoder(layer, decoder_layers, decoder_norm)

        self.encoders = nn.ModuleList([encoder() for _ in self.patch_sizes])
        self.decoders = nn.ModuleList([decoder() for _ in self.patch_sizes])
        self.bottlenecks = nn.ModuleList([
            nn.Sequential(nn.Linear(d_model, d_model // 4), nn.LayerNorm(d_model // 4), nn.GELU(),
                          nn.Linear(d_model // 4, d_model), nn.LayerNorm(d_model))
            for _ in self.patch_sizes
        ])  # fmt: skip
        self.reconstruct = nn.Conv2d(d_model, input_dim, kernel_size=1, bias=False)
        widths = [d_model, d_model, d_model // 2, d_model // 4, d_model // 8]
        head: list[nn.Module] = []
        for width_in, width_out in zip(widths, widths[1:]):
            head += [nn.Conv2d(width_in, width_out, 1, bias=False), nn.BatchNorm2d(width_out), nn.LeakyReLU(0.2)]
        self.scale_head = nn.Sequential(*head, nn.Conv2d(widths[-1], 1, 1, bias=False))
        self.apply(_normal_init)

    def window_position(self, level: int) -> torch.Tensor:
        return getattr(self, f"window_position{level}")

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = features.shape
        if h != self.grid or w != self.grid:
            raise ValueError(
                f"UTransformer with patch sizes {self.patch_sizes} takes a {self.grid}×{self.grid} grid, got {h}×{w}"
            )
        tokens = self.dropout(self.input_projection(features) + self.grid_position).permute(0, 2, 3, 1)  # [B, g, g, C]
        kept = []
        for level, size in enumerate(self.patch_sizes):
            windows = self.dropout(to_windows(tokens, size) + self.window_position(level))
            summary = windows.new_zeros(windows.shape[0], 1, self.d_model)
            encoded = self.encoders[level](torch.cat([summary, windows], dim=1))
            kept.append(self.bottlenecks[level](encoded[:, 1:]))
            p = math.isqrt(encoded.shape[0] // b)
            tokens = encoded[:, 0].reshape(b, p, p, self.d_model)
        for level in reversed(range(len(self.patch_sizes))):
            size = self.patch_sizes[level]
            coarse = tokens.reshape(-1, 1, self.d_model)
            memory = torch.cat([coarse, kept[level]], dim=1)
            queries = self.queries[level].unsqueeze(0).expand(memory.shape[0], -1, -1)
            tokens = from_windows(self.decoders[level](queries, memory), b, size)
        tokens = tokens.permute(0, 3, 1, 2)  # [B, C, g, g]
        return self.reconstruct(tokens), self.scale_head(tokens.detach())


def _normal_init(module: nn.Module) -> None:
    """The reference initialisation: convolution and linear weights N(0, 0.02), BatchNorm weights N(1, 0.02) and
    biases 0; the rest keeps PyTorch's defaults."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def reconstruction_error(features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """``[B, 1, h, w]``: the L2 norm over channels of reconstruction − features at each position."""
    return torch.linalg.vector_norm(reconstruction.float() - features.float(), dim=1, keepdim=True)


def utrad_loss(features: torch.Tensor, reconstruction: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """MSE(reconstruction, features) + MSE(scale, the per-position reconstruction error, detached): the
    reconstruction loss and the scale head's, summed as the reference trains them."""
    features, reconstruction, scale = features.float(), reconstruction.float(), scale.float()
    error = reconstruction_error(features, reconstruction).detach()
    return F.mse_loss(reconstruction, features) + F.mse_loss(scale, error)


def scaled_distance(features: torch.Tensor, reconstruction: torch.Tensor, scale: torch.Tensor,
                    eps: float = 1e-6) -> torch.Tensor:  # fmt: skip
    """``[B, 1, h, w]``: the reconstruction error divided by |scale| (kept above ``eps`` so a zero prediction gives a
    large finite score rather than an infinite one)."""
    return reconstruction_error(features, reconstruction) / scale.float().abs().clamp_min(eps)


def pool_sizes(grid: int) -> list[int]:
    """The averaging windows of the multi-scale map: 1, 4, 16, ... up to the grid (the reference's 1, 4, 16, 64 on
    its 64 × 64 grid)."""
    sizes, size = [], 1
    while size <= grid:
        sizes.append(size)
        size *= 4
    return sizes


def multi_scale_map(distance: torch.Tensor) -> torch.Tensor:
    """``[B, 1, h, w]`` → ``[B, 1, h, w]``: the mean over ``pool_sizes`` of the distance average-pooled in
    non-overlapping ``k × k`` windows and bilinearly upsampled back (``align_corners=False``)."""
    h, w = distance.shape[-2:]
    pooled = [F.interpolate(F.avg_pool2d(distance, k, k), size=(h, w), mode="bilinear", align_corners=False)
              for k in pool_sizes(min(h, w))]  # fmt: skip
    return torch.stack(pooled).mean(0)
