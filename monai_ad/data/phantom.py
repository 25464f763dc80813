"""A deterministic, realistic-looking abdominal CT phantom with liver lesions (the project's default data).

Contrast-enhanced portal-venous CT in Hounsfield units: body outline with subcutaneous fat and a muscle wall,
visceral fat and bowel, spine and ribs, kidneys, spleen, aorta and IVC, and an irregular liver with enhancing
vessels; lesions of varied size, shape and contrast. Correlated noise and partial-volume blur, anisotropic
spacing, a RAS affine. Labels follow LiTS: 0 background, 1 liver, 2 lesion.

World axes (mm, RAS+): x towards the patient's right, y anterior, z superior; array axes (x, y, z) with the
axial slice index along z. The liver is on the patient's right (x > 0), spleen and aorta on the left.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from monai_ad.io import atomic_write, save_nifti, write_json

PRESETS: dict[str, dict[str, Any]] = {
    # in-plane matrix, field of view (mm), slice spacings to draw from (mm), craniocaudal extent (mm)
    "tiny": {"matrix": 80, "fov_mm": (360.0, 420.0), "slice_mm": (5.0, 6.0), "extent_mm": (120.0, 140.0)},
    "small": {"matrix": 192, "fov_mm": (360.0, 440.0), "slice_mm": (4.0, 5.0), "extent_mm": (180.0, 220.0)},
    "full": {"matrix": 512, "fov_mm": (360.0, 460.0), "slice_mm": (1.5, 2.0, 2.5, 3.0, 5.0), "extent_mm": (200.0, 300.0)},
}

LESION_KINDS = ("hypodense", "hyperdense", "rim", "cyst")
AIR_HU, FAT_HU, MUSCLE_HU, CSF_HU = -1000.0, -100.0, 50.0, 10.0


@dataclass
class PhantomCase:
    image: np.ndarray  # int16 HU, (X, Y, Z)
    label: np.ndarray  # uint8, 0 background, 1 liver, 2 lesion
    affine: np.ndarray  # 4x4 voxel → world (mm, RAS)
    spacing: tuple[float, float, float]
    lesions: list[dict] = field(default_factory=list)
    case_id: str = "case"
    abnormal: bool = False


class _Grid:
    """World coordinates of the voxel centres, as broadcastable 1-D arrays."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], origin: np.ndarray):
        self.shape, self.spacing, self.origin = shape, np.asarray(spacing), np.asarray(origin)
        self.x = (origin[0] + spacing[0] * np.arange(shape[0], dtype=np.float32))[:, None, None]
        self.y = (origin[1] + spacing[1] * np.arange(shape[1], dtype=np.float32))[None, :, None]
        self.z = (origin[2] + spacing[2] * np.arange(shape[2], dtype=np.float32))[None, None, :]

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    def ellipsoid(self, center, radii) -> np.ndarray:
        """Normalised squared distance ``sum(((p - c) / r)^2)``: < 1 inside."""
        return (
            ((self.x - center[0]) / radii[0]) ** 2
            + ((self.y - center[1]) / radii[1]) ** 2
            + ((self.z - center[2]) / radii[2]) ** 2
        )

    def smooth_field(self, rng: np.random.Generator, scale_mm: float, amplitude: float) -> np.ndarray:
        """A smooth random field (Gaussian-filtered noise at coarse resolution), std ≈ ``amplitude``."""
        coarse = [max(4, int(np.ceil(n * s / scale_mm)) + 2) for n, s in zip(self.shape, self.spacing)]
        noise = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 1.0, mode="wrap")
        noise *= amplitude / max(float(noise.std()), 1e-6)
        factors = [n / c for n, c in zip(self.shape, coarse)]
        return ndimage.zoom(noise, factors, order=1, mode="nearest", grid_mode=True)[: self.shape[0], : self.shape[1], : self.shape[2]]


def _segment_distance(grid: _Grid, a: np.ndarray, b: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """Distance (mm) from each voxel of ``box`` to the segment a–b."""
    px, py, pz = grid.x[box[0], :, :], grid.y[:, box[1], :], grid.z[:, :, box[2]]
    ab = b - a
    t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (pz - a[2]) * ab[2]) / max(float(ab @ ab), 1e-6)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((px - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2 + (pz - a[2] - t * ab[2]) ** 2)


def _box_around(grid: _Grid, points: np.ndarray, margin_mm: float) -> tuple[slice, ...] | None:
    lo = (points.min(0) - margin_mm - grid.origin) / grid.spacing
    hi = (points.max(0) + margin_mm - grid.origin) / grid.spacing
    start = np.clip(np.floor(lo).astype(int), 0, grid.shape)
    stop = np.clip(np.ceil(hi).astype(int) + 1, 0, grid.shape)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(s), int(e)) for s, e in zip(start, stop))


