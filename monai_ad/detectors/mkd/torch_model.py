"""Multiresolution knowledge distillation (MKD, Salehi et al., CVPR 2021): the cloner, the guided ReLU, the loss.

- ``VGGTaps``: a VGG ``FeatureExtractor`` read at MKD's layers: a ReLU's output as it is, ``poolK`` the output of
  block K's max-pool (its last ReLU max-pooled by 2, which the extractor, cut after that ReLU, does not run).
- ``build_source`` / ``build_cloner``: the frozen ImageNet VGG16 and the thinner trainable VGG that learns to
  reproduce it, both with ``GuidedReLU`` activations.
- ``GuidedReLU`` / ``guided_backprop``: a ReLU whose backward pass, only inside ``guided_backprop``, passes only
  positive gradients where its input was positive (guided backpropagation); elsewhere it is ``torch.relu``.
- ``per_slice_loss``: MKD's loss of each slice, direction + λ · value; its batch mean is the training loss.

Pure torch; the detector around them is ``detector.py`` beside this module.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_ad.networks.backbones import VGG16_RELU, FeatureExtractor, build_backbone, vgg_extractor

# the reference's cloner configuration "B": blocks 2–5 end in the source's widths (128 | 256 | 512 | 512), every
# other convolution is 16 wide; as many convolutions per block as VGG16, so VGG16's module indices (``VGG16_RELU``)
# name its layers too
CLONER_CFG = (16, 16, "M", 16, 128, "M", 16, 16, 256, "M", 16, 16, 512, "M", 16, 16, 512, "M")
# ``poolK``: block K's max-pool output, read as block K's last ReLU max-pooled by 2
POOL_OF_RELU = {"pool1": "relu1_2", "pool2": "relu2_2", "pool3": "relu3_3", "pool4": "relu4_3", "pool5": "relu5_3"}
LAYER_NAMES = (*VGG16_RELU, *POOL_OF_RELU)
DISTILLED_LAYERS = ("pool2", "pool3", "pool4", "pool5")  # the reference's four critical layers (training loss)
SCORED_LAYERS = ("pool3", "pool4", "pool5")  # the three its detection score and localisation use


class GuidedReLU(nn.Module):
    """``torch.relu``, except that while ``guided`` is on (``guided_backprop``) and gradients are recorded, its
    backward pass lets through only the positive gradients at positions where its input was positive."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = bool(inplace)
        self.guided = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.guided and torch.is_grad_enabled():
            return _GuidedReLUFunction.apply(x)
        return torch.relu_(x) if self.inplace else torch.relu(x)

    def extra_repr(self) -> str:
        return f"inplace={self.inplace}"


class _GuidedReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        output = torch.relu(x)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        return grad_output.clamp_min(0) * (output > 0)


def use_guided_relus(module: nn.Module) -> int:
    """Replace every ``nn.ReLU`` inside ``module`` by a ``GuidedReLU`` (same ``inplace``); returns how many."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.ReLU:
                setattr(parent, name, GuidedReLU(child.inplace))
                replaced += 1
    return replaced


@contextlib.contextmanager
def guided_backprop(*modules: nn.Module) -> Iterator[None]:
    """Inside the block the ``GuidedReLU``\\ s of ``modules`` are guided (forward and backward must both run in it)."""
    relus = [m for module in modules for m in module.modules() if isinstance(m, GuidedReLU)]
    for relu in relus:
        relu.guided = True
    try:
        yield
    finally:
        for relu in relus:
            relu.guided = False


class VGGTaps(nn.Module):
    """``forward(x [B, C, H, W]) -> [maps]`` at MKD ``layers`` (``LAYER_NAMES``) of a VGG ``FeatureExtractor``
    built at the matching ReLUs; ``channels[i]`` and ``strides[i]`` describe map ``i``."""

    def __init__(self, extractor: FeatureExtractor, layers: Sequence[str]):
        super().__init__()
        self.extractor = extractor
        self.layers = list(layers)
        self.pooled = [layer in POOL_OF_RELU for layer in self.layers]
        self.channels = list(extractor.channels)
        self.strides = [s * 2 if pooled else s for s, pooled in zip(extractor.strides, self.pooled)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.extractor(x)
        return [F.max_pool2d(m, 2) if pooled else m for m, pooled in zip(maps, self.pooled)]

    def extra_repr(self) -> str:
        return f"layers={self.layers}, channels={self.channels}, strides={self.strides}"


def relu_layers(layers: Sequence[str]) -> list[str]:
    """The ReLU each of MKD's ``layers`` is read from."""
    return [POOL_OF_RELU.get(layer, layer) for layer in layers]


def build_source(
    layers: Sequence[str], weights: str | None = None, allow_random_weights: bool = False
) -> VGGTaps:
    """The frozen ImageNet VGG16 (``build_backbone``) at ``layers``, its ReLUs made ``GuidedReLU``\\ s."""
    taps = VGGTaps(build_backbone("vgg16", relu_layers(layers), weights, allow_random_weights), layers)
    use_guided_relus(taps)
    return taps


def build_cloner(
    layers: Sequence[str], config: Sequence[int | str] = CLONER_CFG, batch_norm: bool = True, bias: bool = False
) -> VGGTaps:
    """A trainable, randomly initialised VGG of ``config`` at ``layers``, as the reference's cloner: Xavier-uniform
    convolutions without bias and, with ``batch_norm``, a BatchNorm after every convolution but the last of each
    block; ReLUs made ``GuidedReLU``\\ s. Draws its weights from the global random state (seed it first)."""
    extractor = vgg_extractor("vgg", config, VGG16_RELU, relu_layers(layers), None, None, frozen=False)
    body = extractor.body
    convs = [index for index, module in enumerate(body) if isinstance(module, nn.Conv2d)]
    ends_block = [following == "M" for item, following in zip(config, [*config[1:], "M"]) if item != "M"]
    for index, last_of_block in zip(convs, ends_block):
        conv = body[index]
        nn.init.xavier_uniform_(conv.weight)
        if not bias:
            conv.bias = None
        if batch_norm and not last_of_block:
            body[index] = nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels))
    taps = VGGTaps(extractor, layers)
    use_guided_relus(taps)
    return taps


def per_slice_loss(
    source_maps: Sequence[torch.Tensor], cloner_maps: Sequence[torch.Tensor], value_weight: float
) -> torch.Tensor:
    """``[B]``: Σ over layers of the direction loss 1 − cos(flattened source map, flattened cloner map) plus
    ``value_weight`` (λ) · Σ over layers of the value loss, the mean squared difference of the maps; float32."""
    direction, value = 0.0, 0.0
    for source, cloner in zip(source_maps, cloner_maps):
        source, cloner = source.float().flatten(1), cloner.float().flatten(1)
        direction = direction + 1 - F.cosine_similarity(cloner, source, dim=1)
        value = value + (cloner - source).pow(2).mean(1)
    return direction + value_weight * value
