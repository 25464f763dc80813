"""CLIP reconstruction: image patch features rebuilt through the frozen CLIP text encoder."""

from monai_ad.detectors.clip_reconstruction.detector import CLIPReconstruction, laplacian_low_frequency_enhance

__all__ = ["CLIPReconstruction", "laplacian_low_frequency_enhance"]
