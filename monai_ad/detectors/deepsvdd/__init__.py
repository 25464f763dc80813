"""Deep SVDD: one-class compactness of window representations around a centre."""

from monai_ad.detectors.deepsvdd.detector import DeepSVDD

__all__ = ["DeepSVDD"]
