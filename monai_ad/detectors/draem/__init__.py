"""DRAEM: reconstructive and discriminative sub-networks trained on Perlin-noise anomalies."""

from monai_ad.detectors.draem.detector import DRAEM

__all__ = ["DRAEM"]
