"""Data: the synthetic CT phantom (the project's default data)."""

from monai_ad.data.phantom import PRESETS, PhantomCase, make_phantom, save_case, write_phantom_dataset

__all__ = ["PRESETS", "PhantomCase", "make_phantom", "save_case", "write_phantom_dataset"]
