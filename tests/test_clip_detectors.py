"""The CLIP detectors (WinCLIP, language-enhanced CLIP reconstruction) and their shared open_clip plumbing, on
the CPU with a tiny randomly initialised CLIP (no weights are available offline, and nothing may download)."""

import socket

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from monai_ad.detectors import AnomalyDetector, create_detector
from monai_ad.detectors.clip_reconstruction import CLIPReconstruction, laplacian_low_frequency_enhance
from monai_ad.detectors.winclip import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, WinCLIP, harmonic_mean_over_windows
from monai_ad.errors import InputError
from monai_ad.networks.clip import TINY_MODEL, FrozenCLIP, build_clip, clip_tokenizer, evenly_spaced_layers
from test_detectors import synthetic_slices

SIZE = 96  # the tiny CLIP's input: a 6×6 patch grid
TINY = {"image_size": SIZE, "clip_model": TINY_MODEL, "allow_random_weights": True}


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """For the whole module (its module-scoped fixtures included): any attempt to reach the network (sockets,
    open_clip's download helpers) raises, and is recorded so that a swallowed attempt still fails."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"network access attempted: {args[:2]}")

    import open_clip.factory
    import open_clip.pretrained

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        for module in (open_clip.pretrained, open_clip.factory):
            for name in ("download_pretrained", "download_pretrained_from_hf", "download_pretrained_from_url"):
                if hasattr(module, name):
                    patch.setattr(module, name, refuse)
        yield
    assert not calls


@pytest.fixture(scope="module")
def slices():
    train_img, train_roi, _ = synthetic_slices(16, seed=0, size=SIZE)
    normal_img, normal_roi, _ = synthetic_slices(4, seed=1, size=SIZE)
    ab_img, ab_roi, ab_mask = synthetic_slices(6, seed=2, lesion=True, size=SIZE)
    return {"train": (train_img, train_roi), "normal": (normal_img, normal_roi), "abnormal": (ab_img, ab_roi, ab_mask)}


def in_liver_pixel_auroc(detector, slices) -> float:
    image, roi, lesion = slices["abnormal"]
    pixel = detector.score(image, roi).pixel.cpu().numpy()
    inside = roi[:, 0].numpy()
    return roc_auc_score(lesion[inside], pixel[inside])


# ----------------------------------------------------------------------------- shared CLIP plumbing
@pytest.fixture(scope="module")
def clip():
    return FrozenCLIP(TINY_MODEL, allow_random_weights=True)


def test_tokenizer_ships_its_vocabulary():
    ids = clip_tokenizer()(["a CT scan of the liver."], context_length=77)
    assert ids.shape == (1, 77) and int(ids[0, 0]) == 49406 and int(ids[0].argmax()) > 1  # SOT … EOT (49407)


def test_window_gather_equals_a_masked_full_pass(clip):
    image = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        embedded = clip.embed_image(image)
        windows = clip.window_index(3)
        assert windows.shape == (16, 9) and windows[0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]
        gathered = clip.window_embeddings(embedded, windows, chunk=5)
        n = embedded.shape[1]
        for w in (0, 7, 15):
            keep = torch.zeros(n, dtype=torch.bool)
            keep[0] = True
            keep[windows[w] + 1] = True
            mask = torch.zeros(n, n)
            mask[keep] = torch.where(keep, 0.0, float("-inf"))  # CLS and the window's tokens see only each other
            full = clip.pool(clip.run_blocks(embedded, attn_mask=mask)[0])
            assert torch.allclose(full, gathered[:, w], atol=1e-5)
        unmasked = clip.pool(clip.run_blocks(embedded)[0])
        assert not torch.allclose(unmasked, gathered[:, 0], atol=1e-3)


def test_text_features_from_embeddings_match_encode_text(clip):
    ids = clip.tokenize(["a photo of the liver.", "a CT scan of the damaged liver."])
    with torch.no_grad():
        reference = clip.model.encode_text(ids)  # open_clip's own, over the whole context
        assert torch.allclose(clip.encode_text(ids), reference, atol=1e-5)
        for row in range(2):
            eot = int(ids[row].argmax())
            last = clip.text_features(clip.token_embeddings(ids[row : row + 1]), eot, [0, clip.text_depth - 1])
            assert torch.allclose(last[1][0], reference[row], atol=1e-5)
            assert not torch.allclose(last[0][0], reference[row], atol=1e-3)
    assert evenly_spaced_layers(12) == [2, 5, 8, 11] and evenly_spaced_layers(4) == [0, 1, 2, 3]


def test_weights_load_from_a_local_file_and_never_silently_random(tmp_path):
    from safetensors.torch import save_file

    source = build_clip(TINY_MODEL, allow_random_weights=True, seed=5)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "tiny.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "tiny.pt")
    for name in ("tiny.safetensors", "tiny.pt"):
        loaded = build_clip(TINY_MODEL, tmp_path / name)  # no random opt-in needed with a file
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, state[key]), key
    assert not torch.equal(build_clip(TINY_MODEL, allow_random_weights=True).visual.proj, source.visual.proj)

    missing = tmp_path / "absent" / "open_clip_model.safetensors"
    for cls in (WinCLIP, CLIPReconstruction):
        with pytest.raises(InputError, match="CLIP checkpoint not found") as err:
            cls(clip_model=TINY_MODEL, clip_checkpoint=str(missing))
        assert str(missing) in str(err.value)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable CLIP checkpoint") as err:
        WinCLIP(clip_model=TINY_MODEL, clip_checkpoint=broken)
    assert str(broken) in str(err.value)
    with pytest.raises(InputError, match="does not fit CLIP"):
        build_clip("ViT-B-16", tmp_path / "tiny.pt")
    with pytest.raises(InputError, match="needs its weights"):
        WinCLIP(clip_model="ViT-B-16-plus-240")
    with pytest.raises(InputError, match="unknown open_clip model"):
        WinCLIP(clip_model="no-such-model", allow_random_weights=True)


# ----------------------------------------------------------------------------- WinCLIP
@pytest.fixture(scope="module")
def zero_shot():
    return WinCLIP(**TINY).fit([], progress=False)  # no normal slices: zero-shot


@pytest.fixture(scope="module")
def few_shot(slices):
    return WinCLIP(**TINY).fit(slices["train"][0], progress=False)


def test_winclip_zero_shot(zero_shot, slices):
    detector = zero_shot
    assert len(NORMAL_STATES) == 7 and len(ANOMALOUS_STATES) == 4 and len(TEMPLATES) == 21
    assert detector.text.shape == (2, 64) and torch.allclose(detector.text.norm(dim=1), torch.ones(2))
    assert detector.is_fitted and not detector.few_shot
    image, roi, _ = slices["abnormal"]
    scores = detector.score(image, roi)
    assert scores.pixel.shape == (6, SIZE, SIZE) and scores.slice.shape == (6,)
    with torch.no_grad():
        clip = detector.clip
        cls = torch.nn.functional.normalize(clip.pool(clip.run_blocks(clip.embed_image(image))[0]), dim=-1)
        expected = ((cls @ detector.text.t()) / 0.07).softmax(-1)[:, 1]
    assert torch.allclose(scores.slice, expected, atol=1e-5)
    # harmonic means of probabilities stay probabilities, and a lower window score pulls a patch down more
    assert 0 <= float(scores.pixel.min()) and float(scores.pixel.max()) <= 1
    hm = harmonic_mean_over_windows(torch.tensor([[0.5, 0.1]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    assert torch.allclose(hm, torch.tensor([[2 / (2 + 10), 0.5]]))


def test_winclip_few_shot_memory_ranks_lesion_pixels(few_shot, zero_shot, slices):
    detector = few_shot
    assert detector.few_shot
    assert [detector.memory(s).shape[0] for s in detector.scales] == [16 * 36, 16 * 25, 16 * 16]
    assert in_liver_pixel_auroc(detector, slices) > 0.85
    # few-shot distances are non-negative and added to the zero-shot map
    image, roi, _ = slices["abnormal"]
    assert torch.all(detector.score(image, roi).pixel >= zero_shot.score(image, roi).pixel - 1e-6)

    capped = WinCLIP(**TINY, memory_size=50, shots=3).fit(slices["train"][0], progress=False)
    assert [capped.memory(s).shape[0] for s in capped.scales] == [50, 50, 48]
    assert not WinCLIP(**TINY, shots=0).fit(slices["train"][0], progress=False).few_shot


# ----------------------------------------------------------------------------- CLIP reconstruction
def test_laplacian_low_frequency_enhancement():
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(laplacian_low_frequency_enhance(x, 3, 1.0), x)
    flat = torch.full((1, 1, 64, 64), 0.3)
    assert torch.allclose(laplacian_low_frequency_enhance(flat, 3, 0.5), flat, atol=1e-6)
    enhanced = laplacian_low_frequency_enhance(x, 3, 0.5)
    detail = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert detail(enhanced) < 0.7 * detail(x)
    assert torch.allclose(enhanced.mean(), x.mean(), atol=0.02)  # the low frequencies are kept


def test_clip_reconstruction_trains_prompts_and_adaptor_only(slices):
    default = CLIPReconstruction(**TINY)
    assert default.prompts.shape == (36, 16, 64) and default.adaptor[0].out_features == 64 // 16
    assert default.layers == [0, 1, 2, 3] and default.text_layers == [0, 1, 2, 3]
    ids = default.template_ids
    assert len(set(ids[1:18].tolist())) == 1 and int(ids[0]) == 49406 and int(ids[-1]) == 49407  # SOT X×17 … EOT

    detector = CLIPReconstruction(**TINY, prompt_length=4, epochs=4, batch_size=4, lr=1e-2)  # shorter prompts: quicker
    clip_before = {k: v.clone() for k, v in detector.clip.state_dict().items()}
    prompts_before = detector.prompts.detach().clone()
    image, roi = slices["train"]
    detector.fit(({"image": image[:4], "roi": roi[:4]} for _ in range(1)), progress=False)  # a one-shot generator
    assert detector.train_losses[-1] < 0.8 * detector.train_losses[0]
    assert all(torch.equal(v, clip_before[k]) for k, v in detector.clip.state_dict().items())
    assert not any(p.requires_grad for p in detector.clip.parameters())
    assert not torch.equal(detector.prompts, prompts_before)
    # the map is the summed per-layer cosine distance, so it lies in [0, 2·layers]
    scores = detector.score(*slices["abnormal"][:2])
    assert float(scores.pixel.min()) >= 0 and float(scores.slice.max()) <= 2 * 4


# ----------------------------------------------------------------------------- both
@pytest.mark.parametrize("name", ["winclip", "clip_reconstruction"])
def test_save_load_round_trip_gives_identical_scores(name, few_shot, slices, tmp_path):
    if name == "winclip":
        detector = few_shot
    else:
        detector = create_detector(name, **TINY, epochs=1, prompt_length=4).fit(slices["train"][0][:4], progress=False)
    detector.calibrate([{"image": slices["normal"][0], "roi": slices["normal"][1]}])
    path = detector.save(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["hparams"]["clip_model"] == TINY_MODEL and payload["hparams"]["clip_checkpoint"] is None
    assert payload["state"] and not any(k.startswith("clip.") for k in payload["state"])
    loaded = AnomalyDetector.load(path)
    assert type(loaded) is type(detector) and loaded.thresholds == detector.thresholds
    image, roi, _ = slices["abnormal"]
    a, b = detector.score(image, roi), loaded.score(image, roi)
    assert torch.equal(a.pixel, b.pixel) and torch.equal(a.slice, b.slice)
    assert np.isfinite(a.pixel.numpy()).all()
