"""GANomaly: encoder–decoder–encoder adversarial reconstruction, scored by the latent distance."""

from monai_ad.detectors.ganomaly.detector import GANomaly, padded_size

__all__ = ["GANomaly", "padded_size"]
