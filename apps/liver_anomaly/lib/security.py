"""What a client may send: identifiers, uploads, infer options; and the server-side guard that checks them.

MONAI Label 0.8.5 passes image ids and label tags straight to its datastore as file names, keeps uploads in the
temp folder when a request fails, runs ``/infer`` on its event loop (one request at a time), serves model files
to anyone and answers every browser origin with credentials. The app therefore, once the server has started
(``install``):

- puts ``RequestGuard`` (an ASGI middleware) in front of every route. In order: the ``Host`` header must name this
  server (loopback names, the bound address, ``allowed_hosts``: a DNS-rebinding page sends its own name); an
  ``Origin`` header must be the server's own or one of ``allowed_origins`` (a page elsewhere can neither read
  answers nor send writes); with ``auth_token_file``, every request carries the token (``Authorization: Bearer``
  or HTTP Basic with the token as password); ids and tags in the query must be plain names (``SAFE_NAME``),
  strategy and scoring names must be the app's, bodies larger than ``max_upload_mb`` are refused (413),
  ``/model/<name>`` (download, replace, delete) answers 403 unless ``allow_model_routes`` is set, sessions are
  closed, and ``POST /train``, ``/activelearning`` and ``/batch/infer`` bodies are checked before anything runs
  (``/batch/infer``: the model's own infer options and MONAI Label's batch keys, no image list, never
  ``run_sync`` (it would run the whole batch on the event loop), at most ``infer_workers`` volumes at a time);
- replaces MONAI Label's CORS middleware (every origin, with credentials) by one for ``allowed_origins`` only
  (none by default), and answers a malformed request with a 422 of one line;
- serves its own handlers at MONAI Label's paths for the routes that take files (``POST /infer/<model>``,
  ``PUT /datastore/image``, ``PUT /datastore/label``): each upload goes to a folder of its own, is checked (size,
  a readable 3-D image, the study's shape for a label) and is removed on every path; infer options must be the
  model's own, numbers finite and in range; inference runs in a worker pool so ``/info`` and the datastore keep
  answering.

The replacement handlers carry MONAI Label's role checks (``RBAC``), so its authentication applies to them as it
does to its own routes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import hmac
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from monailabel.endpoints.user.auth import User

logger = logging.getLogger(__name__)

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
ID_PARAMS = ("image", "id", "label", "tag")  # query parameters MONAI Label turns into file names
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
# sent by the Slicer plugin and OHIF's MONAI Label panel beside the model's options (OHIF: label_prompt,
# result_compress, restore_label_idx and a NRRD result)
INFER_CLIENT_KEYS = {"device", "label_info", "client_id", "label_prompt", "result_compress", "restore_label_idx"}
FIXED_VALUES = {"result_extension": (".nii.gz", ".nii", ".nrrd"), "result_dtype": ("uint8",),
                "result_compress": (True, False), "restore_label_idx": (True, False)}  # fmt: skip
DEVICE = re.compile(r"^(cpu|cuda(:\d{1,2})?|auto)$")
DEFAULT_MAX_UPLOAD_MB = 1024.0
UPLOAD_PREFIX = "monai_ad_upload_"


def first_line(text: Any) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:300] if lines else ""


def check_name(value: Any, what: str) -> str:
    """An image id or label tag: a plain name (letters, digits, ``._-``; no path, no ``..``), else 400."""
    if not isinstance(value, str) or not SAFE_NAME.match(value) or ".." in value:
        raise HTTPException(400, f"{what} {str(value)[:80]!r} is not a plain name (letters, digits, '.', '_', '-'; no '..' or '/')")
    return value


def image_suffix(filename: str | None, what: str) -> str:
    name = (filename or "").lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise HTTPException(415, f"{what}: only {', '.join(IMAGE_SUFFIXES)} files are accepted, got {os.path.basename(filename or '')[:80]!r}")


def image_shape(path: str | os.PathLike, what: str, full: bool = True) -> tuple[int, ...]:
    """The shape of a 3-D medical image file; with ``full``, read in full once (a truncated or corrupt file is
    refused), else from its header."""
    path = str(path)
    try:
        if path.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(path)
            shape = tuple(int(s) for s in img.shape)
            if full and path.endswith(".gz"):
                expected = int(img.header.get_data_offset()) + int(np.prod(shape)) * img.get_data_dtype().itemsize
                size = 0
                with gzip.open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        size += len(chunk)
                if size < expected:
                    raise ValueError(f"truncated ({size} of {expected} bytes)")
        else:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.ReadImageInformation()
            shape = tuple(int(s) for s in reader.GetSize())
            if full:
                sitk.ReadImage(path)  # the voxels too
    except HTTPException:
        raise
    except (Exception, zlib.error) as exc:
        raise HTTPException(422, f"{what}: cannot be read as a medical image ({first_line(exc) or type(exc).__name__})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise HTTPException(422, f"{what}: a 3-D image is needed, got shape {shape}")
    return shape


def same_grid(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """The same voxel grid, in any axis order (a mask may be stored in another orientation than its image)."""
    return sorted(a) == sorted(b)


async def receive_upload(upload: Any, folder: Path, stem: str, limit: int, what: str) -> Path:
    """Copy an uploaded file into ``folder`` (``<stem><suffix>``), refusing an empty or oversized one."""
    suffix = image_suffix(getattr(upload, "filename", None), what)
    dest = folder / f"{stem}{suffix}"
    size = 0
    with open(dest, "wb") as out:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"{what}: larger than the server's upload limit ({limit / 2**20:.0f} MB)")
            out.write(chunk)
    if size == 0:
        raise HTTPException(422, f"{what}: the uploaded file is empty")
    return dest


def upload_folder(root: str | None = None) -> Path:
    """A new folder for one request's uploads, named after this server's process (``remove_stale_uploads``)."""
    return Path(tempfile.mkdtemp(prefix=f"{UPLOAD_PREFIX}{os.getpid()}_", dir=root))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_uploads(root: str | None = None) -> int:
    """Remove the upload folders that a server killed mid-request left (their process is gone); folders of live
    servers, links and anything else in the temp folder are left alone. Returns how many were removed."""
    removed = 0
    for entry in Path(root or tempfile.gettempdir()).glob(f"{UPLOAD_PREFIX}*"):
        pid = entry.name[len(UPLOAD_PREFIX):].split("_", 1)[0]
        if not pid.isdigit() or entry.is_symlink() or not entry.is_dir() or _process_alive(int(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += not entry.exists()
    return removed


def is_upload(path: Any) -> bool:
    """True for a file this module received (inside a ``monai_ad_upload_*`` folder of the temp folder)."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return False
    real = Path(os.path.realpath(path))
    return real.parent.name.startswith(UPLOAD_PREFIX) and real.parent.parent == Path(os.path.realpath(tempfile.gettempdir()))


