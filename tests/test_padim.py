"""PaDiM on the CPU: the Gaussians against a direct computation, the synthetic-lesion check, save/load, bad settings."""

import numpy as np
import pytest
import torch

from monai_ad.detectors import AnomalyDetector, PaDiM
from monai_ad.errors import InputError

from liver_slices import slice_data
from test_lesion_ranking import CASES, fitted_detector

SIZE = 64


@pytest.fixture(scope="module")
def data():
    return slice_data("textured", SIZE)


@pytest.fixture(scope="module")
def fitted():
    assert CASES["padim"].size == SIZE and CASES["padim"].hparams == {}  # the defaults at 64 px
    return fitted_detector("padim")  # trained on data["train"], calibrated on data["normal"]


def test_default_layers_and_dimension(fitted):
    assert fitted.backbone.layers == ["blocks.1", "blocks.2", "blocks.4"]
    assert fitted.backbone.strides == [4, 8, 16] and sum(fitted.backbone.channels) == 176
    grid = SIZE // 4
    assert fitted.mean.shape == (grid * grid, 100) and fitted.inv_covariance.shape == (grid * grid, 100, 100)
    index = fitted.channel_index
    assert index.shape == (100,) and len(set(index.tolist())) == 100 and 0 <= int(index.min()) and int(index.max()) < 176


def test_gaussians_and_distances_equal_a_direct_computation(fitted, data):
    """Running float64 sums over batches give the mean and the unbiased covariance (+ 0.01·I) of all training
    embeddings at each position, and the score is the square root of the Mahalanobis quadratic form."""
    embeddings = torch.cat([fitted.embed(b["image"])[0] for b in data["train"]]).double().numpy()  # [N, P, d]
    for position in (0, 37, embeddings.shape[1] - 1):
        x = embeddings[:, position]
        covariance = np.cov(x, rowvar=False) + 0.01 * np.eye(x.shape[1])
        assert np.allclose(fitted.mean[position].numpy(), x.mean(0), atol=1e-5)
        inverse = np.linalg.inv(covariance)
        assert np.allclose(fitted.inv_covariance[position].numpy(), inverse, rtol=1e-3, atol=1e-3 * np.abs(inverse).max())
    query = torch.as_tensor(embeddings[:3], dtype=torch.float32) + 0.5 * torch.randn(3, *embeddings.shape[1:])
    got = fitted.mahalanobis(query).double().numpy()
    delta = query.double().numpy() - fitted.mean.double().numpy()
    expected = np.sqrt(np.einsum("bpi,pij,bpj->bp", delta, fitted.inv_covariance.double().numpy(), delta))
    assert np.allclose(got, expected, rtol=1e-4)


def test_slice_score_is_the_largest_pixel_in_the_roi(fitted, data):
    image, roi, _ = data["abnormal"]
    scores = fitted.score(image, roi)
    masked = torch.where(roi[:, 0], scores.pixel, torch.tensor(-np.inf))
    assert torch.equal(scores.slice, masked.flatten(1).amax(1))


def test_save_load_gives_identical_scores(fitted, data, tmp_path):
    path = fitted.save(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    assert not any(k.startswith("backbone.") for k in payload["state"])  # pretrained weights not duplicated
    assert torch.equal(payload["state"]["channel_index"], fitted.channel_index)
    loaded = AnomalyDetector.load(path)
    assert type(loaded) is PaDiM and loaded.is_fitted and loaded.thresholds == fitted.thresholds
    image, roi, _ = data["abnormal"]
    a, b = fitted.score(image, roi), loaded.score(image, roi)
    assert torch.equal(a.pixel, b.pixel) and torch.equal(a.slice, b.slice)


def test_channel_subset_is_drawn_from_the_seed():
    a, b, c = (PaDiM(image_size=SIZE, seed=s).channel_index for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert PaDiM(image_size=SIZE, dim=176).channel_index.tolist() == list(range(176))  # every channel


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"regularization": 0.0}, "regularization must be positive"),
        ({"dim": 177}, "dim must be between 1 and the layers' 176 channels"),
        ({"dim": 0}, "dim must be a whole number from 1"),
        ({"sigma": -1.0}, "sigma must be"),
        ({"batch_size": 0}, "batch_size must be a whole number from 1 to"),
        ({"backbone": "alexnet"}, "unknown backbone"),
        ({"backbone": "resnet18"}, "needs its ImageNet weights file"),
    ],
)
def test_bad_hyper_parameters_are_input_errors(bad, message):
    with pytest.raises(InputError, match=message):
        PaDiM(image_size=SIZE, **bad)


def test_fit_needs_two_slices_of_the_right_size():
    detector = PaDiM(image_size=SIZE)
    with pytest.raises(InputError, match=rf"takes slices \[B, 1, {SIZE}, {SIZE}\]"):
        detector.fit(torch.zeros(2, 1, 96, 96), progress=False)
    with pytest.raises(InputError, match="at least 2 training slices"):
        detector.fit(torch.rand(1, 1, SIZE, SIZE), progress=False)
    with pytest.raises(InputError, match="not fitted"):
        detector.score(torch.zeros(1, 1, SIZE, SIZE))
