"""How visible each lesion is in its own slice, measured on the CT itself: an observer who is told where the
lesion is and what shape it has measures its mean HU against the liver just around it; its visibility ``d′`` is
that contrast in units of the spread the same measurement has over normal liver.

- contrast of a template (a set of pixels in one slice) = mean HU inside it − median HU of the liver in a ring
  ``RING_INNER_MM``..``RING_INNER_MM + RING_WIDTH_MM`` outside the lesion's cross-section;
- up to three templates per lesion cross-section (each 2-D connected part of a lesion in a slice): the whole
  cross-section and its cores, eroded by 2 and 4 mm (``CORE_MM``; a rim lesion's rim and core cancel in the
  whole);
- the null: the same template and ring moved to random places in normal liver (slices of the test scans with no
  lesion, ``N_NULL`` places with at least ``MIN_INSIDE`` of the template inside the liver), measured the same way;
- ``d′`` = |contrast − the null's median| / the null's spread (MAD × 1.4826), of the template where it is
  largest (the contrast column keeps the sign: darker or brighter); a slice's visibility is that of its most
  visible cross-section.

By the Rose criterion a flat target needs a contrast-to-noise of about 3–5 to be seen where it is expected, more
where it must be searched for across the whole liver; cross-sections with ``d′`` below 2 are not told apart from
normal texture even at a known place (d′ counts no search: a one-pixel spot can measure as visible at its known
place and still be lost among the thousands of pixels of a slice). The noise here is the scan's own: quantum noise, texture and anatomy
(vessels, partial volume) together, so a lesion beside a vessel measures as less visible than the same lesion in
flat liver.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

RING_INNER_MM, RING_WIDTH_MM = 1.0, 3.0
CORE_MM = (2.0, 4.0)  # a rim (enhancing or not) is a few mm thick; its core is what differs from the liver
N_NULL = 200
MIN_NULL = 30  # fewer places than this (a cross-section too large for the normal livers): no d′
MIN_INSIDE = 0.8
MAX_TRIES = 20  # random places tried per null sample before giving up


def _disc(radius_px: int) -> np.ndarray:
    r = np.arange(-radius_px, radius_px + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius_px**2


def _grow(mask: np.ndarray, mm: float, pixel_mm: tuple[float, float]) -> np.ndarray:
    radius = max(1, int(math.ceil(mm / min(pixel_mm))))
    return ndimage.binary_dilation(mask, structure=_disc(radius))


def ring(mask: np.ndarray, pixel_mm: tuple[float, float]) -> np.ndarray:
    """The pixels ``RING_INNER_MM``..``RING_INNER_MM + RING_WIDTH_MM`` outside ``mask`` (2-D)."""
    return _grow(mask, RING_INNER_MM + RING_WIDTH_MM, pixel_mm) & ~_grow(mask, RING_INNER_MM, pixel_mm)


def templates(cross_section: np.ndarray, pixel_mm: tuple[float, float]) -> list[np.ndarray]:
    """The whole cross-section and its cores (eroded by each of ``CORE_MM``) that keep at least 4 pixels."""
    out = [cross_section]
    for mm in CORE_MM:
        core = ndimage.binary_erosion(cross_section, structure=_disc(max(1, int(round(mm / min(pixel_mm))))))
        if core.sum() >= 4 and not any(np.array_equal(core, t) for t in out):
            out.append(core)
    return out


def contrast(image: np.ndarray, template: np.ndarray, around: np.ndarray, liver: np.ndarray) -> float | None:
    inside, outside = template & liver, around & liver & ~template
    if not inside.any() or outside.sum() < 4:
        return None
    return float(image[inside].mean() - np.median(image[outside]))


def null_contrasts(template: np.ndarray, around: np.ndarray, normals: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   rng: np.random.Generator, n: int = N_NULL) -> np.ndarray:  # fmt: skip
    """The contrast of ``template`` against its ring ``around``, both moved together to ``n`` random places in
    the normal slices ``[(image, liver, liver pixels as np.argwhere gives them), ...]`` (2-D)."""
    points = np.argwhere(template | around)
    centre = np.argwhere(template).mean(0).round().astype(int)
    offsets = points - centre
    in_template = template[tuple(points.T)]
    candidates = [normal for normal in normals if len(normal[2]) >= template.sum()]
    values: list[float] = []
    if not candidates:
        return np.asarray(values)
    for _ in range(n * MAX_TRIES):
        if len(values) >= n:
            break
        image, liver, where = candidates[rng.integers(len(candidates))]
        at = offsets + where[rng.integers(len(where))]
        if (at < 0).any() or (at >= liver.shape).any():
            continue
        inside = liver[tuple(at.T)]
        if inside[in_template].mean() < MIN_INSIDE:
            continue
        t = np.zeros_like(liver)
        r = np.zeros_like(liver)
        t[tuple(at[in_template].T)] = True
        r[tuple(at[~in_template].T)] = True
        value = contrast(image, t, r, liver)
        if value is not None:
            values.append(value)
    return np.asarray(values)


def cross_section_visibility(image, liver, cross_section, pixel_mm, normals, rng) -> tuple[float | None, float | None]:
    """``(d′, contrast in HU)`` of one lesion cross-section (2-D), of the template where ``d′`` is largest."""
    best: tuple[float | None, float | None] = (None, None)
    around = ring(cross_section, pixel_mm)  # the liver around the lesion, for the whole and for its cores
    for template in templates(cross_section, pixel_mm):
        value = contrast(image, template, around, liver)
        null = null_contrasts(template, around, normals, rng)
        if value is None or len(null) < MIN_NULL:
            continue
        spread = 1.4826 * float(np.median(np.abs(null - np.median(null))))
        d = abs(value - float(np.median(null))) / max(spread, 1e-6)
        if best[0] is None or d > best[0]:
            best = (d, value)
    return best


def slice_visibility(cases: list[dict], images: list[np.ndarray], seed: int = 0) -> dict[tuple[int, int], dict]:
    """Each lesion slice's visibility: ``{(case index, z): {"d′": ..., "contrast (HU)": ...}}`` over the
    accuracy benchmark's cases (axial axis first; ``images`` in the same crops), ``d′`` that of the slice's most
    visible cross-section (None when none could be measured)."""
    rng = np.random.default_rng(seed)
    normals = [(image[z], case["liver"][z], np.argwhere(case["liver"][z])) for case, image in zip(cases, images)
               for z in range(image.shape[0]) if case["liver"][z].any() and not case["lesion"][z].any()]  # fmt: skip
    out: dict[tuple[int, int], dict] = {}
    for i, (case, image) in enumerate(zip(cases, images)):
        pixel_mm = tuple(case["spacing"][1:])
        for z in np.nonzero(case["lesion"].any(axis=(1, 2)))[0]:
            parts, n = ndimage.label(case["lesion"][z])
            best = {"d′": None, "contrast (HU)": None}
            for j in range(1, n + 1):
                d, value = cross_section_visibility(image[z], case["liver"][z], parts == j, pixel_mm, normals, rng)
                if d is not None and (best["d′"] is None or d > best["d′"]):
                    best = {"d′": d, "contrast (HU)": value}
            out[(i, int(z))] = best
    return out
