"""CFA: patch features adapted to gather in small hyperspheres around a memory bank of normal features."""

from monai_ad.detectors.cfa.detector import CFA

__all__ = ["CFA"]
