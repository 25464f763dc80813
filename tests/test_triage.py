"""``monai-ad triage``: a worklist of phantom studies ranked by abnormality (CSV, JSON, HTML), failing studies as
rows with their reason, and ``infer``'s picture of an unlabelled scan."""

import base64
import csv
import json
import re
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import with_inserted_lesion
from monai_ad.cli import main
from monai_ad.label_server import free_port
from monai_ad.training import train
from monai_ad import triage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def worklist(tmp_path_factory):
    """Two normal test studies, two phantom studies with lesions, the normal two with a 12 mm hypodense sphere, one unreadable file and one whose mask
    holds no liver; the intensity baseline trained on the normals; ``monai-ad triage`` over them."""
    root = tmp_path_factory.mktemp("triage")
    assert main(["--quiet", "phantom", "--out", str(root / "data"), "--normal", "12", "--abnormal", "2", "--preset", "tiny"]) == 0
    data = root / "data"
    content = json.loads((data / "datalist.json").read_text())
    model = root / "intensity.pt"
    train("intensity", data / "datalist.json", model, device="cpu", progress=False)
    studies, masks = root / "studies", root / "masks"
    studies.mkdir(), masks.mkdir()
    normals = [item for item in content["test"] if not item["abnormal"]]
    abnormal = [item for item in content["test"] if item["abnormal"]]
    assert len(normals) == 2 and len(abnormal) == 2
    cases = {}
    for item in [*normals, *abnormal, *(with_inserted_lesion(data, item) for item in normals)]:
        image, label = nib.load(str(data / item["image"])), nib.load(str(data / item["label"]))
        nib.save(image, str(studies / f"{item['case_id']}.nii.gz"))
        liver = (np.asarray(label.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(liver, label.affine), str(masks / f"{item['case_id']}.nii.gz"))
        cases[item["case_id"]] = item.get("abnormal", True)  # an inserted lesion copy has no flag
    (studies / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    nib.save(nib.Nifti1Image(np.zeros(liver.shape, np.uint8), label.affine), str(masks / "broken.nii.gz"))
    nib.save(image, str(studies / "no_liver.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(liver.shape, np.uint8), label.affine), str(masks / "no_liver.nii.gz"))
    out = root / "out"
    code = main(["--quiet", "triage", "--model", str(model), "--studies", str(studies), "--roi", str(masks), "--out", str(out)])
    assert code == 0
    return {"root": root, "model": model, "studies": studies, "masks": masks, "out": out, "with_lesion": cases}


def _rows(worklist):
    return json.loads((worklist["out"] / "worklist.json").read_text())["studies"]


def test_studies_with_a_lesion_rank_first_and_failures_last(worklist):
    rows = _rows(worklist)
    assert [row["rank"] for row in rows] == list(range(1, 9))
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(ok) == 6 and all(row["status"] != "ok" for row in rows[6:])
    ranked = [worklist["with_lesion"][row["study"]] for row in ok]
    assert ranked == [True] * 4 + [False] * 2, [(row["study"], row["study_score"], row["p_value"]) for row in ok]
    scores = [row["study_score"] for row in ok]
    assert scores == sorted(scores, reverse=True)  # no conformal calibration here: by study score


def test_a_failing_study_is_a_row_with_its_reason(worklist):
    failed = {row["study"]: row for row in _rows(worklist) if row["status"] != "ok"}
    assert set(failed) == {"broken", "no_liver"}
    for row in failed.values():
        assert row["status"] and "\n" not in row["status"] and row["study_score"] is None and row["top_slices"] == []
    assert "broken.nii.gz" in failed["broken"]["status"]


def test_rows_read_the_written_summaries(worklist):
    for row in _rows(worklist):
        if row["status"] != "ok":
            continue
        summary = json.loads((worklist["out"] / "studies" / f"{row['study']}_summary.json").read_text())
        scores = np.array([np.nan if s is None else s for s in summary["slice_scores"]], dtype=float)
        assert row["study_score"] == pytest.approx(summary.get("study_score") or np.nanmax(scores))
        assert row["top_slices"] == [int(z) for z in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:3]]
        assert row["lesion_count"] == len(summary["lesions"])
        if summary["lesions"]:
            assert row["largest_lesion_mm3"] == pytest.approx(max(lesion["volume_mm3"] for lesion in summary["lesions"]))
        else:
            assert row["largest_lesion_mm3"] is None


def test_csv_and_html_hold_the_same_worklist(worklist):
    rows = _rows(worklist)
    with open(worklist["out"] / "worklist.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == list(triage.COLUMNS)
    assert [r["study"] for r in table] == [r["study"] for r in rows]
    assert [r["status"] for r in table] == [r["status"] for r in rows]
    for line, row in zip(table, rows):
        assert line["top_slices"] == " ".join(str(z) for z in row["top_slices"])
        if row["study_score"] is not None:
            assert float(line["study_score"]) == pytest.approx(row["study_score"], rel=1e-3)
    page = (worklist["out"] / "worklist.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # self-contained
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 6  # one per scored study
    for encoded in images:
        width, height = png_size(base64.b64decode(encoded))
        assert 200 <= width <= 800 and 100 <= height <= 800
    order = [page.index(f"<td>{row['study']}</td>") for row in rows]
    assert order == sorted(order)
    assert all(row["status"] in page for row in rows)


def test_worklist_is_written_all_or_nothing(worklist, tmp_path, monkeypatch):
    rows = triage.rank_rows(_rows(worklist))
    first = triage.write_worklist(rows, tmp_path)
    before = {kind: open(path, "rb").read() for kind, path in first.items()}

    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(triage, "worklist_html", fail)
    with pytest.raises(RuntimeError):
        triage.write_worklist(rows[:2], tmp_path)
    assert {kind: open(path, "rb").read() for kind, path in first.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worklist.csv", "worklist.html", "worklist.json"]


def test_ranking_prefers_the_p_value_and_breaks_ties_by_score():
    def row(study, score, p_value, status="ok"):
        return {"study": study, "study_score": score, "p_value": p_value, "status": status}

    ranked = triage.rank_rows([row("a", 5.0, 0.5), row("b", 1.0, 0.01), row("c", 2.0, 0.5), row("d", None, None, "unreadable"),
                               row("e", 9.0, 0.5)])  # fmt: skip
    assert [r["study"] for r in ranked] == ["b", "e", "a", "c", "d"]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4, 5]


def test_infer_writes_a_picture_of_the_top_slices(worklist, tmp_path, capsys):
    case = next(name for name, lesion in worklist["with_lesion"].items() if lesion)
    image, mask = worklist["studies"] / f"{case}.nii.gz", worklist["masks"] / f"{case}.nii.gz"
    assert main(["--quiet", "infer", "--model", str(worklist["model"]), "--image", str(image), "--roi", str(mask), "--out", str(tmp_path)]) == 0
    picture = tmp_path / f"{case}_picture.png"
    assert f"picture: {picture}" in capsys.readouterr().out
    width, height = png_size(picture.read_bytes())
    assert width == 1600 and 300 <= height <= 1200  # one row of the most abnormal slices


def test_infer_goes_on_when_a_picture_cannot_be_drawn(worklist, tmp_path, capsys, monkeypatch):
    """The picture is a view of outputs already written: when it fails, infer warns in one line and goes on."""
    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(triage, "write_scan_picture", broken)
    cases = sorted(worklist["with_lesion"])[:2]
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for case in cases:
        (images / f"{case}.nii.gz").symlink_to(worklist["studies"] / f"{case}.nii.gz")
        (masks / f"{case}.nii.gz").symlink_to(worklist["masks"] / f"{case}.nii.gz")
    out = tmp_path / "out"
    assert main(["--quiet", "infer", "--model", str(worklist["model"]), "--image", str(images), "--roi", str(masks), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("warning: no picture: OSError: no space left on device") == len(cases)
    for case in cases:
        assert (out / f"{case}_anomaly-label.nii.gz").is_file() and not (out / f"{case}_picture.png").exists()


def test_triage_of_a_dicomweb_store(worklist, real_ct, tmp_path):
    """The real CT series in a local Orthanc: listed (QIDO-RS), retrieved (WADO-RS) and scored, its liver mask the
    organ map named by its SeriesInstanceUID; a store series without a mask would be a row with its reason."""
    import shutil

    from monai_ad import dicomweb

    if shutil.which("Orthanc") is None or not Path(dicomweb.ORTHANC_PLUGIN).is_file():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed")
    process, url = dicomweb.start_orthanc(tmp_path / "orthanc", free_port())
    try:
        uids = dicomweb.ingest_series(real_ct / "example_ct_dicom", url)
        masks = tmp_path / "masks"
        masks.mkdir()
        shutil.copy(real_ct / "example_seg_dicom.nii.gz", masks / f"{uids.series}.nii.gz")
        out = tmp_path / "out"
        args = ["--quiet", "triage", "--model", str(worklist["model"]), "--studies", url, "--roi", str(masks), "--roi-label", "5", "--out", str(out)]
        assert main(args) == 0
        rows = json.loads((out / "worklist.json").read_text())["studies"]
        assert [(row["study"], row["status"]) for row in rows] == [(uids.series, "ok")]
        assert rows[0]["image"] == f"{url}/studies/{uids.study}/series/{uids.series}"
        assert (out / "studies" / f"{uids.series}_summary.json").is_file()

        (masks / f"{uids.series}.nii.gz").unlink()  # no mask for the series: its row says so
        assert main([*args[:-2], "--out", str(tmp_path / "out2")]) == 0
        rows = json.loads((tmp_path / "out2" / "worklist.json").read_text())["studies"]
        assert rows[0]["status"] != "ok" and "liver mask" in rows[0]["status"]
    finally:
        process.terminate()
        process.wait(timeout=20)

