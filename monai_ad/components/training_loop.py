"""The training loop every trained detector runs, and the pieces it draws its batches from.

``TrainingLoop`` runs optimiser steps over a detector's module: training mode meanwhile and eval mode after (also
when training fails), one progress bar, the loss summed on the device and read once per window of steps (an
epoch, a growth phase, 50 steps), a clear error when it stops being finite, and BatchNorm running statistics
averaged over processes after every window. Detectors that train end to end (DPA, synthetic_anomaly and later
ones) hold their training slices on the device (``gather_slices``) and draw batches of indices from
``index_stream``; detectors that learn on a frozen network's outputs use ``FrozenFeatureTrainer``.

``FrozenFeatureTrainer``: the frozen network (a backbone, RD4AD's teacher, CLIP's image encoder) gives the same
outputs for a training slice in every epoch, so ``FrozenFeatureTrainer.cache`` computes them once and keeps them
on the detector's device while they fit a byte budget (a detector's ``cache_features`` setting, see
``cache_budget``); ``FrozenFeatureTrainer.train`` then runs the epochs over them in batches of ``batch_size``
rows, in a fresh order each epoch drawn from a generator seeded with ``seed``. Past the budget the outputs are
recomputed every epoch, in the order the slices come.

Under torch.distributed each process trains on its share of the slices: every epoch has as many steps as the
process with the fewest (so the collectives stay paired), gradients are averaged after every step (as
DistributedDataParallel, ``monai_ad.distributed.optimizer_step``) and BatchNorm running statistics after every
window, so every process holds the same model.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Iterator, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from monai_ad.distributed import average_batchnorm_statistics, min_over_processes, optimizer_step, rank
from monai_ad.errors import InputError

logger = logging.getLogger(__name__)

# a frozen network's output for a batch of slices: one tensor, or one per level (RD4AD's teacher maps)
Features = Union[torch.Tensor, Sequence[torch.Tensor]]


class TrainingLoop:
    """Optimiser steps over ``module`` with one progress bar of ``total`` steps (module docstring).

    Used as a context manager; ``run`` may be called several times inside it (DPA runs one per growth phase)::

        with TrainingLoop("dpa", self.autoencoder, total, progress) as loop:
            losses = loop.run(steps, step, window=50)

    ``step(i)`` (``i`` counts from 0 within a ``run``) takes one optimiser step and returns its loss tensor.
    """

    def __init__(self, name: str, module: nn.Module, total: int, progress: bool = True, unit: str = "step"):
        self.name, self.module = name, module
        self.bar = tqdm(total=int(total), desc=f"{name} training", disable=not progress, unit=unit, leave=False)

    def __enter__(self) -> "TrainingLoop":
        self.module.train()  # frozen networks stay in eval mode (they override ``train``)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.module.eval()

    def run(self, steps: int, step: Callable[[int], torch.Tensor], window: int, where: str = "") -> list[float]:
        """``steps`` calls of ``step``; the mean loss of every ``window`` steps (the last window may be shorter).
        Raises when a window's mean is not finite (``where`` says where, e.g. "at resolution 64")."""
        window = max(1, int(window))
        means: list[float] = []
        total, count = None, 0
        for index in range(int(steps)):
            value = step(index).detach().float()
            total = value if total is None else total + value
            count += 1
            self.bar.update()
            if count == window or index + 1 == steps:
                mean = float(total) / count  # one host synchronisation per window
                if not math.isfinite(mean):
                    place = f" {where}" if where else ""
                    raise RuntimeError(f"{self.name}: the training loss diverged{place}; lower the learning rate (lr)")
                average_batchnorm_statistics(self.module)
                means.append(mean)
                self.bar.set_postfix(loss=f"{mean:.4f}")
                total, count = None, 0
        return means


def gather_slices(
    name: str,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    check: Callable[[torch.Tensor], None],
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda image: image,
    dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training slice of this process on ``device``: ``prepare(image)`` in ``dtype`` ``[N, C, H, W]`` and
    its ROI ``[N, 1, H, W]`` bool (all true when the batches have none), each batch's image passed to ``check``
    first (the detector's ``check_slices``). Raises when there is none."""
    images, rois = [], []
    for batch in batches:
        check(batch["image"])
        image = prepare(batch["image"].to(device, torch.float32))
        roi = batch.get("roi")
        roi = torch.ones_like(image[:, :1], dtype=torch.bool) if roi is None else roi.to(device) > 0
        images.append(image.to(dtype))
        rois.append(roi)
    if not images:
        raise InputError(f"{name}: no training slices")
    return torch.cat(images), torch.cat(rois)


def process_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and this process's rank, so that each torch.distributed process
    draws its own samples and a run repeats exactly."""
    return torch.Generator().manual_seed(int(seed) * 1009 + rank())


def index_stream(n: int, size: int, generator: torch.Generator, drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Endless batches of ``size`` indices into ``n`` slices, in shuffled passes drawn from ``generator``. With
    ``drop_last`` every batch lies within one pass (the last incomplete batch of a pass is dropped; ``size`` is
    capped at ``n``); without it a batch may run into the next pass."""
    if drop_last:
        size = min(int(size), n)
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - size + 1, size):
                yield order[start : start + size]
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:size]
        pending = pending[size:]


