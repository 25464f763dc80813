"""Training run configs: the JSON files of ``sample_configs/`` that ``monai-ad train --config`` and the benchmarks read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monai_ad.errors import InputError
from monai_ad.settings import SCHEDULE_NAMES

KEYS = ("detector", "schedule", "hparams", "preprocessing", "description")


def load_run_config(path: str | None) -> dict[str, Any]:
    """A training config JSON: ``{"detector": ..., "schedule": ..., "hparams": {...}, "preprocessing": {...}}``.

    ``schedule`` names one of the detector's schedules (``AnomalyDetector.schedule``; default ``paper``, its
    constructor's defaults); ``hparams`` state only what differs from it, so a default changed in the library
    reaches every config that does not set it."""
    if not path:
        return {}
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError("config file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"is not valid JSON ({exc})", path) from None
    unknown = set(config) - set(KEYS) if isinstance(config, dict) else {"?"}
    if unknown:
        raise InputError(f"unknown config key(s) {sorted(unknown)}; expected {', '.join(KEYS)}", path)
    if config.get("schedule") is not None and config["schedule"] not in SCHEDULE_NAMES:
        raise InputError(f"schedule must be one of {', '.join(SCHEDULE_NAMES)}, got {config['schedule']!r}", path)
    return config
