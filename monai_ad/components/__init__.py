"""The layer every detector and ``monai_ad.synthesis`` build on; it imports nothing from either.

- ``cpu_threads``: small memory-bound loops on one CPU thread (``single_cpu_thread``).
- ``autocast``: bf16 autocast on CUDA, float32 elsewhere (``cuda_autocast``, the ``Autocast`` mixin).
- ``smoothing``: Gaussian smoothing on the device (``gaussian_blur2d``, ``GaussianBlur2d``, ``smooth_inside``).
- ``maps``: patch grids to pixel maps (``PatchScoreMap``), slice scores inside the ROI (``max_in_roi``, ...).
- ``patch_features``: frozen-backbone patch features (``PatchEmbedding``, ``PatchFeatures``, ``greedy_coreset``).
- ``training_loop``: the one training loop (``TrainingLoop``), ``gather_slices``, ``index_stream``,
  ``FrozenFeatureTrainer``.
"""
