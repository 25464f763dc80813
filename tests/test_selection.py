"""Weakly-supervised hyper-parameter selection: folds over patients, one-type anomalies, the `select` command."""

import csv
import json

import numpy as np
import pytest

from monai_ad.cli import main
from monai_ad.run_config import load_run_config
from monai_ad.detectors import create_detector
from monai_ad.errors import InputError
from monai_ad.selection import expand_grid, fold_splits, one_kind_anomalies, patient_of

# the cheapest DPA that still trains: 16-px slices, no progressive growing, two iterations
TINY_DPA = ["image_size=16", "start_resolution=16", "final_iters=2", "batch_size=4", "sigma=0"]


def items(n, prefix="n", **extra):
    return [{"image": f"/data/{prefix}{i}.nii.gz", "case_id": f"{prefix}{i}", **extra} for i in range(n)]


def test_folds_hold_out_disjoint_patients():
    normals = items(10) + [{"image": "/data/n0_second_scan.nii.gz", "patient": "n0"}]
    anomalies = items(4, "a", label="/l.nii.gz")
    splits = fold_splits(normals, anomalies, folds=3, validation_fraction=0.2, seed=0)
    assert len(splits) == 3
    held = [{patient_of(i) for i in s["validation"]} for s in splits]
    assert all(len(h) == 2 for h in held)  # 20 % of 10 patients
    assert not (held[0] & held[1]) and not (held[1] & held[2]) and not (held[0] & held[2])
    for s, h in zip(splits, held):
        train = {patient_of(i) for i in s["train"]}
        assert not (train & h) and len(train) + len(h) == 10
        if "n0" in h:  # both scans of a patient stay together
            assert len(s["validation"]) == 3
    assert sorted(patient_of(a) for s in splits for a in s["anomalies"]) == ["a0", "a1", "a2", "a3"]  # split by patient
    few = fold_splits(normals, anomalies[:1], folds=3)
    assert all(len(s["anomalies"]) == 1 for s in few)  # fewer anomaly patients than folds: all in every fold
    with pytest.raises(InputError, match="at least 2 training-normal patients"):
        fold_splits(items(1), anomalies)
    with pytest.raises(InputError, match="validation_fraction"):
        fold_splits(normals, anomalies, validation_fraction=1.5)


def test_validation_anomalies_are_of_one_type():
    hypo = {"label": "l.nii.gz", "lesions": [{"kind": "hypodense"}]}
    mixed = {"label": "l.nii.gz", "lesions": [{"kind": "hypodense"}, {"kind": "cyst"}]}
    cases = [dict(image="a.nii.gz", **hypo), dict(image="b.nii.gz", **mixed), dict(image="c.nii.gz", label="l.nii.gz", lesions=[{"kind": "cyst"}])]
    assert [c["image"] for c in one_kind_anomalies(cases, "hypodense")] == ["a.nii.gz"]
    with pytest.raises(InputError, match="of one type"):
        one_kind_anomalies(cases, None)
    with pytest.raises(InputError, match="only 'rim' lesions"):
        one_kind_anomalies(cases, "rim")
    listed = [{"image": "x.nii.gz", "label": "x_label.nii.gz"}]  # the user's own list: taken as it is
    assert one_kind_anomalies(listed, None) == listed
    with pytest.raises(InputError, match="labelled anomaly cases"):
        one_kind_anomalies([{"image": "x.nii.gz"}], None)
    assert expand_grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    with pytest.raises(InputError, match="non-empty list"):
        expand_grid({"a": []})


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from monai_ad.data.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_normal=5, n_abnormal=1, preset="tiny", progress=False)