def cache_budget(setting: bool | int | None, default: int = 4 << 30) -> int | None:
    """Bytes a detector may spend caching its frozen network's outputs during training: ``None`` (unset) →
    ``default``; ``True`` → no limit (returned as ``None``); ``False`` → 0, no cache; an integer → that many."""
    if setting is None:
        return default
    if isinstance(setting, bool):
        return None if setting else 0
    return int(setting)


def _levels(features: Features) -> list[torch.Tensor]:
    return [features] if isinstance(features, torch.Tensor) else list(features)


def _like(features: Features, levels: list[torch.Tensor]) -> Features:
    """``levels`` in the form ``features`` has (one tensor, or a list)."""
    return levels[0] if isinstance(features, torch.Tensor) else levels


def _rows(features: Features) -> int:
    return int(_levels(features)[0].shape[0])


def feature_batches(
    cached: Features | None,
    batches: Iterable[dict[str, torch.Tensor]],
    extract: Callable[[torch.Tensor], Features],
    size: int,
    generator: torch.Generator,
) -> Iterator[Features]:
    """One epoch of training batches of ``size`` rows: from the ``cached`` features in a fresh order drawn from
    ``generator`` when there is a cache, else ``extract(batch["image"])`` for each batch of ``batches``."""
    if cached is not None:
        levels = _levels(cached)
        order = torch.randperm(levels[0].shape[0], generator=generator).to(levels[0].device)
        for start in range(0, len(order), size):
            index = order[start : start + size]
            yield _like(cached, [level.index_select(0, index) for level in levels])
        return
    for batch in batches:
        features = extract(batch["image"])
        levels = _levels(features)
        for start in range(0, levels[0].shape[0], size):
            yield _like(features, [level[start : start + size] for level in levels])


class FrozenFeatureTrainer:
    """The "cache the frozen outputs, then run epochs over them" training of a detector (module docstring).

    Args:
        name: the detector's name, for messages and progress bars.
        extract: slices ``[B, C, H, W]`` → the frozen network's outputs (rows = slices, computed without gradients).
        batch_size: rows per training step.
        seed: seeds the order the cached rows are read in.
        cache_bytes: the budget for the cache (``cache_budget``): ``None`` no limit, 0 no cache.
        cache_dtype: the cache holds the outputs in this dtype (``None``: as ``extract`` gives them).
    """

    def __init__(
        self,
        name: str,
        extract: Callable[[torch.Tensor], Features],
        batch_size: int,
        seed: int,
        cache_bytes: int | None,
        cache_dtype: torch.dtype | None = torch.float16,
    ):
        self.name, self.extract = name, extract
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.cache_bytes, self.cache_dtype = cache_bytes, cache_dtype

    @torch.no_grad()
    def cache(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        progress: bool = True,
        observe: Callable[[Features], None] | None = None,
    ) -> Features | None:
        """One pass over ``batches``: their outputs concatenated (on the device, in ``cache_dtype``), or None when
        the budget is 0, when they exceed it or when there are none. ``observe`` is shown every batch's outputs
        (as ``extract`` gives them; e.g. to gather normalisation statistics): with it the pass reads every batch
        even without a cache, without it the pass ends as soon as there is none."""
        if self.cache_bytes == 0 and observe is None:
            return None
        cached: list[list[torch.Tensor]] | None = [] if self.cache_bytes != 0 else None
        size = 0
        for batch in tqdm(batches, desc=f"{self.name} features", disable=not progress, unit="batch", leave=False):
            features = self.extract(batch["image"])
            if observe is not None:
                observe(features)
            if cached is None:
                continue
            levels = [level if self.cache_dtype is None else level.to(self.cache_dtype) for level in _levels(features)]
            size += sum(level.numel() * level.element_size() for level in levels)
            if self.cache_bytes is not None and size > self.cache_bytes:
                logger.info("%s: training features exceed %d bytes; recomputing them", self.name, self.cache_bytes)
                cached = None
                if observe is None:
                    return None
                continue
            cached.append(levels)
            form = features
        if not cached:
            return None
        return _like(form, [torch.cat(level) for level in zip(*cached)])

    def train(
        self,
        module: nn.Module,
        cached: Features | None,
        batches: Iterable[dict[str, torch.Tensor]],
        loss: Callable[[Features], torch.Tensor],
        optimizers: Sequence[torch.optim.Optimizer],
        epochs: int,
        progress: bool = True,
    ) -> list[float]:
        """``epochs`` passes over the training rows (``cached``, else recomputed from ``batches``), one step of
        every optimiser per batch of rows on ``loss(rows)``, in a ``TrainingLoop`` over ``module`` (one window
        per epoch). Returns the mean loss of each epoch."""
        if cached is not None:
            local_steps = -(-_rows(cached) // self.batch_size)
        else:
            local_steps = sum(-(-len(batch["image"]) // self.batch_size) for batch in batches)
        steps_per_epoch = min_over_processes(local_steps)
        if steps_per_epoch == 0:
            raise InputError(f"{self.name}: no training slices")
        parameters = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
        shuffle = torch.Generator().manual_seed(self.seed)
        epoch: Iterator[Features] = iter(())

        def step(index: int) -> torch.Tensor:
            nonlocal epoch
            if index % steps_per_epoch == 0:
                epoch = feature_batches(cached, batches, self.extract, self.batch_size, shuffle)
            value = loss(next(epoch))
            optimizer_step(value, optimizers, parameters)
            return value

        with TrainingLoop(self.name, module, int(epochs) * steps_per_epoch, progress) as loop:
            return loop.run(int(epochs) * steps_per_epoch, step, window=steps_per_epoch)
