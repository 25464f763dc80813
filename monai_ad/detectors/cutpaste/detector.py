"""CutPaste (Li, Sohn, Yoon, Pfister, CVPR 2021): an ImageNet backbone with a projection head learns on normal
slices to tell them from their CutPaste and CutPaste-Scar versions (``monai_ad.synthesis``); a Gaussian density of
its embeddings of normal slices scores a slice, the same density on patches gives the map. What follows the paper,
what was chosen here, the cost of the patch map and the schedules: ``monai_ad/detectors/cutpaste/README.md``."""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.maps import max_in_roi_map
from monai_ad.components.smoothing import GaussianBlur2d
from monai_ad.components.training_loop import TrainingLoop, gather_slices, index_stream, process_generator
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.detectors.cutpaste.torch_model import CLASSES, GaussianDensity, ProjectionNet
from monai_ad.distributed import all_gather_rows, optimizer_step
from monai_ad.errors import InputError
from monai_ad.networks.backbones import BACKBONES, build_backbone
from monai_ad.settings import check_settings
from monai_ad.synthesis import cutpaste, cutpaste_scar

logger = logging.getLogger(__name__)

# the deepest feature level of each backbone: the analogue of the ResNet-18 output the paper embeds
EMBEDDING_LAYER = {
    "efficientnet_lite0": "blocks.6", "vgg16": "relu5_3", "wide_resnet50_2": "layer4", "resnet18": "layer4",
}  # fmt: skip
SLICE_SCORES = ("image", "patch")
PATCH_ROWS = 256  # patches per backbone call while scoring


