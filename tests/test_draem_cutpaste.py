"""DRAEM and CutPaste on the CPU: their losses and densities against hand computations, the shapes of their
networks and maps, the patch map's geometry and bad settings. Their lesion ranking, fitted save/load and refit are
checked with every detector (test_lesion_ranking, test_detector_lifecycle)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf

from monai_ad.detectors import create_detector
from monai_ad.detectors.cutpaste import GaussianDensity, ledoit_wolf_covariance
from monai_ad.detectors.draem.torch_model import DraemLoss, DraemModel, focal_loss
from monai_ad.errors import InputError


# ----------------------------------------------------------------------------- DRAEM
def test_focal_loss_is_its_formula_and_down_weights_easy_pixels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 4, 4, generator=generator)
    target = (torch.rand(2, 1, 4, 4, generator=generator) > 0.5).float()
    p = torch.softmax(logits, 1)
    p_true = torch.where(target[:, 0] > 0, p[:, 1], p[:, 0])
    expected = (-(1 - p_true) ** 2 * p_true.log()).mean()
    assert focal_loss(logits, target, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    cross_entropy = F.cross_entropy(logits, target[:, 0].long())
    assert focal_loss(logits, target, 0.0).item() == pytest.approx(cross_entropy.item(), rel=1e-5)
    assert focal_loss(logits, target, 2.0) < focal_loss(logits, target, 0.0)


def test_draem_loss_is_l2_plus_one_minus_ssim_plus_focal():
    generator = torch.Generator().manual_seed(1)
    original = torch.rand(2, 1, 32, 32, generator=generator)
    reconstruction = (original + 0.1 * torch.randn(2, 1, 32, 32, generator=generator)).clamp(0, 1)
    logits, mask = torch.randn(2, 2, 32, 32, generator=generator), torch.zeros(2, 1, 32, 32)
    loss = DraemLoss(2.0)
    expected = F.mse_loss(reconstruction, original) + loss.ssim(reconstruction, original) + focal_loss(logits, mask)
    assert loss(reconstruction, original, logits, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.ssim(original, original).item() == pytest.approx(0.0, abs=1e-5)  # 1 − SSIM of identical images


def test_draem_networks_keep_the_slice_shape_and_give_two_logits():
    model = DraemModel(channels=3, reconstruction_width=4, discriminator_width=4)
    reconstruction, logits = model(torch.rand(2, 3, 64, 64))
    assert reconstruction.shape == (2, 3, 64, 64) and logits.shape == (2, 2, 64, 64)
    assert model.discriminative.encoder.blocks[0][0].in_channels == 6  # the slice and its reconstruction


def test_draem_map_is_the_mean_filtered_anomaly_probability_and_its_slice_score_the_liver_maximum():
    detector = create_detector("draem", image_size=64, width=4, discriminator_width=4, mean_filter=5)
    detector._fitted.fill_(True)
    image = torch.rand(2, 1, 64, 64)
    roi = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    roi[:, :, 16:48, 16:48] = True
    scores = detector.score(image, roi)
    with torch.no_grad():
        probability = detector.eval().anomaly_probability(image)
    expected = F.avg_pool2d(probability[:, None], 5, stride=1, padding=2)[:, 0]
    assert torch.allclose(scores.pixel, expected, atol=1e-6)
    assert torch.allclose(scores.slice, expected[:, 16:48, 16:48].flatten(1).amax(1))


# ----------------------------------------------------------------------------- CutPaste
def test_ledoit_wolf_covariance_equals_scikit_learns():
    rows = torch.randn(40, 12, generator=torch.Generator().manual_seed(2)) @ torch.randn(12, 12)
    covariance, shrinkage = ledoit_wolf_covariance(rows)
    reference = LedoitWolf().fit(rows.double().numpy())
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-6)
    assert np.allclose(covariance.numpy(), reference.covariance_, atol=1e-9)


def test_gaussian_density_is_the_mahalanobis_distance_of_normalised_embeddings():
    generator = torch.Generator().manual_seed(3)
    train = torch.randn(50, 6, generator=generator) + 2
    density = GaussianDensity().fit(train)
    normalised = F.normalize(train.double(), dim=1)
    covariance, _ = ledoit_wolf_covariance(normalised)
    query = torch.randn(4, 6, generator=generator)
    delta = F.normalize(query.double(), dim=1) - normalised.mean(0)
    expected = torch.einsum("bi,ij,bj->b", delta, torch.linalg.inv(covariance), delta).sqrt()
    assert torch.allclose(density(query).double(), expected, rtol=1e-4)
    assert density(-train[:4]).min() > density(train[:4]).max()  # far from the normal rows scores higher


def _patch_detector(**hparams):
    detector = create_detector("cutpaste", image_size=64, head_layers=1, head_width=16, embedding_dim=8,
                               patch_window=16, patch_stride=8, sigma=0.0, **hparams)  # fmt: skip
    return detector.eval()


def test_cutpaste_patch_map_puts_each_patch_score_at_its_centre():
    detector = _patch_detector()
    assert detector.patch_count() == 7**2  # (64 − 16) / 8 + 1 patches per axis
    detector.patch_density.mean = torch.zeros(detector.model.backbone.channels[0])
    detector.patch_density.precision = torch.eye(detector.model.backbone.channels[0])
    image = torch.full((1, 1, 64, 64), 0.5)
    image[..., 24:40, 24:40] = 1.0  # exactly the patch of grid cell (3, 3), centred on pixel 32
    with torch.no_grad():
        grid = detector.patch_density(detector.patch_embeddings(image).reshape(-1, detector.model.backbone.channels[0]))
        pixel = detector.patch_map(image)
    grid = grid.reshape(7, 7)
    assert pixel.shape == (1, 64, 64)
    for row, col in ((0, 0), (3, 3), (6, 2)):  # cell (i, j) sits at pixels 8·i + 8 - ½ … (centre 8·i + 8)
        centre = 8 * row + 8, 8 * col + 8
        window = pixel[0, centre[0] - 1 : centre[0] + 1, centre[1] - 1 : centre[1] + 1].mean()
        assert window.item() == pytest.approx(grid[row, col].item(), rel=1e-4)


def test_cutpaste_trains_its_classifier_and_fits_both_densities():
    generator = torch.Generator().manual_seed(4)
    image = 0.5 + 0.05 * torch.rand(6, 1, 64, 64, generator=generator)
    roi = torch.zeros(6, 1, 64, 64, dtype=torch.bool)
    roi[..., 8:56, 8:56] = True
    detector = _patch_detector(steps=3, batch_size=4, freeze_steps=1, allow_random_weights=True)
    before = {k: v.clone() for k, v in detector.model.state_dict().items()}
    detector.fit([{"image": image, "roi": roi}], progress=False)
    changed = [k for k, v in detector.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("classifier.") for k in changed)
    dim = detector.model.backbone.channels[0]
    assert detector.slice_density.precision.shape == (dim, dim) and detector.patch_density.mean.shape == (dim,)
    assert all(p.requires_grad for p in detector.model.parameters())  # unfrozen after training
    scores = detector.score(image, roi)
    assert scores.pixel.shape == (6, 64, 64) and scores.slice.shape == (6,) and torch.isfinite(scores.slice).all()


# ----------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    "name, hparams, words",
    [
        ("draem", {"image_size": 100}, "multiple of 32"),
        ("draem", {"mean_filter": 4}, "odd"),
        ("draem", {"beta": (0.9, 0.1)}, "beta"),
        ("draem", {"p_anomaly": 0}, "p_anomaly"),
        ("draem", {"focal_gamma": -1}, "focal_gamma"),
        ("cutpaste", {"patch_window": 512}, "patch_window"),
        ("cutpaste", {"patch_stride": 100, "patch_window": 64}, "patch_stride"),
        ("cutpaste", {"slice_score": "mean"}, "slice_score"),
        ("cutpaste", {"momentum": 1.5}, "momentum"),
        ("cutpaste", {"backbone": "alexnet"}, "backbone"),
    ],
)
def test_bad_settings_give_a_one_line_error(name, hparams, words):
    with pytest.raises(InputError) as error:
        create_detector(name, **hparams)
    message = str(error.value)
    assert words in message and name in message and "\n" not in message
