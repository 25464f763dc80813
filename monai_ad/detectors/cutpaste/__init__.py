"""CutPaste: a self-supervised classifier of CutPaste augmentations and a Gaussian density of its embeddings."""

from monai_ad.detectors.cutpaste.detector import CutPaste
from monai_ad.detectors.cutpaste.torch_model import GaussianDensity, ledoit_wolf_covariance

__all__ = ["CutPaste", "GaussianDensity", "ledoit_wolf_covariance"]
