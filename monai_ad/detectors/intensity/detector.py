"""Intensity baseline: how far each voxel's smoothed density lies from the scan's own typical liver density.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from monai_ad.components.smoothing import gaussian_kernel1d, smooth_inside
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.errors import InputError
from monai_ad.transforms.array import median_absolute_deviation

CONTEXT_WEIGHTS = (0.25, 0.5, 0.25)
# the defaults of models saved with one scale, before there could be several (their tables lack the scale axis)
SINGLE_SCALE_DEFAULTS = {"sigma_mm": 2.0, "min_width_mm": 6.0}
FIT_SAMPLE = 4_000_000  # liver values kept for the tail tables (a random subsample beyond this)
# values a sample needs beyond a tail level to have measured it (fewer: the level is the sample's maximum, and
# a normal pixel just past it would rise along the steep last step of the table)
MIN_TAIL_COUNT = 3
MIN_BAND_PIXELS = 1000  # a depth band with fewer normal pixels takes the whole liver's tables
# how a deviation is required to be ``min_width_mm`` wide, each spread back over the disc (a dilation): "opening",
# the deviation a whole disc reaches (its minimum); "rank", the ``width_rank`` quantile of the disc's deviations;
# "disc_mean", the disc's mean deviation (a matched filter for a disc-shaped lesion)
WIDTH_FILTERS = ("opening", "rank", "disc_mean")
# the unit of a blob reading: "texture", the slice's own robust spread of its density's band-pass at the blob's
# scale (scans whose noise grain differs, 3 mm voxels upsampled or a sharp 1 mm kernel, then read alike); "hu", none
BLOB_UNITS = ("texture", "hu")
MIN_TEXTURE_PIXELS = 200  # a slice with fewer liver pixels takes the whole batch's texture


def tail_probabilities(min_tail: float) -> torch.Tensor:
    """One-sided tail probabilities from 0.5 down to ``min_tail``, four per decade."""
    decades = math.log10(0.5 / min_tail)
    return 0.5 * torch.logspace(0.0, -decades, int(math.ceil(4 * decades)) + 1, dtype=torch.float64)


def interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``fp(xp)`` at ``x`` (``xp`` increasing), extended linearly beyond both ends."""
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


def pixel_mm(hparam: float | None, preprocessing: dict, image_size: int) -> float:
    """mm per pixel of a slice: the detector's own ``pixel_mm``, else the pipeline's fixed resolution, else a
    typical liver box (about 200 mm across after the crop) over ``image_size`` pixels."""
    if hparam is not None:
        return float(hparam)
    if preprocessing.get("pixel_mm"):
        return float(preprocessing["pixel_mm"])
    return 200.0 / image_size


def gaussian_kernel(sigma_px: float) -> torch.Tensor:
    """The density maps' Gaussian: truncated at 3 σ (at least one pixel each side)."""
    return gaussian_kernel1d(sigma_px, radius=max(1, int(math.ceil(3.0 * sigma_px))))


