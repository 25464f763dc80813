"""WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023): zero-/few-shot anomaly maps from a frozen CLIP.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from monai_ad.components.maps import PatchScoreMap, max_in_roi, roi_on_grid
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.distributed import all_gather_rows
from monai_ad.errors import InputError
from monai_ad.networks.clip import FrozenCLIP
from monai_ad.settings import check_settings

NORMAL_STATES = (
    "{}",
    "normal {}",
    "healthy {}",
    "flawless {}",
    "unblemished {}",
    "{} without lesion",
    "{} without abnormality",
)
ANOMALOUS_STATES = ("abnormal {}", "damaged {}", "{} with a lesion", "{} with a defect")
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of the {}.",
    "a photo of the {}.",
    "a photo of a {}.",
    "a black and white photo of the {}.",
    "a grayscale image of the {}.",
    "a medical image of the {}.",
    "a CT image of the {}.",
    "a CT scan of the {}.",
    "an axial CT slice of the {}.",
    "a computed tomography image of the {}.",
    "a radiology image of the {}.",
    "a low resolution image of the {}.",
    "a blurry image of the {}.",
    "a bright image of the {}.",
    "a dark image of the {}.",
    "a cropped image of a {}.",
    "an image of the {}.",
    "a scan showing the {}.",
    "there is a {} in the image.",
    "this is the {}.",
)
PATCH_SCALE = 1  # the 1×1 scale of the few-shot memory: the ViT's own patch tokens


def harmonic_mean_over_windows(window_scores: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """``[B, W]`` window scores → ``[B, N]`` patch scores: the harmonic mean of the windows covering each patch
    (``cover [N, W]`` is 1 where window w covers patch n)."""
    inverse = window_scores.clamp_min(1e-6).reciprocal()
    return cover.sum(1) / (inverse @ cover.t())


def covering_matrix(windows: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``[N, W]`` float: 1 where window ``w`` (a row of patch indices) covers patch ``n``."""
    cover = torch.zeros(num_patches, len(windows))
    cover[windows.flatten(), torch.arange(len(windows)).repeat_interleave(windows.shape[1])] = 1.0
    return cover


