"""Synthetic liver-like 2-D slices shared by the detector tests (an import helper, not a test module)."""

import functools

import numpy as np
import torch
from scipy import ndimage


def _as_tensor(arrays, dtype):
    return torch.as_tensor(np.stack(arrays)[:, None], dtype=dtype)


def synthetic_slices(n: int, seed: int, lesion: bool = False, size: int = 96):
    """Liver-like slices: a smoothly textured disc (the ROI, zeros outside) with a few bright round blobs
    ('vessels'); optionally one darker round lesion. Returns image, roi, lesion mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, rois, lesions = [], [], []
    for _ in range(n):
        cx, cy = size / 2 + rng.normal(0, 2), size / 2 + rng.normal(0, 2)
        roi = (xx - cx) ** 2 + (yy - cy) ** 2 < (0.4 * size) ** 2
        texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 1.5)
        img = 0.6 + 0.03 * texture / texture.std()
        for _ in range(4):
            bx, by = cx + rng.uniform(-0.3, 0.3) * size, cy + rng.uniform(-0.3, 0.3) * size
            img = np.where((xx - bx) ** 2 + (yy - by) ** 2 < rng.uniform(1.5, 3.0) ** 2, 0.8, img)
        mask = np.zeros_like(roi)
        if lesion:
            lx, ly = cx + rng.uniform(-0.12, 0.12) * size, cy + rng.uniform(-0.12, 0.12) * size
            mask = (xx - lx) ** 2 + (yy - ly) ** 2 < (rng.uniform(0.06, 0.1) * size) ** 2
            img = np.where(mask, 0.42, img)
        images.append(np.where(roi, img, 0.0))
        rois.append(roi)
        lesions.append(mask & roi)
    return _as_tensor(images, torch.float32), _as_tensor(rois, torch.bool), np.stack(lesions)


def smooth_slices(n: int, seed: int, lesion: bool = False, size: int = 32):
    """Liver-like discs (the ROI, zeros outside) with smooth low-frequency shading; optionally one dark round
    lesion with a sharp edge. Returns image, roi, lesion mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, rois, masks = [], [], []
    for _ in range(n):
        cx, cy = size / 2 + rng.normal(0, 1), size / 2 + rng.normal(0, 1)
        roi = (xx - cx) ** 2 + (yy - cy) ** 2 < (0.4 * size) ** 2
        shading = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 6)
        img = 0.6 + 0.05 * shading / 0.02
        mask = np.zeros_like(roi)
        if lesion:
            lx, ly = cx + rng.uniform(-0.15, 0.15) * size, cy + rng.uniform(-0.15, 0.15) * size
            mask = (xx - lx) ** 2 + (yy - ly) ** 2 < (rng.uniform(0.08, 0.12) * size) ** 2
            img = np.where(mask, 0.3, img)
        images.append(np.where(roi, img, 0.0))
        rois.append(roi)
        masks.append(mask & roi)
    return _as_tensor(images, torch.float32), _as_tensor(rois, torch.bool), np.stack(masks)


@functools.cache
def slice_data(kind: str, size: int) -> dict:
    """The standard split: 24 training normals (three batches of 8), 6 held-out normals (seed 1) and 6 slices
    with a lesion (seed 2). ``kind`` is "textured" (``synthetic_slices``) or "smooth" (``smooth_slices``).
    Cached: treat the tensors as read-only."""
    make = {"textured": synthetic_slices, "smooth": smooth_slices}[kind]
    train_img, train_roi, _ = make(24, seed=0, size=size)
    normal_img, normal_roi, _ = make(6, seed=1, size=size)
    ab_img, ab_roi, ab_mask = make(6, seed=2, lesion=True, size=size)
    batches = [{"image": train_img[i : i + 8], "roi": train_roi[i : i + 8]} for i in range(0, 24, 8)]
    return {"train": batches, "normal": (normal_img, normal_roi), "abnormal": (ab_img, ab_roi, ab_mask)}