def infer_options(params: Any, allowed: dict[str, Any], model: str) -> dict[str, Any]:
    """The request's infer options: only the model's own (its ``config``) and the clients' usual keys, each a
    plain value; never a path, an image or a label."""
    if params in (None, "", b""):
        return {}
    if isinstance(params, (str, bytes)):
        try:
            params = json.loads(params)
        except json.JSONDecodeError as exc:
            raise HTTPException(422, f"params: not valid JSON ({first_line(exc)})") from None
    if not isinstance(params, dict):
        raise HTTPException(422, "params: a JSON object is needed")
    options = {}
    for key, value in params.items():
        if key not in allowed and key not in INFER_CLIENT_KEYS:
            raise HTTPException(422, f"infer option {str(key)[:60]!r} is not accepted by {model} (options: {', '.join(sorted(allowed))})")
        if key == "label_info":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise HTTPException(422, "infer option 'label_info' must be a list of objects")
        elif key == "label_prompt":
            if not isinstance(value, list) or len(value) > 64 or not all(
                isinstance(v, (int, str)) and not isinstance(v, bool) and len(str(v)) <= 40 and "/" not in str(v) for v in value
            ):
                raise HTTPException(422, "infer option 'label_prompt' must be a short list of label names or numbers")
        elif key == "device":
            if not isinstance(value, str) or not DEVICE.match(value):
                raise HTTPException(422, f"infer option 'device' must be cpu, cuda or cuda:N, got {str(value)[:40]!r}")
        elif key in FIXED_VALUES:
            if value not in FIXED_VALUES[key]:
                raise HTTPException(422, f"infer option {key!r} must be one of {FIXED_VALUES[key]}")
        elif not (value is None or isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) <= 40 and "/" not in value)):
            raise HTTPException(422, f"infer option {key!r} must be a number or a short plain value")
        options[key] = value
    return options


