"""PaDiM: a Gaussian per position of multi-level backbone embeddings, scored by Mahalanobis distance."""

from monai_ad.detectors.padim.detector import PaDiM

__all__ = ["PaDiM"]
