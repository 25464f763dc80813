"""MKD on the CPU: loss, cloner and guided-ReLU formulas, the gradient map against a hand computation, the lesion
check of the gradient map, save/load, per-slice scoring, seeding, bad settings."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from monai_ad.components.maps import cosine_distance_map
from monai_ad.detectors import AnomalyDetector, create_detector
from monai_ad.detectors.mkd import MKD
from monai_ad.errors import InputError
from monai_ad.networks.backbones import IMAGENET_MEAN, IMAGENET_STD
from monai_ad.detectors.mkd.torch_model import (
    DISTILLED_LAYERS,
    GuidedReLU,
    build_cloner,
    build_source,
    guided_backprop,
    per_slice_loss,
)

from liver_slices import slice_data
from test_lesion_ranking import CASES, fitted_detector

SIZE = 64
FAST = {"image_size": SIZE, **CASES["mkd"].hparams}  # small settings: test_lesion_ranking.CASES


@pytest.fixture(scope="module")
def data():
    return slice_data(CASES["mkd"].slices, SIZE)


@pytest.fixture(scope="module")
def fitted():
    assert CASES["mkd"].size == SIZE
    return fitted_detector("mkd")  # trained on data["train"], calibrated on data["normal"]


def test_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    source = [torch.rand(3, 4, 6, 6) * 5, torch.rand(3, 8, 3, 3) * 5]
    cloner = [s + torch.randn_like(s) for s in source]
    expected = []
    for b in range(3):
        total = 0.0
        for s, c in zip(source, cloner):
            s_b, c_b = s[b].flatten().double().numpy(), c[b].flatten().double().numpy()
            direction = 1 - s_b @ c_b / np.linalg.norm(s_b) / np.linalg.norm(c_b)
            value = np.mean((s_b - c_b) ** 2)
            total += direction + 0.01 * value
        expected.append(total)
    assert np.allclose(per_slice_loss(source, cloner, 0.01).numpy(), expected, rtol=1e-5)
    # λ weighs the value loss: without it only the direction loss is left, which ignores a map's scale
    assert torch.allclose(per_slice_loss(source, [2 * s for s in source], 0.0), torch.zeros(3), atol=1e-6)
    assert (per_slice_loss(source, [2 * s for s in source], 1.0) > 0.1).all()


def test_cloner_maps_have_the_sources_shapes_at_the_reference_layers():
    source, cloner = build_source(DISTILLED_LAYERS), build_cloner(DISTILLED_LAYERS)
    x = torch.rand(2, 1, SIZE, SIZE)
    source_maps, cloner_maps = source(x), cloner(x)
    assert [tuple(m.shape) for m in source_maps] == [(2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4), (2, 512, 2, 2)]
    assert [m.shape for m in cloner_maps] == [m.shape for m in source_maps]
    assert source.channels == cloner.channels == [128, 256, 512, 512]
    assert source.strides == cloner.strides == [4, 8, 16, 32]
    # poolK = block K's last ReLU max-pooled: the max-pool outputs of torchvision's VGG16 features
    extractor = source.extractor
    body, features = extractor.body, (x.expand(-1, 3, -1, -1) - extractor.mean) / extractor.std
    pooled = {}
    for index, module in enumerate(body):
        features = module(features)
        pooled[index] = features
    for level, relu in enumerate((8, 15, 22, 29)):
        assert torch.equal(source_maps[level], F.max_pool2d(pooled[relu], 2))
    # the reference's configuration "B": no biases, BatchNorm after every convolution but each block's last
    convs = [m for m in cloner.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 16, 128, 16, 16, 256, 16, 16, 512, 16, 16, 512]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in cloner.modules()) == 8
    assert round(sum(p.numel() for p in cloner.parameters()) / 1e6, 2) == 0.34
    assert not any(isinstance(m, torch.nn.ReLU) for m in [*source.modules(), *cloner.modules()])  # all GuidedReLU


def test_guided_relu_forward_is_relu_and_backward_passes_only_positive_gradients_where_the_input_was_positive():
    relu = GuidedReLU()
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0, 3.0], requires_grad=True)
    upstream = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 2.0])
    (plain,) = torch.autograd.grad(relu(x), x, upstream)
    assert torch.equal(plain, torch.tensor([0.0, 0.0, 0.0, -1.0, 1.0, 2.0]))  # off: the ReLU's own gradient
    with guided_backprop(relu):
        assert relu.guided
        out = relu(x)
        (guided,) = torch.autograd.grad(out, x, upstream)
    assert torch.equal(out, torch.relu(x)) and torch.equal(guided, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0]))
    assert not relu.guided  # off outside the block
    with pytest.raises(RuntimeError), guided_backprop(relu):
        raise RuntimeError("inside")
    assert not relu.guided  # also when the block fails


def test_guided_mode_changes_neither_the_networks_outputs_nor_the_training_gradients():
    torch.manual_seed(0)
    cloner = build_cloner(DISTILLED_LAYERS).eval()
    x = torch.rand(2, 1, SIZE, SIZE)

    def outputs_and_gradients():
        cloner.zero_grad()
        maps = cloner(x)
        sum(m.sum() for m in maps).backward()
        return [m.detach() for m in maps], [p.grad.clone() for p in cloner.parameters()]

    maps, grads = outputs_and_gradients()
    with guided_backprop(cloner):
        guided_maps = [m.detach() for m in cloner(x)]
    again_maps, again_grads = outputs_and_gradients()
    assert all(torch.equal(a, b) for a, b in zip(maps, guided_maps))
    assert all(torch.equal(a, b) for a, b in zip(maps, again_maps))
    assert all(torch.equal(a, b) for a, b in zip(grads, again_grads))


def _hand_gradient_map(detector: MKD, image: torch.Tensor, guided: set) -> torch.Tensor:
    """The map by hand: each network run module by module on the normalised input with plain ReLUs, guided ones
    made so by a hook that clamps the incoming gradient at 0 (the ReLU's own backward then zeroes it where its input
    was negative); the loss over pool3..pool5 summed over slices; |∂ loss / ∂ normalised input| summed over
    channels."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    normalised = ((image.expand(-1, 3, -1, -1) - mean) / std).requires_grad_(True)

    def run(network, is_guided):
        x, taps = normalised, {}
        for index, module in enumerate(network.extractor.body):
            if isinstance(module, GuidedReLU):
                x = torch.relu(x)
                if is_guided:
                    x.register_hook(lambda grad: grad.clamp_min(0))
            else:
                x = module(x)
            taps[index] = x
        return [F.max_pool2d(taps[i], 2) for i in (15, 22, 29)]  # pool3, pool4, pool5

    source, cloner = run(detector.source, "source" in guided), run(detector.cloner, "cloner" in guided)
    loss = 0.0
    for s, c in zip(source, cloner):
        s, c = s.flatten(1), c.flatten(1)
        loss = loss + (1 - (s * c).sum(1) / s.norm(dim=1) / c.norm(dim=1)).sum() + 0.01 * ((s - c) ** 2).mean(1).sum()
    (gradient,) = torch.autograd.grad(loss, normalised)
    return gradient.abs().sum(1)


