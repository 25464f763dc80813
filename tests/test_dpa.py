"""Deep Perceptual Autoencoder: networks, progressive growing, loss, scoring, persistence, bad input (CPU)."""

import pytest
import torch
import torch.nn.functional as F

from monai_ad.detectors import AnomalyDetector, available_detectors, create_detector
from monai_ad.detectors.dpa import DeepPerceptualAutoencoder, Phase, to_signed
from monai_ad.errors import InputError
from monai_ad.detectors.dpa.torch_model import ProgressiveAutoencoder, build_vgg, layers_for

from liver_slices import smooth_slices
from test_lesion_ranking import CASES, fitted_detector

SIZE = 32
FAST = {"image_size": SIZE, **CASES["dpa"].hparams}  # progressive growing 16 → 32 in a few dozen iterations


@pytest.fixture(scope="module")
def fitted():
    assert CASES["dpa"].size == SIZE and CASES["dpa"].slices == "smooth"
    return fitted_detector("dpa")  # trained on 24 smooth slices (seed 0), calibrated on 6 (seed 1)


def test_registered_and_built_with_the_papers_architecture():
    assert "dpa" in available_detectors()
    ae = ProgressiveAutoencoder(max_resolution=64, start_resolution=8, latent_dim=16, latent_resolution=1, inner_dims=16)
    assert sorted(int(k) for k in ae.from_image) == [8, 16, 32, 64] and sorted(int(k) for k in ae.down) == [8, 16, 32, 64]
    z = ae.encode(torch.rand(2, 1, 64, 64) * 2 - 1)
    assert z.shape == (2, 16, 1, 1)  # conv 4×4 "valid" on the 4×4 map
    assert ae.decode(z, 64).shape == (2, 1, 64, 64)
    convs = [m for m in ae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)) for m in ae.modules())
    # Kaiming-normal, fan_out, leaky_relu a = 0.2: std = gain / sqrt(out_channels · k²)
    big = max(convs, key=lambda c: c.weight.numel())
    expected = (2.0 / (1 + 0.2**2)) ** 0.5 / (big.out_channels * big.kernel_size[0] * big.kernel_size[1]) ** 0.5
    assert abs(float(big.weight.std()) - expected) < 0.15 * expected
    spatial = ProgressiveAutoencoder(max_resolution=64, start_resolution=64, latent_dim=4, latent_resolution=8)
    assert spatial.encode(torch.zeros(1, 1, 64, 64)).shape == (1, 4, 8, 8)
    assert layers_for([8, 16, 32, 64], None) == {8: "relu1_2", 16: "relu2_2", 32: "relu3_2", 64: "relu3_2"}
    assert layers_for([8, 16, 32, 64], "relu4_2")[64] == "relu4_2"


def test_fade_in_blends_the_previous_resolution():
    torch.manual_seed(0)
    ae = ProgressiveAutoencoder(max_resolution=32, start_resolution=8, latent_dim=8)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        # alpha = 0: the new resolution's blocks are bypassed entirely
        assert torch.allclose(ae.encode(x, alpha=0.0), ae.encode(F.avg_pool2d(x, 2)), atol=1e-6)
        z = ae.encode(x)
        old = F.interpolate(ae.decode(z, 16), scale_factor=2, mode="nearest")
        assert torch.allclose(ae.decode(z, 32, alpha=0.0), old, atol=1e-6)
        half = ae.decode(z, 32, alpha=0.5)
        assert torch.allclose(half, 0.5 * old + 0.5 * ae.decode(z, 32), atol=1e-5)
        assert not torch.allclose(half, old)


