"""Deep Perceptual Autoencoder (Shvetsova et al., "Anomaly detection in medical imaging with deep perceptual
autoencoders", IEEE Access 2021): an autoencoder trained on normal slices with a relative perceptual L1 loss;
the anomaly score is that loss.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from monai_ad.components.maps import PatchScoreMap, max_in_roi, mean_in_roi, roi_on_grid
from monai_ad.components.training_loop import TrainingLoop, gather_slices, index_stream
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.distributed import all_reduce_sum_, optimizer_step
from monai_ad.errors import InputError
from monai_ad.detectors.dpa.torch_model import (
    ProgressiveAutoencoder,
    RelativePerceptualL1,
    layers_for,
    load_feature_stats,
    resolutions,
)
from monai_ad.settings import check_settings

logger = logging.getLogger(__name__)

FEATURE_STATS = ("training", "none")
SLICE_SCORES = ("mean", "max")
SCALE_FLOOR = 0.01  # of the channels' average standard deviation


@dataclass(frozen=True)
class Phase:
    """One phase of the progressive-growing schedule (``alpha`` fades in ``resolution`` when ``transition``)."""

    resolution: int
    transition: bool
    iterations: int


def to_signed(image: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` slices → ``[-1, 1]`` (mean 0.5, std 0.5, as the reference)."""
    return image * 2.0 - 1.0