def _vessel_tree(rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, length: float, radius: float, depth: int):
    """Random branching segments ``(a, b, radius)``: each branch splits in two thinner, shorter ones."""
    segments = []
    stack = [(root, direction / np.linalg.norm(direction), length, radius, depth)]
    while stack:
        start, d, length, radius, level = stack.pop()
        d = d + rng.normal(0, 0.25, 3)
        d /= np.linalg.norm(d)
        end = start + d * length
        segments.append((start, end, radius))
        if level > 0 and radius > 1.2:
            for sign in (-1.0, 1.0):
                turn = np.cross(d, rng.normal(0, 1, 3))
                turn /= max(np.linalg.norm(turn), 1e-6)
                stack.append((end, d + sign * 0.8 * turn, length * rng.uniform(0.6, 0.8), radius * 0.72, level - 1))
    return segments


def _add(image: np.ndarray, mask: np.ndarray, value: float | np.ndarray) -> None:
    image[mask] = value[mask] if isinstance(value, np.ndarray) else value


def make_phantom(seed: int, abnormal: bool, preset: str = "small", n_lesions: int | None = None, **overrides: Any) -> PhantomCase:
    """One phantom volume, fully determined by ``seed`` and the parameters."""
    if preset not in PRESETS:
        raise ValueError(f"unknown phantom preset {preset!r}; choose from {sorted(PRESETS)}")
    p = {**PRESETS[preset], **overrides}
    rng = np.random.default_rng(seed)
    matrix = int(p["matrix"])
    pixel = float(rng.uniform(*p["fov_mm"])) / matrix
    slice_mm = float(rng.choice(p["slice_mm"]))
    n_slices = int(np.ceil(rng.uniform(*p["extent_mm"]) / slice_mm))
    shape = (matrix, matrix, n_slices)
    spacing = (pixel, pixel, slice_mm)
    z_top = 0.0
    origin = np.array([-pixel * (matrix - 1) / 2, -pixel * (matrix - 1) / 2 - 20.0, z_top - slice_mm * (n_slices - 1)])
    g = _Grid(shape, spacing, origin)
    z_lo = float(origin[2])

    image = np.full(shape, AIR_HU, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)

    # body: a wobbly ellipse, slightly wider lower down; subcutaneous fat, muscle wall, visceral fat
    a, b = rng.uniform(135, 170), rng.uniform(100, 125)
    taper = 1.0 + 0.08 * (z_top - g.z) / max(z_top - z_lo, 1.0)
    theta = np.arctan2(g.y, g.x)
    wobble = 1.0 + sum(rng.uniform(-0.025, 0.025) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    r_body = np.sqrt((g.x / (a * taper)) ** 2 + (g.y / (b * taper)) ** 2) / wobble
    fat_depth, wall = rng.uniform(10, 28), rng.uniform(8, 14)
    body = r_body < 1.0
    _add(image, body, FAT_HU + rng.uniform(-10, 10))
    muscle = r_body < 1.0 - fat_depth / b
    _add(image, muscle, MUSCLE_HU + rng.uniform(-5, 10))
    inner = r_body < 1.0 - (fat_depth + wall) / b
    _add(image, inner, -90.0 + rng.uniform(-10, 10))

    # bowel: soft-tissue loops with some gas and fluid, anterior and inferior
    loops = (g.smooth_field(rng, 35.0, 1.0) > 0.3) & inner & (g.y > -20) & (g.z < z_top - 90)
    _add(image, loops, 35.0 + rng.uniform(-5, 10))
    gas = loops & (g.smooth_field(rng, 18.0, 1.0) > 1.2)
    _add(image, gas, -950.0)

    # spine: vertebral bodies (cortex, cancellous bone) with discs, canal, posterior elements
    spine_y = -b * 0.52
    spine = np.array([0.0, spine_y, 0.0])
    vr = rng.uniform(16, 21)
    disc_period, phase = rng.uniform(26, 32), rng.uniform(0, 30)
    disc = (np.mod(g.z + phase, disc_period) < 5.0)
    vb = g.ellipsoid(spine, (vr, vr * 0.85, 1e9)) < 1
    _add(image, vb, np.where(disc, 85.0, 260.0).astype(np.float32) * np.ones(shape, np.float32))
    cortex = vb & (g.ellipsoid(spine, (vr - 2.5, vr * 0.85 - 2.5, 1e9)) >= 1) & ~disc
    _add(image, cortex, 850.0)
    canal_c = spine + np.array([0.0, -vr - 9.0, 0.0])
    posterior = (g.ellipsoid(canal_c, (14.0, 12.0, 1e9)) < 1) & ~disc
    _add(image, posterior, 600.0)
    _add(image, g.ellipsoid(canal_c, (8.0, 7.0, 1e9)) < 1, CSF_HU)

    # ribs: oblique bands inside the muscle wall (descending anteriorly, so an axial slice cuts short arcs)
    rib_period, rib_phase = rng.uniform(24, 30), rng.uniform(0, 24)
    rib_z = (np.mod(g.z + rib_phase + 22.0 * np.abs(theta + np.pi / 2), rib_period) < 8.0) & (g.z > z_top - 140)
    r_rib = 1.0 - (fat_depth + wall * 0.5) / b
    ribs = rib_z & (np.abs(r_body - r_rib) < 5.0 / b) & (g.y > spine_y - 5) & (np.abs(g.x) > 35)
    _add(image, ribs, 550.0 + rng.uniform(-100, 150))

    # great vessels
    aorta_c = spine + np.array([rng.uniform(8, 18), vr + 14.0, 0.0])
    _add(image, g.ellipsoid(aorta_c, (11.0, 11.0, 1e9)) < 1, rng.uniform(150, 195))
    ivc_c = spine + np.array([-rng.uniform(20, 28), vr + 18.0, 0.0])
    _add(image, g.ellipsoid(ivc_c, (13.0, 9.0, 1e9)) < 1, rng.uniform(125, 150))

    # kidneys: cortex, medulla, sinus fat; lower in the volume
    for side in (-1.0, 1.0):
        kc = np.array([side * rng.uniform(62, 75), spine_y + rng.uniform(5, 15), z_top - rng.uniform(120, 150)])
        kr = np.array([rng.uniform(24, 30), rng.uniform(18, 22), rng.uniform(45, 55)])
        d = g.ellipsoid(kc, kr)
        _add(image, d < 1, rng.uniform(150, 185))
        _add(image, d < 0.45, rng.uniform(105, 125))
        _add(image, g.ellipsoid(kc + np.array([-side * kr[0] * 0.45, 0, 0]), kr * np.array([0.3, 0.35, 0.5])) < 1, -60.0)

    # liver: union of deformed ellipsoids, right lobe larger, inside the body, away from spine
    liver_hu = rng.uniform(100, 130)
    top = z_top - rng.uniform(5, 20)
    right_r = np.array([rng.uniform(65, 80), rng.uniform(60, 75), rng.uniform(65, 90)])
    right = np.array([-rng.uniform(45, 65), rng.uniform(-25, -5), top - right_r[2] * 0.9])
    left_r = np.array([rng.uniform(45, 65), rng.uniform(28, 40), rng.uniform(30, 45)])
    left = np.array([rng.uniform(10, 40), rng.uniform(15, 35), top - left_r[2] * 1.1])
    field_ = np.minimum(g.ellipsoid(right, right_r), g.ellipsoid(left, left_r) * 1.05)
    field_ = field_ + g.smooth_field(rng, 45.0, 0.12)
    liver = (field_ < 1.0) & (r_body < 1.0 - (fat_depth + wall + 3) / b) & (g.z <= top)
    liver &= g.ellipsoid(spine, (vr + 25, vr + 20, 1e9)) >= 1
    liver &= g.ellipsoid(aorta_c, (16.0, 16.0, 1e9)) >= 1
    liver = ndimage.binary_opening(liver, iterations=1)
    labels_cc, n_cc = ndimage.label(liver)
    if n_cc > 1:
        sizes = ndimage.sum_labels(liver, labels_cc, np.arange(1, n_cc + 1))
        liver = labels_cc == (1 + int(np.argmax(sizes)))
    # lung bases above the diaphragm dome, posterior and lateral to the liver
    dome = (g.ellipsoid(right, right_r * 1.06) >= 1) & (g.ellipsoid(left, left_r * 1.1) >= 1)
    lungs = inner & dome & (g.z > right[2] + 0.45 * right_r[2]) & (g.y < 20) & (np.abs(g.x) > vr + 15)
    _add(image, lungs, -860.0 + rng.uniform(-30, 30))
    texture = g.smooth_field(rng, 6.0, 3.0)
    _add(image, liver, liver_hu + texture)
    label[liver] = 1

    # spleen: posterior left, upper abdomen
    sc = np.array([rng.uniform(75, 95), spine_y + rng.uniform(30, 50), top - rng.uniform(50, 70)])
    spleen = (g.ellipsoid(sc, (rng.uniform(25, 35), rng.uniform(35, 50), rng.uniform(40, 55))) < 1) & inner & ~liver
    _add(image, spleen, liver_hu + rng.uniform(0, 10) + texture)

    # enhancing hepatic / portal vessels: random trees from the hilum, kept inside the liver
    liver_pts = np.argwhere(liver)
    vessels = np.zeros(shape, dtype=bool)
    if len(liver_pts):
        hilum = g.origin + g.spacing * liver_pts[rng.integers(len(liver_pts))]
        hilum = 0.5 * hilum + 0.5 * (g.origin + g.spacing * liver_pts.mean(0))
        vessel_hu = liver_hu + rng.uniform(40, 70)
        for _ in range(3):
            tree = _vessel_tree(rng, hilum, rng.normal(0, 1, 3), rng.uniform(25, 40), rng.uniform(3.5, 5.5), depth=3)
            for a_, b_, radius in tree:
                box = _box_around(g, np.stack([a_, b_]), radius + 1.0)
                if box is not None:
                    vessels[box] |= _segment_distance(g, a_, b_, box) < radius
        vessels &= liver
        _add(image, vessels, vessel_hu)

    lesions: list[dict] = []
    if abnormal:
        count = n_lesions if n_lesions is not None else int(rng.integers(1, 5))
        lesions = _add_lesions(rng, g, image, label, liver, liver_hu, count)

    # the anatomy above is laid out with x towards the patient's left; mirror it into RAS+ (x towards the right)
    image, label = image[::-1].copy(), label[::-1].copy()
    for lesion in lesions:
        lesion["center_mm"][0] = round(-lesion["center_mm"][0], 3)  # the grid is symmetric about x = 0

    # partial-volume blur (in mm), then CT-like correlated noise
    blur_mm = np.array([rng.uniform(0.5, 0.8), rng.uniform(0.5, 0.8), 0.35 * slice_mm])
    image = ndimage.gaussian_filter(image, blur_mm / g.spacing, mode="nearest")
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.7, 0.7, 0.3))
    noise *= rng.uniform(8.0, 14.0) / max(float(noise.std()), 1e-6)
    image = np.where(image > -950, image + noise, image + 0.3 * noise)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    case_id = f"{'abnormal' if abnormal else 'normal'}_{seed}"
    return PhantomCase(image, label, g.affine, tuple(float(s) for s in spacing), lesions, case_id, abnormal)


