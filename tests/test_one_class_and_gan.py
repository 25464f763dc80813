"""Deep SVDD and GANomaly on the CPU: its windows, centre, objectives and scores against hand computations, what trains and what
is saved, and bad settings. Its lesion ranking, fitted save/load and refit are checked with every detector
(test_lesion_ranking, test_detector_lifecycle)."""

import pytest
import torch
import torch.nn.functional as F

from monai_ad.detectors import create_detector
from monai_ad.detectors.deepsvdd.torch_model import (
    LeNetEncoder,
    centre_away_from_zero,
    global_contrast_normalisation,
    one_class_loss,
    soft_boundary_loss,
    soft_boundary_radius,
    squared_distances,
    window_grid,
    windows_around,
)
from monai_ad.detectors.ganomaly import padded_size
from monai_ad.detectors.ganomaly.torch_model import (
    DCGANDecoder,
    DCGANEncoder,
    discriminator_loss,
    generator_loss,
    latent_distance,
)
from monai_ad.errors import InputError

from test_lesion_ranking import case_data, fitted_detector


# ----------------------------------------------------------------------------- Deep SVDD
def test_centre_coordinates_near_zero_are_pushed_to_plus_or_minus_eps():
    mean = torch.tensor([0.05, -0.02, 0.3, -0.5, 0.0999, -0.1])
    centre = centre_away_from_zero(mean, eps=0.1)
    assert torch.allclose(centre, torch.tensor([0.1, -0.1, 0.3, -0.5, 0.1, -0.1]))


def test_objectives_are_their_formulas():
    generator = torch.Generator().manual_seed(0)
    phi, c = torch.randn(50, 8, generator=generator), torch.randn(8, generator=generator)
    distances = squared_distances(phi, c)
    expected = torch.stack([((row - c) ** 2).sum() for row in phi])
    assert torch.allclose(distances, expected, atol=1e-5)
    assert one_class_loss(distances).item() == pytest.approx(expected.mean().item(), rel=1e-6)
    radius, nu = torch.tensor(2.5), 0.1
    hinge = torch.clamp(expected - radius**2, min=0).mean()
    assert soft_boundary_loss(distances, radius, nu).item() == pytest.approx((radius**2 + hinge / nu).item(), rel=1e-6)
    # the radius that leaves a ν share of the windows outside the sphere
    new_radius = soft_boundary_radius(distances, nu)
    assert (distances.sqrt() > new_radius).float().mean().item() == pytest.approx(nu, abs=0.03)


