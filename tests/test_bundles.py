"""Every bundle under bundles/ trains on tiny phantoms from its own configs, with metadata verified offline; the
shared inference, evaluation and multi-GPU configs run from the command line (training, evaluating, inference,
torchrun) and through MONAI Label's BundleInferTask for one bundle of each kind of training."""

import configparser
import csv
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import check_metrics_against_written_volumes, with_inserted_lesion

import monai_ad
from monai_ad.data.datalists import LESION_LABEL

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
BUNDLES = sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "metadata.json").is_file())
# small and quick on a CPU: tiny phantoms (the bundle default), small slices, few epochs
FAST = {"patchcore_liver_ct": ["--network_def#image_size", "64"],
        "padim_liver_ct": ["--network_def#image_size", "64"],
        "rd4ad_liver_ct": ["--network_def#image_size", "64", "--network_def#epochs", "1"],
        "winclip_liver_ct": ["--clip_model", "tiny-random", "--allow_random_weights", "True", "--network_def#image_size", "96"],
        "clip_reconstruction_liver_ct": ["--clip_model", "tiny-random", "--allow_random_weights", "True", "--network_def#image_size", "96",
                                         "--network_def#epochs", "1", "--network_def#prompt_length", "4"],
        "dpa_liver_ct": ["--network_def#transition_iters", "2", "--network_def#stable_iters", "2", "--network_def#final_iters", "5"],
        "intensity_liver_ct": ["--datalist#n_normal", "6"],
        "density_liver_ct": [],
        "fused_liver_ct": ["--network_def#image_size", "64", "--datalist#n_normal", "4"],
        "simplenet_liver_ct": ["--network_def#image_size", "64", "--network_def#meta_epochs", "2", "--network_def#gan_epochs", "1"],
        "stfpm_liver_ct": ["--network_def#image_size", "64", "--network_def#epochs", "1"],
        "cfa_liver_ct": ["--network_def#image_size", "64", "--network_def#epochs", "1"],
        "draem_liver_ct": ["--network_def#image_size", "64", "--network_def#epochs", "1"],
        "cutpaste_liver_ct": ["--network_def#image_size", "64", "--network_def#steps", "2", "--network_def#freeze_steps", "1",
                              "--network_def#patch_stride", "16"],
        "mkd_liver_ct": ["--network_def#image_size", "64", "--network_def#epochs", "1"],
        "cflow_liver_ct": ["--network_def#image_size", "64", "--network_def#epochs", "1"],
        "csflow_liver_ct": ["--network_def#image_size", "64", "--network_def#epochs", "1"],
        "ddad_liver_ct": ["--network_def#epochs", "1", "--network_def#fc_width", "64"],
        "deepsvdd_liver_ct": ["--network_def#image_size", "64", "--network_def#pretrain_epochs", "1", "--network_def#epochs", "1"],
        "ganomaly_liver_ct": ["--network_def#image_size", "32", "--network_def#width", "8", "--network_def#epochs", "1"],
        "fanogan_liver_ct": ["--network_def#image_size", "32", "--network_def#width", "8", "--network_def#epochs", "1",
                             "--network_def#encoder_epochs", "1"],
        "synthetic_anomaly_liver_ct": ["--network_def#image_size", "64", "--network_def#steps", "5", "--network_def#crop_size", "32"],
        "utrad_liver_ct": ["--network_def#image_size", "32", "--network_def#patch_sizes", "[4,2]", "--network_def#epochs", "1"]}  # fmt: skip


