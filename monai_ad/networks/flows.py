"""Normalising flows of the flow detectors, built on FrEIA (monai_ad/detectors/cflow/README.md and
monai_ad/detectors/csflow/README.md).

- CFLOW (``monai_ad.detectors.cflow``): ``positional_encoding_2d``, the condition of every feature position;
  ``conditional_flow``, one layer's flow over "fibers" (the feature vectors of single positions), conditioned on
  that code; ``log_likelihood_per_dimension`` and ``fiber_loss``.
- CS-Flow (``monai_ad.detectors.csflow``): ``CrossConvolution``, the subnetwork that mixes neighbouring scales;
  ``CrossScaleCoupling``, the affine coupling of all scales at once that it drives; ``cross_scale_flow``, the
  flow of such couplings with fixed channel permutations between them; ``cross_scale_loss``.
- ``seeded``: builds a flow from a seed (FrEIA draws its permutations from numpy's global generator).

Pure networks and formulas: training, scoring and state belong to the detectors.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GAUSSIAN_LOG_CONSTANT = -0.5 * math.log(2 * math.pi)  # log N(0, 1) at 0, per dimension


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside the block torch's and numpy's global generators are seeded with ``seed``; both are put back after,
    so building a flow neither depends on nor changes the caller's random state."""
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


class FeatureStatistics:
    """Per-channel mean and standard deviation over every position of a list of maps (each map's channels in a
    row: ``[Σ C_i]``), summed over the feature batches shown to ``add``."""

    def __init__(self):
        self.totals: torch.Tensor | None = None  # [3, Σ C_i]: count, sum, sum of squares (float64)

    @torch.no_grad()
    def add(self, features: Sequence[torch.Tensor]) -> None:
        columns = []
        for level in features:
            values = level.transpose(0, 1).flatten(1).double()  # [C, B·h·w]
            count = torch.full((values.shape[0],), float(values.shape[1]), dtype=torch.float64, device=values.device)
            columns.append(torch.stack([count, values.sum(1), values.pow(2).sum(1)]))
        totals = torch.cat(columns, 1)
        self.totals = totals if self.totals is None else self.totals + totals

    def mean_and_std(
        self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(mean, std)``, std at least 1e-6; ``reduce`` sums the totals over processes first."""
        if self.totals is None:
            raise ValueError("no features were added")
        count, total, squares = reduce(self.totals.clone())
        mean = total / count
        std = (squares / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
        return mean.float(), std.float()


def standardized(features: Sequence[torch.Tensor], mean: torch.Tensor, std: torch.Tensor) -> list[torch.Tensor]:
    """Each map ``[B, C_i, h, w]`` float32 with its channels' ``mean`` subtracted and divided by their ``std``
    (``FeatureStatistics``' layout)."""
    out, start = [], 0
    for level in features:
        channels = slice(start, start + level.shape[1])
        out.append((level.float() - mean[channels, None, None]) / std[channels, None, None])
        start += level.shape[1]
    return out


# ----------------------------------------------------------------------------- CFLOW
def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """``[channels, height, width]``: the 2-D sinusoidal code of each position. The first half of the channels
    encode the column, the second half the row; within a half, even channels hold ``sin(pos · ω_k)`` and odd
    ones ``cos(pos · ω_k)`` with ``ω_k = 10000^(−2k / (channels / 2))``. ``channels`` must be a multiple of 4."""
    if channels % 4:
        raise ValueError(f"the positional encoding needs a multiple of 4 channels, got {channels}")
    half = channels // 2
    frequencies = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(10000.0) / half))
    columns = torch.arange(width, dtype=torch.float64)[:, None] * frequencies  # [W, half / 2]
    rows = torch.arange(height, dtype=torch.float64)[:, None] * frequencies  # [H, half / 2]
    code = torch.zeros(channels, height, width, dtype=torch.float64)
    code[0:half:2] = torch.sin(columns).t()[:, None, :].expand(-1, height, -1)
    code[1:half:2] = torch.cos(columns).t()[:, None, :].expand(-1, height, -1)
    code[half::2] = torch.sin(rows).t()[:, :, None].expand(-1, -1, width)
    code[half + 1 :: 2] = torch.cos(rows).t()[:, :, None].expand(-1, -1, width)
    return code.float()


def fiber_subnet(channels_in: int, channels_out: int) -> nn.Module:
    """CFLOW's coupling subnetwork: Linear(d, 2d) – ReLU – Linear(2d, out)."""
    return nn.Sequential(nn.Linear(channels_in, 2 * channels_in), nn.ReLU(), nn.Linear(2 * channels_in, channels_out))


