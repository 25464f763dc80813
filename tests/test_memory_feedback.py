"""Corrections that teach at once: a radiologist's erased false positive becomes normal memory of PatchCore, PaDiM and
the fused detector (``remember_normal``), and through the MONAI Label app when a ``final`` label is saved; the
model's earlier version is kept and can be restored."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from monai_ad.detectors import AnomalyDetector, create_detector
from monai_ad.errors import InputError

from liver_slices import liver_like_slices
from test_app import MODEL as APP_MODEL
from test_app import app  # noqa: F401  (the module's MONAI Label server, as test_app starts it)

N_SLICES = 6
FP_CENTRE, LESION_CENTRE = (0.35, 0.4), (0.6, 0.65)  # fractions of the slice size (x, y)
CASES = {"patchcore": (96, {"coreset_ratio": 0.25}), "padim": (64, {}),
         "fused": (96, {"detector_hparams": {"coreset_ratio": 0.25}})}  # fmt: skip


def _disc(size, centre, radius):
    yy, xx = np.mgrid[:size, :size]
    return (xx - centre[0] * size) ** 2 + (yy - centre[1] * size) ** 2 < (radius * size) ** 2


def scan_with_structure(size, seed, lesion=False):
    """``N_SLICES`` normal liver-like slices holding a striped bright disc (normal-looking, but unlike anything in
    training: a false alarm) at ``FP_CENTRE``; with ``lesion``, the second half holds a dark round lesion at
    ``LESION_CENTRE`` instead. Returns the slices, their ROI, the structure and the lesion masks ``[N, S, S]``."""
    image, roi, _ = liver_like_slices("textured", N_SLICES, seed, False, size)
    structure = np.repeat(_disc(size, FP_CENTRE, 0.12)[None], N_SLICES, 0)
    lesion_mask = np.zeros_like(structure)
    if lesion:
        structure[N_SLICES // 2 :] = False
        lesion_mask[N_SLICES // 2 :] = _disc(size, LESION_CENTRE, 0.08)
    stripes = np.where((np.arange(size)[None, :] // 2) % 2 == 0, 0.85, 0.45) * np.ones((N_SLICES, size, 1))
    slices = image[:, 0].numpy().copy()
    slices[structure] = stripes[structure]
    slices[lesion_mask] = 0.42
    return torch.as_tensor(slices)[:, None], roi, structure, lesion_mask


@pytest.fixture(scope="module", params=sorted(CASES))
def fitted(request):
    name = request.param
    size, hparams = CASES[name]
    torch.manual_seed(0)
    train, train_roi, _ = liver_like_slices("textured", 48, 0, False, size)
    held_out, held_out_roi, _ = liver_like_slices("textured", 24, 1, False, size)
    detector = create_detector(name, image_size=size, **hparams)
    detector.fit([{"image": train[i : i + 8], "roi": train_roi[i : i + 8]} for i in range(0, 48, 8)], progress=False)
    detector.calibrate([{"image": held_out, "roi": held_out_roi}])
    return detector


def _in_plane():
    return ndimage.generate_binary_structure(3, 1) * np.array([0, 1, 0])[:, None, None].astype(bool)


def _peak(detector, image, roi, region):
    """The highest score of ``region`` ``[N, S, S]`` (a structure or a lesion)."""
    return float(detector.score(image, roi).pixel[torch.as_tensor(region)].max())


def test_an_erased_false_positive_is_remembered_and_a_lesion_still_scores_high(fitted, tmp_path):
    detector, size = fitted, fitted.image_size
    threshold = detector.thresholds["pixel"]
    first, roi, structure, _ = scan_with_structure(size, seed=11)
    second, second_roi, second_structure, lesion = scan_with_structure(size, seed=12, lesion=True)
    assert detector.learns_from_corrections
    assert _peak(detector, first, roi, structure) > threshold and _peak(detector, second, second_roi, second_structure) > threshold
    lesion_before = _peak(detector, second, second_roi, lesion)
    assert lesion_before > threshold

    # what the radiologist erased: the region the model flagged around the structure
    flagged = detector.score(first, roi).pixel > threshold
    erased = (flagged & torch.as_tensor(ndimage.binary_dilation(structure, iterations=6, structure=_in_plane())))[:, None]
    before_state = {k: v.clone() for k, v in detector._saved_state().items()}
    try:
        assert detector.remember_normal(first, roi, erased) > 0
        assert _peak(detector, second, second_roi, second_structure) < threshold  # the same false alarm on the next scan: gone
        assert _peak(detector, second, second_roi, lesion) > threshold  # the lesion elsewhere: still found
        path = detector.save(tmp_path / "model.pt")
        loaded = AnomalyDetector.load(path)
        for key, value in detector._saved_state().items():
            assert torch.equal(loaded._saved_state()[key], value), key
        assert torch.allclose(loaded.score(second, second_roi).pixel, detector.score(second, second_roi).pixel)
    finally:  # the module's detector is shared by the tests: put its memory back
        detector._load_saved_state(before_state)


def test_pixels_near_a_kept_lesion_are_never_taught(fitted):
    detector, size = fitted, fitted.image_size
    image, roi, _, lesion = scan_with_structure(size, seed=12, lesion=True)
    lesion_t = torch.as_tensor(lesion)[:, None]
    # an erased ring around the lesion: every cell it covers touches the lesion, so nothing is added
    ring = torch.as_tensor(ndimage.binary_dilation(lesion, iterations=2, structure=_in_plane()) & ~lesion)[:, None]
    assert detector.remember_normal(image, roi, ring, avoid=lesion_t) == 0


def test_bad_corrections_are_refused_in_one_line(fitted):
    image, roi, _, _ = scan_with_structure(fitted.image_size, seed=11)
    with pytest.raises(InputError, match="correction mask"):
        fitted.remember_normal(image, roi, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    unfitted = create_detector("patchcore", image_size=fitted.image_size)
    with pytest.raises(InputError, match="not fitted"):
        unfitted.remember_normal(image[:, :1], roi, roi)


def test_detectors_without_a_memory_refuse_corrections():
    detector = create_detector("intensity", image_size=32)
    assert not detector.learns_from_corrections
    with pytest.raises(InputError, match="no memory"):
        detector.remember_normal(torch.zeros(1, 1, 32, 32), None, torch.zeros(1, 1, 32, 32, dtype=torch.bool))


# ----------------------------------------------------------------------------- through the MONAI Label app
def _labelled(client, case):
    import nibabel as nib

    label_file, params = client.infer(APP_MODEL, case, {})
    return nib.load(label_file).get_fdata() > 0, params


def _scoring(url, method, body):
    import json
    import urllib.request

    request = urllib.request.Request(f"{url}/scoring/{method}?run_sync=true", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=180) as response:
        return json.loads(response.read())


def _wait_for(condition, timeout=180):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(1)
    raise TimeoutError("the memory update did not finish")


def test_saving_a_corrected_label_teaches_the_served_model_at_once_and_undo_restores_it(app, tmp_path):
    import nibabel as nib

    from monai_ad.data.datalists import LESION_LABEL
    from conftest import with_inserted_lesion

    client, studies, models = app["client"], app["studies"], app["models"]
    items = {i["case_id"]: i for section in ("training", "validation", "test") for i in app["datalist"][section]}
    lesions = {c: np.asarray(nib.load(str(app["root"] / "phantom" / i["label"])).dataobj) == LESION_LABEL for c, i in items.items()}
    served = {case: _labelled(client, case)[0] for case in items}
    false_voxels = {case: int((served[case] & ~lesions[case]).sum()) for case in items}
    case = max(false_voxels, key=false_voxels.get)  # the study with the largest false alarm
    assert false_voxels[case] > 0

    # a clear lesion elsewhere (uploaded with its liver mask): found before the correction
    data = app["root"] / "phantom"
    item = with_inserted_lesion(data, next(i for i in app["datalist"]["test"] if not i["abnormal"] and i["case_id"] != case))
    truth = np.asarray(nib.load(str(data / item["label"])).dataobj)
    liver = tmp_path / "liver.nii.gz"
    nib.save(nib.Nifti1Image((truth > 0).astype(np.uint8), nib.load(str(data / item["label"])).affine), str(liver))

    def lesion_found():
        label_file, _ = client.infer(APP_MODEL, "", {}, label_in=str(liver), file=str(data / item["image"]))
        return int(((nib.load(label_file).get_fdata() > 0) & (truth == LESION_LABEL)).sum())

    lesion_before = lesion_found()
    assert lesion_before > 0

    # the radiologist erases the false alarm and keeps the study's true lesion voxels
    model_file = models / f"{APP_MODEL}.pt"
    original = model_file.read_bytes()
    corrected = tmp_path / "final.nii.gz"
    image = nib.load(str(studies / f"{case}.nii.gz"))
    nib.save(nib.Nifti1Image((served[case] & lesions[case]).astype(np.uint8), image.affine), str(corrected))
    saved = client.save_label(case, str(corrected), tag="final", params={"model": APP_MODEL})
    assert saved["memory_update"]["models"] == [APP_MODEL]
    version = models / "versions" / APP_MODEL / "v0001.pt"
    _wait_for(lambda: version.is_file() and model_file.read_bytes() != original)
    assert version.read_bytes() == original  # the previous model, kept as a numbered version
    assert "features added to the memory" in app["log"].read_text()

    after, params = _labelled(client, case)  # the next reading, without retraining or a restart
    assert int((after & ~lesions[case]).sum()) <= false_voxels[case] // 4
    assert params["operating_point"]["memory_feedback"]["taught"].keys() == {case}
    assert lesion_found() >= 0.9 * lesion_before  # the true lesion elsewhere is still found

    # the scoring run finds nothing left to teach; undo restores the model before the update
    assert _scoring(app["url"], "feedback_memory", {"model": APP_MODEL})[APP_MODEL]["added"] == 0
    undone = _scoring(app["url"], "undo_memory_update", {"model": APP_MODEL})
    assert undone[APP_MODEL] == {"restored": "v0001.pt", "versions_left": 0}
    assert model_file.read_bytes() == original and not version.exists()
    assert int((_labelled(client, case)[0] & ~lesions[case]).sum()) == false_voxels[case]
