"""CS-Flow (Rudolph, Wehrbein, Rosenhahn, Wandt, WACV 2022): a fully convolutional cross-scale normalising flow.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from monai_ad.components.maps import max_in_roi_map, roi_on_grid
from monai_ad.components.cpu_threads import single_cpu_thread
from monai_ad.components.training_loop import FrozenFeatureTrainer, cache_budget
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.distributed import all_reduce_sum_, min_over_processes
from monai_ad.errors import InputError
from monai_ad.networks.backbones import build_backbone
from monai_ad.networks.flows import FeatureStatistics, cross_scale_flow, cross_scale_loss, seeded, standardized
from monai_ad.settings import check_settings

DEFAULT_CACHE_BYTES = 4 << 30
N_SCALES = 3  # the slice, its ½ and its ¼ downscale
SLICE_SCORES = ("max", "mean")

# each backbone's stride-16 layer (see the module docstring)
STRIDE16_LAYER: dict[str, str] = {
    "efficientnet_lite0": "blocks.4",
    "wide_resnet50_2": "layer3",
    "resnet18": "layer3",
    "vgg16": "relu5_3",
}


@register_detector("csflow")
class CSFlow(AnomalyDetector):
    """Cross-scale flow on ``[B, 1, image_size, image_size]`` slices (module docstring).

    ``layer`` defaults to the backbone's stride-16 layer (``STRIDE16_LAYER``). ``coupling_blocks`` (4), ``clamp`` (3)
    and ``hidden_channels`` (1024) shape the flow; ``slice_score`` is ``"max"`` (the map's maximum in the ROI) or
    ``"mean"`` (the paper's mean of z² over the positions in the ROI).
    """

    unsaved_prefixes = ("encoder.",)
    # "cpu": about 700 slices of 224 px train in about 6 minutes on a 2-core CPU (the bundle's CPU run): a quarter
    # of the hidden channels (1.0 s per step of 16 slices instead of 3.7 s, one thread), 8 epochs instead of 240,
    # and ten times the learning rate: the flow starts as the identity, and at 2e-4 had not left it within the first
    # 24 steps (loss 0.49999 → 0.49981; at 2e-3 → 0.41)
    schedules = {"cpu": {"hidden_channels": 256, "epochs": 8, "lr": 2e-3}, "quick": {"epochs": 1}}

    def __init__(
        self,
        image_size: int = 768,
        in_channels: int = 1,
        backbone: str = "efficientnet_lite0",
        layer: str | int | None = None,
        weights: str | None = None,
        allow_random_weights: bool = False,
        coupling_blocks: int = 4,
        clamp: float = 3.0,
        hidden_channels: int = 1024,
        epochs: int = 240,
        batch_size: int = 16,
        lr: float = 2e-4,
        eps: float = 1e-4,
        weight_decay: float = 1e-5,
        slice_score: str = "max",
        cache_features: bool | int | None = None,
        seed: int = 0,
    ):
        check_settings("csflow", image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       seed=seed, coupling_blocks=coupling_blocks, hidden_channels=hidden_channels, clamp=clamp, eps=eps)  # fmt: skip
        if slice_score not in SLICE_SCORES:
            raise InputError(f"csflow: slice_score must be one of {', '.join(SLICE_SCORES)}, got {slice_score!r}")
        if layer is None and backbone in STRIDE16_LAYER:
            layer = STRIDE16_LAYER[backbone]
        if isinstance(layer, (list, tuple)):
            raise InputError(f"csflow: layer is one backbone layer, got {list(layer)}")
        super().__init__(**constructor_arguments())
        self.encoder = build_backbone(backbone, None if layer is None else [layer], weights, allow_random_weights)
        probe = torch.zeros(1, in_channels, image_size, image_size)
        grids = [tuple(level.shape[-2:]) for level in self._features(probe)]
        with seeded(seed):
            self.flow = cross_scale_flow(
                self.encoder.channels[0], grids, coupling_blocks, float(clamp), hidden_channels
            )
        # fitted: per scale the per-channel mean and spread of the training features (the scales' channels in a row)
        self.register_buffer("feature_mean", torch.zeros(N_SCALES * self.encoder.channels[0]))
        self.register_buffer("feature_std", torch.ones(N_SCALES * self.encoder.channels[0]))
        self.train_losses: list[float] = []

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.flow.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def _features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The feature map of the slices and of their ½ and ¼ downscales, finest first."""
        self.check_slices(image)
        image = image.to(self.device, torch.float32, non_blocking=True)
        features = []
        for scale in range(N_SCALES):
            size = self.image_size // 2**scale
            scaled = image if scale == 0 else F.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
            features.append(self.encoder(scaled)[0])
        return features

    def latents(self, features: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The flow's latent maps (one per scale) and log|det J| [B] of the (standardised) features."""
        return self.flow(standardized(features, self.feature_mean, self.feature_std))

    # ------------------------------------------------------------------ training
    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        budget = cache_budget(p["cache_features"], DEFAULT_CACHE_BYTES)
        trainer = FrozenFeatureTrainer("csflow", self._features, p["batch_size"], p["seed"], budget)
        statistics = FeatureStatistics()
        cached = trainer.cache(batches, progress, observe=statistics.add)
        if min_over_processes(int(statistics.totals is not None)) == 0:
            raise InputError("csflow: no training slices")
        self.feature_mean, self.feature_std = statistics.mean_and_std(all_reduce_sum_)
        optimizer = torch.optim.Adam(
            self.trainable_parameters(), lr=float(p["lr"]), eps=float(p["eps"]), weight_decay=float(p["weight_decay"])
        )
        epochs = int(p["epochs"])
        with single_cpu_thread(self.device):  # see the module docstring
            self.train_losses = trainer.train(self, cached, batches, self._loss, [optimizer], epochs, progress)

    def _loss(self, features: list[torch.Tensor]) -> torch.Tensor:
        return cross_scale_loss(*self.latents(features))

    # ------------------------------------------------------------------ scoring
    def backbone_forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self._features(image)

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        z, _ = self.latents(self._features(image))
        squared = [level.pow(2).mean(1) for level in z]  # per scale [B, h, w]
        upsampled = [
            F.interpolate(level[:, None], size=(self.image_size,) * 2, mode="bilinear", align_corners=False)[:, 0]
            for level in squared
        ]
        pixel = torch.stack(upsampled).mean(0)
        if self.hparams["slice_score"] == "max":
            return SliceScores(pixel=pixel, slice=max_in_roi_map(pixel, roi))
        return SliceScores(pixel=pixel, slice=mean_in_roi(squared, roi))

    def extra_repr(self) -> str:
        return f"trainable_parameters={sum(p.numel() for p in self.trainable_parameters())}"


def mean_in_roi(maps: list[torch.Tensor], roi: torch.Tensor | None) -> torch.Tensor:
    """``[B]``: the mean of the grid maps ``[B, h_i, w_i]`` over the cells of every grid that overlap the ROI
    (``roi_on_grid``; a slice without ROI cells in a grid counts all of that grid's cells)."""
    total, count = 0.0, 0.0
    for level in maps:
        values = level.flatten(1)
        inside = roi_on_grid(roi, tuple(level.shape[-2:]))
        if inside is None:
            inside = torch.ones_like(values, dtype=torch.bool)
        inside = inside | ~inside.any(1, keepdim=True)
        total = total + torch.where(inside, values, torch.zeros_like(values)).sum(1)
        count = count + inside.sum(1)
    return total / count
