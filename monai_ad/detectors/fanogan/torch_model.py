"""f-AnoGAN's networks and losses: the WGAN-GP critic (a DCGAN encoder with layer norm and one output), the
Wasserstein losses with the gradient penalty, and the izi_f loss that is also the anomaly score."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from monai_ad.networks.dcgan import DCGANEncoder


class WGANCritic(nn.Module):
    """A DCGAN encoder with layer norm and one linear output: ``x`` → (critic value ``[B]``, features ``[B, D]``,
    the flattened output of the layer before the last)."""

    def __init__(self, size: int, channels: int, width: int):
        super().__init__()
        self.encoder = DCGANEncoder(size, channels, 1, width, norm="layer")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder.features(x)
        return self.encoder.last(features).flatten(), features.flatten(1)


def critic_loss(real_values: torch.Tensor, fake_values: torch.Tensor) -> torch.Tensor:
    """The critic's Wasserstein loss ``E[D(G(z))] − E[D(x)]`` (the negative estimate of the distance)."""
    return fake_values.float().mean() - real_values.float().mean()


def generator_loss(fake_values: torch.Tensor) -> torch.Tensor:
    """The generator's Wasserstein loss ``−E[D(G(z))]``."""
    return -fake_values.float().mean()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's penalty ``E[(‖∇D(x̃)‖₂ − 1)²]`` at ``x̃ = mix · x + (1 − mix) · G(z)`` (``mix`` ``[B]`` in
    [0, 1], one per sample), kept in the graph so that the critic's step differentiates it."""
    mix = mix.to(real.device, torch.float32).view(-1, *([1] * (real.ndim - 1)))
    between = (mix * real.float() + (1 - mix) * fake.float()).requires_grad_(True)
    values, _ = critic(between)
    (gradient,) = torch.autograd.grad(values.float().sum(), between, create_graph=True)
    return (gradient.flatten(1).norm(dim=1) - 1).pow(2).mean()


def izif_scores(
    image: torch.Tensor,
    reconstruction: torch.Tensor,
    image_features: torch.Tensor,
    reconstruction_features: torch.Tensor,
    kappa: float = 1.0,
) -> torch.Tensor:
    """``[B]``: ``A(x) = mean((x − G(E(x)))²) + κ · mean((f(x) − f(G(E(x))))²)`` per slice, ``f`` the critic's
    features: the izi_f training loss (its batch mean) and the paper's anomaly score."""
    residual = (image.float() - reconstruction.float()).pow(2).flatten(1).mean(1)
    features = (image_features.float() - reconstruction_features.float()).pow(2).flatten(1).mean(1)
    return residual + kappa * features


def izif_loss(*args: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """The izi_f encoder loss: ``izif_scores`` averaged over the batch."""
    return izif_scores(*args, kappa=kappa).mean()


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Inside the block the parameters of ``modules`` take no gradient (the networks a stage does not train, through
    which it still back-propagates); they are left as they were after it."""
    parameters = [p for module in modules for p in module.parameters()]
    saved = [p.requires_grad for p in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, saved):
            parameter.requires_grad_(flag)


def residual_map(image: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]``: ``|x − G(E(x))|`` per pixel, averaged over channels (slices in [0, 1])."""
    return (image.float() - reconstruction.float()).abs().mean(1)