def bundle_run(bundle: Path, run_id: str | None, configs: list[str], *extra: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run [run_id] ...`` in the bundle's folder (no ``run_id``: MONAI's default, ``run``)."""
    config_file = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", *([run_id] if run_id else []), "--meta_file", "configs/metadata.json",
           "--config_file", config_file, "--logging_file", "configs/logging.conf", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=bundle, capture_output=True, text=True)


# The inference, evaluation and multi-GPU configs are one set of files (bundles/common) that every bundle links, so
# the workflows they define are run end to end from the command line for these bundles, one per kind of training
# (statistics, the default detector's tables, a memory bank, a trained network); every bundle's own train.json is
# trained below.
PIPELINE = ["density_liver_ct", "intensity_liver_ct", "patchcore_liver_ct", "stfpm_liver_ct"]
# torch.distributed paths: statistics reduced, tables merged, memory bank gathered, gradients averaged through the
# frozen-feature trainer and through the plain training loop
DISTRIBUTED = [*PIPELINE, "synthetic_anomaly_liver_ct"]


SHARED_FILES = ("configs/inference.json", "configs/evaluate.json", "configs/multi_gpu_train.json", "configs/logging.conf")


@pytest.mark.parametrize("name", BUNDLES)
def test_every_bundle_links_the_shared_workflow_configs(name):
    """What PIPELINE runs for a few bundles is what every bundle runs: the same files, linked, not copies."""
    assert set(PIPELINE) | set(DISTRIBUTED) <= set(BUNDLES)
    for shared in SHARED_FILES:
        path = BUNDLES_DIR / name / shared
        assert path.is_symlink() and path.resolve(strict=True) == (BUNDLES_DIR / "common" / shared).resolve(strict=True), shared


def copied_bundle(name: str, parent: Path) -> Path:
    bundle = parent / name
    shutil.copytree(BUNDLES_DIR / name, bundle, ignore=shutil.ignore_patterns("models", "data", "eval"))
    shutil.copy(BUNDLES_DIR / "meta_schema.json", parent / "meta_schema.json")
    return bundle


def fast_overrides(name: str) -> dict:
    """``FAST[name]`` as the keyword overrides ``monai.bundle.run`` and ``ConfigWorkflow`` take."""
    flags = FAST[name]
    return {flags[i].lstrip("-"): _literal(flags[i + 1]) for i in range(0, len(flags), 2)}


@pytest.fixture(scope="module", params=BUNDLES)
def trained_bundle(request, tmp_path_factory):
    """Each bundle trained by ``monai.bundle.run("training", ...)`` on its own configs, in this process."""
    from monai.bundle import run

    bundle = copied_bundle(request.param, tmp_path_factory.mktemp("bundles"))
    run("training", meta_file=str(bundle / "configs" / "metadata.json"), config_file=str(bundle / "configs" / "train.json"),
        bundle_root=str(bundle), **fast_overrides(request.param))  # fmt: skip
    assert (bundle / "models" / "model.pt").is_file()
    return bundle


@pytest.fixture(scope="module", params=PIPELINE)
def cli_trained_bundle(request, tmp_path_factory):
    """A bundle trained from the command line, as in the model zoo."""
    bundle = copied_bundle(request.param, tmp_path_factory.mktemp("cli_bundles"))
    proc = bundle_run(bundle, "training", ["configs/train.json"], *FAST[request.param])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (bundle / "models" / "model.pt").is_file()
    return bundle


def targets(config):
    """Every ``_target_`` in a parsed JSON config."""
    if isinstance(config, dict):
        found = [config["_target_"]] if "_target_" in config else []
        return found + [t for v in config.values() for t in targets(v)]
    if isinstance(config, list):
        return [t for v in config for t in targets(v)]
    return []


def test_bundle_layout_configs_and_metadata_agree(trained_bundle):
    from monai_ad.detectors import AnomalyDetector

    configs = trained_bundle / "configs"
    for name in ("metadata.json", "inference.json", "train.json", "evaluate.json", "multi_gpu_train.json", "logging.conf"):
        assert (configs / name).is_file(), name
    assert (trained_bundle / "docs" / "README.md").read_text().strip() and (trained_bundle / "LICENSE").read_text().strip()
    parsed = {path.name: json.loads(path.read_text()) for path in configs.glob("*.json")}
    for name, config in parsed.items():  # every _target_ names something importable and callable
        for target in targets(config):
            module, _, attr = target.rpartition(".")
            assert callable(getattr(importlib.import_module(module), attr, None)), f"{name}: {target}"
    logging_conf = configparser.ConfigParser()
    logging_conf.read(configs / "logging.conf")
    assert {"loggers", "handlers", "formatters"} <= set(logging_conf.sections())

    meta, network = parsed["metadata.json"], parsed["train.json"]["network_def"]
    assert network["_target_"] == "monai_ad.detectors.create_detector" and trained_bundle.name == f"{network['name']}_liver_ct"
    assert meta["version"] in meta["changelog"] and meta["required_packages_version"]["monai_ad"] == monai_ad.__version__
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    channels = network.get("in_channels", 1)
    assert image["spatial_shape"] == [network["image_size"], network["image_size"], "*"]
    assert image["num_channels"] == channels + 1 == len(image["channel_def"]) and image["channel_def"][str(channels)] == "roi"
    assert pred["num_channels"] == 1 and pred["channel_def"] == {"0": "background", "1": "anomaly"}
    model = AnomalyDetector.load(trained_bundle / "models" / "model.pt")  # what training wrote
    assert model.name == network["name"] and model.in_channels == channels and model.is_fitted


def test_train_infer_and_eval_workflows_have_the_properties_monai_requires(cli_trained_bundle, monkeypatch):
    """``ConfigWorkflow(...).check_properties()``, the check MONAI's tools run on a bundle, finds nothing missing."""
    from monai.bundle import ConfigWorkflow

    trained_bundle = cli_trained_bundle
    monkeypatch.chdir(trained_bundle)  # bundle_root is "."
    overrides = fast_overrides(trained_bundle.name)
    for workflow, files in (("train", ["configs/train.json"]), ("infer", ["configs/inference.json"]),
                            ("eval", ["configs/train.json", "configs/evaluate.json"])):  # fmt: skip
        own = overrides if workflow != "infer" else {k: v for k, v in overrides.items() if not k.startswith("network_def#")}
        flow = ConfigWorkflow(config_file=files, meta_file="configs/metadata.json", workflow_type=workflow, **own)
        flow.initialize()
        assert flow.check_properties() == [], workflow
    assert len(flow.dataset) == len(json.loads((trained_bundle / "data" / "phantom" / "datalist.json").read_text())["test"])


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@pytest.mark.parametrize("name", BUNDLES)
def test_a_bundle_names_its_detectors_schedule_and_states_only_what_differs(name):
    """``network_def`` is a named schedule of the detector (``AnomalyDetector.schedules``, written once on the
    class) plus the bundle's own choices: nothing it states repeats what the schedule already gives."""
    import inspect

    from monai_ad.detectors.base import detector_class, settings_repeating_schedule

    network = json.loads((BUNDLES_DIR / name / "configs" / "train.json").read_text())["network_def"]
    kind = detector_class(network["name"])
    own = {k: v for k, v in network.items()
           if k not in ("_target_", "name", "schedule", "image_size", "in_channels") and not str(v).startswith("@")}  # fmt: skip
    assert set(own) <= set(inspect.signature(kind.__init__).parameters), sorted(own)
    repeated = settings_repeating_schedule(network["name"], network["schedule"], own)
    assert repeated == [], f"{name} repeats its schedule's {repeated}"


