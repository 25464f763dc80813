"""SimpleNet: a discriminator that tells adapted normal patch features from noise-perturbed ones."""

from monai_ad.detectors.simplenet.detector import SimpleNet

__all__ = ["SimpleNet"]