def conditional_flow(channels: int, condition_dim: int, coupling_blocks: int = 8, clamp: float = 1.9) -> Ff.SequenceINN:
    """One layer's conditional flow: ``coupling_blocks`` FrEIA ``AllInOneBlock``s over ``channels``-dimensional
    fibers, each conditioned on a ``condition_dim`` code (affine clamping ``clamp``, global affine scaling through a
    softplus, a fixed hard permutation after each block). ``flow(x [N, C], c=[code [N, P]]) -> (z, log|det J|)``.
    Draws its weights and permutations from the global generators (build it under ``seeded``)."""
    flow = Ff.SequenceINN(channels)
    for _ in range(coupling_blocks):
        flow.append(
            Fm.AllInOneBlock, cond=0, cond_shape=(condition_dim,), subnet_constructor=fiber_subnet,
            affine_clamping=clamp, global_affine_type="SOFTPLUS", permute_soft=False,
        )  # fmt: skip
    return flow


def log_likelihood_per_dimension(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """``[N]``: log p(x) of each fiber under the flow with a standard normal latent, divided by its dimension
    ``C``: ``(C · (−½ log 2π) − ½‖z‖² + log|det J|) / C``."""
    channels = z.shape[1]
    return (channels * GAUSSIAN_LOG_CONSTANT - 0.5 * z.pow(2).sum(1) + log_det) / channels


def fiber_loss(log_likelihood: torch.Tensor) -> torch.Tensor:
    """CFLOW's training loss of a fiber batch: the mean of −log σ(per-dimension log-likelihood)."""
    return -F.logsigmoid(log_likelihood).mean()


# ----------------------------------------------------------------------------- CS-Flow
def _resized(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class CrossConvolution(nn.Module):
    """CS-Flow's subnetwork over ``n_scales`` maps, finest first: ``forward([x_i [B, in, h_i, w_i]]) ->
    [y_i [B, out, h_i, w_i]]``.

    A 3×3 convolution per scale to ``hidden_channels`` and a leaky ReLU (slope 0.1), then each scale's output is
    the sum of three 3×3 convolutions of those hidden maps: of its own scale, of the next finer scale with stride 2
    (downsampling), and of the next coarser scale followed by bilinear upsampling (``align_corners=False``); a
    cross term whose size still differs from the target's (odd grids) is resized bilinearly. Each scale's output
    is multiplied by a learned gain that starts at 0, so a coupling driven by it starts as the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 1024, n_scales: int = 3,
                 leaky_slope: float = 0.1):  # fmt: skip
        super().__init__()
        self.n_scales, self.leaky_slope = int(n_scales), float(leaky_slope)
        conv = lambda c_in, c_out, stride=1: nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)  # noqa: E731
        self.hidden = nn.ModuleList(conv(in_channels, hidden_channels) for _ in range(n_scales))
        self.same_scale = nn.ModuleList(conv(hidden_channels, out_channels) for _ in range(n_scales))
        self.from_finer = nn.ModuleList(conv(hidden_channels, out_channels, stride=2) for _ in range(n_scales - 1))
        self.from_coarser = nn.ModuleList(conv(hidden_channels, out_channels) for _ in range(n_scales - 1))
        self.gain = nn.Parameter(torch.zeros(n_scales))

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        hidden = [F.leaky_relu(conv(x), self.leaky_slope) for conv, x in zip(self.hidden, xs)]
        outputs = []
        for i, h in enumerate(hidden):
            y = self.same_scale[i](h)
            if i > 0:
                y = y + _resized(self.from_finer[i - 1](hidden[i - 1]), y.shape[-2:])
            if i + 1 < self.n_scales:
                y = y + _resized(self.from_coarser[i](hidden[i + 1]), y.shape[-2:])
            outputs.append(self.gain[i] * y)
        return outputs


def soft_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    """``clamp · (2/π) · atan(s / clamp)``: about ``s`` for small ``s``, bounded by ±``clamp``."""
    return clamp * (2 / math.pi) * torch.atan(s / clamp)


class CrossScaleCoupling(Fm.InvertibleModule):
    """CS-Flow's coupling block: an affine coupling of every scale's map at once (FrEIA module, one input and
    one output per scale, all with the same channel count).

    Each map is split along its channels into ``a`` (first ⌊C/2⌋) and ``b``. A ``CrossConvolution`` of all the
    ``b`` gives ``(s, t)`` per scale and ``a ← a · exp(c(s)) + t``; then one of all the new ``a`` gives
    ``b ← b · exp(c(s')) + t'``, with ``c`` the soft clamp (``soft_clamp``, ±``clamp``). log|det J| is the sum of
    every ``c(s)`` and ``c(s')``. Both halves change, and every scale's update reads its neighbouring scales.
    """

    def __init__(self, dims_in, dims_c=None, clamp: float = 3.0, hidden_channels: int = 1024):
        super().__init__(dims_in, dims_c)
        channels = {int(d[0]) for d in dims_in}
        if len(channels) != 1:
            raise ValueError(f"every scale must have the same number of channels, got {sorted(channels)}")
        channels = channels.pop()
        if channels < 2:
            raise ValueError(f"a coupling needs at least 2 channels, got {channels}")
        self.clamp = float(clamp)
        self.split = (channels // 2, channels - channels // 2)
        n = len(dims_in)
        self.update_first = CrossConvolution(self.split[1], 2 * self.split[0], hidden_channels, n)
        self.update_second = CrossConvolution(self.split[0], 2 * self.split[1], hidden_channels, n)

    @staticmethod
    def _affine(subnet: CrossConvolution, given, changed, clamp: float, rev: bool):
        """``changed`` updated (or, ``rev``, restored) with the scale and shift ``subnet(given)``; and the sum of
        the log-scales of each sample."""
        out, log_det = [], 0.0
        for x, coefficients in zip(changed, subnet(given)):
            log_scale, shift = coefficients.chunk(2, dim=1)
            log_scale = soft_clamp(log_scale, clamp)
            out.append((x - shift) * torch.exp(-log_scale) if rev else x * torch.exp(log_scale) + shift)
            log_det = log_det + log_scale.flatten(1).sum(1)
        return out, log_det

    def forward(self, x_or_z, c=None, rev: bool = False, jac: bool = True):
        firsts, seconds = zip(*(torch.split(x, self.split, dim=1) for x in x_or_z))
        if not rev:
            firsts, log_det_a = self._affine(self.update_first, seconds, firsts, self.clamp, rev)
            seconds, log_det_b = self._affine(self.update_second, firsts, seconds, self.clamp, rev)
            log_det = log_det_a + log_det_b
        else:
            seconds, log_det_b = self._affine(self.update_second, firsts, seconds, self.clamp, rev)
            firsts, log_det_a = self._affine(self.update_first, seconds, firsts, self.clamp, rev)
            log_det = -(log_det_a + log_det_b)
        return tuple(torch.cat(halves, dim=1) for halves in zip(firsts, seconds)), log_det

    def output_dims(self, input_dims):
        return input_dims


def cross_scale_flow(channels: int, grids: Sequence[Sequence[int]], coupling_blocks: int = 4, clamp: float = 3.0,
                     hidden_channels: int = 1024) -> Ff.GraphINN:  # fmt: skip
    """CS-Flow: ``coupling_blocks`` ``CrossScaleCoupling`` blocks over one map per scale (``grids``: each scale's
    ``(h, w)``, finest first), with a fixed random channel permutation of every scale between consecutive blocks
    (FrEIA ``PermuteRandom``). ``flow([x_i]) -> ((z_i, ...), log|det J| [B])``. Draws its weights and
    permutations from the global generators (build it under ``seeded``)."""
    inputs = [Ff.InputNode(channels, int(h), int(w), name=f"scale{i}") for i, (h, w) in enumerate(grids)]
    nodes: list[Ff.Node] = list(inputs)
    current = [(node, 0) for node in inputs]
    for block in range(coupling_blocks):
        if block:
            permutations = [
                Ff.Node([out], Fm.PermuteRandom, {}, name=f"permute{block}_{i}") for i, out in enumerate(current)
            ]
            nodes += permutations
            current = [(node, 0) for node in permutations]
        coupling = Ff.Node(current, CrossScaleCoupling, {"clamp": clamp, "hidden_channels": hidden_channels},
                           name=f"coupling{block}")  # fmt: skip
        nodes.append(coupling)
        current = [(coupling, i) for i in range(len(grids))]
    outputs = [Ff.OutputNode([out], name=f"z{i}") for i, out in enumerate(current)]
    flow = Ff.GraphINN(nodes + outputs, force_tuple_output=True)
    # GraphINN registers its modules in an order drawn from sets of nodes, which differs between two builds of the
    # same graph; registered in the order built, a saved state loads into the modules it came from
    flow.module_list = nn.ModuleList(node.module for node in nodes if node.module is not None)
    return flow


def cross_scale_loss(z: Sequence[torch.Tensor], log_det: torch.Tensor) -> torch.Tensor:
    """CS-Flow's loss: the batch mean of (½‖z‖² − log|det J|) per latent dimension, ‖z‖² over every position of
    every scale (the negative log-likelihood per dimension, up to the constant ½ log 2π)."""
    flat = torch.cat([zi.flatten(1) for zi in z], dim=1)
    return (0.5 * flat.pow(2).sum(1) - log_det).mean() / flat.shape[1]
