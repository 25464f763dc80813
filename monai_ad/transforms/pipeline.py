"""The volumetric pipeline every detector shares: CT volume + liver mask → square axial ROI slices.

All spatial steps are invertible MONAI transforms, so ``Invertd`` with this pipeline takes a heatmap computed
on the slices back to the scan's own shape, orientation and affine.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

from monai.transforms import (
    Compose,
    ConcatItemsd,
    CopyItemsd,
    Invertd,
    LoadImaged,
    MapTransform,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    Spacingd,
)

from monai_ad.calibration import CalibratedSummaryd
from monai_ad.errors import InputError
from monai_ad.io import NiftiReader, unreadable_message
from monai_ad.postprocess import HEATMAP_CHANNEL, MIN_LESION_MM3, AnomalyOutputsd
from monai_ad.settings import PREPROCESS_RANGES, check_setting
from monai_ad.transforms.array import ABDOMEN_WINDOW, LIVER_LEVELS, LIVER_SPREADS
from monai_ad.transforms.dictionary import (
    AxialContextd,
    FillOutsideROIWithLiverd,
    HUWindowsd,
    CheckCTVolumed,
    CheckLiverROId,
    CheckSameGeometryd,
    CheckSingleOrgand,
    CheckVoxelSpacingd,
    CropROId,
    FillOutsideROId,
    HistogramEqualized,
    HUWindowd,
    MaskOutsideROId,
    NormalizeLiverHUd,
    NormalizeLiverSpreadd,
    PadToSquared,
    ScanProfiled,
    SelectROId,
    TrimROIBorderd,
)

IMAGE, ROI, PRED = "image", "roi", "pred"
ROI_SOURCE = "roi_source"  # the liver mask in the scan's own geometry, for the way back
SCAN_PROFILE = "scan_profile"  # the scan's liver HU, spacing and extent (``ScanProfile``), read before any change


@dataclass
class PreprocessConfig:
    """How a CT volume becomes detector input. Stored with every trained model, so inference matches training.

    ``normalize_liver_hu``: shift each volume so its median liver HU is this value (None: off).
    ``normalize_liver_spread``: scale each volume about its liver median so the liver's MAD is this many HU (None:
    off), which makes deviations comparable between noisy thin-slice and smooth thick-slice scans.
    ``min_roi_pixels``: an axial slice is scored when its ROI covers at least this many pixels at
    ``image_size``; other slices get the lowest score.

    CT-aware inputs (off by default, so models saved before they existed read volumes as they were trained):

    - ``context_mm``: 2.5-D input; each slice with its neighbours this many mm above and below as three channels.
    - ``windows``: several HU windows as channels (a list of ``[low, high]``), instead of the one ``window``.
    - ``pixel_mm``: a fixed in-plane resolution (mm per pixel) instead of resizing each liver's box to
      ``image_size``: a patch then covers the same tissue in every scan. The liver's box is centred in an
      ``image_size`` square (``image_size * pixel_mm`` mm across); liver beyond it is not scored.
    - ``outside_fill``: ``"zero"`` (black outside the liver, as BMAD) or ``"liver"`` (the liver's own typical
      value, so the mask's border is no artificial edge).
    - ``liver_level``: how the liver's typical value and spread are read for the three steps above: ``"median"``
      (median and MAD) or ``"mode"`` (the parenchyma's histogram peak and its width, which heavy tumour burden
      does not move; ``transforms.array.liver_level``).
    - ``liver_spread``: the spread ``normalize_liver_spread`` sets: ``"level"`` (the one ``liver_level`` reads) or
      ``"noise"`` (the in-plane pixel noise, ``transforms.array.pixel_noise``, which tumour burden and the
      parenchyma's enhancement do not move).
    - ``trim_border_hu``: the ROI's voxels within ``trim_border_mm`` of its border whose HU is below this leave it
      (``TrimROIBorder``: the fat and air an organ segmentation takes in along the capsule; −30 HU is the fat
      range's upper end). None: the ROI as given.
    """

    image_size: int = 224
    window: tuple[float, float] = ABDOMEN_WINDOW
    margin_mm: float = 10.0
    normalize_liver_hu: float | None = 110.0
    normalize_liver_spread: float | None = None
    histogram_equalization: bool = False
    mask_outside_roi: bool = True
    min_roi_pixels: int = 16
    context_mm: float = 0.0
    windows: list[list[float]] | None = None
    pixel_mm: float | None = None
    outside_fill: str = "zero"
    liver_level: str = "median"
    liver_spread: str = "level"
    trim_border_hu: float | None = None
    trim_border_mm: float = 3.0

    @property
    def in_channels(self) -> int:
        """Channels of each slice the detector gets."""
        if self.context_mm > 0:
            return 3
        return len(self.windows) if self.windows else 1

    @classmethod
    def with_defaults(cls, defaults: Mapping[str, Any], values: Mapping[str, Any] | None) -> "PreprocessConfig":
        """``values`` over a detector's ``defaults``; choosing one kind of extra channels (``context_mm`` or
        ``windows``) replaces the other kind a default asked for."""
        values = dict(values or {})
        defaults = {k: v for k, v in defaults.items() if k not in values}
        if values.get("windows"):
            defaults.pop("context_mm", None)
        if values.get("context_mm"):
            defaults.pop("windows", None)
        return cls.from_dict({**defaults, **values})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "PreprocessConfig":
        known = {f.name for f in fields(cls)}
        values = dict(values or {})
        unknown = set(values) - known
        if unknown:
            raise InputError(f"unknown pre-processing option(s): {', '.join(sorted(unknown))}")
        if "window" in values:
            values["window"] = _hu_window(values["window"], "window")
        if values.get("windows") is not None:
            if not isinstance(values["windows"], (list, tuple)):
                raise InputError(f"windows must be a list of [low, high] HU windows, got {values['windows']!r}")
            values["windows"] = [list(_hu_window(w, "windows")) for w in values["windows"]]
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        for name in PREPROCESS_RANGES:
            if name != "window":  # read and checked in HU by from_dict
                check_setting(name, getattr(self, name), PREPROCESS_RANGES)
        if self.liver_level not in LIVER_LEVELS:
            raise InputError(f"liver_level must be one of {', '.join(LIVER_LEVELS)}, got {self.liver_level!r}")
        if self.liver_spread not in LIVER_SPREADS:
            raise InputError(f"liver_spread must be one of {', '.join(LIVER_SPREADS)}, got {self.liver_spread!r}")
        if self.outside_fill not in ("zero", "liver"):
            raise InputError(f"outside_fill must be 'zero' or 'liver', got {self.outside_fill!r}")
        if self.context_mm and self.windows:
            raise InputError("choose either context_mm (2.5-D) or windows (several HU windows) as channels, not both")
        if self.windows and len(self.windows) not in (1, 3):
            raise InputError(f"windows: give 1 or 3 HU windows, got {len(self.windows)}")
        if self.windows and self.histogram_equalization:
            raise InputError("histogram_equalization works on one HU window, not on several")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["window"] = list(d["window"])
        return d


def _hu_window(value: Any, name: str) -> tuple[float, float]:
    """``[low, high]`` in HU with low < high (``PREPROCESS_RANGES["window"]``), or an ``InputError`` naming the option."""
    pair = list(value) if isinstance(value, (list, tuple)) else value
    low, high = check_setting(name, pair, {name: PREPROCESS_RANGES["window"]})
    return low, high


class LoadVolumed(LoadImaged):
    """``LoadImaged`` (channel first, float32) whose failures become one-line errors naming the file.

    NIfTI, NRRD, MHA and DICOM series folders are read through MONAI's readers (nibabel, ITK); gzip NIfTI
    first through ``NiftiReader`` (the same result, faster). ``mask_keys`` are label maps: they keep the type
    they are stored in (a uint8 liver mask read as float32 would take four times the memory and time).
    """

    def __init__(self, keys, allow_missing_keys: bool = False, mask_keys: Sequence[str] = (), **kwargs):
        kwargs.setdefault("image_only", True)
        kwargs.setdefault("ensure_channel_first", True)
        kwargs.setdefault("dtype", "float32")
        own_reader = "reader" not in kwargs
        if own_reader:
            kwargs["reader"] = NiftiReader(dtype=kwargs["dtype"])
        super().__init__(keys, allow_missing_keys=allow_missing_keys, **kwargs)
        self.mask_keys = set(mask_keys)
        self._mask_loader = copy.copy(self._loader)
        self._mask_loader.dtype = None
        if own_reader:  # masks are read in their stored type
            self._mask_loader.readers = [NiftiReader() if isinstance(r, NiftiReader) else r for r in self._loader.readers]

    def __call__(self, data, reader=None):
        d = dict(data)
        paths = {key: d[key] for key in self.key_iterator(d) if isinstance(d[key], (str, os.PathLike))}
        for path in paths.values():
            if not os.path.exists(path):
                raise InputError("file not found", path)
        if len(paths) > 1:  # decompression releases the GIL: the image and its masks are read side by side
            with ThreadPoolExecutor(max_workers=len(paths)) as pool:
                loaded = dict(zip(paths, pool.map(lambda key: self._load_one(key, paths[key], reader), paths)))
        else:
            loaded = {key: self._load_one(key, path, reader) for key, path in paths.items()}
        d.update(loaded)
        return d

    def _load_one(self, key, path, reader=None):
        try:
            loaded = (self._mask_loader if key in self.mask_keys else self._loader)(path, reader)
        except Exception as exc:  # any reader failure: unreadable, truncated, wrong format
            raise InputError(unreadable_message(path, exc), path) from None
        # the image, its metadata inside; also when a framework switched ``image_only`` off
        return loaded[0] if isinstance(loaded, tuple) else loaded


def build_loading(mask_keys: Sequence[str] = ()) -> Compose:
    """Reading ``{"image": CT, "roi": liver mask or organ label map}`` (paths) into tensors: the first step of
    ``build_preprocessing``, as a chain of its own. ``mask_keys``: further label maps to read beside the ROI."""
    masks = [ROI, *mask_keys]
    return Compose([LoadVolumed([IMAGE, *masks], mask_keys=masks)])


def build_preprocessing(
    config: PreprocessConfig | Mapping[str, Any] | None = None,
    roi_labels: Sequence[int] | int | None = None,
    concat: bool = False,
    mask_keys: Sequence[str] = (),
    loading: bool = True,
) -> Compose:
    """The pre-processing ``Compose`` over ``{"image": CT, "roi": liver mask or organ label map}``; with
    ``loading=False`` only the steps after ``build_loading`` (over volumes already read).

    Output: ``image`` and ``roi`` as ``[1, S, S, Z]`` (RAS; axial slices along the last axis; S =
    ``config.image_size``), the image windowed to ``[0, 1]``, and ``roi_source``: the liver mask in the scan's own
    geometry, and ``scan_profile`` (``ScanProfile``: liver HU, spacing, extent, as read). ``roi_labels`` selects the liver in the mask
    (default: any non-zero label, which suits LiTS-style 1 liver / 2 lesion labels; 5 for TotalSegmentator).
    ``mask_keys`` name further label maps in the scan's geometry (e.g. lesion labels) that follow the ROI through
    every spatial step (nearest-neighbour), so they line up with the slices.
    """
    cfg = config if isinstance(config, PreprocessConfig) else PreprocessConfig.from_dict(config)
    masks = [ROI, *mask_keys]
    keys = [IMAGE, *masks]
    steps: list[MapTransform] = list(build_loading(mask_keys).transforms) if loading else []
    steps += [
        CheckCTVolumed(IMAGE),
        CheckVoxelSpacingd(IMAGE),
        CheckSingleOrgand(ROI, labels=roi_labels),  # an organ map needs the liver's label value
        SelectROId(ROI, labels=roi_labels),
        CopyItemsd(ROI, names=ROI_SOURCE),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        CheckSameGeometryd(masks, ref_key=IMAGE),  # after re-orientation: the same grid stored in another axis order is fine
        CheckLiverROId(ROI, image_key=IMAGE),  # a liver's volume, not the body
        *([TrimROIBorderd(ROI, image_key=IMAGE, min_hu=cfg.trim_border_hu, border_mm=cfg.trim_border_mm)]
          if cfg.trim_border_hu is not None else []),
        ScanProfiled(IMAGE, roi_key=ROI, profile_key=SCAN_PROFILE),
        CropROId(keys, source_key=ROI, margin_mm=cfg.margin_mm),
    ]
    if cfg.normalize_liver_hu is not None:
        steps.append(NormalizeLiverHUd(IMAGE, roi_key=ROI, reference_hu=cfg.normalize_liver_hu, level=cfg.liver_level))
    if cfg.normalize_liver_spread is not None:
        steps.append(NormalizeLiverSpreadd(IMAGE, roi_key=ROI, reference_mad_hu=cfg.normalize_liver_spread,
                                            level=cfg.liver_level, spread=cfg.liver_spread))
    steps.append(HUWindowsd(IMAGE, windows=cfg.windows) if cfg.windows else HUWindowd(IMAGE, window=cfg.window))
    if cfg.histogram_equalization:
        steps.append(HistogramEqualized(IMAGE, roi_key=ROI))
    fill_liver = cfg.mask_outside_roi and cfg.outside_fill == "liver"
    if cfg.mask_outside_roi and not fill_liver:
        steps.append(MaskOutsideROId(IMAGE, roi_key=ROI))
    modes = ["bilinear"] + ["nearest"] * len(masks)
    square = (cfg.image_size, cfg.image_size, -1)
    if cfg.pixel_mm is not None:
        steps += [
            Spacingd(keys, pixdim=(cfg.pixel_mm, cfg.pixel_mm, -1.0), mode=modes),
            ResizeWithPadOrCropd(keys, spatial_size=square),
        ]
    else:
        steps += [PadToSquared(keys), Resized(keys, spatial_size=square, mode=modes)]
    if fill_liver:  # after resampling, so padding and interpolation leave no edge either
        steps.append(FillOutsideROIWithLiverd(IMAGE, roi_key=ROI, level=cfg.liver_level))
    if cfg.context_mm > 0:
        steps.append(AxialContextd(IMAGE, offset_mm=cfg.context_mm))
    if concat:
        steps.append(ConcatItemsd([IMAGE, ROI], name=IMAGE))
    return Compose(steps)


def build_reassembly(preprocessing: Compose) -> Compose:
    """From the inferer's output ``pred`` back to the scan's own geometry: ``Invertd`` through the
    pre-processing, then the lowest score outside the liver (the slice-score channel is read only inside the
    liver, so it is left as it is)."""
    return Compose(
        [
            Invertd(keys=PRED, transform=preprocessing, orig_keys=IMAGE, nearest_interp=False),
            FillOutsideROId(PRED, roi_key=ROI_SOURCE, channels=[HEATMAP_CHANNEL], inplace=True),  # Invertd's own output
        ]
    )


def build_labelling(
    pixel_threshold: float,
    slice_threshold: float,
    min_lesion_mm3: float = MIN_LESION_MM3,
    extent_threshold: float | None = None,
    conformal: Mapping[str, Any] | None = None,
    normal_profiles: Sequence[Mapping[str, Any]] = (),
) -> Compose:
    """Heatmap, label map and summary from the reassembled ``pred`` (``AnomalyOutputsd``: regions found at
    ``pixel_threshold``, outlined at ``extent_threshold`` when given), then what the model's normals say about it
    (``CalibratedSummaryd``: study score, conformal p-values against ``conformal``, warnings against
    ``normal_profiles``)."""
    return Compose(
        [
            AnomalyOutputsd(PRED, ROI_SOURCE, pixel_threshold, slice_threshold, min_lesion_mm3, extent_threshold=extent_threshold),
            CalibratedSummaryd(PRED, ROI_SOURCE, conformal, normal_profiles, profile_key=SCAN_PROFILE),
        ]
    )


def build_postprocessing(
    preprocessing: Compose,
    pixel_threshold: float,
    slice_threshold: float,
    min_lesion_mm3: float = MIN_LESION_MM3,
    extent_threshold: float | None = None,
    conformal: Mapping[str, Any] | None = None,
    normal_profiles: Sequence[Mapping[str, Any]] = (),
) -> Compose:
    """``build_reassembly`` then ``build_labelling``, as one chain."""
    reassembly = build_reassembly(preprocessing)
    labelling = build_labelling(pixel_threshold, slice_threshold, min_lesion_mm3, extent_threshold, conformal, normal_profiles)
    return Compose([*reassembly.transforms, *labelling.transforms])


def run_pipeline(pipeline: Compose, data: Mapping[str, Any]) -> dict[str, Any]:
    """Run a pipeline; an ``InputError`` raised inside (wrapped by MONAI) comes out as itself."""
    try:
        return pipeline(dict(data))
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, InputError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise


def require_roi(data: Mapping[str, Any], image_path: Any = None) -> None:
    """No liver mask, no guess: say so."""
    if data.get(ROI) in (None, ""):
        raise InputError(
            "no liver mask given: pass a liver label file or an organ segmentation with its liver label value "
            "(5 in a TotalSegmentator map)",
            image_path if image_path is not None else data.get(IMAGE),
        )
