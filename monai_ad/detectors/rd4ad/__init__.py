"""RD4AD: reverse distillation of a frozen teacher through a one-class bottleneck into a student decoder."""

from monai_ad.detectors.rd4ad.detector import RD4AD

__all__ = ["RD4AD"]