def test_metadata_verifies_against_the_schema_offline(trained_bundle, tmp_path):
    """MONAI's ``verify_metadata`` (what ``python -m monai.bundle verify_metadata`` runs) accepts the metadata, and
    fails on metadata without a required field."""
    from monai.bundle import verify_metadata

    schema = str(trained_bundle.parent / "meta_schema.json")
    verify_metadata(meta_file=str(trained_bundle / "configs" / "metadata.json"), filepath=schema)
    broken = json.loads((trained_bundle / "configs" / "metadata.json").read_text())
    del broken["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=schema)


@pytest.mark.parametrize("name", BUNDLES)
def test_repository_metadata_follows_the_model_zoo_schema(name):
    """Each bundle's metadata as committed (no training) passes ``verify_metadata`` against the repository's copy of
    the model zoo schema, cites the method's papers, and its eval_metrics are figures with a note on what they were
    measured on (or the note alone saying why there are none)."""
    from monai.bundle import verify_metadata

    meta_file = BUNDLES_DIR / name / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(BUNDLES_DIR / "meta_schema.json"))
    meta = json.loads(meta_file.read_text())
    assert meta.get("references") and all(r.strip() for r in meta["references"]), "no references"
    metrics = meta.get("eval_metrics", {})
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()), metrics
    assert not metrics or meta.get("eval_metrics_note"), "eval_metrics without eval_metrics_note"


