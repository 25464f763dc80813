"""DDAD: dual-distribution discrepancy of two autoencoder ensembles, one trained on normal slices, one also on
unlabelled ones."""

from monai_ad.detectors.ddad.detector import DDAD

__all__ = ["DDAD"]
