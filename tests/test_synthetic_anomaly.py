"""The synthetic-anomaly detector: its synthesis (inside the ROI only, sizes in mm, FPI / PII mixing) and the
detector trained on synthetic liver slices (a darker disc raises its own pixels; save/load round trip on phantom
slices)."""

import math

import numpy as np
import pytest
import torch

from monai_ad.detectors import AnomalyDetector, available_detectors, create_detector
from monai_ad.errors import InputError
from monai_ad.synthesis import (
    KINDS,
    SynthesisConfig,
    density_change,
    foreign_patch,
    hu_scale_for,
    mixed_guidance_divergence,
    poisson_blend,
    random_blobs,
    synthesize,
)
from monai_ad.synthesis import (
    RandPerlinMask,
    RandPerlinMaskd,
    cutpaste,
    cutpaste_scar,
    paste_patches,
    perlin_anomalies,
    perlin_masks,
    perlin_noise,
    texture_blend,
)

from monai_ad.data.datalists import load_datalist
from monai_ad.data.slices import collect_slices
from liver_slices import slice_data
from test_lesion_ranking import CASES, fitted_detector

SIZE = 64


def liver_batch(b: int = 8, size: int = SIZE, channels: int = 1, seed: int = 0):
    """Textured ellipses (the ROI) on zeros, slightly different per sample."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    rois, images = [], []
    for _ in range(b):
        cy, cx = size / 2 + torch.randn(2, generator=g) * 2
        roi = ((yy - cy) / (0.4 * size)) ** 2 + ((xx - cx) / (0.33 * size)) ** 2 < 1
        img = 0.675 + 0.02 * torch.randn(channels, size, size, generator=g)
        images.append(img * roi)
        rois.append(roi[None])
    return torch.stack(images), torch.stack(rois)


# ----------------------------------------------------------------------------- synthesis
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_synthesis_changes_only_the_roi(kind, channels):
    image, roi = liver_batch(6, size=48, channels=channels)
    g = torch.Generator().manual_seed(1)
    out, label = synthesize(image, roi, 1.5, g, SynthesisConfig(p_anomaly=1.0, kinds={kind: 1.0}))
    outside = ~roi.expand_as(out)
    assert torch.equal(out[outside], image[outside])
    assert not label[~roi].any() and label.max() > 0.04 and label.min() >= 0 and label.max() <= 1  # FPI/PII: α ≥ 0.05
    changed = (out - image).abs().amax(1, keepdim=True) > 1e-4
    assert changed.any() and not (changed & ~roi).any()
    assert out.min() >= 0 and out.max() <= 1
    if channels == 3:  # one lesion through the neighbouring slices: every channel changes where the centre does
        centre = (out[:, 1] - image[:, 1]).abs() > 1e-3
        for c in (0, 2):
            assert ((out[:, c] - image[:, c]).abs() > 1e-4)[centre].float().mean() > 0.9


def test_half_the_batch_is_left_normal():
    image, roi = liver_batch(64, size=32)
    out, label = synthesize(image, roi, 1.5, torch.Generator().manual_seed(0))
    untouched = torch.tensor([torch.equal(o, i) for o, i in zip(out, image)])
    assert 20 <= int(untouched.sum()) <= 44
    assert not label[untouched].any()


@pytest.mark.parametrize("pixel_mm", [0.8, 1.6])
def test_blob_sizes_stay_within_3_to_80_mm(pixel_mm):
    n, size = 400, 128
    center = torch.full((n, 2), size / 2 - 0.5)
    blobs = random_blobs((n, size, size), center, pixel_mm, torch.Generator().manual_seed(2), diameter_mm=(3.0, 80.0))
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    distance_mm = torch.sqrt((yy - center[0, 0]) ** 2 + (xx - center[0, 1]) ** 2) * pixel_mm
    support = blobs.support[:, 0]
    farthest = torch.where(support, distance_mm, torch.zeros_like(distance_mm)).flatten(1).amax(1)
    nearest_out = torch.where(~support, distance_mm, torch.full_like(distance_mm, 1e9)).flatten(1).amin(1)
    assert farthest.max() <= 40.0 + 1e-3  # inside the 80 mm disc
    assert nearest_out.min() >= 1.5 - 1e-3  # holds the 3 mm disc
    diameter = 2 * torch.sqrt(support.flatten(1).sum(1) * pixel_mm**2 / math.pi)
    assert (diameter < 8).any() and (diameter > 40).any()  # the whole range is drawn, not one size
    shapes = {tuple(s.nonzero()[:, 0].tolist()) for s in support.flatten(1)}
    assert len(shapes) > n * 0.75  # random shapes (only the smallest, a few pixels, repeat)


def test_density_change_is_in_hu_of_the_window():
    image, roi = liver_batch(2)
    mask = torch.zeros_like(image)
    mask[..., 28:36, 28:36] = 1
    out = density_change(image, mask, torch.tensor([-40.0, 20.0]), hu_scale_for(1, window=(-160, 240)))
    assert torch.allclose(out[0, 0, 30, 30] - image[0, 0, 30, 30], torch.tensor(-0.1), atol=1e-6)
    assert torch.allclose(out[1, 0, 30, 30] - image[1, 0, 30, 30], torch.tensor(0.05), atol=1e-6)
    assert torch.equal(out[..., :20, :], image[..., :20, :])


def test_foreign_patch_interpolation_mixes_two_slices():
    x1, x2 = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    alpha = torch.tensor([0.3, 0.8])
    out = foreign_patch(x1, x2, mask, alpha)
    for i, a in enumerate(alpha):
        assert torch.allclose(out[i, :, 4:12, 4:12], (1 - a) * x1[i, :, 4:12, 4:12] + a * x2[i, :, 4:12, 4:12])
    assert torch.equal(out[..., :4, :], x1[..., :4, :])
    # in the training mix the label is the foreign fraction
    image, roi = liver_batch(8)
    image = image + 0.2 * torch.arange(8).view(8, 1, 1, 1) / 8 * roi  # every slice differs from its partner
    out, label = synthesize(image, roi, 1.5, torch.Generator().manual_seed(3), SynthesisConfig(p_anomaly=1.0, kinds={"fpi": 1}))
    partner = torch.roll(torch.arange(8), 1)
    full = label > 0
    for i in range(8):
        if full[i].any():
            a = label[i][full[i]].max()
            where = (label[i] == a).expand_as(out[i])
            expected = (1 - a) * image[i] + a * image[partner[i]]
            assert torch.allclose(out[i][where], expected[where], atol=1e-5)


def test_poisson_image_interpolation_solves_the_mixed_gradient_equation():
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.rand(2, 1, 32, 32, generator=g) * 0.5 + 0.25, torch.rand(2, 1, 32, 32, generator=g) * 0.5 + 0.25
    region = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    region[..., 10:22, 8:20] = True
    assert torch.allclose(poisson_blend(x1, x2, region, torch.zeros(2)), x1, atol=1e-5)  # α = 0: nothing foreign
    alpha = torch.tensor([0.5, 0.9])
    out = poisson_blend(x1, x2, region, alpha, iterations=200)
    assert torch.equal(out[~region.expand_as(out)], x1[~region.expand_as(x1)])
    p = torch.nn.functional.pad(out, (1, 1, 1, 1))
    laplacian = 4 * out - (p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:])
    residual = (laplacian - mixed_guidance_divergence(x1, x2, alpha))[region.expand_as(out)]
    assert residual.abs().max() < 1e-3
    # with α near 1 the inside takes the foreign slice's structure: it correlates with x2, not x1
    out = poisson_blend(x1, x2, region, torch.full((2,), 0.95), iterations=200)
    inside = region.expand_as(out)
    corr = lambda a, b: float(np.corrcoef(a[inside].numpy(), b[inside].numpy())[0, 1])  # noqa: E731
    assert corr(out, x2) > 0.8 and corr(out, x1) < 0.3


# ----------------------------------------------------------------------------- the detector
@pytest.fixture(scope="module")
def phantom_slices(tmp_path_factory):
    from monai_ad.data.phantom import write_phantom_dataset
    from monai_ad.transforms.pipeline import PreprocessConfig

    datalist = write_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_normal=4, n_abnormal=0, seed=0, preset="tiny", progress=False)
    config = PreprocessConfig.from_dict({"image_size": SIZE})
    train = collect_slices(load_datalist(datalist, "training"), config, progress=False)
    valid = collect_slices(load_datalist(datalist, "validation"), config, progress=False)
    return train, valid


@pytest.fixture(scope="module")
def fitted():
    # a short schedule that learns on the CPU in seconds: small crops, density changes only; trained on the
    # synthetic liver slices of test_lesion_ranking (one fit shared with it), read here on phantom slices
    assert CASES["synthetic_anomaly"].size == SIZE
    return fitted_detector("synthetic_anomaly")


def test_registered():
    assert "synthetic_anomaly" in available_detectors()


def test_a_darker_disc_raises_its_own_pixels_and_nothing_outside_the_liver(fitted):
    """The same normal slices before and after a -50 HU disc goes in (the ranking against other slices and other
    detectors: test_lesion_ranking)."""
    image, roi = slice_data("textured", SIZE)["normal"]
    image = image.clone()
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    lesions = torch.zeros_like(roi)
    for i in range(len(image)):
        inner = torch.nn.functional.max_pool2d((~roi[i]).float()[None], 15, 1, 7)[0] == 0  # 7 px from the edge
        cy, cx = inner[0].nonzero().float().mean(0)
        lesions[i, 0] = (yy - cy) ** 2 + (xx - cx) ** 2 <= 5**2
    normal = fitted.score(image, roi)
    image[lesions] = (image[lesions] - 50 / 400).clamp(0, 1)  # -50 HU
    abnormal = fitted.score(image, roi)
    inside, disc = roi[:, 0], lesions[:, 0]
    lesion_mean = abnormal.pixel[disc].mean()
    assert lesion_mean > abnormal.pixel[inside & ~disc].quantile(0.95)
    assert lesion_mean > 2 * normal.pixel[disc].mean()  # the same pixels before the lesion went in
    assert bool((abnormal.slice >= normal.slice - 1e-3).all()) and abnormal.slice.mean() > normal.slice.mean()
    assert abnormal.pixel[~inside].abs().max() == 0  # nothing outside the liver


def test_save_load_round_trip_gives_identical_scores(fitted, phantom_slices, tmp_path):
    _, valid = phantom_slices
    image, roi = valid["image"][:8].float(), valid["roi"][:8]
    path = fitted.save(tmp_path / "sa.pt")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["detector"] == "synthetic_anomaly"
    loaded = AnomalyDetector.load(path)
    a, b = fitted.score(image, roi), loaded.score(image, roi)
    assert torch.equal(a.pixel, b.pixel) and torch.equal(a.slice, b.slice)


@pytest.mark.parametrize(
    "hparams",
    [{"image_size": 60}, {"crop_size": 256}, {"steps": 0}, {"lr": -1.0}, {"kinds": {"blur": 1.0}}, {"diameter_mm": [80, 3]},
     {"p_anomaly": 0.0}, {"delta_hu": [20, -20]}],
)  # fmt: skip
def test_bad_hyper_parameters_raise_input_error(hparams):
    with pytest.raises(InputError) as info:
        create_detector("synthetic_anomaly", **hparams)
    assert "\n" not in str(info.value)


def test_wrong_slice_shape_raises_input_error(fitted):
    with pytest.raises(InputError):
        fitted.score(torch.zeros(2, 1, 32, 32))


# ----------------------------------------------------------------------------- Perlin-noise anomalies (DRAEM)
def test_perlin_noise_is_zero_on_the_lattice_and_smooth_between():
    cells = torch.tensor([[4, 4], [1, 2]])
    noise = perlin_noise((2, 64, 64), cells, torch.Generator().manual_seed(0))
    assert noise.shape == (2, 1, 64, 64) and noise.abs().max() <= 1.0 + 1e-5
    # gradient noise vanishes at lattice points (16 px apart), here between pixels 15 and 16: half a pixel away the
    # noise is at most √2 · |offset| ≤ √2 · √2 / 32 in lattice units
    lattice = noise[0, 0, 15:17, 15:17].abs().max()
    assert lattice <= 2 / 32 + 1e-4 < noise[0].abs().mean()
    steps = (noise[:, :, 1:] - noise[:, :, :-1]).abs().max()
    assert steps < 0.3  # no jumps between neighbouring pixels
    again = perlin_noise((2, 64, 64), cells, torch.Generator().manual_seed(0))
    assert torch.equal(noise, again)


def test_perlin_masks_threshold_the_noise_and_draw_coarse_and_fine_scales():
    mask, noise = perlin_masks((32, 64, 64), torch.Generator().manual_seed(1), max_scale_log2=6, threshold=0.5)
    assert mask.dtype == torch.bool and torch.equal(mask, noise > 0.5)
    share = mask.float().mean((1, 2, 3))
    assert 0 < share.mean() < 0.3 and (share > 0).sum() > 8


def test_texture_blend_is_drams_formula():
    generator = torch.Generator().manual_seed(2)
    x, texture = torch.rand(3, 1, 8, 8, generator=generator), torch.rand(3, 1, 8, 8, generator=generator)
    mask = torch.rand(3, 1, 8, 8, generator=generator) > 0.5
    beta = torch.tensor([0.0, 0.4, 1.0])
    out = texture_blend(x, mask, texture, beta)
    m, b = mask.float(), beta.view(-1, 1, 1, 1)
    assert torch.allclose(out, x * (1 - m) + (1 - b) * texture * m + b * x * m)
    assert torch.allclose(out[0][mask[0]], texture[0][mask[0]]) and torch.allclose(out[2], x[2])


@pytest.mark.parametrize("channels", [1, 3])
def test_perlin_anomalies_change_only_the_masked_liver_of_half_the_batch(channels):
    image, roi = liver_batch(64, size=48, channels=channels)
    out, mask = perlin_anomalies(image, roi, torch.Generator().manual_seed(3))
    assert mask.shape == (64, 1, 48, 48) and not mask[~roi].any()
    changed = (out - image).abs().amax(1, keepdim=True) > 1e-6
    assert not (changed & (mask == 0)).any() and changed.any()
    assert out.min() >= 0 and out.max() <= 1
    with_anomaly = mask.flatten(1).any(1)
    assert 8 <= int(with_anomaly.sum()) <= 40  # p_anomaly 0.5, some masks empty inside the liver
    darker = ((out - image) < 0)[mask.bool().expand_as(out)].float().mean()
    assert 0.1 < darker < 0.9  # the texture makes the liver darker in places, brighter in others


def test_rand_perlin_mask_is_a_seeded_monai_transform():
    from monai.transforms import Compose

    image = torch.rand(1, 64, 64)
    masker = RandPerlinMask().set_random_state(seed=5)
    first = masker(image)
    again = RandPerlinMask().set_random_state(seed=5)(image)
    assert first.shape == (1, 64, 64) and torch.equal(first, again)
    assert not all(torch.equal(first, masker(image)) for _ in range(3))  # each call draws a new mask
    pipeline = Compose([RandPerlinMaskd("image", mask_key="mask")]).set_random_state(seed=5)
    assert set(pipeline({"image": image})) == {"image", "mask"}


# ----------------------------------------------------------------------------- CutPaste augmentations
def test_paste_patches_moves_a_rectangle_and_jitters_it():
    x = torch.zeros(1, 1, 32, 32)
    x[..., 4:8, 4:10] = torch.arange(24, dtype=torch.float32).view(4, 6) / 40 + 0.2
    source, target = torch.tensor([[5.5, 6.5]]), torch.tensor([[20.5, 20.5]])
    half, none = torch.tensor([[2.0, 3.0]]), torch.zeros(1)
    out, pasted = paste_patches(x, source, target, half, none, torch.ones(1), torch.ones(1))
    assert torch.allclose(out[..., 19:23, 18:24], x[..., 4:8, 4:10], atol=1e-5)
    assert int(pasted.sum()) == 4 * 6 and torch.equal(out[~pasted.expand_as(out)], x[~pasted.expand_as(x)])
    brighter, _ = paste_patches(x, source, target, half, none, torch.tensor([1.1]), torch.ones(1))
    assert torch.allclose(brighter[..., 19:23, 18:24], 1.1 * x[..., 4:8, 4:10], atol=1e-5)
    turned, turned_mask = paste_patches(x, source, target, half, torch.tensor([math.pi / 2]), torch.ones(1), torch.ones(1))
    rows, cols = turned_mask[0, 0].nonzero().unbind(1)
    assert int(rows.max() - rows.min()) + 1 == 6 and int(cols.max() - cols.min()) + 1 == 4  # rotated by 90°


def test_cutpaste_and_scar_paste_inside_the_liver_at_their_sizes():
    image, roi = liver_batch(16, size=64)
    generator = torch.Generator().manual_seed(6)
    out, pasted = cutpaste(image, roi, generator)
    share = pasted.float().mean((1, 2, 3))
    assert (share > 0.015).all() and (share < 0.2).all()  # 2–15 % of the slice (pixel rounding aside)
    scar, scar_mask = cutpaste_scar(image, roi, generator)
    scar_area = scar_mask.float().sum((1, 2, 3))  # 2–16 × 10–25 px at 256 px, a quarter of each side at 64 px
    assert (scar_area >= 1).all() and (scar_area <= 4 * 7 + 12).all()
    for changed, mask in ((out, pasted), (scar, scar_mask)):
        assert torch.equal(changed[~mask.expand_as(changed)], image[~mask.expand_as(image)])
        weight = mask[:, 0].float()  # the centre of each pasted patch lies in the liver
        rows = (weight.sum(2) * torch.arange(64)).sum(1) / weight.sum((1, 2))
        cols = (weight.sum(1) * torch.arange(64)).sum(1) / weight.sum((1, 2))
        assert roi[torch.arange(16), 0, rows.round().long(), cols.round().long()].all()
