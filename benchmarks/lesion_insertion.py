"""Liver lesions inserted into normal CT scans, for evaluation only.

Nothing here is used to train a detector. Each lesion is an ellipsoid placed inside the scan's liver mask,
measured in the scan's own geometry (mm, from its affine):

- size: equivalent diameter drawn log-uniformly from 5–80 mm (capped by what the liver leaves room for),
  axis ratios 0.8–1.25 and a random orientation;
- density: the lesion's mean is the surrounding liver's median HU plus a contrast drawn from −80…+60 HU,
  at least 15 HU away from the liver (isodense lesions are not visible on a single-phase scan to a reader
  either); the scan's own fine noise is kept and a faint smooth texture is added;
- margin: sharp (a one-voxel partial-volume ramp) or soft (a transition 3–8 mm wide);
- rim enhancement on some hypodense lesions: a ring 20–60 HU above the liver, 1.5–4 mm thick, inside the
  margin;
- several per scan (2–6 by default), not overlapping, seeded.

The label is LiTS-style: 0 background, 1 liver, 2 lesion, where the lesion is the part of the ellipsoid's
nominal surface inside the liver mask; intensities change only inside the liver mask.

Real scans are read with the project's loader (NIfTI or a DICOM series folder), re-oriented to RAS with their
organ map (no resampling, only axis order), and the organ map's geometry is checked against the image's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from monai_ad.io import save_nifti

DIAMETER_MM = (5.0, 80.0)
CONTRAST_HU = (-80.0, 60.0)
MIN_ABS_CONTRAST_HU = 15.0
N_LESIONS = (2, 6)


@dataclass
class Lesion:
    """One inserted lesion; ``measured_*`` are filled in after insertion from the label it left."""

    center_voxel: tuple[float, float, float]
    center_mm: tuple[float, float, float]  # world coordinates
    diameter_mm: float  # nominal equivalent diameter of the ellipsoid
    axes: tuple[float, float, float]  # axis ratios (product 1)
    rotation: tuple[float, ...]  # 3×3, row major
    contrast_hu: float  # lesion mean minus the surrounding liver's median
    margin: str  # "sharp" or "soft"
    margin_mm: float  # width of the transition (soft) or one voxel (sharp)
    rim_hu: float = 0.0  # rim above the liver's median (0: no rim)
    rim_mm: float = 0.0
    liver_hu: float = float("nan")  # the surrounding liver's median HU
    measured_voxels: int = 0
    measured_diameter_mm: float = 0.0


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def sample_lesions(
    liver: np.ndarray,
    affine: np.ndarray,
    rng: np.random.Generator,
    n_lesions: int,
    diameter_mm: tuple[float, float] = DIAMETER_MM,
    contrast_hu: tuple[float, float] = CONTRAST_HU,
    min_abs_contrast_hu: float = MIN_ABS_CONTRAST_HU,
    p_soft: float = 0.5,
    p_rim: float = 0.3,
    depth_fraction: float = 0.6,
    gap_mm: float = 3.0,
) -> list[Lesion]:
    """Draw ``n_lesions`` non-overlapping lesions inside ``liver`` (bool, the scan's grid).

    A centre must lie at least ``depth_fraction`` of the radius inside the liver (the scan's first and last
    slices count as its border); when no place is that deep the diameter is reduced until one is. Lesions that
    find no place after the reductions are left out (fewer than asked).
    """
    spacing = voxel_spacing(affine)
    padded = np.pad(liver, 1)
    depth = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    candidates = np.argwhere(liver)
    depths = depth[liver]
    lesions: list[Lesion] = []
    lo, hi = np.log(diameter_mm[0]), np.log(diameter_mm[1])
    for _ in range(n_lesions):
        diameter = float(np.exp(rng.uniform(lo, hi)))
        placed = None
        while placed is None and diameter >= diameter_mm[0]:
            radius = diameter / 2
            ok = depths >= depth_fraction * radius
            if ok.any():
                pool = candidates[ok]
                for _try in range(50):
                    idx = pool[rng.integers(len(pool))]
                    mm = idx * spacing
                    if all(
                        np.linalg.norm(mm - np.asarray(o.center_voxel) * spacing) >= radius + o.diameter_mm / 2 + gap_mm
                        for o in lesions
                    ):
                        placed = idx
                        break
            if placed is None:
                diameter *= 0.8
        if placed is None:
            continue
        axes = rng.uniform(0.8, 1.25, 3)
        axes /= np.cbrt(axes.prod())
        rotation = Rotation.random(random_state=rng).as_matrix()
        rim = rng.random() < p_rim
        if rim:  # rim-enhancing lesions have a hypodense centre
            contrast = -rng.uniform(max(min_abs_contrast_hu, 20.0), -contrast_hu[0])
        else:
            sign = rng.random() < (-contrast_hu[0]) / (contrast_hu[1] - contrast_hu[0])
            contrast = -rng.uniform(min_abs_contrast_hu, -contrast_hu[0]) if sign else rng.uniform(min_abs_contrast_hu, contrast_hu[1])
        soft = rng.random() < p_soft
        lesions.append(
            Lesion(
                center_voxel=tuple(float(v) for v in placed),
                center_mm=tuple(float(v) for v in (np.asarray(affine) @ np.r_[placed, 1.0])[:3]),
                diameter_mm=float(diameter),
                axes=tuple(float(a) for a in axes),
                rotation=tuple(float(v) for v in rotation.ravel()),
                contrast_hu=float(contrast),
                margin="soft" if soft else "sharp",
                margin_mm=float(rng.uniform(3.0, 8.0)) if soft else float(spacing.min()),
                rim_hu=float(rng.uniform(20.0, 60.0)) if rim else 0.0,
                rim_mm=float(rng.uniform(1.5, 4.0)) if rim else 0.0,
            )
        )
    return lesions


def insert_lesions(
    image: np.ndarray, liver: np.ndarray, affine: np.ndarray, lesions: Sequence[Lesion], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``lesions`` into a copy of ``image`` (HU); returns ``(image float32, label uint8 0/1/2)``.

    Inside each lesion the local mean becomes ``liver median + contrast`` while the scan's fine structure
    (image minus its 1.5 mm Gaussian blur) is kept; the transition follows the margin profile; a rim adds its
    ring; nothing changes outside the liver mask. Fills in each lesion's measured size.
    """
    out = np.array(image, dtype=np.float32, copy=True)
    label = liver.astype(np.uint8)
    spacing = voxel_spacing(affine)
    a3 = np.asarray(affine, dtype=np.float64)[:3, :3]
    for lesion in lesions:
        radius = lesion.diameter_mm / 2
        reach = radius * max(lesion.axes) + 2 * lesion.margin_mm + 3 * float(spacing.max())
        center = np.asarray(lesion.center_voxel)
        half = np.ceil(reach / spacing).astype(int)
        lo = np.maximum(center.astype(int) - half, 0)
        hi = np.minimum(center.astype(int) + half + 1, image.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        grids = np.meshgrid(*[np.arange(a, b) - c for a, b, c in zip(lo, hi, center)], indexing="ij")
        offsets_mm = np.einsum("ij,j...->i...", a3, np.stack(grids).astype(np.float64))  # world-axis offsets
        rotation = np.asarray(lesion.rotation).reshape(3, 3)
        local = np.einsum("ji,j...->i...", rotation, offsets_mm)  # in the lesion's own axes
        rho = np.sqrt(sum((local[i] / (radius * lesion.axes[i])) ** 2 for i in range(3)))
        distance = (rho - 1.0) * radius  # ≈ signed distance to the nominal surface (mm, < 0 inside)
        in_liver = liver[box]
        if lesion.margin == "soft":
            weight = 0.5 * (1.0 - np.tanh(distance / (lesion.margin_mm / 2)))
        else:
            weight = np.clip(0.5 - distance / lesion.margin_mm, 0.0, 1.0)
        weight = np.where(in_liver, weight, 0.0)
        region = out[box]
        around = in_liver & (distance > lesion.margin_mm) & (distance < radius + 15.0)
        liver_hu = float(np.median(region[around])) if around.sum() > 20 else float(np.median(out[liver]))
        sigma = 1.5 / spacing
        fine = region - ndimage.gaussian_filter(region, sigma)
        texture = ndimage.gaussian_filter(rng.standard_normal(region.shape), 3.0 / spacing)
        texture *= (3.0 + 0.1 * abs(lesion.contrast_hu)) / max(float(texture.std()), 1e-6)
        target = liver_hu + lesion.contrast_hu + fine + texture
        painted = region + weight * (target - region)
        if lesion.rim_hu:
            half_rim = lesion.rim_mm / 2
            ring = np.exp(-0.5 * ((distance + half_rim) / half_rim) ** 2)
            painted += np.where(in_liver & (distance < 0), ring, 0.0) * (liver_hu + lesion.rim_hu + fine - painted)
        out[box] = painted.astype(np.float32)
        inside = (distance <= 0) & in_liver
        label[box][inside] = 2
        lesion.liver_hu = liver_hu
        lesion.measured_voxels = int(inside.sum())
        lesion.measured_diameter_mm = float(np.cbrt(6.0 * inside.sum() * spacing.prod() / np.pi))
    return out, label


def load_scan(image: str | os.PathLike, organ_map: str | os.PathLike, liver_label: int | None = None):
    """``(image HU float32, liver bool, affine)`` of a scan and its organ map, both re-oriented to RAS.

    Read with the project's loader (NIfTI or a DICOM series folder); the organ map must describe the same grid
    as the image (same shape and voxel-to-world mapping after re-orientation), else ``ValueError``.
    """
    from monai.transforms import Orientationd

    from monai_ad.transforms.pipeline import LoadVolumed

    data = LoadVolumed(["image", "roi"], mask_keys=["roi"])({"image": str(image), "roi": str(organ_map)})
    data = Orientationd(["image", "roi"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(data)
    img, roi = data["image"], data["roi"]
    affine, roi_affine = np.asarray(img.affine, np.float64), np.asarray(roi.affine, np.float64)
    if tuple(img.shape) != tuple(roi.shape) or not np.allclose(affine, roi_affine, atol=1e-3):
        raise ValueError(
            f"{organ_map}: its grid {tuple(roi.shape[1:])} / {np.round(roi_affine, 3).tolist()} is not the image's "
            f"{tuple(img.shape[1:])} / {np.round(affine, 3).tolist()}"
        )
    organs = roi.as_tensor()[0].numpy()
    liver = organs == liver_label if liver_label is not None else organs > 0
    if not liver.any():
        raise ValueError(f"{organ_map}: no voxel with the liver's label {liver_label}")
    return img.as_tensor()[0].numpy().astype(np.float32), liver, affine


def write_case(out: Path, name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> dict[str, str]:
    """int16 image and uint8 label NIfTI under ``out`` (``images/``, ``labels/``); their datalist entry."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    image_rel, label_rel = f"images/{name}.nii.gz", f"labels/{name}.nii.gz"
    save_nifti(np.clip(np.rint(image), -32768, 32767).astype(np.int16), affine, out / image_rel)
    save_nifti(label.astype(np.uint8), affine, out / label_rel, intent="label")
    return {"image": image_rel, "label": label_rel}


def slab_affine(affine: np.ndarray, z0: int) -> np.ndarray:
    shifted = np.array(affine, dtype=np.float64, copy=True)
    shifted[:3, 3] = (affine @ np.array([0.0, 0.0, float(z0), 1.0]))[:3]
    return shifted


def calibration_split(liver: np.ndarray, start: float = 0.5, stop: float = 0.75) -> list[tuple[int, int, bool]]:
    """The liver's axial extent in three contiguous slabs ``(z0, z1, for_calibration)``: the part from ``start`` to
    ``stop`` of the extent (default: the third quarter) for calibration, the slabs above and below for fitting."""
    zs = np.nonzero(liver.any(axis=(0, 1)))[0]
    first, n = int(zs[0]), int(zs[-1]) - int(zs[0]) + 1
    c0, c1 = first + int(round(n * start)), first + int(round(n * stop))
    return [(z0, z1, calib) for z0, z1, calib in ((first, c0, False), (c0, c1, True), (c1, first + n, False)) if z1 > z0]


def build_leave_one_out(
    scans: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike,
    n_sets: int = 3,
    seed: int = 0,
    n_lesions: tuple[int, int] = N_LESIONS,
) -> list[dict[str, Any]]:
    """Leave-one-scan-out datasets from normal scans ``{"name", "image", "organ_map", "liver_label"}``.

    For each held-out scan: ``test`` = the scan itself (normal) and ``n_sets`` copies with differently seeded
    lesions; ``training`` / ``validation`` = the other scans, each cut along its liver's axial extent into a
    contiguous calibration slab (the third quarter, for thresholds: ``validation``) and the slabs above and below
    it (for fitting: ``training``). Returns one ``{"held_out", "datalist", ...}`` per fold.
    """
    out = Path(out_dir)
    loaded = {}
    for scan in scans:
        image, liver, affine = load_scan(scan["image"], scan["organ_map"], scan.get("liver_label"))
        loaded[scan["name"]] = (image, liver, affine)
    cases: dict[str, dict[str, Any]] = {}
    for index, (name, (image, liver, affine)) in enumerate(loaded.items()):
        normal = write_case(out, f"{name}_normal", image, liver.astype(np.uint8), affine)
        sets = []
        for k in range(n_sets):
            rng = np.random.default_rng(np.random.SeedSequence([seed, index, k]))
            lesions = sample_lesions(liver, affine, rng, int(rng.integers(n_lesions[0], n_lesions[1] + 1)))
            painted, label = insert_lesions(image, liver, affine, lesions, rng)
            entry = write_case(out, f"{name}_lesions{k}", painted, label, affine)
            sets.append({**entry, "case_id": f"{name}_lesions{k}", "abnormal": True, "lesions": [asdict(l) for l in lesions]})
        fit, calib = [], []
        for z0, z1, is_calib in calibration_split(liver):
            if not liver[..., z0:z1].any():
                continue
            entry = write_case(out, f"{name}_z{z0:03d}-{z1 - 1:03d}", image[..., z0:z1],
                               liver[..., z0:z1].astype(np.uint8), slab_affine(affine, z0))  # fmt: skip
            (calib if is_calib else fit).append({**entry, "case_id": f"{name}_z{z0}-{z1 - 1}", "slices": [z0, z1 - 1]})
        cases[name] = {"normal": {**normal, "case_id": f"{name}_normal", "abnormal": False}, "sets": sets,
                       "fit": fit, "calibration": calib, "liver_slices": int(liver.any(axis=(0, 1)).sum())}  # fmt: skip
    folds = []
    for held_out in loaded:
        others = [n for n in loaded if n != held_out]
        datalist = {
            "name": f"inserted lesions, {held_out} held out",
            "labels": {"0": "background", "1": "liver", "2": "lesion"},
            "training": [e for n in others for e in cases[n]["fit"]],
            "validation": [e for n in others for e in cases[n]["calibration"]],
            "test": [cases[held_out]["normal"], *cases[held_out]["sets"]],
        }
        path = out / f"datalist_{held_out}.json"
        path.write_text(json.dumps(datalist, indent=1) + "\n")
        folds.append({
            "held_out": held_out, "trained_on": others, "datalist": path,
            "n_fit_slices": sum(e["slices"][1] - e["slices"][0] + 1 for e in datalist["training"]),
            "n_calibration_slices": sum(e["slices"][1] - e["slices"][0] + 1 for e in datalist["validation"]),
            "n_lesions": sum(len(s["lesions"]) for s in cases[held_out]["sets"]),
            "liver_slices_per_training_scan": float(np.mean([cases[n]["liver_slices"] for n in others])),
        })  # fmt: skip
    return folds
