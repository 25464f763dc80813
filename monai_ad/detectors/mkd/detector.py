"""MKD (Salehi, Sadjadi, Baselizadeh, Rohban, Rabiee, CVPR 2021): multiresolution knowledge distillation.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.maps import cosine_distance_map, max_in_roi_map
from monai_ad.components.smoothing import GaussianBlur2d
from monai_ad.components.training_loop import FrozenFeatureTrainer, cache_budget
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.errors import InputError
from monai_ad.detectors.mkd.torch_model import (
    DISTILLED_LAYERS,
    LAYER_NAMES,
    SCORED_LAYERS,
    build_cloner,
    build_source,
    guided_backprop,
    per_slice_loss,
)
from monai_ad.settings import Range, check_setting, check_settings

DEFAULT_CACHE_BYTES = 4 << 30
MAP_MODES = ("gradient", "distance")
GUIDED = ("cloner", "both", "none")


@register_detector("mkd")
class MKD(AnomalyDetector):
    """Multiresolution knowledge distillation on ``[B, C, image_size, image_size]`` slices (module docstring).

    ``layers``: the source layers distilled (``LAYER_NAMES``: VGG16's ReLUs or ``pool1..pool5``); ``map_layers``:
    those of them the map reads; ``value_weight``: λ; ``guided``: whose ReLUs guided backpropagation runs through.
    """

    unsaved_prefixes = ("source.",)
    # measured on the tests' liver-like slices (30 epochs at 64 px): the gradient map's in-liver pixel AUROC is 0.90
    # with a black surround (its edge draws the gradient) and 0.97 with the surround filled; not measured on real CT
    default_preprocessing = {"outside_fill": "liver"}
    # "cpu": the bundle's CPU demonstration, 3 epochs of batch 16 (about 130 steps for 700 slices of 224 px; 31 s
    # for 96 slices on two cores, about 4 min for 700, the source's maps once included); the paper's: 200 epochs of
    # batch 64. "quick": a smoke run
    schedules = {"cpu": {"epochs": 3, "batch_size": 16}, "quick": {"epochs": 1}}

    def __init__(
        self,
        image_size: int = 224,
        in_channels: int = 1,
        layers: Sequence[str] = DISTILLED_LAYERS,
        map_layers: Sequence[str] = SCORED_LAYERS,
        weights: str | None = None,
        allow_random_weights: bool = False,
        epochs: int = 200,
        batch_size: int = 64,
        lr: float = 1e-3,
        value_weight: float = 0.01,
        map_mode: str = "gradient",
        guided: str = "cloner",
        sigma: float = 4.0,
        cache_features: bool | int | None = None,
        amp: bool = False,
        seed: int = 0,
    ):
        check_settings("mkd", image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, sigma=sigma,
                       seed=seed)  # fmt: skip
        layers, map_layers = _layer_list("layers", layers), _layer_list("map_layers", map_layers)
        if not set(map_layers) <= set(layers):
            raise InputError(f"mkd: map_layers must be some of layers {layers}, got {map_layers}")
        check_setting("value_weight", value_weight, {"value_weight": Range(0, None)}, "mkd")
        if map_mode not in MAP_MODES:
            raise InputError(f"mkd: map_mode must be one of {', '.join(MAP_MODES)}, got {map_mode!r}")
        if guided not in GUIDED:
            raise InputError(f"mkd: guided must be one of {', '.join(GUIDED)}, got {guided!r}")
        super().__init__(**constructor_arguments())
        self.source = build_source(layers, weights, allow_random_weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.cloner = build_cloner(layers)
        wrong = [f"{layer} ({c} channels, the source {s})"
                 for layer, c, s in zip(layers, self.cloner.channels, self.source.channels) if c != s]  # fmt: skip
        if wrong:
            raise InputError(f"mkd: the cloner's width differs from the source's at {', '.join(wrong)}; choose "
                             "layers that end a block from block 2 on (pool2..pool5, relu2_2/3_3/4_3/5_3)")
        deepest = max(self.source.strides)
        if self.image_size < deepest:
            raise InputError(f"mkd: image_size must be at least {deepest} for layers {layers}, got {self.image_size}")
        self.map_levels = [layers.index(layer) for layer in map_layers]
        self.blur = GaussianBlur2d(sigma)
        self.train_losses: list[float] = []

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def _slices_and_source_maps(self, image: torch.Tensor) -> list[torch.Tensor]:
        self.check_slices(image)
        image = image.to(self.device, torch.float32, non_blocking=True)
        with cuda_autocast(image.device, self.hparams["amp"]):
            return [image, *self.source(image)]

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        budget = cache_budget(p["cache_features"], DEFAULT_CACHE_BYTES)
        trainer = FrozenFeatureTrainer("mkd", self._slices_and_source_maps, p["batch_size"], p["seed"], budget)
        cached = trainer.cache(batches, progress)
        optimizer = torch.optim.Adam(self.cloner.parameters(), lr=float(p["lr"]))
        self.train_losses = trainer.train(self, cached, batches, self._loss, [optimizer], int(p["epochs"]), progress)

    def _loss(self, rows: list[torch.Tensor]) -> torch.Tensor:
        image, source_maps = rows[0].float(), rows[1:]
        with cuda_autocast(image.device, self.hparams["amp"]):
            cloner_maps = self.cloner(image)
        return per_slice_loss(source_maps, cloner_maps, float(self.hparams["value_weight"])).mean()

    # ------------------------------------------------------------------ scoring
    def backbone_forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self._slices_and_source_maps(image)[1:]

    def _scored(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [maps[level] for level in self.map_levels]

    def distance_maps(self, image: torch.Tensor) -> torch.Tensor:
        """Unsmoothed ``map_mode="distance"`` maps ``[B, H, W]`` of slices on the device (eval mode)."""
        source_maps = self.backbone_forward(image)
        with torch.no_grad(), cuda_autocast(image.device, self.hparams["amp"]):
            cloner_maps = self.cloner(image)
        return cosine_distance_map(self._scored(source_maps), self._scored(cloner_maps), self.image_size, "sum")

    def gradient_maps(self, image: torch.Tensor) -> torch.Tensor:
        """Unsmoothed ``map_mode="gradient"`` maps ``[B, H, W]``: |∂ loss / ∂ normalised input| summed over the
        channels, each slice's gradient that of its own loss (eval mode: slices are independent)."""
        self.check_slices(image)
        guided = {"cloner": [self.cloner], "both": [self.cloner, self.source], "none": []}[self.hparams["guided"]]
        extractor = self.source.extractor
        value_weight = float(self.hparams["value_weight"])
        # inference_mode(False): a caller's inference mode would forbid the graph; the slices' clone is a normal tensor
        with torch.inference_mode(False), torch.enable_grad(), guided_backprop(*guided), \
                cuda_autocast(image.device, self.hparams["amp"]):  # fmt: skip
            slices = image.to(self.device, torch.float32).expand(-1, 3, -1, -1).clone().requires_grad_(True)
            losses = per_slice_loss(self._scored(self.source(slices)), self._scored(self.cloner(slices)), value_weight)
            (gradient,) = torch.autograd.grad(losses.sum(), slices)
        return (gradient.float() * extractor.std).abs().sum(1)

    def maps(self, image: torch.Tensor) -> torch.Tensor:
        """Unsmoothed anomaly maps ``[B, H, W]`` of slices on the device (eval mode), by ``map_mode``."""
        if self.hparams["map_mode"] == "distance":
            return self.distance_maps(image)
        return self.gradient_maps(image)

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        pixel = self.blur(self.maps(image))
        return SliceScores(pixel=pixel, slice=max_in_roi_map(pixel, roi))

    def extra_repr(self) -> str:
        return f"cloner_parameters={sum(p.numel() for p in self.cloner.parameters())}"


def _layer_list(setting: str, layers: Sequence[str]) -> list[str]:
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [layer for layer in layers if layer not in LAYER_NAMES]
    if not layers or unknown or len(set(layers)) != len(layers):
        raise InputError(f"mkd: {setting} must be distinct VGG16 layers ({', '.join(LAYER_NAMES)}), got {layers}")
    return layers

