"""STFPM (Wang, Han, Ding, Huang, BMVC 2021): student–teacher feature pyramid matching.

A frozen ImageNet teacher and a student of the same architecture, randomly initialised, see the same slice; the
student is trained on normal slices to reproduce the teacher's feature pyramid. Where the slice holds something the
student never saw, its features part from the teacher's. As the paper and the anomalib implementation BMAD ran:

- **Levels.** The teacher's layer1–3 (ResNet-18 in the paper): the backbone's analogues (``LAYER1_TO_3``), for the
  default EfficientNet-Lite0 ``blocks.1/2/4`` (24/40/112 channels at strides 4/8/16).
- **Loss.** Per level ½/(h·w) · Σ‖t̂ − ŝ‖² over positions and the batch, with t̂, ŝ the channel-L2-normalised
  teacher and student features; summed over levels (anomalib's sum over the batch, so the step grows with the batch
  as in BMAD's runs).
- **Optimiser.** SGD, lr 0.4, momentum 0.9, weight decay 1e-4, batch 32, 100 epochs, 256 px.
- **Map.** Per level ½‖t̂ − ŝ‖² (= 1 − cos(t, s)), bilinear upsampling, product over levels (``cosine_distance_map``
  in ``"multiply"`` mode); no smoothing (``sigma=0``). Slice score: the map's maximum inside the liver.

Choices the sources leave open, made here:

- **No early stopping.** anomalib stops when a validation score stops improving (patience 5), which needs abnormal
  validation slices; the weights after the last of ``epochs`` are kept.
- **Teacher maps computed once.** The teacher is frozen and the method uses no augmentation, so its maps and the
  slices themselves are cached on the device while they fit ``cache_features`` bytes (as RD4AD's).
- **Student BatchNorm.** The student keeps its BatchNorms and trains them; under torch.distributed their running
  statistics are averaged after every epoch and gradients after every step, so every process holds the same model.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.maps import cosine_distance_map, max_in_roi_map
from monai_ad.components.patch_features import layers_or_layer1_to_3
from monai_ad.components.smoothing import GaussianBlur2d
from monai_ad.components.training_loop import FrozenFeatureTrainer, cache_budget
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.errors import InputError
from monai_ad.networks.backbones import build_backbone, build_student
from monai_ad.settings import check_settings

DEFAULT_CACHE_BYTES = 4 << 30


def pyramid_matching_loss(teacher_maps: Sequence[torch.Tensor], student_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over levels of ½/(h·w) · Σ over the batch and positions of ‖t̂ − ŝ‖² (features normalised over channels)."""
    loss = 0.0
    for teacher, student in zip(teacher_maps, student_maps):
        height, width = teacher.shape[-2:]
        difference = F.normalize(teacher.float(), dim=1) - F.normalize(student.float(), dim=1)
        loss = loss + 0.5 / (height * width) * difference.pow(2).sum()
    return loss


@register_detector("stfpm")
class STFPM(AnomalyDetector):
    """Student–teacher feature pyramid matching on ``[B, 1, image_size, image_size]`` slices (module docstring)."""

    unsaved_prefixes = ("teacher.",)
    # measured on the liver phantoms and real CT with inserted lesions (benchmarks/accuracy.py): see RESULTS.md
    default_preprocessing = {"outside_fill": "liver"}
    # a CPU demonstration: 224 px and 20 epochs train in minutes on two cores (the paper: 256 px, 100 epochs)
    schedules = {"cpu": {"image_size": 224, "epochs": 20}, "quick": {"epochs": 2}}

    def __init__(
        self,
        image_size: int = 256,
        in_channels: int = 1,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str | int] | None = None,
        weights: str | None = None,
        allow_random_weights: bool = False,
        epochs: int = 100,
        batch_size: int = 32,
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        sigma: float = 0.0,
        cache_features: bool | int | None = None,
        amp: bool = False,
        seed: int = 0,
    ):
        check_settings("stfpm", image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, sigma=sigma,
                       weight_decay=weight_decay, seed=seed)  # fmt: skip
        if not 0 <= momentum < 1:
            raise InputError(f"stfpm: momentum must be a number in [0, 1), got {momentum!r}")
        layers = layers_or_layer1_to_3(backbone, layers)
        super().__init__(**constructor_arguments())
        self.teacher = build_backbone(backbone, layers, weights, allow_random_weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.student = build_student(backbone, layers)
        self.blur = GaussianBlur2d(sigma)
        self.train_losses: list[float] = []

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def _slices_and_teacher_maps(self, image: torch.Tensor) -> list[torch.Tensor]:
        self.check_slices(image)
        image = image.to(self.device, torch.float32, non_blocking=True)
        with cuda_autocast(image.device, self.hparams["amp"]):
            return [image, *self.teacher(image)]

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        budget = cache_budget(p["cache_features"], DEFAULT_CACHE_BYTES)
        trainer = FrozenFeatureTrainer("stfpm", self._slices_and_teacher_maps, p["batch_size"], p["seed"], budget)
        cached = trainer.cache(batches, progress)
        optimizer = torch.optim.SGD(self.student.parameters(), lr=float(p["lr"]), momentum=float(p["momentum"]),
                                    weight_decay=float(p["weight_decay"]))  # fmt: skip
        self.train_losses = trainer.train(self, cached, batches, self._loss, [optimizer], int(p["epochs"]), progress)

    def _loss(self, rows: list[torch.Tensor]) -> torch.Tensor:
        image, teacher_maps = rows[0].float(), rows[1:]
        with cuda_autocast(image.device, self.hparams["amp"]):
            student_maps = self.student(image)
        return pyramid_matching_loss(teacher_maps, student_maps)

    # ------------------------------------------------------------------ scoring
    def backbone_forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self._slices_and_teacher_maps(image)[1:]

    def maps(self, image: torch.Tensor) -> torch.Tensor:
        """Unsmoothed anomaly maps ``[B, H, W]`` of slices on the device (eval mode)."""
        teacher_maps = self.backbone_forward(image)
        with cuda_autocast(image.device, self.hparams["amp"]):
            student_maps = self.student(image)
        return cosine_distance_map(teacher_maps, student_maps, self.image_size, "multiply")

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        pixel = self.blur(self.maps(image))
        return SliceScores(pixel=pixel, slice=max_in_roi_map(pixel, roi))

    def extra_repr(self) -> str:
        return f"student_parameters={sum(p.numel() for p in self.student.parameters())}"
