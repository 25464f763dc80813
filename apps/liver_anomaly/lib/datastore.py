"""The folder datastore the app serves: MONAI Label's ``LocalDatastore`` with ids checked and writes made atomic.

``LocalDatastore`` makes file names from image ids and label tags as given, so ``../x`` reaches outside the
studies folder, and copies files in place, so a kill during a save leaves a torn file that is served after a
restart. Here every id and tag must be a plain name whose file resolves inside the studies folder, and images and
labels are written beside their destination, flushed to disk and renamed over it (a reader sees the old file or
the new one, never half of one); so is the datastore's own record (``datastore_v2.json``). The hidden
``.*.partial*`` files are never listed, and those a killed server left are removed when the datastore opens.

A file is served only when it is a regular file inside the studies folder once links are followed, with no
other hard link: a symbolic link (of the file or of a folder on its way) pointing outside, or a hard link that
shares another file's data, is not listed, not downloaded, not read for inference or training, and a save never
writes through it (the new file replaces the link).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException

from monai_ad.io import atomic_write, remove_stale_partials

from lib.security import check_name

logger = logging.getLogger(__name__)


def atomic_copy(source: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy ``source`` onto ``dest`` atomically: a hidden file beside it, fsync, rename, fsync of the folder."""

    def copy(tmp: Path) -> None:
        with open(tmp, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)

    atomic_write(dest, copy)


class SafeLocalDatastore(LocalDatastore):
    def contained(self, path: str | os.PathLike) -> bool:
        """``path`` is a regular file of the studies folder, links followed, with no other hard link."""
        root = os.path.realpath(self._datastore_path)
        real = os.path.realpath(path)
        try:
            info = os.stat(real)
        except OSError:
            return False
        if os.path.commonpath([root, real]) != root or not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            return False
        return True

    def _refused(self, path: str) -> str:
        if path and os.path.lexists(path) and not self.contained(path):
            logger.warning("not served: %s leaves the studies folder or is linked elsewhere", os.path.basename(path))
            return ""
        return path

    def _list_files(self, path, patterns):
        listed = super()._list_files(path, patterns)
        return {
            name: file for name, file in listed.items()
            if not name.startswith(".") and self.contained(os.path.join(path, file))
        }  # fmt: skip

    def _reconcile_datastore(self):
        labels = Path(self._datastore.label_path(None))
        tags = [entry for entry in labels.iterdir() if entry.is_dir()] if labels.is_dir() else []
        for folder in (self._datastore_path, self._datastore.image_path(), *tags):
            remove_stale_partials(folder)  # what a server killed during a save left
        return super()._reconcile_datastore()

    def _update_datastore_file(self, lock=True):
        """MONAI Label rewrites its datastore file in place: a kill then leaves a torn file and the server cannot
        start again. Here it is replaced atomically."""

        def write():
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write(self._datastore_config_path, lambda tmp: Path(tmp).write_text(text))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _remove_non_existing(self) -> int:
        removed = super()._remove_non_existing()
        for image_id, obj in list(self._datastore.objects.items()):
            if not self.contained(os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext))):
                del self._datastore.objects[image_id]
                removed += 1
                continue
            for tag, label in list(obj.labels.items()):
                if not self.contained(os.path.join(self._datastore.label_path(tag), self._filename(image_id, label.ext))):
                    del obj.labels[tag]
                    removed += 1
        return removed

    def get_image_uri(self, image_id: str) -> str:
        obj = self._datastore.objects.get(image_id)
        if not obj:
            return ""
        return self._refused(os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext))) and super().get_image_uri(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        label = self._datastore.label(label_id, label_tag)
        if not label:
            return ""
        path = os.path.join(self._datastore.label_path(label_tag), self._filename(label_id, label.ext))
        return self._refused(path) and super().get_label_uri(label_id, label_tag)

    def list_images(self) -> list[str]:
        return [image_id for image_id in super().list_images() if self.get_image_uri(image_id)]

    def datalist(self, full_path=True) -> list[dict[str, Any]]:
        items = [item for item in super().datalist(True) if all(self.contained(item[key]) for key in ("image", "label"))]
        if full_path:
            return items
        root = os.path.realpath(self._datastore_path)
        return [{key: os.path.relpath(value, root) for key, value in item.items()} for item in items]

    def _inside(self, path: str, what: str) -> str:
        root = os.path.realpath(self._datastore_path)
        real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))  # a link itself, not its target
        if os.path.commonpath([root, real]) != root or real == root or os.path.basename(path) in ("", ".", ".."):
            raise HTTPException(400, f"{what} would be outside the studies folder")
        return real

    def _image_dest(self, image_id: str, ext: str) -> str:
        check_name(image_id, "image id")
        return self._inside(os.path.join(self._datastore.image_path(), self._filename(image_id, ext)), f"image {image_id!r}")

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        default_id, ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or default_id
        dest = self._image_dest(image_id, ext)
        logger.info("adding image %s", image_id)
        with FileLock(self._lock_file):
            atomic_copy(image_filename, dest)
            info = dict(image_info or {})
            info.update(ts=int(time.time()), name=os.path.basename(dest))
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        return image_id

    def remove_image(self, image_id: str) -> None:
        check_name(image_id, "image id")
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        self._image_dest(image_id, obj.image.ext)
        for tag in list(obj.labels):
            self._label_dest(image_id, tag, obj.labels[tag].ext)
        super().remove_image(image_id)

    def _label_dest(self, image_id: str, tag: str, ext: str) -> str:
        check_name(image_id, "image id")
        check_name(tag, "label tag")
        path = os.path.join(self._datastore.label_path(tag), self._filename(image_id, ext))
        return self._inside(path, f"label {tag!r} of {image_id!r}")

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        obj = self._datastore.objects.get(check_name(image_id, "image id"))
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, ext = self._to_id(os.path.basename(label_filename))
        folder = self._inside(self._datastore.label_path(check_name(label_tag, "label tag")), f"label tag {label_tag!r}")
        dest = self._label_dest(image_id, label_tag, ext)
        logger.info("saving label %s of %s", label_tag, image_id)
        with FileLock(self._lock_file):
            os.makedirs(folder, exist_ok=True)
            atomic_copy(label_filename, dest)
            info = dict(label_info or {})
            info.update(ts=int(time.time()), name=os.path.basename(dest))
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_name(label_id, "label id")
        check_name(label_tag, "label tag")
        uri = self.get_label_uri(label_id, label_tag)
        if uri:
            self._inside(uri, f"label {label_tag!r} of {label_id!r}")
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        return super().update_image_info(check_name(image_id, "image id"), info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        return super().update_label_info(check_name(label_id, "label id"), check_name(label_tag, "label tag"), info)
