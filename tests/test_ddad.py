"""DDAD on the CPU: its autoencoder, loss and maps against hand computations, the unlabelled slices reaching the UDM
(through ``fit`` and through a datalist's ``unlabelled`` section), training without them, a fitted save/load round
trip, the phantom ranking with lesion slices among the unlabelled ones, and bad settings."""

import json
import logging

import pytest
import torch
from sklearn.metrics import roc_auc_score

from liver_slices import liver_like_slices, slice_data
from monai_ad.data.datalists import load_unlabelled, with_unlabelled_section
from monai_ad.detectors import AnomalyDetector, create_detector
from monai_ad.components.maps import mean_in_roi_map
from monai_ad.detectors.ddad.detector import resize_slices
from monai_ad.detectors.ddad.torch_model import (
    DDADAutoencoder,
    inter_discrepancy,
    intra_discrepancy,
    reconstruction_loss,
)
from monai_ad.errors import InputError

TINY = {"image_size": 32, "input_size": 32, "width": 4, "fc_width": 32, "latent_dim": 4, "epochs": 1, "batch_size": 4}


def _slices(n, seed, lesion=False, size=32):
    image, roi, _ = liver_like_slices("smooth", n, seed=seed, lesion=lesion, size=size)
    return image, roi


def test_the_autoencoder_has_the_papers_shape_and_outputs_a_log_variance():
    network = DDADAutoencoder(64, channels=1)
    convolutions = [m for m in network.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convolutions] == [16, 32, 64, 64]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convolutions)
    linears = [m for m in network.to_latent if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(64 * 4 * 4, 2048), (2048, 16)]
    network.eval()
    reconstruction, log_var = network(torch.rand(3, 1, 64, 64))
    assert reconstruction.shape == log_var.shape == (3, 1, 64, 64)
    plain = DDADAutoencoder(64, channels=3, uncertainty=False).eval()
    reconstruction, log_var = plain(torch.rand(2, 3, 64, 64))
    assert reconstruction.shape == (2, 3, 64, 64) and log_var is None


def test_loss_and_maps_match_hand_computations():
    x, r, v = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.allclose(reconstruction_loss(x, r, None), ((x - r) ** 2).mean())
    assert torch.allclose(reconstruction_loss(x, r, v), (torch.exp(-v) * (x - r) ** 2 + v).mean())
    ndm, udm, log_var = torch.rand(3, 2, 1, 4, 4), torch.rand(3, 2, 1, 4, 4), torch.randn(3, 2, 1, 4, 4)
    mean_n, mean_u = ndm.mean(0), udm.mean(0)
    assert torch.allclose(intra_discrepancy(ndm), ((ndm - mean_n) ** 2).sum(0).div(2).sqrt())
    assert torch.allclose(inter_discrepancy(ndm, udm), (mean_u - mean_n).abs())
    assert torch.allclose(inter_discrepancy(ndm, udm, log_var), (mean_u - mean_n).abs() / log_var.exp().mean(0).sqrt())
    pixel = torch.arange(8.0).view(2, 2, 2)
    roi = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [0, 0]]], dtype=torch.bool)[:, None]
    assert torch.equal(mean_in_roi_map(pixel, roi), torch.tensor([1.5, 5.5]))  # an empty ROI: the whole map
    assert torch.equal(mean_in_roi_map(pixel, None), torch.tensor([1.5, 5.5]))
    assert resize_slices(torch.rand(1, 1, 64, 64), 32).shape == (1, 1, 32, 32)


def test_maps_have_the_slice_size_when_the_networks_run_smaller():
    detector = create_detector("ddad", **{**TINY, "image_size": 48, "input_size": 16})
    image, roi = _slices(6, seed=0, size=48)
    detector.fit([{"image": image, "roi": roi}], progress=False)
    scores = detector.score(image, roi)
    assert scores.pixel.shape == (6, 48, 48) and scores.slice.shape == (6,)
    assert torch.allclose(scores.slice, mean_in_roi_map(scores.pixel, roi))


