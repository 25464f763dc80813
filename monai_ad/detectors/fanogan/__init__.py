"""f-AnoGAN: a WGAN-GP generator and critic, then an izi_f encoder; scored by the image and feature residuals."""

from monai_ad.detectors.fanogan.detector import FAnoGAN

__all__ = ["FAnoGAN"]
