"""CFLOW and CS-Flow on the CPU: the flows' formulas, invertibility and log-determinants, per-slice scoring,
save/load, seeding, bad settings."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai_ad.detectors import AnomalyDetector, create_detector
from monai_ad.detectors.cflow import CFLOW
from monai_ad.detectors.csflow import CSFlow, mean_in_roi
from monai_ad.errors import InputError
from monai_ad.networks.flows import (
    CrossConvolution,
    FeatureStatistics,
    conditional_flow,
    cross_scale_flow,
    cross_scale_loss,
    fiber_loss,
    log_likelihood_per_dimension,
    positional_encoding_2d,
    seeded,
    standardized,
)

from liver_slices import slice_data
from test_lesion_ranking import CASES, fitted_detector

SIZE = 64
NAMES = ("cflow", "csflow")


@pytest.fixture(scope="module")
def data():
    return slice_data("textured", SIZE)


@pytest.fixture(scope="module", params=NAMES)
def fitted(request):
    assert CASES[request.param].size == SIZE
    return fitted_detector(request.param)  # trained on data["train"], calibrated on data["normal"]


@pytest.fixture
def one_thread():
    """The formula checks are hundreds of tiny operations: on a CPU shared with other jobs, two threads make them
    tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``module`` with every trainable parameter drawn at random, so that no coupling is the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


# ----------------------------------------------------------------------------- CFLOW formulas
def test_positional_encoding_is_the_2d_sinusoidal_code():
    code = positional_encoding_2d(16, 3, 5).numpy()
    assert code.shape == (16, 3, 5)
    rows, columns = np.mgrid[:3, :5]
    frequencies = 10000.0 ** (-np.arange(0, 8, 2) / 8)  # half = 8 channels per axis, 4 frequencies
    for k, omega in enumerate(frequencies):
        assert np.allclose(code[2 * k], np.sin(columns * omega), atol=1e-6)
        assert np.allclose(code[2 * k + 1], np.cos(columns * omega), atol=1e-6)
        assert np.allclose(code[8 + 2 * k], np.sin(rows * omega), atol=1e-6)
        assert np.allclose(code[8 + 2 * k + 1], np.cos(rows * omega), atol=1e-6)
    assert positional_encoding_2d(128, 7, 7).shape == (128, 7, 7)
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(130, 2, 2)


def test_log_likelihood_of_a_conditional_flow_is_the_change_of_variables(one_thread):
    with seeded(3):
        flow = _perturbed(conditional_flow(4, 8, coupling_blocks=2, clamp=1.9)).double()
    x, c = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    z, log_det = flow(x, c=[c])
    for i in range(3):  # log|det J| of each fiber against autograd's Jacobian
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None], c=[c[i : i + 1]])[0][0], x[i])
        assert float(log_det[i]) == pytest.approx(float(torch.linalg.slogdet(jacobian)[1]), abs=1e-8)
    z_np, log_det_np = z.detach().numpy(), log_det.detach().numpy()
    by_hand = (-0.5 * (z_np**2).sum(1) - 4 * 0.5 * math.log(2 * math.pi) + log_det_np) / 4  # log N(z) + log|det J|, / C
    ll = log_likelihood_per_dimension(z, log_det)
    assert np.allclose(ll.detach().numpy(), by_hand, atol=1e-10)
    assert float(fiber_loss(ll)) == pytest.approx(float(np.mean(np.log1p(np.exp(-by_hand)))), rel=1e-9)
    x_back, _ = flow(z, c=[c], rev=True)
    assert torch.allclose(x_back, x, atol=1e-9)


def test_feature_statistics_and_standardisation():
    levels = [torch.randn(5, 3, 4, 4) * 2 + 1, torch.randn(5, 2, 2, 2) - 3]
    statistics = FeatureStatistics()
    statistics.add([level[:2] for level in levels])
    statistics.add([level[2:] for level in levels])
    mean, std = statistics.mean_and_std()
    expected = [level.transpose(0, 1).flatten(1).double() for level in levels]
    assert torch.allclose(mean.double(), torch.cat([e.mean(1) for e in expected]), atol=1e-5)
    assert torch.allclose(std.double(), torch.cat([e.std(1, unbiased=False) for e in expected]), atol=1e-5)
    for level in standardized(levels, mean, std):
        assert torch.allclose(level.mean((0, 2, 3)), torch.zeros(level.shape[1]), atol=1e-5)


