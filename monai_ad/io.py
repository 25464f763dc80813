"""Volume and output files: fast gzip NIfTI reading and writing, and atomic writes (a reader never sees a
half-written file, a failure leaves no partial output)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import nibabel as nib
import numpy as np
import torch
from monai.data import NibabelReader
from monai.data.utils import correct_nifti_header_if_necessary

try:  # ISA-L's deflate: the same gzip format, several times faster than zlib at both ends
    from isal import igzip as gzip_codec
except ImportError:  # pragma: no cover - platforms without an isal wheel fall back to zlib
    import gzip as gzip_codec

NIFTI_COMPRESSLEVEL = 1  # nibabel's own default for .nii.gz: the size barely shrinks at higher levels
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")  # volume files read (besides DICOM series folders)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.png``) so writers that pick a format
    from the extension behave as they would for the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=".partial" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    def _write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")

    return atomic_write(path, _write)


class NiftiReader(NibabelReader):
    """MONAI's ``NibabelReader``, faster: ``.nii.gz`` files are decompressed in one call with ISA-L and the
    voxels are put in C order (as MONAI holds them) by ``c_order``, converted to ``dtype`` (when given) in the
    same pass, as ``LoadImage(dtype=...)`` would convert them afterwards. The values and metadata are the same."""

    def __init__(self, *args, dtype: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dtype = None if dtype is None else np.dtype(dtype)

    def read(self, data, **kwargs):
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if any(not str(name).endswith(".gz") for name in names):
            return super().read(data, **kwargs)
        self.filenames = names
        images = [correct_nifti_header_if_necessary(_nifti_from_gzip(Path(name), {**self.kwargs, **kwargs})) for name in names]
        return images if len(names) > 1 else images[0]

    def _get_array_data(self, img, filename):
        if self.to_gpu:
            return super()._get_array_data(img, filename)
        return c_order(np.asanyarray(img.dataobj), self.dtype)


def _nifti_from_gzip(path: Path, load_kwargs: dict[str, Any]) -> Any:
    raw = gzip_codec.decompress(path.read_bytes())
    for image_class in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return image_class.from_bytes(raw)
        except Exception:  # not this NIfTI version (or not NIfTI): the next class, then nibabel's own loader
            continue
    return nib.load(path, **load_kwargs)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, intent: str | None = None) -> Path:
    """Write a 3-D array as NIfTI; ``.nii.gz`` is compressed with ISA-L (gzip level ``NIFTI_COMPRESSLEVEL``).
    Writes to ``path`` as given: wrap in ``atomic_path`` for all-or-nothing outputs."""
    path = Path(path)
    image = nib.Nifti1Image(fortran_order(array), affine)
    image.header.set_xyzt_units("mm")
    if intent:
        image.header.set_intent(intent)
    if path.name.endswith(".gz"):
        with gzip_codec.open(path, "wb", compresslevel=NIFTI_COMPRESSLEVEL) as stream:
            image.to_file_map(image.make_file_map({"image": stream, "header": stream}))
    else:
        nib.save(image, str(path))
    return path


def fortran_order(array: np.ndarray) -> np.ndarray:
    """A 3-D volume in Fortran order (NIfTI's on-disk order), as numpy would give it, several times faster:
    the axis reversal is done as a cache-friendly swap of whole z-runs and one blocked 2-D transpose."""
    if array.flags.f_contiguous or not _transposable(array):
        return np.asfortranarray(array)
    x, y, z = array.shape
    yxz = torch.from_numpy(np.ascontiguousarray(array)).transpose(0, 1).contiguous()
    zyx = yxz.view(y * x, z).t().contiguous()
    return zyx.numpy().reshape(z, y, x).transpose()


def c_order(array: np.ndarray, dtype: Any = None) -> np.ndarray:
    """The inverse of ``fortran_order``: a 3-D volume in C order (as MONAI holds it), the same way; in ``dtype``
    (default: the array's), converted during the last copy rather than in a pass of its own."""
    dtype = array.dtype if dtype is None else np.dtype(dtype)
    if array.flags.c_contiguous or not array.flags.f_contiguous or not _transposable(array) or not _torch_holds(dtype):
        return np.ascontiguousarray(array, dtype=dtype)
    x, y, z = array.shape
    yxz = torch.from_numpy(array.transpose()).reshape(z, y * x).t().contiguous().view(y, x, z)
    out = np.empty((x, y, z), dtype)
    torch.from_numpy(out).copy_(yxz.transpose(0, 1))
    return out


def _transposable(array: np.ndarray) -> bool:
    """3-D, not empty, in a dtype and byte order torch holds."""
    return array.ndim == 3 and min(array.shape) > 0 and _torch_holds(array.dtype)


def _torch_holds(dtype: np.dtype) -> bool:
    """Whether a numpy array of ``dtype`` can be viewed as a torch tensor (a native byte order is needed too)."""
    if not dtype.isnative:
        return False
    try:
        torch.from_numpy(np.empty(0, dtype))
    except TypeError:
        return False
    return True