def test_the_unlabelled_slices_reach_the_udm_only():
    image, roi = _slices(8, seed=0)
    extra, extra_roi = _slices(4, seed=1, lesion=True)
    torch.manual_seed(0)
    without = create_detector("ddad", **TINY).fit([{"image": image, "roi": roi}], progress=False)
    torch.manual_seed(0)
    with_them = create_detector("ddad", **TINY).fit([{"image": image, "roi": roi}], progress=False,
                                                   unlabelled=[{"image": extra, "roi": extra_roi}])  # fmt: skip
    assert (int(without.ndm_slices), int(without.udm_slices)) == (8, 8)
    assert (int(with_them.ndm_slices), int(with_them.udm_slices)) == (8, 12)
    a, b = without.state_dict(), with_them.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("ndm."))  # the NDM never sees them
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("udm."))
    assert len(with_them.ndm_losses) == len(with_them.udm_losses) == 3


def test_without_unlabelled_slices_it_trains_and_warns_in_one_line(caplog):
    image, roi = _slices(6, seed=0)
    with caplog.at_level(logging.WARNING, logger="monai_ad.detectors.ddad.detector"):
        detector = create_detector("ddad", **TINY).fit([{"image": image, "roi": roi}], progress=False)
    assert detector.is_fitted
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["ddad: no unlabelled slices given; the UDM is trained on the normal slices only"]


def test_a_detector_without_the_hook_refuses_unlabelled_slices():
    image, roi = _slices(4, seed=0)
    with pytest.raises(InputError, match="the padim detector learns from normal slices only"):
        create_detector("padim", image_size=32).fit([{"image": image}], unlabelled=[{"image": image}], progress=False)


def test_a_fitted_detector_scores_the_same_after_save_and_load(tmp_path):
    image, roi = _slices(8, seed=0)
    extra, extra_roi = _slices(4, seed=1, lesion=True)
    held, held_roi = _slices(4, seed=2)
    test, test_roi = _slices(3, seed=3, lesion=True)
    for score_map in ("inter", "intra"):
        torch.manual_seed(0)
        detector = create_detector("ddad", **TINY, score_map=score_map)
        detector.fit([{"image": image, "roi": roi}], unlabelled=[{"image": extra, "roi": extra_roi}], progress=False)
        detector.calibrate([{"image": held, "roi": held_roi}])
        loaded = AnomalyDetector.load(detector.save(tmp_path / f"ddad_{score_map}.pt"))
        assert loaded.name == "ddad" and loaded.is_fitted and loaded.thresholds == detector.thresholds
        assert int(loaded.udm_slices) == 12 and loaded.hparams == detector.hparams
        before, after = detector.score(test, test_roi), loaded.score(test, test_roi)
        assert torch.equal(before.pixel, after.pixel) and torch.equal(before.slice, after.slice)
        assert before.pixel.std() > 0


# the networks at 32 px (upsampled to the 64-px slices), four times the paper's lr and 200 epochs of batches of 8
RANKING = {"input_size": 32, "epochs": 200, "batch_size": 8, "lr": 2e-3}


def test_lesion_slices_outrank_normal_slices_when_the_unlabelled_slices_hold_them():
    """The paper's setting on phantom slices, transductively: the scored slices, 6 with a lesion and 6 normal, are the
    unlabelled ones the UDM also learns (the NDM learns the 24 training normals only). The inter-discrepancy then
    marks the lesions (pixel AUROC in the liver) and ranks the lesion slices above the normal ones (slice AUROC and
    mean score). At this budget not every lesion slice is above every normal one: the slice score is the map's
    mean over the whole liver, of which the lesion is a few per cent."""
    data = slice_data("smooth", 64)
    image, roi, lesion = data["abnormal"]
    normal_image, normal_roi = data["normal"]
    unlabelled = [{"image": torch.cat([image, normal_image]), "roi": torch.cat([roi, normal_roi])}]
    torch.manual_seed(0)
    detector = create_detector("ddad", image_size=64, **RANKING)
    detector.fit(data["train"], unlabelled=unlabelled, progress=False)
    abnormal, normal = detector.score(image, roi), detector.score(normal_image, normal_roi)
    assert abnormal.pixel.shape == (6, 64, 64) and torch.isfinite(abnormal.pixel).all()
    inside = roi[:, 0].numpy()
    pixel_auroc = roc_auc_score(lesion[inside], abnormal.pixel.numpy()[inside])
    slice_auroc = roc_auc_score([1] * 6 + [0] * 6, torch.cat([abnormal.slice, normal.slice]).numpy())
    assert pixel_auroc > 0.8, f"in-liver pixel AUROC {pixel_auroc:.3f}"
    assert slice_auroc > 0.7 and abnormal.slice.mean() > normal.slice.mean(), (
        f"slice AUROC {slice_auroc:.3f}; lesion slices {abnormal.slice} vs normal {normal.slice}"
    )


