"""CFLOW-AD: conditional normalising flows on the feature vectors of single positions, per feature level."""

from monai_ad.detectors.cflow.detector import CFLOW

__all__ = ["CFLOW"]