def _add_lesions(rng, g: _Grid, image, label, liver, liver_hu: float, count: int) -> list[dict]:
    """Place ``count`` lesions fully inside the liver; returns their descriptions (world centres)."""
    depth = ndimage.distance_transform_edt(liver, sampling=g.spacing)
    lesions = []
    for _ in range(count):
        lobulated = rng.random() < 0.4
        reach = 1.2 * (1.3 if lobulated else 1.0)  # farthest extent of the shape, in units of its radius
        margin = float(g.spacing.max())  # a voxel of parenchyma all around
        max_radius = (float(depth.max()) - margin) / reach
        if max_radius < 1.5:
            break
        small = rng.random() < 0.35
        diameter = float(np.exp(rng.uniform(np.log(3.0), np.log(12.0 if small else 60.0))))
        radius = min(diameter / 2.0, max_radius)
        candidates = np.argwhere(depth >= radius * reach + margin)
        if not len(candidates):
            continue
        centre_vox = candidates[rng.integers(len(candidates))]
        centre = g.origin + g.spacing * centre_vox
        radii = radius * rng.uniform(0.8, 1.2, 3)
        box = _box_around(g, centre[None], radii.max() * 1.6 + 4.0)
        sub = tuple(box)
        dist = np.sqrt(
            ((g.x[sub[0]] - centre[0]) / radii[0]) ** 2
            + ((g.y[:, sub[1]] - centre[1]) / radii[1]) ** 2
            + ((g.z[:, :, sub[2]] - centre[2]) / radii[2]) ** 2
        )
        if lobulated:  # a second, offset lobe
            offset = rng.normal(0, 1, 3)
            offset *= radius * 0.6 / np.linalg.norm(offset)
            c2 = centre + offset
            dist = np.minimum(
                dist,
                np.sqrt(
                    ((g.x[sub[0]] - c2[0]) / (radii[0] * 0.7)) ** 2
                    + ((g.y[:, sub[1]] - c2[1]) / (radii[1] * 0.7)) ** 2
                    + ((g.z[:, :, sub[2]] - c2[2]) / (radii[2] * 0.7)) ** 2
                ),
            )
        kind = str(rng.choice(LESION_KINDS, p=[0.45, 0.2, 0.2, 0.15]))
        low_contrast = rng.random() < 0.25
        steepness = 40.0 if kind == "cyst" else 8.0  # cysts have sharp margins
        edge = 1.0 / (1.0 + np.exp(np.clip((dist - 1.0) * steepness, -50.0, 50.0)))
        inside = (dist < 1.0) & liver[sub]
        region = image[sub]
        if kind == "hypodense":
            contrast = -rng.uniform(15, 22) if low_contrast else -rng.uniform(20, 60)
            region += (edge * contrast).astype(np.float32)
        elif kind == "hyperdense":
            contrast = rng.uniform(15, 20) if low_contrast else rng.uniform(20, 50)
            region += (edge * contrast).astype(np.float32)
        elif kind == "rim":
            contrast = -rng.uniform(25, 55)
            rim = np.exp(-(((dist - 0.85) / 0.12) ** 2)) * rng.uniform(20, 40)
            region += (edge * contrast + rim * (dist < 1.2)).astype(np.float32)
        else:
            contrast = rng.uniform(0, 20) - liver_hu
            region[:] = region * (1 - edge) + edge * (liver_hu + contrast)
        label[sub][inside] = 2
        lesions.append(
            {
                "center_mm": [round(float(v), 3) for v in centre],
                "diameter_mm": round(2.0 * float(radii.mean()), 2),
                "kind": kind,
                "contrast_hu": round(float(contrast), 1),
            }
        )
        depth[sub][dist < 1.3] = 0.0  # keep later lesions apart from this one
    return lesions


