"""The deep perceptual autoencoder's networks (Shvetsova et al., ``README.md`` beside this module): a
progressively growing pre-activation residual encoder/decoder and the relative-perceptual-L1 loss on frozen VGG features.

Architecture ("residual18" of the reference implementation, no normalisation layers):

- ``PreActResBlock``: [LeakyReLU(0.2) → (AvgPool2 | nearest ×2) → conv3×3 → LeakyReLU(0.2) → conv3×3] plus a
  skip path (AvgPool2 | nearest ×2) with a 1×1 convolution when the width changes.
- Encoder, per resolution ``r``: a from-image block (linear conv3×3 + two residual blocks) used only while ``r``
  is the input resolution, and a down step ``r → r/2`` (down block + residual block). Latent: at
  ``latent_resolution = 1`` LeakyReLU → conv 4×4 "valid" on the 4×4 map → ``latent_dim×1×1``; at a spatial
  latent (e.g. 8) a residual block to ``latent_dim`` channels at that resolution.
- Decoder (mirror): LeakyReLU → conv 4×4 with padding 3 (1×1 → 4×4), or a residual block from ``latent_dim``
  channels at a spatial latent; up steps ``r/2 → r`` (nearest up block + residual block); a to-image block per
  resolution (LeakyReLU → conv3×3, linear output, no tanh).
- Every convolution: Kaiming-normal weights (fan_out, leaky_relu a = 0.2), PyTorch's default bias.
- Progressive growing: at resolution ``r`` with fade ``alpha < 1`` the encoder blends its new path
  (from-image_r → down_r) with the old one (AvgPool2 → from-image_{r/2}), and the decoder blends to-image_r(up_r)
  with nearest-upsampled to-image_{r/2}, as ``(1 − alpha)·old + alpha·new``.

Images are ``[B, 1, r, r]`` in ``[-1, 1]`` (mean 0.5, std 0.5 of ``[0, 1]`` slices), as the reference.

Widths (``inner_dims``) are listed from the largest resolution down to the latent block's resolution (4 for a
1×1 latent), as the reference configuration files (``[16] * 5`` for 64 → 4); a single integer means that
width everywhere.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_ad.components.autocast import Autocast
from monai_ad.errors import InputError
from monai_ad.networks.backbones import FeatureExtractor, build_backbone, vgg_extractor

SLOPE = 0.2

# feature layer per training resolution (README.md; 64 and above: relu3_2 unless the caller picks another)
LAYER_BY_RESOLUTION = {8: "relu1_2", 16: "relu2_2", 32: "relu3_2"}
DEFAULT_FINAL_LAYER = "relu3_2"

# index of each ReLU in torchvision's vgg19().features
VGG19_RELU = {
    "relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13, "relu3_3": 15,
    "relu3_4": 17, "relu4_1": 20, "relu4_2": 22, "relu4_3": 24, "relu4_4": 26, "relu5_1": 29, "relu5_2": 31,
    "relu5_3": 33, "relu5_4": 35,
}  # fmt: skip
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def _init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="leaky_relu", a=SLOPE)
    return conv


def _conv(cin: int, cout: int, kernel: int = 3, padding: int | None = None) -> nn.Conv2d:
    return _init_conv(nn.Conv2d(cin, cout, kernel, padding=kernel // 2 if padding is None else padding))


def _resample(kind: str | None) -> nn.Module:
    if kind == "down":
        return nn.AvgPool2d(2)
    if kind == "up":
        return nn.Upsample(scale_factor=2, mode="nearest")
    return nn.Identity()


class PreActResBlock(nn.Module):
    """Pre-activation residual block without normalisation; ``resample`` = None, ``"down"`` or ``"up"``."""

    def __init__(self, cin: int, cout: int, resample: str | None = None):
        super().__init__()
        self.body = nn.Sequential(
            nn.LeakyReLU(SLOPE), _resample(resample), _conv(cin, cout), nn.LeakyReLU(SLOPE), _conv(cout, cout)
        )
        skip = [_resample(resample)] + ([_conv(cin, cout, 1)] if cin != cout else [])
        self.skip = nn.Sequential(*skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def resolutions(start: int, final: int) -> list[int]:
    """The training resolutions ``start, 2·start, …, final``."""
    out = [int(start)]
    while out[-1] < final:
        out.append(out[-1] * 2)
    return out


class ProgressiveAutoencoder(nn.Module):
    """Encoder + decoder for every resolution from ``start_resolution`` up to ``max_resolution``.

    ``forward(x, resolution, alpha)`` reconstructs ``x [B, 1, resolution, resolution]``; ``alpha < 1`` is the
    fade-in of ``resolution`` over ``resolution / 2`` during a transition phase.
    """

    def __init__(
        self,
        max_resolution: int = 64,
        start_resolution: int = 8,
        latent_dim: int = 16,
        latent_resolution: int = 1,
        inner_dims: int | Sequence[int] = 16,
        in_channels: int = 1,
    ):
        super().__init__()
        self.base = 4 if latent_resolution == 1 else int(latent_resolution)
        if not _power_of_two(max_resolution) or not _power_of_two(self.base) or latent_resolution < 1:
            raise InputError(
                f"perceptual autoencoder: resolutions must be powers of two, got image size {max_resolution} "
                f"and latent resolution {latent_resolution}"
            )
        if not self.base <= start_resolution <= max_resolution or not _power_of_two(start_resolution):
            raise InputError(
                f"perceptual autoencoder: start resolution {start_resolution} must be a power of two between "
                f"{self.base} and the image size {max_resolution}"
            )
        self.max_resolution, self.start_resolution = int(max_resolution), int(start_resolution)
        self.latent_dim, self.latent_resolution = int(latent_dim), int(latent_resolution)
        levels = resolutions(self.base, self.max_resolution)[::-1]  # largest first, as inner_dims
        if isinstance(inner_dims, int):
            inner_dims = [inner_dims] * len(levels)
        if len(inner_dims) != len(levels) or min(inner_dims) < 1:
            raise InputError(
                f"perceptual autoencoder: inner_dims needs {len(levels)} positive widths (resolutions "
                f"{levels}), got {list(inner_dims)}"
            )
        self.width = {r: int(w) for r, w in zip(levels, inner_dims)}
        used = [r for r in levels if r >= self.start_resolution]  # resolutions an image enters or leaves at

        self.from_image = nn.ModuleDict(
            {
                str(r): nn.Sequential(
                    _conv(in_channels, self.width[r]),
                    PreActResBlock(self.width[r], self.width[r]),
                    PreActResBlock(self.width[r], self.width[r]),
                )
                for r in used
            }
        )
        self.down = nn.ModuleDict(
            {
                str(r): nn.Sequential(
                    PreActResBlock(self.width[r], self.width[r // 2], "down"),
                    PreActResBlock(self.width[r // 2], self.width[r // 2]),
                )
                for r in levels
                if r > self.base
            }
        )
        w0 = self.width[self.base]
        if latent_resolution == 1:
            self.to_latent = nn.Sequential(nn.LeakyReLU(SLOPE), _conv(w0, latent_dim, 4, padding=0))
            self.from_latent = nn.Sequential(nn.LeakyReLU(SLOPE), _conv(latent_dim, w0, 4, padding=3))
        else:
            self.to_latent = PreActResBlock(w0, latent_dim)
            self.from_latent = PreActResBlock(latent_dim, w0)
        self.up = nn.ModuleDict(
            {
                str(r): nn.Sequential(
                    PreActResBlock(self.width[r // 2], self.width[r], "up"),
                    PreActResBlock(self.width[r], self.width[r]),
                )
                for r in levels
                if r > self.base
            }
        )
        self.to_image = nn.ModuleDict(
            {str(r): nn.Sequential(nn.LeakyReLU(SLOPE), _conv(self.width[r], in_channels)) for r in used}
        )

    def encode(self, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        r = int(x.shape[-1])
        self._check_resolution(r, alpha)
        h = self.from_image[str(r)](x)
        if r > self.base:
            h = self.down[str(r)](h)
            if alpha < 1.0:
                old = self.from_image[str(r // 2)](F.avg_pool2d(x, 2))
                h = torch.lerp(old, h, alpha)
            r //= 2
        while r > self.base:
            h = self.down[str(r)](h)
            r //= 2
        return self.to_latent(h)

    def decode(self, z: torch.Tensor, resolution: int, alpha: float = 1.0) -> torch.Tensor:
        self._check_resolution(resolution, alpha)
        h = self.from_latent(z)
        r = self.base
        while r < resolution // 2:
            r *= 2
            h = self.up[str(r)](h)
        if resolution == self.base:
            return self.to_image[str(r)](h)
        new = self.to_image[str(resolution)](self.up[str(resolution)](h))
        if alpha >= 1.0:
            return new
        old = F.interpolate(self.to_image[str(r)](h), scale_factor=2, mode="nearest")
        return torch.lerp(old, new, alpha)

    def forward(self, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        return self.decode(self.encode(x, alpha), int(x.shape[-1]), alpha)

    def _check_resolution(self, r: int, alpha: float) -> None:
        lowest = self.start_resolution * (2 if alpha < 1.0 else 1)
        if str(r) not in self.from_image or r < lowest:
            span = f"{self.start_resolution}..{self.max_resolution}"
            raise ValueError(f"resolution {r} (alpha {alpha}) is outside {span}")


def _power_of_two(n: int) -> bool:
    return int(n) >= 1 and (int(n) & (int(n) - 1)) == 0


# ----------------------------------------------------------------------------- perceptual loss
def _vgg19(layers: Sequence[str], weights: str | None, allow_random: bool) -> FeatureExtractor:
    """torchvision's ``vgg19().features`` (same module indices) cut after the deepest layer in ``layers``,
    ImageNet weights from a torchvision VGG19 ``state_dict`` file (nothing ships them)."""
    if not weights and not allow_random:
        raise InputError(
            "the vgg19 perceptual loss needs its ImageNet weights: a torchvision vgg19 state_dict (.pth) passed as "
            "weights=<path>; no package ships it. perceptual='vgg16' uses weights that ship with the project"
        )
    with torch.random.fork_rng(devices=[]):  # building draws random initial weights: keep callers' RNG intact
        return vgg_extractor("vgg19", VGG19_CFG, VGG19_RELU, layers, weights, None)


def build_vgg(
    name: str, layers: Sequence[str], weights: str | None = None, allow_random: bool = False
) -> FeatureExtractor:
    """A frozen VGG feature extractor for the perceptual loss: ``vgg16`` (ImageNet weights that ship with the
    project, see ``monai_ad.networks.backbones``) or ``vgg19`` (the paper's; a torchvision weights file)."""
    if name == "vgg16":
        return build_backbone("vgg16", list(layers), weights, allow_random)
    if name == "vgg19":
        return _vgg19(list(layers), weights, allow_random)
    raise InputError(f"unknown perceptual network {name!r}; choose vgg16 or vgg19")


def paper_layer_key(layer: str) -> str:
    """``relu3_2`` → ``r32``, the key of the paper's feature-statistics file."""
    return "r" + layer.removeprefix("relu").replace("_", "")


def load_feature_stats(path: str, layers: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel ``(mean, scale)`` of each layer from a file in the paper's format: a mapping from a layer key
    (``r32`` or ``relu3_2``) to a pair of tensors broadcastable to ``[1, C, 1, 1]`` (the paper calls the second
    one "var"; it is used as a divisor)."""
    stats = _load_torch_file_any(path)
    out = {}
    for layer in layers:
        entry = stats.get(layer, stats.get(paper_layer_key(layer)))
        if entry is None:
            raise InputError(f"feature statistics hold no entry for {layer} ({paper_layer_key(layer)})", path)
        try:
            mean, scale = (torch.as_tensor(t, dtype=torch.float32).flatten() for t in entry)
        except (TypeError, ValueError):
            raise InputError(f"feature statistics for {layer} are not a (mean, scale) pair of tensors", path) from None
        out[layer] = (mean, scale)
    return out


def _load_torch_file_any(path: str) -> Mapping:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError("feature_stats is neither 'training', 'none' nor an existing statistics file", path) from None
    except Exception as exc:
        raise InputError(f"not a readable feature statistics file ({type(exc).__name__})", path) from None
    if not isinstance(content, Mapping):
        raise InputError("feature statistics must be a mapping from layer names to (mean, scale)", path)
    return content


class RelativePerceptualL1(Autocast, nn.Module):
    """The relative-perceptual-L1 loss (README.md) on one VGG layer per resolution.

    ``x`` and ``x̂`` in ``[-1, 1]`` are rescaled to ``[0, 1]``, repeated to 3 channels and ImageNet-normalised
    (inside the ``FeatureExtractor``); features ``f`` of the layer for the input's resolution are normalised per
    channel, ``f̂ = (f − μ_c) / s_c`` (buffers ``mean_<r>``, ``scale_<r>``, set by the caller or from a file);
    the per-position loss is ``mean_c |f̂(x) − f̂(x̂)| / mean_{c,h,w} |f̂(x)|`` with the denominator per sample
    and detached; the loss is its mean over positions. With ``amp`` VGG runs under bf16 autocast on CUDA.
    """

    def __init__(
        self,
        layers: Mapping[int, str],
        network: str = "vgg16",
        weights: str | None = None,
        allow_random_weights: bool = False,
        amp: bool = True,
    ):
        super().__init__()
        self.layers = {int(r): str(layer) for r, layer in layers.items()}
        names = sorted(set(self.layers.values()), key=list(self.layers.values()).index)
        self.vgg = nn.ModuleDict({name: build_vgg(network, [name], weights, allow_random_weights) for name in names})
        for r, name in self.layers.items():
            channels = self.vgg[name].channels[0]
            self.register_buffer(f"mean_{r}", torch.zeros(channels))
            self.register_buffer(f"scale_{r}", torch.ones(channels))
        self.amp = bool(amp)


    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """Un-normalised features ``[B, C, h, w]`` (float32) of ``x`` in ``[-1, 1]`` at its own resolution."""
        name = self.layers[int(x.shape[-1])]
        with self.autocast(x.device):
            f = self.vgg[name]((x + 1.0) * 0.5)[0]
        return f.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        r = int(x.shape[-1])
        mean, scale = getattr(self, f"mean_{r}"), getattr(self, f"scale_{r}")
        return (self.raw_features(x) - mean[:, None, None]) / scale[:, None, None]

    def position_loss(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Per-position relative L1 ``[B, h, w]``; its mean over positions is the loss."""
        target = self.features(x)
        denominator = target.abs().mean((1, 2, 3)).detach().clamp_min(1e-12)
        return (target - self.features(reconstruction)).abs().mean(1) / denominator[:, None, None]

    def forward(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``[B]``."""
        return self.position_loss(x, reconstruction).mean((1, 2))

    def set_stats(self, resolution: int, mean: torch.Tensor, scale: torch.Tensor) -> None:
        getattr(self, f"mean_{resolution}").copy_(mean.flatten())
        getattr(self, f"scale_{resolution}").copy_(scale.flatten())


def layers_for(resolutions_used: Sequence[int], final_layer: str | None) -> dict[int, str]:
    """The VGG layer of each training resolution: relu1_2 at 8, relu2_2 at 16, relu3_2 at 32 and above; the
    final resolution uses ``final_layer`` when given (the paper's relu4_2 option at 64). Below 8 (a start at 4)
    relu1_2, the shallowest layer that keeps a 4×4 map."""
    final = max(resolutions_used)
    out = {}
    for r in resolutions_used:
        out[r] = LAYER_BY_RESOLUTION.get(r, "relu1_2" if r < 8 else DEFAULT_FINAL_LAYER)
    if final_layer:
        out[final] = final_layer
    return out


__all__ = [
    "PreActResBlock",
    "ProgressiveAutoencoder",
    "RelativePerceptualL1",
    "build_vgg",
    "layers_for",
    "load_feature_stats",
    "resolutions",
]
