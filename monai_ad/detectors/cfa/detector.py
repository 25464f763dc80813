"""CFA (Lee, Lee, Song, IEEE Access 2022): coupled-hypersphere-based feature adaptation.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.maps import PatchScoreMap, max_in_roi_map
from monai_ad.components.patch_features import layers_or_layer1_to_3
from monai_ad.components.training_loop import FrozenFeatureTrainer, cache_budget
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.distributed import all_reduce_sum_
from monai_ad.errors import InputError
from monai_ad.networks.backbones import build_backbone
from monai_ad.detectors.cfa.torch_model import (
    PatchDescriptor,
    hypersphere_loss,
    patch_features,
    softmin_nearest_score,
    squared_distances,
)
from monai_ad.settings import check_settings

DEFAULT_CACHE_BYTES = 4 << 30
SCORING_ELEMENTS = 1 << 26  # distances held at once while scoring (256 MiB of float32)


@register_detector("cfa")
class CFA(AnomalyDetector):
    """Coupled-hypersphere feature adaptation on ``[B, 1, image_size, image_size]`` slices (module docstring)."""

    unsaved_prefixes = ("backbone.",)
    default_preprocessing = {"outside_fill": "liver"}
    # a CPU demonstration: 224 px and 10 epochs train in minutes on two cores (the paper: 256 px, 30 epochs)
    schedules = {"cpu": {"image_size": 224, "epochs": 10}, "quick": {"epochs": 1}}

    def __init__(
        self,
        image_size: int = 256,
        in_channels: int = 1,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str | int] | None = None,
        weights: str | None = None,
        allow_random_weights: bool = False,
        gamma_d: int = 1,
        gamma_c: int = 1,
        num_neighbors: int = 3,
        hard_negatives: int = 3,
        radius: float = 1e-5,
        margin: float = 0.1,
        epochs: int = 30,
        batch_size: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        sigma: float = 4.0,
        cache_features: bool | int | None = None,
        amp: bool = False,
        seed: int = 0,
    ):
        check_settings("cfa", image_size=image_size, num_neighbors=num_neighbors, epochs=epochs, batch_size=batch_size,
                       lr=lr, weight_decay=weight_decay, sigma=sigma, seed=seed, gamma_d=gamma_d, gamma_c=gamma_c,
                       hard_negatives=hard_negatives, radius=radius, margin=margin)  # fmt: skip
        layers = layers_or_layer1_to_3(backbone, layers)
        super().__init__(**constructor_arguments())
        self.backbone = build_backbone(backbone, layers, weights, allow_random_weights)
        channels = sum(self.backbone.channels)
        if channels // gamma_d < 1:
            raise InputError(f"cfa: gamma_d {gamma_d} leaves no channel of the {channels} patch features")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.descriptor = PatchDescriptor(channels, channels // gamma_d)
        self.register_buffer("memory", torch.empty(0, channels // gamma_d))
        self.to_map = PatchScoreMap(self.image_size, sigma)
        self.train_losses: list[float] = []

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def _patch_features(self, image: torch.Tensor) -> torch.Tensor:
        self.check_slices(image)
        image = image.to(self.device, torch.float32, non_blocking=True)
        with cuda_autocast(image.device, self.hparams["amp"]):
            levels = self.backbone(image)
        return patch_features(levels)

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        budget = cache_budget(p["cache_features"], DEFAULT_CACHE_BYTES)
        trainer = FrozenFeatureTrainer("cfa", self._patch_features, p["batch_size"], p["seed"], budget)
        totals: list[torch.Tensor] = []

        def add_to_memory_mean(features: torch.Tensor) -> None:
            target = self.descriptor(features.float())
            totals.append(torch.cat([target.sum(0).flatten(), target.new_tensor([target.shape[0]])]))

        with torch.no_grad():
            cached = trainer.cache(batches, progress, observe=add_to_memory_mean)
        if not totals:
            raise InputError("cfa: no training slices")
        total = all_reduce_sum_(torch.stack(totals).sum(0))
        dim = self.descriptor.conv.out_channels
        memory = (total[:-1] / total[-1]).view(dim, -1).t().contiguous()  # [h·w, D]
        self.memory = self._cluster(memory) if p["gamma_c"] > 1 else memory
        optimizer = torch.optim.AdamW(self.descriptor.parameters(), lr=float(p["lr"]),
                                      weight_decay=float(p["weight_decay"]), amsgrad=True)  # fmt: skip
        self.train_losses = trainer.train(self, cached, batches, self._loss, [optimizer], int(p["epochs"]), progress)

    def _cluster(self, memory: torch.Tensor) -> torch.Tensor:
        """The memory bank reduced to h·w / γ_c k-means centres (seeded)."""
        from sklearn.cluster import KMeans

        clusters = max(1, memory.shape[0] // int(self.hparams["gamma_c"]))
        kmeans = KMeans(n_clusters=clusters, n_init=1, random_state=int(self.hparams["seed"]))
        centres = kmeans.fit(memory.cpu().double().numpy()).cluster_centers_
        return torch.from_numpy(np.asarray(centres, dtype=np.float32)).to(memory.device)

    def _loss(self, features: torch.Tensor) -> torch.Tensor:
        p = self.hparams
        distances = squared_distances(self.descriptor(features.float()), self.memory)
        return hypersphere_loss(distances, int(p["num_neighbors"]), int(p["hard_negatives"]), float(p["radius"]),
                                float(p["margin"]))  # fmt: skip

    # ------------------------------------------------------------------ scoring
    def backbone_forward(self, image: torch.Tensor) -> torch.Tensor:
        return self._patch_features(image)

    def patch_scores(self, image: torch.Tensor) -> torch.Tensor:
        """Per-position scores ``[B, h, w]`` on layer 1's grid (eval mode)."""
        target = self.descriptor(self._patch_features(image))
        height, width = target.shape[-2:]
        chunk = max(1, SCORING_ELEMENTS // (height * width * max(1, self.memory.shape[0])))
        scores = [softmin_nearest_score(squared_distances(part, self.memory), int(self.hparams["num_neighbors"]))
                  for part in target.split(chunk)]  # fmt: skip
        return torch.cat(scores).view(-1, height, width)

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        pixel = self.to_map(self.patch_scores(image))
        return SliceScores(pixel=pixel, slice=max_in_roi_map(pixel, roi))

    def extra_repr(self) -> str:
        return f"memory={tuple(self.memory.shape)}"