def test_model_zoo_schema_rejects_what_the_model_zoo_rejects(tmp_path):
    """The repository's schema keeps the model zoo's required fields and types: metadata missing one, or with a
    field of the wrong type, fails ``verify_metadata``."""
    from monai.bundle import verify_metadata

    schema = str(BUNDLES_DIR / "meta_schema.json")
    good = json.loads((BUNDLES_DIR / "padim_liver_ct" / "configs" / "metadata.json").read_text())
    no_tensor_shape = json.loads(json.dumps(good))
    del no_tensor_shape["network_data_format"]["inputs"]["image"]["spatial_shape"]
    # jsonschema names a missing field, and a wrong type by its value; a tensor without spatial_shape is none of the
    # kinds a network input may be (number, string, boolean, tensor) and is reported as not the first of them
    no_packages = {k: v for k, v in good.items() if k != "required_packages_version"}
    broken = [(no_packages, "'required_packages_version' is a required property"),
              ({**good, "references": "one string, not a list"}, "'one string, not a list' is not of type 'array'"),
              ({**good, "numpy_version": 1.26}, "1.26 is not of type 'string'"),
              (no_tensor_shape, "'value_range': .* is not of type 'number'")]  # fmt: skip
    for meta, message in broken:
        (tmp_path / "metadata.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=message):
            verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=schema)