def test_cflow_map_and_slice_score(data):
    detector = fitted_detector("cflow")
    image, roi, _ = data["abnormal"]
    with torch.no_grad():
        maps = detector.log_likelihood_maps(detector.backbone_forward(image))
    expected = len(maps) - sum(
        F.interpolate(torch.exp(m - r)[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=True)[:, 0]
        for m, r in zip(maps, detector.reference_log_likelihood)
    )
    scores = detector.score(image, roi)
    assert torch.allclose(scores.pixel, expected, atol=1e-5)
    masked = torch.where(roi[:, 0], scores.pixel, torch.tensor(-np.inf))
    assert torch.equal(scores.slice, masked.flatten(1).amax(1))
    # the reference constant: the largest per-dimension log-likelihood of a training position (cached in float16)
    train = torch.cat([b["image"] for b in data["train"]])
    with torch.no_grad():
        highest = torch.stack([m.max() for m in detector.log_likelihood_maps(detector.backbone_forward(train))])
    assert torch.allclose(detector.reference_log_likelihood, highest, atol=0.05)
    assert len(detector.train_losses) == CASES["cflow"].hparams["epochs"]
    assert detector.train_losses[-1] < detector.train_losses[0]


# ----------------------------------------------------------------------------- CS-Flow formulas
GRIDS = [(4, 4), (2, 2), (1, 1)]


def _tiny_cross_scale_flow():
    with seeded(5):
        return _perturbed(cross_scale_flow(4, GRIDS, coupling_blocks=2, clamp=3.0, hidden_channels=6)).double()


def test_cross_scale_flow_inverts_and_its_log_determinant_is_the_jacobians(one_thread):
    flow = _tiny_cross_scale_flow()
    x = [torch.randn(2, 4, h, w, dtype=torch.float64) for h, w in GRIDS]
    z, log_det = flow(x)
    assert [tuple(zi.shape) for zi in z] == [tuple(xi.shape) for xi in x]
    x_back, log_det_back = flow(z, rev=True)
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(x_back, x))
    assert torch.allclose(log_det_back, -log_det, atol=1e-9)
    sizes = [4 * h * w for h, w in GRIDS]

    def flat_forward(v):
        parts = [p.view(1, 4, h, w) for p, (h, w) in zip(torch.split(v, sizes), GRIDS)]
        return torch.cat([zi.flatten() for zi in flow(parts)[0]])

    for i in range(2):
        flat = torch.cat([xi[i].flatten() for xi in x])
        jacobian = torch.autograd.functional.jacobian(flat_forward, flat, vectorize=True)  # [84, 84]
        assert float(log_det[i]) == pytest.approx(float(torch.linalg.slogdet(jacobian)[1]), abs=1e-8)
    flat_z = torch.cat([zi.flatten(1) for zi in z], 1)
    assert float(cross_scale_loss(z, log_det)) == pytest.approx(
        float(((0.5 * flat_z.pow(2).sum(1) - log_det) / flat_z.shape[1]).mean()), rel=1e-12
    )


def test_two_builds_of_a_seeded_cross_scale_flow_hold_the_same_state(one_thread):
    # FrEIA's GraphINN orders its modules by sets of nodes: a saved state must still land in the module it came from
    first, second = _tiny_cross_scale_flow().state_dict(), _tiny_cross_scale_flow().state_dict()
    assert list(first) == list(second) and all(torch.equal(first[k], second[k]) for k in first)
    with seeded(6):
        other = cross_scale_flow(4, GRIDS, coupling_blocks=2, clamp=3.0, hidden_channels=6).state_dict()
    permutations = [k for k in first if k.endswith(".perm")]
    assert len(permutations) == 3 and any(not torch.equal(first[k], other[k]) for k in permutations)


def test_cross_convolution_reads_only_neighbouring_scales(one_thread):
    torch.manual_seed(0)
    grids = [(8, 8), (4, 4), (2, 2), (1, 1)]
    subnet = _perturbed(CrossConvolution(3, 5, hidden_channels=4, n_scales=4))
    xs = [torch.randn(1, 3, h, w, requires_grad=True) for h, w in grids]
    ys = subnet(xs)
    assert [tuple(y.shape) for y in ys] == [(1, 5, h, w) for h, w in grids]
    for i, y in enumerate(ys):
        grads = torch.autograd.grad(y.sum(), xs, retain_graph=True, allow_unused=True)
        reads = [j for j, g in enumerate(grads) if g is not None and g.abs().sum() > 0]
        assert reads == [j for j in range(4) if abs(i - j) <= 1], i
    fresh = CrossConvolution(3, 5, hidden_channels=4, n_scales=4)  # the learned gains start at 0: identity coupling
    assert all(float(y.abs().max()) == 0 for y in fresh(xs))