def test_contrast_normalisation_removes_the_mean_and_divides_by_the_mean_absolute_deviation():
    generator = torch.Generator().manual_seed(1)
    windows = torch.rand(4, 1, 32, 32, generator=generator)
    normalised = global_contrast_normalisation(windows * 3 + 2)  # brightness and contrast make no difference
    assert torch.allclose(normalised, global_contrast_normalisation(windows), atol=1e-4)
    assert torch.allclose(normalised.mean((1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(normalised.abs().mean((1, 2, 3)), torch.ones(4), atol=1e-5)
    assert global_contrast_normalisation(torch.full((1, 1, 32, 32), 0.6)).abs().max() < 1e-5  # a flat window stays 0


def test_windows_are_centred_on_their_pixel_and_on_every_cell():
    image = torch.arange(64 * 64, dtype=torch.float32).view(1, 1, 64, 64)
    window = windows_around(image, torch.tensor([[30.0, 20.0]]))
    assert window.shape == (1, 1, 32, 32) and window[0, 0, 16, 16] == image[0, 0, 30, 20]
    assert torch.equal(window[0, 0], image[0, 0, 14:46, 4:36])
    grid = window_grid(image)  # one window per 8 × 8 cell, cell (k, l) spanning pixels 8k − 12 … 8k + 19
    assert grid.shape == (64, 1, 32, 32)
    assert torch.equal(grid[2 * 8 + 3, 0], image[0, 0, 16 - 12 : 16 + 20, 24 - 12 : 24 + 20])


def test_the_encoder_is_the_papers_lenet_without_biases():
    encoder = LeNetEncoder(1, 128)
    assert encoder(torch.rand(3, 1, 32, 32)).shape == (3, 128)
    assert not any(isinstance(m, torch.nn.Conv2d | torch.nn.Linear) and m.bias is not None for m in encoder.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and m.affine for m in encoder.modules())
    assert [m.out_channels for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)] == [32, 64, 128]
    assert encoder.project.in_features == 2048


def test_deepsvdd_scores_are_window_distances_to_the_centre():
    detector = fitted_detector("deepsvdd")
    image, roi, _ = case_data("deepsvdd")["abnormal"]
    grid = detector.window_scores(image)
    assert grid.shape == (image.shape[0], 8, 8)
    with torch.no_grad():  # one cell by hand: its window through the encoder
        window = global_contrast_normalisation(window_grid(image[:1])[3 * 8 + 4 : 3 * 8 + 5])
        expected = ((detector.encoder(window)[0] - detector.centre) ** 2).sum()
    assert grid[0, 3, 4].item() == pytest.approx(expected.item(), rel=1e-4)
    scores = detector.score(image, roi)
    inside = F.adaptive_max_pool2d(roi.float(), (8, 8))[:, 0] > 0
    expected_slices = torch.where(inside, grid, torch.full_like(grid, -torch.inf)).flatten(1).amax(1)
    assert torch.allclose(scores.slice, expected_slices)
    assert detector.centre.abs().min() >= 0.1 - 1e-6 and detector.train_losses[-1] < detector.train_losses[0]
    assert detector.pretrain_losses[-1] < detector.pretrain_losses[0]


def test_deepsvdd_soft_boundary_learns_a_radius_and_scores_relative_to_it():
    data = case_data("deepsvdd")
    torch.manual_seed(0)
    detector = create_detector("deepsvdd", image_size=64, objective="soft-boundary", pretrain_epochs=1, epochs=4,
                               warm_up_epochs=1, batch_size=16)  # fmt: skip
    detector.fit(data["train"], progress=False)
    assert detector.radius.item() > 0
    image, roi = data["normal"]
    distances = squared_distances(detector._grid_representations(image), detector.centre).view(-1, 8, 8)
    assert torch.allclose(detector.window_scores(image), distances - detector.radius**2, atol=1e-5)


def test_deepsvdd_refuses_bad_settings():
    with pytest.raises(InputError, match="deepsvdd: objective must be one of one-class, soft-boundary"):
        create_detector("deepsvdd", objective="hard")
    with pytest.raises(InputError, match=r"deepsvdd: nu must be a number above 0 and at most 1"):
        create_detector("deepsvdd", nu=0)
    with pytest.raises(InputError, match="deepsvdd: image_size must be a multiple of 8 of at least 32"):
        create_detector("deepsvdd", image_size=36)


# ----------------------------------------------------------------------------- GANomaly
def test_generator_loss_is_the_papers_weighted_sum():
    generator = torch.Generator().manual_seed(2)
    f_real, f_fake = torch.randn(2, 8, 4, 4, generator=generator), torch.randn(2, 8, 4, 4, generator=generator)
    x, x_hat = torch.rand(2, 1, 16, 16, generator=generator), torch.rand(2, 1, 16, 16, generator=generator)
    z, z_again = torch.randn(2, 10, 1, 1, generator=generator), torch.randn(2, 10, 1, 1, generator=generator)
    adversarial = ((f_real - f_fake) ** 2).mean()
    contextual = (x - x_hat).abs().mean()
    encoder = ((z - z_again) ** 2).mean()
    loss = generator_loss(f_real, f_fake, x, x_hat, z, z_again)  # weights 1, 50, 1
    assert loss.item() == pytest.approx((adversarial + 50 * contextual + encoder).item(), rel=1e-5)
    smooth = generator_loss(f_real, f_fake, x, x_hat, z, z_again, (0.0, 0.0, 1.0), "smooth_l1")
    assert smooth.item() == pytest.approx(F.smooth_l1_loss(z_again, z).item(), rel=1e-6)
    assert torch.allclose(latent_distance(z, z_again), ((z - z_again) ** 2).flatten(1).mean(1))


def test_discriminator_loss_is_the_binary_cross_entropy_of_real_and_fake():
    real, fake = torch.tensor([0.9, 0.6]), torch.tensor([0.2, 0.5])
    expected = 0.5 * (-torch.log(real).mean() - torch.log(1 - fake).mean())
    assert discriminator_loss(real, fake).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dcgan_networks_halve_to_four_and_back():
    assert padded_size(224) == 256 and padded_size(64) == 64 and padded_size(100) == 128
    encoder, decoder = DCGANEncoder(64, 1, 100, 8), DCGANDecoder(64, 1, 100, 8)
    assert encoder.features(torch.rand(2, 1, 64, 64)).shape == (2, 64, 4, 4)
    z = encoder(torch.rand(2, 1, 64, 64))
    assert z.shape == (2, 100, 1, 1)
    out = decoder(z)
    assert out.shape == (2, 1, 64, 64) and out.abs().max() <= 1


def test_ganomaly_scores_are_the_latent_distance_and_the_residual_map():
    data = case_data("ganomaly")
    detector = fitted_detector("ganomaly")
    image, roi, _ = data["abnormal"]
    reconstruction, distance = detector.reconstruct(image)
    with torch.no_grad():
        x = image * 2 - 1  # 64 px: no padding
        x_hat, z, z_again = detector.generator(x)
    assert torch.allclose(distance, ((z - z_again) ** 2).flatten(1).mean(1), atol=1e-6)
    assert torch.allclose(reconstruction, (x_hat + 1) / 2, atol=1e-6)
    scores = detector.score(image, roi)
    assert torch.allclose(scores.pixel, detector.blur((image - reconstruction).abs().mean(1)), atol=1e-5)
    assert detector.train_losses[-1] < detector.train_losses[0]
    latent = create_detector("ganomaly", image_size=64, width=8, epochs=1, batch_size=8)
    latent.fit(data["train"], progress=False)
    assert torch.allclose(latent.score(image, roi).slice, latent.reconstruct(image)[1], atol=1e-6)


def test_ganomaly_refuses_bad_settings():
    with pytest.raises(InputError, match=r"ganomaly: beta1 must be a number in \[0, 1\)"):
        create_detector("ganomaly", beta1=1.0)
    with pytest.raises(InputError, match="ganomaly: latent_loss must be one of l2, smooth_l1"):
        create_detector("ganomaly", latent_loss="l3")
    with pytest.raises(InputError, match="ganomaly: slice_score must be one of latent, residual"):
        create_detector("ganomaly", slice_score="max")
    with pytest.raises(InputError, match="ganomaly: contextual_weight must be a number of at least 0"):
        create_detector("ganomaly", contextual_weight=-1)
