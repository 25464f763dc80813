"""Deep perceptual autoencoder: a progressively grown autoencoder scored by a relative perceptual loss."""

from monai_ad.detectors.dpa.detector import DeepPerceptualAutoencoder, Phase, to_signed

__all__ = ["DeepPerceptualAutoencoder", "Phase", "to_signed"]