def test_csflow_map_and_slice_scores(data):
    detector = fitted_detector("csflow")
    image, roi, _ = data["abnormal"]
    scores = detector.score(image, roi)
    with torch.no_grad():
        z, _ = detector.latents(detector.backbone_forward(image))
    squared = [zi.pow(2).mean(1) for zi in z]
    up = [F.interpolate(s[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0] for s in squared]
    assert torch.allclose(scores.pixel, sum(up) / 3, atol=1e-5)
    masked = torch.where(roi[:, 0], scores.pixel, torch.tensor(-np.inf))
    assert torch.equal(scores.slice, masked.flatten(1).amax(1))  # default: the map's maximum in the ROI
    # "mean" without an ROI is the paper's image score: the mean of z² over every position of every scale
    paper = torch.cat([zi.flatten(1) for zi in z], 1).pow(2).mean(1)
    assert torch.allclose(mean_in_roi(squared, None), paper, atol=1e-5)
    inside = [F.adaptive_max_pool2d(roi.float(), s.shape[-2:]).flatten(1) > 0 for s in squared]
    by_hand = sum((s.flatten(1) * m).sum(1) for s, m in zip(squared, inside)) / sum(m.sum(1) for m in inside)
    assert torch.allclose(mean_in_roi(squared, roi), by_hand, atol=1e-6)


# ----------------------------------------------------------------------------- both detectors
def test_scoring_is_per_slice(fitted, data):
    image, roi, _ = data["abnormal"]
    batch = fitted.score(image, roi)
    single = fitted.score(image[2:3], roi[2:3])
    assert torch.allclose(batch.pixel[2:3], single.pixel, atol=1e-5)
    assert torch.allclose(batch.slice[2:3], single.slice, atol=1e-5)
    shuffled = fitted.score(torch.cat([data["normal"][0][:3], image[2:3]]))  # other slices beside it
    assert torch.allclose(shuffled.pixel[3:], single.pixel, atol=1e-5)


def test_save_load_gives_identical_scores(fitted, data, tmp_path):
    path = fitted.save(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    assert not any(k.startswith("encoder.") for k in payload["state"])  # pretrained weights not duplicated
    flows = "flows." if fitted.name == "cflow" else "flow."
    assert any(k.startswith(flows) for k in payload["state"]) and "feature_std" in payload["state"]
    loaded = AnomalyDetector.load(path)
    assert type(loaded) is type(fitted) and loaded.is_fitted and loaded.thresholds == fitted.thresholds
    image, roi, _ = data["abnormal"]
    a, b = fitted.score(image, roi), loaded.score(image, roi)
    assert torch.equal(a.pixel, b.pixel) and torch.equal(a.slice, b.slice)


SEEDED = {
    "cflow": {"image_size": 32, "epochs": 1, "batch_size": 4, "coupling_blocks": 2},
    "csflow": {"image_size": 32, "epochs": 2, "batch_size": 4, "hidden_channels": 8, "coupling_blocks": 2, "lr": 1e-2},
}


@pytest.mark.parametrize("name", NAMES)
def test_fit_is_seeded_with_and_without_the_feature_cache(name, data):
    train = [{"image": F.interpolate(b["image"], size=32, mode="bilinear")} for b in data["train"][:1]]
    image = F.interpolate(data["abnormal"][0][:2], size=32, mode="bilinear")
    scores = []
    for seed, cache in ((1, None), (1, None), (2, None), (1, False)):
        detector = create_detector(name, **SEEDED[name], seed=seed, cache_features=cache).fit(train, progress=False)
        scores.append(detector.score(image).pixel)
    assert torch.equal(scores[0], scores[1]) and not torch.allclose(scores[0], scores[2])
    assert torch.isfinite(scores[3]).all()


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("cflow", {"epochs": 0}, "cflow: epochs must be a whole number from 1 to"),
        ("cflow", {"lr": 0.0}, "cflow: lr must be a number above 0"),
        ("cflow", {"coupling_blocks": 0}, "cflow: coupling_blocks must be a whole number of at least 1"),
        ("cflow", {"fiber_batch_size": 0}, "cflow: fiber_batch_size must be a whole number of at least 1"),
        ("cflow", {"condition_dim": 130}, "cflow: condition_dim must be a positive multiple of 4"),
        ("cflow", {"clamp": 0.0}, "cflow: clamp must be a number above 0"),
        ("cflow", {"layers": []}, "cflow: layers must name at least one encoder layer"),
        ("cflow", {"layers": ["blocks.3"]}, "unknown efficientnet_lite0 layer 'blocks.3'"),
        ("cflow", {"backbone": "wide_resnet50_2"}, "needs its ImageNet weights file"),
        ("csflow", {"epochs": 0}, "csflow: epochs must be a whole number from 1 to"),
        ("csflow", {"weight_decay": -1.0}, "csflow: weight_decay must be a number of at least 0"),
        ("csflow", {"hidden_channels": 0}, "csflow: hidden_channels must be a whole number of at least 1"),
        ("csflow", {"coupling_blocks": 1.5}, "csflow: coupling_blocks must be a whole number of at least 1"),
        ("csflow", {"clamp": -3.0}, "csflow: clamp must be a number above 0"),
        ("csflow", {"eps": 0.0}, "csflow: eps must be a number above 0"),
        ("csflow", {"slice_score": "median"}, "csflow: slice_score must be one of max, mean"),
        ("csflow", {"layer": ["blocks.2", "blocks.4"]}, "csflow: layer is one backbone layer"),
    ],
)
def test_bad_hyper_parameters_are_one_line_input_errors(name, bad, message):
    with pytest.raises(InputError, match=message) as error:
        create_detector(name, image_size=SIZE, **bad)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind, small", [(CFLOW, {}), (CSFlow, {"hidden_channels": 8})])
def test_fit_checks_slices(kind, small):
    detector = kind(image_size=32, epochs=1, **small)
    with pytest.raises(InputError, match=rf"the {kind.name} detector takes slices \[B, 1, 32, 32\]"):
        detector.fit(torch.zeros(2, 1, 48, 48), progress=False)
    with pytest.raises(InputError, match="not fitted"):
        detector.score(torch.zeros(1, 1, 32, 32))
