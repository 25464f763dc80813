"""Running small, memory-bound loops on one CPU thread."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def single_cpu_thread(device: torch.device):
    """Loops of many small operations (a coreset's greedy picks, a flow's or a small network's steps on a few
    rows): on the CPU, thread start-up and synchronisation cost more than they save, and far more when the cores
    are shared, so inside this block torch uses one thread. Other devices are left as they are."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
