"""Study-level triage: score many studies with one model and rank them by abnormality.

``triage`` reads every study through the streaming ``monai_ad.prediction.infer`` (prefetching; its share of
the studies per process under torchrun) and writes a worklist, most abnormal first: ranked by the conformal
p-value of the study score when the model has conformal calibration, ties (and every study when it has none)
by the study score, the scan's highest slice score. A study that cannot be read is a row with its one-line
reason; the others go on. The worklist is written as CSV, JSON and one self-contained HTML page (each study's
most abnormal slice with its overlay embedded as a PNG), all three or none.

Studies come from a folder (``monai_ad.cli.options.volumes_in``: volume files or DICOM series folders, liver
masks matched by name) or a DICOMweb root: every CT series that QIDO-RS lists is retrieved (WADO-RS) into a
temporary folder one at a time, while the previous one is scored, and its liver mask is
``<roi folder>/<SeriesInstanceUID>.nii.gz`` (the app's ``roi_dir`` convention).

The MONAI Label app's ``most_abnormal`` next-sample strategy scores studies with ``score_studies`` and orders
them with ``rank_rows``, so it hands studies out in the order of this worklist.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from monai_ad import distributed
from monai_ad.errors import InputError
from monai_ad.prediction import SOURCE, Predictor, VolumeResult, infer
from monai_ad.postprocess import axial_axis

OK = "ok"
TOP_SLICES = 3  # slice indices listed per study
PICTURE_SLICES = 4  # slices in ``infer``'s picture of a scan
FAILURE = "triage_failure"  # a study's one-line reason, carried from ``prepare`` to ``finish``
COLUMNS = ("rank", "study", "study_score", "p_value", "top_slices", "lesion_count", "largest_lesion_mm3",
           "largest_lesion_diameter_mm", "status")  # fmt: skip


def one_line(exc: BaseException) -> str:
    """An error as one line: an ``InputError`` as it reads, anything else with its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}".rstrip(": ")


class StudyPredictor(Predictor):
    """A ``Predictor`` for a worklist: a study that fails (unreadable, no liver in its mask, ...) gives a result
    whose summary holds ``status`` (the one-line reason) instead of stopping the run. Images may also be
    ``RemoteSeries``, retrieved when they are prepared (in the prefetching thread) and removed once read."""

    def prepare(self, image: Any, roi: Any, timings: dict[str, float] | None = None, keep_inputs: bool = False) -> dict[str, Any]:
        source = {"image": str(image), "roi": str(roi)}
        try:
            if isinstance(image, RemoteSeries):
                with tempfile.TemporaryDirectory(prefix="monai_ad_series_") as folder:
                    data = super().prepare(image.retrieve(folder), roi, timings, keep_inputs)
            else:
                data = super().prepare(image, roi, timings, keep_inputs)
        except Exception as exc:  # this study's row says why; the others go on
            return {FAILURE: one_line(exc), SOURCE: source}
        data[SOURCE] = source
        return data

    def finish(self, data: dict[str, Any], output_dir=None, name: str | None = None, timings=None) -> VolumeResult:
        name = name or Path(data[SOURCE]["image"]).name
        if FAILURE not in data:
            try:
                return super().finish(data, output_dir, name, timings)
            except Exception as exc:
                data = {FAILURE: one_line(exc), SOURCE: data[SOURCE]}
        return VolumeResult(name, None, None, None, {"case": name, **data[SOURCE], "status": data[FAILURE]})


class RemoteSeries(os.PathLike):
    """One CT series of a DICOMweb store, retrieved only when it is read; its name is its SeriesInstanceUID."""

    def __init__(self, url: str, study_uid: str, series_uid: str):
        self.url, self.study_uid, self.series_uid = url.rstrip("/"), study_uid, series_uid

    def __fspath__(self) -> str:
        return self.series_uid

    def __str__(self) -> str:
        return f"{self.url}/studies/{self.study_uid}/series/{self.series_uid}"

    def retrieve(self, folder: str | os.PathLike) -> Path:
        """WADO-RS: the series' instances into ``folder``; returns it."""
        from dicomweb_client.api import DICOMwebClient

        try:
            datasets = DICOMwebClient(url=self.url).retrieve_series(self.study_uid, self.series_uid)
        except Exception as exc:
            raise InputError(f"retrieving the series failed ({type(exc).__name__}: {str(exc)[:200]})", str(self)) from None
        for i, ds in enumerate(datasets):
            ds.save_as(str(Path(folder) / f"{i:05d}.dcm"), write_like_original=False)
        return Path(folder)


