"""Deep SVDD (Ruff et al., ICML 2018): a network trained on normal liver windows to map them close to one centre;
the distance to it scores each 32-pixel window of a slice, and the slice by its farthest window in the liver.
Method, choices and schedules: ``README.md`` beside this module."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.maps import PatchScoreMap, max_in_roi, roi_on_grid
from monai_ad.components.cpu_threads import single_cpu_thread
from monai_ad.components.training_loop import TrainingLoop, gather_slices, process_generator
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.detectors.deepsvdd.torch_model import (
    STRIDE,
    WINDOW,
    LeNetDecoder,
    LeNetEncoder,
    centre_away_from_zero,
    global_contrast_normalisation,
    one_class_loss,
    soft_boundary_loss,
    soft_boundary_radius,
    squared_distances,
    window_grid,
    windows_around,
)
from monai_ad.distributed import all_reduce_sum_, min_over_processes, optimizer_step, world_size
from monai_ad.errors import InputError
from monai_ad.settings import check_settings
from monai_ad.synthesis import roi_centers

logger = logging.getLogger(__name__)

OBJECTIVES = ("one-class", "soft-boundary")
SCORING_WINDOWS = 4096  # windows per encoder pass when scoring


@register_detector("deepsvdd")
class DeepSVDD(AnomalyDetector):
    """Deep SVDD over the 32-pixel windows of ``[B, C, image_size, image_size]`` slices (``README.md``)."""

    supported_channels = tuple(range(1, 9))
    # a CPU demonstration schedule: 128 px, batches of 64 windows, 30 + 200 epochs
    schedules = {
        "cpu": {"image_size": 128, "pretrain_epochs": 30, "epochs": 200, "lr_milestone": 0, "batch_size": 64},
        "quick": {"pretrain_epochs": 1, "epochs": 2},
    }

    def __init__(
        self,
        image_size: int = 224,
        in_channels: int = 1,
        objective: str = "one-class",
        nu: float = 0.1,
        latent_dim: int = 128,
        pretrain_epochs: int = 150,
        epochs: int = 300,
        lr_milestone: int = 50,
        warm_up_epochs: int = 10,
        batch_size: int = 200,
        lr: float = 1e-4,
        weight_decay: float = 5e-7,
        sigma: float = 4.0,
        amp: bool = False,
        seed: int = 0,
    ):
        check_settings("deepsvdd", image_size=image_size, nu=nu, latent_dim=latent_dim, pretrain_epochs=pretrain_epochs,
                       epochs=epochs, lr_milestone=lr_milestone, warm_up_epochs=warm_up_epochs, batch_size=batch_size,
                       lr=lr, weight_decay=weight_decay, sigma=sigma, seed=seed)  # fmt: skip
        if objective not in OBJECTIVES:
            raise InputError(f"deepsvdd: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if image_size % STRIDE or image_size < WINDOW:
            raise InputError(f"deepsvdd: image_size must be a multiple of {STRIDE} of at least {WINDOW}, got {image_size}")
        nu, lr, weight_decay, sigma, amp = float(nu), float(lr), float(weight_decay), float(sigma), bool(amp)
        super().__init__(**constructor_arguments())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.encoder = LeNetEncoder(in_channels, latent_dim)
            self.decoder = LeNetDecoder(in_channels, latent_dim)  # pre-training only
        self.register_buffer("centre", torch.zeros(latent_dim))
        self.register_buffer("radius", torch.zeros(()))
        self.to_pixels = PatchScoreMap(image_size, sigma)
        self.pretrain_losses: list[float] = []
        self.train_losses: list[float] = []

    # ------------------------------------------------------------------ training
    def _represent(self, windows: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` representations of raw windows ``[N, C, 32, 32]``."""
        with cuda_autocast(windows.device, self.hparams["amp"]):
            return self.encoder(global_contrast_normalisation(windows)).float()

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        device = self.device
        images, rois = gather_slices("deepsvdd", batches, device, self.check_slices)
        # an epoch: one window per training slice, centred on a random liver pixel
        batch_size = int(p["batch_size"])
        steps_per_epoch = min_over_processes(-(-images.shape[0] // batch_size))
        generator = process_generator(p["seed"])
        pretrain_steps, steps = int(p["pretrain_epochs"]) * steps_per_epoch, int(p["epochs"]) * steps_per_epoch
        logger.info("deepsvdd: %d slices, %d pre-training and %d training steps", images.shape[0], pretrain_steps, steps)

        def draw() -> torch.Tensor:
            index = torch.randint(images.shape[0], (batch_size,), generator=generator).to(device)
            return windows_around(images[index].float(), roi_centers(rois[index], generator))

        # small convolutions: on a CPU one thread is faster than several (README.md)
        with single_cpu_thread(device), TrainingLoop("deepsvdd", self, pretrain_steps + steps, progress) as loop:
            if pretrain_steps:
                self.pretrain_losses = self._pretrain(loop, draw, pretrain_steps, steps_per_epoch)
            self.centre.copy_(self._initial_centre(images, rois))
            self.train()
            self.train_losses = self._train_svdd(loop, draw, steps, steps_per_epoch)

    def _adam(self, parameters: list[torch.nn.Parameter], steps_per_epoch: int):
        p = self.hparams
        optimizer = torch.optim.Adam(parameters, lr=p["lr"], weight_decay=p["weight_decay"])
        milestones = [int(p["lr_milestone"]) * steps_per_epoch] if p["lr_milestone"] else []
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)

    def _pretrain(self, loop: TrainingLoop, draw: Callable[[], torch.Tensor], steps: int, steps_per_epoch: int) -> list[float]:
        """The autoencoder (encoder + mirrored decoder) on the mean squared reconstruction error of the windows."""
        parameters = [*self.encoder.parameters(), *self.decoder.parameters()]
        optimizer, schedule = self._adam(parameters, steps_per_epoch)

        def step(_: int) -> torch.Tensor:
            windows = global_contrast_normalisation(draw())
            with cuda_autocast(windows.device, self.hparams["amp"]):
                reconstruction = self.decoder(self.encoder(windows))
            loss = F.mse_loss(reconstruction.float(), windows)
            optimizer_step(loss, [optimizer], parameters)
            schedule.step()
            return loss

        return loop.run(steps, step, window=steps_per_epoch, where="in the autoencoder pre-training")

    @torch.no_grad()
    def _initial_centre(self, images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """The mean representation (eval mode, every process) of the training windows on the liver's cells, pushed
        away from 0."""
        self.eval()
        total = torch.zeros(self.hparams["latent_dim"], device=images.device, dtype=torch.float64)
        count = torch.zeros((), device=images.device, dtype=torch.float64)
        for start in range(0, images.shape[0], 16):
            representations = self._grid_representations(images[start : start + 16].float())  # [b, cells, D]
            inside = roi_on_grid(rois[start : start + 16], self._grid())
            rows = representations[inside]
            total += rows.double().sum(0)
            count += rows.shape[0]
        all_reduce_sum_(total), all_reduce_sum_(count)
        return centre_away_from_zero((total / count.clamp_min(1)).float())

    def _train_svdd(self, loop: TrainingLoop, draw: Callable[[], torch.Tensor], steps: int, steps_per_epoch: int) -> list[float]:
        p = self.hparams
        parameters = list(self.encoder.parameters())
        optimizer, schedule = self._adam(parameters, steps_per_epoch)
        soft = p["objective"] == "soft-boundary"
        warm_up_steps = int(p["warm_up_epochs"]) * steps_per_epoch

        def step(index: int) -> torch.Tensor:
            distances = squared_distances(self._represent(draw()), self.centre)
            loss = soft_boundary_loss(distances, self.radius, p["nu"]) if soft else one_class_loss(distances)
            optimizer_step(loss, [optimizer], parameters)
            schedule.step()
            if soft and index >= warm_up_steps:  # after the warm-up the radius follows each batch's distances
                self.radius.copy_(all_reduce_sum_(soft_boundary_radius(distances, p["nu"])) / world_size())
            return loss

        return loop.run(steps, step, window=steps_per_epoch)

    # ------------------------------------------------------------------ scoring
    def _grid(self) -> tuple[int, int]:
        return self.image_size // STRIDE, self.image_size // STRIDE

    def _grid_representations(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, cells, D]``: the representation of the window on every 8 × 8 cell."""
        windows = window_grid(image)
        rows = torch.cat([self._represent(chunk) for chunk in windows.split(SCORING_WINDOWS)])
        return rows.view(image.shape[0], -1, rows.shape[-1])

    def window_scores(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, H/8, W/8]``: the ``‖φ − c‖²`` of the window on each cell (minus ``R²`` for the soft boundary)."""
        distances = squared_distances(self._grid_representations(image), self.centre).view(-1, *self._grid())
        return distances - self.radius.pow(2) if self.hparams["objective"] == "soft-boundary" else distances

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        with single_cpu_thread(image.device):
            grid = self.window_scores(image)
        slice_scores = max_in_roi(grid.flatten(1), roi_on_grid(roi, self._grid()))
        return SliceScores(pixel=self.to_pixels(grid), slice=slice_scores)

    def extra_repr(self) -> str:
        return f"encoder_parameters={sum(q.numel() for q in self.encoder.parameters())}"
