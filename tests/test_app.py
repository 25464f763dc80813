"""The MONAI Label app, for real: a ``monailabel start_server`` on 127.0.0.1 with a folder datastore of tiny phantom
studies, driven by ``MONAILabelClient`` (the protocol the 3D Slicer plugin speaks). One server per module."""

import json
import shutil
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
from scipy import ndimage
import pytest

from monai_ad import label_server
from monai_ad.training import train

from conftest import REAL_CT, with_inserted_lesion
from monai_ad.data.datalists import LESION_LABEL

BUNDLES = sorted(p.name for p in label_server.PROJECT_ROOT.joinpath("bundles").iterdir()
                 if (p / "configs" / "inference.json").is_file() and (p / "configs" / "train.json").is_file())
MODEL = "patchcore_liver_ct"
REAL_DICOM = REAL_CT / "example_ct_dicom"
TOTALSEGMENTATOR_LIVER = 5
TINY = {"network_def#image_size": 64, "network_def#coreset_ratio": 0.05}

sys.path.insert(0, str(label_server.APP_DIR))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from monailabel.client import MONAILabelClient

    root = tmp_path_factory.mktemp("app")
    studies = label_server.prepare_sample_studies(root, n_normal=4, n_abnormal=2, preset="tiny", progress=False)
    if REAL_DICOM.is_dir():  # a DICOM series sub-folder in the folder datastore
        shutil.copytree(REAL_DICOM, studies / "real_series")
    models = root / "models"
    datalist = root / "phantom" / "datalist.json"
    train("patchcore", datalist, models / f"{MODEL}.pt", hparams={"image_size": 64, "coreset_ratio": 0.05}, device="cpu", progress=False)
    log = root / "server.log"
    # MONAI Label re-runs every scoring method after training; the training here already selects the threshold
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
    process, url = label_server.start_server(studies, conf={"model_dir": str(models)}, log_path=log, env=env)
    try:
        yield {"client": MONAILabelClient(url, tmpdir=str(root / "client")), "url": url, "root": root, "studies": studies,
               "models": models, "datalist": json.loads(datalist.read_text()), "log": log}  # fmt: skip
    finally:
        label_server.stop_server(process)


def _image(app, case):
    return app["studies"] / f"{case}.nii.gz"


def _abnormal_case(app):
    """The abnormal test study with the most lesion volume."""
    abnormal = [item for item in app["datalist"]["test"] if item["abnormal"]]
    return max(abnormal, key=lambda item: sum(lesion["diameter_mm"] ** 3 for lesion in item["lesions"]))["case_id"]


def _error(call):
    from monailabel.client.client import MONAILabelClientException

    with pytest.raises(MONAILabelClientException) as info:
        call()
    return info.value.msg


def test_info_lists_the_detectors(app):
    info = app["client"].info()
    model = info["models"][MODEL]
    assert model["type"] == "segmentation" and model["labels"] == {"anomaly": 1} and model["dimension"] == 3
    assert {"pixel_threshold", "slice_threshold", "min_lesion_mm3", "roi_label"} <= set(model["config"])
    assert set(BUNDLES) <= set(info["trainers"])  # every bundle is served (listed as a model once trained)
    assert "feedback_threshold" in info["scoring"]
    assert info["labels"] == ["anomaly"]  # a list: OHIF's MONAI Label panel fails on anything else


def _check_result(app, case, label_file, params):
    label, image = nib.load(label_file), nib.load(str(_image(app, case)))
    assert label.shape == image.shape and np.allclose(label.affine, image.affine, atol=1e-4)
    values = np.asarray(label.dataobj)
    assert set(np.unique(values)) <= {0, 1}
    assert params["label_names"] == {"anomaly": 1}
    assert len(params["slice_scores"]) == image.shape[params["axial_axis"]]
    assert all(isinstance(i, int) for i in params["abnormal_slices"])
    for lesion in params["lesions"]:
        assert {"centroid_mm", "volume_mm3", "peak_score"} <= set(lesion)
    regions, n_regions = ndimage.label(values > 0)
    assert n_regions == len(params["lesions"])  # the reported regions are the label map's, one for one
    voxel_mm3 = float(np.prod(label.header.get_zooms()[:3]))
    assert sum(r["volume_mm3"] for r in params["lesions"]) == pytest.approx(float((values > 0).sum()) * voxel_mm3, rel=1e-3)
    return values


