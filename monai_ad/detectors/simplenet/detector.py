"""SimpleNet (Liu et al., CVPR 2023): adapted patch features, Gaussian-noise anomalies, a discriminator.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from monai_ad.components.maps import PatchScoreMap, max_in_roi, roi_on_grid
from monai_ad.components.patch_features import PatchFeatures
from monai_ad.components.training_loop import FrozenFeatureTrainer, cache_budget
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.detectors.simplenet.torch_model import Discriminator, feature_adaptor, truncated_l1_loss
from monai_ad.distributed import all_reduce_sum_
from monai_ad.errors import InputError
from monai_ad.settings import check_settings

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 4 << 30
FEATURE_NORMS = ("global", "per_dim", "none")


class FeatureMoments:
    """Per-dimension mean and variance of feature rows ``[..., D]`` seen batch by batch (float64 sums; summed
    over processes under torch.distributed)."""

    def __init__(self, dim: int, device: torch.device):
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.squares = torch.zeros_like(self.total)
        self.count = torch.zeros(1, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        rows = features.reshape(-1, self.total.shape[0]).double()
        self.total += rows.sum(0)
        self.squares += rows.square().sum(0)
        self.count += rows.shape[0]

    def mean_and_variance(self) -> tuple[torch.Tensor, torch.Tensor]:
        for t in (self.total, self.squares, self.count):
            all_reduce_sum_(t)
        if float(self.count) == 0:
            raise InputError("simplenet: no training slices")
        mean = self.total / self.count
        return mean, (self.squares / self.count - mean.square()).clamp_min(0.0)


@register_detector("simplenet")
class SimpleNet(AnomalyDetector):
    """SimpleNet on ``[B, 1, image_size, image_size]`` slices (see the module docstring).

    ``pre_dim`` / ``target_dim`` default to 1536 (the paper, with WideResNet-50-2) or, for backbones whose two
    layers hold fewer channels, their channel total (152 for EfficientNet-Lite0, 1024 for VGG16).
    """

    unsaved_prefixes = ("features.backbone.",)
    # the paper trains 40 x 4 epochs at 288 px; on a CPU its discriminator does not learn in a short schedule
    schedules = {"cpu": {"image_size": 224, "meta_epochs": 4, "gan_epochs": 2}, "quick": {"meta_epochs": 1, "gan_epochs": 1}}

    def __init__(
        self,
        image_size: int = 288,
        in_channels: int = 1,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str | int] | None = None,
        weights: str | None = None,
        allow_random_weights: bool = False,
        pre_dim: int | None = None,
        target_dim: int | None = None,
        patch_size: int = 3,
        noise_std: float = 0.25,
        feature_norm: str | bool = "global",
        margin: float = 0.5,
        hidden_dim: int = 1024,
        meta_epochs: int = 40,
        gan_epochs: int = 4,
        batch_size: int = 8,
        dsc_lr: float = 2e-4,
        dsc_weight_decay: float = 1e-5,
        adaptor_lr: float = 1e-4,
        sigma: float = 4.0,
        cache_features: bool | int | None = None,
        amp: bool = False,
        seed: int = 0,
    ):
        if isinstance(feature_norm, bool):
            feature_norm = "global" if feature_norm else "none"
        if feature_norm not in FEATURE_NORMS:
            raise InputError(f"simplenet: feature_norm must be one of {', '.join(FEATURE_NORMS)}, got {feature_norm!r}")
        check_settings("simplenet", meta_epochs=meta_epochs, gan_epochs=gan_epochs, batch_size=batch_size)
        layers = None if layers is None else list(layers)
        super().__init__(**constructor_arguments())
        self.features = PatchFeatures(
            backbone, layers, weights, allow_random_weights, pre_dim, target_dim,
            paper_dim=1536, patch_size=patch_size, amp=amp,
        )
        dim = self.features.dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.adaptor = feature_adaptor(dim)
            self.discriminator = Discriminator(dim, hidden_dim)
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_scale", torch.ones(dim))
        self.to_map = PatchScoreMap(image_size, sigma)
        self.train_losses: list[float] = []

    # ------------------------------------------------------------------ training
    def _extract(self, image: torch.Tensor) -> torch.Tensor:
        self.check_slices(image)
        return self.features(image.to(self.device, torch.float32, non_blocking=True))[0]

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        budget = cache_budget(p["cache_features"], DEFAULT_CACHE_BYTES)
        trainer = FrozenFeatureTrainer("simplenet", self._extract, p["batch_size"], p["seed"], budget)
        moments = None if p["feature_norm"] == "none" else FeatureMoments(self.features.dim, self.device)
        cached = trainer.cache(batches, progress, observe=None if moments is None else moments.add)
        if moments is not None:
            self._set_normalisation(*moments.mean_and_variance())
        noise = torch.Generator(device=self.device).manual_seed(int(p["seed"]))
        dsc_opt = torch.optim.Adam(self.discriminator.parameters(), lr=p["dsc_lr"], weight_decay=p["dsc_weight_decay"])
        adaptor_opt = torch.optim.AdamW(self.adaptor.parameters(), lr=p["adaptor_lr"])
        self.train_losses = trainer.train(
            self, cached, batches, lambda feats: self._loss(feats.reshape(-1, feats.shape[-1]).float(), noise),
            [adaptor_opt, dsc_opt], int(p["meta_epochs"]) * int(p["gan_epochs"]), progress,
        )  # fmt: skip
        if self.train_losses[-1] > 0.95 * 2 * float(p["margin"]):
            logger.warning(
                "simplenet: the discriminator did not learn to separate the noisy features (final loss %.3f); "
                "train longer or raise noise_std (feature_norm=%s)", self.train_losses[-1], p["feature_norm"],
            )  # fmt: skip

    @torch.no_grad()
    def _set_normalisation(self, mean: torch.Tensor, variance: torch.Tensor) -> None:
        """Centre by ``mean``; divide by the root-mean-square standard deviation (``"global"``) or by each
        dimension's (``"per_dim"``)."""
        if self.hparams["feature_norm"] == "global":
            scale = variance.mean().sqrt().expand_as(variance)
        else:
            scale = variance.sqrt()
        self.feature_mean.copy_(mean.float())
        self.feature_scale.copy_(scale.float().clamp_min(1e-6))

    def _adapt(self, feats: torch.Tensor) -> torch.Tensor:
        if self.hparams["feature_norm"] != "none":
            feats = (feats - self.feature_mean) / self.feature_scale
        return self.adaptor(feats)

    def _loss(self, feats: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Truncated L1: mean(max(0, m − D(true))) + mean(max(0, D(fake) + m)), fake = true + N(0, σ²)."""
        true = self._adapt(feats)
        noise = torch.randn(true.shape, generator=generator, device=true.device, dtype=true.dtype)
        fake = true + noise * float(self.hparams["noise_std"])
        scores = self.discriminator(torch.cat([true, fake]))[:, 0]
        n = true.shape[0]
        return truncated_l1_loss(scores[:n], scores[n:], float(self.hparams["margin"]))

    # ------------------------------------------------------------------ scoring
    def _fused_head(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalisation, adaptor, first discriminator layer and its (eval-mode) BatchNorm folded into one affine
        map ``x ↦ x·W + b`` (all linear), followed by LeakyReLU and the last layer's weight ``w``."""
        first, norm, _, last = self.discriminator
        weight, bias = self.adaptor.weight.t(), self.adaptor.bias  # adapted = x·A + a
        if self.hparams["feature_norm"] != "none":
            weight = weight / self.feature_scale[:, None]
            bias = bias - (self.feature_mean / self.feature_scale) @ self.adaptor.weight.t()
        gain = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        fused_w = (weight @ first.weight.t()) * gain
        fused_b = (bias @ first.weight.t() + first.bias - norm.running_mean) * gain + norm.bias
        return fused_w, fused_b, last.weight[0]

    def patch_scores(self, image: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch scores ``[B, h·w]`` (−D(adaptor(feature)), discriminator in eval mode) and the grid ``(h, w)``.

        Evaluated with the folded head (``_fused_head``) ``chunk`` patches at a time, so the 1024-wide hidden
        activations stay small and are read once."""
        patches, grid = self.features(image)
        b, n, dim = patches.shape
        flat = patches.reshape(b * n, dim)
        weight, bias, out = self._fused_head()
        slope = self.discriminator[2].negative_slope
        scores = torch.empty(b * n, device=flat.device, dtype=flat.dtype)
        for start in range(0, b * n, chunk):
            hidden = F.leaky_relu_(torch.addmm(bias, flat[start : start + chunk], weight), slope)
            torch.mv(hidden, out, out=scores[start : start + chunk])
        return scores.neg_().reshape(b, n), grid

    def backbone_forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.features.backbone_maps(image.to(self.device, torch.float32, non_blocking=True))

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        scores, grid = self.patch_scores(image)
        slice_scores = max_in_roi(scores, roi_on_grid(roi, grid))
        return SliceScores(pixel=self.to_map(scores.reshape(-1, *grid)), slice=slice_scores)
