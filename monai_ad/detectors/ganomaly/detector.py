"""GANomaly (Akçay, Atapour-Abarghouei, Breckon, ACCV 2018): an encoder–decoder–encoder generator trained
adversarially on normal slices; the distance between the latent codes of a slice and of its reconstruction scores
the slice, the reconstruction residual maps it. Method, choices and schedules: ``README.md`` beside this module."""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.maps import max_in_roi_map
from monai_ad.components.cpu_threads import single_cpu_thread
from monai_ad.components.smoothing import GaussianBlur2d
from monai_ad.components.training_loop import TrainingLoop, gather_slices, index_stream, process_generator
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.detectors.ganomaly.torch_model import (
    LATENT_LOSSES,
    GANomalyDiscriminator,
    GANomalyGenerator,
    dcgan_init,
    discriminator_loss,
    generator_loss,
    latent_distance,
)
from monai_ad.distributed import min_over_processes, optimizer_step
from monai_ad.errors import InputError
from monai_ad.networks.dcgan import from_tanh_range, padded_size, to_tanh_range
from monai_ad.settings import check_settings

logger = logging.getLogger(__name__)

SLICE_SCORES = ("latent", "residual")
COLLAPSED = 1e-5  # a discriminator loss below this re-initialises the discriminator (as anomalib)


@register_detector("ganomaly")
class GANomaly(AnomalyDetector):
    """GANomaly on ``[B, C, image_size, image_size]`` slices (``README.md``)."""

    supported_channels = tuple(range(1, 9))
    # a CPU demonstration schedule: 64 px, width 32, 30 epochs
    schedules = {"cpu": {"image_size": 64, "width": 32, "epochs": 30}, "quick": {"epochs": 1}}

    def __init__(
        self,
        image_size: int = 224,
        in_channels: int = 1,
        latent_dim: int = 100,
        width: int = 64,
        epochs: int = 15,
        batch_size: int = 32,
        lr: float = 2e-4,
        beta1: float = 0.5,
        adversarial_weight: float = 1.0,
        contextual_weight: float = 50.0,
        encoder_weight: float = 1.0,
        latent_loss: str = "l2",
        slice_score: str = "latent",
        sigma: float = 4.0,
        amp: bool = False,
        seed: int = 0,
    ):
        check_settings("ganomaly", image_size=image_size, latent_dim=latent_dim, width=width, epochs=epochs,
                       batch_size=batch_size, lr=lr, adversarial_weight=adversarial_weight,
                       contextual_weight=contextual_weight, encoder_weight=encoder_weight, sigma=sigma, seed=seed)  # fmt: skip
        if not 0 <= beta1 < 1:
            raise InputError(f"ganomaly: beta1 must be a number in [0, 1), got {beta1!r}")
        if latent_loss not in LATENT_LOSSES:
            raise InputError(f"ganomaly: latent_loss must be one of {', '.join(LATENT_LOSSES)}, got {latent_loss!r}")
        if slice_score not in SLICE_SCORES:
            raise InputError(f"ganomaly: slice_score must be one of {', '.join(SLICE_SCORES)}, got {slice_score!r}")
        lr, beta1, sigma, amp = float(lr), float(beta1), float(sigma), bool(amp)
        adversarial_weight, contextual_weight, encoder_weight = map(float, (adversarial_weight, contextual_weight, encoder_weight))
        super().__init__(**constructor_arguments())
        size = padded_size(image_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.generator = GANomalyGenerator(size, in_channels, latent_dim, width)
            self.discriminator = GANomalyDiscriminator(size, in_channels, width)
            dcgan_init(self.generator), dcgan_init(self.discriminator)
        self.blur = GaussianBlur2d(sigma)
        self.train_losses: list[float] = []

    # ------------------------------------------------------------------ training
    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        device = self.device
        images, _ = gather_slices("ganomaly", batches, device, self.check_slices)
        batch_size = min(int(p["batch_size"]), images.shape[0])
        steps_per_epoch = min_over_processes(images.shape[0] // batch_size)
        steps = int(p["epochs"]) * steps_per_epoch
        indices = index_stream(images.shape[0], batch_size, process_generator(p["seed"]),
                               drop_last=True)  # fmt: skip
        betas = (p["beta1"], 0.999)
        g_parameters, d_parameters = list(self.generator.parameters()), list(self.discriminator.parameters())
        g_optimizer = torch.optim.Adam(g_parameters, lr=p["lr"], betas=betas)
        d_optimizer = torch.optim.Adam(d_parameters, lr=p["lr"], betas=betas)
        weights = (p["adversarial_weight"], p["contextual_weight"], p["encoder_weight"])
        logger.info("ganomaly: %d slices, %d steps", images.shape[0], steps)

        def step(_: int) -> torch.Tensor:
            x = to_tanh_range(images[next(indices).to(device)].float())
            with cuda_autocast(device, p["amp"]):
                reconstruction, latent, latent_again = self.generator(x)
                _, real_features = self.discriminator(x)
                _, fake_features = self.discriminator(reconstruction)
            g_loss = generator_loss(real_features, fake_features, x, reconstruction, latent, latent_again, weights,
                                    p["latent_loss"])  # fmt: skip
            optimizer_step(g_loss, [g_optimizer], g_parameters)
            with cuda_autocast(device, p["amp"]):
                real, _ = self.discriminator(x)
                fake, _ = self.discriminator(reconstruction.detach())
            d_loss = discriminator_loss(real, fake)
            optimizer_step(d_loss, [d_optimizer], d_parameters)
            if d_loss.item() < COLLAPSED:  # the generator gets no signal from a perfect discriminator
                dcgan_init(self.discriminator)
            return g_loss

        # small convolutions: on a CPU one thread is faster than several (README.md)
        with single_cpu_thread(device), TrainingLoop("ganomaly", self, steps, progress) as loop:
            self.train_losses = loop.run(steps, step, window=steps_per_epoch)

    # ------------------------------------------------------------------ scoring
    def reconstruct(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction [B, C, H, W] in [0, 1], latent distance [B])`` of slices on the device (eval mode)."""
        with cuda_autocast(image.device, self.hparams["amp"]):
            reconstruction, latent, latent_again = self.generator(to_tanh_range(image))
        return from_tanh_range(reconstruction, self.image_size), latent_distance(latent, latent_again)

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        with single_cpu_thread(image.device):
            reconstruction, distance = self.reconstruct(image)
        pixel = self.blur((image - reconstruction).abs().mean(1))  # the contextual (L1) term per pixel
        if self.hparams["slice_score"] == "residual":
            distance = max_in_roi_map(pixel, roi)
        return SliceScores(pixel=pixel, slice=distance)

    def extra_repr(self) -> str:
        return f"generator_parameters={sum(q.numel() for q in self.generator.parameters())}"