@register_detector("winclip")
class WinCLIP(AnomalyDetector):
    """WinCLIP (zero-shot) / WinCLIP+ (few-shot, after ``fit`` on normal slices); see the module docstring."""

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
        normal_states: Sequence[str] | None = None,
        anomalous_states: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        window_sizes: Sequence[int] = (2, 3),
        temperature: float = 0.07,
        shots: int | None = None,
        memory_size: int = 16384,
        sigma: float = 0.0,
        window_chunk: int = 4096,
        amp: bool = True,
        seed: int = 0,
    ):
        # absolute, so that a saved detector finds its CLIP weights from any working directory
        clip_checkpoint = None if clip_checkpoint in (None, "") else os.path.abspath(os.fspath(clip_checkpoint))
        window_sizes = [int(s) for s in window_sizes]
        if not window_sizes or min(window_sizes) < 1:
            raise InputError("winclip: window_sizes must be positive patch counts, e.g. [2, 3]")
        check_settings("winclip", memory_size=memory_size)
        if temperature <= 0:
            raise InputError("winclip: temperature must be positive")
        states = {
            "normal_states": list(normal_states or NORMAL_STATES),
            "anomalous_states": list(anomalous_states or ANOMALOUS_STATES),
            "templates": list(templates or TEMPLATES),
        }
        for key, values in states.items():
            if any(v.count("{}") != 1 for v in values):
                raise InputError(f"winclip: every entry of {key} needs exactly one '{{}}' placeholder")
        # a given wording is recorded as the list used; None (the default wording) stays None
        normal_states, anomalous_states, templates = (
            None if given is None else states[key]
            for key, given in zip(states, (normal_states, anomalous_states, templates))
        )
        temperature, sigma = float(temperature), float(sigma)
        memory_size, window_chunk = int(memory_size), int(window_chunk)
        super().__init__(**constructor_arguments())
        self.clip = FrozenCLIP(clip_model, clip_checkpoint, allow_random_weights, amp=amp, seed=seed)
        n = self.clip.num_patches
        for size in window_sizes:
            windows = self.clip.window_index(size)
            self.register_buffer(f"windows_{size}", windows, persistent=False)
            self.register_buffer(f"cover_{size}", covering_matrix(windows, n), persistent=False)
        for scale in self.scales:
            self.register_buffer(f"memory_{scale}", torch.empty(0, self.clip.embed_dim, dtype=torch.float16))
        self.register_buffer("text", self._class_embeddings(object_name, **states), persistent=False)
        self.to_map = PatchScoreMap(image_size, sigma)

    @property
    def scales(self) -> list[int]:
        return [PATCH_SCALE, *self.hparams["window_sizes"]]

    @property
    def few_shot(self) -> bool:
        return any(self.memory(s).shape[0] > 0 for s in self.scales)

    def memory(self, scale: int) -> torch.Tensor:
        return getattr(self, f"memory_{scale}")

    @torch.no_grad()
    def _class_embeddings(self, obj: str, normal_states, anomalous_states, templates) -> torch.Tensor:
        """``[2, D]`` normalised mean text embeddings of the normal and the anomalous prompt ensembles."""
        out = []
        for states in (normal_states, anomalous_states):
            prompts = [t.format(s.format(obj)) for s in states for t in templates]
            emb = F.normalize(self.clip.encode_text(self.clip.tokenize(prompts)).float(), dim=-1)
            out.append(F.normalize(emb.mean(0), dim=0))
        return torch.stack(out)

    # ------------------------------------------------------------------ embeddings
    def _embed(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """Normalised embeddings per scale: ``0`` → the CLS image embedding ``[B, D]``; ``1`` → patch tokens
        ``[B, N, D]``; each window size ``k`` → window embeddings ``[B, W_k, D]``."""
        clip = self.clip
        with clip.autocast(image.device):
            embedded = clip.embed_image(image)
            final, _ = clip.run_blocks(embedded)
            out = {0: clip.pool(final), PATCH_SCALE: clip.to_joint(final[:, 1:])}
            for size in self.hparams["window_sizes"]:
                windows = getattr(self, f"windows_{size}")
                out[size] = clip.window_embeddings(embedded, windows, self.hparams["window_chunk"])
        return {k: F.normalize(v.float(), dim=-1) for k, v in out.items()}

    def _anomaly_probability(self, embeddings: torch.Tensor) -> torch.Tensor:
        logits = embeddings @ self.text.t() / self.hparams["temperature"]
        return logits.softmax(-1)[..., 1]

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        remaining = math.inf if p["shots"] is None else int(p["shots"])
        collected: dict[int, list[torch.Tensor]] = {s: [] for s in self.scales}
        for batch in tqdm(batches, desc="winclip memory", disable=not progress, unit="batch", leave=False):
            if remaining <= 0:
                break
            image = batch["image"][: int(min(remaining, len(batch["image"])))]
            remaining -= len(image)
            self.check_slices(image)
            emb = self._embed(image.to(self.device, torch.float32))
            for scale in self.scales:
                collected[scale].append(emb[scale].reshape(-1, emb[scale].shape[-1]).half().cpu())
        gen = torch.Generator().manual_seed(int(p["seed"]))
        dim = self.clip.embed_dim
        for scale in self.scales:
            local = torch.cat(collected[scale]) if collected[scale] else torch.empty(0, dim, dtype=torch.float16)
            tokens = all_gather_rows(local)  # every process's tokens (one process: its own)
            if tokens.shape[0] > p["memory_size"]:
                tokens = tokens[torch.randperm(tokens.shape[0], generator=gen)[: p["memory_size"]]]
            setattr(self, f"memory_{scale}", tokens.to(self.device))

    # ------------------------------------------------------------------ scoring
    def _few_shot_scores(self, queries: torch.Tensor, memory: torch.Tensor, block: int = 1 << 24) -> torch.Tensor:
        """``½ · min(1 − cos)`` of queries ``[B, T, D]`` over ``memory [M, D]`` (both normalised) → ``[B, T]``."""
        flat = queries.reshape(-1, queries.shape[-1])
        memory = memory.to(flat.dtype)
        rows = max(1, block // max(1, memory.shape[0]))
        best = torch.cat([(flat[i : i + rows] @ memory.t()).amax(1) for i in range(0, flat.shape[0], rows)])
        return (0.5 * (1.0 - best)).reshape(queries.shape[:-1])

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        emb = self._embed(image)
        slice_zero = self._anomaly_probability(emb[0])  # [B]
        scale_maps = [
            harmonic_mean_over_windows(self._anomaly_probability(emb[s]), getattr(self, f"cover_{s}"))
            for s in self.hparams["window_sizes"]
        ]
        terms = torch.stack([*scale_maps, slice_zero[:, None].expand_as(scale_maps[0])])
        grid_map = terms.shape[0] / terms.clamp_min(1e-6).reciprocal().sum(0)  # [B, N]
        slice_scores = slice_zero
        if self.few_shot:
            few = []
            for scale in self.scales:
                scores = self._few_shot_scores(emb[scale], self.memory(scale))
                if scale != PATCH_SCALE:
                    cover = getattr(self, f"cover_{scale}")
                    scores = scores @ cover.t() / cover.sum(1)
                few.append(scores)
            few_map = torch.stack(few).mean(0)
            grid_map = grid_map + few_map
            slice_scores = 0.5 * (slice_zero + max_in_roi(few_map, roi_on_grid(roi, self.clip.grid)))
        pixel = self.to_map(grid_map.reshape(-1, *self.clip.grid))
        return SliceScores(pixel=pixel, slice=slice_scores)
