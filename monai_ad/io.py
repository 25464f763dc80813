"""Volume and output files: fast gzip NIfTI reading and writing, and atomic writes (a reader never sees a
half-written file, a failure leaves no partial output)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

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


PARTIAL = ".partial"
_PARTIAL_NAME = re.compile(r"^\..*\.(?P<host>[^.]*)-(?P<pid>\d+)\.[0-9a-f]{8}\.partial(\..*)?$")
_OLD_PARTIAL_NAME = re.compile(r"^\..*\.partial(\..*)?$")  # also those of earlier versions (no owner in the name)
STALE_PARTIAL_S = 3600.0  # a partial file whose writer cannot be identified is stale after this long
_swept_dirs: set[str] = set()
K = TypeVar("K")
_sweep_lock = threading.Lock()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's), or it cannot be told: keep its files
    return True


def remove_stale_partials(directory: str | os.PathLike) -> list[Path]:
    """Remove the hidden ``.partial`` files a killed writer left in ``directory``: those of a process of this host
    that no longer runs, and any other older than ``STALE_PARTIAL_S``. Files of running writers are kept."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    host, now = _host(), time.time()
    for entry in entries:
        if not entry.name.startswith(".") or PARTIAL not in entry.name:
            continue
        match = _PARTIAL_NAME.match(entry.name)
        try:
            if match and match["host"] == host:
                stale = not _process_alive(int(match["pid"]))
            else:
                stale = _OLD_PARTIAL_NAME.match(entry.name) is not None and now - entry.stat().st_mtime > STALE_PARTIAL_S
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def _sweep_once(directory: Path) -> None:
    """``remove_stale_partials`` the first time this process writes into ``directory``."""
    key = os.path.abspath(directory)
    with _sweep_lock:
        if key in _swept_dirs:
            return
        _swept_dirs.add(key)
    remove_stale_partials(directory)


def _new_partial(path: Path) -> Path:
    """Create an empty hidden temporary file beside ``path``, named after it, its host and this process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    suffix = "".join(path.suffixes)
    owner = f"{_host()}-{os.getpid()}"
    while True:
        tmp_path = path.parent / f".{path.name.split('.')[0]}.{owner}.{secrets.token_hex(4)}{PARTIAL}{suffix}"
        try:
            os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp_path
        except FileExistsError:
            continue


def _fsync(path: Path, folder: bool = False) -> None:
    """Flush a file's data, or a folder's entries (after a rename), to disk."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
        # some file systems cannot flush a folder: the rename stays atomic, only its durability is the system's
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_paths(paths: Mapping[K, str | os.PathLike]) -> Iterator[dict[K, Path]]:
    """Yield a temporary path beside each of ``paths`` (same keys); when the block succeeds, every temporary is
    flushed to disk and moved onto its final name, on error all are removed.

    One file: it is replaced in one rename (a reader sees the old file or the new one). Several files (one
    result in several files) cannot be renamed at once, so the rule is that the last of ``paths`` is the set's
    record: the previous files are removed, the record first, then the new ones are renamed in order, the record
    last. Whenever the process stops, the final names hold whole files of one write only, old or new, never a
    mix, and the record is there only when the whole set is.

    The temporary names keep the target's suffixes (``.nii.gz``, ``.png``) so writers that pick a format from
    the extension behave as they would for the final name, are hidden and contain ``.partial`` so that they are
    never taken for outputs, and name their host and process, so that one left by a killed writer is removed
    the next time a process writes into that folder. They are created with the permissions the umask gives (as
    a plain ``open`` would), not private ones.
    """
    finals = {key: Path(path) for key, path in paths.items()}
    partials: dict[K, Path] = {}
    try:
        for key, final in finals.items():
            partials[key] = _new_partial(final)
        yield dict(partials)
        for partial in partials.values():
            _fsync(partial)
        if len(finals) > 1:
            for final in reversed(finals.values()):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final)
        for key, final in finals.items():
            os.replace(partials[key], final)
        for folder in dict.fromkeys(final.parent for final in finals.values()):
            _fsync(folder, folder=True)
    except BaseException:
        for partial in partials.values():
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is flushed to disk and renamed onto ``path``, on error
    removed (``atomic_paths`` for one file)."""
    with atomic_paths({0: path}) as partials:
        yield partials[0]


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    def _write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")

    return atomic_write(path, _write)


# ----------------------------------------------------------------------------- reading: what a file should be
VOLUME_FORMATS = (
    (".nii.gz", "gzip-compressed NIfTI"), (".nii", "NIfTI"), (".nrrd", "NRRD"), (".nhdr", "NRRD"),
    (".mha", "MetaImage"), (".mhd", "MetaImage"), (".dcm", "DICOM"),
)  # fmt: skip


def expected_format(path: str | os.PathLike) -> str:
    """The format a path's name promises: ``NIfTI`` for ``.nii``, ``a DICOM series`` for a folder, ..."""
    path = Path(path)
    if path.is_dir():
        return "a DICOM series"
    name = path.name.lower()
    return next((fmt for suffix, fmt in VOLUME_FORMATS if name.endswith(suffix)), "a medical image")


def _looks_like_text(head: bytes) -> bool:
    return bool(head) and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:64])


def _content_problem(path: Path, fmt: str) -> str | None:
    """What is wrong with a file's first bytes for ``fmt``, when that can be told without a reader."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as stream:
            head = stream.read(512)
    except OSError as exc:
        return f"cannot be opened: {exc.strerror or exc}"
    if not head:
        return "the file is empty (0 bytes)"
    text = " (it holds text)" if _looks_like_text(head) else ""
    if "NIfTI" in fmt:
        if fmt.startswith("gzip"):
            if head[:2] != b"\x1f\x8b":
                return f"it is not gzip-compressed{text}"
            try:
                with gzip_codec.open(path, "rb") as stream:
                    head = stream.read(4)
            except Exception:  # damaged compressed data: the reader's own words follow
                return None
        sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
        if not sizes & {348, 540}:
            return f"it has no NIfTI header{text}"
    elif fmt == "NRRD" and not head.startswith(b"NRRD"):
        return f"it has no NRRD header{text}"
    elif fmt == "MetaImage" and not (b"NDims" in head or b"ObjectType" in head):
        return f"it has no MetaImage header{text}"
    elif fmt == "DICOM" and head[128:132] != b"DICM":
        return f"it has no DICOM preamble{text}"
    return None


def unreadable_message(path: str | os.PathLike, exc: BaseException) -> str:
    """One line for a volume no reader could read: the format its name promises and what is wrong."""
    fmt = expected_format(path)
    reason = _content_problem(Path(path), fmt)
    if reason is None:
        text = str(exc).strip()
        if "cannot find a suitable reader" in text:  # MONAI tried every reader: their messages do not help
            reason = "no reader recognises its content"
        else:
            reason = (text.splitlines()[-1] if text else type(exc).__name__)[:200]
    return f"cannot be read as {fmt}: {reason}"


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