def test_a_datalist_unlabelled_section_is_read_and_given_to_the_udm(tmp_path, caplog):
    """``training.train`` passes a datalist's ``unlabelled`` section to DDAD; without one it still trains (UDM on the
    normals), and a detector without the hook never reads it."""
    from monai_ad.data.phantom import write_phantom_dataset
    from monai_ad.training import train

    datalist = write_phantom_dataset(tmp_path / "data", n_normal=4, n_abnormal=3, preset="tiny", progress=False)
    mixed = with_unlabelled_section(datalist, 0.5, seed=1)
    content, original = json.loads(open(mixed).read()), json.loads(open(datalist).read())
    assert len(content["unlabelled"]) == 2 and len(content["test"]) == len(original["test"]) - 2
    assert all(set(item) == {"case_id", "image", "roi"} for item in content["unlabelled"])
    assert all(not item["image"].startswith("/") for item in content["unlabelled"])  # relative, as they were
    items = load_unlabelled(mixed)
    assert len(items) == 2 and all(item["image"].startswith(str(tmp_path)) for item in items)

    settings = {"epochs": 1, "batch_size": 8, "fc_width": 64}
    with_them = train("ddad", mixed, tmp_path / "with.pt", hparams=settings, progress=False, device="cpu")
    assert int(with_them.udm_slices) > int(with_them.ndm_slices) > 0
    ignored = train("ddad", mixed, tmp_path / "ignored.pt", hparams=settings, progress=False, device="cpu",
                    use_unlabelled=False)
    assert int(ignored.udm_slices) == int(ignored.ndm_slices) == int(with_them.ndm_slices)
    with caplog.at_level(logging.WARNING, logger="monai_ad.detectors.ddad.detector"):
        plain = train("ddad", datalist, tmp_path / "plain.pt", hparams=settings, progress=False, device="cpu")
    assert int(plain.udm_slices) == int(plain.ndm_slices) and AnomalyDetector.load(tmp_path / "plain.pt").is_fitted
    assert any("no unlabelled slices" in r.getMessage() for r in caplog.records)


def test_unlabelled_sections_that_are_missing_empty_or_malformed(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    assert load_unlabelled(path) == []
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz"}], "unlabelled": []}))
    assert load_unlabelled(path) == []
    path.write_text(json.dumps({"unlabelled": [{"image": "u.nii.gz", "roi": "m/u.nii.gz"}]}))
    assert load_unlabelled(path) == [{"image": str(tmp_path / "u.nii.gz"), "roi": str(tmp_path / "m" / "u.nii.gz")}]
    path.write_text(json.dumps({"unlabelled": [{"roi": "m.nii.gz"}]}))
    with pytest.raises(InputError, match="'unlabelled' section must be a list of items with an 'image' path"):
        load_unlabelled(path)
    path.write_text(json.dumps({"test": [{"image": "t.nii.gz"}]}))
    with pytest.raises(InputError, match="needs a 'test' section of at least 2 cases"):
        with_unlabelled_section(path, 0.5)
    with pytest.raises(InputError, match="the unlabelled fraction must be above 0 and below 1, got 1.5"):
        with_unlabelled_section(path, 1.5)


def test_ddad_refuses_bad_settings():
    with pytest.raises(InputError, match="ddad: score_map must be one of inter, intra, got 'max'"):
        create_detector("ddad", score_map="max")
    with pytest.raises(InputError, match="ddad: input_size must be a multiple of 16, got 40"):
        create_detector("ddad", input_size=40)
    with pytest.raises(InputError, match="ddad: ensemble_size must be a whole number from 2 to 64, got 1"):
        create_detector("ddad", ensemble_size=1)
    with pytest.raises(InputError, match="ddad: uncertainty must be true or false"):
        create_detector("ddad", uncertainty="yes")
    image, _ = _slices(1, seed=0)
    with pytest.raises(InputError, match="ddad: needs at least 2 training slices"):
        create_detector("ddad", **TINY).fit([{"image": image}], progress=False)
