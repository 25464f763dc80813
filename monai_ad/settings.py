"""The accepted values of every numeric setting, in one place.

A detector's constructor, the pipeline's ``PreprocessConfig`` and the MONAI Label app's training requests all
check a value against these tables with ``check_setting``, so a value the library refuses is refused by the app
with the same words, and no value the app lets through is one the library would refuse. Method-specific
settings with their own structure (a list of scales, a pair of widths) are checked by their detector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from monai_ad.errors import InputError

# a detector's named training schedules (``AnomalyDetector.schedule``): its defaults (the paper's), the CPU
# demonstration the accuracy benchmark measures, a smoke run
SCHEDULE_NAMES = ("paper", "cpu", "quick")


@dataclass(frozen=True)
class Range:
    """A number from ``low`` to ``high`` (``None``: no bound), whole when ``integer``, ``low`` itself excluded
    when ``open_low``; ``boolean``: true or false instead; ``window``: a ``[low, high]`` pair within the bounds."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    open_low: bool = False
    boolean: bool = False
    window: bool = False

    def describe(self) -> str:
        if self.boolean:
            return "true or false"
        if self.window:
            return f"[low, high] in HU with low < high, within [{self.low:g}, {self.high:g}]"
        kind = "a whole number" if self.integer else "a number"
        if self.low is None and self.high is None:
            return kind
        if self.high is None:
            return f"{kind} {'above' if self.open_low else 'of at least'} {self.low:g}"
        if self.low is None:
            return f"{kind} of at most {self.high:g}"
        return f"{kind} {'above' if self.open_low else 'from'} {self.low:g} {'and at most' if self.open_low else 'to'} {self.high:g}"

    def accepts(self, value: Any) -> bool:
        if self.boolean:
            return isinstance(value, bool)
        if self.window:
            return (isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) for v in value)
                    and self.low <= value[0] < value[1] <= self.high)  # fmt: skip
        if not _number(value) or (self.integer and not float(value).is_integer()):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


