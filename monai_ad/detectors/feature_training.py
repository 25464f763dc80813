"""Training a small network on the outputs of a frozen one: the loop SimpleNet, RD4AD and CLIP reconstruction share.

The frozen network (a backbone, RD4AD's teacher, CLIP's image encoder) gives the same outputs for a training slice
in every epoch, so ``FrozenFeatureTrainer.cache`` computes them once and keeps them on the detector's device while
they fit a byte budget (a detector's ``cache_features`` setting, see ``cache_budget``); ``FrozenFeatureTrainer.train``
then runs the epochs over them in batches of ``batch_size`` rows, in a fresh order each epoch drawn from a
generator seeded with ``seed``. Past the budget the outputs are recomputed every epoch, in the order the slices
come.

Under torch.distributed each process trains on its share of the slices: every epoch has as many steps as the
process with the fewest (so the collectives stay paired), gradients are averaged after every step (as
DistributedDataParallel) and BatchNorm running statistics after every epoch, so every process holds the same model.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Iterable, Iterator, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from monai_ad.distributed import average_batchnorm_statistics, min_over_processes, optimizer_step
from monai_ad.errors import InputError

logger = logging.getLogger(__name__)

# a frozen network's output for a batch of slices: one tensor, or one per level (RD4AD's teacher maps)
Features = Union[torch.Tensor, Sequence[torch.Tensor]]


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
        every optimiser per batch of rows on ``loss(rows)``. ``module`` (the detector) is in training mode
        meanwhile and in eval mode after, also when training fails. Returns the mean loss of each epoch."""
        if cached is not None:
            local_steps = -(-_rows(cached) // self.batch_size)
        else:
            local_steps = sum(-(-len(batch["image"]) // self.batch_size) for batch in batches)
        steps_per_epoch = min_over_processes(local_steps)
        if steps_per_epoch == 0:
            raise InputError(f"{self.name}: no training slices")
        parameters = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
        shuffle = torch.Generator().manual_seed(self.seed)
        device = next(iter(parameters)).device
        losses: list[float] = []
        module.train()  # frozen networks stay in eval mode (they override ``train``)
        bar = tqdm(total=int(epochs), desc=f"{self.name} training", disable=not progress, unit="epoch", leave=False)
        try:
            for _ in range(int(epochs)):
                loss_sum, steps = torch.zeros((), device=device), 0
                epoch = feature_batches(cached, batches, self.extract, self.batch_size, shuffle)
                for rows in itertools.islice(epoch, steps_per_epoch):
                    value = loss(rows)
                    optimizer_step(value, optimizers, parameters)
                    loss_sum += value.detach()
                    steps += 1
                average_batchnorm_statistics(module)
                losses.append(float(loss_sum) / steps)  # one host sync per epoch
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update()
        finally:
            bar.close()
            module.eval()
        return losses
