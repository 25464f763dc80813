"""Dictionary twins of ``monai_ad.transforms.array``: the same work applied to named items."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import InvertibleTransform, MapTransform

from monai_ad.transforms.array import (
    ABDOMEN_WINDOW,
    AxialContext,
    FillOutsideROIWithLiver,
    HUWindows,
    CheckCTVolume,
    CheckLiverROI,
    CheckSameGeometry,
    CheckSingleOrgan,
    CheckVoxelSpacing,
    CropROI,
    FillOutsideROI,
    HistogramEqualize,
    HUWindow,
    MaskOutsideROI,
    NormalizeLiverHU,
    NormalizeLiverSpread,
    PadToSquare,
    ScanProfile,
    SelectROI,
    TrimROIBorder,
)


class _Applyd(MapTransform):
    """Apply an array transform to each key, optionally passing the ROI item as its second argument."""

    transform: object
    roi_key: str | None = None

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        extra = () if self.roi_key is None else (d[self.roi_key],)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], *extra)
        return d


class CheckCTVolumed(_Applyd):
    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.transform = CheckCTVolume(**kwargs)


class CheckSameGeometryd(MapTransform):
    """Check that each of ``keys`` (masks) has the geometry of ``ref_key`` (the image)."""

    def __init__(self, keys: KeysCollection, ref_key: str = "image", atol_mm: float = 1e-2, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.check = CheckSameGeometry(atol_mm)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            self.check(d[key], d[self.ref_key])
        return d


class SelectROId(_Applyd):
    def __init__(self, keys: KeysCollection, labels: Sequence[int] | int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = SelectROI(labels)


class NormalizeLiverHUd(_Applyd):
    def __init__(self, keys: KeysCollection, roi_key: str = "roi", reference_hu: float = 110.0, level: str = "median",
                 allow_missing_keys: bool = False):  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.transform, self.roi_key = NormalizeLiverHU(reference_hu, level), roi_key


class HUWindowd(_Applyd):
    def __init__(self, keys: KeysCollection, window: Sequence[float] = ABDOMEN_WINDOW, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = HUWindow(window)


class HistogramEqualized(_Applyd):
    def __init__(self, keys: KeysCollection, roi_key: str = "roi", bins: int = 256, bmad_squeeze: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform, self.roi_key = HistogramEqualize(bins, bmad_squeeze), roi_key


class MaskOutsideROId(_Applyd):
    def __init__(self, keys: KeysCollection, roi_key: str = "roi", value: float = 0.0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform, self.roi_key = MaskOutsideROI(value), roi_key


class FillOutsideROId(_Applyd):
    def __init__(
        self,
        keys: KeysCollection,
        roi_key: str = "roi",
        channels: Sequence[int] | None = None,
        inplace: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.transform, self.roi_key = FillOutsideROI(channels, inplace), roi_key


class _InvertibleApplyd(MapTransform, InvertibleTransform):
    """A dictionary twin whose array transform records itself per item and is undone the same way."""

    transform: CropROI | PadToSquare

    def inverse(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform.inverse(d[key])
        return d


class CropROId(_InvertibleApplyd):
    """Crop every key to the bounding box of ``source_key`` (the ROI) grown by ``margin_mm``; invertible."""

    def __init__(
        self,
        keys: KeysCollection,
        source_key: str = "roi",
        margin_mm: float | Sequence[float] = 10.0,
        inverse_fill: str = "min",
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.source_key = source_key
        self.transform = CropROI(margin_mm, inverse_fill)

    def __call__(self, data):
        d = dict(data)
        slices = self.transform.slices(d[self.source_key])
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], slices=slices)
        return d


class PadToSquared(_InvertibleApplyd):
    """Pad the in-plane axes of every key to the square of the first key's larger side; invertible."""

    def __init__(self, keys: KeysCollection, value: float = 0.0, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = PadToSquare(value)

    def __call__(self, data):
        d = dict(data)
        widths = None
        for key in self.key_iterator(d):
            widths = widths or self.transform.pad_width(d[key].shape[1:])
            d[key] = self.transform(d[key], to_pad=widths)
        return d



class FillOutsideROIWithLiverd(_Applyd):
    def __init__(self, keys: KeysCollection, roi_key: str = "roi", level: str = "median", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform, self.roi_key = FillOutsideROIWithLiver(level), roi_key


class HUWindowsd(_Applyd):
    def __init__(self, keys: KeysCollection, windows: Sequence[Sequence[float]], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = HUWindows(windows)


class AxialContextd(_Applyd):
    def __init__(self, keys: KeysCollection, offset_mm: float = 3.0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = AxialContext(offset_mm)


class CheckVoxelSpacingd(_Applyd):
    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.transform = CheckVoxelSpacing(**kwargs)


class CheckSingleOrgand(_Applyd):
    def __init__(self, keys: KeysCollection, labels: Sequence[int] | int | None = None, max_labels: int = 2, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = CheckSingleOrgan(labels, max_labels)


class _ApplyWithImaged(MapTransform):
    """Apply an array transform to each key (ROIs) with ``image_key``'s image as its second argument (None when
    ``image_key`` is None or the data holds no such item)."""

    transform: object
    image_key: str | None = "image"

    def __call__(self, data):
        d = dict(data)
        image = d.get(self.image_key) if self.image_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], image)
        return d


class CheckLiverROId(_ApplyWithImaged):
    """``CheckLiverROI`` on each of ``keys`` (binary liver ROIs), with ``image_key``'s image for the body check."""

    def __init__(self, keys: KeysCollection, image_key: str | None = "image", allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.transform, self.image_key = CheckLiverROI(**kwargs), image_key


class TrimROIBorderd(_ApplyWithImaged):
    """``TrimROIBorder`` on each of ``keys`` (binary liver ROIs), with ``image_key``'s HU image."""

    def __init__(self, keys: KeysCollection, image_key: str = "image", min_hu: float = -30.0, border_mm: float = 3.0,
                 allow_missing_keys: bool = False):  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.transform, self.image_key = TrimROIBorder(min_hu, border_mm), image_key


class NormalizeLiverSpreadd(_Applyd):
    def __init__(self, keys: KeysCollection, roi_key: str = "roi", reference_mad_hu: float = 10.0, level: str = "median",
                 spread: str = "level", allow_missing_keys: bool = False):  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.transform, self.roi_key = NormalizeLiverSpread(reference_mad_hu, level, spread), roi_key


class ScanProfiled(MapTransform):
    """``ScanProfile`` of the image ``keys`` inside ``roi_key``'s liver, stored as ``profile_key``; the items
    themselves are left as they are."""

    def __init__(self, keys: KeysCollection, roi_key: str = "roi", profile_key: str = "scan_profile", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform, self.roi_key, self.profile_key = ScanProfile(), roi_key, profile_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.profile_key] = self.transform(d[key], d[self.roi_key])
        return d