# hyper-parameters that mean the same in every detector that has them
HPARAM_RANGES: dict[str, Range] = {
    "image_size": Range(8, 1024, integer=True),
    "batch_size": Range(1, 65536, integer=True),
    "epochs": Range(1, 100_000, integer=True),
    "meta_epochs": Range(1, 100_000, integer=True),
    "gan_epochs": Range(1, 10_000, integer=True),
    "steps": Range(1, 10_000_000, integer=True),
    "num_neighbors": Range(1, 1024, integer=True),
    "patch_size": Range(1, 64, integer=True),
    "coreset_ratio": Range(0, 1, open_low=True),
    "sigma": Range(0, None),
    "lr": Range(0, 1, open_low=True),
    "dim": Range(1, 4096, integer=True),
    "start_resolution": Range(4, 1024, integer=True),
    "latent_dim": Range(1, 4096, integer=True),
    "latent_resolution": Range(1, 64, integer=True),
    "transition_iters": Range(0, 10_000_000, integer=True),
    "stable_iters": Range(0, 10_000_000, integer=True),
    "final_iters": Range(1, 10_000_000, integer=True),
    "prompt_length": Range(1, 256, integer=True),
    "memory_size": Range(1, 10_000_000, integer=True),
    "width": Range(1, 1024, integer=True),
    "levels": Range(2, 8, integer=True),
    "res_units": Range(0, 16, integer=True),
    "crop_size": Range(0, 1024, integer=True),
    "pii_iterations": Range(0, 1000, integer=True),
    "seed": Range(0, 2**31 - 1, integer=True),
    "field_mm": Range(0, None, open_low=True),
    "weight_decay": Range(0, None),
    "dice_weight": Range(0, None),
    "discriminator_width": Range(1, 1024, integer=True),
    "focal_gamma": Range(0, None),
    "mean_filter": Range(1, 255, integer=True),
    "perlin_scale_log2": Range(1, 10, integer=True),
    "perlin_threshold": Range(-1, 1),
    "head_layers": Range(0, 64, integer=True),
    "head_width": Range(1, 65536, integer=True),
    "freeze_steps": Range(0, 10_000_000, integer=True),
    "jitter": Range(0, 1),
    "patch_window": Range(8, 1024, integer=True),
    "patch_stride": Range(1, 1024, integer=True),
    "pretrain_epochs": Range(0, 100_000, integer=True),
    "encoder_epochs": Range(1, 100_000, integer=True),
    "lr_milestone": Range(0, 100_000, integer=True),
    "warm_up_epochs": Range(0, 100_000, integer=True),
    "nu": Range(0, 1, open_low=True),
    "n_critic": Range(1, 100, integer=True),
    "gradient_penalty": Range(0, None),
    "kappa": Range(0, None),
    "adversarial_weight": Range(0, None),
    "contextual_weight": Range(0, None),
    "encoder_weight": Range(0, None),
    "gamma_d": Range(1, 64, integer=True),
    "gamma_c": Range(1, 64, integer=True),
    "hard_negatives": Range(0, 1024, integer=True),
    "radius": Range(0, 1000),
    "margin": Range(0, 1000),
    "coupling_blocks": Range(1, None, integer=True),
    "fiber_batch_size": Range(1, None, integer=True),
    "hidden_channels": Range(1, None, integer=True),
    "clamp": Range(0, None, open_low=True),
    "eps": Range(0, None, open_low=True),
    "d_model": Range(8, 4096, integer=True),
    "heads": Range(1, 64, integer=True),
    "encoder_layers": Range(1, 64, integer=True),
    "decoder_layers": Range(1, 64, integer=True),
    "feedforward_dim": Range(1, 65536, integer=True),
    "dropout": Range(0, 0.99),
    # DDAD: the autoencoders' own resolution, their fully connected width and the size of each ensemble
    "input_size": Range(16, 1024, integer=True),
    "fc_width": Range(1, 65536, integer=True),
    "ensemble_size": Range(2, 64, integer=True),
}

# the pipeline's settings (``PreprocessConfig``)
PREPROCESS_RANGES: dict[str, Range] = {
    "image_size": HPARAM_RANGES["image_size"],
    "margin_mm": Range(0.0, 200.0),
    "min_roi_pixels": Range(0, None, integer=True),
    "normalize_liver_hu": Range(-1000.0, 1000.0),
    "normalize_liver_spread": Range(0.1, 200.0),
    "context_mm": Range(0.0, 100.0),
    "pixel_mm": Range(0.0, 10.0, open_low=True),
    "histogram_equalization": Range(boolean=True),
    "mask_outside_roi": Range(boolean=True),
    "trim_border_hu": Range(-1024.0, 3071.0),
    "trim_border_mm": Range(0.0, 20.0, open_low=True),
    "window": Range(-1024.0, 3071.0, window=True),
}


def check_setting(name: str, value: Any, ranges: dict[str, Range], owner: str = "") -> Any:
    """``value`` if ``ranges[name]`` accepts it (a whole number as ``int``, a window as floats), else an
    ``InputError`` naming ``owner``, the setting and what it accepts. Names without a range, and ``None``,
    pass unchanged."""
    accepted = ranges.get(name)
    if accepted is None or value is None:  # None: an optional setting left to its default
        return value
    if not accepted.accepts(value):
        prefix = f"{owner}: " if owner else ""
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise InputError(f"{prefix}{name} must be {accepted.describe()}, got {shown}")
    if accepted.boolean:
        return value
    if accepted.window:
        return [float(v) for v in value]
    return int(value) if accepted.integer else float(value) if isinstance(value, float) else value


def check_settings(owner: str, **values: Any) -> None:
    """``check_setting`` against ``HPARAM_RANGES`` for each of ``values``; a detector's constructor calls it
    first, before it builds anything from them."""
    for name, value in values.items():
        check_setting(name, value, HPARAM_RANGES, owner)
