"""From a heatmap in the scan's geometry to what a radiologist reads: abnormal slices, a label map, lesions."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

ANOMALY_LABEL = 1


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis of an image that runs most nearly along the world superior-inferior axis."""
    rot = np.asarray(affine, dtype=float)[:3, :3]
    direction = rot / np.linalg.norm(rot, axis=0, keepdims=True)
    return int(np.argmax(np.abs(direction[2])))


def source_slice_indices(slice_affine: np.ndarray, source_affine: np.ndarray, n_slices: int) -> np.ndarray:
    """Index, along the source image's axial axis, of each axial slice of a pre-processed volume.

    Exact for any pipeline that does not resample along the slice axis: the centre of slice ``k`` is taken
    to world coordinates with the pre-processed affine and back into source voxels.
    """
    k = np.arange(n_slices, dtype=float)
    points = np.stack([np.zeros_like(k), np.zeros_like(k), k, np.ones_like(k)])
    ijk = np.linalg.inv(np.asarray(source_affine, dtype=float)) @ (np.asarray(slice_affine, dtype=float) @ points)
    return np.rint(ijk[axial_axis(source_affine)]).astype(int)


def voxel_volume_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])))


def label_lesions(
    heatmap: np.ndarray,
    affine: np.ndarray,
    threshold: float,
    min_volume_mm3: float = 20.0,
    roi: np.ndarray | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Threshold → 3-D connected components (26-connectivity) → drop those under ``min_volume_mm3``.

    Returns the label map (uint8, ``ANOMALY_LABEL`` = 1 for anomaly) and the lesions, largest first, each with
    its centroid in world coordinates (mm, the affine's space), voxel centroid, volume in mm³, peak score and
    the range of voxel indices along the axial axis.
    """
    above = heatmap >= threshold
    if roi is not None:
        above &= roi > 0
    components, n = ndimage.label(above, structure=np.ones((3, 3, 3), dtype=bool))
    label_map = np.zeros(heatmap.shape, dtype=np.uint8)
    if n == 0:
        return label_map, []
    voxel_mm3 = voxel_volume_mm3(affine)
    index = np.arange(1, n + 1)
    counts = ndimage.sum_labels(np.ones_like(components, dtype=np.int64), components, index)
    peaks = ndimage.maximum(heatmap, components, index)
    centroids = ndimage.center_of_mass(above, components, index)
    boxes = ndimage.find_objects(components)
    axis = axial_axis(affine)
    lesions = []
    for i, count, peak, centroid, box in zip(index, counts, peaks, centroids, boxes):
        volume = float(count) * voxel_mm3
        if volume < min_volume_mm3:
            continue
        label_map[box][components[box] == i] = ANOMALY_LABEL
        world = np.asarray(affine, dtype=float) @ np.append(np.asarray(centroid, dtype=float), 1.0)
        lesions.append(
            {
                "centroid_mm": [round(float(v), 3) for v in world[:3]],
                "centroid_voxel": [round(float(v), 2) for v in centroid],
                "volume_mm3": round(volume, 3),
                "peak_score": float(peak),
                "slices": [int(box[axis].start), int(box[axis].stop - 1)],
            }
        )
    lesions.sort(key=lambda lesion: -lesion["volume_mm3"])
    for rank, lesion in enumerate(lesions, start=1):
        lesion["id"] = rank
    return label_map, lesions


def abnormal_slices(slice_scores: Sequence[float | None], threshold: float) -> list[int]:
    return [i for i, s in enumerate(slice_scores) if s is not None and np.isfinite(s) and s >= threshold]
