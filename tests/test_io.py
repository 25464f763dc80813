import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import NibabelReader
from monai.transforms import LoadImage

from monai_ad.io import NiftiReader, c_order, fortran_order, save_nifti
from monai_ad.transforms import CropROI, FillOutsideROI
from monai_ad.transforms.pipeline import LoadVolumed

AFFINE = np.array([[0.0, 0.0, -0.8, 40.0], [0.0, -0.75, 0.0, 25.0], [3.0, 0.0, 0.0, -60.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.mark.parametrize("shape", [(5, 7, 3), (33, 17, 64), (1, 4, 9)])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8, bool, np.dtype(">i2")])
def test_memory_order_conversions_keep_every_value(shape, dtype):
    array = (np.random.default_rng(0).random(shape) * 100).astype(dtype)
    fortran = fortran_order(array)
    assert fortran.flags.f_contiguous and np.array_equal(fortran, array)
    back = c_order(fortran)
    assert back.flags.c_contiguous and back.dtype == array.dtype and np.array_equal(back, array)
    as_float = c_order(fortran, np.float32)  # the conversion LoadImage(dtype=float32) makes, in the same copy
    assert as_float.flags.c_contiguous and as_float.dtype == np.float32
    assert np.array_equal(as_float, array.astype(np.float32))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
def test_nifti_reader_gives_what_monais_reader_gives(tmp_path, suffix, image_class):
    data = np.random.default_rng(1).integers(-1024, 2000, (20, 24, 12)).astype(np.int16)
    image = image_class(data, AFFINE)
    image.header.set_slope_inter(0.5, -10.0)  # stored values are rescaled on reading
    path = tmp_path / f"ct{suffix}"
    nib.save(image, str(path))
    ours = LoadImage(reader=NiftiReader(), image_only=True, ensure_channel_first=True)(str(path))
    monais = LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True)(str(path))
    assert torch.equal(ours.as_tensor(), monais.as_tensor())
    as_float = LoadImage(reader=NiftiReader(dtype=np.float32), image_only=True, ensure_channel_first=True, dtype=np.float32)
    monais = LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True, dtype=np.float32)(str(path))
    assert as_float(str(path)).dtype == torch.float32 and torch.equal(as_float(str(path)).as_tensor(), monais.as_tensor())
    assert torch.allclose(ours.affine, monais.affine)
    assert np.allclose(ours.as_tensor()[0].numpy(), data * 0.5 - 10.0)


def test_save_nifti_writes_standard_gzip_nifti_in_the_given_geometry(tmp_path):
    heat = np.random.default_rng(2).random((20, 24, 12)).astype(np.float32)
    for name, array in (("c.nii.gz", heat), ("f.nii.gz", np.asfortranarray(heat)), ("plain.nii", heat)):
        save_nifti(array, AFFINE, tmp_path / name)
        loaded = nib.load(str(tmp_path / name))
        assert np.array_equal(np.asarray(loaded.dataobj), heat)
        assert np.allclose(loaded.affine, AFFINE)
    assert gzip.decompress((tmp_path / "c.nii.gz").read_bytes())[:4] == np.int32(348).tobytes()  # plain gzip
    labels = (heat > 0.5).astype(np.uint8)
    save_nifti(labels, AFFINE, tmp_path / "label.nii.gz", intent="label")
    loaded = nib.load(str(tmp_path / "label.nii.gz"))
    assert loaded.header.get_intent()[0] == "label" and loaded.get_data_dtype() == np.uint8


