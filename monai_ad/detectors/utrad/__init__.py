"""UTRAD: a U-shaped transformer reconstructs a frozen network's feature tokens; the error marks anomalies."""

from monai_ad.detectors.utrad.detector import UTRAD
from monai_ad.detectors.utrad.torch_model import UTransformer, multi_scale_map, scaled_distance, utrad_loss

__all__ = ["UTRAD", "UTransformer", "multi_scale_map", "scaled_distance", "utrad_loss"]
