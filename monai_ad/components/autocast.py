"""Mixed precision as every detector uses it: bf16 autocast on CUDA, float32 elsewhere."""

from __future__ import annotations

import contextlib

import torch


def cuda_autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when ``enabled``; a no-op context elsewhere (the CPU stays float32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Autocast:
    """Mixin for a module with an ``amp`` flag: ``self.autocast(device)`` is ``cuda_autocast(device, self.amp)``."""

    amp: bool = False

    def autocast(self, device: torch.device):
        return cuda_autocast(device, self.amp)
