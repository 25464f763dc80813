"""f-AnoGAN on the CPU: its Wasserstein losses, gradient penalty and izi_f score against hand computations, the
critic's per-sample normalisation, what each training stage changes, and bad settings. Its lesion ranking, fitted
save/load and refit are checked with every detector (test_lesion_ranking, test_detector_lifecycle)."""

import pytest
import torch
from torch import nn

from monai_ad.detectors import create_detector
from monai_ad.detectors.fanogan.torch_model import (
    WGANCritic,
    critic_loss,
    frozen,
    generator_loss,
    gradient_penalty,
    izif_loss,
    izif_scores,
    residual_map,
)
from monai_ad.errors import InputError
from monai_ad.networks.dcgan import DCGANEncoder, from_tanh_range, to_tanh_range

from test_lesion_ranking import case_data, fitted_detector


class _Quadratic(nn.Module):
    """D(x) = ½‖x‖² per sample: its gradient at x̃ is x̃ itself."""

    def forward(self, x):
        return 0.5 * x.flatten(1).pow(2).sum(1), x.flatten(1)


def test_wasserstein_losses_are_their_formulas():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.5])
    assert critic_loss(real, fake).item() == pytest.approx((-2.0 + 0.5) / 2 - (1.0 + 3.0) / 2)
    assert generator_loss(fake).item() == pytest.approx(0.75)


def test_gradient_penalty_is_taken_at_the_per_sample_mix_of_real_and_fake():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(3, 1, 4, 4, generator=generator), torch.randn(3, 1, 4, 4, generator=generator)
    mix = torch.tensor([0.0, 0.3, 1.0])
    between = mix.view(-1, 1, 1, 1) * real + (1 - mix.view(-1, 1, 1, 1)) * fake
    expected = (between.flatten(1).norm(dim=1) - 1).pow(2).mean()
    assert gradient_penalty(_Quadratic(), real, fake, mix).item() == pytest.approx(expected.item(), rel=1e-5)
    linear = nn.Linear(16, 1, bias=False)  # a gradient of norm 2 everywhere: penalty (2 − 1)² = 1
    with torch.no_grad():
        linear.weight.fill_(2.0 / 4)
    critic = lambda x: (linear(x.flatten(1)).flatten(), x)  # noqa: E731
    assert gradient_penalty(critic, real, fake, mix).item() == pytest.approx(1.0, rel=1e-5)
    gradient_penalty(critic, real, fake, mix).backward()  # the critic's step differentiates it by its weights
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_izif_score_is_the_image_plus_kappa_times_the_feature_mean_squared_error():
    generator = torch.Generator().manual_seed(1)
    x, x_hat = torch.rand(2, 1, 8, 8, generator=generator), torch.rand(2, 1, 8, 8, generator=generator)
    f, f_hat = torch.randn(2, 32, generator=generator), torch.randn(2, 32, generator=generator)
    expected = torch.stack([((x[i] - x_hat[i]) ** 2).mean() + 0.5 * ((f[i] - f_hat[i]) ** 2).mean() for i in range(2)])
    assert torch.allclose(izif_scores(x, x_hat, f, f_hat, kappa=0.5), expected, atol=1e-6)
    assert izif_loss(x, x_hat, f, f_hat, kappa=0.5).item() == pytest.approx(expected.mean().item(), rel=1e-6)
    assert torch.allclose(residual_map(x, x_hat), (x - x_hat).abs()[:, 0])


def test_the_critic_normalises_each_sample_alone_and_the_ranges_round_trip():
    torch.manual_seed(0)
    critic = WGANCritic(32, 1, 8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules())
    batch = torch.rand(4, 1, 32, 32)
    values, features = critic(batch)
    assert values.shape == (4,) and features.shape == (4, 32 * 4 * 4)
    alone, _ = critic(batch[:1])  # a sample's value does not depend on the rest of its batch (train mode)
    assert torch.allclose(alone, values[:1], atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in DCGANEncoder(32, 1, 10, 8).modules())
    with pytest.raises(ValueError, match="norm must be one of"):
        DCGANEncoder(32, 1, 10, 8, norm="instance")
    image = torch.rand(2, 1, 24, 24)
    network = to_tanh_range(image)
    assert network.shape == (2, 1, 32, 32) and network[..., 24:, :].eq(-1).all()
    assert torch.allclose(from_tanh_range(network, 24), image, atol=1e-6)


