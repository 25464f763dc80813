"""Language-enhanced CLIP reconstruction (after Bao's thesis): image patch features reconstructed through the
frozen CLIP *text* encoder from learned per-patch prompts and a narrow adaptor; the failure to reconstruct is
the anomaly score.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_ad.components.maps import PatchScoreMap, max_in_roi, roi_on_grid
from monai_ad.components.training_loop import FrozenFeatureTrainer, cache_budget
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.errors import InputError
from monai_ad.networks.clip import FrozenCLIP, evenly_spaced_layers
from monai_ad.settings import check_settings

DEFAULT_CACHE_BYTES = 2 << 30
PLACEHOLDER = "X"


def _binomial_blur(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=x.device, dtype=x.dtype) / 16.0
    c = x.shape[1]
    x = F.pad(x, (2, 2, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    x = F.pad(x, (0, 0, 2, 2), mode="replicate")
    return F.conv2d(x, kernel.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def laplacian_low_frequency_enhance(x: torch.Tensor, levels: int = 3, detail_gain: float = 0.5) -> torch.Tensor:
    """Rebuild ``x [B, C, H, W]`` from its Laplacian pyramid with every detail band scaled by ``detail_gain``
    (the coarsest Gaussian band unchanged); ``detail_gain = 1`` or ``levels = 0`` returns ``x``."""
    if levels <= 0 or detail_gain == 1.0:
        return x
    gaussians = [x]
    for _ in range(levels):
        if min(gaussians[-1].shape[-2:]) < 2:
            break
        gaussians.append(_binomial_blur(gaussians[-1])[..., ::2, ::2])
    out = gaussians[-1]
    for finer, coarser in zip(reversed(gaussians[:-1]), reversed(gaussians[1:])):
        up = F.interpolate(coarser, size=finer.shape[-2:], mode="bilinear", align_corners=False)
        out = F.interpolate(out, size=finer.shape[-2:], mode="bilinear", align_corners=False)
        out = out + detail_gain * (finer - up)
    return out


@register_detector("clip_reconstruction")
class CLIPReconstruction(AnomalyDetector):
    """Language-enhanced CLIP reconstruction on ``[B, 1, image_size, image_size]`` slices (module docstring)."""

    supported_channels = (1,)  # grey slices only

    unsaved_prefixes = ("clip.",)

    def __init__(
        self,
        image_size: int = 240,
        in_channels: int = 1,
        clip_model: str = "ViT-B-16-plus-240",
        clip_checkpoint: str | os.PathLike | None = None,
        allow_random_weights: bool = False,
        object_name: str = "liver",
        prompt_length: int = 16,
        bottleneck: int = 16,
        layers: Sequence[int] | None = None,
        text_layers: Sequence[int] | None = None,
        laplacian_levels: int = 3,
        detail_gain: float = 0.5,
        epochs: int = 20,
        batch_size: int = 8,
        lr: float = 1e-3,
        sigma: float = 4.0,
        cache_features: bool | int | None = None,
        amp: bool = True,
        seed: int = 0,
    ):
        # absolute, so that a saved detector finds its CLIP weights from any working directory
        clip_checkpoint = None if clip_checkpoint in (None, "") else os.path.abspath(os.fspath(clip_checkpoint))
        check_settings("clip_reconstruction", prompt_length=prompt_length, epochs=epochs, batch_size=batch_size, lr=lr)
        if bottleneck < 1:
            raise InputError("clip_reconstruction: bottleneck must be at least 1")
        prompt_length, bottleneck, laplacian_levels = int(prompt_length), int(bottleneck), int(laplacian_levels)
        epochs, batch_size, lr = int(epochs), int(batch_size), float(lr)
        detail_gain, sigma = float(detail_gain), float(sigma)
        layers = None if layers is None else [int(i) for i in layers]
        text_layers = None if text_layers is None else [int(i) for i in text_layers]
        super().__init__(**constructor_arguments())
        self.clip = clip = FrozenCLIP(clip_model, clip_checkpoint, allow_random_weights, amp=amp, seed=seed)
        self.layers = list(layers) if layers is not None else evenly_spaced_layers(clip.vision_depth)
        self.text_layers = list(text_layers) if text_layers is not None else evenly_spaced_layers(clip.text_depth)
        if len(self.layers) != len(self.text_layers):
            raise InputError("clip_reconstruction: layers and text_layers must pair up (same count)")
        depths = {"layers": (self.layers, clip.vision_depth), "text_layers": (self.text_layers, clip.text_depth)}
        for name, (chosen, depth) in depths.items():
            if not chosen or min(chosen) < 0 or max(chosen) >= depth:
                raise InputError(f"clip_reconstruction: {name} {chosen} must be block indices in 0..{depth - 1}")
        dim, width = clip.embed_dim, clip.text_width
        hidden = max(1, dim // bottleneck)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.adaptor = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, width))
            self.prompts = nn.Parameter(0.02 * torch.randn(clip.num_patches, prompt_length, width))
        # [SOT] X×M X <object> . [EOT]: the M + 1 placeholders become the prompts and the adaptor token
        ids = clip.tokenize([" ".join([PLACEHOLDER] * (prompt_length + 1)) + f" {object_name}."])[0]
        self.eot = int(ids.argmax())
        self.register_buffer("template_ids", ids[: self.eot + 1], persistent=False)
        self.to_map = PatchScoreMap(image_size, sigma)
        self.train_losses: list[float] = []

    # ------------------------------------------------------------------ features
    def enhance(self, image: torch.Tensor) -> torch.Tensor:
        p = self.hparams
        return laplacian_low_frequency_enhance(image, p["laplacian_levels"], p["detail_gain"]).clamp(0.0, 1.0)

    @torch.no_grad()
    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """Joint-space patch features ``[B, L, N, D]`` of the chosen layers (frozen, no gradients)."""
        clip = self.clip
        with clip.autocast(image.device):
            _, taps = clip.run_blocks(clip.embed_image(self.enhance(image)), self.layers)
            return torch.stack([clip.to_joint(t[:, 1:]) for t in taps], 1).float()

    def reconstruction_distance(self, features: torch.Tensor) -> torch.Tensor:
        """Per-patch map ``[B, N]``: ``Σ_l 1 − cos(image_l, text_l)`` with the text features of each patch's
        prompt + adaptor token (gradients flow to the prompts and the adaptor)."""
        clip = self.clip
        b, n_layers, n, dim = features.shape
        m = self.hparams["prompt_length"]
        with clip.autocast(features.device):
            token = self.adaptor(features[:, -1])  # [B, N, width], from the deepest layer
            template = clip.token_embeddings(self.template_ids)  # [T, width]
            embeddings = torch.cat(
                [
                    template[:1].expand(b, n, 1, -1),
                    self.prompts.unsqueeze(0).expand(b, -1, -1, -1).to(token.dtype),
                    token.unsqueeze(2),
                    template[m + 2 :].expand(b, n, -1, -1),
                ],
                2,
            ).reshape(b * n, -1, template.shape[-1])
            text = clip.text_features(embeddings, self.eot, self.text_layers)
        text = torch.stack(text, 1).float().reshape(b, n, n_layers, -1).transpose(1, 2)  # [B, L, N, D]
        return (1.0 - F.cosine_similarity(features, text, dim=-1)).sum(1)

    # ------------------------------------------------------------------ training
    def _extract(self, image: torch.Tensor) -> torch.Tensor:
        self.check_slices(image)
        return self.image_features(image.to(self.device, torch.float32, non_blocking=True))

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        budget = cache_budget(p["cache_features"], DEFAULT_CACHE_BYTES)
        trainer = FrozenFeatureTrainer("clip_reconstruction", self._extract, p["batch_size"], p["seed"], budget)
        cached = trainer.cache(batches, progress)
        optimizer = torch.optim.Adam([self.prompts, *self.adaptor.parameters()], lr=p["lr"])
        self.train_losses = trainer.train(
            self, cached, batches, lambda feats: self.reconstruction_distance(feats.float()).mean(), [optimizer],
            p["epochs"], progress,
        )  # fmt: skip

    # ------------------------------------------------------------------ scoring
    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        scores = self.reconstruction_distance(self.image_features(image))
        grid = self.clip.grid
        pixel = self.to_map(scores.reshape(-1, *grid))
        return SliceScores(pixel=pixel, slice=max_in_roi(scores, roi_on_grid(roi, grid)))
