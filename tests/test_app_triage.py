"""The app's ``most_abnormal`` next-sample strategy, for real: a ``monailabel start_server`` on 127.0.0.1 (started as
tests/test_app.py starts one) over phantom studies, driven by ``MONAILabelClient``. Handing out a study, saving its
``final`` label and asking again walks the studies in the order of ``monai-ad triage``'s worklist."""

import json
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest

from monai_ad import label_server
from monai_ad.cli import main
from monai_ad.training import train

MODEL = "intensity_liver_ct"

sys.path.insert(0, str(label_server.APP_DIR))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from monailabel.client import MONAILabelClient

    root = tmp_path_factory.mktemp("app_triage")
    studies = label_server.prepare_sample_studies(root, n_normal=12, n_abnormal=3, preset="tiny", progress=False)
    models = root / "models"
    datalist = root / "phantom" / "datalist.json"
    train("intensity", datalist, models / f"{MODEL}.pt", device="cpu", progress=False)
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
    process, url = label_server.start_server(
        studies, conf={"model_dir": str(models), "models": MODEL, "triage_model": MODEL}, log_path=root / "server.log", env=env
    )
    try:
        yield {"client": MONAILabelClient(url, tmpdir=str(root / "client")), "root": root, "studies": studies,
               "model": models / f"{MODEL}.pt", "datalist": json.loads(datalist.read_text())}  # fmt: skip
    finally:
        label_server.stop_server(process)


def _triage_order(app, cases, tmp_path):
    folder = tmp_path / "pending"
    folder.mkdir()
    for case in cases:
        shutil.copy(app["studies"] / f"{case}.nii.gz", folder / f"{case}.nii.gz")
    out = tmp_path / "worklist"
    args = ["--quiet", "triage", "--model", str(app["model"]), "--studies", str(folder), "--roi", str(app["root"] / "liver_masks"), "--out", str(out)]
    assert main(args) == 0
    return json.loads((out / "worklist.json").read_text())["studies"]


def test_next_sample_walks_the_triage_worklist(app, tmp_path):
    client = app["client"]
    assert "most_abnormal" in client.info()["strategies"] and "random" in client.info()["strategies"]
    pending = [item["case_id"] for item in app["datalist"]["test"]]  # the studies not marked normal
    worklist = _triage_order(app, pending, tmp_path)
    assert [row["status"] for row in worklist] == ["ok"] * len(pending)
    handed = []
    for _ in range(len(pending) + 1):
        answer = client.next_sample("most_abnormal", {})
        if not answer.get("id"):
            break
        row = next(row for row in worklist if row["study"] == answer["id"])
        assert answer["score"] == pytest.approx(row["study_score"], rel=1e-5)
        assert answer["p_value"] == (None if row["p_value"] is None else pytest.approx(row["p_value"]))
        assert answer["model"] == MODEL and answer["studies_left"] == len(pending) - len(handed)
        handed.append(answer["id"])
        image = nib.load(str(app["studies"] / f"{answer['id']}.nii.gz"))
        reviewed = tmp_path / f"{answer['id']}_final.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), str(reviewed))
        client.save_label(answer["id"], str(reviewed), tag="final")  # reviewed: not handed out again
    assert handed == [row["study"] for row in worklist]
    assert any(item["abnormal"] for item in app["datalist"]["test"] if item["case_id"] == handed[0])


def test_infer_result_holds_the_study_score(app):
    case = app["datalist"]["test"][0]["case_id"]
    _, params = app["client"].infer(MODEL, case, {})
    scores = [s for s in params["slice_scores"] if s is not None]
    assert params["study_score"] == pytest.approx(max(scores))
    assert "p_value" in params and (params["p_value"] is None or 0.0 < params["p_value"] <= 1.0)
