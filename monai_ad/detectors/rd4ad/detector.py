"""RD4AD (Deng & Li, CVPR 2022): reverse distillation from a frozen teacher into a student decoder.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.maps import max_in_roi_map
from monai_ad.components.patch_features import layers_or_layer1_to_3
from monai_ad.components.smoothing import GaussianBlur2d
from monai_ad.components.training_loop import FrozenFeatureTrainer, cache_budget
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.errors import InputError
from monai_ad.networks.backbones import build_backbone
from monai_ad.detectors.rd4ad.torch_model import MAP_MODES, ReverseDistillation, anomaly_map, distillation_loss
from monai_ad.settings import check_settings

DEFAULT_CACHE_BYTES = 4 << 30


@register_detector("rd4ad")
class RD4AD(AnomalyDetector):
    """Reverse distillation on ``[B, 1, image_size, image_size]`` slices (see the module docstring).

    ``layers`` default to the backbone's layer1–3 analogues (``LAYER1_TO_3``). ``oce_blocks`` (3),
    ``decoder_blocks`` (3, 4, 6, deepest stage first) and ``width_factor`` (2, the wide ResNet's) shape the
    trainable part as the paper's WideResNet-50-2 mirror.
    """

    unsaved_prefixes = ("model.teacher.",)
    # measured (benchmarks/RESULTS.md, 100 epochs): outside the liver filled with the liver's own typical value
    # instead of 0 raised the in-liver pixel AUROC on real CT from 0.59 to 0.70 and lowered it on the phantoms
    # from 0.80 to 0.75; real scans decide
    default_preprocessing = {"outside_fill": "liver"}
    # the paper trains 200 epochs; at 10 CPU epochs its student had not learnt (pixel AUROC below 0.5)
    schedules = {"cpu": {"epochs": 100}, "quick": {"epochs": 2}}

    def __init__(
        self,
        image_size: int = 256,
        in_channels: int = 1,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str | int] | None = None,
        weights: str | None = None,
        allow_random_weights: bool = False,
        oce_blocks: int = 3,
        decoder_blocks: Sequence[int] = (3, 4, 6),
        width_factor: int = 2,
        epochs: int = 200,
        batch_size: int = 16,
        lr: float = 0.005,
        betas: Sequence[float] = (0.5, 0.999),
        map_mode: str = "sum",
        sigma: float = 4.0,
        cache_features: bool | int | None = None,
        amp: bool = False,
        seed: int = 0,
    ):
        decoder_blocks, betas = [int(b) for b in decoder_blocks], [float(b) for b in betas]
        check_settings("rd4ad", image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, sigma=sigma)
        if oce_blocks < 1 or width_factor < 1 or len(decoder_blocks) != 3 or min(decoder_blocks) < 1:
            raise InputError("rd4ad: oce_blocks, width_factor and three decoder_blocks counts must be at least 1")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise InputError(f"rd4ad: betas must be two numbers in [0, 1), got {betas}")
        if map_mode not in MAP_MODES:
            raise InputError(f"rd4ad: map_mode must be one of {', '.join(MAP_MODES)}, got {map_mode!r}")
        layers = layers_or_layer1_to_3(backbone, layers)
        super().__init__(**constructor_arguments())
        teacher = build_backbone(backbone, layers, weights, allow_random_weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                self.model = ReverseDistillation(teacher, oce_blocks, decoder_blocks, width_factor)
            except ValueError as exc:
                raise InputError(f"rd4ad: {exc}") from None
        self.blur = GaussianBlur2d(sigma)
        self.train_losses: list[float] = []

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def _teacher_maps(self, image: torch.Tensor) -> list[torch.Tensor]:
        self.check_slices(image)
        image = image.to(self.device, torch.float32, non_blocking=True)
        with cuda_autocast(image.device, self.hparams["amp"]):
            return self.model.teacher(image)

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        budget = cache_budget(p["cache_features"], DEFAULT_CACHE_BYTES)
        # the maps are cached as the teacher gives them (float32, or bf16 under ``amp``)
        trainer = FrozenFeatureTrainer("rd4ad", self._teacher_maps, p["batch_size"], p["seed"], budget, None)
        cached = trainer.cache(batches, progress)
        optimizer = torch.optim.Adam(self.trainable_parameters(), lr=float(p["lr"]), betas=tuple(p["betas"]))
        self.train_losses = trainer.train(self, cached, batches, self._loss, [optimizer], int(p["epochs"]), progress)

    def _loss(self, teacher_maps: list[torch.Tensor]) -> torch.Tensor:
        with cuda_autocast(teacher_maps[0].device, self.hparams["amp"]):
            student_maps = self.model.student_maps(teacher_maps)
        return distillation_loss(teacher_maps, student_maps)

    # ------------------------------------------------------------------ scoring
    def backbone_forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self._teacher_maps(image)

    def maps(self, image: torch.Tensor) -> torch.Tensor:
        """Unsmoothed anomaly maps ``[B, H, W]`` of slices on the device (eval mode)."""
        teacher_maps = self._teacher_maps(image)
        with cuda_autocast(image.device, self.hparams["amp"]):
            student_maps = self.model.student_maps(teacher_maps)
        return anomaly_map(teacher_maps, student_maps, self.image_size, self.hparams["map_mode"])

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        pixel = self.blur(self.maps(image))
        return SliceScores(pixel=pixel, slice=max_in_roi_map(pixel, roi))

    def extra_repr(self) -> str:
        return f"trainable_parameters={sum(p.numel() for p in self.trainable_parameters())}"