@pytest.mark.parametrize("guided, networks", [("cloner", {"cloner"}), ("both", {"cloner", "source"}), ("none", set())])
def test_gradient_map_equals_a_hand_autograd_computation(guided, networks):
    detector = MKD(image_size=32, guided=guided, seed=3).eval()
    image = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = _hand_gradient_map(detector, image, networks)
    got = detector.gradient_maps(image)
    assert got.shape == (2, 32, 32) and torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.max()))
    if guided != "none":  # guidance is applied, and switched off again
        assert not torch.allclose(got, _hand_gradient_map(detector, image, set()), rtol=1e-2)
    assert not any(m.guided for m in detector.modules() if isinstance(m, GuidedReLU))
    assert all(p.grad is None for p in detector.parameters())  # a map accumulates nothing into the cloner


def test_distance_map_is_the_per_layer_cosine_distance_at_the_map_layers(fitted, data):
    image, roi, _ = data["abnormal"]
    source, cloner = fitted.source(image), fitted.cloner(image)
    expected = fitted.blur(cosine_distance_map(source[1:], cloner[1:], SIZE, "sum"))
    scores = fitted.score(image, roi)
    assert torch.allclose(scores.pixel, expected, atol=1e-5)
    masked = torch.where(roi[:, 0], scores.pixel, torch.tensor(-np.inf))
    assert torch.equal(scores.slice, masked.flatten(1).amax(1))  # slice score = map maximum in the ROI


def test_the_papers_gradient_map_finds_the_lesions(fitted, data):
    image, roi, lesion = data["abnormal"]
    with torch.no_grad():
        pixel = fitted.blur(fitted.gradient_maps(image)).numpy()
    inside = roi[:, 0].numpy()
    assert roc_auc_score(lesion[inside], pixel[inside]) > 0.9
    peaks = [np.unravel_index(np.where(r, p, -np.inf).argmax(), p.shape) for p, r in zip(pixel, inside)]
    peak_in_lesion = [m[peak] for m, peak in zip(lesion, peaks)]
    assert sum(peak_in_lesion) >= len(pixel) - 1  # the in-liver maximum lies on the lesion