def test_infer_by_image_id(app):
    client, case = app["client"], _abnormal_case(app)
    label_file, params = client.infer(MODEL, case, {})
    values = _check_result(app, case, label_file, params)
    assert params["thresholds"]["pixel"] == pytest.approx(params["operating_point"]["pixel"])  # the model's own
    assert any(s is not None for s in params["slice_scores"])


def test_infer_marks_a_clear_lesion(app, tmp_path):
    """A normal test scan with a 12 mm, -60 HU sphere inserted, uploaded with its liver mask: the label map marks
    a good part of the sphere (not an empty map), and every region it reports is the label map's."""
    data = app["root"] / "phantom"
    normal = next(i for i in app["datalist"]["test"] if not i["abnormal"])
    item = with_inserted_lesion(data, normal)
    truth = np.asarray(nib.load(str(data / item["label"])).dataobj)
    mask = tmp_path / "liver.nii.gz"
    label = nib.load(str(data / item["label"]))
    nib.save(nib.Nifti1Image((truth > 0).astype(np.uint8), label.affine), str(mask))
    label_file, params = app["client"].infer(MODEL, "", {}, label_in=str(mask), file=str(data / item["image"]))
    values = nib.load(label_file).get_fdata() > 0
    lesion = truth == LESION_LABEL
    assert (values & lesion).sum() >= 0.25 * lesion.sum(), "the sphere is not marked"
    assert len(params["lesions"]) == ndimage.label(values)[1] >= 1 and params["abnormal_slices"]


def test_infer_by_upload_with_the_liver_mask(app):
    case = app["datalist"]["test"][0]["case_id"]
    mask = app["root"] / "liver_masks" / f"{case}.nii.gz"
    label_file, params = app["client"].infer(MODEL, "", {}, label_in=str(mask), file=str(_image(app, case)))
    _check_result(app, case, label_file, params)


def test_dicom_series_folder_with_an_organ_map_as_roi(app, real_ct):
    """A DICOM series sub-folder is served as a study; its liver ROI is a TotalSegmentator map saved with tag
    'liver' (stored in another axis order than the series), the liver's value given by the client."""
    client = app["client"]
    assert "real_series" in client.datastore()["objects"]
    client.save_label("real_series", str(real_ct / "example_seg_dicom.nii.gz"), tag="liver")
    label_file, params = client.infer(MODEL, "real_series", {"roi_label": TOTALSEGMENTATOR_LIVER})
    label, image = nib.load(label_file), nib.load(str(app["studies"] / "real_series.nii.gz"))
    assert label.shape == image.shape == (512, 512, 20) and np.allclose(label.affine, image.affine, atol=1e-3)
    assert 0 < sum(s is not None for s in params["slice_scores"]) <= 20


def test_bad_requests_get_a_clear_answer_and_the_server_goes_on(app, tmp_path):
    client, case = app["client"], _abnormal_case(app)
    assert "404" in (msg := _error(lambda: client.infer("no_such_model", case, {}))) and "unknown model" in msg
    assert "404" in (msg := _error(lambda: client.infer(MODEL, "no_such_image", {}))) and "not in the datastore" in msg
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(b"this is not an image")
    mask = app["root"] / "liver_masks" / f"{case}.nii.gz"
    msg = _error(lambda: client.infer(MODEL, "", {}, label_in=str(mask), file=str(garbage)))
    assert "422" in msg and "cannot be read" in msg
    msg = _error(lambda: client.infer(MODEL, "", {}, file=str(_image(app, case))))
    assert "422" in msg and "no liver ROI" in msg
    source = nib.load(str(_image(app, case)))
    not_ct = tmp_path / "mr_like.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(0, 1, source.shape).astype(np.float32), source.affine), str(not_ct))
    msg = _error(lambda: client.infer(MODEL, "", {}, label_in=str(mask), file=str(not_ct)))
    assert "422" in msg and "HU" in msg
    msg = _error(lambda: client.infer(MODEL, case, {"pixel_threshold": "high"}))
    assert "422" in msg and "pixel_threshold" in msg
    # a study without a liver label
    client.upload_image(str(_image(app, case)), image_id="no_liver_study")
    msg = _error(lambda: client.infer(MODEL, "no_liver_study", {}))
    assert "422" in msg and "no liver ROI" in msg and "'liver'" in msg
    assert MODEL in client.info()["models"]  # still serving


