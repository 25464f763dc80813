"""UTRAD on the CPU: its token windows, the U-transformer's shapes and what trains, the loss, scaled distance and
multi-scale map against their formulas, the feature standardisation, and bad settings. Its lesion ranking, fitted
save/load and refit are checked with every detector (test_lesion_ranking, test_detector_lifecycle)."""

import pytest
import torch
import torch.nn.functional as F

from monai_ad.detectors import create_detector
from monai_ad.detectors.utrad.torch_model import (
    UTransformer,
    concatenate_levels,
    from_windows,
    multi_scale_map,
    pool_sizes,
    reconstruction_error,
    scaled_distance,
    to_windows,
    utrad_loss,
)
from monai_ad.errors import InputError

TINY = {"image_size": 32, "patch_sizes": [4, 2], "d_model": 16, "heads": 2, "encoder_layers": 1, "decoder_layers": 1,
        "feedforward_dim": 32, "epochs": 1, "batch_size": 4}  # fmt: skip


def test_windows_hold_the_grid_blocks_in_row_major_order_and_invert():
    grid = torch.randn(2, 8, 8, 3)
    windows = to_windows(grid, 4)
    assert windows.shape == (2 * 4, 16, 3)
    assert torch.equal(windows[0], grid[0, :4, :4].reshape(16, 3))
    assert torch.equal(windows[1], grid[0, :4, 4:].reshape(16, 3))  # the next window to the right
    assert torch.equal(windows[4], grid[1, :4, :4].reshape(16, 3))  # the second slice's first window
    assert torch.equal(from_windows(windows, 2, 4), grid)


def test_deeper_levels_are_repeated_to_the_first_grid():
    fine, coarse = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    joined = concatenate_levels([fine, coarse])
    assert joined.shape == (2, 8, 8, 8) and torch.equal(joined[:, :3], fine)
    assert torch.equal(joined[:, 3:], coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_the_transformer_reconstructs_every_position_and_its_scale_head_does_not_train_it():
    torch.manual_seed(0)
    model = UTransformer(6, patch_sizes=[4, 2], d_model=16, heads=2, encoder_layers=1, decoder_layers=2,
                         feedforward_dim=32)  # fmt: skip
    features = torch.randn(3, 6, 8, 8)
    reconstruction, scale = model(features)
    assert reconstruction.shape == (3, 6, 8, 8) and scale.shape == (3, 1, 8, 8)
    scale.sum().backward()  # the scale head reads detached tokens
    assert model.input_projection.weight.grad is None and model.queries[0].grad is None
    assert model.scale_head[0].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    reconstruction.sum().backward()
    assert all(q.grad.abs().sum() > 0 for q in model.queries) and model.input_projection.weight.grad.abs().sum() > 0
    # the position tables are fixed: buffers, not parameters
    names = {name for name, _ in model.named_parameters()}
    assert "grid_position" not in names and "grid_position" in dict(model.named_buffers())
    with pytest.raises(ValueError, match="takes a 8×8 grid"):
        model(torch.randn(1, 6, 16, 16))


def test_slices_are_independent_in_eval_mode():
    torch.manual_seed(0)
    model = UTransformer(4, patch_sizes=[2, 2], d_model=16, heads=2, encoder_layers=1, decoder_layers=1,
                         feedforward_dim=32).eval()  # fmt: skip
    features = torch.randn(2, 4, 4, 4)
    together, _ = model(features)
    alone, _ = model(features[1:])
    assert torch.allclose(together[1:], alone, atol=1e-5)


def test_loss_distance_and_map_are_their_formulas():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 8, 8, generator=generator)
    reconstruction = torch.randn(2, 5, 8, 8, generator=generator)
    scale = torch.randn(2, 1, 8, 8, generator=generator)
    error = ((reconstruction - features) ** 2).sum(1, keepdim=True).sqrt()
    assert torch.allclose(reconstruction_error(features, reconstruction), error, atol=1e-5)
    expected = ((reconstruction - features) ** 2).mean() + ((scale - error) ** 2).mean()
    assert utrad_loss(features, reconstruction, scale).item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(scaled_distance(features, reconstruction, -scale), error / scale.abs(), atol=1e-5)
    assert torch.isfinite(scaled_distance(features, reconstruction, torch.zeros_like(scale))).all()

    assert pool_sizes(64) == [1, 4, 16, 64] and pool_sizes(16) == [1, 4, 16] and pool_sizes(3) == [1]
    distance = torch.rand(2, 1, 16, 16, generator=generator)
    by_hand = sum(F.interpolate(F.avg_pool2d(distance, k), size=(16, 16), mode="bilinear") for k in (1, 4, 16)) / 3
    assert torch.allclose(multi_scale_map(distance), by_hand, atol=1e-6)
    assert torch.allclose(multi_scale_map(torch.full((1, 1, 16, 16), 2.0)), torch.full((1, 1, 16, 16), 2.0))


