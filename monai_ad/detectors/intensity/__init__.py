"""Per-scan density rarity: how rare each liver pixel's smoothed HU is among normal livers at its depth."""

from monai_ad.detectors.intensity.detector import (
    MIN_TAIL_COUNT,
    IntensityDeviation,
    blob_contrast,
    gaussian_kernel,
    exponential_beyond_sample,
    tail_probabilities,
)

__all__ = ["MIN_TAIL_COUNT", "IntensityDeviation", "blob_contrast", "gaussian_kernel", "exponential_beyond_sample", "tail_probabilities"]
