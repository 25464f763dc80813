"""What every detector shares: hyper-parameters recorded from the constructor's signature, and a `fit` that starts
over."""

import pytest
import torch
from test_detectors import synthetic_slices

from monai_ad.detectors import AnomalyDetector, SliceScores, constructor_arguments, create_detector
from monai_ad.networks.clip import TINY_MODEL


class _Toy(AnomalyDetector):
    def _fit(self, batches, progress):
        pass

    def _score(self, image, roi):
        return SliceScores(pixel=image[:, 0], slice=image.flatten(1).amax(1))


class _Recorded(_Toy):
    def __init__(self, image_size: int = 32, in_channels: int = 1, layers=("a", "b"), *, lr: float = 1, **extra):
        layers = list(layers)  # normalised before the call: recorded as the list
        super().__init__(**constructor_arguments())


class _ByName(_Toy):
    def __init__(self, image_size: int = 32, width: int = 4):
        super().__init__(image_size=image_size, width=int(width))


def test_hyper_parameters_are_recorded_once_from_the_signature():
    detector = _Recorded(64, layers=("x",), lr=0.5, momentum=0.9)
    assert detector.hparams == {"image_size": 64, "in_channels": 1, "layers": ["x"], "lr": 0.5, "momentum": 0.9}
    assert list(detector.hparams) == ["image_size", "in_channels", "layers", "lr", "momentum"]
    assert _Recorded().hparams == {"image_size": 32, "in_channels": 1, "layers": ["a", "b"], "lr": 1}
    assert _ByName(width=3.0).hparams == {"image_size": 32, "in_channels": 1, "width": 3}  # the old way still works


# every detector that learns from its normals (the density floor learns nothing), cheaply: a second fit must
# leave what one fit on the second data leaves
REFIT = {
    "patchcore": {"image_size": 64, "coreset_ratio": 0.5},
    "padim": {"image_size": 64},
    "simplenet": {"image_size": 64, "meta_epochs": 1, "gan_epochs": 2},
    "rd4ad": {"image_size": 64, "oce_blocks": 1, "decoder_blocks": (1, 1, 1), "epochs": 2, "batch_size": 4},
    "dpa": {"image_size": 32, "start_resolution": 16, "transition_iters": 2, "stable_iters": 2, "final_iters": 3},
    "synthetic_anomaly": {"image_size": 64, "width": 4, "steps": 3, "batch_size": 4, "crop_size": 32},
    "clip_reconstruction": {"image_size": 96, "prompt_length": 2, "epochs": 2, "batch_size": 4},
    "winclip": {"image_size": 96},
    "stfpm": {"image_size": 64, "epochs": 2, "batch_size": 4},
    "cfa": {"image_size": 64, "epochs": 2, "batch_size": 4},
    "draem": {"image_size": 64, "width": 4, "discriminator_width": 4, "epochs": 2, "batch_size": 4, "mean_filter": 5},
    "cutpaste": {"image_size": 64, "head_layers": 1, "head_width": 16, "embedding_dim": 8, "steps": 3, "batch_size": 4,
                 "freeze_steps": 1, "patch_window": 16, "patch_stride": 8},
    "intensity": {"image_size": 64, "pixel_mm": 1.5},
    "deepsvdd": {"image_size": 64, "pretrain_epochs": 1, "epochs": 2, "batch_size": 8},
    "ddad": {"image_size": 32, "input_size": 32, "width": 4, "fc_width": 32, "latent_dim": 4, "epochs": 2, "batch_size": 2},
    "ganomaly": {"image_size": 64, "width": 8, "epochs": 2, "batch_size": 2},
    "fanogan": {"image_size": 64, "width": 8, "epochs": 2, "encoder_epochs": 2, "batch_size": 2, "n_critic": 2},
    "utrad": {"image_size": 32, "patch_sizes": [4, 2], "d_model": 16, "heads": 2, "encoder_layers": 1,
              "decoder_layers": 1, "feedforward_dim": 32, "epochs": 2, "batch_size": 2},
    "fused": {"image_size": 64, "detector_hparams": {"coreset_ratio": 0.5}, "intensity_hparams": {"pixel_mm": 1.5}},
}


@pytest.mark.parametrize("name", sorted(REFIT))
def test_a_second_fit_starts_over(name):
    hparams = dict(REFIT[name])
    if "clip" in name:
        hparams.update(clip_model=TINY_MODEL, allow_random_weights=True)
    size = hparams["image_size"]
    first, first_roi, _ = synthetic_slices(4, seed=3, size=size)
    second, second_roi, _ = synthetic_slices(4, seed=4, size=size)

    def fit(detector, image, roi):
        torch.manual_seed(0)  # a detector may draw from the global generator while it trains
        return detector.fit([{"image": image, "roi": roi}], progress=False)

    refitted = fit(create_detector(name, **hparams), first, first_roi)
    refitted.thresholds = {"slice": 1.0}  # as if calibrated: thresholds belong to the first fit
    before = {k: v.clone() for k, v in refitted.state_dict().items()}
    fit(refitted, second, second_roi)
    once = fit(create_detector(name, **hparams), second, second_roi)

    after, expected = refitted.state_dict(), once.state_dict()
    assert after.keys() == expected.keys() and refitted.thresholds == {} and refitted.is_fitted
    assert [k for k in expected if not torch.equal(after[k], expected[k])] == []
    # the check means something: the first data had left a different state
    assert any(before[k].shape != after[k].shape or not torch.equal(before[k], after[k]) for k in after)


@pytest.mark.parametrize("name", sorted(REFIT) + ["density"])
def test_a_fitted_and_calibrated_detector_scores_the_same_after_save_and_load(name, tmp_path):
    hparams = dict(REFIT.get(name, {"image_size": 64, "pixel_mm": 1.5}))
    if "clip" in name:
        hparams.update(clip_model=TINY_MODEL, allow_random_weights=True)
    size = hparams["image_size"]
    train, train_roi, _ = synthetic_slices(4, seed=3, size=size)
    held, held_roi, _ = synthetic_slices(4, seed=4, size=size)
    test, test_roi, _ = synthetic_slices(3, seed=5, lesion=True, size=size)
    torch.manual_seed(0)
    detector = create_detector(name, **hparams).fit([{"image": train, "roi": train_roi}], progress=False)
    detector.calibrate([{"image": held, "roi": held_roi}])
    loaded = AnomalyDetector.load(detector.save(tmp_path / f"{name}.pt"))
    assert loaded.is_fitted and loaded.thresholds == detector.thresholds and loaded.thresholds
    before, after = detector.score(test, test_roi), loaded.score(test, test_roi)
    assert torch.allclose(before.pixel, after.pixel, atol=1e-6) and torch.allclose(before.slice, after.slice, atol=1e-6)
    assert before.pixel.std() > 0  # a map, not a constant