# ------------------------------------------------------------------------------- who may talk to the server
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
MIN_TOKEN_CHARS = 16
ACTIVE_LEARNING_KEYS = {"label_tag", "labels", "client_id"}  # what MONAI Label's strategies read from a request
# what MONAI Label's batch inference reads besides the model's options (the images come from the datastore only)
BATCH_INFER_KEYS = {"device", "multi_gpu", "gpus", "logging", "save_label", "label_tag", "max_workers", "max_batch_size"}
BATCH_INFER_QUERY = {"images": ("all", "labeled", "unlabeled"), "run_sync": ("", "false", "0", "no", "off")}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
GPU_LIST = re.compile(r"^(all|\d{1,2}(,\d{1,2}){0,15})$")
MAX_BATCH_SIZE = 1_000_000


@dataclass(frozen=True)
class Access:
    """Who may talk to the server: the browser origins allowed besides its own, the names it answers to in the
    ``Host`` header, and the shared token (None: no token asked)."""

    origins: tuple[str, ...] = ()
    hosts: frozenset[str] = frozenset(LOOPBACK)
    token: bytes | None = field(default=None, repr=False)


def normal_origin(text: str, what: str = "allowed_origins") -> str:
    """``scheme://host[:port]`` of a browser origin, lower case; a ValueError for ``*``, a path or another scheme."""
    text = str(text).strip().rstrip("/")
    parts = urlsplit(text)
    if text == "*" or parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query or "*" in text:
        raise ValueError(f"{what}: {text[:80]!r} is not an origin such as https://ohif.hospital.example (no '*', no path)")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


def read_token(path: str | os.PathLike) -> bytes:
    """The shared token: the first line of a file only its owner can read, at least ``MIN_TOKEN_CHARS`` long."""
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"auth_token_file {str(path)!r}: cannot be read ({type(exc).__name__})") from None
    if mode & 0o077:
        raise ValueError(f"auth_token_file {str(path)!r}: others can read it; chmod 600 it")
    token = text[0].strip() if text else ""
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise ValueError(f"auth_token_file {str(path)!r}: the token must be one line of at least {MIN_TOKEN_CHARS} characters, no spaces")
    return token.encode()


def access_from_conf(conf: dict[str, Any], host: str | None, auth_enabled: bool, cors_origins: Any = ()) -> Access:
    """The server's ``Access`` from the app's options (``allowed_origins``, ``allowed_hosts``, ``auth_token_file``),
    MONAI Label's ``MONAI_LABEL_CORS_ORIGINS`` and where it listens; a ValueError (one line) when an option is
    wrong or the server would listen beyond this machine with no authentication."""
    origins = [normal_origin(o) for o in str(conf.get("allowed_origins") or "").split(",") if o.strip()]
    origins += [normal_origin(str(o), "MONAI_LABEL_CORS_ORIGINS") for o in cors_origins or ()]
    hosts = set(LOOPBACK) | {h.strip().lower().strip("[]") for h in str(conf.get("allowed_hosts") or "").split(",") if h.strip()}
    if host and host not in WILDCARD_HOSTS:
        hosts.add(host.lower().strip("[]"))
    token = read_token(conf["auth_token_file"]) if conf.get("auth_token_file") else None
    if token is not None and auth_enabled:
        raise ValueError("auth_token_file and MONAI Label's authentication (MONAI_LABEL_AUTH_ENABLE) cannot both be on: a request has one Authorization header")
    problem = exposure_error(host, auth_enabled, token is not None)
    if problem:
        raise ValueError(problem)
    return Access(tuple(dict.fromkeys(origins)), frozenset(hosts), token)


