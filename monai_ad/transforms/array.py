"""Array transforms of the volumetric pipeline. Each works on one channel-first tensor ``[C, X, Y, Z]``.

The dictionary twins in ``monai_ad.transforms.dictionary`` apply them to named items.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import TraceKeys
from monai.transforms import BorderPad, Crop, InvertibleTransform, Pad, Transform

from monai_ad.errors import InputError
from monai_ad.postprocess import bounding_box

ABDOMEN_WINDOW = (-160.0, 240.0)  # level 40 HU, width 400 HU
BMAD_WINDOW = (-200.0, 250.0)


def source_path(img: torch.Tensor) -> str | None:
    """The file an image came from, when it is a MetaTensor loaded by MONAI."""
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        if name:
            return str(name)
    return None


def pixdim(img: torch.Tensor) -> np.ndarray:
    """Voxel spacing in mm of a channel-first MetaTensor (ones for a plain tensor)."""
    if isinstance(img, MetaTensor):
        return np.asarray(img.pixdim, dtype=float)
    return np.ones(img.ndim - 1)


class CheckCTVolume(Transform):
    """Reject what is not a single 3-D CT volume in Hounsfield units, with a one-line reason naming the file.

    Checks: one channel and three spatial dimensions of at least ``min_size`` voxels (not a 2-D image, not a
    4-D series), finite values, and an intensity range that looks like HU: some air or fat below
    ``min_low_hu`` and some soft tissue above ``min_high_hu`` (rejects images scaled to [0, 1] or [0, 255]
    and raw scanner values with the rescale slope/intercept not applied).
    """

    def __init__(self, min_size: int = 2, min_low_hu: float = -200.0, min_high_hu: float = 0.0, max_hu: float = 32767.0):
        self.min_size, self.min_low_hu, self.min_high_hu, self.max_hu = min_size, min_low_hu, min_high_hu, max_hu

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        path = source_path(img)
        spatial = tuple(img.shape[1:])
        if img.shape[0] != 1:
            raise InputError(f"has {img.shape[0]} channels/time points, expected one 3-D CT volume", path)
        if len(spatial) != 3:
            raise InputError(f"is {len(spatial)}-D with shape {spatial}, expected a 3-D CT volume", path)
        if min(spatial) < self.min_size:
            raise InputError(f"has shape {spatial}: a single slice, not a 3-D CT volume", path)
        values = _plain(img)
        lowest, highest = torch.aminmax(values)  # NaN and ±inf show in the extremes: one pass, not a mask
        if not (math.isfinite(float(lowest)) and math.isfinite(float(highest))):
            raise InputError(f"contains {int((~torch.isfinite(values)).sum())} NaN or infinite voxels", path)
        step = max(1, math.ceil((values.numel() / 1_000_000) ** (1 / 3)))  # a regular grid of about a million voxels
        sample = values[0, ::step, ::step, ::step].float().flatten()
        low, high = torch.quantile(sample, torch.tensor([0.005, 0.995], device=sample.device)).tolist()
        if low > self.min_low_hu or high < self.min_high_hu or high > self.max_hu:
            raise InputError(
                f"intensities {low:.4g}..{high:.4g} do not look like CT in Hounsfield units "
                f"(expected air/fat below {self.min_low_hu:g} HU and soft tissue above {self.min_high_hu:g} HU)",
                path,
            )
        return img


class CheckSameGeometry(Transform):
    """Reject a mask whose shape or affine differs from its image's (tolerance in mm)."""

    def __init__(self, atol_mm: float = 1e-2):
        self.atol_mm = atol_mm

    def __call__(self, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        path = source_path(mask)
        if tuple(mask.shape[1:]) != tuple(image.shape[1:]):
            raise InputError(
                f"mask shape {tuple(mask.shape[1:])} does not match image shape {tuple(image.shape[1:])}"
                f" ({source_path(image)})",
                path,
            )
        if isinstance(mask, MetaTensor) and isinstance(image, MetaTensor):
            if not np.allclose(np.asarray(mask.affine), np.asarray(image.affine), atol=self.atol_mm):
                raise InputError(f"mask geometry (affine) does not match the image's ({source_path(image)})", path)
        return mask


class SelectROI(Transform):
    """Binary ROI from a label map: voxels whose value is in ``labels`` (any non-zero label when None).

    For a LiTS-style label (1 liver, 2 lesion) the default gives the whole liver; for an organ segmentation
    such as TotalSegmentator's, pass the liver's value (5). An empty ROI is an error naming the file.
    Not MONAI's ``LabelToMask``: it needs the label values listed (no "any non-zero") and checks nothing.
    """

    def __init__(self, labels: Sequence[int] | int | None = None):
        self.labels = None if labels is None else [int(v) for v in np.atleast_1d(labels)]

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            roi = mask > 0
        else:
            roi = torch.zeros_like(torch.as_tensor(mask), dtype=torch.bool)
            for value in self.labels:
                roi |= torch.as_tensor(mask) == value
        if not bool(roi.any()):
            which = "any non-zero label" if self.labels is None else f"label value(s) {self.labels}"
            raise InputError(f"the liver ROI is empty: no voxel has {which}", source_path(mask))
        out = roi.to(torch.uint8)
        if isinstance(mask, MetaTensor) and not isinstance(out, MetaTensor):
            out = MetaTensor(out, meta=mask.meta, applied_operations=mask.applied_operations)
        return out


LIVER_LEVELS = ("median", "mode")


def median_absolute_deviation(values: torch.Tensor) -> torch.Tensor:
    """The median absolute deviation from the median of ``values`` (all of them, flattened), a 0-d tensor."""
    return (values - values.median()).abs().median()


def liver_level(values: torch.Tensor, estimator: str = "median") -> tuple[float, float]:
    """The liver's typical value and spread (in the units of a median absolute deviation) from its voxels.

    ``median``: the median and the MAD. ``mode``: the parenchyma's own peak, which a liver a fifth full of
    tumour does not move: the mode of the values' histogram (smoothed by half a MAD), and the spread from the
    peak's half width at half maximum on its narrower side (lesions widen one side, vessels the other), taken
    back to a MAD of the peak as if it were Gaussian, less the smoothing's own width.
    """
    if estimator not in LIVER_LEVELS:
        raise ValueError(f"liver level estimator must be one of {LIVER_LEVELS}, got {estimator!r}")
    v = values.float().flatten()
    median = float(v.median())
    mad = float(median_absolute_deviation(v))
    if estimator == "median" or mad <= 0:
        return median, mad
    bins, per_mad = 321, 20  # bins of a twentieth of a MAD over median ± 8 MAD
    width = mad / per_mad
    low = median - (bins // 2 + 0.5) * width
    counts = torch.histc(v, bins, low, low + bins * width).double()
    kernel_bins = per_mad / 2  # the smoothing: half a MAD
    x = torch.arange(-int(4 * kernel_bins), int(4 * kernel_bins) + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / kernel_bins) ** 2)
    smooth = torch.nn.functional.conv1d(counts.view(1, 1, -1), (kernel / kernel.sum()).view(1, 1, -1), padding=len(x) // 2)[0, 0]
    peak = int(smooth.argmax())
    below = torch.nonzero(smooth < smooth[peak] / 2).flatten()
    left, right = below[below < peak], below[below > peak]
    sides = [peak - int(left.max()) if left.numel() else None, int(right.min()) - peak if right.numel() else None]
    hwhm = min(s for s in sides if s is not None) * width if any(s is not None for s in sides) else mad
    sigma2 = (hwhm / math.sqrt(2 * math.log(2))) ** 2 - (kernel_bins * width) ** 2
    spread = 0.6745 * math.sqrt(sigma2) if sigma2 > 0 else mad
    return low + (peak + 0.5) * width, spread


class NormalizeLiverHU(Transform):
    """Shift intensities so the liver's typical HU (``level``: its median, or its histogram's mode, see
    :func:`liver_level`) equals ``reference_hu``.

    Between patients the liver's baseline moves by tens of HU (contrast phase, scanner, kV); without this a
    detector trained on one phase sees the whole liver of another as abnormal. The median follows the
    parenchyma while lesions are a small minority of the liver; the mode also when they are not.
    """

    def __init__(self, reference_hu: float = 110.0, level: str = "median"):
        self.reference_hu, self.level = reference_hu, level

    def __call__(self, img: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        typical, _ = liver_level(img[roi.expand_as(img) > 0], self.level)
        return img + (self.reference_hu - typical)


LIVER_SPREADS = ("level", "noise")


def pixel_noise(img: torch.Tensor, roi: torch.Tensor) -> float:
    """The liver's in-plane pixel noise, in the units of a median absolute deviation: the MAD of each liver
    voxel's difference from the mean of its four in-plane neighbours (all inside the liver), over ``√1.25``,
    its ratio for white noise. Lesions are smooth inside, so tumour burden barely moves it. ``img`` and
    ``roi``: ``[C, X, Y, Z]`` (the first channel is read); 0 when no voxel has four liver neighbours."""
    x, inside = img[0].float(), roi[0] > 0
    centre = x[1:-1, 1:-1]
    neighbours = (x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:]) / 4
    keep = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    residual = (centre - neighbours)[keep]
    if residual.numel() == 0:
        return 0.0
    return float(median_absolute_deviation(residual)) / math.sqrt(1.25)


class NormalizeLiverSpread(Transform):
    """Scale intensities about the liver's typical value so the spread of HU inside the ROI (its median absolute
    deviation, or with ``level="mode"`` the parenchyma peak's own, see :func:`liver_level`) equals
    ``reference_mad_hu``.

    The liver's spread is mostly image noise, which differs several-fold between scans (thin slices, small pixels
    and low dose are noisier): a 2 mm series at 0.98 mm pixels can hold 2–3 times the MAD of a 3 mm scan of the
    same organ. A score calibrated on one then raises false alarms all over the other. Dividing by the scan's own
    spread makes deviations comparable in units of that scan's spread. The MAD grows with tumour burden (a liver
    a fifth full of lesions 50 HU darker); the peak's width does not, nor does the pixel noise
    (``spread="noise"``, :func:`pixel_noise`), which also leaves out the parenchyma's own texture and enhancement.
    """

    def __init__(self, reference_mad_hu: float = 10.0, level: str = "median", spread: str = "level"):
        if not reference_mad_hu > 0:
            raise ValueError(f"reference_mad_hu must be positive, got {reference_mad_hu}")
        if spread not in LIVER_SPREADS:
            raise ValueError(f"liver spread must be one of {LIVER_SPREADS}, got {spread!r}")
        self.reference_mad_hu, self.level, self.spread = float(reference_mad_hu), level, spread

    def __call__(self, img: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        typical, spread = liver_level(img[roi.expand_as(img) > 0], self.level)
        if self.spread == "noise":
            spread = pixel_noise(img, roi)
        if spread <= 0:  # a constant liver (synthetic data): nothing to scale
            return img
        return (img - typical) * (self.reference_mad_hu / spread) + typical


class HUWindow(Transform):
    """Clip to a HU window ``(low, high)`` and scale it to ``[0, 1]``. Default: the abdominal window.

    MONAI's ``ScaleIntensityRange(low, high, 0, 1, clip=True)`` gives the same values with two more passes over
    the volume (``× 1``, ``+ 0`` to the output range); this is one scaling and an in-place clamp.
    """

    def __init__(self, window: Sequence[float] = ABDOMEN_WINDOW):
        self.low, self.high = float(window[0]), float(window[1])
        if not self.high > self.low:
            raise ValueError(f"HU window must be (low, high) with high > low, got {tuple(window)}")

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        out = (img.float() - self.low) / (self.high - self.low)
        return out.clamp_(0.0, 1.0)


class HistogramEqualize(Transform):
    """Histogram equalisation of each axial slice inside the ROI, on windowed ``[0, 1]`` intensities.

    As in BMAD's liver preparation: 256 bins over the ROI's voxels, values mapped through the slice's CDF;
    ``bmad_squeeze`` also applies BMAD's ``v -> 30 + 0.8 v`` for outputs below 150/255. Outside the ROI the
    image is left as it is. Unlike BMAD, the same HU handling is used for training and test slices.
    """

    def __init__(self, bins: int = 256, bmad_squeeze: bool = False):
        self.bins, self.bmad_squeeze = bins, bmad_squeeze

    def __call__(self, img: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        out = img.clone()
        levels = (img.clamp(0, 1) * (self.bins - 1)).round().long()
        inside = roi.expand_as(img) > 0
        for z in range(img.shape[-1]):
            m = inside[..., z]
            if not bool(m.any()):
                continue
            lv = levels[..., z][m]
            hist = torch.bincount(lv, minlength=self.bins).double()
            cdf = hist.cumsum(0)
            cdf = (cdf - cdf[lv.min()]) / max(float(cdf[-1] - cdf[lv.min()]), 1.0)
            mapped = cdf[lv].to(img.dtype)
            if self.bmad_squeeze:
                low = mapped < 150.0 / 255.0
                mapped = torch.where(low, (30.0 + 0.8 * mapped * 255.0) / 255.0, mapped)
            out[..., z][m] = mapped
        return out


class MaskOutsideROI(Transform):
    """Set voxels outside the ROI to ``value`` (0: black background, as BMAD's masked liver slices).

    Not MONAI's ``MaskIntensity``, which multiplies by the mask: only 0 outside, and NaN or ±inf there stay NaN.
    """

    def __init__(self, value: float = 0.0):
        self.value = value

    def __call__(self, img: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        return _fill_outside(img, roi, self.value)


def _fill_outside(img: torch.Tensor, roi: torch.Tensor, value) -> torch.Tensor:
    """A copy of ``img`` (its own metadata and transform trace kept, never the mask's) with ``value`` outside."""
    out = img.clone()
    out[torch.as_tensor(roi).expand_as(out) <= 0] = value
    return out


def channel_floor(channel: torch.Tensor) -> float:
    """The lowest finite value of a channel (0 when it has none)."""
    values = _plain(channel)
    if not values.numel():
        return 0.0
    lowest = float(values.min())  # NaN or -inf when the channel holds any: then the slower masked search
    if not math.isfinite(lowest):
        lowest = float(torch.where(torch.isfinite(values), values, math.inf).min())
    return lowest if math.isfinite(lowest) else 0.0


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor without MetaTensor's per-operation overhead (same storage)."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else torch.as_tensor(tensor)


class FillOutsideROI(Transform):
    """Give every voxel outside the ROI its channel's lowest value (a heatmap's lowest score).

    Used after ``Invertd``: interpolation on the way back blends scores across the liver's edge. ``channels``
    limits the fill to some channels (default: all). ``inplace`` writes into the input instead of a copy (for
    a volume nothing else holds, such as ``Invertd``'s fresh output: no second full-size volume).
    """

    def __init__(self, channels: Sequence[int] | None = None, inplace: bool = False):
        self.channels = None if channels is None else [int(c) for c in channels]
        self.inplace = inplace

    def __call__(self, img: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        out = img if self.inplace else img.clone()
        values = _plain(out)  # same storage, without MetaTensor's per-operation overhead
        outside = (_plain(roi)[0] <= 0).to(values.device)
        for c in range(values.shape[0]) if self.channels is None else self.channels:
            values[c].masked_fill_(outside, channel_floor(values[c]))
        return out


def roi_box(roi: torch.Tensor, margin_mm: float | Sequence[float], spacing: Sequence[float]) -> tuple[list[int], list[int]]:
    """Bounding box of the ROI (any channel) grown by ``margin_mm`` (converted to voxels per axis) and clipped to
    the image; an empty ROI gives an empty box at the origin."""
    spatial = tuple(roi.shape[1:])
    margin = np.broadcast_to(np.asarray(margin_mm, dtype=float), (len(spacing),))
    margin_vox = [int(np.ceil(m / max(s, 1e-6))) for m, s in zip(margin, spacing)]
    box = bounding_box((_plain(roi) > 0).any(0).cpu().numpy())
    if box is None:
        return [0] * len(spatial), [0] * len(spatial)
    start = [max(0, b.start - m) for b, m in zip(box, margin_vox)]
    end = [min(n, b.stop + m) for b, n, m in zip(box, spatial, margin_vox)]
    return start, end


class CropROI(InvertibleTransform):
    """Crop an image to its ROI's bounding box plus a margin in millimetres; ``inverse`` pads it back.

    The way back fills the region outside the crop with the lowest finite value of each channel of the data
    being inverted (``inverse_fill="min"``): a heatmap gets its lowest score there, a label map its background.
    """

    def __init__(self, margin_mm: float | Sequence[float] = 10.0, inverse_fill: str = "min"):
        if inverse_fill not in ("min", "zero"):
            raise ValueError(f"inverse_fill must be 'min' or 'zero', got {inverse_fill!r}")
        self.margin_mm, self.inverse_fill = margin_mm, inverse_fill
        self.cropper = Crop()

    def slices(self, roi: torch.Tensor) -> tuple[slice, ...]:
        start, end = roi_box(roi, self.margin_mm, pixdim(roi))
        return tuple(slice(s, e) for s, e in zip(start, end))

    def __call__(self, img: torch.Tensor, roi: torch.Tensor | None = None, slices: tuple[slice, ...] | None = None) -> torch.Tensor:
        return self.cropper(img, slices if slices is not None else self.slices(img if roi is None else roi))

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.cropper.pop_transform(data)
        cropped = transform[TraceKeys.EXTRA_INFO]["cropped"]  # voxels cut before and after, per spatial axis
        fills = [channel_floor(data[c]) if self.inverse_fill == "min" else 0.0 for c in range(data.shape[0])]
        pad = BorderPad(cropped, mode="constant", value=fills[0])
        with pad.trace_transform(False):
            out = pad(data)
        values = _plain(out)
        for c, fill in enumerate(fills[1:], start=1):  # other channels: their own fill, outside the crop only
            for axis in range(1, values.ndim):
                before, after = cropped[2 * (axis - 1)], cropped[2 * (axis - 1) + 1]
                values[c].narrow(axis - 1, 0, before).fill_(fill)
                values[c].narrow(axis - 1, values.shape[axis] - after, after).fill_(fill)
        return out


class PadToSquare(InvertibleTransform):
    """Pad the two in-plane axes symmetrically to a square, so resizing does not distort the anatomy."""

    def __init__(self, value: float = 0.0):
        self.padder = Pad(mode="constant", value=value)

    @staticmethod
    def pad_width(spatial_shape: Sequence[int]) -> list[tuple[int, int]]:
        side = max(spatial_shape[0], spatial_shape[1])
        widths = [(0, 0)]
        for n in spatial_shape[:2]:
            extra = side - n
            widths.append((extra // 2, extra - extra // 2))
        widths += [(0, 0)] * (len(spatial_shape) - 2)
        return widths

    def __call__(self, img: torch.Tensor, to_pad: list[tuple[int, int]] | None = None) -> torch.Tensor:
        return self.padder(img, to_pad=to_pad if to_pad is not None else self.pad_width(img.shape[1:]))

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        return self.padder.inverse(data)


def axial_slices(volume: torch.Tensor) -> torch.Tensor:
    """``[C, X, Y, Z]`` (RAS, axial slices along Z) → ``[Z, C, X, Y]``."""
    return volume.permute(3, 0, 1, 2)


def stack_axial_slices(slices: torch.Tensor) -> torch.Tensor:
    """The inverse of ``axial_slices``: ``[Z, C, X, Y]`` → ``[C, X, Y, Z]``."""
    return slices.permute(1, 2, 3, 0)


class FillOutsideROIWithLiver(Transform):
    """Give every voxel outside the ROI the ROI's typical value (``level``, :func:`liver_level`; on windowed intensities: the liver's typical
    density), so no artificial edge appears where the liver mask ends; a slice-wise detector then sees the liver's
    own border, not a black-to-grey step that dominates feature scores."""

    def __init__(self, level: str = "median"):
        self.level = level

    def __call__(self, img: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        inside = torch.as_tensor(roi).expand_as(img) > 0
        values = _plain(img)[inside]
        typical = liver_level(values, self.level)[0] if values.numel() else 0.0
        return _fill_outside(img, roi, typical)


class HUWindows(Transform):
    """Several HU windows of one volume as channels: ``[1, X, Y, Z]`` HU → ``[len(windows), X, Y, Z]`` in
    ``[0, 1]`` (e.g. a wide abdominal window, a narrow liver window and a bone/contrast window)."""

    def __init__(self, windows: Sequence[Sequence[float]]):
        self.windows = [HUWindow(w) for w in windows]
        if not self.windows:
            raise ValueError("give at least one HU window")

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        channels = [w(img[:1]) for w in self.windows]
        out = torch.cat(channels, 0)
        if isinstance(img, MetaTensor) and not isinstance(out, MetaTensor):
            out = MetaTensor(out, meta=dict(img.meta), applied_operations=list(img.applied_operations))
        return out


class AxialContext(Transform):
    """2.5-D input: each axial slice with its neighbours ``offset_mm`` above and below as three channels,
    ``[1, X, Y, Z]`` → ``[3, X, Y, Z]`` (channel 0: z − d, 1: z, 2: z + d, with d = ``offset_mm`` in slices, at
    least one). At the volume's first and last slices the missing neighbour repeats the edge slice."""

    def __init__(self, offset_mm: float = 3.0):
        if not offset_mm > 0:
            raise ValueError(f"offset_mm must be positive, got {offset_mm}")
        self.offset_mm = float(offset_mm)

    def offset_slices(self, img: torch.Tensor) -> int:
        return max(1, int(round(self.offset_mm / float(pixdim(img)[2]))))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[0] != 1:
            raise ValueError(f"axial context needs a one-channel volume, got {img.shape[0]} channels")
        d, n = self.offset_slices(img), img.shape[-1]
        index = torch.arange(n, device=img.device)
        below, above = (index - d).clamp(0, n - 1), (index + d).clamp(0, n - 1)
        return torch.cat([img[..., below], img, img[..., above]], 0)


# ----------------------------------------------------------------------------- plausibility of a scan and its liver
LIVER_ROI_HINT = "pass the liver's label value (roi_label / --roi-label; 5 for TotalSegmentator)"


def _grid_sample(tensor: torch.Tensor, voxels: int = 1_000_000) -> torch.Tensor:
    """A regular grid of about ``voxels`` voxels of a channel-first volume (every voxel of a small one)."""
    values = _plain(tensor)
    step = max(1, math.ceil((values[0].numel() / voxels) ** (1 / 3)))
    return values[(slice(None), *[slice(None, None, step)] * (values.ndim - 1))].contiguous()


class CheckVoxelSpacing(Transform):
    """Reject a volume whose voxel spacing is not that of a CT scan (a header with the wrong units or scale: the
    same voxels stored at 10 mm or at 0.1 mm would otherwise be scored without a word).

    Accepted: ``min_mm``..``max_inplane_mm`` within the axial plane and ``min_mm``..``max_slice_mm`` between
    slices (the axial axis is the one nearest the body's long axis).
    """

    def __init__(self, min_mm: float = 0.2, max_inplane_mm: float = 8.0, max_slice_mm: float = 15.0):
        self.min_mm, self.max_inplane_mm, self.max_slice_mm = min_mm, max_inplane_mm, max_slice_mm

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if not isinstance(img, MetaTensor):
            return img
        from monai_ad.postprocess import axial_axis

        spacing = pixdim(img)[:3]
        axial = axial_axis(np.asarray(img.affine))
        inplane = [s for axis, s in enumerate(spacing) if axis != axial]
        if (
            not np.all(np.isfinite(spacing))
            or min(spacing) < self.min_mm
            or max(inplane) > self.max_inplane_mm
            or spacing[axial] > self.max_slice_mm
        ):
            shown = " × ".join(f"{s:.4g}" for s in spacing)
            raise InputError(
                f"voxel spacing {shown} mm is not that of a CT scan (expected {self.min_mm:g}–{self.max_inplane_mm:g} mm "
                f"in-plane and {self.min_mm:g}–{self.max_slice_mm:g} mm between slices): check the header's spacing and units",
                source_path(img),
            )
        return img


class CheckSingleOrgan(Transform):
    """Reject a label map that holds several organs when no liver label is chosen (``labels`` None): an organ
    map (TotalSegmentator, BTCV) used as it is would make the whole labelled body the liver ROI.

    Up to ``max_labels`` non-zero values are a liver mask (LiTS style: 1 liver, 2 lesion). Masks with fractional
    values (resampled soft masks) are not label maps and are left alone. Labels are counted on a regular grid
    of about a million voxels.
    """

    def __init__(self, labels: Sequence[int] | int | None = None, max_labels: int = 2):
        self.labels, self.max_labels = labels, max_labels

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        if self.labels is not None:
            return mask
        sample = _grid_sample(mask)
        values = torch.unique(sample[sample != 0])
        if values.is_floating_point() and not bool((values == values.round()).all()):
            return mask
        if values.numel() > self.max_labels:
            shown = ", ".join(f"{float(v):g}" for v in values[:6]) + (", ..." if values.numel() > 6 else "")
            raise InputError(
                f"the mask holds {values.numel()} label values ({shown}): an organ map, not one liver mask; "
                + LIVER_ROI_HINT,
                source_path(mask),
            )
        return mask


class CheckLiverROI(Transform):
    """Reject a liver ROI (binary, after ``SelectROI``) that cannot be a liver, naming the mask file.

    - its volume must be ``min_ml``..``max_ml`` millilitres (a partial liver of a few slices is accepted; more
      than the largest livers means a body or organ-group mask, or a wrong voxel spacing);
    - with the image given (same grid), it must not cover more than ``max_body_fraction`` of the body (voxels
      above ``body_hu``, counted on a regular grid): a liver is a minority of any section through it.
    """

    def __init__(self, min_ml: float = 10.0, max_ml: float = 8000.0, max_body_fraction: float = 0.6, body_hu: float = -500.0):
        self.min_ml, self.max_ml = min_ml, max_ml
        self.max_body_fraction, self.body_hu = max_body_fraction, body_hu

    def __call__(self, roi: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        path = source_path(roi)
        voxel_ml = float(np.prod(pixdim(roi)[:3])) / 1000.0
        volume_ml = int(_plain(roi)[0].count_nonzero()) * voxel_ml  # a binary ROI: non-zero is inside
        if not self.min_ml <= volume_ml <= self.max_ml:
            size = "smaller" if volume_ml < self.min_ml else "larger"
            raise InputError(
                f"the liver ROI is {volume_ml:.0f} mL, {size} than a liver ({self.min_ml:g}–{self.max_ml:g} mL accepted, "
                f"voxels {' × '.join(f'{s:.4g}' for s in pixdim(roi)[:3])} mm): check the voxel spacing, or "
                + LIVER_ROI_HINT,
                path,
            )
        if image is not None and tuple(image.shape[1:]) == tuple(roi.shape[1:]):
            body = _grid_sample(image)[0] > self.body_hu
            inside = _grid_sample(roi)[0].to(body.device) > 0
            n_body = int(body.sum())
            fraction = float((inside & body).sum()) / n_body if n_body else 1.0
            if fraction > self.max_body_fraction:
                raise InputError(
                    f"the liver ROI covers {fraction:.0%} of the body (voxels above {self.body_hu:g} HU), more than a "
                    f"liver can ({self.max_body_fraction:.0%}): a body or organ-group mask; " + LIVER_ROI_HINT,
                    path,
                )
        return roi


class TrimROIBorder(Transform):
    """Take out of a liver ROI the voxels near its border that are fat or air, not liver.

    An organ segmentation's border follows the liver only to within a voxel or two: along the capsule it takes in
    some of the fat around the liver, whose density no liver tissue has (fat lies at −190…−30 HU). Those voxels
    would read as the darkest "lesions" of every scan. A voxel of the ROI within ``border_mm`` of its outside
    (3-D, in mm) whose HU is below ``min_hu`` leaves the ROI; deeper voxels stay whatever their density (a fatty
    lesion inside the liver is still scored). ``roi`` binary ``[1, ...]``, ``image`` in HU on the same grid.
    """

    def __init__(self, min_hu: float = -30.0, border_mm: float = 3.0):
        self.min_hu, self.border_mm = float(min_hu), float(border_mm)

    def __call__(self, roi: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        from scipy import ndimage

        inside = _plain(roi)[0].cpu().numpy() > 0
        box = bounding_box(inside)
        if box is None:
            return roi
        part = inside[box]  # the padding is the outside beyond the box (and beyond the volume's edge)
        depth = ndimage.distance_transform_edt(np.pad(part, 1), sampling=pixdim(roi)[: part.ndim])
        depth = depth[tuple(slice(1, -1) for _ in range(part.ndim))]
        values = _plain(image)[0][box].cpu().numpy()
        removed = np.zeros_like(inside)
        removed[box] = part & (depth <= self.border_mm) & (values < self.min_hu)
        if not removed.any():
            return roi
        keep = torch.from_numpy(~removed).to(_plain(roi).device)
        return roi * keep.to(roi.dtype)[None]


class ScanProfile(Transform):
    """What a scan is, in the terms that make a detector's normals comparable to it: the liver's typical HU and
    spread (its histogram's mode, which tumour burden does not move: :func:`liver_level`), the liver's volume and
    its extent along the last (axial, after RAS orientation) axis, and the voxel spacing. Read once per scan
    before any intensity or spatial change, stored with a model for its normals and compared at inference
    (``monai_ad.calibration.profile_warnings``). Returns the profile; changes nothing."""

    max_voxels = 400_000  # the liver level from a regular subsample: the same figure to a fraction of a HU

    def __call__(self, image: torch.Tensor, roi: torch.Tensor) -> dict[str, float | list[float]]:
        inside = _plain(roi)[0] > 0
        values = _plain(image)[0][inside.to(_plain(image).device)]
        if values.numel() > self.max_voxels:
            values = values[:: values.numel() // self.max_voxels]
        level, spread = liver_level(values, "mode") if values.numel() else (float("nan"), float("nan"))
        spacing = [float(v) for v in pixdim(roi)[:3]]
        slices_with_liver = int(inside.flatten(0, -2).any(0).sum())
        return {
            "liver_hu": round(float(level), 2),
            "liver_spread_hu": round(float(spread), 2),
            "liver_ml": round(int(inside.sum()) * float(np.prod(spacing)) / 1000.0, 1),
            "liver_extent_mm": round(slices_with_liver * spacing[2], 1),
            "spacing_mm": [round(v, 4) for v in spacing],
        }
