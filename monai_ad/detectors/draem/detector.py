"""DRAEM (Zavrtanik, Kristan, Skočaj, ICCV 2021): a reconstructive and a discriminative sub-network trained
together on normal slices with Perlin-noise anomalies (``monai_ad.synthesis.perlin_anomalies``); the pixel map is
the discriminative network's anomaly probability after a mean filter. What follows the paper, what was chosen
here and the schedules: ``monai_ad/detectors/draem/README.md``."""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.maps import max_in_roi_map
from monai_ad.components.training_loop import TrainingLoop, gather_slices, index_stream, process_generator
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.detectors.draem.torch_model import DiscriminativeSubNetwork, DraemLoss, DraemModel
from monai_ad.distributed import min_over_processes, optimizer_step
from monai_ad.errors import InputError
from monai_ad.settings import check_settings
from monai_ad.synthesis import perlin_anomalies

logger = logging.getLogger(__name__)

MILESTONES = (0.8, 0.9)  # shares of the training steps where the learning rate is multiplied by LR_DECAY
LR_DECAY = 0.2


@register_detector("draem")
class DRAEM(AnomalyDetector):
    """Discriminatively trained reconstruction embedding on ``[B, C, image_size, image_size]`` slices (README.md)."""

    # a CPU demonstration: 128 px, narrower sub-networks (paper 128 / 64) and 10 epochs, meant for two CPU cores (the
    # paper: 256 px, 700 epochs; BMAD: 224 px, batch 16); the narrow networks need the higher learning rate
    schedules = {
        "cpu": {"image_size": 128, "width": 16, "discriminator_width": 8, "epochs": 10, "batch_size": 8,
                "lr": 1e-3, "mean_filter": 11},
        "quick": {"epochs": 1},
    }  # fmt: skip

    def __init__(
        self,
        image_size: int = 256,
        in_channels: int = 1,
        width: int = 128,
        discriminator_width: int = 64,
        epochs: int = 700,
        batch_size: int = 8,
        lr: float = 1e-4,
        focal_gamma: float = 2.0,
        p_anomaly: float = 0.5,
        beta: Sequence[float] = (0.0, 0.8),
        perlin_scale_log2: int = 6,
        perlin_threshold: float = 0.5,
        mean_filter: int = 21,
        amp: bool = False,
        seed: int = 0,
    ):
        check_settings("draem", image_size=image_size, width=width, discriminator_width=discriminator_width,
                       epochs=epochs, batch_size=batch_size, lr=lr, focal_gamma=focal_gamma, seed=seed,
                       perlin_scale_log2=perlin_scale_log2, perlin_threshold=perlin_threshold,
                       mean_filter=mean_filter)  # fmt: skip
        multiple = 2 ** (DiscriminativeSubNetwork.LEVELS - 1)
        if image_size % multiple:
            raise InputError(
                f"draem: image_size must be a multiple of {multiple} (its U-Net's 6 levels), got {image_size}"
            )
        if not 0 < p_anomaly <= 1:
            raise InputError(f"draem: p_anomaly must be a number above 0 and at most 1, got {p_anomaly!r}")
        beta = [float(v) for v in beta]
        if len(beta) != 2 or not 0 <= beta[0] <= beta[1] <= 1:
            raise InputError(f"draem: beta must be [low, high] with 0 <= low <= high <= 1, got {beta}")
        if mean_filter % 2 == 0:
            raise InputError(f"draem: mean_filter must be odd (a window centred on each pixel), got {mean_filter}")
        lr, focal_gamma, p_anomaly, amp = float(lr), float(focal_gamma), float(p_anomaly), bool(amp)
        perlin_threshold = float(perlin_threshold)
        super().__init__(**constructor_arguments())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.model = DraemModel(self.in_channels, int(width), int(discriminator_width))
        self.criterion = DraemLoss(focal_gamma)
        self.train_losses: list[float] = []

    # ------------------------------------------------------------------ training
    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        device = self.device
        images, rois = gather_slices("draem", batches, device, self.check_slices)
        generator = process_generator(p["seed"])
        batch_size = min(int(p["batch_size"]), images.shape[0])
        steps_per_epoch = min_over_processes(math.ceil(images.shape[0] / batch_size))
        steps = int(p["epochs"]) * steps_per_epoch
        indices = index_stream(images.shape[0], batch_size, generator)
        parameters = list(self.model.parameters())
        optimizer = torch.optim.Adam(parameters, lr=p["lr"])
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(m * steps) for m in MILESTONES], LR_DECAY)
        logger.info("draem: %d slices, %d steps of %d", images.shape[0], steps, batch_size)

        def step(_: int) -> torch.Tensor:
            index = next(indices).to(device)
            original, roi = images[index].float(), rois[index]
            with torch.no_grad():
                augmented, mask = perlin_anomalies(original, roi, generator, p["p_anomaly"], tuple(p["beta"]),
                                                   p["perlin_scale_log2"], p["perlin_threshold"])  # fmt: skip
            with cuda_autocast(device, p["amp"]):
                reconstruction, logits = self.model(augmented)
            loss = self.criterion(reconstruction, original, logits, mask)
            optimizer_step(loss, [optimizer], parameters)
            schedule.step()
            return loss

        with TrainingLoop("draem", self.model, steps, progress) as loop:
            self.train_losses = loop.run(steps, step, window=steps_per_epoch)

    # ------------------------------------------------------------------ scoring
    def anomaly_probability(self, image: torch.Tensor) -> torch.Tensor:
        """The discriminative sub-network's anomaly probability ``[B, H, W]`` before the mean filter."""
        with cuda_autocast(image.device, self.hparams["amp"]):
            _, logits = self.model(image)
        return torch.softmax(logits.float(), 1)[:, 1]

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        size = int(self.hparams["mean_filter"])
        probability = self.anomaly_probability(image)
        pixel = F.avg_pool2d(probability[:, None], size, stride=1, padding=size // 2)[:, 0] if size > 1 else probability
        return SliceScores(pixel=pixel, slice=max_in_roi_map(pixel, roi))

    def extra_repr(self) -> str:
        return f"parameters={sum(q.numel() for q in self.model.parameters())}"