def test_load_volumed_names_the_file_of_a_corrupt_gzip(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header" * 40)[:-20])
    from monai_ad.errors import InputError

    with pytest.raises(InputError, match="broken.nii.gz"):
        LoadVolumed(["image"])({"image": str(path)})


def test_fill_outside_roi_fills_only_the_channels_asked():
    values = torch.arange(2 * 4 * 4 * 2, dtype=torch.float32).reshape(2, 4, 4, 2) + 5
    values[1, 0, 0, 0] = float("nan")
    roi = torch.zeros(1, 4, 4, 2)
    roi[0, 1:3, 1:3] = 1
    out = FillOutsideROI(channels=[0])(values, roi)
    inside = roi[0] > 0
    assert torch.equal(out[0][inside], values[0][inside])
    assert torch.all(out[0][~inside] == values[0].min())
    assert torch.equal(out[1].nan_to_num(-1), values[1].nan_to_num(-1))  # untouched, NaN included
    both = FillOutsideROI()(values, roi)
    assert torch.all(both[1][~inside] == values[1].nan_to_num(float("inf")).min())


def test_crop_roi_inverse_fills_each_channel_with_its_own_lowest_value():
    from monai.data import MetaTensor

    roi = MetaTensor(torch.zeros(1, 12, 10, 6))
    roi[0, 4:7, 3:6, 2:4] = 1
    crop = CropROI(margin_mm=1.0)
    cropped = crop(MetaTensor(torch.zeros(2, 12, 10, 6)), roi)
    cropped.as_tensor()[0] = torch.rand(cropped.shape[1:]) + 3.0
    cropped.as_tensor()[1] = torch.rand(cropped.shape[1:]) - 7.0
    back = crop.inverse(cropped)
    assert tuple(back.shape) == (2, 12, 10, 6)
    box = (slice(3, 8), slice(2, 7), slice(1, 5))
    for c in range(2):
        assert torch.equal(back[c][box].as_tensor(), cropped[c].as_tensor())
        outside = torch.ones(12, 10, 6, dtype=torch.bool)
        outside[box] = False
        assert torch.all(back[c].as_tensor()[outside] == cropped[c].min())


def test_keep_freed_memory_applies_in_a_fresh_process_and_yields_to_the_environment(monkeypatch):
    import subprocess
    import sys

    from monai_ad.allocator import keep_freed_memory

    if not sys.platform.startswith("linux"):
        assert keep_freed_memory() is False
        return
    code = "from monai_ad.allocator import keep_freed_memory; print(keep_freed_memory())"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": ""}, check=True)
    assert fresh.stdout.strip() == "True"  # glibc accepts M_TOP_PAD
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert keep_freed_memory() is False  # the user's own setting is left alone


def test_atomic_writes_follow_the_umask(tmp_path):
    from monai_ad.io import write_json

    previous = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640  # not mkstemp's private 0600


def test_a_killed_writers_partial_files_are_removed_on_the_next_write(tmp_path):
    import subprocess
    import sys
    import time

    from monai_ad.io import _host, write_json

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    stale = tmp_path / f".case_heatmap.{_host()}-{dead}.0123abcd.partial.nii.gz"
    running = tmp_path / f".case_anomaly.{_host()}-{os.getpid()}.0123abcd.partial.nii.gz"  # a live writer's: kept
    old = tmp_path / ".case_summary.abc123.partial.json"  # no owner in the name: removed once an hour old
    recent = tmp_path / ".other_summary.def456.partial.json"
    for path in (stale, running, old, recent):
        path.write_bytes(b"")
    os.utime(old, (time.time() - 7200,) * 2)
    write_json(tmp_path / "case_summary.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, recent.name, "case_summary.json"])


def test_unreadable_files_name_the_format_their_name_promises(tmp_path):
    from monai_ad.io import unreadable_message

    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "notes.nii.gz").write_text("not an image")
    (tmp_path / "notes.nrrd").write_text("not an image")
    error = RuntimeError("File is missing DICOM File Meta Information header")
    assert unreadable_message(tmp_path / "empty.nii.gz", error) == "cannot be read as gzip-compressed NIfTI: the file is empty (0 bytes)"
    assert unreadable_message(tmp_path / "notes.nii.gz", error).endswith("it is not gzip-compressed (it holds text)")
    assert unreadable_message(tmp_path / "notes.nrrd", error) == "cannot be read as NRRD: it has no NRRD header (it holds text)"
    assert "DICOM" not in unreadable_message(tmp_path / "notes.nii.gz", error)
