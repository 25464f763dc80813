"""DDAD (Cai et al., MICCAI 2022 / Medical Image Analysis 2023): two ensembles of autoencoders, the normative
distribution module (NDM) trained on normal slices only and the unknown distribution module (UDM) trained on normal
plus unlabelled slices (which hold some abnormal ones); where their reconstructions disagree (inter-discrepancy) a
slice is likely abnormal. Method, choices and schedules: ``README.md`` beside this module."""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from monai_ad.components.autocast import cuda_autocast
from monai_ad.components.cpu_threads import single_cpu_thread
from monai_ad.components.maps import mean_in_roi_map
from monai_ad.components.training_loop import TrainingLoop, gather_slices, index_stream, process_generator
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.detectors.ddad.torch_model import (
    HALVINGS,
    DDADAutoencoder,
    inter_discrepancy,
    intra_discrepancy,
    reconstruction_loss,
)
from monai_ad.distributed import min_over_processes, optimizer_step
from monai_ad.errors import InputError
from monai_ad.settings import check_settings

logger = logging.getLogger(__name__)

SCORE_MAPS = ("inter", "intra")


def resize_slices(image: torch.Tensor, size: int) -> torch.Tensor:
    """Slices ``[B, C, H, W]`` resized to ``size`` (area averaging when shrinking, bilinear when enlarging)."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    if image.shape[-1] > size:
        return F.interpolate(image, size=(size, size), mode="area")
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)


@register_detector("ddad")
class DDAD(AnomalyDetector):
    """DDAD on ``[B, C, image_size, image_size]`` slices (``README.md``): fitted on normal slices and, through
    ``fit(..., unlabelled=...)``, on unlabelled ones."""

    supported_channels = tuple(range(1, 9))
    uses_unlabelled = True
    # no edge at the liver's border for the autoencoders to reconstruct (as f-AnoGAN's; README.md)
    default_preprocessing = {"outside_fill": "liver"}
    # a CPU demonstration schedule: the paper's networks at 64 px, 60 epochs of batches of 16 (README.md)
    schedules = {
        "cpu": {"epochs": 60, "batch_size": 16},
        "quick": {"epochs": 2},
    }

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 1,
        input_size: int = 64,
        width: int = 16,
        fc_width: int = 2048,
        latent_dim: int = 16,
        ensemble_size: int = 3,
        uncertainty: bool = True,
        score_map: str = "inter",
        epochs: int = 250,
        batch_size: int = 64,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        amp: bool = False,
        seed: int = 0,
    ):
        check_settings("ddad", image_size=image_size, input_size=input_size, width=width, fc_width=fc_width,
                       latent_dim=latent_dim, ensemble_size=ensemble_size, epochs=epochs, batch_size=batch_size, lr=lr,
                       weight_decay=weight_decay, seed=seed)  # fmt: skip
        if input_size % 2**HALVINGS:
            raise InputError(f"ddad: input_size must be a multiple of {2**HALVINGS}, got {input_size}")
        if score_map not in SCORE_MAPS:
            raise InputError(f"ddad: score_map must be one of {', '.join(SCORE_MAPS)}, got {score_map!r}")
        if not isinstance(uncertainty, bool):
            raise InputError(f"ddad: uncertainty must be true or false, got {uncertainty!r}")
        lr, weight_decay, amp = float(lr), float(weight_decay), bool(amp)
        super().__init__(**constructor_arguments())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))

            def ensemble() -> nn.ModuleList:
                return nn.ModuleList(
                    DDADAutoencoder(input_size, in_channels, width, fc_width, latent_dim, uncertainty)
                    for _ in range(ensemble_size)
                )

            self.ndm = ensemble()  # normative distribution module: normal slices only
            self.udm = ensemble()  # unknown distribution module: normal + unlabelled slices
        # how many slices each module was trained on (the UDM's count includes the unlabelled slices)
        self.register_buffer("ndm_slices", torch.zeros((), dtype=torch.long))
        self.register_buffer("udm_slices", torch.zeros((), dtype=torch.long))
        self.ndm_losses: list[list[float]] = []
        self.udm_losses: list[list[float]] = []

    # ------------------------------------------------------------------ training
    def _fit(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        progress: bool,
        unlabelled: Iterable[dict[str, torch.Tensor]] | None = None,
    ) -> None:
        p = self.hparams
        device = self.device
        size = int(p["input_size"])

        def prepare(image: torch.Tensor) -> torch.Tensor:
            return resize_slices(image, size)

        normals, _ = gather_slices("ddad", batches, device, self.check_slices, prepare)
        if unlabelled is None:
            logger.warning("ddad: no unlabelled slices given; the UDM is trained on the normal slices only")
            mixed = normals
        else:
            extra, _ = gather_slices("ddad (unlabelled)", unlabelled, device, self.check_slices, prepare)
            mixed = torch.cat([normals, extra])
        if min_over_processes(min(normals.shape[0], mixed.shape[0])) < 2:
            raise InputError("ddad: needs at least 2 training slices (its autoencoders use batch normalisation)")
        batch_size = int(p["batch_size"])
        plans = []
        for images in (normals, mixed):
            size_now = min(batch_size, images.shape[0])
            plans.append((images, size_now, min_over_processes(images.shape[0] // size_now)))
        epochs = int(p["epochs"])
        total = sum(epochs * steps for _, _, steps in plans) * int(p["ensemble_size"])
        generator = process_generator(p["seed"])
        logger.info("ddad: %d normal and %d unlabelled slices, %d steps", normals.shape[0],
                    mixed.shape[0] - normals.shape[0], total)  # fmt: skip

        self.ndm_losses, self.udm_losses = [], []
        # small convolutions: on a CPU one thread is faster than several (as DeepSVDD's and f-AnoGAN's)
        with single_cpu_thread(device), TrainingLoop("ddad", self, total, progress) as loop:
            for module, losses, (images, size_now, steps) in ((self.ndm, self.ndm_losses, plans[0]),
                                                              (self.udm, self.udm_losses, plans[1])):  # fmt: skip
                for index, network in enumerate(module):
                    where = f"in the {'NDM' if module is self.ndm else 'UDM'}'s autoencoder {index}"
                    losses.append(self._train_one(loop, network, images, size_now, steps, generator, where))
        self.ndm_slices.fill_(normals.shape[0])
        self.udm_slices.fill_(mixed.shape[0])

    def _train_one(
        self,
        loop: TrainingLoop,
        network: DDADAutoencoder,
        images: torch.Tensor,
        batch_size: int,
        steps_per_epoch: int,
        generator: torch.Generator,
        where: str,
    ) -> list[float]:
        """One autoencoder, Adam on the reconstruction loss (``reconstruction_loss``) over ``epochs`` shuffled passes
        of ``images``. Returns the mean loss of each epoch."""
        p = self.hparams
        parameters = list(network.parameters())
        optimizer = torch.optim.Adam(parameters, lr=p["lr"], weight_decay=p["weight_decay"])
        indices = index_stream(images.shape[0], batch_size, generator, drop_last=True)

        def step(_: int) -> torch.Tensor:
            x = images[next(indices).to(images.device)].float()
            with cuda_autocast(x.device, p["amp"]):
                reconstruction, log_var = network(x)
            loss = reconstruction_loss(x, reconstruction, log_var)
            optimizer_step(loss, [optimizer], parameters)
            return loss

        return loop.run(int(p["epochs"]) * steps_per_epoch, step, window=steps_per_epoch, where=where)

    # ------------------------------------------------------------------ scoring
    def reconstructions(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ensembles' outputs on slices ``[B, C, H, W]`` at the networks' ``input_size``: ``"ndm"`` and ``"udm"``
        reconstructions ``[K, B, C, s, s]`` and, for AE-U, ``"ndm_log_var"`` / ``"udm_log_var"``."""
        x = resize_slices(image.float(), int(self.hparams["input_size"]))
        out: dict[str, torch.Tensor] = {}
        with cuda_autocast(x.device, self.hparams["amp"]):
            for name, module in (("ndm", self.ndm), ("udm", self.udm)):
                outputs = [network(x) for network in module]
                out[name] = torch.stack([r.float() for r, _ in outputs])
                if self.hparams["uncertainty"]:
                    out[f"{name}_log_var"] = torch.stack([v.float() for _, v in outputs])
        return out

    def discrepancy_maps(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"inter", "intra"}``: both maps ``[B, H, W]`` of slices ``[B, C, H, W]``, averaged over channels and
        upsampled (bilinear) from ``input_size`` to the slices' size."""
        out = self.reconstructions(image)
        maps = {
            "inter": inter_discrepancy(out["ndm"], out["udm"], out.get("ndm_log_var")),
            "intra": intra_discrepancy(out["ndm"]),
        }
        size = image.shape[-2:]
        return {k: F.interpolate(v.mean(1, keepdim=True), size=size, mode="bilinear", align_corners=False)[:, 0]
                for k, v in maps.items()}  # fmt: skip

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        with single_cpu_thread(image.device):
            pixel = self.discrepancy_maps(image)[self.hparams["score_map"]]
        return SliceScores(pixel=pixel, slice=mean_in_roi_map(pixel, roi))

    def extra_repr(self) -> str:
        return f"autoencoder_parameters={sum(q.numel() for q in self.ndm[0].parameters())}, ensembles=2x{len(self.ndm)}"
