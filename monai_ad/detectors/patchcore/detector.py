"""PatchCore (Roth et al., CVPR 2022): a coreset memory bank of normal patch features, k-NN scoring.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from monai_ad.components.maps import PatchScoreMap, max_in_roi, roi_on_grid
from monai_ad.components.patch_features import PatchFeatures, greedy_coreset
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.detectors.patchcore.corrections import check_correction, correction_positions, sub_cell_shifts
from monai_ad.distributed import all_gather_rows
from monai_ad.errors import InputError

# the query × bank distance block computed at once (elements): on a GPU 2^26 float32 = 256 MiB; on the CPU a
# 16 MiB block stays in cache between the product and the search, which measured fastest of 2^20, 2^22 and 2^26
# on a 2-core CPU (benchmarks/RESULTS.md)
KNN_BLOCK_ELEMENTS = {"cpu": 1 << 22}
KNN_BLOCK_ELEMENTS_DEFAULT = 1 << 26


def nearest_neighbors(
    queries: torch.Tensor, bank: torch.Tensor, k: int, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 distances ``[Q, k]`` (ascending) and indices ``[Q, k]`` of each query's ``k`` nearest bank
    rows, computed on the tensors' device in blocks of at most ``block`` query×bank elements (default: the
    device's ``KNN_BLOCK_ELEMENTS``).

    ``‖q − b‖² = ‖q‖² + (‖b‖² − 2·q·b)``: the bracket is one matrix product per block and the search runs on it;
    ``‖q‖²`` (the same for a whole row) is added to the k winners only, and the clamp at 0 (rounding) after.
    The distance block is thus written once and read once, not passed over again per term.
    """
    if block is None:
        block = KNN_BLOCK_ELEMENTS.get(bank.device.type, KNN_BLOCK_ELEMENTS_DEFAULT)
    norms = bank.square().sum(1)
    rows = max(1, block // max(1, bank.shape[0]))
    values, indices = [], []
    for start in range(0, queries.shape[0], rows):
        chunk = queries[start : start + rows]
        partial = torch.addmm(norms[None, :], chunk, bank.t(), alpha=-2.0)
        v, i = partial.min(1, keepdim=True) if k == 1 else torch.topk(partial, k, dim=1, largest=False, sorted=True)
        values.append(v.add_(chunk.square().sum(1, keepdim=True)).clamp_min_(0.0))
        indices.append(i)
    return torch.cat(values), torch.cat(indices)


@register_detector("patchcore")
class PatchCore(AnomalyDetector):
    """PatchCore on ``[B, 1, image_size, image_size]`` slices (see the module docstring).

    ``pre_dim`` / ``target_dim`` default to 1024 (the paper, with WideResNet-50-2) or, for backbones whose two
    layers hold fewer channels, their channel total (152 for EfficientNet-Lite0, 384 for ResNet-18).
    """

    unsaved_prefixes = ("features.backbone.",)
    # measured (benchmarks/RESULTS.md): a narrow liver window among the channels keeps density contrast that one
    # wide window loses in the features, and no black edge at the mask's border; in-liver pixel AUROC on the demo
    # phantoms 0.63 → 0.81
    default_preprocessing = {"outside_fill": "liver", "windows": [[-160.0, 240.0], [40.0, 180.0], [-40.0, 260.0]]}
    # the greedy coreset search is the slow part of fitting: a 2 % coreset for smoke runs
    schedules = {"cpu": {"coreset_ratio": 0.1}, "quick": {"coreset_ratio": 0.02}}
    learns_from_corrections = True

    def __init__(
        self,
        image_size: int = 224,
        in_channels: int = 1,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str | int] | None = None,
        weights: str | None = None,
        allow_random_weights: bool = False,
        pre_dim: int | None = None,
        target_dim: int | None = None,
        patch_size: int = 3,
        coreset_ratio: float = 0.1,
        coreset_projection: int = 128,
        coreset_starts: int = 10,
        num_neighbors: int = 1,
        squared_distance: bool = True,
        reweight: bool = False,
        reweight_neighbors: int = 9,
        sigma: float = 4.0,
        batch_size: int = 16,
        amp: bool = False,
        seed: int = 0,
    ):
        layers = None if layers is None else list(layers)
        super().__init__(**constructor_arguments())
        if reweight_neighbors < 1:
            raise InputError("patchcore: reweight_neighbors must be at least 1")
        self.features = PatchFeatures(
            backbone, layers, weights, allow_random_weights, pre_dim, target_dim,
            paper_dim=1024, patch_size=patch_size, amp=amp,
        )  # fmt: skip
        self.to_map = PatchScoreMap(image_size, sigma)
        self.register_buffer("memory_bank", torch.empty(0, self.features.dim))

    # ------------------------------------------------------------------ fitting
    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        device = self.device
        collected = []
        for batch in tqdm(batches, desc="patchcore features", disable=not progress, unit="batch", leave=False):
            image = batch["image"]
            self.check_slices(image)
            patches, _ = self.features(image.to(device, torch.float32, non_blocking=True))
            collected.append(patches.reshape(-1, patches.shape[-1]).to("cpu", torch.float16))
        if not collected:
            raise InputError("patchcore: no training slices")
        features = all_gather_rows(torch.cat(collected))  # every process's features (one process: its own)
        del collected
        if not torch.isfinite(features).all():
            raise InputError("patchcore: training features overflow float16 (inputs outside [0, 1]?)")
        index = greedy_coreset(
            features, p["coreset_ratio"], projection_dim=p["coreset_projection"], n_starts=p["coreset_starts"],
            seed=p["seed"], device=device,
        )  # fmt: skip
        self.memory_bank = features.index_select(0, index).to(device, torch.float32)

    # ------------------------------------------------------------------ corrections
    @torch.no_grad()
    def remember_normal(
        self, image: torch.Tensor, roi: torch.Tensor | None, mask: torch.Tensor, avoid: torch.Tensor | None = None
    ) -> int:
        """Append to the memory bank the patch features of the positions under ``mask`` (an erased false positive;
        ``corrections.correction_positions``), in the embedding space the bank is searched in, at the four
        half-cell offsets of ``corrections.sub_cell_shifts``. Every such feature is kept: a correction holds too
        few patches for a coreset to thin out. Anomalib's re-weighting,
        when on, then sees them as neighbours like any bank item. Returns the number of features added."""
        check_correction(self, image, mask, avoid)
        was_training = self.training
        self.eval()
        try:
            device = self.device
            inputs = [None if t is None else t.to(device) for t in (image, roi, mask, avoid)]
            added = []
            for image_, roi_, mask_, avoid_ in sub_cell_shifts(self.features.stride, *inputs):
                patches, grid = self.features(image_.float())
                chosen = correction_positions(
                    mask_ > 0, grid, None if roi_ is None else roi_ > 0, None if avoid_ is None else avoid_ > 0
                )
                added.append(patches[chosen].to(self.memory_bank.dtype))
            added = torch.cat(added)
            if not torch.isfinite(added).all():
                raise InputError("patchcore: the corrected slices give non-finite features (inputs outside [0, 1]?)")
            self.memory_bank = torch.cat([self.memory_bank, added])
            return int(added.shape[0])
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ scoring
    def patch_scores(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], torch.Tensor]:
        """Patch scores ``[B, h·w]``, the nearest bank index of each patch ``[B, h·w]``, the grid and the patch
        features ``[B, h·w, D]`` of slices on the device."""
        patches, grid = self.features(image)
        b, n, dim = patches.shape
        k = min(int(self.hparams["num_neighbors"]), self.memory_bank.shape[0])
        distances, indices = nearest_neighbors(patches.reshape(b * n, dim), self.memory_bank, k)
        if not self.hparams["squared_distance"]:
            distances = distances.sqrt()
        return distances.mean(1).reshape(b, n), indices[:, 0].reshape(b, n), grid, patches

    def backbone_forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.features.backbone_maps(image.to(self.device, torch.float32, non_blocking=True))

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        scores, nearest, grid, patches = self.patch_scores(image)
        roi_grid = roi_on_grid(roi, grid)
        slice_scores = max_in_roi(scores, roi_grid)
        if self.hparams["reweight"]:
            slice_scores = self._reweight(scores, nearest, patches, roi_grid, slice_scores)
        return SliceScores(pixel=self.to_map(scores.reshape(-1, *grid)), slice=slice_scores)

    def _reweight(self, scores, nearest, patches, roi_grid, slice_scores) -> torch.Tensor:
        """anomalib's reweighting: s* · (1 − softmax(‖m* − N_b(m)‖)[0]), plain L2 inside the softmax."""
        keep = None if roi_grid is None else roi_grid | ~roi_grid.any(1, keepdim=True)
        masked = scores if keep is None else torch.where(keep, scores, torch.full_like(scores, -math.inf))
        top = masked.argmax(1, keepdim=True)  # [B, 1]
        m_star = patches.gather(1, top[..., None].expand(-1, -1, patches.shape[-1]))[:, 0]  # [B, D]
        item = self.memory_bank.index_select(0, nearest.gather(1, top)[:, 0])  # [B, D]
        b_neighbors = min(int(self.hparams["reweight_neighbors"]), self.memory_bank.shape[0])
        _, support = nearest_neighbors(item, self.memory_bank, b_neighbors)  # [B, b]; the item itself first
        distances = torch.linalg.vector_norm(self.memory_bank[support] - m_star[:, None], dim=-1)
        weight = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weight * slice_scores

    # ------------------------------------------------------------------ info
    @property
    def memory_bank_bytes(self) -> int:
        return self.memory_bank.numel() * self.memory_bank.element_size()

    def extra_repr(self) -> str:
        return f"memory_bank={tuple(self.memory_bank.shape)}"