def test_features_are_standardised_with_the_training_statistics_and_the_scaled_map_is_finite():
    torch.manual_seed(0)
    slices = torch.rand(6, 1, 32, 32)
    detector = create_detector("utrad", **TINY).fit(slices, progress=False, batch_size=3)
    maps = [m.float() for m in detector.backbone_forward(slices)]
    mean = torch.cat([m.mean((0, 2, 3)) for m in maps])  # each channel over every slice and position of its level
    std = torch.cat([m.std((0, 2, 3), unbiased=False) for m in maps])
    assert torch.allclose(detector.feature_mean, mean, atol=1e-4)
    assert torch.allclose(detector.feature_std, std, atol=1e-4)
    standardized = detector.features(detector.backbone_forward(slices))
    assert standardized.shape == (6, sum(detector.backbone.channels), 8, 8)
    assert standardized.mean().abs() < 0.05
    scores = detector.score(slices[:2])
    assert scores.pixel.shape == (2, 32, 32) and torch.isfinite(scores.pixel).all() and scores.pixel.std() > 0
    with torch.no_grad():  # the map by hand: scaled error, multi-scale average, bilinear to the slice; its maximum
        features = detector.features(detector.backbone_forward(slices[:2]))
        reconstruction, scale = detector.transformer(features)
        error = reconstruction_error(features, reconstruction)
        by_hand = F.interpolate(multi_scale_map(error / scale.abs()), size=(32, 32), mode="bilinear")[:, 0]
    assert torch.allclose(scores.pixel, by_hand, rtol=1e-4, atol=1e-5)
    assert torch.equal(scores.slice, scores.pixel.flatten(1).amax(1))
    detector.hparams["map_mode"] = "distance"
    unscaled = F.interpolate(multi_scale_map(error), size=(32, 32), mode="bilinear")[:, 0]
    assert torch.allclose(detector.score(slices[:2]).pixel, unscaled, rtol=1e-4, atol=1e-5)
    assert len(detector.train_losses) == 1 and torch.isfinite(torch.tensor(detector.train_losses)).all()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"patch_sizes": [4, 4]},
         r"utrad: patch_sizes \[4, 4\] cover a feature grid of side 16, but 32 px slices give one of side 8"),
        ({"patch_sizes": [8, 1]}, "utrad: patch_sizes must be a list of whole numbers from 2 to 64"),
        ({"patch_sizes": "44"}, "utrad: patch_sizes must be a list"),
        ({"d_model": 20, "heads": 3}, "utrad: d_model must be a multiple of 8 and of heads"),
        ({"dropout": 1.5}, "utrad: dropout must be a number from 0 to 0.99"),
        ({"heads": 0}, "utrad: heads must be a whole number from 1 to 64"),
        ({"beta1": 1.0}, r"utrad: beta1 must be a number in \[0, 1\)"),
        ({"beta1": "0.5"}, r"utrad: beta1 must be a number in \[0, 1\)"),
        ({"map_mode": "gradient"}, "utrad: map_mode must be one of scaled, distance"),
        ({"standardize_features": "yes"}, "utrad: standardize_features must be true or false"),
        ({"lr": 0}, "utrad: lr must be"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(InputError, match=message) as error:
        create_detector("utrad", **{**TINY, **settings})
    assert "\n" not in str(error.value)
