"""WinCLIP: zero- and few-shot anomaly maps from CLIP windows compared with normal and anomalous prompts."""

from monai_ad.detectors.winclip.detector import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATES,
    WinCLIP,
    harmonic_mean_over_windows,
)

__all__ = ["ANOMALOUS_STATES", "NORMAL_STATES", "TEMPLATES", "WinCLIP", "harmonic_mean_over_windows"]
