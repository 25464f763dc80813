"""From a heatmap in the scan's geometry to what a radiologist reads: abnormal slices, a label map, lesions."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

ANOMALY_LABEL = 1
MIN_LESION_MM3 = 20.0  # smallest region kept in a label map by default (the CLI, bundles and app use it too)
HEATMAP_CHANNEL, SLICE_SCORE_CHANNEL = 0, 1  # the inferer's output channels


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis of an image that runs most nearly along the world superior-inferior axis."""
    rot = np.asarray(affine, dtype=float)[:3, :3]
    direction = rot / np.linalg.norm(rot, axis=0, keepdims=True)
    return int(np.argmax(np.abs(direction[2])))


def voxel_volume_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])))


def label_lesions(
    heatmap: np.ndarray,
    affine: np.ndarray,
    threshold: float,
    min_volume_mm3: float = MIN_LESION_MM3,
    roi: np.ndarray | None = None,
    extent_threshold: float | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Threshold → 3-D connected components (26-connectivity) → drop those under ``min_volume_mm3``.

    With ``extent_threshold`` (below ``threshold``) the threshold is a double one (hysteresis): a region is the
    connected set of voxels at or above ``extent_threshold`` around voxels at or above ``threshold``, so a lesion
    found by its core is outlined where its scores fall back to normal, and regions with no core are dropped.

    Returns the label map (uint8, ``ANOMALY_LABEL`` = 1 for anomaly) and the lesions, largest first, each with
    its centroid in world coordinates (mm, the affine's space), voxel centroid, volume in mm³, largest diameter
    (mm, edge to edge), peak score and the range of voxel indices along the axial axis.
    """
    extent = threshold if extent_threshold is None else min(float(extent_threshold), threshold)
    above = heatmap >= extent
    if roi is not None:
        above &= roi > 0
    label_map = np.zeros(heatmap.shape, dtype=np.uint8, order="F")  # NIfTI's order: written without a transpose
    box = bounding_box(above)
    if box is None:
        return label_map, []
    # everything below runs on the bounding box of the voxels above threshold, not on the whole scan
    offset = np.array([b.start for b in box], dtype=float)
    above, heat = above[box], heatmap[box]
    components, n = ndimage.label(above, structure=np.ones((3, 3, 3), dtype=bool))
    voxel_mm3 = voxel_volume_mm3(affine)
    index = np.arange(1, n + 1)
    voxels = np.nonzero(above)  # per-component statistics from the voxels above threshold only
    member = components[voxels]
    counts = np.bincount(member, minlength=n + 1)[1:]
    peaks = np.full(n + 1, -np.inf)
    np.maximum.at(peaks, member, heat[voxels])
    peaks = peaks[1:]
    sums = np.stack([np.bincount(member, weights=v, minlength=n + 1)[1:] for v in voxels], axis=1)
    centroids = sums / counts[:, None] + offset
    local_map = label_map[box]  # a view: writing it writes the label map
    axis = axial_axis(affine)
    lesions = []
    for i, count, peak, centroid, local in zip(index, counts, peaks, centroids, ndimage.find_objects(components)):
        volume = float(count) * voxel_mm3
        if volume < min_volume_mm3 or peak < threshold:
            continue
        member_voxels = components[local] == i
        local_map[local][member_voxels] = ANOMALY_LABEL
        corner = offset + np.array([b.start for b in local], dtype=float)
        first, last = local[axis].start + box[axis].start, local[axis].stop - 1 + box[axis].start
        world = np.asarray(affine, dtype=float) @ np.append(np.asarray(centroid, dtype=float), 1.0)
        lesions.append(
            {
                "centroid_mm": [round(float(v), 3) for v in world[:3]],
                "centroid_voxel": [round(float(v), 2) for v in centroid],
                "volume_mm3": round(volume, 3),
                "max_diameter_mm": round(max_diameter_mm(np.argwhere(member_voxels) + corner, affine), 2),
                "peak_score": float(peak),
                "slices": [int(first), int(last)],
            }
        )
    lesions.sort(key=lambda lesion: -lesion["volume_mm3"])
    for rank, lesion in enumerate(lesions, start=1):
        lesion["id"] = rank
    return label_map, lesions


def farthest_pair(points: np.ndarray) -> tuple[int, int]:
    """Indices of the two points (``[N, d]``, N >= 2) farthest apart; they are vertices of the points' convex hull.
    Points all in one plane or line (no hull) are searched whole, or, beyond 1500 of them, through their extremes
    along the axes and diagonals (the ends of a line or a flat region's outline)."""
    candidates = np.arange(len(points))
    if len(points) > points.shape[1]:
        try:
            candidates = ConvexHull(points).vertices
        except QhullError:
            pass
    if len(candidates) > 1500:
        d = points.shape[1]
        grid = np.stack(np.meshgrid(*[(-1, 0, 1)] * d, indexing="ij"), -1).reshape(-1, d)
        directions = grid[[tuple(v) > (0,) * d for v in grid[:, ::-1]]].astype(float)  # one of each opposite pair
        projections = points[candidates] @ directions.T
        candidates = candidates[np.unique(np.concatenate([projections.argmin(0), projections.argmax(0)]))]
    best = int(np.argmax(pdist(points[candidates])))
    first, second = (index[best] for index in np.triu_indices(len(candidates), 1))
    return int(candidates[first]), int(candidates[second])


def max_diameter_mm(voxels: np.ndarray, affine: np.ndarray) -> float:
    """The largest distance across a region (``voxels``: its ``[N, 3]`` voxel indices), in mm, edge to edge:
    the farthest pair of voxel centres plus the width of one voxel along that line."""
    world = np.asarray(voxels, dtype=float) @ np.asarray(affine, dtype=float)[:3, :3].T
    direction, length = np.array([1.0, 0.0, 0.0]), 0.0
    if len(world) >= 2:
        a, b = farthest_pair(world)
        length = float(np.linalg.norm(world[b] - world[a]))
        if length > 0:
            direction = (world[b] - world[a]) / length
    voxel_width = float(np.abs(direction @ np.asarray(affine, dtype=float)[:3, :3]).sum())
    return length + voxel_width


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every true voxel of ``mask`` (None when there is none)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def abnormal_slices(slice_scores: Sequence[float | None], threshold: float) -> list[int]:
    return [i for i, s in enumerate(slice_scores) if s is not None and np.isfinite(s) and s >= threshold]


def slice_scores_along_axis(slice_channel: np.ndarray, roi: np.ndarray, axis: int) -> list[float | None]:
    """Per slice of the scan's axial axis: the slice score carried by the inferer's slice channel (constant
    over a scored slice), or None where the slice holds no ROI or was not scored."""
    scores: list[float | None] = [None] * slice_channel.shape[axis]
    box = bounding_box(roi > 0)
    if box is None:
        return scores
    channel, mask = np.moveaxis(slice_channel[box], axis, 0), np.moveaxis(roi[box] > 0, axis, 0)
    with np.errstate(invalid="ignore"):
        highest = np.where(mask & np.isfinite(channel), channel, -np.inf).max(axis=(1, 2))
    for index, value in zip(range(box[axis].start, box[axis].stop), highest):
        scores[index] = float(value) if np.isfinite(value) else None
    return scores


class AnomalyOutputsd(MapTransform):
    """The inferer's output in the scan's geometry (``[heatmap, slice scores]`` after ``Invertd``) → what a
    reader uses: ``heatmap_key`` (float heatmap), ``keys`` replaced by the label map (uint8, 1 = anomaly) and
    ``summary_key``: per-slice scores along the scan's axial axis, abnormal slices and regions."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        roi_key: str = "roi_source",
        pixel_threshold: float = 0.0,
        slice_threshold: float = 0.0,
        min_lesion_mm3: float = MIN_LESION_MM3,
        heatmap_key: str = "heatmap",
        summary_key: str = "anomaly_summary",
        allow_missing_keys: bool = False,
        extent_threshold: float | None = None,
    ):
        super().__init__(keys, allow_missing_keys)
        self.roi_key, self.heatmap_key, self.summary_key = roi_key, heatmap_key, summary_key
        self.pixel_threshold, self.slice_threshold = float(pixel_threshold), float(slice_threshold)
        self.min_lesion_mm3 = float(min_lesion_mm3)
        self.extent_threshold = None if extent_threshold is None else min(float(extent_threshold), self.pixel_threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            affine = np.asarray(pred.affine if isinstance(pred, MetaTensor) else np.eye(4), dtype=np.float64)
            values = torch.as_tensor(pred).detach().cpu().float().numpy()
            roi = torch.as_tensor(d[self.roi_key]).cpu().numpy()[0] > 0
            heatmap = values[HEATMAP_CHANNEL]
            axis = axial_axis(affine)
            with ThreadPoolExecutor(max_workers=1) as pool:  # two independent reads of the volume, side by side
                slice_scores = pool.submit(slice_scores_along_axis, values[SLICE_SCORE_CHANNEL], roi, axis)
                label_map, lesions = label_lesions(
                    heatmap, affine, self.pixel_threshold, self.min_lesion_mm3, roi, self.extent_threshold
                )
                slice_scores = slice_scores.result()
            d[self.heatmap_key] = _like(pred, heatmap[None].astype(np.float32, copy=False))
            d[key] = _like(pred, label_map[None])
            d[self.summary_key] = {
                "shape": list(heatmap.shape),
                "spacing_mm": [round(float(v), 6) for v in np.linalg.norm(affine[:3, :3], axis=0)],
                "axial_axis": axis,
                "thresholds": {"pixel": self.pixel_threshold, "slice": self.slice_threshold, "extent": self.extent_threshold},
                "slice_scores": slice_scores,
                "abnormal_slices": abnormal_slices(slice_scores, self.slice_threshold),
                "lesions": lesions,
                "coordinates": "world (mm) in the affine's space: RAS as written to the NIfTI outputs",
            }
        return d


def _like(reference: Any, array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(array)  # any memory order: no copy
    if isinstance(reference, MetaTensor):
        return MetaTensor(tensor, meta=dict(reference.meta), applied_operations=list(reference.applied_operations))
    return tensor