def test_eight_concurrent_clients_each_with_its_threshold(app):
    """8 clients at once, half with the model's thresholds, half with thresholds so low that every scored voxel
    and slice is flagged: all succeed, and the client's choice shows in the label map."""
    from monailabel.client import MONAILabelClient

    case = _abnormal_case(app)
    low = {"pixel_threshold": -1e9, "slice_threshold": -1e9, "min_lesion_mm3": 0}

    def one(i):
        client = MONAILabelClient(app["url"], tmpdir=str(app["root"] / f"client{i}"))
        label_file, params = client.infer(MODEL, case, low if i % 2 else {})
        return i, _check_result(app, case, label_file, params), params

    info_seconds = []

    def info_while_running():
        time.sleep(2.0)  # the detectors are busy by now
        for _ in range(5):
            start = time.perf_counter()
            with urllib.request.urlopen(app["url"] + "/info/", timeout=60) as response:
                assert response.status == 200
            info_seconds.append(time.perf_counter() - start)
            time.sleep(0.5)

    with ThreadPoolExecutor(9) as pool:
        watcher = pool.submit(info_while_running)
        results = list(pool.map(one, range(8)))
        watcher.result()
    assert len(results) == 8
    assert max(info_seconds) < 3.0, info_seconds  # /info answers while the detectors run (it queued behind them before)
    default_voxels = {int(values.sum()) for i, values, _ in results if i % 2 == 0}
    low_voxels = {int(values.sum()) for i, values, _ in results if i % 2}
    assert len(default_voxels) == 1 and len(low_voxels) == 1  # the same answer for the same request
    assert low_voxels.pop() > default_voxels.pop()
    for i, _, params in results:
        if i % 2:
            assert params["thresholds"] == {"pixel": -1e9, "slice": -1e9, "extent": None}  # set by hand: outlined at itself
            assert len(params["abnormal_slices"]) == sum(s is not None for s in params["slice_scores"])


