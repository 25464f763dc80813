"""Networks shared by detectors: frozen pretrained feature extractors."""

from monai_ad.networks.backbones import BACKBONES, DEFAULT_LAYERS, FeatureExtractor, build_backbone, build_student

__all__ = ["BACKBONES", "DEFAULT_LAYERS", "FeatureExtractor", "build_backbone", "build_student"]
