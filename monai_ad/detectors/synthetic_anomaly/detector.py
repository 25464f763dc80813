"""Self-supervised synthetic-anomaly detector: a segmentation network trained on normal slices with anomalies
made on the fly inside the liver, predicting where they are (the FPI / PII / DRAEM family).

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.maps import max_in_roi_map, square_windows
from monai_ad.components.smoothing import GaussianBlur2d
from monai_ad.components.training_loop import TrainingLoop, gather_slices, index_stream, process_generator
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.distributed import optimizer_step
from monai_ad.errors import InputError
from monai_ad.detectors.synthetic_anomaly.torch_model import AnomalySegmenter
from monai_ad.settings import check_settings
from monai_ad.synthesis import DEFAULT_HU_WIDTH, KINDS, SynthesisConfig, hu_scale_for, roi_centers, synthesize

logger = logging.getLogger(__name__)

LOSS_WINDOW = 50  # steps per recorded mean loss
WARMUP = 0.05  # share of the steps with a linearly rising learning rate


@register_detector("synthetic_anomaly")
class SyntheticAnomaly(AnomalyDetector):
    """Segmentation of synthetic anomalies on ``[B, in_channels, image_size, image_size]`` slices (see the module
    docstring). ``kinds`` weighs the synthesis kinds (``density``, ``texture``, ``fpi``, ``pii``)."""

    supported_channels = tuple(range(1, 9))
    # measured (benchmarks/RESULTS.md): each slice with its neighbours 3 mm above and below raised the in-liver
    # pixel AUROC and AUPRO on both the phantoms and the real CT of benchmarks/accuracy.py (2000 steps)
    default_preprocessing = {"context_mm": 3.0}
    # at 200 CPU steps its in-liver pixel AUROC on real CT was below the density floor's (benchmarks/RESULTS.md)
    schedules = {"cpu": {"steps": 2000}, "quick": {"steps": 40}}

    def __init__(
        self,
        image_size: int = 128,
        in_channels: int = 1,
        width: int = 16,
        levels: int = 4,
        res_units: int = 0,
        steps: int = 400,
        batch_size: int = 16,
        crop_size: int = 64,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        dice_weight: float = 1.0,
        p_anomaly: float = 0.5,
        kinds: Mapping[str, float] | None = None,
        diameter_mm: Sequence[float] = (3.0, 80.0),
        delta_hu: Sequence[float] = (-80.0, 60.0),
        field_mm: float = 200.0,
        pii_iterations: int = 60,
        sigma: float = 1.0,
        amp: bool = False,
        seed: int = 0,
    ):
        check_settings(
            "synthetic_anomaly", image_size=image_size, width=width, levels=levels, res_units=res_units, steps=steps,
            batch_size=batch_size, crop_size=crop_size, pii_iterations=pii_iterations, seed=seed, lr=lr,
            field_mm=field_mm, weight_decay=weight_decay, dice_weight=dice_weight, sigma=sigma,
        )  # fmt: skip
        multiple = 2 ** (levels - 1)
        for name, value in (("image_size", image_size), ("crop_size", crop_size)):
            if value % multiple:
                raise InputError(f"synthetic_anomaly: {name} must be a multiple of {multiple} ({levels} levels), got {value}")
        if crop_size > image_size:
            raise InputError(f"synthetic_anomaly: crop_size {crop_size} is larger than image_size {image_size}")
        if not 0 < p_anomaly <= 1:
            raise InputError(f"synthetic_anomaly: p_anomaly must be in (0, 1], got {p_anomaly}")
        diameter_mm, delta_hu = [float(v) for v in diameter_mm], [float(v) for v in delta_hu]
        if len(diameter_mm) != 2 or not 0 < diameter_mm[0] <= diameter_mm[1]:
            raise InputError(f"synthetic_anomaly: diameter_mm must be [low, high] with 0 < low <= high, got {diameter_mm}")
        if len(delta_hu) != 2 or not delta_hu[0] < delta_hu[1]:
            raise InputError(f"synthetic_anomaly: delta_hu must be [low, high] with low < high, got {delta_hu}")
        if kinds is not None:
            kinds = {str(k): float(v) for k, v in dict(kinds).items()}
            if set(kinds) - set(KINDS) or any(v < 0 for v in kinds.values()) or not any(v > 0 for v in kinds.values()):
                raise InputError(f"synthetic_anomaly: kinds must weigh some of {', '.join(KINDS)} with weights >= 0, got {kinds}")
        lr, weight_decay, dice_weight, p_anomaly = float(lr), float(weight_decay), float(dice_weight), float(p_anomaly)
        field_mm, sigma, amp = float(field_mm), float(sigma), bool(amp)
        super().__init__(**constructor_arguments())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.network = AnomalySegmenter(in_channels, width, levels, res_units)
        self.blur = GaussianBlur2d(float(sigma))
        self.dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.train_losses: list[float] = []

    # ------------------------------------------------------------------ synthesis settings
    def synthesis_config(self) -> SynthesisConfig:
        p = self.hparams
        return SynthesisConfig(
            p_anomaly=p["p_anomaly"], kinds=p["kinds"], diameter_mm=tuple(p["diameter_mm"]),
            delta_hu=tuple(p["delta_hu"]), pii_iterations=p["pii_iterations"],
        )  # fmt: skip

    def pixel_mm(self) -> float:
        """mm per pixel the synthesis assumes: the pre-processing's fixed ``pixel_mm`` when it has one, else
        ``field_mm / image_size``."""
        fixed = self.preprocessing.get("pixel_mm")
        return float(fixed) if fixed else self.hparams["field_mm"] / self.image_size

    def hu_scale(self) -> torch.Tensor:
        """``[C]`` intensity change per HU in each channel, from the pre-processing's window(s)."""
        pre = self.preprocessing
        windows = pre.get("windows")
        if windows and len(windows) == self.in_channels:
            return hu_scale_for(self.in_channels, windows=windows)
        return hu_scale_for(self.in_channels, window=pre.get("window") or (0.0, DEFAULT_HU_WIDTH))

    # ------------------------------------------------------------------ training
    def crop(
        self, image: torch.Tensor, roi: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``crop_size`` square of each slice around a random ROI pixel (kept inside the slice)."""
        size = int(self.hparams["crop_size"])
        if size in (0, self.image_size):
            return image, roi
        center = roi_centers(roi, generator).round().long()
        top = (center - size // 2).clamp(0, self.image_size - size)
        return square_windows(image, top, size), square_windows(roi, top, size)

    def loss(self, logits: torch.Tensor, label: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        """BCE over the ROI's pixels + ``dice_weight`` × Dice of the batch (outside the ROI counts as predicted 0)."""
        weight = roi.float()
        bce = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
        bce = (bce * weight).sum() / weight.sum().clamp_min(1.0)
        dice_weight = self.hparams["dice_weight"]
        if dice_weight == 0:
            return bce
        return bce + dice_weight * self.dice(logits.masked_fill(~roi, -30.0), label)

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        images, rois = gather_slices("synthetic_anomaly", batches, self.device, self.check_slices)
        device = self.device
        generator = process_generator(p["seed"])
        indices = index_stream(images.shape[0], int(p["batch_size"]), generator)
        config, pixel_mm, hu_scale = self.synthesis_config(), self.pixel_mm(), self.hu_scale().to(device)
        parameters = [q for q in self.network.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=p["lr"], weight_decay=p["weight_decay"])
        steps = int(p["steps"])
        warmup = max(1, int(WARMUP * steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        )
        logger.info(
            "synthetic_anomaly: %d slices, %d steps, %.2f mm per pixel, %s HU window width",
            images.shape[0], steps, pixel_mm, (1 / hu_scale).tolist(),
        )  # fmt: skip

        def step(_: int) -> torch.Tensor:
            index = next(indices).to(device)
            image, roi = self.crop(images[index].float(), rois[index], generator)
            with torch.no_grad():
                image, label = synthesize(image, roi, pixel_mm, generator, config, hu_scale)
            with cuda_autocast(device, p["amp"]):
                logits = self.network(image, roi)
            loss = self.loss(logits.float(), label, roi)
            optimizer_step(loss, [optimizer], parameters)
            schedule.step()
            return loss

        with TrainingLoop("synthetic_anomaly", self.network, steps, progress) as loop:
            self.train_losses = loop.run(steps, step, window=LOSS_WINDOW)
        self.eval()

    # ------------------------------------------------------------------ scoring
    def anomaly_map(self, image: torch.Tensor, roi: torch.Tensor | None) -> torch.Tensor:
        """The smoothed per-pixel anomaly probability ``[B, H, W]``, 0 outside the ROI (eval mode, on the device)."""
        roi = torch.ones_like(image[:, :1], dtype=torch.bool) if roi is None else roi
        with cuda_autocast(image.device, self.hparams["amp"]):
            logits = self.network(image, roi)
        pixel = self.blur(torch.sigmoid(logits.float())[:, 0])
        return pixel * roi[:, 0]

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        pixel = self.anomaly_map(image, roi)
        return SliceScores(pixel=pixel, slice=max_in_roi_map(pixel, roi))

    def extra_repr(self) -> str:
        return f"parameters={sum(q.numel() for q in self.network.parameters())}"


__all__ = ["SyntheticAnomaly"]
