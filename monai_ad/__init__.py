"""monai_ad: unsupervised anomaly detection in 3-D medical images, built on MONAI."""

__version__ = "0.1.0"

# the detector the command line, the demo and the app start with: the best row at lesion level (lesion
# sensitivity, coverage of lesions under 10 mm) of the accuracy benchmark
# on real CT, sparse and heavy metastatic lesions (benchmarks/accuracy.py, README table)
DEFAULT_DETECTOR = "intensity"
