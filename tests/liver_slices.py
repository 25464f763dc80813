"""Synthetic liver-like 2-D slices shared by the detector tests (an import helper, not a test module)."""

import functools

import numpy as np
import torch
from scipy import ndimage


def _as_tensor(arrays, dtype):
    return torch.as_tensor(np.stack(arrays)[:, None], dtype=dtype)


# per kind: centre jitter (px), texture blur (px), texture amplitude, texture scale (None: its own std),
# bright round blobs ('vessels'), lesion value, lesion offset and radius range (fractions of the size)
KINDS = {
    "textured": dict(jitter=2, blur=1.5, amplitude=0.03, scale=None, vessels=4, lesion_value=0.42,
                     offset=0.12, radius=(0.06, 0.1)),
    # as "textured", outside the ROI filled with the liver's typical value (the pipeline's ``outside_fill: liver``)
    "textured_filled": dict(jitter=2, blur=1.5, amplitude=0.03, scale=None, vessels=4, lesion_value=0.42,
                            offset=0.12, radius=(0.06, 0.1), outside=0.6),
    "smooth": dict(jitter=1, blur=6, amplitude=0.05, scale=0.02, vessels=0, lesion_value=0.3,
                   offset=0.15, radius=(0.08, 0.12)),
}  # fmt: skip


def liver_like_slices(kind: str, n: int, seed: int, lesion: bool, size: int):
    """Liver-like slices of ``kind`` (``KINDS``): a disc (the ROI; outside it 0, or the kind's ``outside``) at about 0.6 with a texture and
    optional bright blobs; optionally one darker round lesion. Returns image, roi, lesion mask."""
    k = KINDS[kind]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, rois, lesions = [], [], []
    for _ in range(n):
        cx, cy = size / 2 + rng.normal(0, k["jitter"]), size / 2 + rng.normal(0, k["jitter"])
        roi = (xx - cx) ** 2 + (yy - cy) ** 2 < (0.4 * size) ** 2
        texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), k["blur"])
        img = 0.6 + k["amplitude"] * texture / (k["scale"] or texture.std())
        for _ in range(k["vessels"]):
            bx, by = cx + rng.uniform(-0.3, 0.3) * size, cy + rng.uniform(-0.3, 0.3) * size
            img = np.where((xx - bx) ** 2 + (yy - by) ** 2 < rng.uniform(1.5, 3.0) ** 2, 0.8, img)
        mask = np.zeros_like(roi)
        if lesion:
            lx = cx + rng.uniform(-k["offset"], k["offset"]) * size
            ly = cy + rng.uniform(-k["offset"], k["offset"]) * size
            mask = (xx - lx) ** 2 + (yy - ly) ** 2 < (rng.uniform(*k["radius"]) * size) ** 2
            img = np.where(mask, k["lesion_value"], img)
        images.append(np.where(roi, img, k.get("outside", 0.0)))
        rois.append(roi)
        lesions.append(mask & roi)
    return _as_tensor(images, torch.float32), _as_tensor(rois, torch.bool), np.stack(lesions)


def synthetic_slices(n: int, seed: int, lesion: bool = False, size: int = 96):
    """Textured liver-like slices with a few bright round 'vessels' (``liver_like_slices``)."""
    return liver_like_slices("textured", n, seed, lesion, size)


def smooth_slices(n: int, seed: int, lesion: bool = False, size: int = 32):
    """Liver-like slices with smooth low-frequency shading and a sharp-edged dark lesion (``liver_like_slices``)."""
    return liver_like_slices("smooth", n, seed, lesion, size)


@functools.cache
def slice_data(kind: str, size: int) -> dict:
    """The standard split: 24 training normals (three batches of 8), 6 held-out normals (seed 1) and 6 slices
    with a lesion (seed 2). ``kind`` is a ``KINDS`` key: "textured" (``synthetic_slices``), "textured_filled" or "smooth" (``smooth_slices``).
    Cached: treat the tensors as read-only."""
    train_img, train_roi, _ = liver_like_slices(kind, 24, seed=0, lesion=False, size=size)
    normal_img, normal_roi, _ = liver_like_slices(kind, 6, seed=1, lesion=False, size=size)
    ab_img, ab_roi, ab_mask = liver_like_slices(kind, 6, seed=2, lesion=True, size=size)
    batches = [{"image": train_img[i : i + 8], "roi": train_roi[i : i + 8]} for i in range(0, 24, 8)]
    return {"train": batches, "normal": (normal_img, normal_roi), "abnormal": (ab_img, ab_roi, ab_mask)}
