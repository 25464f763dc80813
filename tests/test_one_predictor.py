"""One model, one volume, three ways in: the ``monai-ad infer`` command, ``python -m monai.bundle run inference``
and the MONAI Label app's infer task give the same heatmap and the same label map, because all three read the
volume with one ``monai_ad.prediction.Predictor`` built from the model.

The model is trained with a ``min_roi_pixels`` other than the default, so an entry point that did not take it
from the model's saved pre-processing would score other slices."""

import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from monai_ad import label_server
from monai_ad.data.datalists import load_datalist, roi_source
from monai_ad.data.phantom import write_phantom_dataset
from monai_ad.training import train

BUNDLES_DIR = label_server.PROJECT_ROOT / "bundles"
BUNDLE = "intensity_liver_ct"  # trains in seconds on a CPU
MIN_ROI_PIXELS = 8000  # the default is 16: on these phantoms this one leaves about a third of the liver slices unscored


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A copy of the bundle with a phantom dataset where it looks for one and a model trained on it."""
    bundle = tmp_path_factory.mktemp("one_predictor") / BUNDLE
    shutil.copytree(BUNDLES_DIR / BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "data", "eval"))
    datalist = write_phantom_dataset(bundle / "data" / "phantom", n_normal=3, n_abnormal=1, seed=0, preset="tiny", progress=False)
    train("intensity", datalist, bundle / "models" / "model.pt", preprocessing={"min_roi_pixels": MIN_ROI_PIXELS}, device="cpu", progress=False)
    return bundle


def _app_reading(bundle, image, roi):
    """The app's infer task, in this process: its label file and the heatmap it computed on the way."""
    sys.path.insert(0, str(label_server.APP_DIR))
    from lib.infers.anomaly import AnomalyInfer, SummaryToResultd

    heatmaps = []

    class Capture:
        def __call__(self, data):
            heatmaps.append(data["heatmap"].detach().cpu().numpy()[0])
            return data

    class Task(AnomalyInfer):
        def post_transforms(self, data=None):
            steps = list(super().post_transforms(data))
            at = next(i for i, step in enumerate(steps) if isinstance(step, SummaryToResultd))
            return [*steps[:at], Capture(), *steps[at:]]

    task = Task(bundle, [str(bundle / "models" / "model.pt")], "intensity")
    label_file, params = task({"image": str(image), "roi": str(roi), "device": "cpu"})
    return np.asarray(nib.load(label_file).dataobj), heatmaps[0], params


def test_cli_bundle_and_app_read_a_volume_alike(bundle, tmp_path):
    item = next(item for item in load_datalist(bundle / "data" / "phantom" / "datalist.json", "test") if item["abnormal"])
    image, roi = item["image"], roi_source(item)
    name = item["case_id"]
    cpu = "$torch.device('cpu')"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--meta_file", "configs/metadata.json",
           "--config_file", "configs/inference.json", "--logging_file", "configs/logging.conf", "--device", cpu]  # fmt: skip
    cli = [sys.executable, "-m", "monai_ad", "--quiet", "infer", "--model", str(bundle / "models" / "model.pt"),
           "--image", image, "--roi", roi, "--out", str(tmp_path / "cli"), "--device", "cpu"]  # fmt: skip
    # both commands at once, the app in this process meanwhile
    runs = [subprocess.Popen(c, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c, cwd in ((cmd, bundle), (cli, None))]
    app_label, app_heatmap, params = _app_reading(bundle, image, roi)
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]

    outputs = {"cli": tmp_path / "cli", "bundle": bundle / "eval" / "volumes"}
    heatmaps = {k: np.asarray(nib.load(str(d / f"{name}_heatmap.nii.gz")).dataobj) for k, d in outputs.items()}
    labels = {k: np.asarray(nib.load(str(d / f"{name}_anomaly-label.nii.gz")).dataobj) for k, d in outputs.items()}
    heatmaps["app"], labels["app"] = app_heatmap, app_label
    for way in ("bundle", "app"):
        assert heatmaps[way].shape == heatmaps["cli"].shape and np.array_equal(heatmaps[way], heatmaps["cli"]), way
        assert np.array_equal(labels[way], labels["cli"]), way
    assert labels["cli"].any()  # the lesion is found: the maps compared are not trivially empty

    liver = np.asarray(nib.load(roi).dataobj) > 0
    liver_slices = int(liver.reshape(-1, liver.shape[-1]).any(0).sum())  # the phantoms' axial axis is the last
    scored = sum(s is not None for s in params["slice_scores"])
    assert 0 < scored < liver_slices  # the model's min_roi_pixels left the liver's smallest slices unscored


def test_every_bundle_reads_a_volume_through_the_one_predictor():
    """The test above runs one bundle; every other bundle's inference config is the one shared file (a link to
    ``bundles/common/configs/inference.json``), so the same predictor, pre- and post-processing and writer serve
    each (the detector comes from the bundle's model)."""
    shared = (BUNDLES_DIR / "common" / "configs" / "inference.json").resolve(strict=True)
    bundles = [b for b in BUNDLES_DIR.iterdir() if (b / "configs" / "train.json").is_file()]
    assert BUNDLE in {b.name for b in bundles} and len(bundles) >= 10
    assert all((b / "configs" / "inference.json").resolve(strict=True) == shared for b in bundles), sorted(bundles)
    assert '"_target_": "monai_ad.prediction.Predictor"' in shared.read_text()
