"""Training run configs: the JSON files of ``sample_configs/`` that ``monai-ad train --config`` and the benchmarks read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monai_ad.errors import InputError


def load_run_config(path: str | None) -> dict[str, Any]:
    """A training config JSON: ``{"detector": ..., "hparams": {...}, "preprocessing": {...}}``."""
    if not path:
        return {}
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError("config file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"is not valid JSON ({exc})", path) from None
    unknown = set(config) - {"detector", "hparams", "preprocessing", "description"} if isinstance(config, dict) else {"?"}
    if unknown:
        raise InputError(f"unknown config key(s) {sorted(unknown)}; expected detector, hparams, preprocessing", path)
    return config
