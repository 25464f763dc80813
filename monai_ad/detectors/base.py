"""The one detector interface every part of monai_ad uses.

A detector is built from hyper-parameters only (scikit-learn style), learns its state in ``fit`` from normal
slices, and scores batches of slices without changing state. The whole state (hyper-parameters, learned
tensors, operating thresholds and the pre-processing it was trained with) saves to one file that loads with
``torch.load(..., weights_only=True)``.

Slices are ``[B, C, H, W]`` float tensors in ``[0, 1]`` (HU-windowed CT, see ``monai_ad.transforms``); an
optional ``roi`` ``[B, 1, H, W]`` marks the liver. ``H == W == detector.image_size`` and ``C ==
detector.in_channels``: 1 for a grey slice, 3 when the pipeline gives each slice with its neighbours (2.5-D) or
in three HU windows; channel ``C // 2`` is always the slice itself.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from monai_ad.errors import InputError
from monai_ad.io import atomic_write
from monai_ad.settings import HPARAM_RANGES, SCHEDULE_NAMES, check_setting, check_settings

FILE_FORMAT = "monai_ad.detector/1"
EXTENT_QUANTILE = 0.99  # a found region extends over the voxels that score above 99 % of normal liver voxels

DETECTORS: dict[str, type["AnomalyDetector"]] = {}


def register_detector(name: str):
    """Class decorator: make a detector available by ``name`` (CLI, bundles, app)."""

    def _register(cls: type["AnomalyDetector"]) -> type["AnomalyDetector"]:
        cls.name = name
        DETECTORS[name] = cls
        return cls

    return _register


def detector_class(name: str) -> type["AnomalyDetector"]:
    _import_builtin_detectors()
    if name not in DETECTORS:
        raise InputError(f"unknown detector {name!r}; available: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name]


def create_detector(name: str, schedule: str | None = None, **hparams: Any) -> "AnomalyDetector":
    """The registered detector ``name`` with ``hparams`` over its named ``schedule`` (``AnomalyDetector.schedule``;
    ``None``: its defaults), checked before anything is built."""
    kind = detector_class(name)
    hparams = {**(kind.schedule(schedule) if schedule else {}), **hparams}
    check_hparams(name, hparams)
    return kind(**hparams)


def check_hparams(name: str, hparams: Mapping[str, Any]) -> None:
    """Check hyper-parameters before any work: each must be a parameter of the detector's constructor, and the
    common ones (``monai_ad.settings.HPARAM_RANGES``: image_size, batch_size, epochs, ...) numbers in range. ``InputError`` names
    the detector, the parameter and the accepted values."""
    _import_builtin_detectors()
    if name not in DETECTORS:
        raise InputError(f"unknown detector {name!r}; available: {', '.join(sorted(DETECTORS))}")
    params = inspect.signature(DETECTORS[name].__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = sorted(k for k, p in params.items() if k != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL)
        unknown = sorted(set(hparams) - set(known))
        if unknown:
            raise InputError(
                f"{name}: unknown hyper-parameter(s) {', '.join(unknown)}; the {name} detector takes {', '.join(known)}"
            )
    for key, value in hparams.items():
        check_setting(key, value, HPARAM_RANGES, name)


def settings_repeating_schedule(name: str, schedule: str | None, hparams: Mapping[str, Any]) -> list[str]:
    """The keys of ``hparams`` whose value the detector ``name``'s named ``schedule`` (``None``: ``paper``, its
    constructor's defaults) already gives: what a bundle or a run config need not state."""
    kind = detector_class(name)
    defaults = {k: p.default for k, p in inspect.signature(kind.__init__).parameters.items() if k != "self"}
    effective = {**defaults, **kind.schedule(schedule or "paper")}

    def same(a: Any, b: Any) -> bool:
        return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)

    return [k for k, v in hparams.items() if k in effective and same(effective[k], v)]


def constructor_arguments() -> dict[str, Any]:
    """The hyper-parameters of the constructor that calls this, read from its signature: each parameter but
    ``self`` (those of a ``**kwargs`` included), in signature order, with the value its variable holds *now*.

    A detector's constructor checks and normalises its arguments (a sequence made a list, a path made absolute),
    then records them with ``super().__init__(**constructor_arguments())`` instead of listing them again; so
    before that call a parameter may only be rebound to the value the saved detector should hold.
    """
    frame = inspect.currentframe().f_back
    try:
        code, values = frame.f_code, frame.f_locals
        count = code.co_argcount + code.co_kwonlyargcount
        names = code.co_varnames[1:count]
        hparams = {name: values[name] for name in names}
        if code.co_flags & inspect.CO_VARKEYWORDS:
            hparams.update(values[code.co_varnames[count + bool(code.co_flags & inspect.CO_VARARGS)]])
        return hparams
    finally:
        del frame  # a frame held by a local would keep its variables alive


