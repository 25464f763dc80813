"""UTRAD (Chen et al., Neural Networks 2022): anomaly detection and localisation with a U-Transformer that
reconstructs a frozen network's features.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.cpu_threads import single_cpu_thread
from monai_ad.components.maps import max_in_roi_map
from monai_ad.components.patch_features import layers_or_layer1_to_3
from monai_ad.components.training_loop import FrozenFeatureTrainer, cache_budget
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.detectors.utrad.torch_model import (
    UTransformer,
    concatenate_levels,
    multi_scale_map,
    reconstruction_error,
    scaled_distance,
    utrad_loss,
)
from monai_ad.distributed import all_reduce_sum_
from monai_ad.errors import InputError
from monai_ad.networks.backbones import build_backbone
from monai_ad.networks.flows import FeatureStatistics, standardized
from monai_ad.settings import check_settings

DEFAULT_CACHE_BYTES = 4 << 30
MAP_MODES = ("scaled", "distance")


@register_detector("utrad")
class UTRAD(AnomalyDetector):
    """UTRAD on ``[B, C, image_size, image_size]`` slices (module docstring).

    ``layers``: the backbone levels whose maps are concatenated at the first one's grid (default: the backbone's
    layer1–3 analogues); ``patch_sizes``: the window size of each transformer level, finest first, whose product
    must equal that grid's side; ``standardize_features``: each channel of the backbone's maps shifted and scaled by
    its mean and standard deviation over the training slices before the transformer sees it (README.md);
    ``map_mode``: ``"scaled"`` (the paper's) divides the reconstruction error by the scale head's prediction,
    ``"distance"`` maps the error itself.
    """

    unsaved_prefixes = ("backbone.",)
    # measured on the tests' liver-like slices only (64 px, error map): in-liver pixel AUROC 0.93 with a black surround
    # (80 epochs), 0.96 with the surround filled (40 epochs), and only then every lesion slice above every normal one
    default_preprocessing = {"outside_fill": "liver"}
    # "cpu": a demonstration schedule for two CPU cores (the paper's transformer has about 89M parameters and trains 150
    # epochs on a 64 × 64 grid: a GPU's work): 64 px (a 16 × 16 grid at stride 4, windows 4 and 4), 64-wide tokens,
    # 1 + 1 layers per level, twenty times the paper's lr and 40 epochs; the error map itself (the scale head is not
    # yet trained within such a schedule, README.md). "quick": a smoke run
    schedules = {
        "cpu": {"image_size": 64, "patch_sizes": [4, 4], "d_model": 64, "heads": 4, "encoder_layers": 1,
                "decoder_layers": 1, "feedforward_dim": 128, "epochs": 40, "lr": 2e-3, "map_mode": "distance"},
        "quick": {"epochs": 1},
    }  # fmt: skip

    def __init__(
        self,
        image_size: int = 256,
        in_channels: int = 1,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str | int] | None = None,
        weights: str | None = None,
        allow_random_weights: bool = False,
        standardize_features: bool = True,
        patch_sizes: Sequence[int] = (4, 4, 4),
        d_model: int = 512,
        heads: int = 8,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        feedforward_dim: int = 2048,
        dropout: float = 0.1,
        epochs: int = 150,
        batch_size: int = 8,
        lr: float = 1e-4,
        beta1: float = 0.5,
        map_mode: str = "scaled",
        cache_features: bool | int | None = None,
        amp: bool = False,
        seed: int = 0,
    ):
        check_settings("utrad", image_size=image_size, d_model=d_model, heads=heads, encoder_layers=encoder_layers,
                       decoder_layers=decoder_layers, feedforward_dim=feedforward_dim, dropout=dropout, epochs=epochs,
                       batch_size=batch_size, lr=lr, seed=seed)  # fmt: skip
        if isinstance(beta1, bool) or not isinstance(beta1, (int, float)) or not 0 <= beta1 < 1:
            raise InputError(f"utrad: beta1 must be a number in [0, 1), got {beta1!r}")
        if map_mode not in MAP_MODES:
            raise InputError(f"utrad: map_mode must be one of {', '.join(MAP_MODES)}, got {map_mode!r}")
        if int(d_model) % int(heads) or int(d_model) % 8:
            raise InputError(f"utrad: d_model must be a multiple of 8 and of heads ({heads}), got {d_model}")
        if not isinstance(standardize_features, bool):
            raise InputError(f"utrad: standardize_features must be true or false, got {standardize_features!r}")
        patch_sizes = _patch_sizes(patch_sizes)
        layers = layers_or_layer1_to_3(backbone, layers)
        super().__init__(**constructor_arguments())
        self.backbone = build_backbone(backbone, layers, weights, allow_random_weights)
        grid = self.grid_size()
        if grid != math.prod(patch_sizes):
            raise InputError(
                f"utrad: patch_sizes {patch_sizes} cover a feature grid of side {math.prod(patch_sizes)}, but "
                f"{image_size} px slices give one of side {grid} (stride {self.backbone.strides[0]}); choose patch "
                f"sizes whose product is {grid}, or another image_size"
            )
        channels = sum(self.backbone.channels)
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("feature_std", torch.ones(channels))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.transformer = UTransformer(channels, patch_sizes, int(d_model), int(heads),
                                            int(encoder_layers), int(decoder_layers), int(feedforward_dim),
                                            float(dropout))  # fmt: skip
        self.train_losses: list[float] = []

    def grid_size(self) -> int:
        """The side of the first layer's grid for ``image_size`` slices (the tokens the transformer reconstructs)."""
        with torch.no_grad():
            maps = self.backbone(torch.zeros(1, 1, self.image_size, self.image_size, device=self.device))
        return int(maps[0].shape[-1])  # square slices give a square grid

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def backbone_forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        self.check_slices(image)
        image = image.to(self.device, torch.float32, non_blocking=True)
        with cuda_autocast(image.device, self.hparams["amp"]):
            return self.backbone(image)

    def features(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """The backbone's maps as the transformer's input ``[B, ΣC, h, w]`` float32 (standardised when set)."""
        if self.hparams["standardize_features"]:
            levels = standardized(levels, self.feature_mean, self.feature_std)
        return concatenate_levels(levels)

    def _reconstruct(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with cuda_autocast(features.device, self.hparams["amp"]):
            reconstruction, scale = self.transformer(features)
        return reconstruction.float(), scale.float()

    # ------------------------------------------------------------------ training
    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        budget = cache_budget(p["cache_features"], DEFAULT_CACHE_BYTES)
        trainer = FrozenFeatureTrainer("utrad", self.backbone_forward, p["batch_size"], p["seed"], budget)
        optimizer = torch.optim.Adam(self.transformer.parameters(), lr=float(p["lr"]), betas=(float(p["beta1"]), 0.999))
        # many small matrix products (17-token windows): on a shared CPU one thread was 10× faster than two (README.md)
        statistics = FeatureStatistics() if p["standardize_features"] else None
        with single_cpu_thread(self.device):
            cached = trainer.cache(batches, progress, observe=None if statistics is None else statistics.add)
            if statistics is not None:
                self.feature_mean, self.feature_std = statistics.mean_and_std(all_reduce_sum_)
            self.train_losses = trainer.train(self, cached, batches, self._loss, [optimizer], int(p["epochs"]),
                                              progress)  # fmt: skip

    def _loss(self, levels: list[torch.Tensor]) -> torch.Tensor:
        features = self.features(levels)
        return utrad_loss(features, *self._reconstruct(features))

    # ------------------------------------------------------------------ scoring
    def maps(self, image: torch.Tensor) -> torch.Tensor:
        """Anomaly maps ``[B, H, W]`` of slices on the device (eval mode): the multi-scale map of the scaled feature
        reconstruction error, bilinearly upsampled to the slice."""
        features = self.features(self.backbone_forward(image))
        reconstruction, scale = self._reconstruct(features)
        if self.hparams["map_mode"] == "scaled":
            distance = scaled_distance(features, reconstruction, scale)
        else:
            distance = reconstruction_error(features, reconstruction)
        size = (self.image_size, self.image_size)
        return F.interpolate(multi_scale_map(distance), size=size, mode="bilinear", align_corners=False)[:, 0]

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        with single_cpu_thread(image.device):
            pixel = self.maps(image)
        return SliceScores(pixel=pixel, slice=max_in_roi_map(pixel, roi))

    def extra_repr(self) -> str:
        return f"transformer_parameters={sum(p.numel() for p in self.transformer.parameters())}"


def _patch_sizes(patch_sizes: Sequence[int]) -> list[int]:
    """``patch_sizes`` as a list of whole numbers of at least 2 (one per transformer level), else ``InputError``."""
    values = list(patch_sizes) if isinstance(patch_sizes, (list, tuple)) else None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 64 for v in values):
        raise InputError(
            f"utrad: patch_sizes must be a list of whole numbers from 2 to 64 (one per level), got {patch_sizes!r}"
        )
    return values