def test_frozen_takes_the_gradients_away_and_gives_them_back():
    layers = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    layers[1].bias.requires_grad_(False)
    with frozen(layers):
        assert not any(p.requires_grad for p in layers.parameters())
    assert [p.requires_grad for p in layers.parameters()] == [True, True, True, False]


def _fitted(**hparams):
    data = case_data("fanogan")
    settings = {"image_size": 64, "width": 8, "batch_size": 8, "epochs": 1, "encoder_epochs": 1, **hparams}
    return create_detector("fanogan", **settings).fit(data["train"], progress=False)


def test_the_encoder_stage_trains_only_the_encoder_and_the_generator_steps_every_n_critic():
    one, three = _fitted(), _fitted(encoder_epochs=3)
    for name in ("generator", "critic"):  # frozen in eval mode: weights and running statistics unchanged
        a, b = getattr(one, name).state_dict(), getattr(three, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not all(torch.equal(a, b) for a, b in zip(one.encoder.parameters(), three.encoder.parameters()))
    assert all(p.requires_grad for p in three.parameters())  # a later fit trains every network again
    assert len(three.gan_losses) == 1 and len(three.encoder_losses) == 3
    # 3 critic steps per epoch: with n_critic 5 the generator never steps, with 1 it steps every time
    fresh = create_detector("fanogan", image_size=64, width=8)
    never, always = _fitted(n_critic=5), _fitted(n_critic=1)
    assert all(torch.equal(a, b) for a, b in zip(fresh.generator.parameters(), never.generator.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.generator.parameters(), always.generator.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.critic.parameters(), never.critic.parameters()))


def test_fanogan_scores_are_the_izif_score_and_the_smoothed_residual():
    detector = fitted_detector("fanogan")
    image, roi, _ = case_data("fanogan")["abnormal"]
    reconstruction, scores = detector.reconstruct(image)
    with torch.no_grad():  # by hand, in the networks' range (64 px: no padding)
        x = image * 2 - 1
        x_hat = detector.generator(detector.encoder(x))
        _, f = detector.critic(x)
        _, f_hat = detector.critic(x_hat)
    kappa = detector.hparams["kappa"]
    expected = ((x - x_hat) ** 2).flatten(1).mean(1) + kappa * ((f - f_hat) ** 2).mean(1)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert torch.allclose(reconstruction, (x_hat + 1) / 2, atol=1e-6)
    result = detector.score(image, roi)
    assert torch.allclose(result.pixel, detector.blur((image - reconstruction).abs().mean(1)), atol=1e-5)
    assert torch.allclose(result.slice, scores, atol=1e-6)  # the paper's score (the default)
    assert detector.encoder_losses[-1] < detector.encoder_losses[0]
    residual = _fitted(slice_score="residual")
    pixel = residual.score(image, roi).pixel
    expected_slices = torch.where(roi[:, 0], pixel, torch.full_like(pixel, -torch.inf)).flatten(1).amax(1)
    assert torch.allclose(residual.score(image, roi).slice, expected_slices)


def test_mixed_precision_is_cuda_only_and_the_cpu_stays_float32():
    plain, amp = _fitted(), _fitted(amp=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), amp.state_dict().values()))
    image, roi, _ = case_data("fanogan")["abnormal"]
    scores = amp.score(image, roi)
    assert scores.pixel.dtype == scores.slice.dtype == torch.float32
    assert torch.equal(scores.slice, plain.score(image, roi).slice)


def test_fanogan_refuses_bad_settings():
    with pytest.raises(InputError, match=r"fanogan: beta1 must be a number in \[0, 1\), got 1.0"):
        create_detector("fanogan", beta1=1.0)
    with pytest.raises(InputError, match="fanogan: slice_score must be one of izif, residual, got 'max'"):
        create_detector("fanogan", slice_score="max")
    with pytest.raises(InputError, match="fanogan: n_critic must be a whole number from 1 to 100, got 0"):
        create_detector("fanogan", n_critic=0)
    with pytest.raises(InputError, match="fanogan: kappa must be a number of at least 0, got -1"):
        create_detector("fanogan", kappa=-1)
    with pytest.raises(InputError, match="fanogan: gradient_penalty must be a number of at least 0"):
        create_detector("fanogan", gradient_penalty=-0.5)