@register_detector("intensity")
class IntensityDeviation(AnomalyDetector):
    """Robust deviation from the typical liver density (see the module docstring)."""

    # measured (benchmarks/RESULTS.md): no edge at the mask's border raised the in-liver pixel AUROC on the demo
    # phantoms; on real CT, with sparse and with heavy metastatic lesions alike, the slice alone (no 2.5-D
    # average, which dims a lesion thinner than three slices) and the HU scale (no spread normalisation, which a
    # liver full of tumour inflates) found more lesions and covered more of the small ones; the mask's fat along
    # the capsule taken out (trim_border_hu) left fewer false regions on both lesion models
    default_preprocessing = {"outside_fill": "liver", "trim_border_hu": -30.0}

    def __init__(
        self,
        image_size: int = 224,
        in_channels: int = 1,
        sigma_mm: float | Sequence[float] = (0.75, 2.0),
        pixel_mm: float | None = None,
        min_tail: float = 1e-4,
        depth_bands_mm: Sequence[float] = (2.0, 4.0, 7.0, 12.0),
        min_width_mm: float | Sequence[float] | None = 3.0,
        width_filter: str = "opening",
        width_rank: float = 0.25,
        blob_sigma_mm: Sequence[float] = (),
        blob_unit: str = "texture",
        batch_size: int = 32,
        seed: int = 0,
    ):
        depth_bands_mm = [float(b) for b in depth_bands_mm]
        sigma_mm = list(sigma_mm) if isinstance(sigma_mm, (list, tuple)) else sigma_mm
        min_width_mm = list(min_width_mm) if isinstance(min_width_mm, (list, tuple)) else min_width_mm
        scales = sigma_mm if isinstance(sigma_mm, list) else [sigma_mm]
        blob_sigma_mm = [float(v) for v in blob_sigma_mm] if isinstance(blob_sigma_mm, (list, tuple)) else blob_sigma_mm
        super().__init__(**constructor_arguments())
        if list(depth_bands_mm) != sorted(depth_bands_mm) or any(b <= 0 for b in depth_bands_mm):
            raise InputError(f"intensity: depth_bands_mm must be increasing positive depths, got {list(depth_bands_mm)}")
        if not scales or not all(isinstance(v, (int, float)) and v > 0 for v in scales):
            raise InputError(f"intensity: sigma_mm must be a positive width in mm or a list of them, got {sigma_mm}")
        widths = min_width_mm if isinstance(min_width_mm, list) else [min_width_mm, min_width_mm]
        if len(widths) != 2 or not all(w is None or (isinstance(w, (int, float)) and w >= 0) for w in widths):
            raise InputError(f"intensity: min_width_mm must be a width in mm (0 or null: no opening) or a pair "
                             f"[darker, brighter] of them, got {min_width_mm}")  # fmt: skip
        if pixel_mm is not None and not pixel_mm > 0:
            raise InputError(f"intensity: pixel_mm must be positive, got {pixel_mm}")
        if width_filter not in WIDTH_FILTERS:
            raise InputError(f"intensity: width_filter must be one of {', '.join(WIDTH_FILTERS)}, got {width_filter!r}")
        if not 0.0 <= width_rank < 1.0:
            raise InputError(f"intensity: width_rank must be a quantile in [0, 1), got {width_rank}")
        if not isinstance(blob_sigma_mm, list) or not all(v > 0 for v in blob_sigma_mm):
            raise InputError(f"intensity: blob_sigma_mm must be a list of positive widths in mm (empty: no blob "
                             f"readings), got {blob_sigma_mm}")  # fmt: skip
        if blob_unit not in BLOB_UNITS:
            raise InputError(f"intensity: blob_unit must be one of {', '.join(BLOB_UNITS)}, got {blob_unit!r}")
        if not 1e-7 <= min_tail <= 0.05:
            raise InputError(f"intensity: min_tail must be in [1e-7, 0.05], got {min_tail}")
        bands = len(depth_bands_mm) + 1  # the last band: deeper than every listed depth
        levels = tail_probabilities(min_tail)
        self.register_buffer("rarity", -torch.log10(2 * levels).float())  # [K], 0 at the median
        # per reading scale (the density scales, then the blob scales) and band: distance from the median to the
        # tail quantiles, darker side [.., 0, :], brighter [.., 1, :]
        self.scales = [float(v) for v in scales]
        self.blob_scales = blob_sigma_mm
        readings = len(scales) + len(blob_sigma_mm)
        self.register_buffer("centre", torch.zeros(readings, bands))
        self.register_buffer("tail_distance", torch.linspace(0, 1, len(levels)).repeat(readings, bands, 2, 1))

    @classmethod
    def saved_hparams(cls, hparams, state):
        hparams = {"blob_sigma_mm": [], "blob_unit": "hu", **hparams}  # saved before there were blob readings
        if "centre" in state and state["centre"].dim() == 1:
            return {**SINGLE_SCALE_DEFAULTS, **hparams}
        return hparams

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``centre`` ``[S, bands]`` and ``tail_distance`` ``[S, bands, 2, K]``; a model saved with one scale,
        before there could be several, holds them without the scale axis."""
        centre, tails = (self.centre[None], self.tail_distance[None]) if self.centre.dim() == 1 else (self.centre, self.tail_distance)
        if len(centre) != len(self.scales) + len(self.blob_scales):
            raise RuntimeError(f"intensity: the tables were fitted at {len(centre)} scale(s), the detector has "
                               f"sigma_mm {self.hparams['sigma_mm']} and blob_sigma_mm "
                               f"{self.hparams['blob_sigma_mm']}")  # fmt: skip
        return centre, tails

    # ------------------------------------------------------------------ what the slices hold
    def _pixel_mm(self) -> float:
        return pixel_mm(self.hparams["pixel_mm"], self.preprocessing, self.image_size)

    def _density(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → ``[B, 1, H, W]``: the slice (with its neighbours, for 2.5-D input)."""
        if image.shape[1] == 1:
            return image
        if self.preprocessing.get("context_mm"):
            w = torch.tensor(CONTEXT_WEIGHTS, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
            return (image * w).sum(1, keepdim=True)
        return image[:, image.shape[1] // 2 :][:, :1]  # several windows: the middle one

    def _smoothed(self, density: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        """The density (``_density``) smoothed at each scale, ``[S, B, 1, H, W]``."""
        return torch.stack([smooth_inside(density, roi, gaussian_kernel(s / self._pixel_mm())) for s in self.scales])

    def _blob_contrasts(self, density: torch.Tensor, roi: torch.Tensor) -> list[torch.Tensor]:
        """Each blob scale's ``blob_contrast`` of the density smoothed at that scale, ``[B, 1, H, W]`` each."""
        contrasts = []
        for sigma_mm in self.blob_scales:
            sigma_px = sigma_mm / self._pixel_mm()
            smoothed = smooth_inside(density, roi, gaussian_kernel(sigma_px))
            contrast = blob_contrast(smoothed, sigma_px)
            if self.hparams["blob_unit"] == "texture":
                band_pass = smoothed - smooth_inside(density, roi, gaussian_kernel(2 * sigma_px))
                contrast = contrast / robust_spread(band_pass, roi)
            contrasts.append(contrast)
        return contrasts

    def _bands(self, roi: torch.Tensor) -> torch.Tensor:
        """Each ROI pixel's band of in-plane depth from the mask's border, ``[B, 1, H, W]`` (long)."""
        limits_px = [b / self._pixel_mm() for b in self.hparams["depth_bands_mm"]]
        steps = int(math.ceil(limits_px[-1]))
        depth = torch.zeros(roi.shape, dtype=torch.float32, device=roi.device)
        inside = roi.float()
        for _ in range(steps):  # one erosion per pixel of depth: depth = how many erosions a pixel survives
            depth += inside
            inside = -F.max_pool2d(-inside, 3, stride=1, padding=1)
        edges = torch.tensor(limits_px, device=roi.device)
        return torch.bucketize(depth, edges, right=False)

    def _self_referenced(self) -> bool:
        return self.preprocessing.get("normalize_liver_hu", 110.0) is not None

    # ------------------------------------------------------------------ fitting
    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        generator = torch.Generator().manual_seed(int(self.hparams["seed"]))
        # first pass: each band's centre, the median of normal liver's smoothed density at that depth, per scale
        values, bands = self._liver_values(batches, lambda image, roi, band: self._centred(image, roi))
        if values.numel() == 0:
            raise InputError("intensity: no liver pixels in the training slices")
        keep = _sample(values.shape[-1], generator)
        values, bands = values[..., keep], bands[keep]
        n_bands = len(self.hparams["depth_bands_mm"]) + 1
        n_scales = len(self.scales) + len(self.blob_scales)
        self.centre = torch.zeros(n_scales, n_bands, device=self.rarity.device)
        self.tail_distance = torch.zeros(n_scales, n_bands, 2, len(self.rarity), device=self.rarity.device)
        for scale in range(n_scales):
            overall = float(values[scale].median())
            for band in range(n_bands):
                chosen = values[scale, bands == band]
                self.centre[scale, band] = float(chosen.median()) if chosen.numel() >= MIN_BAND_PIXELS else overall
        # second pass: each band's tails, of the darker and the brighter deviation as scoring sees them (opened)
        values, bands = self._liver_values(batches, self._deviations)
        keep = _sample(values.shape[-1], generator)
        values, bands = values[..., keep], bands[keep]
        levels = tail_probabilities(float(self.hparams["min_tail"]))
        quantiles = (1 - levels).double()

        def tails(chosen: torch.Tensor) -> torch.Tensor:
            # strictly increasing distances (ties where a tail is flat) keep the interpolation defined
            q = torch.quantile(chosen.double(), quantiles, dim=-1).T  # [2, K]
            q = exponential_beyond_sample(q, levels, chosen.shape[-1])
            return torch.stack([strictly_increasing(side.clamp_min(0.0)) for side in q.float()])

        for scale in range(n_scales):
            sides = values[2 * scale : 2 * scale + 2]
            overall_tails = tails(sides)
            for band in range(n_bands):
                chosen = sides[:, bands == band]
                self.tail_distance[scale, band] = tails(chosen) if chosen.shape[-1] >= MIN_BAND_PIXELS else overall_tails

    def _liver_values(self, batches, maps) -> tuple[torch.Tensor, torch.Tensor]:
        """``maps(image, roi, band)`` (``[N, B, 1, H, W]``) at every liver pixel of the batches, ``[N, P]``, and
        the pixels' depth bands ``[P]``."""
        values, bands = [], []
        for batch in batches:
            image = batch["image"].to(self.device, torch.float32)
            self.check_slices(image)
            roi = batch_roi(batch, image)
            band = self._bands(roi)
            values.append(maps(image, roi, band)[:, roi].cpu())
            bands.append(band[roi].cpu())
        if not values:
            return torch.zeros(1, 0), torch.zeros(0, dtype=torch.long)
        return torch.cat(values, -1), torch.cat(bands)

    # ------------------------------------------------------------------ scoring
    def _centred(self, image: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        """The smoothed density at each density scale (without self-reference, minus each slice's liver median)
        and the blob contrast at each blob scale, ``[S, B, 1, H, W]``."""
        density = self._density(image.float())
        smoothed = self._smoothed(density, roi)
        if not self._self_referenced():
            smoothed = torch.stack([s - slice_medians(s, roi) for s in smoothed])
        if not self.blob_scales:
            return smoothed
        return torch.cat([smoothed, torch.stack(self._blob_contrasts(density, roi))])

    def _deviations(self, image: torch.Tensor, roi: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
        """How far below and above the centre of its depth band (``band``, ``[B, 1, H, W]``) each liver pixel
        lies at each scale, ``[2S, B, 1, H, W]`` (scale by scale: darker, brighter; 0 outside the liver); the
        density scales' readings filtered by the ``min_width_mm`` disc (a blob contrast is already a width's)."""
        deviation = self._centred(image, roi) - self._tables()[0][:, band]  # [S, B, 1, H, W]
        sides = torch.stack([-deviation, deviation], 1).flatten(0, 1)
        widths = self.hparams["min_width_mm"]
        widths = widths if isinstance(widths, (list, tuple)) else (widths, widths)
        kind = self.hparams["width_filter"]
        inside = roi.repeat(len(self.scales), 1, 1, 1)
        density_readings = 2 * len(self.scales)
        for side, width in enumerate(widths):  # readings alternate darker, brighter
            radius = round(0.5 * float(width or 0.0) / self._pixel_mm())
            if radius < 1:
                continue
            chosen = slice(side, density_readings, 2)
            readings = sides[chosen].flatten(0, 1)  # [S*B, 1, H, W]
            if kind == "disc_mean":
                filtered = dilate(disc_mean_inside(readings, inside, radius).clamp_min(0.0), radius)
            elif kind == "rank":
                filtered = dilate(disc_quantile(torch.where(inside, readings.clamp_min(0.0), 0.0), radius,
                                                float(self.hparams["width_rank"])), radius)  # fmt: skip
            else:
                filtered = open_within(torch.where(inside, readings.clamp_min(0.0), 0.0), radius)
            sides[chosen] = filtered.view_as(sides[chosen])
        return torch.where(roi, sides.clamp_min(0.0), 0.0)

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        roi = torch.ones_like(image[:, :1], dtype=torch.bool) if roi is None else roi
        band = self._bands(roi)
        sides = self._deviations(image.float(), roi, band)
        rarity = torch.zeros_like(sides)
        centre, tail_distance = self._tables()
        for b in range(centre.shape[1]):
            chosen = (band == b) & roi
            for reading in range(len(sides)):
                table = tail_distance[reading // 2, b, reading % 2]
                rarity[reading][chosen] = interpolate(sides[reading][chosen], table, self.rarity)
        pixel = torch.where(roi, rarity.amax(0).clamp_min(0.0), 0.0)[:, 0]
        return SliceScores(pixel=pixel, slice=pixel.flatten(1).amax(1))


def blob_contrast(smoothed: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """How strongly ``[B, 1, H, W]`` (already smoothed at ``sigma_px``) curves like a brighter (> 0) or darker
    (< 0) blob at each pixel: the scale-normalised Hessian eigenvalue of the weaker curvature, where both curve the
    same way, else 0. A line (a vessel, a fissure) curves across only, an edge both ways, so neither reads as a blob."""
    padded = F.pad(smoothed, (1, 1, 1, 1), mode="replicate")
    centre = padded[..., 1:-1, 1:-1]
    dxx = padded[..., 1:-1, 2:] - 2 * centre + padded[..., 1:-1, :-2]
    dyy = padded[..., 2:, 1:-1] - 2 * centre + padded[..., :-2, 1:-1]
    dxy = 0.25 * (padded[..., 2:, 2:] - padded[..., 2:, :-2] - padded[..., :-2, 2:] + padded[..., :-2, :-2])
    mean, spread = 0.5 * (dxx + dyy), torch.sqrt((0.5 * (dxx - dyy)) ** 2 + dxy**2)
    lower, upper = mean - spread, mean + spread  # a darker blob curves up (both > 0), a brighter one down
    return sigma_px**2 * (torch.where(upper < 0, -upper, 0.0) - torch.where(lower > 0, lower, 0.0))


def robust_spread(values: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
    """Each slice's median absolute deviation of ``[B, 1, H, W]`` inside its ROI (× 1.4826, a normal's σ),
    ``[B, 1, 1, 1]``; a slice with fewer than ``MIN_TEXTURE_PIXELS`` ROI pixels takes the whole batch's."""
    def mad(chosen: torch.Tensor) -> torch.Tensor:
        return 1.4826 * median_absolute_deviation(chosen) if chosen.numel() else values.new_ones(())

    pooled = mad(values[roi])
    spreads = [mad(v[m]) if int(m.sum()) >= MIN_TEXTURE_PIXELS else pooled for v, m in zip(values, roi)]
    return torch.stack(spreads).clamp_min(1e-6).view(-1, 1, 1, 1)


def _sample(n: int, generator: torch.Generator) -> torch.Tensor | slice:
    """At most ``FIT_SAMPLE`` of ``n`` liver values for the tables (a seeded random subsample beyond it)."""
    return torch.randperm(n, generator=generator)[:FIT_SAMPLE] if n > FIT_SAMPLE else slice(None)


def _erode(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Grey erosion of ``[B, 1, H, W]`` by an octagon of ``radius`` pixels (3×3 squares and crosses in turn,
    the usual discrete disc); beyond the image nothing constrains."""
    for step in range(radius):
        if step % 2 == 0:
            x = -F.max_pool2d(-x, 3, stride=1, padding=1)
        else:
            padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
            h, w = x.shape[-2:]
            x = torch.stack([x, padded[..., :h, 1 : w + 1], padded[..., 2:, 1 : w + 1],
                             padded[..., 1 : h + 1, :w], padded[..., 1 : h + 1, 2:]]).amin(0)  # fmt: skip
    return x


def dilate(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Grey dilation of ``[B, 1, H, W]`` by the octagon of ``radius`` pixels (the negated erosion of the negated map)."""
    return -_erode(-x, radius)


def disc_kernel(radius: int) -> torch.Tensor:
    """A disc of ``radius`` pixels as a ``[2r+1, 2r+1]`` 0/1 kernel."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= (radius + 0.5) ** 2).float()


def disc_mean_inside(x: torch.Tensor, roi: torch.Tensor, radius: int) -> torch.Tensor:
    """The mean of ``[B, 1, H, W]`` over the disc of ``radius`` pixels around each pixel, of the pixels inside
    ``roi`` only (normalised convolution; 0 where the disc holds no ROI pixel)."""
    weight = roi.to(x.dtype)
    kernel = disc_kernel(radius).to(x.device, x.dtype)[None, None]
    total = F.conv2d(x * weight, kernel, padding=radius)
    count = F.conv2d(weight, kernel, padding=radius)
    return torch.where(count > 0, total / count.clamp_min(1.0), 0.0)


def disc_quantile(x: torch.Tensor, radius: int, q: float, chunk: int = 8) -> torch.Tensor:
    """The ``q`` quantile (the lower order statistic) of ``[B, 1, H, W]`` over the disc of ``radius`` pixels
    around each pixel, zero beyond the image (``q`` 0: the grey erosion by the disc)."""
    offsets = disc_kernel(radius).flatten().nonzero().flatten()
    k = int(q * len(offsets)) + 1
    out = torch.empty_like(x)
    for start in range(0, len(x), chunk):  # the unfolded discs of a few slices at a time
        part = x[start : start + chunk]
        patches = F.unfold(part, 2 * radius + 1, padding=radius)[:, offsets.to(x.device)]  # [b, n, H*W]
        out[start : start + chunk] = patches.kthvalue(k, dim=1).values.view_as(part)
    return out


def open_within(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Grey opening of ``[B, 1, H, W]`` by an octagon of ``radius`` pixels: each pixel keeps the highest value
    that a whole octagon containing it reaches (dilation as the negated erosion of the negated map)."""
    return dilate(_erode(x, radius), radius)


def exponential_beyond_sample(quantiles: torch.Tensor, levels: torch.Tensor, n: int) -> torch.Tensor:
    """Tail quantiles ``[..., K]`` at one-sided tail probabilities ``levels`` (decreasing), where the levels a
    sample of ``n`` values cannot resolve (fewer than ``MIN_TAIL_COUNT`` values beyond them) continue the last
    resolved decade's slope per decade of tail probability: an exponential tail, not the sample's maximum."""
    resolved = int((levels * n >= MIN_TAIL_COUNT).sum())  # levels decrease: the first ``resolved`` are measured
    span = 4  # about one decade of levels (tail_probabilities)
    if resolved >= len(levels) or resolved <= span:
        return quantiles
    last = resolved - 1
    log_levels = torch.log10(levels).to(quantiles)
    slope = (quantiles[..., last] - quantiles[..., last - span]) / (log_levels[last - span] - log_levels[last])
    beyond = quantiles[..., last, None] + slope[..., None] * (log_levels[last] - log_levels[resolved:])
    return torch.cat([quantiles[..., :resolved], beyond], -1)


def strictly_increasing(values: torch.Tensor, step: float = 1e-6) -> torch.Tensor:
    """A tail table made strictly increasing (where a tail is flat, ties are split by ``step``), so the
    interpolation through it is defined everywhere."""
    return values.cummax(0).values + step * torch.arange(len(values), dtype=values.dtype, device=values.device)


def batch_roi(batch: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """A batch's liver mask as booleans on the image's device; the whole slice when the batch has none."""
    roi = batch.get("roi")
    if roi is None:
        return torch.ones_like(image[:, :1], dtype=torch.bool)
    return roi.to(image.device) > 0


def slice_medians(values: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
    """Each slice's median inside its ROI, ``[B, 1, 1, 1]`` (0 for a slice without ROI)."""
    medians = [v[m].median() if bool(m.any()) else v.new_zeros(()) for v, m in zip(values, roi)]
    return torch.stack(medians).view(-1, 1, 1, 1)
