"""STFPM and CFA on the CPU: their formulas against hand computations, what trains and what stays frozen, the
memory bank, chunked scoring and bad settings. Their lesion ranking, fitted save/load and refit are checked with
every detector (test_lesion_ranking, test_detector_lifecycle)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import monai_ad.detectors.cfa.detector as cfa_module
from monai_ad.components.maps import cosine_distance_map
from monai_ad.detectors import create_detector
from monai_ad.detectors.stfpm import pyramid_matching_loss
from monai_ad.errors import InputError
from monai_ad.detectors.cfa.torch_model import (
    PatchDescriptor,
    hypersphere_loss,
    patch_features,
    softmin_nearest_score,
    squared_distances,
)

from test_lesion_ranking import case_data, fitted_detector


def _levels(seed, batch=2):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=generator) for c, s in ((4, 8), (6, 4))]


# ----------------------------------------------------------------------------- STFPM
def test_pyramid_matching_loss_is_the_papers_sum_over_levels_positions_and_batch():
    teacher, student = _levels(0), _levels(1)
    expected = 0.0
    for t, s in zip(teacher, student):
        h, w = t.shape[-2:]
        t_hat = t / t.norm(dim=1, keepdim=True)
        s_hat = s / s.norm(dim=1, keepdim=True)
        expected += 0.5 / (h * w) * ((t_hat - s_hat) ** 2).sum().item()
    assert pyramid_matching_loss(teacher, student).item() == pytest.approx(expected, rel=1e-5)
    # ½‖t̂ − ŝ‖² = 1 − cos: the loss is the batch's summed mean cosine distance per level
    via_cosine = sum((1 - F.cosine_similarity(t, s, dim=1)).mean((1, 2)).sum() for t, s in zip(teacher, student))
    assert pyramid_matching_loss(teacher, student).item() == pytest.approx(via_cosine.item(), rel=1e-5)


def test_stfpm_map_is_the_product_of_upsampled_half_squared_normalised_differences():
    teacher, student = _levels(2), _levels(3)
    expected = torch.ones(2, 16, 16)
    for t, s in zip(teacher, student):
        level = 0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1, keepdim=True)
        expected *= F.interpolate(level, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(cosine_distance_map(teacher, student, 16, "multiply"), expected, atol=1e-5)


def test_stfpm_trains_the_student_only_and_saves_it_without_the_teacher(tmp_path):
    detector = fitted_detector("stfpm")
    fresh = create_detector("stfpm", image_size=detector.image_size, **{k: v for k, v in detector.hparams.items()
                                                                        if k not in ("image_size", "in_channels")})  # fmt: skip
    assert all(p.requires_grad for p in detector.student.parameters())
    assert not any(p.requires_grad for p in detector.teacher.parameters()) and not detector.teacher.training
    teacher, trained = detector.teacher.state_dict(), detector.student.state_dict()
    assert all(torch.equal(v, fresh.teacher.state_dict()[k]) for k, v in teacher.items())  # the teacher never moves
    assert any(not torch.equal(v, fresh.student.state_dict()[k]) for k, v in trained.items() if v.is_floating_point())
    assert detector.train_losses[-1] < detector.train_losses[0]
    state = torch.load(detector.save(tmp_path / "stfpm.pt"), weights_only=True)["state"]
    assert not any(k.startswith("teacher.") for k in state) and any(k.startswith("student.") for k in state)


def test_stfpm_refuses_bad_settings():
    with pytest.raises(InputError, match=r"stfpm: momentum must be a number in \[0, 1\)"):
        create_detector("stfpm", momentum=1.5)
    with pytest.raises(InputError, match="stfpm: lr must be"):
        create_detector("stfpm", lr=0)


# ----------------------------------------------------------------------------- CFA
def test_patch_features_pool_every_level_and_resize_to_the_finest_grid():
    levels = _levels(4)
    features = patch_features(levels)
    assert features.shape == (2, 10, 8, 8)
    assert torch.allclose(features[:, :4], F.avg_pool2d(levels[0], 3, 1, 1))
    coarse = F.interpolate(F.avg_pool2d(levels[1], 3, 1, 1), size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(features[:, 4:], coarse)


def test_descriptor_appends_x_and_y_coordinates_from_minus_one_to_one():
    descriptor = PatchDescriptor(3, 2)
    with torch.no_grad():
        descriptor.conv.weight.zero_()
        descriptor.conv.bias.zero_()
        descriptor.conv.weight[0, 3] = 1.0  # x
        descriptor.conv.weight[1, 4] = 1.0  # y
    out = descriptor(torch.randn(1, 3, 4, 5))
    assert torch.allclose(out[0, 0], torch.linspace(-1, 1, 5).expand(4, 5))
    assert torch.allclose(out[0, 1], torch.linspace(-1, 1, 4)[:, None].expand(4, 5))


def test_distances_loss_and_score_equal_hand_computations():
    generator = torch.Generator().manual_seed(5)
    features, memory = torch.randn(2, 3, 2, 2, generator=generator), torch.randn(7, 3, generator=generator)
    distances = squared_distances(features, memory)
    rows = features.flatten(2).transpose(1, 2)
    assert torch.allclose(distances, torch.cdist(rows, memory[None].expand(2, -1, -1)) ** 2, atol=1e-5)

    radius, margin = 1.2, 0.1  # large enough that the repulsion term is not zero
    ordered = distances.sort(-1).values
    attraction = (ordered[..., :2] - radius**2).clamp_min(0).mean()
    repulsion = (radius**2 - ordered[..., 2:5] - margin).clamp_min(0).mean()
    assert repulsion > 0
    loss = hypersphere_loss(distances, nearest=2, hard_negatives=3, radius=radius, margin=margin)
    assert loss.item() == pytest.approx(1000 * (attraction + repulsion).item(), rel=1e-5)

    root = ordered[..., :3].sqrt()
    weight = torch.exp(-root[..., 0]) / torch.exp(-root).sum(-1)
    assert torch.allclose(softmin_nearest_score(distances, 3), weight * root[..., 0], atol=1e-6)


def test_cfa_memory_is_the_initial_descriptors_mean_per_position():
    data = case_data("cfa")
    detector = fitted_detector("cfa")
    fresh = create_detector("cfa", image_size=detector.image_size,
                            **{k: v for k, v in detector.hparams.items() if k not in ("image_size", "in_channels")})  # fmt: skip
    with torch.no_grad():
        outputs = torch.cat([fresh.descriptor(fresh._patch_features(b["image"])) for b in data["train"]])
    expected = outputs.mean(0).flatten(1).t()
    grid = detector.image_size // 4
    assert detector.memory.shape == (grid * grid, detector.descriptor.conv.out_channels)
    assert torch.allclose(detector.memory, expected, atol=1e-5)
    assert not any(p.requires_grad for p in detector.backbone.parameters())


def test_cfa_scores_the_same_in_chunks_and_clusters_its_memory(monkeypatch):
    detector = fitted_detector("cfa")
    image, roi, _ = case_data("cfa")["abnormal"]
    whole = detector.score(image, roi)
    monkeypatch.setattr(cfa_module, "SCORING_ELEMENTS", 1)  # one slice per chunk
    chunked = detector.score(image, roi)
    assert torch.allclose(whole.pixel, chunked.pixel, atol=1e-6) and torch.equal(whole.slice, chunked.slice)

    clustered = create_detector("cfa", image_size=32, gamma_c=4, epochs=1, batch_size=4)
    clustered.fit(case_data("cfa")["train"][0]["image"][:, :, ::2, ::2].contiguous(), progress=False)
    assert clustered.memory.shape[0] == (32 // 4) ** 2 // 4 and np.isfinite(clustered.memory.numpy()).all()


def test_cfa_refuses_bad_settings():
    with pytest.raises(InputError, match="cfa: gamma_d must be a whole number from 1 to 64"):
        create_detector("cfa", gamma_d=0)
    with pytest.raises(InputError, match="cfa: hard_negatives must be a whole number"):
        create_detector("cfa", hard_negatives=-1)
    with pytest.raises(InputError, match="cfa: radius must be a number from 0 to 1000"):
        create_detector("cfa", radius=float("nan"))
    with pytest.raises(InputError, match="cfa: num_neighbors must be"):
        create_detector("cfa", num_neighbors=0)