def _wait_for_training(client, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.train_status()
        if status and status.get("status") in ("DONE", "ERROR", "STOPPED"):
            return status
        time.sleep(2)
    raise TimeoutError("training did not finish")


def test_save_final_train_on_normals_and_infer_with_the_new_model(app):
    client, case = app["client"], _abnormal_case(app)
    # a radiologist's corrected segment: the phantom's lesion voxels
    lesion = nib.load(str(app["root"] / "phantom" / next(i["label"] for i in app["datalist"]["test"] if i["case_id"] == case)))
    corrected = app["root"] / "corrected.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(lesion.dataobj) == 2).astype(np.uint8), lesion.affine), str(corrected))
    saved = client.save_label(case, str(corrected), tag="final", params={"label_info": [{"name": "anomaly", "idx": 1}]})
    assert saved["label"] == case
    assert (app["studies"] / "labels" / "final" / f"{case}.nii.gz").is_file()

    model_file = app["models"] / f"{MODEL}.pt"
    mtime = model_file.stat().st_mtime
    task = client.train_start(MODEL, TINY)
    assert task["status"] in ("SUBMITTED", "RUNNING")
    status = _wait_for_training(client)
    details = "\n".join(status.get("details", []))
    assert status["status"] == "DONE", details
    assert "saved" in details  # progress lines reach the /train status
    assert model_file.stat().st_mtime > mtime
    log = app["log"].read_text()
    assert "studies marked normal" in log and "operating threshold on 1 corrected studies" in log

    stats = client.info()["train_stats"][MODEL]
    assert len(stats["normal_studies"]) == 3  # training + validation normals of the phantom datalist
    feedback = stats["feedback"]
    assert feedback["n_cases"] == 1 and feedback["dice_after"] >= feedback["dice_before"]

    _, after = client.infer(MODEL, case, {})  # the new model, no restart
    assert after["model"]["modified"] > mtime
    assert after["operating_point"]["pixel"] == pytest.approx(feedback["threshold_after"])
    assert after["operating_point"]["feedback"]["cases"] == [case]

    # the scoring step gives the same choice while the corrections are unchanged (and does not rewrite the model)
    mtime = model_file.stat().st_mtime
    request = urllib.request.Request(f"{app['url']}/scoring/feedback_threshold?run_sync=true", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        scored = json.loads(response.read())[MODEL]
    assert scored["threshold_after"] == pytest.approx(feedback["threshold_after"]) and scored["cases"] == [case]
    assert model_file.stat().st_mtime == mtime


def test_ddad_trains_on_the_normal_studies_and_takes_the_others_as_unlabelled(app):
    """The app's training of a detector that learns from unlabelled studies (DDAD): the studies marked normal are
    its normals, every other study with a liver mask is its unlabelled set (one whose mask cannot be read, the real
    series' organ map saved as its liver mask by an earlier test when the module runs whole, is left out with its
    reason, not the training), and the model it saves serves infer."""
    client, model = app["client"], "ddad_liver_ct"
    task = client.train_start(model, {"network_def#epochs": 1, "network_def#batch_size": 8})
    assert task["status"] in ("SUBMITTED", "RUNNING")
    status = _wait_for_training(client)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    stats = client.info()["train_stats"][model]
    assert len(stats["normal_studies"]) == 3
    assert {item["case_id"] for item in app["datalist"]["test"]} <= set(stats["unlabelled_studies"])
    assert not set(stats["unlabelled_studies"]) & set(stats["normal_studies"])
    if "real_series" in stats["unlabelled_studies"]:
        assert "left out of the unlabelled volumes" in app["log"].read_text()
    _, params = client.infer(model, _abnormal_case(app), {})
    assert any(s is not None for s in params["slice_scores"])


def test_best_dice_threshold_is_exact():
    from lib.scoring.feedback_threshold import best_dice_threshold

    rng = np.random.default_rng(0)
    truth = rng.random(500) < 0.1
    scores = rng.normal(0, 1, 500) + 2.0 * truth
    threshold, dice = best_dice_threshold(scores, truth)
    brute = max((2 * np.sum((scores >= t) & truth) / (np.sum(scores >= t) + truth.sum()), t) for t in np.unique(scores))
    assert dice == pytest.approx(brute[0]) and threshold == pytest.approx(brute[1])
    _, with_missed = best_dice_threshold(scores, truth, missed=10)
    assert with_missed < dice


def test_training_overrides_are_limited_to_named_hyper_parameters():
    from lib.trainers.normal_studies import bundle_hyper_parameters, check_request, config_overrides

    assert config_overrides({"model": "x", "network_def#image_size": 64, "preprocessing_config#window": [-100, 200]}) == {
        "network_def#image_size": 64, "preprocessing_config#window": [-100.0, 200.0]}  # fmt: skip
    own = bundle_hyper_parameters(label_server.PROJECT_ROOT / "bundles" / MODEL)
    assert {"network_def#image_size", "network_def#coreset_ratio"} <= own and "network_def#epochs" not in own
    for key in ("train#trainer#output", "network_def#_target_", "network_def#config_file", "network_def#backbone"):
        with pytest.raises(ValueError, match="cannot be set from a request"):
            config_overrides({key: "monai.bundle.run"})
    for value in ("$__import__('os').getcwd()", "@x", True, 10**9, 2.5, [64]):
        with pytest.raises(ValueError, match="network_def#image_size"):
            config_overrides({"network_def#image_size": value})
    with pytest.raises(ValueError, match="not a hyper-parameter of this detector"):
        config_overrides({"network_def#epochs": 3}, own)
    with pytest.raises(ValueError, match="not accepted"):
        check_request({"bundle_root": "/elsewhere"}, own)
    with pytest.raises(ValueError, match="device"):
        check_request({"device": "$x"}, own)


def test_a_training_request_is_refused_wherever_the_library_refuses_the_value_and_beyond_the_service_limits():
    from lib.trainers.normal_studies import SERVICE_LIMITS, config_overrides

    from monai_ad.detectors.base import check_hparams
    from monai_ad.settings import HPARAM_RANGES
    from monai_ad.transforms.pipeline import PreprocessConfig

    for name, limit in SERVICE_LIMITS.items():  # a service limit lies within the library's range
        library = HPARAM_RANGES[name]
        assert limit.integer == library.integer and limit.low >= library.low and limit.high <= library.high, name
    for key, values in {"image_size": [7, 8, 15, 16, 1024, 1025, 2.5], "coreset_ratio": [0, 1e-5, 1e-4, 1.0, 1.5],
                        "epochs": [0, 1, 10_000, 10_001, 10**9], "batch_size": [1024, 1025]}.items():  # fmt: skip
        for value in values:
            library = _accepted(lambda: check_hparams("patchcore" if key != "epochs" else "rd4ad", {key: value}))
            served = _accepted(lambda: config_overrides({f"network_def#{key}": value}))
            limit = SERVICE_LIMITS[key]
            assert served == (library and limit.low <= value <= limit.high), (key, value)
    for value in ([-160, 240], [240, -160], [-2000, 0], "soft"):
        library = _accepted(lambda: PreprocessConfig.from_dict({"window": value}))
        assert _accepted(lambda: config_overrides({"preprocessing_config#window": value})) == library, value


def _accepted(call) -> bool:
    try:
        call()
    except ValueError:
        return False
    return True