def test_smooth_pg_loss_starts_from_the_previous_resolutions_loss():
    detector = create_detector("dpa", **{**FAST, "final_iters": 1})
    x = to_signed(smooth_slices(4, seed=3)[0])
    with torch.no_grad():
        at_zero = detector.training_loss(x, Phase(32, True, 10), 0.0)
        half = F.avg_pool2d(x, 2)
        previous = detector.training_loss(half, Phase(16, False, 10), 1.0)
        current = detector.training_loss(x, Phase(32, False, 10), 1.0)
        at_one = detector.training_loss(x, Phase(32, True, 10), 1.0)
    assert torch.allclose(at_zero, previous, rtol=1e-4)
    assert torch.allclose(at_one, current, rtol=1e-5)
    # the training images blend the nearest-upsampled half resolution in the same way
    mixed = detector.training_inputs(x, Phase(32, True, 10), 0.25)
    low = F.interpolate(half, scale_factor=2, mode="nearest")
    assert torch.allclose(mixed, 0.75 * low + 0.25 * x, atol=1e-6)


def test_progressive_growing_reaches_the_final_resolution(fitted):
    history = fitted.history
    assert [(h["resolution"], h["phase"]) for h in history] == [(16, "stable"), (32, "transition"), (32, "stable")]
    transition = history[1]
    assert transition["alpha_first"] == pytest.approx(1 / 15) and transition["alpha_last"] == 1.0
    assert history[0]["loss_last"] < history[0]["loss_first"]  # it learns
    paper = DeepPerceptualAutoencoder.__new__(DeepPerceptualAutoencoder)  # schedule of the paper's defaults
    paper.hparams = {"transition_iters": 20000, "stable_iters": 20000, "final_iters": 10000}
    paper.resolutions = [8, 16, 32, 64]
    phases = DeepPerceptualAutoencoder.growth_phases(paper)
    assert [(p.resolution, p.transition) for p in phases] == [
        (8, False), (16, True), (16, False), (32, True), (32, False), (64, True), (64, False)
    ]  # fmt: skip
    assert phases[-1].iterations == 10000 and sum(p.iterations for p in phases) == 130000
    assert create_detector("dpa", image_size=SIZE, start_resolution=SIZE, final_iters=1).learning_rate == 2e-3
    assert fitted.learning_rate == 1e-3


def test_slice_score_is_the_relative_perceptual_loss(fitted):
    image, roi, _ = smooth_slices(3, seed=4, lesion=True)
    fitted.eval()
    with torch.no_grad():
        x = to_signed(image)
        paper = fitted.loss(x, fitted.autoencoder(x))
        grid = fitted.position_scores(image)
    assert torch.allclose(fitted.score(image).slice, paper, rtol=1e-5)
    cells = F.adaptive_max_pool2d(roi.float(), grid.shape[-2:])[:, 0] > 0
    in_roi = torch.stack([g[c].mean() for g, c in zip(grid, cells)])
    assert torch.allclose(fitted.score(image, roi).slice, in_roi, rtol=1e-5)
    fitted.hparams["slice_score"] = "max"  # the option: the largest cell in the ROI
    try:
        peak = torch.stack([g[c].max() for g, c in zip(grid, cells)])
        assert torch.allclose(fitted.score(image, roi).slice, peak, rtol=1e-5)
    finally:
        fitted.hparams["slice_score"] = "mean"


def test_save_load_round_trip_gives_identical_scores(fitted, tmp_path):
    path = fitted.save(tmp_path / "dpa.pt")
    payload = torch.load(path, weights_only=True)
    assert not any(k.startswith("loss.vgg.") for k in payload["state"])  # the frozen VGG is rebuilt, not saved
    assert any(k.startswith("loss.scale_") for k in payload["state"])  # the feature statistics are
    loaded = AnomalyDetector.load(path)
    assert isinstance(loaded, DeepPerceptualAutoencoder) and loaded.thresholds == fitted.thresholds
    image, roi, _ = smooth_slices(3, seed=5, lesion=True)
    a, b = fitted.score(image, roi), loaded.score(image, roi)
    assert torch.equal(a.pixel, b.pixel) and torch.equal(a.slice, b.slice)
    assert not torch.equal(loaded.loss.scale_32, torch.ones_like(loaded.loss.scale_32))  # estimated, not default


