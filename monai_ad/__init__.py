"""monai_ad: unsupervised anomaly detection in 3-D medical images, built on MONAI."""

__version__ = "0.1.0"

# the detector the command line, the demo and the app start with: the best row of the accuracy benchmark
# on real CT (benchmarks/accuracy.py, README table)
DEFAULT_DETECTOR = "fused"