def test_select_command_writes_its_report_and_picks_by_auroc(phantom, tmp_path, capsys):
    out = tmp_path / "selection"
    args = ["select", "--datalist", str(phantom), "--out", str(out), "--folds", "2", "--phantom-anomalies", "2",
            "--lesion-kind", "hypodense", "--grid", "latent_dim=2,8", "--quiet"]  # fmt: skip
    for pair in TINY_DPA:
        args += ["--set", pair]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "selection.json").read_text())
    rows = report["candidates"]
    assert [r["hparams"] for r in rows] == [{"latent_dim": 2}, {"latent_dim": 8}]
    assert all(len(r["fold_auroc"]) == 2 and all(0.0 <= a <= 1.0 for a in r["fold_auroc"]) for r in rows)
    assert all(r["mean_auroc"] == pytest.approx(np.mean(r["fold_auroc"])) for r in rows)
    best = max(rows, key=lambda r: (r["mean_auroc"], -r["index"]))
    assert report["chosen"]["index"] == best["index"]
    assert report["lesion_kind"] == "hypodense" and len(report["anomalies"]) == 2
    assert all(s["validation"] == 1 and s["train"] == 2 for s in report["fold_sizes"])  # 20 % of 3 patients → 1
    with open(out / "selection.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["chosen"]) for r in table] == [int(r["index"] == best["index"]) for r in rows]
    assert float(table[1]["mean_auroc"]) == pytest.approx(rows[1]["mean_auroc"])
    config = load_run_config(str(out / "config.json"))  # what `monai-ad train --config` reads
    assert config["detector"] == "dpa" and config["hparams"]["latent_dim"] == best["hparams"]["latent_dim"]
    assert config["preprocessing"]["image_size"] == 16
    assert create_detector(config["detector"], **config["hparams"]).hparams["latent_dim"] == best["hparams"]["latent_dim"]
    printed = capsys.readouterr().out
    assert f"* {json.dumps(best['hparams'])}" in printed


def test_select_bad_input_is_one_line_and_writes_nothing(phantom, tmp_path, capsys):
    out = tmp_path / "nothing"
    # the phantom's validation section holds normal volumes only
    code = main(["select", "--datalist", str(phantom), "--out", str(out), "--anomaly-section", "validation", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "no labelled anomaly cases" in err and "datalist.json" in err
    assert main(["select", "--datalist", str(phantom), "--out", str(out), "--grid", "latent_dim", "--quiet"]) == 2
    assert "--grid must be KEY=V1,V2" in capsys.readouterr().err
    assert main(["select", "--datalist", str(phantom), "--out", str(out), "--phantom-anomalies", "1", "--quiet"]) == 2
    assert "--lesion-kind" in capsys.readouterr().err
    assert main(["select", "--datalist", str(tmp_path / "missing.json"), "--out", str(out), "--quiet"]) == 2
    assert "missing.json" in capsys.readouterr().err
    code = main(["select", "--datalist", str(phantom), "--out", str(out), "--phantom-anomalies", "1",
                 "--lesion-kind", "hypodense", "--grid", "latent_dim=2", "--set", "image_size=48", "--quiet"])  # fmt: skip
    assert code == 2 and "powers of two" in capsys.readouterr().err
    assert not (out / "selection.json").exists() and not (out / "config.json").exists()



def test_select_fits_with_the_settings_train_fits_and_scores_with(phantom, tmp_path, monkeypatch, capsys):
    """A detector that reads its pre-processing while fitting (the intensity detector: pixel size, liver fill)
    sees, in every selection fit, the settings ``train`` fits it with, and the chosen config records them."""
    from monai_ad.detectors.intensity import IntensityDeviation
    from monai_ad.training import detector_preprocessing

    seen = []
    fit = IntensityDeviation._fit

    def recording_fit(self, batches, progress):
        seen.append(dict(self.preprocessing))
        return fit(self, batches, progress)

    monkeypatch.setattr(IntensityDeviation, "_fit", recording_fit)
    out = tmp_path / "selection"
    args = ["select", "--detector", "intensity", "--datalist", str(phantom), "--out", str(out), "--folds", "2",
            "--phantom-anomalies", "2", "--lesion-kind", "hypodense", "--grid", "min_width_mm=0,3",
            "--set", "image_size=32", "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    expected = detector_preprocessing("intensity", None, 32).to_dict()
    assert expected["outside_fill"] == "liver"  # the detector's own default, which the bare pipeline lacks
    assert len(seen) == 4 and all(s == expected for s in seen)  # 2 candidates x 2 folds
    assert load_run_config(str(out / "config.json"))["preprocessing"] == expected
