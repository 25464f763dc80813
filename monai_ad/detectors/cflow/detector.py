"""CFLOW (Gudovskiy, Ishizaka, Kozuka, WACV 2022): conditional normalising flows over a frozen encoder's features.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_ad.components.maps import max_in_roi_map
from monai_ad.components.cpu_threads import single_cpu_thread
from monai_ad.components.training_loop import (
    FrozenFeatureTrainer,
    TrainingLoop,
    cache_budget,
    feature_batches,
    index_stream,
)
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.distributed import all_gather_rows, all_reduce_sum_, min_over_processes, optimizer_step
from monai_ad.errors import InputError
from monai_ad.networks.backbones import build_backbone
from monai_ad.networks.flows import (
    FeatureStatistics,
    conditional_flow,
    fiber_loss,
    log_likelihood_per_dimension,
    positional_encoding_2d,
    seeded,
)
from monai_ad.settings import check_settings

DEFAULT_CACHE_BYTES = 4 << 30

# each backbone's analogues of WideResNet-50-2 layer2..4 (strides 8/16/32; VGG16's deepest ReLUs: 4/8/16)
LAYER2_TO_4: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("blocks.2", "blocks.4", "blocks.6"),
    "wide_resnet50_2": ("layer2", "layer3", "layer4"),
    "resnet18": ("layer2", "layer3", "layer4"),
    "vgg16": ("relu3_3", "relu4_3", "relu5_3"),
}


@register_detector("cflow")
class CFLOW(AnomalyDetector):
    """Conditional normalising flows per encoder layer on ``[B, 1, image_size, image_size]`` slices (module
    docstring).

    ``layers`` default to the backbone's layer2–4 analogues (``LAYER2_TO_4``). ``coupling_blocks`` (8),
    ``condition_dim`` (128, a multiple of 4) and ``clamp`` (1.9) shape each flow; ``batch_size`` slices give the
    fibers that are permuted and taken ``fiber_batch_size`` at a time.
    """

    unsaved_prefixes = ("encoder.",)
    # "cpu": about 700 slices of 224 px train in about 5 minutes on a 2-core CPU (the bundle's CPU run): one epoch,
    # ~11k fiber steps (half of BMAD's 2); "quick": 512-fiber batches, an eighth of the steps, as a smoke run
    schedules = {"cpu": {"epochs": 1}, "quick": {"epochs": 1, "fiber_batch_size": 512}}

    def __init__(
        self,
        image_size: int = 256,
        in_channels: int = 1,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str | int] | None = None,
        weights: str | None = None,
        allow_random_weights: bool = False,
        coupling_blocks: int = 8,
        condition_dim: int = 128,
        clamp: float = 1.9,
        epochs: int = 2,
        batch_size: int = 32,
        fiber_batch_size: int = 64,
        lr: float = 1e-4,
        cache_features: bool | int | None = None,
        seed: int = 0,
    ):
        check_settings("cflow", image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                       coupling_blocks=coupling_blocks, fiber_batch_size=fiber_batch_size, clamp=clamp)  # fmt: skip
        whole = isinstance(condition_dim, int) and not isinstance(condition_dim, bool)
        if not whole or condition_dim < 4 or condition_dim % 4:
            raise InputError(f"cflow: condition_dim must be a positive multiple of 4, got {condition_dim!r}")
        if layers is None and backbone in LAYER2_TO_4:
            layers = LAYER2_TO_4[backbone]
        layers = None if layers is None else list(layers)
        if layers is not None and not layers:
            raise InputError("cflow: layers must name at least one encoder layer")
        super().__init__(**constructor_arguments())
        self.encoder = build_backbone(backbone, layers, weights, allow_random_weights)
        with seeded(seed):
            self.flows = nn.ModuleList(
                conditional_flow(channels, condition_dim, coupling_blocks, float(clamp))
                for channels in self.encoder.channels
            )
        # fitted: every layer's per-channel mean and spread of the training fibers (all layers' channels in a row),
        # and per layer the largest per-dimension log-likelihood of a training position
        self.register_buffer("feature_mean", torch.zeros(sum(self.encoder.channels)))
        self.register_buffer("feature_std", torch.ones(sum(self.encoder.channels)))
        self.register_buffer("reference_log_likelihood", torch.zeros(len(self.encoder.channels)))
        self._codes: dict[tuple, torch.Tensor] = {}
        self.train_losses: list[float] = []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.flows.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ features and likelihoods
    @torch.no_grad()
    def _features(self, image: torch.Tensor) -> list[torch.Tensor]:
        self.check_slices(image)
        return self.encoder(image.to(self.device, torch.float32, non_blocking=True))

    def _position_codes(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """``[h·w, condition_dim]``: the positional code of each position of an ``h×w`` grid, row-major."""
        key = (height, width, str(device))
        if key not in self._codes:
            code = positional_encoding_2d(self.hparams["condition_dim"], height, width)
            self._codes[key] = code.flatten(1).t().contiguous().to(device)
        return self._codes[key]

    def _fibers(self, layer: int, level: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s ``[B, C, h, w]`` → ``[B·h·w, C]`` float32 standardised fibers, slice-major then
        row-major (a fiber's position is its row index modulo h·w)."""
        start = sum(self.encoder.channels[:layer])
        channels = slice(start, start + level.shape[1])
        fibers = level.permute(0, 2, 3, 1).reshape(-1, level.shape[1]).float()
        return (fibers - self.feature_mean[channels]) / self.feature_std[channels]

    def _log_likelihood(self, layer: int, fibers: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        z, log_det = self.flows[layer](fibers, c=[codes])
        return log_likelihood_per_dimension(z, log_det)

    def log_likelihood_maps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer ``[B, h, w]``: the per-dimension log-likelihood of every position's fiber."""
        maps = []
        for layer, level in enumerate(features):
            b, _, h, w = level.shape
            codes = self._position_codes(h, w, level.device).repeat(b, 1)
            maps.append(self._log_likelihood(layer, self._fibers(layer, level), codes).view(b, h, w))
        return maps

    # ------------------------------------------------------------------ training
    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        size, fiber_size = int(p["batch_size"]), int(p["fiber_batch_size"])
        budget = cache_budget(p["cache_features"], DEFAULT_CACHE_BYTES)
        trainer = FrozenFeatureTrainer("cflow", self._features, size, p["seed"], budget)
        statistics = FeatureStatistics()
        cached = trainer.cache(batches, progress, observe=statistics.add)
        if cached is not None:
            local_batches = -(-int(cached[0].shape[0]) // size)
        else:
            local_batches = sum(-(-len(batch["image"]) // size) for batch in batches)
        slice_batches = min_over_processes(local_batches)
        if slice_batches == 0:
            raise InputError("cflow: no training slices")
        self.feature_mean, self.feature_std = statistics.mean_and_std(all_reduce_sum_)
        probe = torch.zeros(1, self.in_channels, self.image_size, self.image_size)
        grids = [tuple(level.shape[-2:]) for level in self._features(probe)]
        # every fiber of a full slice batch once per epoch, the same count on every process
        fiber_batches = [-(-size * h * w // fiber_size) for h, w in grids]
        steps_per_epoch = slice_batches * sum(fiber_batches)
        generator = torch.Generator().manual_seed(int(p["seed"]))
        optimizer = torch.optim.Adam(self.trainable_parameters(), lr=float(p["lr"]))
        parameters = self.trainable_parameters()

        def epoch_fibers() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
            slices = feature_batches(cached, batches, self._features, size, generator)
            for features in itertools.islice(slices, slice_batches):
                for layer, (level, count) in enumerate(zip(features, fiber_batches)):
                    h, w = level.shape[-2:]
                    fibers, codes = self._fibers(layer, level), self._position_codes(h, w, level.device)
                    order = index_stream(fibers.shape[0], fiber_size, generator)
                    for index in itertools.islice(order, count):
                        index = index.to(fibers.device)
                        yield layer, fibers[index], codes[index % (h * w)]

        epoch: Iterator[tuple[int, torch.Tensor, torch.Tensor]] = iter(())

        def step(index: int) -> torch.Tensor:
            nonlocal epoch
            if index % steps_per_epoch == 0:
                epoch = epoch_fibers()
            layer, fibers, codes = next(epoch)
            loss = fiber_loss(self._log_likelihood(layer, fibers, codes))
            optimizer_step(loss, [optimizer], parameters)
            return loss

        total = int(p["epochs"]) * steps_per_epoch
        # thousands of steps of small matrix products: on a CPU, threads cost more than they save
        with single_cpu_thread(self.device), TrainingLoop("cflow", self.flows, total, progress) as loop:
            self.train_losses = loop.run(total, step, window=steps_per_epoch)
        self._fit_reference(cached, batches, generator)

    @torch.no_grad()
    def _fit_reference(self, cached, batches, generator: torch.Generator) -> None:
        """``reference_log_likelihood``: per layer the largest per-dimension log-likelihood of a training position,
        over every process."""
        highest = torch.full_like(self.reference_log_likelihood, -math.inf)
        for features in feature_batches(cached, batches, self._features, int(self.hparams["batch_size"]), generator):
            for layer, level_map in enumerate(self.log_likelihood_maps(features)):
                highest[layer] = torch.maximum(highest[layer], level_map.max())
        self.reference_log_likelihood = all_gather_rows(highest[None]).amax(0)

    # ------------------------------------------------------------------ scoring
    def backbone_forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self._features(image)

    def maps(self, image: torch.Tensor) -> torch.Tensor:
        """Anomaly maps ``[B, H, W]`` of slices on the device (eval mode): the number of layers minus the sum over
        layers of the upsampled ``exp(log p / C − reference)``."""
        total = None
        for layer, level_map in enumerate(self.log_likelihood_maps(self._features(image))):
            likelihood = torch.exp(level_map - self.reference_log_likelihood[layer])[:, None]
            likelihood = F.interpolate(likelihood, size=(self.image_size,) * 2, mode="bilinear", align_corners=True)
            likelihood = likelihood[:, 0]
            total = likelihood if total is None else total + likelihood
        return len(self.flows) - total

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        pixel = self.maps(image)
        return SliceScores(pixel=pixel, slice=max_in_roi_map(pixel, roi))

    def extra_repr(self) -> str:
        return f"trainable_parameters={sum(p.numel() for p in self.trainable_parameters())}"