def test_training_lowers_the_loss_and_leaves_the_source_untouched(fitted):
    assert len(fitted.train_losses) == FAST["epochs"] and fitted.train_losses[-1] < 0.5 * fitted.train_losses[0]
    source_before = create_detector("mkd", **FAST).source.state_dict()  # an unfitted one's (pretrained)
    for key, value in fitted.source.state_dict().items():
        assert torch.equal(value, source_before[key]), key
    assert not any(p.requires_grad for p in fitted.source.parameters())


def test_save_load_gives_identical_scores(fitted, data, tmp_path):
    path = fitted.save(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    assert not any(k.startswith("source.") for k in payload["state"])  # pretrained weights not duplicated
    assert any(k.startswith("cloner.") and "running_mean" in k for k in payload["state"])  # BatchNorm statistics too
    loaded = AnomalyDetector.load(path)
    assert type(loaded) is MKD and loaded.is_fitted and loaded.thresholds == fitted.thresholds
    image, roi, _ = data["abnormal"]
    a, b = fitted.score(image, roi), loaded.score(image, roi)
    assert torch.equal(a.pixel, b.pixel) and torch.equal(a.slice, b.slice)
    assert torch.equal(fitted.gradient_maps(image[:2]), loaded.gradient_maps(image[:2]))


def test_a_slices_maps_do_not_depend_on_its_batch(fitted, data):
    image, roi, _ = data["abnormal"]
    batch, single = fitted.score(image, roi), fitted.score(image[2:3], roi[2:3])
    assert torch.allclose(batch.pixel[2:3], single.pixel, atol=1e-5)
    assert torch.allclose(batch.slice[2:3], single.slice, atol=1e-5)
    with torch.no_grad():
        gradient_batch, gradient_single = fitted.gradient_maps(image[:3]), fitted.gradient_maps(image[2:3])
    assert torch.allclose(gradient_batch[2:3], gradient_single, rtol=1e-4, atol=1e-6 * float(gradient_single.max()))


def test_the_cloner_is_seeded_without_touching_the_global_random_state():
    state = torch.random.get_rng_state()
    first, again, other = (MKD(image_size=32, seed=s).cloner.state_dict() for s in (1, 1, 2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"epochs": 0}, "mkd: epochs must be a whole number from 1 to"),
        ({"batch_size": 0}, "mkd: batch_size must be a whole number from 1 to"),
        ({"lr": 0.0}, "mkd: lr must be a number above 0"),
        ({"sigma": -1.0}, "mkd: sigma must be"),
        ({"value_weight": -0.1}, "mkd: value_weight must be a number of at least 0"),
        ({"map_mode": "mean"}, "mkd: map_mode must be one of gradient, distance"),
        ({"guided": "source"}, "mkd: guided must be one of cloner, both, none"),
        ({"layers": ["pool2", "conv9"]}, r"mkd: layers must be distinct VGG16 layers"),
        ({"layers": []}, r"mkd: layers must be distinct VGG16 layers"),
        ({"map_layers": ["pool1"]}, r"mkd: map_layers must be some of layers"),
        ({"layers": ["pool1", "pool2"], "map_layers": ["pool2"]},
         r"mkd: the cloner's width differs .* pool1 \(16 channels, the source 64\)"),
        ({"image_size": 16}, "mkd: image_size must be at least 32"),
        ({"in_channels": 2}, "the mkd detector takes 1 or 3 input channel"),
    ],
)
def test_bad_settings_are_one_line_input_errors(bad, message):
    with pytest.raises(InputError, match=message) as error:
        MKD(**{"image_size": SIZE, **bad})
    assert "\n" not in str(error.value)


def test_fit_and_score_check_slices():
    detector = MKD(image_size=SIZE, epochs=1)
    with pytest.raises(InputError, match="not fitted"):
        detector.score(torch.zeros(1, 1, SIZE, SIZE))
    with pytest.raises(InputError, match=rf"takes slices \[B, 1, {SIZE}, {SIZE}\]"):
        detector.fit(torch.zeros(2, 1, 96, 96), progress=False)


def test_the_gradient_map_works_under_a_callers_inference_mode(fitted, data):
    image = data["abnormal"][0][:2]
    expected = fitted.gradient_maps(image)
    with torch.inference_mode():
        got = fitted.gradient_maps(image.clone())
    assert torch.equal(got, expected)