def token_matches(headers: dict[bytes, bytes], token: bytes) -> bool:
    """``Authorization: Bearer <token>``, or HTTP Basic with the token as password (any user name), compared in
    constant time."""
    scheme, _, value = headers.get(b"authorization", b"").strip().partition(b" ")
    value = value.strip()
    if scheme.lower() == b"basic":
        try:
            value = base64.b64decode(value, validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return False
    elif scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(value, token)


# ---------------------------------------------------------------------------------------------- the ASGI guard
class RequestGuard:
    """Checks every request before MONAI Label's routes see it (see the module docstring). ``names`` maps a
    route prefix (``activelearning``, ``scoring``) to the names the app serves there."""

    def __init__(self, app: Callable, limit: int, allow_model_routes: bool, check_train: Callable[[str, dict], None] | None = None,
                 access: Access = Access(), names: dict[str, Any] | None = None,
                 check_batch_infer: Callable[[str, dict, dict], dict] | None = None):  # fmt: skip
        self.app, self.limit, self.allow_model_routes, self.check_train = app, limit, allow_model_routes, check_train
        self.access, self.names, self.check_batch_infer = access, dict(names or {}), check_batch_infer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            refusal = self.refusal(scope)
        except HTTPException as exc:
            refusal = exc
        route = scope["path"].rstrip("/")
        if refusal is None and scope["method"] in ("POST", "PUT") and route.startswith(("/train", "/activelearning/", "/batch/infer")):
            body, refusal = await self._checked_body(scope, receive)
            if refusal is None:
                receive = _replay(body)
                scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers") or [] if k.lower() != b"content-length"]
                         + [(b"content-length", str(len(body)).encode())]}  # fmt: skip
        if refusal is not None:
            return await _answer(send, refusal.status_code, refusal.detail, getattr(refusal, "headers", None))
        state = {"size": 0, "over": False, "started": False}

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["size"] += len(message.get("body", b""))
                if state["size"] > self.limit:
                    state["over"] = True
                    raise UploadTooLarge()
            return message

        async def guarded_send(message):
            if state["over"]:
                return  # the 413 below replaces whatever the route made of the cut-off body
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except UploadTooLarge:
            pass
        if state["over"] and not state["started"]:
            await _answer(send, 413, self._too_large())

    def _too_large(self) -> str:
        return f"request body larger than the server's upload limit ({self.limit / 2**20:.0f} MB; --conf max_upload_mb)"

    def who(self, scope) -> HTTPException | None:
        """The Host, Origin and token checks."""
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if host_name(host) not in self.access.hosts:
            return HTTPException(400, f"Host {host[:80]!r} is not a name of this server (add it with --conf allowed_hosts)")
        origin = headers.get(b"origin")
        if origin is not None:
            origin_text = origin.decode("latin-1").strip().lower()
            if origin_text != f"{scope.get('scheme', 'http')}://{host.lower()}" and origin_text not in self.access.origins:
                return HTTPException(403, f"cross-origin request from {origin_text[:80]!r} refused (allow a viewer's origin with --conf allowed_origins)")
        if self.access.token is not None and not token_matches(headers, self.access.token):
            return HTTPException(401, "this server needs its access token (Authorization: Bearer <token>, or the token as the Basic-auth password)",
                                 headers={"WWW-Authenticate": 'Bearer realm="monai_ad", Basic realm="monai_ad"'})  # fmt: skip
        return None

    def refusal(self, scope) -> HTTPException | None:
        refusal = self.who(scope)
        if refusal is not None:
            return refusal
        path = scope["path"]
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if key in ID_PARAMS and (value or key != "image"):
                check_name(value, "label tag" if key == "tag" else f"{key} id")
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[0] in self.names and (scope["method"] == "POST" or parts[0] == "activelearning"):
            known = self.names[parts[0]]
            if parts[1] not in known:
                shown = parts[1] if SAFE_NAME.match(parts[1]) else repr(parts[1][:40])
                return HTTPException(404, f"unknown {parts[0]} name {shown[:60]}; this app has: {', '.join(sorted(known)) or 'none'}")
        if parts[:1] == ["session"]:
            return HTTPException(404, "sessions are not used by this app: send the image id or upload the file with the request")
        if path.startswith("/model/") and not path.startswith("/model/info/") and not self.allow_model_routes:
            return HTTPException(403, "model files cannot be downloaded, replaced or deleted through this server (see 'allow_model_routes')")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.limit
            except ValueError:
                return HTTPException(400, "bad Content-Length")
            if too_large:
                return HTTPException(413, self._too_large())
        return None

    async def _checked_body(self, scope, receive) -> tuple[bytes, HTTPException | None]:
        """Read a small JSON body (``/train``, ``/activelearning``, ``/batch/infer``) and check it before the route
        runs; the body passed on is the one read, or for ``/batch/infer`` the checked options."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > 1 << 20:
                return b"", HTTPException(413, "request options larger than 1 MB")
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        parts = [p for p in scope["path"].split("/") if p]
        try:
            params = json.loads(body) if body.strip() else {}
            if not isinstance(params, dict):
                raise HTTPException(422, "request options: a JSON object is needed")
            if parts[0] == "activelearning":
                check_active_learning(params)
            elif parts[0] == "batch":
                if self.check_batch_infer is None:
                    raise HTTPException(403, "batch inference is not served by this server")
                query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
                body = json.dumps(self.check_batch_infer(parts[2] if len(parts) > 2 else "", query, params)).encode()
            elif self.check_train is not None:
                self.check_train(parts[1] if len(parts) > 1 else "", params)
        except HTTPException as exc:
            return body, exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return body, HTTPException(422, f"request options: not valid JSON ({first_line(exc)})")
        except ValueError as exc:
            return body, HTTPException(422, first_line(exc))
        return body, None


def check_active_learning(params: dict[str, Any]) -> None:
    """An ``/activelearning/<strategy>`` body: only a label tag, label names and a client id."""
    for key, value in params.items():
        if key not in ACTIVE_LEARNING_KEYS:
            raise HTTPException(422, f"active learning option {str(key)[:60]!r} is not accepted (options: {', '.join(sorted(ACTIVE_LEARNING_KEYS))})")
        if key == "label_tag" and value is not None:
            check_name(value, "label tag")
        elif key == "labels" and value is not None and not (
            isinstance(value, list) and len(value) <= 64 and all(isinstance(v, str) and SAFE_NAME.match(v) for v in value)
        ):
            raise HTTPException(422, "active learning option 'labels' must be a short list of label names")
        elif key == "client_id" and value is not None and not (isinstance(value, str) and len(value) <= 100 and value.isprintable()):
            raise HTTPException(422, "active learning option 'client_id' must be a short line of text")


def batch_infer_request(query: dict[str, str], params: dict[str, Any], workers: int,
                        model_options: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The options a ``POST /batch/infer/<model>`` runs with: the query's ``images`` only (a datastore selection,
    never a list of ids or paths), no ``run_sync``; MONAI Label's batch keys checked, at most ``workers`` volumes
    at a time (its own default is a quarter of the CPUs), one device unless ``multi_gpu`` is asked for; every
    other key one of the model's infer options (``model_options`` checks them)."""
    for key, value in query.items():
        if key not in BATCH_INFER_QUERY:
            raise HTTPException(422, f"batch infer query {str(key)[:60]!r} is not accepted (query: {', '.join(sorted(BATCH_INFER_QUERY))})")
        if value.strip().lower() not in BATCH_INFER_QUERY[key]:
            if key == "run_sync":
                raise HTTPException(422, "run_sync: batch inference runs in the background only; follow it with GET /batch/infer")
            raise HTTPException(422, f"batch infer images {value[:40]!r}: use {', '.join(BATCH_INFER_QUERY['images'])}")
    batch = {key: params[key] for key in BATCH_INFER_KEYS if key in params}
    options = model_options({key: value for key, value in params.items() if key not in BATCH_INFER_KEYS or key == "device"})
    for key, value in batch.items():
        if key in ("multi_gpu", "save_label"):
            ok, need = isinstance(value, bool), "true or false"
        elif key in ("max_workers", "max_batch_size"):
            low, high = (1, workers) if key == "max_workers" else (0, MAX_BATCH_SIZE)
            ok, need = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high, f"a whole number from {low} to {high}"
        elif key == "gpus":
            ok, need = isinstance(value, str) and GPU_LIST.match(value) is not None, "'all' or GPU numbers such as '0,1'"
        elif key == "logging":
            ok, need = value in LOG_LEVELS, "one of " + ", ".join(LOG_LEVELS)
        elif key == "label_tag":
            ok, need = check_name(value, "label tag") == value, ""
        else:  # device: checked with the model's options
            ok, need = True, ""
        if not ok:
            raise HTTPException(422, f"batch infer option {key!r} must be {need}, got {str(value)[:40]!r}")
    return {**options, "multi_gpu": False, "max_workers": workers, **batch}


