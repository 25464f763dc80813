"""Liver lesions inserted into normal CT scans, for evaluation only.

Nothing here is used to train a detector, and no training code imports it: its lesion models and their
parameters are this module's own, apart from the synthetic anomalies ``monai_ad.synthesis`` makes for training.
Two lesion models (``LESION_MODELS``):

- ``sparse`` (:func:`sample_lesions`): a few well-separated lesions of every size, below;
- ``metastatic`` (:func:`sample_metastases`): heavy metastatic burden as real livers hold it: 10–80 lesions,
  up to 30 % of the liver, most of them 3–10 mm, clustered, heterogeneous (uniform, necrotic centres, rims,
  target appearance; soft and sharp margins), some against the vessels and at the capsule (see its docstring).

Each lesion is an ellipsoid placed inside the scan's liver mask, measured in the scan's own geometry (mm, from
its affine). The sparse model:

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
    core_hu: float = 0.0  # a centre this much off the lesion's mean (necrotic < 0, target > 0; 0: none)
    core_fraction: float = 0.0  # the centre's radius as a fraction of the lesion's
    kind: str = "uniform"  # uniform, rim, necrotic or target
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
                kind="rim" if rim else "uniform",
            )
        )
    return lesions


@dataclass(frozen=True)
class MetastaticModel:
    """The heavy-burden model's parameters (:func:`sample_metastases`); its own, shared with nothing else.

    The ranges follow what is published and measured of metastatic livers: LiTS (Bilic et al., Med. Image
    Anal. 84, 2023) holds primary and secondary tumours, hypo- and hyperdense, many per volume and of widely
    varied size; small lesions (≤ 15 mm) are frequent on contrast-enhanced CT, multiple ones more often
    malignant (Jones et al., AJR 158, 1992; Schwartz et al., Radiology 210, 1999); metastases are mostly
    hypodense, 20–70 HU below the parenchyma in the portal venous phase, some hypervascular ones brighter, with
    necrotic centres, enhancing rims and target appearance (Baron, AJR 163, 1994); a real metastatic scan held
    dozens of lesions, most under 10 mm, about a fifth of the liver, about 50 HU below the parenchyma. Full
    citations: docs/methods.md, "Evaluation lesion models".
    """

    n_lesions: tuple[int, int] = (10, 80)
    burden: tuple[float, float] = (0.03, 0.30)  # tumour share of the liver's volume (log-uniform)
    diameters_mm: tuple[tuple[float, float], ...] = ((3.0, 10.0), (10.0, 20.0), (20.0, 80.0))
    shares: tuple[float, ...] = (0.7, 0.2, 0.1)  # of small, medium and large lesions
    clusters: tuple[int, int] = (2, 6)
    p_clustered: float = 0.6
    cluster_spread_mm: tuple[float, float] = (8.0, 25.0)
    hypodense_hu: tuple[float, float] = (-70.0, -20.0)
    hyperdense_hu: tuple[float, float] = (20.0, 50.0)
    p_hyperdense: float = 0.15
    kinds: tuple[tuple[str, float], ...] = (("uniform", 0.4), ("necrotic", 0.2), ("rim", 0.2), ("target", 0.2))
    necrotic_core_hu: tuple[float, float] = (-40.0, -15.0)  # below the lesion's own mean
    target_core_hu: tuple[float, float] = (25.0, 60.0)  # above the lesion's own mean
    rim_hu: tuple[float, float] = (15.0, 50.0)
    rim_mm: tuple[float, float] = (1.0, 3.0)
    p_soft: float = 0.5
    soft_margin_mm: tuple[float, float] = (1.0, 5.0)
    p_capsule: float = 0.2  # centre within the lesion's radius of the capsule: it reaches the liver's surface
    p_vessel: float = 0.25  # centre within the lesion's radius (+2 mm) of an intrahepatic vessel
    vessel_hu: float = 40.0  # a vessel: liver voxels this far above the liver's median (1 mm smoothing)
    gap_mm: float = 1.0


METASTATIC = MetastaticModel()


def _sphere_mm3(diameter: np.ndarray | float) -> np.ndarray | float:
    return np.pi / 6.0 * np.asarray(diameter, dtype=np.float64) ** 3


def metastatic_diameters(liver_mm3: float, rng: np.random.Generator, model: MetastaticModel = METASTATIC) -> np.ndarray:
    """Equivalent diameters (mm) of one liver's metastases, largest first: a count and a burden drawn from the
    model, the small and medium lesions log-uniform in their ranges, the large ones sharing the volume the
    burden leaves (each within the large range); with no large lesion drawn, one takes that volume when it
    exceeds a 20 mm sphere."""
    n = int(rng.integers(model.n_lesions[0], model.n_lesions[1] + 1))
    burden = float(np.exp(rng.uniform(*np.log(model.burden))))
    classes = rng.choice(len(model.shares), size=n, p=np.asarray(model.shares) / sum(model.shares))
    diameters = np.zeros(n)
    last = len(model.diameters_mm) - 1
    for c, (lo, hi) in enumerate(model.diameters_mm[:-1]):
        chosen = classes == c
        diameters[chosen] = np.exp(rng.uniform(np.log(lo), np.log(hi), int(chosen.sum())))
    lo, hi = model.diameters_mm[last]
    left = max(burden * liver_mm3 - float(_sphere_mm3(diameters[classes != last]).sum()), 0.0)
    if not (classes == last).any() and left > _sphere_mm3(lo):
        classes[int(np.argmin(diameters))] = last
    large = classes == last
    if large.any():
        share = rng.dirichlet(np.ones(int(large.sum()))) * max(left, float(_sphere_mm3(lo)) * large.sum())
        diameters[large] = np.clip(np.cbrt(6.0 * share / np.pi), lo, hi)
    return np.sort(diameters)[::-1]


def sample_metastases(
    image: np.ndarray, liver: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
    model: MetastaticModel = METASTATIC,
) -> list[Lesion]:
    """Heavy metastatic burden in ``liver`` (bool, the scan's grid) of ``image`` (HU): sizes from
    :func:`metastatic_diameters`, placed largest first without overlap (``gap_mm`` apart, ellipsoids taken at
    1.15 × their radius), each one at the capsule (``p_capsule``: its centre less than its radius deep, so the
    mask cuts it), against a vessel (``p_vessel``), in one of a few clusters (``p_clustered``: a Gaussian
    around the cluster's centre) or anywhere deep enough. A lesion with no room is shrunk (× 0.85, down to 3 mm)
    and left out when it still finds none. Appearance: hypodense (or, ``p_hyperdense``, hyperdense and uniform),
    then uniform, necrotic (a darker centre; lesions ≥ 10 mm), rim-enhancing or target (a bright centre in a
    dark halo; lesions ≥ 6 mm); sharp or soft margins.
    """
    spacing = voxel_spacing(affine)
    depth = ndimage.distance_transform_edt(np.pad(liver, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    candidates = np.argwhere(liver)
    depths = depth[liver]
    positions = candidates * spacing  # mm, in the grid's own axes
    smoothed = ndimage.gaussian_filter(np.asarray(image, np.float32), 1.0 / spacing)
    vessels = liver & (smoothed > float(np.median(image[liver])) + model.vessel_hu)
    to_vessel = (ndimage.distance_transform_edt(~vessels, sampling=spacing)[liver] if vessels.any()
                 else np.full(len(candidates), np.inf))  # fmt: skip
    diameters = metastatic_diameters(float(liver.sum() * spacing.prod()), rng, model)
    n_clusters = int(rng.integers(model.clusters[0], model.clusters[1] + 1))
    deep = np.flatnonzero(depths >= np.quantile(depths, 0.5))
    cluster_centres = positions[rng.choice(deep, size=n_clusters)]
    cluster_spread = rng.uniform(*model.cluster_spread_mm, size=n_clusters)
    kinds, kind_p = zip(*model.kinds)
    placed_mm: list[np.ndarray] = []
    placed_r: list[float] = []
    lesions: list[Lesion] = []
    for diameter in diameters:
        where = rng.choice(["capsule", "vessel", "cluster", "anywhere"],
                           p=_placement_p(model.p_capsule, model.p_vessel, model.p_clustered))  # fmt: skip
        cluster = int(rng.integers(n_clusters))
        placed = None
        while placed is None and diameter >= 3.0:
            radius = diameter / 2
            if where == "capsule":
                ok = (depths >= 0.2 * radius) & (depths < radius)
            elif where == "vessel":
                ok = (to_vessel <= radius + 2.0) & (depths >= 0.5 * radius)
            else:
                ok = depths >= 0.6 * radius
            pool = np.flatnonzero(ok)
            if pool.size:
                weights = None
                if where == "cluster":
                    d2 = ((positions[pool] - cluster_centres[cluster]) ** 2).sum(1)
                    weights = np.exp(-0.5 * d2 / cluster_spread[cluster] ** 2)
                    weights = weights / weights.sum() if weights.sum() > 0 else None
                tries = rng.choice(pool, size=min(50, pool.size), p=weights)
                others_mm, others_r = np.asarray(placed_mm).reshape(-1, 3), np.asarray(placed_r)
                for idx in tries:
                    gaps = np.linalg.norm(others_mm - positions[idx], axis=1) - 1.15 * (radius + others_r)
                    if not others_r.size or gaps.min() >= model.gap_mm:
                        placed = idx
                        break
            if placed is None:
                diameter *= 0.85
        if placed is None:
            continue
        placed_mm.append(positions[placed])
        placed_r.append(diameter / 2)
        lesions.append(_metastasis(candidates[placed], float(diameter), affine, spacing, rng, model, kinds, kind_p))
    return lesions


def _placement_p(p_capsule: float, p_vessel: float, p_clustered: float) -> list[float]:
    rest = max(1.0 - p_capsule - p_vessel, 0.0)
    return [p_capsule, p_vessel, rest * p_clustered, rest * (1.0 - p_clustered)]


def _metastasis(voxel, diameter, affine, spacing, rng, model: MetastaticModel, kinds, kind_p) -> Lesion:
    axes = rng.uniform(0.8, 1.25, 3)
    axes /= np.cbrt(axes.prod())
    hyperdense = rng.random() < model.p_hyperdense
    kind = "uniform" if hyperdense else str(rng.choice(kinds, p=np.asarray(kind_p) / sum(kind_p)))
    if (kind == "necrotic" and diameter < 10.0) or (kind == "target" and diameter < 6.0):
        kind = "uniform"
    contrast = rng.uniform(*model.hyperdense_hu) if hyperdense else rng.uniform(*model.hypodense_hu)
    core_hu = core_fraction = rim_hu = rim_mm = 0.0
    if kind == "necrotic":
        core_hu, core_fraction = rng.uniform(*model.necrotic_core_hu), rng.uniform(0.3, 0.6)
    elif kind == "target":
        core_hu, core_fraction = rng.uniform(*model.target_core_hu), rng.uniform(0.2, 0.45)
    elif kind == "rim":
        rim_hu, rim_mm = rng.uniform(*model.rim_hu), min(rng.uniform(*model.rim_mm), diameter / 4)
    soft = rng.random() < model.p_soft
    return Lesion(
        center_voxel=tuple(float(v) for v in voxel),
        center_mm=tuple(float(v) for v in (np.asarray(affine) @ np.r_[voxel, 1.0])[:3]),
        diameter_mm=float(diameter),
        axes=tuple(float(a) for a in axes),
        rotation=tuple(float(v) for v in Rotation.random(random_state=rng).as_matrix().ravel()),
        contrast_hu=float(contrast),
        margin="soft" if soft else "sharp",
        margin_mm=float(min(rng.uniform(*model.soft_margin_mm), diameter / 2)) if soft else float(spacing.min()),
        rim_hu=float(rim_hu), rim_mm=float(rim_mm), core_hu=float(core_hu), core_fraction=float(core_fraction),
        kind=kind,
    )


LESION_MODELS: dict[str, Any] = {"sparse": None, "metastatic": METASTATIC}  # sparse: sample_lesions' own defaults


def insert_lesions(
    image: np.ndarray, liver: np.ndarray, affine: np.ndarray, lesions: Sequence[Lesion], rng: np.random.Generator,
    reference_normal: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``lesions`` into a copy of ``image`` (HU); returns ``(image float32, label uint8 0/1/2)``.

    Inside each lesion the local mean becomes ``liver median + contrast`` while the scan's fine structure
    (image minus its 1.5 mm Gaussian blur) is kept; the transition follows the margin profile; a rim adds its
    ring and a core its centre; nothing changes outside the liver mask. The liver median is read around the
    lesion in the image as painted so far, or with ``reference_normal`` in the normal scan (so that, in a liver
    full of tumour, a lesion's density is not set against its neighbours'). Fills in each lesion's measured size.
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
        source = np.asarray(image) if reference_normal else out
        liver_hu = float(np.median(source[box][around])) if around.sum() > 20 else float(np.median(source[liver]))
        sigma = 1.5 / spacing
        fine = region - ndimage.gaussian_filter(region, sigma)
        texture = ndimage.gaussian_filter(rng.standard_normal(region.shape), 3.0 / spacing)
        texture *= (3.0 + 0.1 * abs(lesion.contrast_hu)) / max(float(texture.std()), 1e-6)
        target = liver_hu + lesion.contrast_hu + fine + texture
        if lesion.core_hu:
            core_edge = -(1.0 - lesion.core_fraction) * radius  # the core's surface, as a signed distance
            target = target + lesion.core_hu * 0.5 * (1.0 - np.tanh((distance - core_edge) / 0.75))
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
    lesion_model: str = "sparse",
) -> list[dict[str, Any]]:
    """Leave-one-scan-out datasets from normal scans ``{"name", "image", "organ_map", "liver_label"}``.

    For each held-out scan: ``test`` = the scan itself (normal) and ``n_sets`` copies with differently seeded
    lesions of ``lesion_model`` (``LESION_MODELS``; ``n_lesions`` is the sparse model's count); ``training`` / ``validation`` = the other scans, each cut along its liver's axial extent into a
    contiguous calibration slab (the third quarter, for thresholds: ``validation``) and the slabs above and below
    it (for fitting: ``training``). Returns one ``{"held_out", "datalist", ...}`` per fold.
    """
    if lesion_model not in LESION_MODELS:
        raise ValueError(f"unknown lesion model {lesion_model!r}; known: {', '.join(LESION_MODELS)}")
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
            if lesion_model == "sparse":
                rng = np.random.default_rng(np.random.SeedSequence([seed, index, k]))
                lesions = sample_lesions(liver, affine, rng, int(rng.integers(n_lesions[0], n_lesions[1] + 1)))
                painted, label = insert_lesions(image, liver, affine, lesions, rng)
                case_id = f"{name}_lesions{k}"
            else:
                rng = np.random.default_rng(np.random.SeedSequence([seed, index, k, 1]))
                lesions = sample_metastases(image, liver, affine, rng, LESION_MODELS[lesion_model])
                painted, label = insert_lesions(image, liver, affine, lesions, rng, reference_normal=True)
                case_id = f"{name}_{lesion_model}{k}"
            entry = write_case(out, case_id, painted, label, affine)
            sets.append({**entry, "case_id": case_id, "abnormal": True, "lesions": [asdict(l) for l in lesions],
                         "burden": float((label == 2).sum() / max(int(liver.sum()), 1))})  # fmt: skip
        fit, calib = [], []
        for z0, z1, is_calib in calibration_split(liver):
            if not liver[..., z0:z1].any():
                continue
            entry = write_case(out, f"{name}_z{z0:03d}-{z1 - 1:03d}", image[..., z0:z1],
                               liver[..., z0:z1].astype(np.uint8), slab_affine(affine, z0))  # fmt: skip
            (calib if is_calib else fit).append({**entry, "case_id": f"{name}_z{z0}-{z1 - 1}", "slices": [z0, z1 - 1]})
        cases[name] = {"normal": {**normal, "case_id": f"{name}_normal", "abnormal": False}, "sets": sets,
                       "fit": fit, "calibration": calib, "liver_slices": int(liver.any(axis=(0, 1)).sum()),
                       "spacing_mm": [float(v) for v in voxel_spacing(affine)]}  # fmt: skip
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
            "held_out": held_out, "trained_on": others, "datalist": path, "spacing_mm": cases[held_out]["spacing_mm"],
            "n_fit_slices": sum(e["slices"][1] - e["slices"][0] + 1 for e in datalist["training"]),
            "n_calibration_slices": sum(e["slices"][1] - e["slices"][0] + 1 for e in datalist["validation"]),
            "n_lesions": sum(len(s["lesions"]) for s in cases[held_out]["sets"]),
            "burden": [s["burden"] for s in cases[held_out]["sets"]],
            "liver_slices_per_training_scan": float(np.mean([cases[n]["liver_slices"] for n in others])),
        })  # fmt: skip
    return folds
