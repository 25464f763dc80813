"""What every detector shares: hyper-parameters recorded from the constructor's signature."""

from monai_ad.detectors import AnomalyDetector, SliceScores, constructor_arguments


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
