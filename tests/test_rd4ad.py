"""RD4AD on the CPU: network widths and formulas, the synthetic-lesion check, save/load, seeding, bad settings."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai_ad.detectors import RD4AD, AnomalyDetector, create_detector
from monai_ad.errors import InputError
from monai_ad.detectors.rd4ad.torch_model import (
    OneClassBottleneck,
    StudentDecoder,
    anomaly_map,
    distillation_loss,
)

from liver_slices import slice_data
from test_lesion_ranking import CASES, fitted_detector

SIZE = 64
FAST = {"image_size": SIZE, **CASES["rd4ad"].hparams}  # small settings: test_lesion_ranking.CASES


@pytest.fixture(scope="module")
def data():
    return slice_data("textured", SIZE)


@pytest.fixture(scope="module")
def fitted():
    assert CASES["rd4ad"].size == SIZE
    return fitted_detector("rd4ad")  # trained on data["train"], calibrated on data["normal"]


def test_widths_follow_the_teacher_and_match_the_paper_for_wide_resnet():
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # the paper: WideResNet-50-2 (256/512/1024) → OCBE ≈ 58.9M (without the unused conv4), decoder ≈ 24.9M
    assert round(n_params(OneClassBottleneck((256, 512, 1024))) / 1e6, 1) == 58.9
    assert round(n_params(StudentDecoder((256, 512, 1024))) / 1e6, 1) == 24.9
    channels = (24, 40, 112)  # EfficientNet-Lite0 blocks.1/2/4
    teacher = [torch.randn(2, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate(channels)]
    code = OneClassBottleneck(channels)(teacher)
    assert code.shape == (2, 224, 2, 2)
    student = StudentDecoder(channels)(code)
    assert [tuple(s.shape) for s in student] == [tuple(t.shape) for t in teacher]


def test_loss_and_map_formulas():
    torch.manual_seed(0)
    teacher = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)]
    student = [t + 0.7 * torch.randn_like(t) for t in teacher]
    expected = sum(
        np.mean([1 - np.dot(t[b].flatten(), s[b].flatten()) / np.linalg.norm(t[b]) / np.linalg.norm(s[b]) for b in range(3)])
        for t, s in zip((t.numpy() for t in teacher), (s.numpy() for s in student))
    )
    assert np.isclose(float(distillation_loss(teacher, student)), expected, rtol=1e-5)
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)

    levels = [1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student)]  # per-pixel, [3, h, w]
    up = [F.interpolate(m[:, None], size=(16, 16), mode="bilinear", align_corners=True)[:, 0] for m in levels]
    assert torch.allclose(anomaly_map(teacher, student, 16, "sum"), up[0] + up[1], atol=1e-6)
    assert torch.allclose(anomaly_map(teacher, student, 16, "multiply"), up[0] * up[1], atol=1e-6)
    # align_corners=True keeps the corner values of each level
    assert torch.allclose(anomaly_map(teacher[:1], student[:1], 16)[:, 0, 0], levels[0][:, 0, 0], atol=1e-6)


def test_slice_score_is_the_largest_pixel_in_the_roi(fitted, data):
    image, roi, _ = data["abnormal"]
    scores = fitted.score(image, roi)
    masked = torch.where(roi[:, 0], scores.pixel, torch.tensor(-np.inf))
    assert torch.equal(scores.slice, masked.flatten(1).amax(1))  # slice score = map maximum in the ROI


def test_training_lowers_the_loss_and_leaves_the_teacher_untouched(fitted):
    assert len(fitted.train_losses) == FAST["epochs"] and fitted.train_losses[-1] < 0.7 * fitted.train_losses[0]
    teacher_before = create_detector("rd4ad", **FAST).model.teacher.state_dict()  # an unfitted one's (pretrained)
    for key, value in fitted.model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert not any(p.requires_grad for p in fitted.model.teacher.parameters())
    trainable = {id(p) for p in fitted.trainable_parameters()}
    assert trainable == {id(p) for p in [*fitted.model.bottleneck.parameters(), *fitted.model.decoder.parameters()]}


def test_save_load_gives_identical_scores(fitted, data, tmp_path):
    path = fitted.save(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    assert not any(k.startswith("model.teacher.") for k in payload["state"])  # pretrained weights not duplicated
    assert any(k.startswith("model.decoder.") for k in payload["state"])
    loaded = AnomalyDetector.load(path)
    assert type(loaded) is RD4AD and loaded.is_fitted and loaded.thresholds == fitted.thresholds
    image, roi, _ = data["abnormal"]
    a, b = fitted.score(image, roi), loaded.score(image, roi)
    assert torch.equal(a.pixel, b.pixel) and torch.equal(a.slice, b.slice)


def test_fit_is_seeded_with_and_without_the_teacher_cache(data):
    small = [{"image": F.interpolate(b["image"], size=32, mode="bilinear")} for b in data["train"][:1]]
    image = F.interpolate(data["abnormal"][0][:2], size=32, mode="bilinear")
    settings = {"image_size": 32, "oce_blocks": 1, "decoder_blocks": (1, 1, 1), "epochs": 2, "batch_size": 4}
    scores = []
    for seed, cache in ((1, None), (1, None), (2, None), (1, False)):
        detector = RD4AD(**settings, seed=seed, cache_features=cache).fit(small, progress=False)
        scores.append(detector.score(image).slice)
    assert torch.equal(scores[0], scores[1]) and not torch.allclose(scores[0], scores[2])
    assert torch.isfinite(scores[3]).all() and not torch.equal(scores[0], scores[3])  # unshuffled, recomputed maps


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"epochs": 0}, "epochs must be a whole number from 1 to"),
        ({"batch_size": 0}, "batch_size must be a whole number from 1 to"),
        ({"decoder_blocks": (3, 4)}, "three decoder_blocks"),
        ({"oce_blocks": 0}, "oce_blocks"),
        ({"lr": 0.0}, "lr must be a number above 0"),
        ({"betas": (0.5, 1.0)}, "betas must be two numbers"),
        ({"map_mode": "mean"}, "map_mode must be one of sum, multiply"),
        ({"sigma": -1.0}, "sigma must be"),
        ({"layers": ["blocks.2", "blocks.4"]}, "three teacher levels"),
        ({"layers": ["blocks.1", "blocks.2", "blocks.6"]}, r"strides s, 2s, 4s"),
        ({"backbone": "wide_resnet50_2"}, "needs its ImageNet weights file"),
    ],
)
def test_bad_hyper_parameters_are_input_errors(bad, message):
    with pytest.raises(InputError, match=message):
        RD4AD(image_size=SIZE, **bad)


def test_fit_checks_slices():
    detector = RD4AD(image_size=SIZE, epochs=1)
    with pytest.raises(InputError, match=rf"takes slices \[B, 1, {SIZE}, {SIZE}\]"):
        detector.fit(torch.zeros(2, 1, 96, 96), progress=False)
    with pytest.raises(InputError, match="not fitted"):
        detector.score(torch.zeros(1, 1, SIZE, SIZE))
