"""Synthetic anomalies for self-supervised training on normal CT slices.

Array-level functions on batched torch tensors (any device), each testable on its own, and ``synthesize``,
which draws a mix of them for a training batch. Slices are ``[B, C, H, W]`` floats in ``[0, 1]`` (HU-windowed
CT; ``C`` channels are neighbouring slices (2.5-D) or HU windows), the ROI ``[B, 1, H, W]`` (bool) marks the
liver. Every change is made with one in-plane mask per sample applied to all ``C`` channels (a lesion is 3-D:
it continues into the neighbouring slices), only inside the ROI: pixels outside it are returned unchanged and
carry label 0.

Kinds of change (all random in shape, size, position, strength; none draws on any lesion generator):

- ``density``: a blob whose density differs from the liver by ``delta_hu`` (default −80…+60 HU), uniform,
  heterogeneous (modulated by smooth noise) or with a denser rim around a hypodense core.
- ``texture``: inside a blob the parenchyma's texture is smoothed away and replaced by coarser grain, with a
  small density shift.
- ``fpi``: foreign-patch interpolation (Tan et al. 2020): inside a blob ``x1' = (1 − α)·x1 + α·x2`` with ``x2``
  another normal slice of the batch and ``α`` (the foreign fraction) in ``[0.05, 0.95]``; label ``α``.
- ``pii``: Poisson image interpolation (Tan et al. 2021): inside a blob the slice solves the Poisson equation
  with the mixed guidance field of PII (per edge ``α·∇x2`` unless ``(1 − α)·|∇x1| > α·|∇x2|``, then
  ``(1 − α)·∇x1``) and ``x1`` on the blob's border; solved by conjugate gradients in torch; label ``α``.

Shapes: ``random_blobs`` thresholds a smooth random field around an ellipse (lobulated, not only elliptical),
with a diameter drawn log-uniformly in ``diameter_mm`` (default 3–80 mm) at ``pixel_mm`` mm per pixel, and
sharp (about one pixel) or soft margins. Its support provably lies within those sizes: it holds a disc of the
smallest radius and lies inside a disc of the largest around its centre.

The training anomalies of two detectors, also inside the ROI only:

- DRAEM's (``perlin_anomalies``): thresholded, rotated Perlin noise (``perlin_noise``, ``perlin_masks``; as a MONAI
  random transform ``RandPerlinMask`` / ``RandPerlinMaskd``) into which a texture is blended (``texture_blend``).
- CutPaste's (``cutpaste``, ``cutpaste_scar``): a rectangle or a thin rotated scar cut from the liver,
  brightness/contrast-jittered and pasted elsewhere in it (``paste_patches``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Randomizable, Transform

from monai_ad.components.smoothing import gaussian_blur2d


KINDS = ("density", "texture", "fpi", "pii")
DEFAULT_KIND_WEIGHTS = {"density": 0.4, "texture": 0.15, "fpi": 0.2, "pii": 0.25}
DEFAULT_HU_WIDTH = 400.0  # the default abdominal window −160..240 HU: 1 HU = 1/400 of the [0, 1] range
NOISE_GRID = 6  # control points across the blob's neighbourhood of the random field that shapes it


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * (high - low) + low).to(device)


# ----------------------------------------------------------------------------- shapes
@dataclass
class Blobs:
    """Random blobs of a batch: ``depth`` ``[B, 1, H, W]`` is how far (in pixels, approximately) each pixel lies
    inside its blob's boundary (negative outside); ``support = depth > 0``. ``center`` ``[B, 2]`` (row, col),
    ``min_radius`` / ``max_radius`` ``[B]`` in pixels bound the support around the centre."""

    depth: torch.Tensor
    center: torch.Tensor
    min_radius: torch.Tensor
    max_radius: torch.Tensor

    @property
    def support(self) -> torch.Tensor:
        return self.depth > 0

    def mask(self, margin_px: torch.Tensor | float) -> torch.Tensor:
        """Soft mask in ``[0, 1]``: 0 outside, rising over ``margin_px`` pixels (per sample) to 1 inside."""
        margin = torch.as_tensor(margin_px, dtype=self.depth.dtype, device=self.depth.device).clamp_min(1e-3)
        if margin.ndim:
            margin = margin.view(-1, 1, 1, 1)
        return (self.depth / margin).clamp(0.0, 1.0)


def roi_centers(roi: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One pixel per sample drawn uniformly from its ROI ``[B, 1, H, W]`` (the image centre when a sample has
    none): ``[B, 2]`` float (row, col)."""
    b, _, h, w = roi.shape
    weights = roi.reshape(b, -1).float().cpu()
    empty = weights.sum(1) == 0
    weights[empty] = 1.0
    index = torch.multinomial(weights, 1, generator=generator)[:, 0]
    center = torch.stack([index // w, index % w], 1).float()
    center[empty] = torch.tensor([(h - 1) / 2, (w - 1) / 2])
    return center.to(roi.device)


def random_blobs(
    shape: Sequence[int],
    center: torch.Tensor,
    pixel_mm: float | torch.Tensor,
    generator: torch.Generator | None = None,
    diameter_mm: tuple[float, float] = (3.0, 80.0),
    max_aspect: float = 1.8,
    max_roughness: float = 0.35,
) -> Blobs:
    """Random smooth blobs around ``center`` ``[B, 2]`` in a ``shape = (B, H, W)`` batch.

    A blob is ``{d(p) < 1 + a·n(p)}``: ``d`` the elliptical distance (semi-axes ``ra ≥ rb``, random orientation,
    aspect up to ``max_aspect``), ``n`` a smooth random field in ``[−1, 1]`` (bilinear interpolation of
    ``NOISE_GRID``² random values laid over the blob's neighbourhood: lobulated outlines) and ``a`` the roughness
    (up to ``max_roughness``). The nominal diameter is log-uniform in ``diameter_mm`` and the axes are clamped so
    that the support contains the disc of diameter ``diameter_mm[0]`` and lies inside the disc of diameter
    ``diameter_mm[1]`` (``rb·(1 − a)`` and ``ra·(1 + a)``).
    """
    b, h, w = (int(s) for s in shape)
    device = center.device
    px = torch.as_tensor(pixel_mm, dtype=torch.float32).reshape(-1).to(device).expand(b)
    low, high = (float(v) for v in diameter_mm)
    if not 0 < low <= high:
        raise ValueError(f"diameter_mm must be 0 < low <= high, got {diameter_mm}")
    diameter = torch.exp(_uniform(b, math.log(low), math.log(high), generator, device))
    aspect = _uniform(b, 1.0, max_aspect, generator, device)
    roughness = _uniform(b, 0.0, max_roughness, generator, device)
    angle = _uniform(b, 0.0, math.pi, generator, device)
    radius = diameter / 2 / px
    r_min, r_max = low / 2 / px, high / 2 / px
    rb = torch.maximum(radius / aspect.sqrt(), r_min / (1 - roughness))
    ra = torch.minimum(torch.maximum(radius * aspect.sqrt(), rb), r_max / (1 + roughness))
    rb = torch.minimum(rb, ra)  # only when the diameter range is narrower than the roughness allows
    rows = torch.arange(h, device=device, dtype=torch.float32).view(1, h, 1) - center[:, 0].view(b, 1, 1)
    cols = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, w) - center[:, 1].view(b, 1, 1)
    cos, sin = angle.cos().view(b, 1, 1), angle.sin().view(b, 1, 1)
    u = (cos * cols + sin * rows) / ra.view(b, 1, 1)
    v = (-sin * cols + cos * rows) / rb.view(b, 1, 1)
    distance = torch.sqrt(u.square() + v.square())
    control = torch.rand(b, 1, NOISE_GRID, NOISE_GRID, generator=generator).to(device) * 2 - 1
    grid = torch.stack([u, v], -1) / 2.0  # the unit ellipse covers the middle half of the random field
    field = F.grid_sample(control, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    threshold = 1 + roughness.view(b, 1, 1) * field
    depth = (threshold - distance) * torch.sqrt(ra * rb).view(b, 1, 1)
    return Blobs(depth[:, None], center, rb * (1 - roughness), ra * (1 + roughness))


def random_margins(blobs: Blobs, generator: torch.Generator | None = None, p_sharp: float = 0.5) -> torch.Tensor:
    """Soft masks of ``blobs``: sharp (a one-pixel edge) with probability ``p_sharp``, else a soft margin of 20–80 %
    of the blob's smallest radius."""
    b = blobs.depth.shape[0]
    device = blobs.depth.device
    sharp = torch.rand(b, generator=generator).to(device) < p_sharp
    soft = _uniform(b, 0.2, 0.8, generator, device) * blobs.min_radius.clamp_min(1.0)
    return blobs.mask(torch.where(sharp, torch.ones_like(soft), soft.clamp_min(1.0)))


# ----------------------------------------------------------------------------- changes
def hu_scale_for(channels: int, window: Sequence[float] | None = None, windows: Sequence[Sequence[float]] | None = None) -> torch.Tensor:
    """``[C]``: the change of the ``[0, 1]`` intensity per HU in each channel (``1 / window width``)."""
    if windows:
        if len(windows) != channels:
            raise ValueError(f"{len(windows)} HU windows for {channels} channels")
        return torch.tensor([1.0 / (float(hi) - float(lo)) for lo, hi in windows])
    width = float(window[1]) - float(window[0]) if window is not None else DEFAULT_HU_WIDTH
    return torch.full((channels,), 1.0 / width)


def _per_channel(hu_scale: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    scale = torch.as_tensor(hu_scale, dtype=x.dtype, device=x.device).reshape(-1)
    return scale.view(1, -1, 1, 1) if scale.numel() > 1 else scale.view(1, 1, 1, 1)


def density_change(
    x: torch.Tensor, mask: torch.Tensor, delta_hu: torch.Tensor, hu_scale: torch.Tensor | float = 1 / DEFAULT_HU_WIDTH
) -> torch.Tensor:
    """``x + mask·Δ`` in every channel, ``Δ`` = ``delta_hu`` (``[B]`` or a map ``[B, 1, H, W]``) converted with
    ``hu_scale`` (per HU, per channel); clipped to ``[0, 1]``."""
    delta = delta_hu.view(-1, 1, 1, 1) if delta_hu.ndim == 1 else delta_hu
    return (x + mask * delta * _per_channel(hu_scale, x)).clamp(0.0, 1.0)


def texture_change(
    x: torch.Tensor,
    mask: torch.Tensor,
    grain_hu: torch.Tensor,
    shift_hu: torch.Tensor,
    hu_scale: torch.Tensor | float = 1 / DEFAULT_HU_WIDTH,
    generator: torch.Generator | None = None,
    smooth_px: float = 2.0,
    grain_px: float = 1.5,
) -> torch.Tensor:
    """Inside ``mask`` the parenchyma's fine texture is smoothed away (Gaussian, ``smooth_px``) and replaced by
    coarser grain (Gaussian noise smoothed by ``grain_px``, standard deviation ``grain_hu`` ``[B]``), plus a density
    shift ``shift_hu`` ``[B]``; the same grain in every channel. Clipped to ``[0, 1]``."""

    b, _, h, w = x.shape
    smooth = gaussian_blur2d(x, smooth_px)
    noise = gaussian_blur2d(torch.randn(b, 1, h, w, generator=generator).to(x.device), grain_px)
    noise = noise / noise.flatten(1).std(1).clamp_min(1e-6).view(b, 1, 1, 1)
    hu = noise * grain_hu.view(b, 1, 1, 1) + shift_hu.view(b, 1, 1, 1)
    changed = smooth + hu * _per_channel(hu_scale, x)
    return (x + mask * (changed - x)).clamp(0.0, 1.0)


def foreign_patch(x1: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """FPI: ``x1 + mask·α·(x2 − x1)``, i.e. ``(1 − α)·x1 + α·x2`` where the mask is 1; ``alpha`` ``[B]``."""
    return x1 + mask * alpha.view(-1, 1, 1, 1) * (x2 - x1)


def _neighbour_sum(u: torch.Tensor) -> torch.Tensor:
    """Sum of the 4 neighbours of each pixel (zero beyond the image)."""
    p = F.pad(u, (1, 1, 1, 1))
    return p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]


def _differences(x: torch.Tensor) -> list[torch.Tensor]:
    """``x_p − x_q`` for the 4 neighbours ``q`` of each pixel (0 across the image border)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return [x - p[..., :-2, 1:-1], x - p[..., 2:, 1:-1], x - p[..., 1:-1, :-2], x - p[..., 1:-1, 2:]]


def mixed_guidance_divergence(x1: torch.Tensor, x2: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``Σ_q v_pq`` of PII's mixed guidance field: per edge ``α·(x2_p − x2_q)``, unless
    ``(1 − α)·|x1_p − x1_q| > α·|x2_p − x2_q|``, then ``(1 − α)·(x1_p − x1_q)``."""
    a = alpha.view(-1, 1, 1, 1)
    total = torch.zeros_like(x1)
    for d1, d2 in zip(_differences(x1), _differences(x2)):
        own, foreign = (1 - a) * d1, a * d2
        total += torch.where(own.abs() > foreign.abs(), own, foreign)
    return total


def poisson_blend(
    x1: torch.Tensor, x2: torch.Tensor, region: torch.Tensor, alpha: torch.Tensor, iterations: int = 60
) -> torch.Tensor:
    """PII: inside ``region`` (bool ``[B, 1, H, W]``) the solution ``f`` of ``4·f_p − Σ_q f_q = Σ_q v_pq`` (the
    discrete Poisson equation with PII's mixed guidance ``v``, ``mixed_guidance_divergence``), with ``f = x1``
    outside the region; ``iterations`` conjugate-gradient steps per sample from the FPI blend as start; clipped to
    ``[0, 1]``. The image border never belongs to the region."""
    inside = region.clone()
    inside[..., 0, :] = inside[..., -1, :] = False
    inside[..., :, 0] = inside[..., :, -1] = False
    inside = inside.to(x1.dtype).expand_as(x1)
    outside = 1 - inside
    b = inside * (mixed_guidance_divergence(x1, x2, alpha) + _neighbour_sum(x1 * outside))

    def apply(u: torch.Tensor) -> torch.Tensor:  # the Laplacian restricted to the region (SPD there)
        return inside * (4 * u - _neighbour_sum(u * inside))

    def dot(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p * q).flatten(1).sum(1).view(-1, 1, 1, 1)

    u = inside * foreign_patch(x1, x2, torch.ones_like(inside[:, :1]), alpha)
    r = b - apply(u)
    p = r.clone()
    rr = dot(r, r)
    for _ in range(int(iterations)):
        ap = apply(p)
        step = rr / dot(p, ap).clamp_min(1e-20)
        u = u + step * p
        r = r - step * ap
        rr_new = dot(r, r)
        p = r + (rr_new / rr.clamp_min(1e-20)) * p
        rr = rr_new
    return (x1 * outside + u * inside).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- the training mix
@dataclass
class SynthesisConfig:
    """What ``synthesize`` draws from (see the module docstring). ``p_anomaly``: share of changed samples."""

    p_anomaly: float = 0.5
    kinds: Mapping[str, float] | None = None  # weights per kind; default DEFAULT_KIND_WEIGHTS
    diameter_mm: tuple[float, float] = (3.0, 80.0)
    delta_hu: tuple[float, float] = (-80.0, 60.0)
    min_delta_hu: float = 10.0  # density changes smaller than this are not drawn (they would be noise)
    grain_hu: tuple[float, float] = (8.0, 30.0)
    alpha: tuple[float, float] = (0.05, 0.95)
    pii_iterations: int = 60

    def weights(self) -> dict[str, float]:
        kinds = dict(self.kinds or DEFAULT_KIND_WEIGHTS)
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown synthetic anomaly kind(s): {', '.join(sorted(unknown))}")
        return {k: float(v) for k, v in kinds.items() if v > 0}


def _delta(n: int, config: SynthesisConfig, generator, device) -> torch.Tensor:
    """Density changes in HU drawn uniformly from ``delta_hu`` without ``(−min_delta_hu, min_delta_hu)``."""
    low, high = config.delta_hu
    gap = config.min_delta_hu
    below, above = max(0.0, min(high, -gap) - low), max(0.0, high - max(low, gap))
    t = torch.rand(n, generator=generator) * (below + above)
    return torch.where(t < below, low + t, max(low, gap) + (t - below)).to(device)


def synthesize(
    image: torch.Tensor,
    roi: torch.Tensor,
    pixel_mm: float | torch.Tensor,
    generator: torch.Generator | None = None,
    config: SynthesisConfig | None = None,
    hu_scale: torch.Tensor | float = 1 / DEFAULT_HU_WIDTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Change a random ``p_anomaly`` share of the batch: ``(image', label)``, ``label`` ``[B, 1, H, W]`` the
    per-pixel anomaly strength in ``[0, 1]`` (the mask for density and texture changes, the foreign fraction
    ``α`` for FPI and PII), 0 outside the ROI and in unchanged samples; ``image'`` equals ``image`` outside the
    ROI. FPI and PII take the foreign content from another slice of the batch (a cyclic shift) and change only
    where both slices are in their ROI; with a batch of one they are replaced by density changes."""
    config = config or SynthesisConfig()
    b, _, h, w = image.shape
    device = image.device
    roi = roi.bool()
    x = image.float()
    label = torch.zeros(b, 1, h, w, device=device)
    weights = config.weights()
    if b == 0 or not weights:
        return x, label
    names = list(weights)
    chosen = torch.multinomial(torch.tensor([weights[k] for k in names]), b, replacement=True, generator=generator)
    changed = torch.rand(b, generator=generator) < config.p_anomaly
    blobs = random_blobs((b, h, w), roi_centers(roi, generator), pixel_mm, generator, config.diameter_mm)
    mask = random_margins(blobs, generator)
    partner = torch.roll(torch.arange(b), 1).to(device)
    out = x.clone()
    for k, name in enumerate(names):
        sel = (changed & (chosen == k)).nonzero()[:, 0]
        if sel.numel() == 0:
            continue
        if name in ("fpi", "pii") and b < 2:
            name = "density"
        m = mask[sel.to(device)] if name != "pii" else blobs.support[sel.to(device)].float()
        idx = sel.to(device)
        xs = x[idx]
        n = sel.numel()
        if name == "density":
            delta = _delta(n, config, generator, device)
            style = torch.randint(0, 3, (n,), generator=generator).to(device)  # uniform, heterogeneous, rim
            hetero = torch.rand(n, 1, NOISE_GRID, NOISE_GRID, generator=generator).to(device)
            field = F.interpolate(hetero, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
            scale = torch.where((style == 1).view(-1, 1, 1, 1), 0.4 + 0.6 * field, torch.ones_like(field))
            delta_map = delta.view(-1, 1, 1, 1) * scale
            rim_width = (blobs.min_radius[idx] * 0.35).clamp_min(1.0)
            rim = ((blobs.depth[idx] > 0) & (blobs.depth[idx] < rim_width.view(-1, 1, 1, 1))).float()
            rim_hu = _uniform(n, 10.0, 50.0, generator, device).view(-1, 1, 1, 1)
            is_rim = (style == 2).view(-1, 1, 1, 1)
            core = -delta.abs().view(-1, 1, 1, 1)  # a rim lesion: hypodense core, denser rim
            delta_map = torch.where(is_rim, core * (1 - rim) + rim_hu * rim, delta_map)
            m = torch.where(is_rim, blobs.support[idx].float(), m)
            result = density_change(xs, m, delta_map, hu_scale)
            strength = m
        elif name == "texture":
            grain = _uniform(n, *config.grain_hu, generator, device)
            shift = _uniform(n, -10.0, 10.0, generator, device)
            result = texture_change(xs, m, grain, shift, hu_scale, generator)
            strength = m
        else:
            pidx = partner[idx]
            both = (roi[idx] & roi[pidx]).float()
            alpha = _uniform(n, *config.alpha, generator, device)
            m = m * both
            if name == "fpi":
                result = foreign_patch(xs, x[pidx], m, alpha)
            else:
                result = poisson_blend(xs, x[pidx], m > 0, alpha, config.pii_iterations)
            differs = ((x[pidx] - xs).abs().amax(1, keepdim=True) > 1e-3).float()
            strength = m * alpha.view(-1, 1, 1, 1) * differs
        out[idx] = result
        label[idx] = strength
    out = torch.where(roi, out, x)
    label = label * roi
    return out, label.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- Perlin-noise anomalies (DRAEM)
def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    shape: Sequence[int], cells: torch.Tensor, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Gradient (Perlin) noise ``[B, 1, H, W]`` for ``shape = (B, H, W)``, about in ``[−1, 1]``: sample ``i`` has
    ``cells[i] = (rows, cols)`` lattice cells across the image, a random unit gradient at each lattice point and
    the quintic fade between them (scaled by √2 as DRAEM's generator). Any ``H, W`` (no divisibility needed)."""
    b, h, w = (int(s) for s in shape)
    cells = torch.as_tensor(cells, dtype=torch.long).reshape(b, 2)
    most = int(cells.max())
    # one gradient lattice per sample, as large as the finest one (samples with fewer cells use its top-left part)
    angle = torch.rand(b, most + 1, most + 1, generator=generator) * (2 * math.pi)
    gradient = torch.stack([angle.sin(), angle.cos()], -1)  # (row, col) components
    rows, cols = cells[:, 0].float().view(b, 1), cells[:, 1].float().view(b, 1)
    y = (torch.arange(h, dtype=torch.float32) + 0.5).view(1, h) * rows / h  # [B, H] in lattice units
    x = (torch.arange(w, dtype=torch.float32) + 0.5).view(1, w) * cols / w
    y0 = torch.minimum(y.floor(), rows - 1).long()
    x0 = torch.minimum(x.floor(), cols - 1).long()
    fy, fx = (y - y0)[:, :, None], (x - x0)[:, None, :]  # [B, H, 1], [B, 1, W]
    batch = torch.arange(b).view(b, 1, 1)

    def corner(dr: int, dc: int) -> torch.Tensor:
        g = gradient[batch, (y0 + dr)[:, :, None], (x0 + dc)[:, None, :]]  # [B, H, W, 2]
        return g[..., 0] * (fy - dr) + g[..., 1] * (fx - dc)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return (math.sqrt(2) * torch.lerp(top, bottom, ty))[:, None].to(device)


def rotate_maps(maps: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each ``[B, 1, H, W]`` map rotated about its centre by ``degrees[i]`` (bilinear, 0 where it comes from
    outside the image, as imgaug's ``Affine(rotate=...)``)."""
    radians = torch.as_tensor(degrees, dtype=torch.float32, device=maps.device).reshape(-1) * (math.pi / 180)
    cos, sin = radians.cos(), radians.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, list(maps.shape), align_corners=False)
    return F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def perlin_masks(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device=None,
    max_scale_log2: int = 6,
    threshold: float = 0.5,
    max_rotation: float = 90.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM's anomaly masks for ``shape = (B, H, W)``: Perlin noise of ``2^k`` cells per axis (``k`` drawn per
    axis and sample from ``0 … max_scale_log2 − 1``), rotated by ``U(−max_rotation, max_rotation)`` degrees and
    thresholded at ``threshold``. Returns ``(mask [B, 1, H, W] bool, rotated noise [B, 1, H, W])``."""
    b = int(shape[0])
    if int(max_scale_log2) < 1:
        raise ValueError(f"max_scale_log2 must be at least 1, got {max_scale_log2}")
    cells = 2 ** torch.randint(0, int(max_scale_log2), (b, 2), generator=generator)
    noise = perlin_noise(shape, cells, generator)
    angle = (torch.rand(b, generator=generator) * 2 - 1) * float(max_rotation)
    noise = rotate_maps(noise, angle).to(device)
    return noise > float(threshold), noise


def texture_blend(x: torch.Tensor, mask: torch.Tensor, texture: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """DRAEM's blend ``x·(1 − M) + (1 − β)·S·M + β·x·M``: inside the mask ``M`` the texture ``S`` (``[B, 1 or C, H,
    W]``) replaces the slice with opacity ``1 − β`` (``beta`` ``[B]``)."""
    b = beta.to(x.device, x.dtype).view(-1, 1, 1, 1)
    m = mask.to(x.dtype)
    return x * (1 - m) + (1 - b) * texture.to(x.dtype) * m + b * x * m


def perlin_anomalies(
    image: torch.Tensor,
    roi: torch.Tensor,
    generator: torch.Generator | None = None,
    p_anomaly: float = 0.5,
    beta: tuple[float, float] = (0.0, 0.8),
    max_scale_log2: int = 6,
    threshold: float = 0.5,
    texture: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM's training anomalies on a batch: a random ``p_anomaly`` share of the samples gets a Perlin mask
    (``perlin_masks``) inside the ROI into which ``texture`` is blended (``texture_blend``, ``β ~ U(beta)``); the
    others are left as they are. ``texture`` ``[B, 1 or C, H, W]`` in ``[0, 1]`` (a texture image set, as DRAEM's
    DTD); by default an independent Perlin field per sample, min–max scaled to ``[0, 1]`` (BMAD ran DRAEM without
    DTD, on noise as the texture). Returns ``(image', mask [B, 1, H, W] float)``; ``image'`` equals ``image``
    outside the mask, in every channel."""
    b, _, h, w = image.shape
    device = image.device
    x = image.float()
    mask, _ = perlin_masks((b, h, w), generator, device, max_scale_log2, threshold)
    changed = (torch.rand(b, generator=generator) < float(p_anomaly)).to(device).view(-1, 1, 1, 1)
    mask = mask & roi.bool() & changed
    if texture is None:
        _, texture = perlin_masks((b, h, w), generator, device, max_scale_log2, threshold)
        low = texture.flatten(1).amin(1).view(-1, 1, 1, 1)
        high = texture.flatten(1).amax(1).view(-1, 1, 1, 1)
        texture = (texture - low) / (high - low).clamp_min(1e-6)
    low_beta, high_beta = (float(v) for v in beta)
    opacity = _uniform(b, low_beta, high_beta, generator, device)
    return texture_blend(x, mask, texture, opacity).clamp(0.0, 1.0), mask.float()


class RandPerlinMask(Randomizable, Transform):
    """MONAI array transform: a DRAEM anomaly mask ``[1, H, W]`` (float 0/1, on the image's device) for a
    channel-first image ``[C, H, W]`` (``perlin_masks``); seeded through ``set_random_state`` as any MONAI random
    transform, so it composes with ``monai.transforms.Compose``."""

    def __init__(self, max_scale_log2: int = 6, threshold: float = 0.5, max_rotation: float = 90.0):
        self.max_scale_log2, self.threshold = int(max_scale_log2), float(threshold)
        self.max_rotation = float(max_rotation)
        self._seed = 0

    def randomize(self, data=None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        generator = torch.Generator().manual_seed(self._seed)
        h, w = img.shape[-2:]
        mask, _ = perlin_masks((1, h, w), generator, None, self.max_scale_log2, self.threshold, self.max_rotation)
        return mask[0].float().to(torch.as_tensor(img).device)


class RandPerlinMaskd(Randomizable, MapTransform):
    """Dictionary form of ``RandPerlinMask``: writes the mask of ``keys``' (first) image to ``mask_key``."""

    def __init__(self, keys, mask_key: str = "anomaly_mask", allow_missing_keys: bool = False, **kwargs):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.mask_key = mask_key
        self.masker = RandPerlinMask(**kwargs)

    def set_random_state(self, seed=None, state=None) -> "RandPerlinMaskd":
        super().set_random_state(seed, state)
        self.masker.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.masker.randomize()

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.mask_key] = self.masker(d[key])
            break
        return d


# ----------------------------------------------------------------------------- CutPaste augmentations
def paste_patches(
    x: torch.Tensor,
    source_center: torch.Tensor,
    target_center: torch.Tensor,
    half_size: torch.Tensor,
    angle: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a ``2·half_size`` (rows, cols) rectangle around ``source_center`` of each slice, change its brightness
    and contrast (factors ``[B]``, as torchvision's ``ColorJitter`` on a grey image: ``·brightness``, then
    ``(v − mean)·contrast + mean``), rotate it by ``angle`` radians and paste it around ``target_center``.
    Centres and half sizes ``[B, 2]`` in pixels (row, col). Returns ``(x', pasted [B, 1, H, W] bool)``."""
    b, _, h, w = x.shape
    device = x.device
    rows = torch.arange(h, device=device, dtype=torch.float32).view(1, h, 1) - target_center[:, 0].view(b, 1, 1)
    cols = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, w) - target_center[:, 1].view(b, 1, 1)
    cos, sin = angle.cos().view(b, 1, 1), angle.sin().view(b, 1, 1)
    local_r, local_c = cos * rows + sin * cols, -sin * rows + cos * cols  # the target offset rotated back
    inside = (local_r.abs() <= half_size[:, 0].view(b, 1, 1)) & (local_c.abs() <= half_size[:, 1].view(b, 1, 1))
    source_r, source_c = source_center[:, 0].view(b, 1, 1) + local_r, source_center[:, 1].view(b, 1, 1) + local_c
    grid = torch.stack([(source_c + 0.5) / w * 2 - 1, (source_r + 0.5) / h * 2 - 1], -1)
    patch = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    patch = patch * brightness.view(b, 1, 1, 1)
    weight = inside[:, None].float()
    mean = (patch * weight).flatten(1).sum(1) / (weight.flatten(1).sum(1) * x.shape[1]).clamp_min(1.0)
    patch = (patch - mean.view(b, 1, 1, 1)) * contrast.view(b, 1, 1, 1) + mean.view(b, 1, 1, 1)
    pasted = inside[:, None]
    return torch.where(pasted, patch.clamp(0.0, 1.0), x.float()), pasted


def _jitter(b: int, strength: float, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (_uniform(b, 1 - strength, 1 + strength, generator, device),
            _uniform(b, 1 - strength, 1 + strength, generator, device))  # fmt: skip


def cutpaste(
    image: torch.Tensor,
    roi: torch.Tensor,
    generator: torch.Generator | None = None,
    area: tuple[float, float] = (0.02, 0.15),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    jitter: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste (Li et al. 2021): a rectangle of ``area`` (share of the slice) and aspect ratio log-uniform in
    ``aspect`` is cut, colour-jittered and pasted elsewhere; here both places are pixels of the ROI (the liver),
    where a lesion would be. Returns ``(image', pasted)`` (``paste_patches``)."""
    b, _, h, w = image.shape
    device = image.device
    share = _uniform(b, *area, generator, device) * (h * w)
    ratio = torch.exp(_uniform(b, math.log(aspect[0]), math.log(aspect[1]), generator, device))
    height = (share * ratio).sqrt().clamp(1.0, h - 1)
    width = (share / ratio).sqrt().clamp(1.0, w - 1)
    source, target = roi_centers(roi, generator), roi_centers(roi, generator)
    brightness, contrast = _jitter(b, jitter, generator, device)
    zero = torch.zeros(b, device=device)
    return paste_patches(image, source, target, torch.stack([height, width], 1) / 2, zero, brightness, contrast)


def cutpaste_scar(
    image: torch.Tensor,
    roi: torch.Tensor,
    generator: torch.Generator | None = None,
    width: tuple[float, float] = (2.0, 16.0),
    height: tuple[float, float] = (10.0, 25.0),
    rotation: float = 45.0,
    jitter: float = 0.1,
    reference_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste-Scar: a thin rectangle ``width`` × ``height`` pixels (at ``reference_size``, the paper's 256 px;
    scaled to the slice), rotated by ``U(−rotation, rotation)`` degrees, colour-jittered, cut and pasted between two
    ROI pixels. Returns ``(image', pasted)``."""
    b, _, h, w = image.shape
    device = image.device
    scale = min(h, w) / float(reference_size)
    size = torch.stack([_uniform(b, *height, generator, device), _uniform(b, *width, generator, device)], 1)
    half = (size * scale / 2).clamp_min(0.5)
    angle = _uniform(b, -rotation, rotation, generator, device) * (math.pi / 180)
    source, target = roi_centers(roi, generator), roi_centers(roi, generator)
    brightness, contrast = _jitter(b, jitter, generator, device)
    return paste_patches(image, source, target, half, angle, brightness, contrast)


__all__ = [
    "Blobs",
    "DEFAULT_KIND_WEIGHTS",
    "KINDS",
    "RandPerlinMask",
    "RandPerlinMaskd",
    "SynthesisConfig",
    "cutpaste",
    "cutpaste_scar",
    "density_change",
    "foreign_patch",
    "hu_scale_for",
    "mixed_guidance_divergence",
    "paste_patches",
    "perlin_anomalies",
    "perlin_masks",
    "perlin_noise",
    "poisson_blend",
    "random_blobs",
    "random_margins",
    "roi_centers",
    "rotate_maps",
    "synthesize",
    "texture_blend",
    "texture_change",
]