def test_metadata_verifies_from_the_command_line(cli_trained_bundle):
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "../meta_schema.json"]
    proc = subprocess.run(cmd, cwd=cli_trained_bundle, capture_output=True, text=True)
    assert proc.returncode == 0 and "verified with no error" in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_evaluating_writes_metrics_that_agree_with_its_volumes(cli_trained_bundle):
    trained_bundle = cli_trained_bundle
    proc = bundle_run(trained_bundle, "evaluating", ["configs/train.json", "configs/evaluate.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = trained_bundle / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auroc_roi", "aupro", "dice", "slice_f1"):
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    with open(out / "metrics.csv") as f:
        rows = {row["metric"]: row["value"] for row in csv.DictReader(f)}
    for key in ("slice_auroc", "pixel_auroc_roi", "aupro", "dice"):
        assert float(rows[key]) == pytest.approx(metrics[key], rel=1e-9), key
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = trained_bundle / "data" / "phantom"
    check_metrics_against_written_volumes(metrics, rows, out, data, json.loads((data / "datalist.json").read_text())["test"])


# bundles whose quick training (FAST) already puts an inserted 12 mm hypodense sphere above the rest of the liver
LOCALISES = {"density_liver_ct", "intensity_liver_ct", "patchcore_liver_ct"}


def reoriented(image: nib.Nifti1Image, codes) -> nib.Nifti1Image:
    """The same voxels in world space, stored with axis codes ``codes`` (a pure permutation and flips)."""
    start, target = nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(codes)
    return image.as_reoriented(nib.orientations.ornt_transform(start, target))


def test_inference_writes_outputs_in_input_geometry_where_the_lesion_is(cli_trained_bundle):
    """A phantom (RAS, anisotropic voxels) with an inserted lesion, and the same scan stored with its slices along
    the first axis and both in-plane axes reversed: each output is written in its own input's geometry, the two
    outputs are the same maps in world space, and (where the quick training suffices) the heatmap is higher on the
    lesion's voxels than on the rest of the liver, in the reversed scan's own voxel order."""
    trained_bundle = cli_trained_bundle
    data = trained_bundle / "data" / "phantom"
    datalist = json.loads((data / "datalist.json").read_text())
    case = with_inserted_lesion(data, next(c for c in datalist["test"] if c["case_id"].startswith("normal")))
    stored = nib.load(str(data / case["image"]))
    assert nib.aff2axcodes(stored.affine) == ("R", "A", "S") and len(set(np.round(stored.header.get_zooms(), 3))) > 1
    flipped = {"case_id": f"{case['case_id']}_spl", "image": f"{case['case_id']}_spl.nii.gz", "label": f"{case['case_id']}_spl_label.nii.gz"}
    for key in ("image", "label"):
        nib.save(reoriented(nib.load(str(data / case[key])), ("S", "P", "L")), str(data / flipped[key]))
    (data / "inserted.json").write_text(json.dumps({**datalist, "test": [case, flipped]}))
    proc = bundle_run(trained_bundle, None, ["configs/inference.json"], "--datalist", str(data / "inserted.json"))  # as in the zoo
    assert proc.returncode == 0, proc.stderr[-3000:]

    volumes = trained_bundle / "eval" / "volumes"
    outputs = {}
    for item in (case, flipped):
        source = nib.load(str(data / item["image"]))
        for kind in ("heatmap", "anomaly-label"):
            written = nib.load(str(volumes / f"{item['case_id']}_{kind}.nii.gz"))
            assert written.shape == source.shape and np.allclose(written.affine, source.affine, atol=1e-4), kind
            outputs[item["case_id"], kind] = written
    for kind in ("heatmap", "anomaly-label"):
        back = reoriented(outputs[flipped["case_id"], kind], ("R", "A", "S"))
        assert np.allclose(back.affine, stored.affine, atol=1e-4)
        got = np.asarray(back.dataobj, dtype=np.float64)
        expected = np.asarray(outputs[case["case_id"], kind].dataobj, dtype=np.float64)
        assert np.allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max())), kind

    label = np.asarray(nib.load(str(data / flipped["label"])).dataobj)
    heat = np.asarray(outputs[flipped["case_id"], "heatmap"].dataobj, dtype=np.float64)
    lesion, liver = label == LESION_LABEL, label == 1
    if trained_bundle.name in LOCALISES:
        bar = np.quantile(heat[liver], 0.95)
        assert heat[lesion].mean() > bar, f"lesion {heat[lesion].mean():.4g}, liver q95 {bar:.4g}"


def test_monai_label_bundle_infer_task_returns_a_label_map(cli_trained_bundle):
    from monailabel.tasks.infer.bundle import BundleInferTask

    trained_bundle = cli_trained_bundle

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
    """The smallest lesion kept is the library's constant, by reference."""
    from monai.bundle import ConfigParser

    from monai_ad.postprocess import MIN_LESION_MM3

    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / name / "configs" / "inference.json"))
    assert parser.get_parsed_content("predictor#min_lesion_mm3") == MIN_LESION_MM3


@pytest.mark.parametrize("name", DISTRIBUTED)
def test_multi_gpu_train_runs_with_torchrun_on_cpu_gloo(name, tmp_path):
    """Two CPU processes (gloo): data split across them, features/gradients combined, rank 0 saves the model."""
    bundle = copied_bundle(name, tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
           "--meta_file", "configs/metadata.json", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
           "--logging_file", "configs/logging.conf", *FAST[name]]  # fmt: skip
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from monai_ad.detectors import AnomalyDetector

    model = AnomalyDetector.load(bundle / "models" / "model.pt")
    assert model.is_fitted and model.thresholds["n_slices"] > 0