def remote_series(url: str) -> list[RemoteSeries]:
    """QIDO-RS: every CT series of the DICOMweb store at ``url``, in the store's order."""
    from dicomweb_client.api import DICOMwebClient

    try:
        found = DICOMwebClient(url=url.rstrip("/")).search_for_series(search_filters={"Modality": "CT"})
    except Exception as exc:
        raise InputError(f"listing the store's series failed ({type(exc).__name__}: {str(exc)[:200]})", url) from None
    value = lambda item, tag: str((item.get(tag, {}).get("Value") or [""])[0])  # noqa: E731  (DICOM JSON)
    series = [RemoteSeries(url, value(item, "0020000D"), value(item, "0020000E")) for item in found]
    series = [s for s in series if s.study_uid and s.series_uid]
    if not series:
        raise InputError("the DICOMweb store lists no CT series", url)
    return series


def remote_rois(series: Sequence[RemoteSeries], roi: str | os.PathLike | None) -> list[Path | None]:
    """Each series' liver mask ``<roi>/<SeriesInstanceUID>.nii[.gz]`` (None where there is none: that study's
    row says so); a single mask file serves every series."""
    from monai_ad.io import VOLUME_SUFFIXES

    if roi is None:
        return [None] * len(series)
    roi = Path(roi)
    if roi.is_file():
        return [roi] * len(series)
    if not roi.is_dir():
        raise InputError("not found", roi)
    found = []
    for s in series:
        candidates = [roi / f"{s.series_uid}{suffix}" for suffix in VOLUME_SUFFIXES]
        found.append(next((c for c in candidates if c.is_file()), None))
    return found


# ----------------------------------------------------------------------------- one study's row
def top_slices(summary: dict[str, Any], k: int = TOP_SLICES) -> list[int]:
    from monai_ad.report import select_most_abnormal

    scored = [(summary.get("case"), z, s) for z, s in enumerate(summary.get("slice_scores") or [])]
    return [int(z) for _, z, _ in select_most_abnormal(scored, k=k)]


def study_row(summary: dict[str, Any], picture: str | None = None) -> dict[str, Any]:
    """The worklist row of one study's summary (``status`` ``ok``, or the reason it failed)."""
    status = summary.get("status", OK)
    row = {"rank": None, "study": summary.get("case"), "study_score": None, "p_value": None, "top_slices": [],
           "lesion_count": None, "largest_lesion_mm3": None, "largest_lesion_diameter_mm": None, "status": status,
           "image": summary.get("image"), "picture": picture}  # fmt: skip
    if status != OK:
        return row
    lesions = summary.get("lesions") or []
    largest = max(lesions, key=lambda lesion: lesion.get("volume_mm3") or 0.0, default=None)
    row.update(
        study_score=summary.get("study_score"),
        p_value=summary.get("p_value"),
        top_slices=top_slices(summary),
        lesion_count=len(lesions),
        largest_lesion_mm3=None if largest is None else largest.get("volume_mm3"),
        largest_lesion_diameter_mm=None if largest is None else largest.get("max_diameter_mm"),
    )
    return row


def rank_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most abnormal first: by p-value (smaller first) where there is one, then by study score (larger first);
    failed studies last. ``rank`` counts from 1."""

    def key(row):
        failed = row["status"] != OK or row["study_score"] is None
        p_value = row["p_value"] if row["p_value"] is not None else math.inf
        return failed, p_value, -(row["study_score"] or 0.0), str(row["study"])

    ranked = [dict(row) for row in sorted(rows, key=key)]
    for i, row in enumerate(ranked, 1):
        row["rank"] = i
    return ranked


# ----------------------------------------------------------------------------- pictures
def top_slice_montage(result: VolumeResult, window: Callable[[np.ndarray], np.ndarray], k: int) -> list:
    """``result``'s ``k`` most abnormal slices (at least two apart) as montage items: the windowed image, the
    heatmap, the label map's outline, zoomed to the liver. ``result`` must hold its arrays and inputs."""
    import nibabel as nib

    from monai_ad.report import MontageItem, select_most_abnormal

    axis = axial_axis(result.affine)
    axcodes = tuple(c for i, c in enumerate(nib.aff2axcodes(result.affine)) if i != axis)
    scored = [(result.case, z, s) for z, s in enumerate(result.summary.get("slice_scores") or [])]
    image = window(result.image)
    items = []
    for _, z, score in select_most_abnormal(scored, k=k, min_gap=2):
        take = lambda volume: np.take(volume, z, axis=axis)  # noqa: E731
        items.append(MontageItem(image=take(image), heatmap=take(result.heatmap), gt=None, pred=take(result.label_map > 0),
                                 title=f"{result.case}  z={z}  score {score:.3g}", roi=take(result.roi), axcodes=axcodes))  # fmt: skip
    return items


