"""monai_ad: unsupervised anomaly detection in 3-D medical images, built on MONAI."""

__version__ = "0.1.0"