class UploadTooLarge(Exception):
    pass


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _answer(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------- exposure (where it listens)
def server_host(argv: list[str]) -> str | None:
    """The ``--host`` of a ``monailabel start_server`` command line (its default 0.0.0.0 when absent); None when
    ``argv`` is not such a command."""
    if "start_server" not in argv:
        return None
    for i, arg in enumerate(argv):
        if arg in ("--host", "-i") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return "0.0.0.0"


def exposure_error(host: str | None, auth_enabled: bool, token_on: bool) -> str | None:
    """Why the server must not start: listening beyond this machine with no authentication."""
    if host is None or host in LOOPBACK or auth_enabled or token_on:
        return None
    return (f"the server would listen on {host} with no authentication: start it with --host 127.0.0.1, give it an access "
            "token (--conf auth_token_file FILE), or enable MONAI Label's authentication (MONAI_LABEL_AUTH_ENABLE=true)")  # fmt: skip


# ---------------------------------------------------------------------------------- the routes the app serves
def install(instance: Any, limit: int, allow_model_routes: bool, workers: int, access: Access = Access()) -> bool:
    """Put the guard, the CORS policy of ``access`` and the app's upload/infer handlers into the running MONAI Label
    server (False when there is none in this process: the command-line and training processes)."""
    server = sys.modules.get("monailabel.app")
    fastapi_app = getattr(server, "app", None)
    if fastapi_app is None:
        return False
    from fastapi import APIRouter
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware import Middleware
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute
    from monailabel.config import settings
    from monailabel.endpoints.infer import send_response
    from monailabel.endpoints.user.auth import RBAC
    from starlette.concurrency import run_in_threadpool

    stale = remove_stale_uploads()
    if stale:
        logger.info("removed %d upload folder(s) left by a server that stopped mid-request", stale)
    workers = max(1, workers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")
    router = APIRouter()

    def model_options(model: str, params: Any) -> dict[str, Any]:
        """The infer options of a request for ``model``: its own options, each in range (else 4xx)."""
        task = instance._infers.get(model)
        if task is None:
            raise HTTPException(404, f"unknown model {model!r}; available: {sorted(instance._infers)}")
        options = infer_options(params, dict(task.info().get("config") or {}), model)
        if hasattr(task, "check_options"):
            try:
                task.check_options(options)
            except ValueError as exc:
                raise HTTPException(422, first_line(exc)) from None
        return options

    def check_batch_infer(model: str, query: dict[str, str], params: dict[str, Any]) -> dict[str, Any]:
        return batch_infer_request(query, params, workers, lambda options: model_options(model, options))

    async def infer(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: str | None = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ):
        folder = upload_folder()
        try:
            if output not in (None, "", "image", "json", "all"):
                raise HTTPException(422, f"output {str(output)[:40]!r}: use image, json or all")
            if session_id:
                raise HTTPException(422, "sessions are not used by this app: send the image id or upload the file")
            options = model_options(model, params)
            if file is None and not image:
                raise HTTPException(422, "give an image id (?image=...) or upload the image as 'file'")
            request: dict[str, Any] = {"model": model, "image": check_name(image, "image id") if image else ""}
            shape = None
            if file is not None:
                request["image"] = str(await receive_upload(file, folder, "image", limit, "uploaded image"))
                shape = await run_in_threadpool(image_shape, request["image"], "uploaded image")
            if label is not None:
                request["label"] = str(await receive_upload(label, folder, "label", limit, "uploaded liver mask"))
                roi_shape = await run_in_threadpool(image_shape, request["label"], "uploaded liver mask")
                if shape is None:
                    shape = await run_in_threadpool(instance.study_shape, image)
                if shape is not None and not same_grid(roi_shape, shape):
                    raise HTTPException(422, f"uploaded liver mask: shape {roi_shape} differs from the image's {shape}")
            request.update(options)
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(pool, instance.infer, request)
            if output == "all":
                output = None
            return send_response(instance.datastore(), result, output, background_tasks)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def add_image(
        background_tasks: BackgroundTasks,
        image: str | None = None,
        params: str = Form("{}"),
        file: UploadFile = File(...),
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
    ):
        folder = upload_folder()
        try:
            suffix = image_suffix(file.filename, "uploaded image")
            image_id = check_name(image or os.path.basename(file.filename or "")[: -len(suffix)], "image id")
            info = _json_object(params, "params")
            path = await receive_upload(file, folder, image_id, limit, "uploaded image")
            await run_in_threadpool(image_shape, path, "uploaded image")
            if user and getattr(user, "username", None):
                info["user"] = user.username
            return {"image": await run_in_threadpool(instance.datastore().add_image, image_id, str(path), info)}
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def save_label(
        background_tasks: BackgroundTasks,
        image: str,
        params: str = Form("{}"),
        tag: str = "final",
        label: UploadFile = File(...),
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
    ):
        folder = upload_folder()
        try:
            check_name(image, "image id")
            tag = check_name(tag or "final", "label tag")
            info = _json_object(params, "params")
            shape = await run_in_threadpool(instance.study_shape, image)
            if shape is None:
                raise HTTPException(404, f"image {image!r} is not in the datastore")
            path = await receive_upload(label, folder, image, limit, "uploaded label")
            label_shape = await run_in_threadpool(image_shape, path, "uploaded label")
            if not same_grid(label_shape, shape):
                raise HTTPException(422, f"uploaded label: shape {label_shape} differs from the image's {shape}")
            label_id = await run_in_threadpool(instance.datastore().save_label, image, str(path), tag, info)
            result = instance.on_save_label(image, label_id) or {}
            return {**result, "image": image, "label": label_id}
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    prefix = settings.MONAI_LABEL_API_STR
    router.add_api_route(prefix + "/infer/{model}", infer, methods=["POST"], summary="Run a detector (the app's handler)")
    router.add_api_route(prefix + "/datastore/image", add_image, methods=["PUT"], summary="Upload a study (the app's handler)")
    router.add_api_route(prefix + "/datastore/", add_image, methods=["PUT"], include_in_schema=False)
    router.add_api_route(prefix + "/datastore/label", save_label, methods=["PUT"], summary="Save a label (the app's handler)")
    replaced = {(r.path, m) for r in router.routes for m in r.methods}
    kept = [r for r in fastapi_app.router.routes if not (isinstance(r, APIRoute) and any((r.path, m) in replaced for m in r.methods))]
    fastapi_app.router.routes[:] = list(router.routes) + kept
    # MONAI Label answers every origin, with credentials; here only the configured ones (none by default)
    fastapi_app.user_middleware[:] = [m for m in fastapi_app.user_middleware if m.cls is not CORSMiddleware]
    if access.origins:
        fastapi_app.user_middleware.insert(0, Middleware(
            CORSMiddleware, allow_origins=list(access.origins), allow_credentials=True,
            allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"], allow_headers=["Authorization", "Content-Type"]))  # fmt: skip
    names = {"activelearning": instance._strategies, "scoring": instance._scoring_methods}
    fastapi_app.user_middleware.append(
        Middleware(RequestGuard, limit=limit, allow_model_routes=allow_model_routes, check_train=instance.check_train_request,
                   access=access, names=names, check_batch_infer=check_batch_infer)  # fmt: skip
    )

    async def malformed(request, exc):
        errors = exc.errors() or [{}]
        where = ".".join(str(p) for p in errors[0].get("loc", ()) if p not in ("query", "body", "path", "header"))
        return JSONResponse({"detail": first_line(f"{where or 'request'}: {errors[0].get('msg', 'malformed')}")}, status_code=422)

    fastapi_app.add_exception_handler(RequestValidationError, malformed)
    fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    logger.info("request guard on: uploads up to %.0f MB, model routes %s, %d infer worker(s), origins %s, hosts %s, token %s",
                limit / 2**20, "open" if allow_model_routes else "closed", workers, list(access.origins) or "none",
                sorted(access.hosts), "required" if access.token else "off")  # fmt: skip
    return True


def _json_object(text: Any, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise HTTPException(422, f"{what}: not valid JSON ({first_line(exc)})") from None
    if not isinstance(value, dict):
        raise HTTPException(422, f"{what}: a JSON object is needed")
    return value
