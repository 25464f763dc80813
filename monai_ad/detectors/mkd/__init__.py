"""MKD: multiresolution knowledge distillation from a frozen VGG16 into a thinner cloner, with a gradient map."""

from monai_ad.detectors.mkd.detector import MKD

__all__ = ["MKD"]
