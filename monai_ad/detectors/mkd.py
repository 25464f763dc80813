"""MKD (Salehi, Sadjadi, Baselizadeh, Rohban, Rabiee, CVPR 2021): multiresolution knowledge distillation.

A frozen ImageNet VGG16 (the source) and a thinner, randomly initialised VGG (the cloner) see the same slice; the
cloner is trained on normal slices to reproduce the source's maps at several resolutions. Where a slice holds
something the cloner never saw, its maps part from the source's, and the gradient of that discrepancy with respect
to the input shows where. The networks and the loss are ``monai_ad.networks.knowledge_distillation``; this module
is the detector around them: training, scoring, state. As rohban-lab/Knowledge_Distillation_AD (read for its
facts) and the copy BMAD ran:

- **Networks.** The source is torchvision's VGG16 ``features`` with ImageNet weights, frozen. The cloner is the
  reference's configuration "B" (``CLONER_CFG``: the VGG16 block structure with every convolution 16 wide but the
  last of blocks 2–5, which has the source's width), Xavier-uniform convolutions without bias, a BatchNorm after
  every convolution but the last of each block; 0.34 M parameters.
- **Layers.** Distilled at the outputs of the max-pools of blocks 2–5 (``pool2..pool5``: 128/256/512/512
  channels at strides 4/8/16/32), where the cloner's blocks end in the source's widths. Not the ReLUs
  relu1_2 … relu4_3 that are sometimes quoted: the reference's cloner's first block is 16 wide where VGG16's is 64.
- **Loss.** Per slice, Σ over the layers of the direction loss 1 − cos(flattened source map, flattened cloner
  map) plus λ · Σ over the layers of the value loss (the mean squared difference); λ weighs the value loss
  (``value_weight``, 0.01: the reference's value for every data set but MVTec, and BMAD's). The training loss is
  its batch mean (the reference's ``MSELoss`` and mean cosine). Adam, lr 1e-3, batch 64, 200 epochs, 224 px
  (BMAD; the reference trains MVTec at 128 px).
- **Map** (``map_mode="gradient"``). The gradient, with respect to the input, of the loss of the slice over the
  three deepest layers (``map_layers``: ``pool3..pool5``, as the reference's localisation and detection), through
  guided backpropagation in the cloner's ReLUs (the reference hooks only the cloner's; ``guided="both"`` guides
  the source's too, ``"none"`` gives the plain gradient, the reference's "gradients" method); its absolute value
  summed over the three input channels (the reference's ``convert_to_grayscale``), Gaussian σ = 4 px.
- **Guided ReLUs.** Both networks are built with ``GuidedReLU`` activations, which are ``torch.relu`` except while
  a gradient map is computed (``guided_backprop``); training and the networks' outputs are those of plain ReLUs.

Choices the sources leave open or that differ from them, made here:

- **Slice score.** The map's maximum inside the liver ROI (``max_in_roi_map``), as the project's other map
  detectors; the paper's image score is the loss itself (over ``pool3..pool5``), which reads the whole slice,
  outside the liver included. On the tests' liver-like slices the gradient map peaks on the lesion in nearly every
  abnormal slice, but a normal slice can peak as high on the liver's border, so the slices rank by the distance
  map there (``tests/test_lesion_ranking.py``); ``guided="both"`` ranked them (in-liver pixel AUROC 0.99 against
  0.97), narrowly.
- **No per-slice normalisation.** The reference rescales each image's gradient map to [0, 1] (its 99th
  percentile clipped, then min–max) before the blur. That makes every slice's map peak at 1, so its maximum no
  longer ranks slices; the map here is the raw |gradient|, comparable across slices.
- **Gradient with respect to the normalised input.** The grey slice is repeated to three channels and
  normalised with ImageNet's mean/std inside the networks; the map is the gradient with respect to that
  normalised input (the reference's input), read as the gradient with respect to the repeated slice times the
  channel's std.
- **Cheaper map.** ``map_mode="distance"`` needs no gradients: per ``map_layers`` layer 1 − the per-pixel
  cosine of source and cloner features, bilinearly upsampled and summed (``cosine_distance_map``), then the same
  blur (at 224 px on the CPU it takes 40 % of the gradient map's time).
- **Cloner builder.** The project's VGG builder (``vgg_extractor``, random weights, trainable) with its
  convolutions re-initialised Xavier-uniform without bias and BatchNorms inserted, so the module indices stay
  torchvision's and the layer names are VGG16's.
- **No test-time model selection.** The reference evaluates a test AUROC every 10 epochs; the weights after the
  last of ``epochs`` are kept.
- **Source maps computed once.** The source is frozen and the method uses no augmentation, so the slices and the
  source's maps are cached on the device (float16) while they fit ``cache_features`` bytes (as RD4AD's); cached
  rows are shuffled every epoch (seeded).
- **Processes.** Under torch.distributed each process trains on its share; gradients are averaged after every
  step and the cloner's BatchNorm statistics after every epoch, so every process holds the same model.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.maps import cosine_distance_map, max_in_roi_map
from monai_ad.components.smoothing import GaussianBlur2d
from monai_ad.components.training_loop import FrozenFeatureTrainer, cache_budget
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.errors import InputError
from monai_ad.networks.knowledge_distillation import (
    DISTILLED_LAYERS,
    LAYER_NAMES,
    SCORED_LAYERS,
    build_cloner,
    build_source,
    guided_backprop,
    per_slice_loss,
)
from monai_ad.settings import Range, check_setting, check_settings

DEFAULT_CACHE_BYTES = 4 << 30
MAP_MODES = ("gradient", "distance")
GUIDED = ("cloner", "both", "none")


@register_detector("mkd")
class MKD(AnomalyDetector):
    """Multiresolution knowledge distillation on ``[B, C, image_size, image_size]`` slices (module docstring).

    ``layers``: the source layers distilled (``LAYER_NAMES``: VGG16's ReLUs or ``pool1..pool5``); ``map_layers``:
    those of them the map reads; ``value_weight``: λ; ``guided``: whose ReLUs guided backpropagation runs through.
    """

    unsaved_prefixes = ("source.",)
    # measured on the tests' liver-like slices (30 epochs at 64 px): the gradient map's in-liver pixel AUROC is 0.90
    # with a black surround (its edge draws the gradient) and 0.97 with the surround filled; not measured on real CT
    default_preprocessing = {"outside_fill": "liver"}
    # "cpu": the bundle's CPU demonstration, 3 epochs of batch 16 (about 130 steps for 700 slices of 224 px; 31 s
    # for 96 slices on two cores, about 4 min for 700, the source's maps once included); the paper's: 200 epochs of
    # batch 64. "quick": a smoke run
    schedules = {"cpu": {"epochs": 3, "batch_size": 16}, "quick": {"epochs": 1}}

    def __init__(
        self,
        image_size: int = 224,
        in_channels: int = 1,
        layers: Sequence[str] = DISTILLED_LAYERS,
        map_layers: Sequence[str] = SCORED_LAYERS,
        weights: str | None = None,
        allow_random_weights: bool = False,
        epochs: int = 200,
        batch_size: int = 64,
        lr: float = 1e-3,
        value_weight: float = 0.01,
        map_mode: str = "gradient",
        guided: str = "cloner",
        sigma: float = 4.0,
        cache_features: bool | int | None = None,
        amp: bool = False,
        seed: int = 0,
    ):
        check_settings("mkd", image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, sigma=sigma,
                       seed=seed)  # fmt: skip
        layers, map_layers = _layer_list("layers", layers), _layer_list("map_layers", map_layers)
        if not set(map_layers) <= set(layers):
            raise InputError(f"mkd: map_layers must be some of layers {layers}, got {map_layers}")
        check_setting("value_weight", value_weight, {"value_weight": Range(0, None)}, "mkd")
        if map_mode not in MAP_MODES:
            raise InputError(f"mkd: map_mode must be one of {', '.join(MAP_MODES)}, got {map_mode!r}")
        if guided not in GUIDED:
            raise InputError(f"mkd: guided must be one of {', '.join(GUIDED)}, got {guided!r}")
        super().__init__(**constructor_arguments())
        self.source = build_source(layers, weights, allow_random_weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.cloner = build_cloner(layers)
        wrong = [f"{layer} ({c} channels, the source {s})"
                 for layer, c, s in zip(layers, self.cloner.channels, self.source.channels) if c != s]  # fmt: skip
        if wrong:
            raise InputError(f"mkd: the cloner's width differs from the source's at {', '.join(wrong)}; choose "
                             "layers that end a block from block 2 on (pool2..pool5, relu2_2/3_3/4_3/5_3)")
        deepest = max(self.source.strides)
        if self.image_size < deepest:
            raise InputError(f"mkd: image_size must be at least {deepest} for layers {layers}, got {self.image_size}")
        self.map_levels = [layers.index(layer) for layer in map_layers]
        self.blur = GaussianBlur2d(sigma)
        self.train_losses: list[float] = []

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def _slices_and_source_maps(self, image: torch.Tensor) -> list[torch.Tensor]:
        self.check_slices(image)
        image = image.to(self.device, torch.float32, non_blocking=True)
        with cuda_autocast(image.device, self.hparams["amp"]):
            return [image, *self.source(image)]

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        budget = cache_budget(p["cache_features"], DEFAULT_CACHE_BYTES)
        trainer = FrozenFeatureTrainer("mkd", self._slices_and_source_maps, p["batch_size"], p["seed"], budget)
        cached = trainer.cache(batches, progress)
        optimizer = torch.optim.Adam(self.cloner.parameters(), lr=float(p["lr"]))
        self.train_losses = trainer.train(self, cached, batches, self._loss, [optimizer], int(p["epochs"]), progress)

    def _loss(self, rows: list[torch.Tensor]) -> torch.Tensor:
        image, source_maps = rows[0].float(), rows[1:]
        with cuda_autocast(image.device, self.hparams["amp"]):
            cloner_maps = self.cloner(image)
        return per_slice_loss(source_maps, cloner_maps, float(self.hparams["value_weight"])).mean()

    # ------------------------------------------------------------------ scoring
    def backbone_forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self._slices_and_source_maps(image)[1:]

    def _scored(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [maps[level] for level in self.map_levels]

    def distance_maps(self, image: torch.Tensor) -> torch.Tensor:
        """Unsmoothed ``map_mode="distance"`` maps ``[B, H, W]`` of slices on the device (eval mode)."""
        source_maps = self.backbone_forward(image)
        with torch.no_grad(), cuda_autocast(image.device, self.hparams["amp"]):
            cloner_maps = self.cloner(image)
        return cosine_distance_map(self._scored(source_maps), self._scored(cloner_maps), self.image_size, "sum")

    def gradient_maps(self, image: torch.Tensor) -> torch.Tensor:
        """Unsmoothed ``map_mode="gradient"`` maps ``[B, H, W]``: |∂ loss / ∂ normalised input| summed over the
        channels, each slice's gradient that of its own loss (eval mode: slices are independent)."""
        self.check_slices(image)
        guided = {"cloner": [self.cloner], "both": [self.cloner, self.source], "none": []}[self.hparams["guided"]]
        extractor = self.source.extractor
        value_weight = float(self.hparams["value_weight"])
        # inference_mode(False): a caller's inference mode would forbid the graph; the slices' clone is a normal tensor
        with torch.inference_mode(False), torch.enable_grad(), guided_backprop(*guided), \
                cuda_autocast(image.device, self.hparams["amp"]):  # fmt: skip
            slices = image.to(self.device, torch.float32).expand(-1, 3, -1, -1).clone().requires_grad_(True)
            losses = per_slice_loss(self._scored(self.source(slices)), self._scored(self.cloner(slices)), value_weight)
            (gradient,) = torch.autograd.grad(losses.sum(), slices)
        return (gradient.float() * extractor.std).abs().sum(1)

    def maps(self, image: torch.Tensor) -> torch.Tensor:
        """Unsmoothed anomaly maps ``[B, H, W]`` of slices on the device (eval mode), by ``map_mode``."""
        if self.hparams["map_mode"] == "distance":
            return self.distance_maps(image)
        return self.gradient_maps(image)

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        pixel = self.blur(self.maps(image))
        return SliceScores(pixel=pixel, slice=max_in_roi_map(pixel, roi))

    def extra_repr(self) -> str:
        return f"cloner_parameters={sum(p.numel() for p in self.cloner.parameters())}"


def _layer_list(setting: str, layers: Sequence[str]) -> list[str]:
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [layer for layer in layers if layer not in LAYER_NAMES]
    if not layers or unknown or len(set(layers)) != len(layers):
        raise InputError(f"mkd: {setting} must be distinct VGG16 layers ({', '.join(LAYER_NAMES)}), got {layers}")
    return layers

