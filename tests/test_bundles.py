"""Every bundle under bundles/: training, evaluating and inference from the command line on tiny phantoms,
metadata verified offline, and MONAI Label's BundleInferTask loading it and returning a label map."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
BUNDLES = sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "metadata.json").is_file())
# small and quick on a CPU: tiny phantoms (the bundle default), small slices, few epochs
FAST = {"patchcore_liver_ct": ["--network_def#image_size", "64"],
        "padim_liver_ct": ["--network_def#image_size", "64"],
        "rd4ad_liver_ct": ["--network_def#image_size", "64", "--network_def#epochs", "1"],
        "winclip_liver_ct": ["--clip_model", "tiny-random", "--allow_random_weights", "True", "--network_def#image_size", "96"],
        "clip_reconstruction_liver_ct": ["--clip_model", "tiny-random", "--allow_random_weights", "True", "--network_def#image_size", "96",
                                         "--network_def#epochs", "1", "--network_def#prompt_length", "4"],
        "dpa_liver_ct": [],
        "intensity_liver_ct": [],
        "fused_liver_ct": ["--network_def#image_size", "64"],
        "simplenet_liver_ct": ["--network_def#image_size", "64", "--network_def#meta_epochs", "2", "--network_def#gan_epochs", "1"],
        "synthetic_anomaly_liver_ct": ["--network_def#image_size", "64", "--network_def#steps", "5", "--network_def#crop_size", "32"]}  # fmt: skip


def bundle_run(bundle: Path, run_id: str, configs: list[str], *extra: str) -> subprocess.CompletedProcess:
    config_file = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--meta_file", "configs/metadata.json",
           "--config_file", config_file, "--logging_file", "configs/logging.conf", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=bundle, capture_output=True, text=True)


@pytest.fixture(scope="module", params=BUNDLES)
def trained_bundle(request, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("bundles") / request.param
    shutil.copytree(BUNDLES_DIR / request.param, bundle, ignore=shutil.ignore_patterns("models", "data", "eval"))
    shutil.copy(BUNDLES_DIR / "meta_schema.json", bundle.parent / "meta_schema.json")
    proc = bundle_run(bundle, "training", ["configs/train.json"], *FAST[request.param])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (bundle / "models" / "model.pt").is_file()
    return bundle


def test_bundle_layout(trained_bundle):
    for name in ("metadata.json", "inference.json", "train.json", "evaluate.json", "logging.conf"):
        assert (trained_bundle / "configs" / name).is_file(), name
    assert (trained_bundle / "docs" / "README.md").is_file() and (trained_bundle / "LICENSE").is_file()


def test_metadata_verifies_offline(trained_bundle, tmp_path):
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "../meta_schema.json"]
    proc = subprocess.run(cmd, cwd=trained_bundle, capture_output=True, text=True)
    assert proc.returncode == 0 and "verified with no error" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    broken = json.loads((trained_bundle / "configs" / "metadata.json").read_text())
    del broken["network_data_format"]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(broken))
    cmd[cmd.index("../meta_schema.json")] = str(trained_bundle.parent / "meta_schema.json")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0


def test_evaluating_writes_metrics(trained_bundle):
    proc = bundle_run(trained_bundle, "evaluating", ["configs/train.json", "configs/evaluate.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((trained_bundle / "eval" / "metrics.json").read_text())
    for key in ("slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auroc_roi", "aupro", "dice", "slice_f1"):
        assert key in metrics
    assert (trained_bundle / "eval" / "metrics.csv").is_file() and (trained_bundle / "eval" / "report.png").is_file()


def test_inference_writes_outputs_in_input_geometry(trained_bundle):
    proc = bundle_run(trained_bundle, "inference", ["configs/inference.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    datalist = json.loads((trained_bundle / "data" / "phantom" / "datalist.json").read_text())
    case = datalist["test"][0]
    source = nib.load(str(trained_bundle / "data" / "phantom" / case["image"]))
    label = nib.load(str(trained_bundle / "eval" / "volumes" / f"{case['case_id']}_anomaly.nii.gz"))
    assert label.shape == source.shape and np.allclose(label.affine, source.affine, atol=1e-4)


def test_monai_label_bundle_infer_task_returns_a_label_map(trained_bundle):
    from monailabel.tasks.infer.bundle import BundleInferTask

    task = BundleInferTask(str(trained_bundle), conf={})
    assert task.is_valid() and task.labels == {"anomaly": 1}
    data = trained_bundle / "data" / "phantom"
    case = json.loads((data / "datalist.json").read_text())["test"][-1]
    result_file, result = task({"image": str(data / case["image"]), "roi": str(data / case["label"]), "device": "cpu"})
    label, source = nib.load(result_file), nib.load(str(data / case["image"]))
    assert label.shape == source.shape and np.allclose(label.affine, source.affine, atol=1e-4)
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}
    assert result["label_names"] == {"anomaly": 1}


@pytest.mark.parametrize("name", BUNDLES)
def test_inference_config_keeps_the_library_min_lesion_size(name):
    """The configs import no monai_ad module, so they state the smallest lesion kept as a number: the library's."""
    from monai.bundle import ConfigParser

    from monai_ad.postprocess import MIN_LESION_MM3

    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / name / "configs" / "inference.json"))
    assert parser.get_parsed_content("predictor#min_lesion_mm3") == MIN_LESION_MM3


@pytest.mark.parametrize("name", BUNDLES)
def test_multi_gpu_train_runs_with_torchrun_on_cpu_gloo(name, tmp_path):
    """Two CPU processes (gloo): data split across them, features/gradients combined, rank 0 saves the model."""
    bundle = tmp_path / name
    shutil.copytree(BUNDLES_DIR / name, bundle, ignore=shutil.ignore_patterns("models", "data", "eval"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
           "--meta_file", "configs/metadata.json", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
           "--logging_file", "configs/logging.conf", *FAST[name]]  # fmt: skip
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from monai_ad.detectors import AnomalyDetector

    model = AnomalyDetector.load(bundle / "models" / "model.pt")
    assert model.is_fitted and model.thresholds["n_slices"] > 0
