"""A U-Net trained on normal slices to find anomalies synthesised inside the liver."""

from monai_ad.detectors.synthetic_anomaly.detector import SyntheticAnomaly

__all__ = ["SyntheticAnomaly"]
