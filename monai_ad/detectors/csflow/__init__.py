"""CS-Flow: one normalising flow over the feature maps of the slice at three scales."""

from monai_ad.detectors.csflow.detector import CSFlow, mean_in_roi

__all__ = ["CSFlow", "mean_in_roi"]
