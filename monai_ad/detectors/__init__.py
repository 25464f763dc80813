"""Anomaly detectors behind one interface (``AnomalyDetector``), registered by name."""

from monai_ad.detectors.base import (
    DETECTORS,
    AnomalyDetector,
    SliceScores,
    available_detectors,
    constructor_arguments,
    create_detector,
    iter_slice_batches,
    register_detector,
)
from monai_ad.detectors.cfa import CFA
from monai_ad.detectors.cflow import CFLOW  # noqa: F401  (registers "cflow")
from monai_ad.detectors.clip_reconstruction import CLIPReconstruction  # noqa: F401  (registers it)
from monai_ad.detectors.csflow import CSFlow  # noqa: F401  (registers "csflow")
from monai_ad.detectors.cutpaste import CutPaste  # noqa: F401  (registers "cutpaste")
from monai_ad.detectors.ddad import DDAD  # noqa: F401  (registers "ddad")
from monai_ad.detectors.deepsvdd import DeepSVDD  # noqa: F401  (registers "deepsvdd")
from monai_ad.detectors.draem import DRAEM  # noqa: F401  (registers "draem")
from monai_ad.detectors.density import PlainDensity
from monai_ad.detectors.dpa import DeepPerceptualAutoencoder  # noqa: F401  (registers "dpa")
from monai_ad.detectors.fanogan import FAnoGAN  # noqa: F401  (registers "fanogan")
from monai_ad.detectors.fused import DensityFused
from monai_ad.detectors.ganomaly import GANomaly  # noqa: F401  (registers "ganomaly")
from monai_ad.detectors.intensity import IntensityDeviation
from monai_ad.detectors.mkd import MKD  # noqa: F401  (registers "mkd")
from monai_ad.detectors.padim import PaDiM
from monai_ad.detectors.patchcore import PatchCore
from monai_ad.detectors.rd4ad import RD4AD
from monai_ad.detectors.simplenet import SimpleNet
from monai_ad.detectors.stfpm import STFPM
from monai_ad.detectors.synthetic_anomaly import SyntheticAnomaly  # noqa: F401  (registers "synthetic_anomaly")
from monai_ad.detectors.utrad import UTRAD  # noqa: F401  (registers "utrad")
from monai_ad.detectors.winclip import WinCLIP  # noqa: F401  (registers it)

__all__ = [
    "DETECTORS",
    "AnomalyDetector",
    "CFA",
    "DensityFused",
    "IntensityDeviation",
    "PaDiM",
    "PlainDensity",
    "PatchCore",
    "RD4AD",
    "STFPM",
    "SimpleNet",
    "SliceScores",
    "available_detectors",
    "constructor_arguments",
    "create_detector",
    "iter_slice_batches",
    "register_detector",
]
