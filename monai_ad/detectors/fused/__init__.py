"""A feature detector's map and the intensity map, added on one scale of rarity."""

from monai_ad.detectors.fused.detector import DensityFused, log_beyond

__all__ = ["DensityFused", "log_beyond"]