def available_detectors() -> list[str]:
    _import_builtin_detectors()
    return sorted(DETECTORS)


def _import_builtin_detectors() -> None:
    import monai_ad.detectors  # noqa: F401  (registers the built-in detectors)


@dataclass
class SliceScores:
    """Scores of a batch of slices: ``pixel [B, H, W]`` (higher = more abnormal) and ``slice [B]``."""

    pixel: torch.Tensor
    slice: torch.Tensor


def iter_slice_batches(data: Any, batch_size: int = 16) -> Iterator[dict[str, torch.Tensor]]:
    """Normalise the inputs ``fit``/``calibrate`` accept into ``{"image", "roi"?}`` batches.

    ``data`` is a ``[N, 1, H, W]`` tensor/array, or an iterable (e.g. a DataLoader) of such tensors, of
    ``(image, roi)`` pairs, or of dicts with ``"image"`` and optionally ``"roi"``.
    """
    if isinstance(data, (torch.Tensor, np.ndarray)):
        data = torch.as_tensor(data)
        for start in range(0, data.shape[0], batch_size):
            yield {"image": data[start : start + batch_size]}
        return
    for item in data:
        if isinstance(item, Mapping):
            yield {k: item[k] for k in ("image", "roi") if item.get(k) is not None}
        elif isinstance(item, (tuple, list)):
            yield {"image": item[0], "roi": item[1]} if len(item) > 1 and item[1] is not None else {"image": item[0]}
        else:
            yield {"image": torch.as_tensor(item)}