def save_case(case: PhantomCase, image_path: str | os.PathLike, label_path: str | os.PathLike) -> None:
    """Write image and label as NIfTI (atomically)."""
    atomic_write(image_path, lambda tmp: save_nifti(case.image, case.affine, tmp))
    atomic_write(label_path, lambda tmp: save_nifti(case.label, case.affine, tmp, intent="label"))


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    n_normal: int,
    n_abnormal: int,
    seed: int = 0,
    preset: str = "small",
    n_validation: int | None = None,
    n_test_normal: int | None = None,
    progress: bool = True,
) -> Path:
    """Write ``n_normal + n_abnormal`` volumes and a MONAI datalist; returns the datalist path.

    Normal volumes are split into ``training`` (to fit on), ``validation`` (held out to calibrate thresholds)
    and normal ``test`` cases; every abnormal volume goes to ``test``.
    """
    if n_normal < 1 or n_abnormal < 0:
        raise ValueError("need at least one normal volume and a non-negative number of abnormal ones")
    out = Path(out_dir)
    if n_validation is None:
        n_validation = max(1, round(0.2 * n_normal)) if n_normal >= 3 else 0
    if n_test_normal is None:
        n_test_normal = max(1, round(0.2 * n_normal)) if n_normal >= 3 else 0
    n_train = n_normal - n_validation - n_test_normal
    if n_train < 1:
        raise ValueError(f"{n_normal} normal volumes leave none for training after validation and test")
    plan = [("training", False)] * n_train + [("validation", False)] * n_validation + [("test", False)] * n_test_normal
    plan += [("test", True)] * n_abnormal
    sections: dict[str, list] = {"training": [], "validation": [], "test": []}
    counters = {False: 0, True: 0}
    for index, (section, abnormal) in enumerate(tqdm(plan, desc="phantom volumes", disable=not progress, unit="volume")):
        case_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        case = make_phantom(case_seed, abnormal, preset)
        case.case_id = f"{'abnormal' if abnormal else 'normal'}_{counters[abnormal]:03d}"
        counters[abnormal] += 1
        image_rel, label_rel = f"imagesTr/{case.case_id}.nii.gz", f"labelsTr/{case.case_id}.nii.gz"
        save_case(case, out / image_rel, out / label_rel)
        item = {"image": image_rel, "label": label_rel, "case_id": case.case_id, "abnormal": abnormal, "seed": case_seed}
        if abnormal:
            item["lesions"] = case.lesions
        sections[section].append(item)
    return write_json(
        out / "datalist.json",
        {
            "name": "monai_ad CT phantom",
            "description": "Synthetic contrast-enhanced abdominal CT (portal venous phase) with liver lesions",
            "preset": preset,
            "seed": seed,
            "labels": {"0": "background", "1": "liver", "2": "lesion"},
            **sections,
        },
    )
