"""PatchCore: nearest-neighbour distance of patch features to a coreset memory bank of normal patches."""

from monai_ad.detectors.patchcore.detector import PatchCore, nearest_neighbors

__all__ = ["PatchCore", "nearest_neighbors"]