def downsample(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize to ``resolution`` (``align_corners=False``, no anti-aliasing), as the reference."""
    if x.shape[-1] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)


@register_detector("dpa")
class DeepPerceptualAutoencoder(AnomalyDetector):
    """Deep Perceptual Autoencoder on ``[B, 1, image_size, image_size]`` slices (see the module docstring)."""

    supported_channels = (1,)  # grey slices only

    unsaved_prefixes = ("loss.vgg.",)
    # the paper grows 8 -> 64 px over 20k + 20k iterations per doubling: a GPU job; on a CPU, a short demonstration
    schedules = {"cpu": {"transition_iters": 10, "stable_iters": 10, "final_iters": 40}}

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 1,
        start_resolution: int | None = 8,
        latent_dim: int = 16,
        latent_resolution: int = 1,
        inner_dims: int | Sequence[int] = 16,
        perceptual: str = "vgg16",
        weights: str | None = None,
        allow_random_weights: bool = False,
        feature_layer: str | None = None,
        feature_stats: str = "training",
        transition_iters: int = 20000,
        stable_iters: int = 20000,
        final_iters: int = 10000,
        batch_size: int = 128,
        lr: float | None = None,
        sigma: float = 0.0,
        slice_score: str = "mean",
        amp: bool = True,
        seed: int = 0,
    ):
        start_resolution = image_size if start_resolution in (None, 0) else start_resolution
        check_settings(
            "dpa", image_size=image_size, start_resolution=start_resolution, latent_dim=latent_dim,
            latent_resolution=latent_resolution, transition_iters=transition_iters, stable_iters=stable_iters,
            final_iters=final_iters, batch_size=batch_size, lr=lr,
        )  # fmt: skip
        if slice_score not in SLICE_SCORES:
            raise InputError(f"dpa: slice_score must be one of {', '.join(SLICE_SCORES)}, got {slice_score!r}")
        if not isinstance(feature_stats, (str, os.PathLike)):  # a file is read at fit time (a saved model needs none)
            raise InputError(f"dpa: feature_stats must be {' or '.join(FEATURE_STATS)} or a statistics file")
        if not isinstance(inner_dims, int):
            inner_dims = [int(w) for w in inner_dims]
        feature_stats = os.fspath(feature_stats)
        super().__init__(**constructor_arguments())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.autoencoder = ProgressiveAutoencoder(
                int(image_size), start_resolution, int(latent_dim), int(latent_resolution), inner_dims
            )
        self.resolutions = resolutions(start_resolution, int(image_size))
        self.loss = RelativePerceptualL1(
            layers_for(self.resolutions, feature_layer), perceptual, weights, allow_random_weights, amp
        )
        for r in self.resolutions:
            stride = self.loss.vgg[self.loss.layers[r]].strides[0]
            if r < stride:
                raise InputError(
                    f"dpa: the VGG layer {self.loss.layers[r]} (stride {stride}) leaves no feature map at "
                    f"resolution {r}; pick a shallower feature_layer or a larger image_size"
                )
        self.to_map = PatchScoreMap(int(image_size), float(sigma))
        self.history: list[dict] = []

    # ------------------------------------------------------------------ schedule
    @property
    def progressive(self) -> bool:
        return len(self.resolutions) > 1

    def growth_phases(self) -> list[Phase]:
        """The training phases in order: stable at the start resolution, then per doubling a transition and a
        stable phase; the last stable phase has ``final_iters``."""
        p = self.hparams
        final = self.resolutions[-1]
        phases = []
        for i, r in enumerate(self.resolutions):
            if i > 0:
                phases.append(Phase(r, True, int(p["transition_iters"])))
            phases.append(Phase(r, False, int(p["final_iters"] if r == final else p["stable_iters"])))
        return [phase for phase in phases if phase.iterations > 0]

    @property
    def learning_rate(self) -> float:
        lr = self.hparams["lr"]
        return float(lr) if lr is not None else (1e-3 if self.progressive else 2e-3)

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def _fit_feature_stats(self, slices: torch.Tensor, chunk: int = 64) -> None:
        """Per-channel mean and (floored) standard deviation of each resolution's VGG layer on the training
        slices, summed over processes; or the statistics from a file; or none."""
        source = self.hparams["feature_stats"]
        if source == "none":
            return
        if source != "training":
            stats = load_feature_stats(source, sorted(set(self.loss.layers.values())))
            for r, layer in self.loss.layers.items():
                mean, scale = stats[layer]
                channels = getattr(self.loss, f"mean_{r}").numel()
                if mean.numel() != channels or scale.numel() != channels:
                    problem = f"feature statistics for {layer} have {mean.numel()} channels, not {channels}"
                    raise InputError(problem, source)
                self.loss.set_stats(r, mean, scale)
            return
        for r in self.resolutions:
            channels = getattr(self.loss, f"mean_{r}").numel()
            total = torch.zeros(channels, dtype=torch.float64, device=self.device)
            squares, count = torch.zeros_like(total), torch.zeros(1, dtype=torch.float64, device=self.device)
            for start in range(0, slices.shape[0], chunk):
                f = self.loss.raw_features(downsample(slices[start : start + chunk].float(), r))
                flat = f.transpose(0, 1).reshape(channels, -1).double()
                total += flat.sum(1)
                squares += flat.square().sum(1)
                count += flat.shape[1]
            for t in (total, squares, count):
                all_reduce_sum_(t)
            mean = total / count
            std = (squares / count - mean.square()).clamp_min(0.0).sqrt()
            scale = std.clamp_min(max(SCALE_FLOOR * float(std.mean()), 1e-6))
            self.loss.set_stats(r, mean.float(), scale.float())

    def training_inputs(self, slices: torch.Tensor, phase: Phase, alpha: float) -> torch.Tensor:
        """The images the network sees in ``phase``: downsampled to its resolution and, during a transition,
        blended with the nearest-upsampled previous resolution."""
        x = downsample(slices, phase.resolution)
        if phase.transition and alpha < 1.0:
            low = F.interpolate(downsample(slices, phase.resolution // 2), scale_factor=2, mode="nearest")
            x = torch.lerp(low, x, alpha)
        return x

    def training_loss(self, x: torch.Tensor, phase: Phase, alpha: float) -> torch.Tensor:
        """Mean relative perceptual L1 of a batch; smooth-PG blend with the previous resolution's loss during a
        transition."""
        reconstruction = self.autoencoder(x, alpha if phase.transition else 1.0)
        loss = self.loss(x, reconstruction).mean()
        if phase.transition and alpha < 1.0:
            half = phase.resolution // 2
            previous = self.loss(downsample(x, half), downsample(reconstruction, half)).mean()
            loss = (1.0 - alpha) * previous + alpha * loss
        return loss

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        # every slice of this process in [-1, 1]
        slices, _ = gather_slices("dpa", batches, self.device, self.check_slices, to_signed)
        self._fit_feature_stats(slices)
        indices = index_stream(slices.shape[0], int(self.hparams["batch_size"]), torch.Generator().manual_seed(
            int(self.hparams["seed"])), drop_last=True)  # fmt: skip
        phases = self.growth_phases()
        self.history = []
        with TrainingLoop("dpa", self.autoencoder, sum(p.iterations for p in phases), progress, unit="it") as loop:
            for phase in phases:
                # a fresh optimiser for each phase's networks, as the reference
                optimizer = torch.optim.Adam(self.autoencoder.parameters(), lr=self.learning_rate)

                def step(index: int) -> torch.Tensor:
                    alpha = (index + 1) / phase.iterations if phase.transition else 1.0
                    x = self.training_inputs(slices[next(indices).to(slices.device)].float(), phase, alpha)
                    loss = self.training_loss(x, phase, alpha)
                    optimizer_step(loss, [optimizer], self.autoencoder.parameters())
                    return loss

                tenth = max(1, phase.iterations // 10)
                losses = loop.run(phase.iterations, step, tenth, where=f"at resolution {phase.resolution}")
                self.history.append(
                    {
                        "resolution": phase.resolution,
                        "phase": "transition" if phase.transition else "stable",
                        "iterations": phase.iterations,
                        "alpha_first": 1 / phase.iterations if phase.transition else 1.0,
                        "alpha_last": 1.0,
                        "loss_first": losses[0],  # mean of the first tenth of the phase
                        "loss_last": losses[-1],  # and of the last
                    }
                )
                logger.info("dpa: %s", self.history[-1])
        self.eval()

    # ------------------------------------------------------------------ scoring
    def position_scores(self, image: torch.Tensor) -> torch.Tensor:
        """The per-position relative perceptual L1 ``[B, h, w]`` of slices ``[B, 1, S, S]`` in ``[0, 1]`` at the
        final resolution."""
        x = to_signed(image)
        return self.loss.position_loss(x, self.autoencoder(x))

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        grid = self.position_scores(image)
        reduce = mean_in_roi if self.hparams["slice_score"] == "mean" else max_in_roi
        slice_scores = reduce(grid.flatten(1), roi_on_grid(roi, tuple(grid.shape[-2:])))
        return SliceScores(pixel=self.to_map(grid), slice=slice_scores)


__all__ = ["DeepPerceptualAutoencoder", "Phase", "mean_in_roi"]