def test_feature_statistics_from_a_file_in_the_papers_format(tmp_path):
    channels = {"r22": 128, "r32": 256}
    stats = {k: (torch.full((1, c, 1, 1), 0.5), torch.full((1, c, 1, 1), 2.0)) for k, c in channels.items()}
    path = tmp_path / "mean_var.pt"
    torch.save(stats, path)
    detector = create_detector("dpa", **{**FAST, "final_iters": 1, "transition_iters": 1, "stable_iters": 1, "feature_stats": str(path)})
    detector.fit(smooth_slices(4, seed=6)[0], progress=False)
    assert torch.equal(detector.loss.mean_16, torch.full((128,), 0.5)) and torch.equal(detector.loss.scale_32, torch.full((256,), 2.0))
    torch.save({"r22": stats["r22"], "r32": (torch.zeros(3), torch.ones(3))}, path)
    with pytest.raises(InputError, match="256"):
        create_detector("dpa", **{**FAST, "final_iters": 1, "feature_stats": str(path)}).fit(smooth_slices(2, seed=6)[0], progress=False)


def test_vgg19_needs_a_weights_file_and_loads_torchvision_layout(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    with pytest.raises(InputError, match="vgg19 state_dict"):
        create_detector("dpa", image_size=SIZE, perceptual="vgg19", final_iters=1)
    torch.manual_seed(0)
    features = make_layers(cfgs["E"])[:14].eval()  # torchvision's vgg19().features up to relu3_2
    path = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    vgg = build_vgg("vgg19", ["relu3_2"], weights=str(path))
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        expected = features((x.expand(-1, 3, -1, -1) - vgg.mean) / vgg.std)
        assert torch.allclose(vgg(x)[0], expected, atol=1e-5)
    detector = create_detector("dpa", image_size=SIZE, start_resolution=SIZE, perceptual="vgg19", weights=str(path), final_iters=1)
    assert detector.loss.layers == {32: "relu3_2"}


def test_bad_input_raises_input_error(fitted, tmp_path):
    with pytest.raises(InputError, match=r"\[B, 1, 32, 32\]"):
        fitted.score(torch.zeros(1, 1, 24, 24))
    with pytest.raises(InputError, match=r"\[B, 1, 32, 32\]"):
        create_detector("dpa", **FAST).fit(torch.zeros(2, 1, 16, 16), progress=False)
    with pytest.raises(InputError, match="powers of two"):
        create_detector("dpa", image_size=48)
    with pytest.raises(InputError, match="start resolution"):
        create_detector("dpa", image_size=32, start_resolution=64)
    with pytest.raises(InputError, match="inner_dims"):
        create_detector("dpa", image_size=32, inner_dims=[16, 16])
    with pytest.raises(InputError, match="feature_stats is neither"):
        create_detector("dpa", **{**FAST, "feature_stats": "imagenet"}).fit(torch.zeros(2, 1, 32, 32), progress=False)
    with pytest.raises(InputError, match="unknown vgg16 layer"):
        create_detector("dpa", image_size=32, feature_layer="relu9_9")
    with pytest.raises(InputError, match="no feature map"):
        create_detector("dpa", image_size=8, start_resolution=8, feature_layer="relu5_3")
    with pytest.raises(InputError, match="slice_score"):
        create_detector("dpa", image_size=32, slice_score="median")
    with pytest.raises(InputError, match="final_iters must be a whole number from 1 to"):
        create_detector("dpa", image_size=32, final_iters=0)
    with pytest.raises(InputError, match="transition_iters must be a whole number"):
        create_detector("dpa", image_size=32, transition_iters="many")
    with pytest.raises(InputError, match="lr must be a number above 0"):
        create_detector("dpa", image_size=32, lr=-1.0)
    with pytest.raises(InputError, match="not fitted"):
        create_detector("dpa", image_size=32).score(torch.zeros(1, 1, 32, 32))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(fitted.save(tmp_path / "ok.pt").read_bytes()[:200])
    with pytest.raises(InputError, match="broken.pt"):
        AnomalyDetector.load(broken)