class AnomalyDetector(nn.Module, ABC):
    """Base class: subclasses implement ``_fit`` and ``_score``; their constructor takes the hyper-parameters as
    arguments and records them with ``super().__init__(**constructor_arguments())`` (or passes them by name).

    Subclasses keep learned tensors as parameters or buffers (so ``.to(device)`` moves them and they are
    saved). Buffers whose size is only known after fitting may be registered as empty tensors: loading
    replaces them with the saved ones. Frozen pretrained backbones are rebuilt from their hyper-parameters
    rather than saved; list their prefixes in ``unsaved_prefixes``.
    """

    name: ClassVar[str] = "detector"
    unsaved_prefixes: ClassVar[tuple[str, ...]] = ()
    supported_channels: ClassVar[tuple[int, ...]] = (1, 3)  # a frozen RGB backbone takes 1 (repeated) or 3
    # the pre-processing options this detector is trained with unless the caller sets them (chosen by measurement)
    default_preprocessing: ClassVar[Mapping[str, Any]] = {}
    # named schedules, hyper-parameters over the constructor's defaults (which are the paper's, "paper"): "cpu",
    # the CPU demonstration its bundle trains and the accuracy benchmark measures; "quick", a smoke run over
    # "cpu" (the demo, ``--quick`` benchmarks). A detector without one uses its defaults.
    schedules: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    # a detector that also learns from unlabelled slices (a mix of normal and abnormal ones, e.g. DDAD) sets this:
    # ``fit(..., unlabelled=...)`` then hands them to its ``_fit`` as a keyword ``unlabelled`` (re-iterable batches,
    # or None when there are none), and ``monai_ad.training.train`` reads a datalist's ``unlabelled`` section for it
    uses_unlabelled: ClassVar[bool] = False
    # a detector with a memory of normal features (PatchCore, PaDiM) sets this and implements ``remember_normal``:
    # a radiologist's erased false positive becomes normal memory at once, without retraining
    learns_from_corrections: ClassVar[bool] = False

    @classmethod
    def schedule(cls, name: str = "cpu") -> dict[str, Any]:
        """The hyper-parameters of the named schedule (``SCHEDULE_NAMES``)."""
        if name not in SCHEDULE_NAMES:
            raise InputError(f"unknown schedule {name!r}; the schedules are {', '.join(SCHEDULE_NAMES)}")
        if name == "paper":
            return {}
        chosen = dict(cls.schedules.get("cpu", {}))
        if name == "quick":
            chosen.update(cls.schedules.get("quick", {}))
        return copy.deepcopy(chosen)

    def __init__(self, image_size: int = 224, in_channels: int = 1, **hparams: Any):
        super().__init__()
        check_settings(self.name, image_size=image_size, **hparams)
        if int(in_channels) not in self.supported_channels:
            raise InputError(
                f"the {self.name} detector takes {' or '.join(map(str, self.supported_channels))} input channel(s), "
                f"not {in_channels}"
            )
        self.hparams: dict[str, Any] = {"image_size": int(image_size), "in_channels": int(in_channels), **hparams}
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.thresholds: dict[str, Any] = {}
        self.preprocessing: dict[str, Any] = {}
        self.register_buffer("_fitted", torch.zeros((), dtype=torch.bool))
        self._fit_started = False  # once set, the learned state may differ from the constructor's

    # ------------------------------------------------------------------ state
    @property
    def is_fitted(self) -> bool:
        return bool(self._fitted)

    @property
    def device(self) -> torch.device:
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        data: Any,
        *,
        batch_size: int = 16,
        progress: bool = True,
        preprocessing: Mapping[str, Any] | None = None,
        unlabelled: Any = None,
    ) -> "AnomalyDetector":
        """Learn from normal slices (see ``iter_slice_batches`` for the accepted forms). Returns ``self``.

        ``preprocessing``: the pipeline settings (``PreprocessConfig.to_dict()``) that made the slices; the
        detector keeps them, reads them while fitting (pixel size, normalisation) and saves them with its state.

        ``unlabelled``: slices of unlabelled studies (normal and abnormal mixed, in the forms ``data`` takes), for a
        detector whose ``uses_unlabelled`` is set; any other detector refuses them (``InputError``).

        Every call starts over, for every detector (as scikit-learn's ``fit``): a detector fitted before, loaded
        from a file or whose fit failed part-way first returns to the state its constructor gives (learned
        tensors and thresholds; ``preprocessing`` is kept), so ``fit(a)`` then ``fit(b)`` leaves the state that
        ``fit(b)`` leaves on a new detector. Nothing continues training from earlier data.
        """
        if unlabelled is not None and not self.uses_unlabelled:
            raise InputError(f"the {self.name} detector learns from normal slices only; it takes no unlabelled slices")
        if self._fit_started or self.is_fitted:
            self._start_over()
        if preprocessing is not None:
            self.preprocessing = dict(preprocessing)
        self._fit_started = True
        if self.uses_unlabelled:
            extra = None if unlabelled is None else ReiterableBatches(unlabelled, batch_size)
            self._fit(ReiterableBatches(data, batch_size), progress=progress, unlabelled=extra)
        else:
            self._fit(ReiterableBatches(data, batch_size), progress=progress)
        self._fitted.fill_(True)
        return self

    def _start_over(self) -> None:
        """Put back the learned state a new detector of the same hyper-parameters has: built once more, its saved
        state (learned tensors, frozen backbones aside) replaces this one's."""
        with torch.random.fork_rng(devices=[]):  # leaves the global random state as a new fit would find it
            fresh = type(self)(**self.hparams)
        self._load_saved_state(fresh._saved_state())
        for detector in self.modules():  # a detector made of detectors resets them too
            if isinstance(detector, AnomalyDetector):
                detector.thresholds = {}
                detector._fit_started = False

    @abstractmethod
    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        """Fit on batches ``{"image": [B,1,H,W], "roi"?: [B,1,H,W]}``; may iterate ``batches`` many times. A detector
        with ``uses_unlabelled`` also takes the keyword ``unlabelled`` (batches of the same form, or None)."""

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, image: torch.Tensor, roi: torch.Tensor | None = None) -> SliceScores:
        """Score a batch ``[B, 1, H, W]``; pixel maps and slice scores are returned on the detector's device."""
        if not self.is_fitted:
            raise InputError(f"the {self.name} detector is not fitted; train it first")
        self.check_slices(image)
        was_training = self.training
        self.eval()
        try:
            device = self.device
            image = image.to(device, torch.float32, non_blocking=True)
            roi = None if roi is None else roi.to(device, non_blocking=True) > 0
            return self._score(image, roi)
        finally:
            self.train(was_training)

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """Inside the block every sub-module's mixed-precision switch (a boolean ``amp`` attribute) is off: the
        float32 reference that a mixed-precision CUDA path is checked against."""
        switches = [m for m in self.modules() if isinstance(getattr(m, "amp", None), bool)]
        saved = [m.amp for m in switches]
        for module in switches:
            module.amp = False
        try:
            yield
        finally:
            for module, value in zip(switches, saved):
                module.amp = value

    def backbone_forward(self, image: torch.Tensor) -> Any:
        """Only the frozen pretrained network on a batch ``[B, 1, H, W]``, run as ``score`` runs it (device, dtype,
        memory format): the floor of the scoring cost, for benchmarks. ``NotImplementedError`` for a detector
        without one."""
        raise NotImplementedError(f"the {self.name} detector has no frozen backbone")

    def check_slices(self, image: torch.Tensor) -> None:
        """Raise ``InputError`` unless ``image`` is ``[B, in_channels, image_size, image_size]``."""
        size, channels = self.image_size, self.in_channels
        if image.ndim != 4 or image.shape[1] != channels or tuple(image.shape[-2:]) != (size, size):
            raise InputError(
                f"the {self.name} detector takes slices [B, {channels}, {size}, {size}], got {tuple(image.shape)}"
            )

    def remember_normal(
        self, image: torch.Tensor, roi: torch.Tensor | None, mask: torch.Tensor, avoid: torch.Tensor | None = None
    ) -> int:
        """Learn that the pixels under ``mask`` (``[B, 1, H, W]``) of these slices are normal, keeping away from
        ``avoid`` (e.g. a lesion the radiologist kept); returns how many features were added. Only detectors
        with a memory of normal features (``learns_from_corrections``) can."""
        raise InputError(f"{self.name} has no memory of normal features to add a correction to (it learns from "
                         "corrections through its threshold)")  # fmt: skip

    @abstractmethod
    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        """Score a batch already on the detector's device (called under ``torch.no_grad`` in eval mode)."""

    @torch.no_grad()
    def calibrate(
        self,
        data: Any,
        quantile: float | None = None,
        batch_size: int = 16,
        false_regions_per_scan: float = 1.0,
        n_scans: int | None = None,
    ) -> dict[str, Any]:
        """Set the operating thresholds from held-out *normal* slices of ``n_scans`` scans.

        ``slice``: a quantile of normal slice scores. ``pixel``: the same quantile of the per-slice maximum of
        the pixel map inside the ROI. ``extent``: the ``EXTENT_QUANTILE`` of all normal in-ROI pixel scores, where
        a region found at ``pixel`` is outlined (hysteresis; see ``monai_ad.postprocess.label_lesions``). With
        ``n_scans`` given, the quantile is chosen so that about
        ``false_regions_per_scan`` normal slices per scan exceed it: a false region spans at least one slice, so
        a normal scan then holds at most about that many false regions (and flagged slices). Otherwise
        ``quantile`` (default 0.99) is used as it is. Both are stored with the model and can be overridden at
        inference.
        """
        slice_scores, pixel_max, pixel_sample = [], [], []
        generator = torch.Generator().manual_seed(0)
        for batch in iter_slice_batches(data, batch_size):
            roi = batch.get("roi")
            scores = self.score(batch["image"], roi)
            pixel = scores.pixel
            if roi is not None:
                roi_b = roi.to(pixel.device)[:, 0] > 0
                keep = roi_b.flatten(1).any(1)
                pixel = torch.where(roi_b, pixel, torch.full_like(pixel, -math.inf))[keep]
                slice_scores.append(scores.slice[keep].float().cpu())
            else:
                slice_scores.append(scores.slice.float().cpu())
            pixel_max.append(pixel.flatten(1).amax(1).float().cpu())
            inside = pixel[torch.isfinite(pixel)].float().cpu()
            if len(inside):  # a batch of slices without liver adds nothing
                pixel_sample.append(inside[torch.randint(len(inside), (min(len(inside), 20_000),), generator=generator)])
        if not slice_scores or sum(len(s) for s in slice_scores) == 0:
            raise InputError("no normal slices with a liver ROI to calibrate the threshold on")
        slice_all = torch.cat(slice_scores).numpy()
        pixel_all = torch.cat(pixel_max).numpy()
        method = "quantile of held-out normal slices"
        if quantile is None and n_scans:
            if not false_regions_per_scan > 0:
                raise InputError(f"false_regions_per_scan must be positive, got {false_regions_per_scan}")
            quantile = min(max(1.0 - false_regions_per_scan * n_scans / slice_all.size, 0.5), 1.0)
            method = f"at most {false_regions_per_scan:g} false region(s) per held-out normal scan"
        quantile = 0.99 if quantile is None else float(quantile)
        if not 0 < quantile <= 1:
            raise InputError(f"quantile must be in (0, 1], got {quantile}")
        self.thresholds = {
            "slice": float(np.quantile(slice_all, quantile)),
            "pixel": float(np.quantile(pixel_all, quantile)),
            "extent": float(np.quantile(torch.cat(pixel_sample).numpy(), EXTENT_QUANTILE)) if pixel_sample else None,
            "method": method,
            "quantile": quantile,
            "n_slices": int(slice_all.size),
        }
        if n_scans:
            self.thresholds.update(n_scans=int(n_scans), false_regions_per_scan=float(false_regions_per_scan))
        return self.thresholds

    # ------------------------------------------------------------------ persistence
    def _saved_state(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().cpu()
            for k, v in self.state_dict().items()
            if not any(k.startswith(p) for p in self.unsaved_prefixes)
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the whole detector to ``path`` atomically."""
        payload = {
            "format": FILE_FORMAT,
            "detector": self.name,
            "hparams": self.hparams,
            "thresholds": self.thresholds,
            "preprocessing": self.preprocessing,
            "state": self._saved_state(),
        }
        return atomic_write(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "AnomalyDetector":
        """Load a detector saved by ``save``: any registered kind through ``AnomalyDetector.load``, only that
        kind through a subclass (``PatchCore.load``)."""
        path = Path(path)
        if not path.is_file():
            raise InputError("model file not found", path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, not a torch file, or holds unsafe objects
            raise InputError(f"not a readable monai_ad model file ({type(exc).__name__})", path) from None
        if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
            raise InputError(f"not a monai_ad model file (expected format {FILE_FORMAT})", path)
        _import_builtin_detectors()
        name = payload.get("detector")
        if name not in DETECTORS:
            raise InputError(f"model is a {name!r} detector, which this version does not know", path)
        if not issubclass(DETECTORS[name], cls):
            raise InputError(f"model is a {name!r} detector, not {cls.name!r}", path)
        kind = DETECTORS[name]
        try:
            detector = kind(**kind.saved_hparams(dict(payload.get("hparams") or {}), payload.get("state") or {}))
        except TypeError as exc:  # hyper-parameters this version's constructor does not take
            raise InputError(f"model hyper-parameters do not fit the {name} detector: {exc}", path) from None
        try:
            detector._load_saved_state(payload["state"])
        except (RuntimeError, KeyError, AttributeError, TypeError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"model state does not match the {name} detector: {reason}", path) from None
        detector.thresholds = dict(payload.get("thresholds") or {})
        detector.preprocessing = dict(payload.get("preprocessing") or {})
        if device is not None:
            detector.to(device)
        return detector.eval()

    @classmethod
    def saved_hparams(cls, hparams: dict[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The hyper-parameters a saved model was fitted with: those it recorded, completed with the defaults of
        the version that saved it where a default has changed since (read from the shape of its state)."""
        return hparams

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Also accepts a whole saved detector file's content, as frameworks that ``torch.load`` a checkpoint and
        pass it to ``network.load_state_dict`` do (MONAI Label's infer tasks)."""
        if state_dict.get("format") == FILE_FORMAT:
            if state_dict.get("detector") != self.name:
                raise RuntimeError(f"checkpoint holds a {state_dict.get('detector')!r} detector, not {self.name!r}")
            self._load_saved_state(state_dict["state"])
            self.thresholds = dict(state_dict.get("thresholds") or {})
            self.preprocessing = dict(state_dict.get("preprocessing") or {})
            return nn.modules.module._IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_saved_state(self, state: Mapping[str, torch.Tensor]) -> None:
        state = dict(state)
        adopted = set()
        for key in list(state):
            module_name, _, attr = key.rpartition(".")
            module = self.get_submodule(module_name) if module_name else self
            if attr in module._buffers:  # buffers may be sized at fit time: adopt the saved tensor as it is
                module._buffers[attr] = state.pop(key).to(self.device)
                adopted.add(key)
        missing, unexpected = super().load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in adopted and not any(k.startswith(p) for p in self.unsaved_prefixes)]
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")


class ReiterableBatches:
    """Slice batches that can be read several times (by ``_fit``, or a calibration that reads twice), whatever form
    the data came in."""

    def __init__(self, data: Any, batch_size: int):
        if isinstance(data, Iterator):  # a one-shot generator: keep its batches
            data = list(iter_slice_batches(data, batch_size))
        self.data, self.batch_size = data, batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter_slice_batches(self.data, self.batch_size)

    def __len__(self) -> int:
        if isinstance(self.data, (torch.Tensor, np.ndarray)):
            return math.ceil(len(self.data) / self.batch_size)
        return len(self.data)