@register_detector("cutpaste")
class CutPaste(AnomalyDetector):
    """Self-supervised 3-way CutPaste classifier with a Gaussian density of its embeddings (README.md)."""

    # a CPU demonstration: 128 px, 2 head layers (as BMAD's liver run), 200 steps of 16 slices and patch maps at
    # stride 8, meant for two CPU cores (the paper: 256 px, 256 steps of 64, stride 4)
    schedules = {
        "cpu": {"image_size": 128, "head_layers": 2, "steps": 200, "batch_size": 16, "patch_stride": 8},
        "quick": {"steps": 4, "freeze_steps": 2},
    }

    def __init__(
        self,
        image_size: int = 256,
        in_channels: int = 1,
        backbone: str = "efficientnet_lite0",
        layer: str | None = None,
        weights: str | None = None,
        allow_random_weights: bool = False,
        head_layers: int = 8,
        head_width: int = 512,
        embedding_dim: int = 128,
        steps: int = 256,
        batch_size: int = 64,
        lr: float = 0.03,
        momentum: float = 0.9,
        weight_decay: float = 3e-5,
        freeze_steps: int = 20,
        jitter: float = 0.1,
        patch_window: int | None = None,
        patch_stride: int = 4,
        sigma: float = 4.0,
        slice_score: str = "image",
        amp: bool = False,
        seed: int = 0,
    ):
        patch_window = image_size // 4 if patch_window is None else patch_window
        check_settings("cutpaste", image_size=image_size, head_layers=head_layers, head_width=head_width,
                       dim=embedding_dim, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       freeze_steps=freeze_steps, jitter=jitter, patch_window=patch_window, patch_stride=patch_stride,
                       sigma=sigma, seed=seed)  # fmt: skip
        if backbone not in BACKBONES:
            raise InputError(f"cutpaste: unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
        if not 0 <= momentum < 1:
            raise InputError(f"cutpaste: momentum must be a number in [0, 1), got {momentum!r}")
        if patch_window > image_size:
            raise InputError(f"cutpaste: patch_window {patch_window} is larger than image_size {image_size}")
        if patch_stride > patch_window:
            raise InputError(f"cutpaste: patch_stride {patch_stride} is larger than patch_window {patch_window}")
        if slice_score not in SLICE_SCORES:
            raise InputError(f"cutpaste: slice_score must be one of {', '.join(SLICE_SCORES)}, got {slice_score!r}")
        layer = layer or EMBEDDING_LAYER[backbone]
        lr, momentum, weight_decay, jitter = float(lr), float(momentum), float(weight_decay), float(jitter)
        sigma, amp = float(sigma), bool(amp)
        super().__init__(**constructor_arguments())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            features = build_backbone(backbone, [layer], weights, allow_random_weights, frozen=False)
            self.model = ProjectionNet(features, int(head_layers), int(head_width), int(embedding_dim))
        self.slice_density = GaussianDensity()
        self.patch_density = GaussianDensity()
        self.blur = GaussianBlur2d(sigma)
        self.train_losses: list[float] = []

    # ------------------------------------------------------------------ training
    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        device = self.device
        images, rois = gather_slices("cutpaste", batches, device, self.check_slices)
        generator = process_generator(p["seed"])
        batch_size = int(p["batch_size"])
        indices = index_stream(images.shape[0], batch_size, generator)
        parameters = list(self.model.parameters())
        optimizer = torch.optim.SGD(parameters, lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"])
        steps, freeze = int(p["steps"]), int(p["freeze_steps"])
        schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=steps)
        labels = torch.arange(len(CLASSES), device=device).repeat_interleave(batch_size)
        logger.info("cutpaste: %d slices, %d steps of %d × %d", images.shape[0], steps, batch_size, len(CLASSES))

        def step(index: int) -> torch.Tensor:
            if index in (0, freeze):  # the backbone learns only after the head has had ``freeze_steps`` steps
                self.model.backbone.requires_grad_(index >= freeze)
            rows = next(indices).to(device)
            image, roi = images[rows].float(), rois[rows]
            with torch.no_grad():
                pasted, _ = cutpaste(image, roi, generator, jitter=p["jitter"])
                scarred, _ = cutpaste_scar(image, roi, generator, jitter=p["jitter"], reference_size=256)
            with cuda_autocast(device, p["amp"]):
                _, logits = self.model(torch.cat([image, pasted, scarred]))
            loss = F.cross_entropy(logits.float(), labels)
            optimizer_step(loss, [optimizer], parameters)
            schedule.step()
            return loss

        try:
            with TrainingLoop("cutpaste", self.model, steps, progress) as loop:
                self.train_losses = loop.run(steps, step, window=max(1, steps // 20))
        finally:
            self.model.backbone.requires_grad_(True)
        self._fit_densities(images, rois, progress)

    @torch.no_grad()
    def _fit_densities(self, images: torch.Tensor, rois: torch.Tensor, progress: bool) -> None:
        """The Gaussians of the normal slices' embeddings and of their patches that touch the liver."""
        self.model.eval()
        slices, patches = [], []
        size = max(1, PATCH_ROWS // self.patch_count())
        starts = range(0, images.shape[0], size)
        for start in tqdm(starts, desc="cutpaste densities", disable=not progress, leave=False):
            image, roi = images[start : start + size].float(), rois[start : start + size]
            slices.append(self.embed(image))
            embedding = self.patch_embeddings(image)  # [B, g, g, d]
            touches = F.max_pool2d(roi.float(), self.hparams["patch_window"], self.hparams["patch_stride"])[:, 0] > 0
            patches.append(embedding[touches])
        slice_rows, patch_rows = all_gather_rows(torch.cat(slices)), all_gather_rows(torch.cat(patches))
        if slice_rows.shape[0] < 2:
            raise InputError(f"cutpaste: a covariance needs at least 2 training slices, got {slice_rows.shape[0]}")
        self.slice_density.fit(slice_rows.to(self.device))
        self.patch_density.fit(patch_rows.to(self.device))

    # ------------------------------------------------------------------ scoring
    def embed(self, image: torch.Tensor) -> torch.Tensor:
        with cuda_autocast(image.device, self.hparams["amp"]):
            return self.model.embed(image).float()

    def patch_count(self) -> int:
        """Patches per slice: ``⌊(image_size − patch_window) / patch_stride⌋ + 1`` per axis, squared."""
        return ((self.image_size - self.hparams["patch_window"]) // self.hparams["patch_stride"] + 1) ** 2

    def patch_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, g, g, d]`` of every ``patch_window`` square at ``patch_stride``."""
        window, stride = self.hparams["patch_window"], self.hparams["patch_stride"]
        tiles = image.unfold(2, window, stride).unfold(3, window, stride)  # [B, C, g, g, P, P]
        b, c, rows, cols = tiles.shape[:4]
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, window, window)
        embedded = torch.cat([self.embed(tiles[i : i + PATCH_ROWS]) for i in range(0, tiles.shape[0], PATCH_ROWS)])
        return embedded.reshape(b, rows, cols, -1)

    def patch_map(self, image: torch.Tensor) -> torch.Tensor:
        """The pixel map ``[B, H, W]``: each patch's Mahalanobis distance placed at the patch's centre, bilinear in
        between (the border replicated out to the slice's edge), then a Gaussian of ``sigma`` pixels."""
        window, stride = self.hparams["patch_window"], self.hparams["patch_stride"]
        embedding = self.patch_embeddings(image)
        b, rows, cols, d = embedding.shape
        grid = self.patch_density(embedding.reshape(-1, d)).reshape(b, 1, rows, cols)
        # a bilinear ×stride upsampling puts cell i's value at pixel i·stride + stride/2; the patch's centre is at
        # i·stride + window/2, so the upsampled grid is shifted by (window − stride)/2
        pixel = F.interpolate(grid, size=(rows * stride, cols * stride), mode="bilinear", align_corners=False)
        before = (window - stride) // 2
        pad = (before, self.image_size - cols * stride - before, before, self.image_size - rows * stride - before)
        return self.blur(F.pad(pixel, pad, mode="replicate")[:, 0])

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        pixel = self.patch_map(image)
        if self.hparams["slice_score"] == "patch":
            return SliceScores(pixel=pixel, slice=max_in_roi_map(pixel, roi))
        return SliceScores(pixel=pixel, slice=self.slice_density(self.embed(image)))

    def extra_repr(self) -> str:
        return f"parameters={sum(q.numel() for q in self.model.parameters())}, patches_per_slice={self.patch_count()}"
