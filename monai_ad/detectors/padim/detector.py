"""PaDiM (Defard et al., ICPR 2021): a Gaussian of normal patch embeddings at every position, Mahalanobis scoring.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.maps import PatchScoreMap, max_in_roi_map
from monai_ad.components.patch_features import layers_or_layer1_to_3
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.detectors.patchcore.corrections import check_correction, correction_positions, sub_cell_shifts
from monai_ad.distributed import all_reduce_sum_
from monai_ad.errors import InputError
from monai_ad.networks.backbones import build_backbone
from monai_ad.settings import check_settings

# the random channel subset d of each backbone
PADIM_DIM = {"efficientnet_lite0": 100, "vgg16": 550, "resnet18": 100, "wide_resnet50_2": 550}

# the elements of one block of the float64 covariance work (inversion) or of the float32 scoring work
BLOCK_ELEMENTS = 1 << 25


@register_detector("padim")
class PaDiM(AnomalyDetector):
    """PaDiM on ``[B, 1, image_size, image_size]`` slices (see the module docstring).

    ``layers`` default to ``LAYER1_TO_3[backbone]`` and ``dim`` (the random channel subset d) to
    ``PADIM_DIM[backbone]``, capped at the layers' channel total.
    """

    unsaved_prefixes = ("backbone.",)
    # measured (benchmarks/RESULTS.md): outside the liver filled with the liver's own typical value instead of 0
    # raised the in-liver pixel AUROC on real CT from 0.66 to 0.87 (AUPRO 0.17 to 0.52), on the phantoms from
    # 0.28 to 0.32; a black surround makes every position near the liver's edge vary with the liver's shape
    default_preprocessing = {"outside_fill": "liver"}
    learns_from_corrections = True

    def __init__(
        self,
        image_size: int = 224,
        in_channels: int = 1,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str | int] | None = None,
        weights: str | None = None,
        allow_random_weights: bool = False,
        dim: int | None = None,
        regularization: float = 0.01,
        sigma: float = 4.0,
        batch_size: int = 16,
        amp: bool = False,
        seed: int = 0,
    ):
        if not regularization > 0:
            raise InputError(f"padim: regularization must be positive (the paper adds 0.01·I), got {regularization}")
        check_settings("padim", sigma=sigma, batch_size=batch_size)
        layers = layers_or_layer1_to_3(backbone, layers)
        super().__init__(**constructor_arguments())
        self.backbone = build_backbone(backbone, layers, weights, allow_random_weights)
        total = sum(self.backbone.channels)
        dim = int(dim if dim is not None else min(PADIM_DIM.get(backbone, total), total))
        if not 1 <= dim <= total:
            raise InputError(f"padim: dim must be between 1 and the layers' {total} channels, got {dim}")
        self.dim = dim
        generator = torch.Generator().manual_seed(int(seed))
        index = torch.randperm(total, generator=generator)[:dim].sort().values
        self.register_buffer("channel_index", index)
        # sized by fitting (one Gaussian per grid position); loading adopts the saved tensors
        self.register_buffer("mean", torch.empty(0, dim))
        self.register_buffer("inv_covariance", torch.empty(0, dim, dim))
        self.register_buffer("samples", torch.empty(0, dtype=torch.float64))  # slices behind each Gaussian
        self.to_map = PatchScoreMap(image_size, sigma)

    # ------------------------------------------------------------------ embedding
    def grid_size(self) -> tuple[int, int]:
        """The first layer's grid for ``image_size`` slices (the positions that get a Gaussian)."""
        with torch.no_grad():
            maps = self.backbone(torch.zeros(1, 1, self.image_size, self.image_size, device=self.device))
        return int(maps[0].shape[-2]), int(maps[0].shape[-1])

    @torch.no_grad()
    def backbone_forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        image = image.to(self.device, torch.float32, non_blocking=True)
        with cuda_autocast(image.device, self.hparams["amp"]):
            return self.backbone(image)

    @torch.no_grad()
    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Embeddings ``[B, h·w, d]`` (float32) of the chosen channels at the first layer's grid ``(h, w)``."""
        maps = self.backbone_forward(image)
        grid = tuple(maps[0].shape[-2:])
        parts, offset = [], 0
        for feature in maps:
            channels = feature.shape[1]
            chosen = self.channel_index[(self.channel_index >= offset) & (self.channel_index < offset + channels)]
            if chosen.numel():
                part = feature.index_select(1, chosen - offset).float()
                if tuple(part.shape[-2:]) != grid:
                    part = F.interpolate(part, size=grid, mode="nearest")
                parts.append(part)
            offset += channels
        embedding = torch.cat(parts, dim=1)  # [B, d, h, w], channels in the order of channel_index
        return embedding.flatten(2).transpose(1, 2), (int(grid[0]), int(grid[1]))

    # ------------------------------------------------------------------ fitting
    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        grid = self.grid_size()
        positions, dim = grid[0] * grid[1], self.dim
        device = self.device
        total = torch.zeros(positions, dim, dtype=torch.float64, device=device)
        products = torch.zeros(positions, dim, dim, dtype=torch.float64, device=device)
        count = torch.zeros(1, dtype=torch.float64, device=device)
        for batch in tqdm(batches, desc="padim statistics", disable=not progress, unit="batch", leave=False):
            image = batch["image"]
            self.check_slices(image)
            embedding, _ = self.embed(image)  # [B, P, d]
            x = embedding.double().transpose(0, 1)  # [P, B, d]
            total += x.sum(1)
            products.baddbmm_(x.transpose(1, 2), x)  # Σ x·xᵀ per position
            count += x.shape[1]
        for t in (total, products, count):
            all_reduce_sum_(t)  # every process's slices (one process: its own)
        n = float(count)
        if n < 2:
            raise InputError(f"padim: a covariance needs at least 2 training slices, got {int(n)}")
        mean = total / n
        # unbiased covariance (N − 1) + εI, in place on the product sums
        products.sub_(n * mean[:, :, None] * mean[:, None, :]).div_(n - 1)
        products.diagonal(dim1=1, dim2=2).add_(float(self.hparams["regularization"]))
        self.mean = mean.float()
        self.inv_covariance = self._invert(products)
        self.samples = torch.full((positions,), n, dtype=torch.float64, device=device)

    def _load_saved_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if "samples" not in state:  # saved before the sample counts were kept: it scores, but takes no corrections
            state = {**state, "samples": torch.empty(0, dtype=torch.float64)}
        super()._load_saved_state(state)

    # ------------------------------------------------------------------ corrections
    @torch.no_grad()
    def remember_normal(
        self, image: torch.Tensor, roi: torch.Tensor | None, mask: torch.Tensor, avoid: torch.Tensor | None = None
    ) -> int:
        """Add to the Gaussian of each position under ``mask`` (an erased false positive;
        ``corrections.correction_positions``) the embeddings found there, as if those slices had been among the
        training slices at that position (at the four half-cell offsets of ``corrections.sub_cell_shifts``,
        so neighbouring positions learn it too): the running sums behind the mean and the unbiased covariance are
        recovered from the stored mean, inverse covariance (minus the same ``regularization``·I) and sample count,
        the new embeddings added, and the regularised covariance inverted again. Returns the embeddings added."""
        check_correction(self, image, mask, avoid)
        if self.samples.numel() != self.mean.shape[0]:
            raise InputError("padim: this model was saved without its sample counts; refit it to add corrections")
        device = self.device
        inputs = [None if t is None else t.to(device) for t in (image, roi, mask, avoid)]
        shifted = zip(*sub_cell_shifts(self.backbone.strides[0], *inputs))  # the slices at four half-cell offsets
        image, roi, mask, avoid = (None if parts[0] is None else torch.cat(parts) for parts in shifted)
        embedding, grid = self.embed(image.float())  # [B, P, d]
        chosen = correction_positions(mask > 0, grid, None if roi is None else roi > 0, None if avoid is None else avoid > 0)
        positions = torch.nonzero(chosen.any(0)).flatten()
        if not len(positions):
            return 0
        epsilon = float(self.hparams["regularization"])
        identity = torch.eye(self.dim, dtype=torch.float64, device=device)
        x = embedding[:, positions].double().transpose(0, 1)  # [p, B, d]
        weight = chosen[:, positions].t().double()  # [p, B]: which slices add to which position
        n = self.samples[positions]
        mean = self.mean[positions].double()
        covariance = torch.linalg.inv(self.inv_covariance[positions].double()) - epsilon * identity
        products = (n - 1)[:, None, None] * covariance + n[:, None, None] * mean[:, :, None] * mean[:, None, :]
        total = n[:, None] * mean + (weight[:, :, None] * x).sum(1)
        products += (weight[:, :, None] * x).transpose(1, 2) @ x
        n_new = n + weight.sum(1)
        mean_new = total / n_new[:, None]
        products.sub_(n_new[:, None, None] * mean_new[:, :, None] * mean_new[:, None, :]).div_((n_new - 1)[:, None, None])
        products.diagonal(dim1=1, dim2=2).add_(epsilon)
        self.mean[positions] = mean_new.float()
        self.inv_covariance[positions] = self._invert(products)
        self.samples[positions] = n_new
        return int(chosen.sum())

    @staticmethod
    def _invert(covariance: torch.Tensor) -> torch.Tensor:
        """float32 inverses of positive-definite float64 matrices ``[P, d, d]`` via Cholesky, in blocks."""
        positions, dim, _ = covariance.shape
        inverse = torch.empty(covariance.shape, dtype=torch.float32, device=covariance.device)
        step = max(1, BLOCK_ELEMENTS // (dim * dim))
        identity = torch.eye(dim, dtype=covariance.dtype, device=covariance.device)
        for start in range(0, positions, step):
            factor, info = torch.linalg.cholesky_ex(covariance[start : start + step])
            if bool((info != 0).any()):
                raise InputError("padim: a regularised covariance is not positive definite (non-finite features?)")
            # Σ = L·Lᵀ ⇒ Σ⁻¹ = L⁻ᵀ·L⁻¹ (a batched triangular solve; faster on the CPU than cholesky_inverse)
            factor_inv = torch.linalg.solve_triangular(factor, identity.expand_as(factor), upper=False)
            inverse[start : start + step] = (factor_inv.transpose(1, 2) @ factor_inv).float()
        return inverse

    # ------------------------------------------------------------------ scoring
    def mahalanobis(self, embedding: torch.Tensor) -> torch.Tensor:
        """Distances ``[B, P]`` of embeddings ``[B, P, d]`` to the per-position Gaussians: √((x−μ)ᵀ Σ⁻¹ (x−μ)),
        as batched matrix products over positions, a block of positions at a time."""
        b, positions, dim = embedding.shape
        out = torch.empty(b, positions, device=embedding.device, dtype=torch.float32)
        step = max(1, BLOCK_ELEMENTS // (dim * (dim + b)))
        for start in range(0, positions, step):
            stop = start + step
            delta = (embedding[:, start:stop] - self.mean[start:stop]).transpose(0, 1)  # [p, B, d]
            weighted = torch.bmm(delta, self.inv_covariance[start:stop])  # [p, B, d]
            out[:, start:stop] = (weighted * delta).sum(-1).t()
        return out.clamp_min_(0.0).sqrt_()

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        embedding, grid = self.embed(image)
        pixel = self.to_map(self.mahalanobis(embedding).reshape(-1, *grid))
        return SliceScores(pixel=pixel, slice=max_in_roi_map(pixel, roi))

    # ------------------------------------------------------------------ info
    def extra_repr(self) -> str:
        return f"positions={self.mean.shape[0]}, dim={self.dim}"
