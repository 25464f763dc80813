"""STFPM: a student network trained to match a frozen teacher's feature pyramid on normal slices."""

from monai_ad.detectors.stfpm.detector import STFPM
from monai_ad.detectors.stfpm.torch_model import pyramid_matching_loss

__all__ = ["STFPM", "pyramid_matching_loss"]
