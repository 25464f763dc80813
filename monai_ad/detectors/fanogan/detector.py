"""f-AnoGAN (Schlegl et al., Medical Image Analysis 2019): a Wasserstein GAN with gradient penalty learns normal
slices, then an encoder learns to map a slice to the latent code the generator rebuilds it from (izi_f training);
the image residual plus the critic's feature residual scores a slice, the smoothed image residual maps it.
Method, choices and schedules: ``README.md`` beside this module."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.cpu_threads import single_cpu_thread
from monai_ad.components.maps import max_in_roi_map
from monai_ad.components.smoothing import GaussianBlur2d
from monai_ad.components.training_loop import TrainingLoop, gather_slices, index_stream, process_generator
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.detectors.fanogan.torch_model import (
    WGANCritic,
    critic_loss,
    frozen,
    generator_loss,
    gradient_penalty,
    izif_loss,
    izif_scores,
    residual_map,
)
from monai_ad.distributed import min_over_processes, optimizer_step
from monai_ad.errors import InputError
from monai_ad.networks.dcgan import DCGANDecoder, DCGANEncoder, dcgan_init, from_tanh_range, padded_size, to_tanh_range
from monai_ad.settings import check_settings

logger = logging.getLogger(__name__)

SLICE_SCORES = ("izif", "residual")
Draw = Callable[[], torch.Tensor]  # the next training batch, in the networks' range


@register_detector("fanogan")
class FAnoGAN(AnomalyDetector):
    """f-AnoGAN on ``[B, C, image_size, image_size]`` slices (``README.md``)."""

    supported_channels = tuple(range(1, 9))
    # no edge at the liver's border for the generator to miss (README.md)
    default_preprocessing = {"outside_fill": "liver"}
    # a CPU demonstration schedule: 64 px, width 32, 40 WGAN-GP and 20 encoder epochs, one critic step per generator
    # step at five times the paper's lr (README.md)
    schedules = {
        "cpu": {"image_size": 64, "width": 32, "epochs": 40, "encoder_epochs": 20, "lr": 1e-3, "n_critic": 1, "batch_size": 8},
        "quick": {"epochs": 1, "encoder_epochs": 1},
    }

    def __init__(
        self,
        image_size: int = 224,
        in_channels: int = 1,
        latent_dim: int = 100,
        width: int = 64,
        epochs: int = 200,
        encoder_epochs: int = 200,
        batch_size: int = 64,
        lr: float = 2e-4,
        beta1: float = 0.5,
        n_critic: int = 5,
        gradient_penalty: float = 10.0,
        kappa: float = 1.0,
        slice_score: str = "izif",
        sigma: float = 4.0,
        amp: bool = False,
        seed: int = 0,
    ):
        check_settings("fanogan", image_size=image_size, latent_dim=latent_dim, width=width, epochs=epochs,
                       encoder_epochs=encoder_epochs, batch_size=batch_size, lr=lr, n_critic=n_critic,
                       gradient_penalty=gradient_penalty, kappa=kappa, sigma=sigma, seed=seed)  # fmt: skip
        if isinstance(beta1, bool) or not isinstance(beta1, (int, float)) or not 0 <= beta1 < 1:
            raise InputError(f"fanogan: beta1 must be a number in [0, 1), got {beta1!r}")
        if slice_score not in SLICE_SCORES:
            raise InputError(f"fanogan: slice_score must be one of {', '.join(SLICE_SCORES)}, got {slice_score!r}")
        lr, beta1, gradient_penalty, kappa, sigma = map(float, (lr, beta1, gradient_penalty, kappa, sigma))
        amp = bool(amp)
        super().__init__(**constructor_arguments())
        size = padded_size(image_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.generator = DCGANDecoder(size, in_channels, latent_dim, width)
            self.critic = WGANCritic(size, in_channels, width)
            self.encoder = DCGANEncoder(size, in_channels, latent_dim, width)
            for network in (self.generator, self.critic, self.encoder):
                dcgan_init(network)
        self.blur = GaussianBlur2d(sigma)
        self.gan_losses: list[float] = []
        self.encoder_losses: list[float] = []

    # ------------------------------------------------------------------ training
    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        p = self.hparams
        device = self.device
        images, _ = gather_slices("fanogan", batches, device, self.check_slices)
        batch_size = min(int(p["batch_size"]), images.shape[0])
        steps_per_epoch = min_over_processes(images.shape[0] // batch_size)
        gan_steps, encoder_steps = int(p["epochs"]) * steps_per_epoch, int(p["encoder_epochs"]) * steps_per_epoch
        generator = process_generator(p["seed"])
        indices = index_stream(images.shape[0], batch_size, generator, drop_last=True)
        logger.info("fanogan: %d slices, %d WGAN-GP and %d encoder steps", images.shape[0], gan_steps, encoder_steps)

        def draw() -> torch.Tensor:
            return to_tanh_range(images[next(indices).to(device)].float())

        # small convolutions: on a CPU one thread is faster than several (as GANomaly's)
        with single_cpu_thread(device), TrainingLoop("fanogan", self, gan_steps + encoder_steps, progress) as loop:
            self.gan_losses = self._train_wgan(loop, draw, generator, gan_steps, steps_per_epoch)
            self.encoder_losses = self._train_encoder(loop, draw, encoder_steps, steps_per_epoch)

    def _latents(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` latent codes from the prior N(0, I), ``[count, latent_dim, 1, 1]`` on the device."""
        z = torch.randn(count, self.hparams["latent_dim"], 1, 1, generator=generator)
        return z.to(self.device)

    def _train_wgan(
        self, loop: TrainingLoop, draw: Draw, generator: torch.Generator, steps: int, steps_per_epoch: int
    ) -> list[float]:
        """Stage 1: one critic step per batch (Wasserstein loss + λ · gradient penalty), one generator step after
        every ``n_critic`` of them. Returns the critic's loss per epoch."""
        p = self.hparams
        betas = (p["beta1"], 0.999)
        g_parameters, c_parameters = list(self.generator.parameters()), list(self.critic.parameters())
        g_optimizer = torch.optim.Adam(g_parameters, lr=p["lr"], betas=betas)
        c_optimizer = torch.optim.Adam(c_parameters, lr=p["lr"], betas=betas)
        amp, penalty_weight, n_critic = p["amp"], p["gradient_penalty"], int(p["n_critic"])

        def step(index: int) -> torch.Tensor:
            real = draw()
            count = real.shape[0]
            with torch.no_grad(), cuda_autocast(real.device, amp):
                fake = self.generator(self._latents(count, generator)).float()
            with cuda_autocast(real.device, amp):
                real_values, _ = self.critic(real)
                fake_values, _ = self.critic(fake)
                penalty = gradient_penalty(self.critic, real, fake, torch.rand(count, generator=generator))
            loss = critic_loss(real_values, fake_values) + penalty_weight * penalty
            optimizer_step(loss, [c_optimizer], c_parameters)
            if (index + 1) % n_critic == 0:
                with frozen(self.critic), cuda_autocast(real.device, amp):
                    fake_values, _ = self.critic(self.generator(self._latents(count, generator)))
                optimizer_step(generator_loss(fake_values), [g_optimizer], g_parameters)
            return loss

        return loop.run(steps, step, window=steps_per_epoch, where="in the WGAN-GP stage")

    def _train_encoder(self, loop: TrainingLoop, draw: Draw, steps: int, steps_per_epoch: int) -> list[float]:
        """Stage 2 (izi_f): the encoder alone, the generator and critic frozen in eval mode, on
        ``MSE(x, G(E(x))) + κ · MSE(f(x), f(G(E(x))))``. Returns its loss per epoch."""
        p = self.hparams
        parameters = list(self.encoder.parameters())
        optimizer = torch.optim.Adam(parameters, lr=p["lr"], betas=(p["beta1"], 0.999))
        self.generator.eval(), self.critic.eval()

        def step(_: int) -> torch.Tensor:
            x = draw()
            with cuda_autocast(x.device, p["amp"]):
                reconstruction = self.generator(self.encoder(x))
                _, image_features = self.critic(x)
                _, reconstruction_features = self.critic(reconstruction)
            loss = izif_loss(x, reconstruction, image_features, reconstruction_features, kappa=p["kappa"])
            optimizer_step(loss, [optimizer], parameters)
            return loss

        with frozen(self.generator, self.critic):
            return loop.run(steps, step, window=steps_per_epoch, where="in the encoder (izi_f) stage")

    # ------------------------------------------------------------------ scoring
    def reconstruct(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G(E(x)) [B, C, H, W] in [0, 1], anomaly score A(x) [B])`` of slices on the device (eval mode):
        ``A(x)`` is the izi_f loss of each slice, in the networks' [−1, 1] range, as the paper scores."""
        x = to_tanh_range(image)
        with cuda_autocast(image.device, self.hparams["amp"]):
            reconstruction = self.generator(self.encoder(x))
            _, image_features = self.critic(x)
            _, reconstruction_features = self.critic(reconstruction)
        scores = izif_scores(x, reconstruction, image_features, reconstruction_features, self.hparams["kappa"])
        return from_tanh_range(reconstruction, self.image_size), scores

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        with single_cpu_thread(image.device):
            reconstruction, scores = self.reconstruct(image)
        pixel = self.blur(residual_map(image, reconstruction))
        if self.hparams["slice_score"] == "residual":
            scores = max_in_roi_map(pixel, roi)
        return SliceScores(pixel=pixel, slice=scores)

    def extra_repr(self) -> str:
        networks = {"generator": self.generator, "critic": self.critic, "encoder": self.encoder}
        return ", ".join(f"{name}_parameters={sum(q.numel() for q in n.parameters())}" for name, n in networks.items())