def hu_window(predictor: Predictor) -> Callable[[np.ndarray], np.ndarray]:
    """The predictor's display window: HU to [0, 1]."""
    import torch

    from monai_ad.transforms.array import HUWindow

    window = HUWindow(predictor.config.window)
    return lambda array: window(torch.from_numpy(np.asarray(array, dtype=np.float32))).numpy()


def write_scan_picture(result: VolumeResult, path: str | os.PathLike, window: Callable, k: int = PICTURE_SLICES) -> Path | None:
    """The picture of an unlabelled scan: its most abnormal slices with overlays (None when no slice was scored)."""
    from monai_ad.report import render_montage

    montage = top_slice_montage(result, window, k)
    return render_montage(path, montage, title=f"{result.case}: most abnormal slices") if montage else None


def thumbnail(result: VolumeResult, window: Callable) -> str | None:
    """The most abnormal slice with its overlay, as a base64 PNG."""
    from monai_ad.report import montage_png

    montage = top_slice_montage(result, window, 1)
    return base64.b64encode(montage_png(montage, width_in=4.0)).decode("ascii") if montage else None


# ----------------------------------------------------------------------------- scoring and the worklist
def score_studies(
    predictor: StudyPredictor,
    images: Sequence[Any],
    rois: Sequence[Any],
    output_dir: str | os.PathLike | None = None,
    pictures: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every study's worklist row (unranked), streaming; under torchrun every process gets all rows."""
    window = hu_window(predictor)
    pictures_by_case: dict[str, str | None] = {}

    def draw(result: VolumeResult) -> None:
        if result.summary.get("status", OK) == OK:
            try:
                pictures_by_case[result.case] = thumbnail(result, window)
            except Exception:  # a picture that cannot be drawn leaves the row without one, not the study out
                pictures_by_case[result.case] = None

    results = infer(predictor, images, rois, output_dir, progress=progress, on_result=draw if pictures else None)
    rows = [study_row(r.summary, pictures_by_case.get(r.case)) for r in results]
    if distributed.is_distributed():
        import torch.distributed as dist

        gathered: list[list[dict[str, Any]]] = [[] for _ in range(distributed.world_size())]
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    return rows


def triage(
    predictor: StudyPredictor, images: Sequence[Any], rois: Sequence[Any], output_dir: str | os.PathLike, progress: bool = True
) -> dict[str, Any]:
    """Score the studies, write the worklist (``worklist.csv``, ``.json``, ``.html``; each study's heatmap, label
    map and summary under ``studies/``); returns ``{"rows": [...], "files": {...}}`` (files on the main process)."""
    out = Path(output_dir)
    rows = rank_rows(score_studies(predictor, images, rois, out / "studies", progress=progress))
    files = {}
    if distributed.is_main_process():
        files = write_worklist(rows, out, title=f"{predictor.detector.name}: {len(rows)} studies")
    return {"rows": rows, "files": files}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def write_worklist(rows: Sequence[dict[str, Any]], output_dir: str | os.PathLike, title: str = "worklist") -> dict[str, str]:
    """CSV, JSON and HTML of ranked rows, all three or none (the JSON is the set's record)."""
    from monai_ad.io import atomic_paths

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "worklist.csv", "html": out / "worklist.html", "json": out / "worklist.json"}
    with atomic_paths(paths) as tmp:
        with open(tmp["csv"], "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerows([_cell(row[c]) for c in COLUMNS] for row in rows)
        tmp["html"].write_text(worklist_html(rows, title))
        records = [{key: row[key] for key in (*COLUMNS, "image")} for row in rows]
        tmp["json"].write_text(json.dumps({"title": title, "studies": records}, indent=2, allow_nan=False) + "\n")
    return {kind: str(path) for kind, path in paths.items()}


def worklist_html(rows: Sequence[dict[str, Any]], title: str) -> str:
    """One page, no external assets: the table, each study's most abnormal slice embedded."""
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in (*COLUMNS, "most abnormal slice"))
    body = io.StringIO()
    for row in rows:
        cells = "".join(f"<td>{html.escape(_cell(row[c]))}</td>" for c in COLUMNS)
        picture = f'<img alt="{html.escape(str(row["study"]))}" src="data:image/png;base64,{row["picture"]}">' if row.get("picture") else ""
        status = "ok" if row["status"] == OK else "failed"
        body.write(f'<tr class="{status}">{cells}<td>{picture}</td></tr>\n')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}"
        "tr.failed{color:#a00}img{width:320px}"
        f"</style></head><body><h1>{html.escape(title)}</h1>"
        "<p>Most abnormal first: by the conformal p-value of the study score where the model is calibrated, "
        "then by the study score. Slices in the radiological view (anterior up, the patient's right on the left).</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>\n{body.getvalue()}</tbody></table></body></html>\n"
    )
