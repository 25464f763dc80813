"""Where the files that ship beside the library are: the MONAI Label app, the bundles and the sample configs.

Installed from a wheel they are inside the package (``monai_ad/share/``); run from a clone (or an editable
install) they are the repository's own top-level folders. Both have the same layout, so the app finds the
bundles next to it either way.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SHARED_NAMES = ("apps", "bundles", "sample_configs")


def shared_dir(name: str) -> Path:
    """``apps``, ``bundles`` or ``sample_configs``: the installed copy, else the source tree's."""
    if name not in SHARED_NAMES:
        raise ValueError(f"unknown shared folder {name!r}; expected one of {SHARED_NAMES}")
    installed = PACKAGE / "share" / name
    return installed if installed.is_dir() else PACKAGE.parent / name
