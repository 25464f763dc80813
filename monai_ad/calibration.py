"""Calibrated alarms: conformal p-values against held-out normal scans, the operating point for a target
false-alarm rate, and warnings for a scan unlike the normals a model knows.

Voxels, and slices, of one scan are not exchangeable with each other, but whole normal scans are (Bates et al.,
"Testing for outliers with conformal p-values", Ann. Statist. 2023). So every calibration figure is one number per
held-out normal scan, read as inference reads any scan: its highest slice score (``study``) and the highest
threshold at which its label map would keep a region (``region``: ``region_score``). A new scan's score ``s``
against the ``n`` calibration figures ``c`` has the conformal p-value ``(1 + #{c >= s}) / (n + 1)``: for a normal
scan exchangeable with the calibration scans, ``P(p <= a) <= a`` for every ``a``. Applied to a slice score or a
region's peak, the same p-value tests "could a normal scan hold a slice / a region this abnormal anywhere", which
keeps the guarantee at scan level (a max-type correction: conservative for any one slice, valid for all together).

The operating point for a target rate ``a`` flags a scan (a slice, a region) when its p-value is at most ``a``:
at most a fraction ``a`` of normal scans raise an alarm (any flagged slice, or any region), and, with continuous
scores, at least ``a - 1 / (n + 1)``. It needs ``n + 1 >= 1 / a`` calibration scans.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from monai.config import KeysCollection
from monai.transforms import MapTransform

from monai_ad.errors import InputError
from monai_ad.postprocess import label_lesions


LOWEST_SCORE = float(np.finfo(np.float64).min)  # a scan with nothing scored: below every score, and valid JSON


def region_score(
    heatmap: np.ndarray, affine: np.ndarray, roi: np.ndarray, min_volume_mm3: float, extent_threshold: float | None
) -> float:
    """The highest pixel threshold at which a scan holds a region its label map keeps: the highest peak among the
    regions outlined at ``extent_threshold`` that reach ``min_volume_mm3`` (``label_lesions``' rule: at any
    threshold above the outline's, a region is kept when its peak reaches the threshold). When none is, the
    value just below the outline threshold: no threshold at or above it flags the scan (a finite number, so a
    model's calibration stays plain JSON)."""
    level = None if extent_threshold is None else float(extent_threshold)
    if level is None or not math.isfinite(level):  # no outline threshold: the regions of the liver's top 0.1 %
        inside = heatmap[roi > 0]
        level = float(np.quantile(inside, 0.999)) if inside.size else None
    if level is None:
        return LOWEST_SCORE
    _, regions = label_lesions(heatmap, affine, level, min_volume_mm3, roi, level)
    return max((r["peak_score"] for r in regions), default=float(np.nextafter(level, -math.inf)))


def calibrate_on_scans(predictor: Any, scans: Sequence[tuple[Any, Any]], progress: bool = False) -> dict[str, Any]:
    """The conformal calibration of a model on held-out normal ``scans`` (``(image, liver mask)`` pairs), read as
    ``predictor`` (a ``monai_ad.prediction.Predictor`` of the model, its own thresholds) reads any scan: per scan,
    its highest slice score (``study``) and its ``region_score`` at the predictor's outline threshold and smallest
    region. Stored with the model as ``thresholds["conformal"]``."""
    study, region = [], []
    for image, roi in tqdm(scans, desc="conformal calibration", disable=not progress, unit="volume"):
        result = predictor(image, roi, keep_inputs=True)
        study.append(result.summary["study_score"] if result.summary["study_score"] is not None else LOWEST_SCORE)
        region.append(region_score(result.heatmap, result.affine, result.roi, predictor.min_lesion_mm3, predictor.extent_threshold))
    return {
        "study": sorted(float(v) for v in study), "region": sorted(float(v) for v in region), "n_scans": len(study),
        "extent_threshold": predictor.extent_threshold, "min_lesion_mm3": float(predictor.min_lesion_mm3),
    }  # fmt: skip


def conformal_p_value(score: float | None, calibration: Sequence[float]) -> float | None:
    """``(1 + #{c >= score}) / (n + 1)`` over the calibration scans' maxima ``c`` (None for no score)."""
    if score is None or not math.isfinite(float(score)) or not len(calibration):
        return None
    c = np.asarray(calibration, dtype=np.float64)
    return float((1 + np.count_nonzero(c >= float(score))) / (c.size + 1))


def conformal_p_values(scores: np.ndarray, calibration: Sequence[float]) -> np.ndarray:
    """``conformal_p_value`` of every score at once (NaN where a score is not finite)."""
    c = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    at_or_above = c.size - np.searchsorted(c, s, side="left")
    return np.where(np.isfinite(s), (1 + at_or_above) / (c.size + 1), np.nan)


def conformal_threshold(calibration: Sequence[float], false_alarm_rate: float, what: str = "scans") -> float:
    """The lowest score whose p-value is at most ``false_alarm_rate``: scores at or above it raise the alarm.

    With ``n`` calibration maxima and ``k = floor(a (n + 1)) - 1``, a score is flagged when fewer than ``k + 1`` of
    them reach it, i.e. when it exceeds the ``(k + 1)``-th largest. ``InputError`` when ``n`` is too small for ``a``.
    """
    a = float(false_alarm_rate)
    if not 0 < a < 1:
        raise InputError(f"the false-alarm rate must be between 0 and 1 (a fraction of normal {what}), got {a:g}")
    c = np.sort(np.asarray(calibration, dtype=np.float64))
    k = math.floor(a * (c.size + 1) + 1e-9) - 1
    if k < 0:
        needed = math.ceil(1.0 / a - 1.0 - 1e-9)
        raise InputError(
            f"a false-alarm rate of {a:g} needs at least {needed} held-out normal {what} to calibrate on; the model "
            f"was calibrated on {c.size} (retrain with more normal validation scans, or ask for a rate of at least "
            f"{1.0 / (c.size + 1):.3g})"
        )
    if k >= c.size:  # every score is flagged: a rate this high allows it
        return LOWEST_SCORE
    return float(np.nextafter(c[c.size - 1 - k], math.inf))


def operating_point(calibration: Mapping[str, Any], false_alarm_rate: float) -> dict[str, Any]:
    """Slice and pixel thresholds for a target false-alarm rate, and the guarantee that comes with them."""
    n = int(calibration.get("n_scans") or len(calibration.get("study", [])))
    a = float(false_alarm_rate)
    # region scores describe the label map only at thresholds at or above the outline's (``region_score``); there,
    # a scan whose normals never hold a kept region is flagged for any region it keeps
    outline = calibration.get("extent_threshold")
    pixel = conformal_threshold(calibration["region"], a)
    return {
        "slice": conformal_threshold(calibration["study"], a),
        "pixel": pixel if outline is None else max(pixel, float(outline)),
        "false_alarm_rate": a,
        "n_calibration_scans": n,
        "guarantee": (
            f"at most {a:.3g} of normal scans hold a flagged slice, and at most {a:.3g} hold a flagged region "
            f"(finite-sample, for scans exchangeable with the {n} held-out normal scans"
            + (f"; at least {max(a - 1.0 / (n + 1), 0.0):.3g} with continuous scores)" if n else ")")
        ),
    }


# ----------------------------------------------------------------------------- out-of-distribution warnings
HU_TOLERANCE = 20.0  # HU beyond the normals' liver levels before a scan is called another phase or calibration
SPREAD_FACTOR, SPACING_FACTOR, EXTENT_FRACTION = 2.0, 1.5, 0.5
FLAGGED_LIVER_FRACTION = 0.5


def profile_warnings(profile: Mapping[str, Any] | None, normals: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per way the scan (its ``ScanProfile``) lies outside what the normal scans' profiles cover."""
    if not profile or not normals:
        return []
    warnings = []
    levels = [p["liver_hu"] for p in normals if _finite(p.get("liver_hu"))]
    spreads = [p["liver_spread_hu"] for p in normals if _finite(p.get("liver_spread_hu"))]
    level, spread = profile.get("liver_hu"), profile.get("liver_spread_hu")
    if levels and _finite(level):
        tolerance = max(HU_TOLERANCE, 3.0 * float(np.median(spreads))) if spreads else HU_TOLERANCE
        low, high = min(levels), max(levels)
        if not low - tolerance <= level <= high + tolerance:
            warnings.append(
                f"the liver reads {level:.0f} HU, the training normals {_range(low, high)} HU: another contrast phase or "
                f"HU calibration, so the whole liver may score as abnormal; read the map with care"
            )
    if spreads and _finite(spread) and spread > SPREAD_FACTOR * max(spreads):
        warnings.append(
            f"the liver's noise is {spread:.0f} HU (robust spread), above {SPREAD_FACTOR:g}× the training normals' "
            f"({_range(min(spreads), max(spreads))} HU): another dose, kernel or slice thickness"
        )
    for axis, name in ((slice(0, 2), "in-plane pixel"), (slice(2, 3), "slice")):
        values = [v for p in normals for v in p.get("spacing_mm", [])[axis]]
        mine = profile.get("spacing_mm", [])[axis]
        if values and mine and not all(min(values) / SPACING_FACTOR <= v <= max(values) * SPACING_FACTOR for v in mine):
            warnings.append(
                f"{name} spacing {' × '.join(f'{v:.2g}' for v in mine)} mm, the training normals "
                f"{_range(min(values), max(values), '.2g')} mm"
            )
    extents = [p["liver_extent_mm"] for p in normals if _finite(p.get("liver_extent_mm"))]
    extent = profile.get("liver_extent_mm")
    if extents and _finite(extent) and extent < EXTENT_FRACTION * min(extents):
        warnings.append(
            f"the liver spans {extent:.0f} mm along the body axis, under half the training normals' "
            f"({min(extents):.0f} mm or more): a partial field of view or a partial liver mask"
        )
    return warnings


def flagged_liver_warning(label_map: np.ndarray, roi: np.ndarray) -> str | None:
    """A warning when most of the liver is flagged: tumour burden that high is rare, a scan unlike the normals is not."""
    liver = int(np.count_nonzero(roi))
    share = np.count_nonzero((label_map > 0) & (roi > 0)) / liver if liver else 0.0
    if share <= FLAGGED_LIVER_FRACTION:
        return None
    return (
        f"{share:.0%} of the liver is flagged: if the scan differs from the training normals (contrast phase, "
        f"scanner, reconstruction), the scores are not comparable; check the scan before reading the regions"
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _range(low: float, high: float, fmt: str = ".0f") -> str:
    return f"{low:{fmt}}" if f"{low:{fmt}}" == f"{high:{fmt}}" else f"{low:{fmt}}–{high:{fmt}}"


class CalibratedSummaryd(MapTransform):
    """Adds to ``summary_key`` (``AnomalyOutputsd``'s summary) what the model's normals say about the scan:
    ``study_score`` (its highest slice score), conformal ``p_value`` of it, ``slice_p_values`` and each lesion's
    ``p_value`` (None without conformal calibration), and ``warnings`` (``profile_warnings`` of
    ``profile_key``'s ``ScanProfile`` and ``flagged_liver_warning`` of the label map ``keys`` in ``roi_key``)."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        roi_key: str = "roi_source",
        conformal: Mapping[str, Any] | None = None,
        normal_profiles: Sequence[Mapping[str, Any]] = (),
        profile_key: str = "scan_profile",
        summary_key: str = "anomaly_summary",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.roi_key, self.profile_key, self.summary_key = roi_key, profile_key, summary_key
        self.conformal = dict(conformal) if conformal and conformal.get("study") else None
        self.normal_profiles = list(normal_profiles)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            summary = dict(d[self.summary_key])
            scores = np.array([np.nan if s is None else s for s in summary["slice_scores"]], dtype=np.float64)
            study_score = float(np.nanmax(scores)) if np.isfinite(scores).any() else None
            summary["study_score"] = study_score
            if self.conformal is not None:
                p = conformal_p_values(scores, self.conformal["study"])
                summary["p_value"] = conformal_p_value(study_score, self.conformal["study"])
                summary["slice_p_values"] = [None if not np.isfinite(v) else float(v) for v in p]
                summary["lesions"] = [
                    {**lesion, "p_value": conformal_p_value(lesion["peak_score"], self.conformal["region"])}
                    for lesion in summary["lesions"]
                ]
                summary["conformal"] = {"n_calibration_scans": len(self.conformal["study"])}
            else:
                summary["p_value"] = None
            warnings = profile_warnings(d.get(self.profile_key), self.normal_profiles)
            flagged = flagged_liver_warning(torch.as_tensor(d[key]).cpu().numpy()[0], torch.as_tensor(d[self.roi_key]).cpu().numpy()[0])
            summary["warnings"] = warnings + ([flagged] if flagged else [])
            if d.get(self.profile_key):
                summary["scan_profile"] = d[self.profile_key]
            d[self.summary_key] = summary
        return d
