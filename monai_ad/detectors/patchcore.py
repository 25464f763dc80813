"""PatchCore (Roth et al., CVPR 2022): a coreset memory bank of normal patch features, k-NN scoring.

Faithful to the official implementation (METHODS §2): frozen backbone, layer2 + layer3 analogues, 3×3 patch
aggregation pooled to ``target_dim`` without learned projection, approximate greedy k-center coreset
(10 % by default) selected on a random 128-d projection while the bank keeps the full features, patch score =
mean distance to the ``num_neighbors`` nearest bank items, slice score = the largest patch score in the ROI,
pixel map = bilinear upsampling + Gaussian σ = 4. Distances are plain L2 as in anomalib/BMAD
(``squared_distance=True`` gives the official faiss-style squared L2); ``reweight=True`` adds the paper's
(and anomalib's) image-score reweighting over ``reweight_neighbors`` bank neighbours.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from monai_ad.detectors.base import AnomalyDetector, SliceScores, register_detector
from monai_ad.detectors.components import PatchScoreMap, greedy_coreset, max_in_roi, roi_on_grid
from monai_ad.detectors.features import BackboneFeatures


@register_detector("patchcore")
class PatchCore(AnomalyDetector):
    unsaved_prefixes = ("features.backbone.",)

    def __init__(
        self,
        image_size: int = 224,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        weights: str | None = None,
        allow_random_weights: bool = False,
        pre_dim: int | None = None,
        target_dim: int | None = None,
        coreset_ratio: float = 0.1,
        coreset_projection: int = 128,
        num_neighbors: int = 1,
        squared_distance: bool = False,
        reweight: bool = False,
        reweight_neighbors: int = 9,
        sigma: float = 4.0,
        batch_size: int = 16,
        amp: bool = True,
        seed: int = 0,
    ):
        super().__init__(
            image_size=image_size, backbone=backbone, layers=None if layers is None else list(layers), weights=weights,
            allow_random_weights=allow_random_weights, pre_dim=pre_dim, target_dim=target_dim,
            coreset_ratio=coreset_ratio, coreset_projection=coreset_projection, num_neighbors=num_neighbors,
            squared_distance=squared_distance, reweight=reweight, reweight_neighbors=reweight_neighbors, sigma=sigma,
            batch_size=batch_size, amp=amp, seed=seed,
        )  # fmt: skip
        self.features = BackboneFeatures(backbone, layers, weights, allow_random_weights, pre_dim, target_dim, default_dim=1024, amp=amp)
        self.to_map = PatchScoreMap(image_size, sigma)
        self.register_buffer("memory_bank", torch.empty(0, self.features.dim))

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        device = self.device
        collected = []
        for batch in tqdm(batches, desc="patchcore features", disable=not progress, unit="batch"):
            patches, _ = self.features(batch["image"].to(device, torch.float32))
            collected.append(patches.reshape(-1, patches.shape[-1]).to("cpu", torch.float16))
        bank = torch.cat(collected)
        p = self.hparams
        index = greedy_coreset(bank, p["coreset_ratio"], p["coreset_projection"], seed=p["seed"], device=device)
        self.memory_bank = bank[index].to(device, torch.float32)

    def _nearest(self, queries: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
        """Distances ``[Q, k]`` from each query to its ``k`` nearest bank items (ascending), in chunks."""
        out = []
        bank = self.memory_bank
        for start in range(0, queries.shape[0], chunk):
            d = torch.cdist(queries[start : start + chunk], bank)
            out.append(torch.topk(d, k, dim=1, largest=False).values)
        return torch.cat(out)

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        p = self.hparams
        patches, grid = self.features(image)
        b, n, dim = patches.shape
        flat = patches.reshape(-1, dim).float()
        k = min(int(p["num_neighbors"]), self.memory_bank.shape[0])
        distances = self._nearest(flat, k)
        if p["squared_distance"]:
            distances = distances.square()
        patch_scores = distances.mean(1).reshape(b, n)
        roi_grid = roi_on_grid(roi, grid)
        slice_scores = max_in_roi(patch_scores, roi_grid)
        if p["reweight"]:
            slice_scores = self._reweight(patches, patch_scores, roi_grid, slice_scores)
        pixel = self.to_map(patch_scores.reshape(b, *grid))
        return SliceScores(pixel=pixel, slice=slice_scores)

    def _reweight(self, patches, patch_scores, roi_grid, slice_scores) -> torch.Tensor:
        """Image score × (1 − softmax of the max patch's distances to its nearest item's neighbourhood)[0]."""
        masked = patch_scores if roi_grid is None else torch.where(roi_grid, patch_scores, -torch.inf)
        top = masked.argmax(1)
        m_star = patches[torch.arange(patches.shape[0], device=patches.device), top].float()  # [B, D]
        nearest_item = torch.cdist(m_star, self.memory_bank).argmin(1)
        b_neighbors = min(int(self.hparams["reweight_neighbors"]), self.memory_bank.shape[0])
        neighbourhood = torch.topk(torch.cdist(self.memory_bank[nearest_item], self.memory_bank), b_neighbors, largest=False).indices
        distances = torch.linalg.vector_norm(self.memory_bank[neighbourhood] - m_star[:, None], dim=-1)
        weight = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weight * slice_scores

    def extra_repr(self) -> str:
        return f"memory_bank={tuple(self.memory_bank.shape)}"

    @property
    def memory_bank_bytes(self) -> int:
        return self.memory_bank.numel() * self.memory_bank.element_size()
