"""The plain density floor: how far the smoothed HU of each liver pixel lies from the liver's level."""

from monai_ad.detectors.density.detector import PlainDensity

__all__ = ["PlainDensity"]
