"""The app as an attacker on the same network would try it: a real ``monailabel start_server`` on 127.0.0.1, plain
HTTP requests, no credentials. Every attack must get a 4xx with one line, leave nothing outside the studies folder
(nor in the server's temp folder), and the server must go on serving. One server for the module."""

import http.client
import json
import sys
import time
import urllib.parse
import uuid

import nibabel as nib
import numpy as np
import pytest

from monai_ad import label_server
from monai_ad.training import train

MODEL = "patchcore_liver_ct"
UPLOAD_LIMIT_MB = 2

sys.path.insert(0, str(label_server.APP_DIR))


def _files(folder):
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    studies = label_server.prepare_sample_studies(root, n_normal=2, n_abnormal=1, preset="tiny", progress=False)
    models = root / "models"
    datalist = root / "phantom" / "datalist.json"
    train("patchcore", datalist, models / f"{MODEL}.pt", hparams={"image_size": 32, "coreset_ratio": 0.05}, device="cpu", progress=False)
    victims = root / "victims"
    (victims / "dir").mkdir(parents=True)
    (victims / "dir" / "record.txt").write_text("another patient's data\n")
    server_tmp = root / "server_tmp"
    server_tmp.mkdir()
    env = {"TMPDIR": str(server_tmp), "MONAI_LABEL_SESSION_PATH": str(root / "sessions"), "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    conf = {"model_dir": str(models), "models": MODEL, "max_upload_mb": str(UPLOAD_LIMIT_MB)}
    process, url = label_server.start_server(studies, conf=conf, log_path=root / "server.log", env=env)
    case = json.loads(datalist.read_text())["test"][0]["case_id"]
    try:
        yield {"url": url, "root": root, "studies": studies, "victims": victims, "tmp": server_tmp, "models": models,
               "case": case, "outside": _outside(root), "tmp_files": _files(server_tmp), "process": process}  # fmt: skip
    finally:
        label_server.stop_server(process)


def _outside(root):
    """Every file under the test's folder but the studies folder and the server's temp and log files."""
    return {f for f in _files(root) if not f.startswith(("studies/", "server_tmp/", "sessions/")) and f != "server.log"}


@pytest.fixture(autouse=True)
def nothing_left_behind(server):
    yield
    time.sleep(0.3)  # background clean-up after the response
    assert _outside(server["root"]) == server["outside"], "a request wrote or deleted a file outside the studies folder"
    assert _files(server["tmp"]) <= server["tmp_files"], f"left in the temp folder: {_files(server['tmp']) - server['tmp_files']}"
    assert (server["victims"] / "dir" / "record.txt").is_file()
    assert server["process"].poll() is None, "the server died"


def _request(server, method, path, query=None, fields=None, files=None, body=None, timeout=120):
    url = server["url"] + path + ("?" + urllib.parse.urlencode(query) if query else "")
    headers = {}
    if files is not None or fields is not None:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (fields or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, (filename, content) in (files or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")  # fmt: skip
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif body is not None:
        body = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        try:
            connection.request(method, parts.path + ("?" + parts.query if parts.query else ""), body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) before reading the whole body and closed: its answer is still to be read
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def _refused(answer, *words):
    status, text = answer
    assert 400 <= status < 500, f"accepted ({status}): {text[:300]}"
    detail = json.loads(text)["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    for word in words:
        assert word in detail, detail
    return detail


def _nifti_bytes(tmp_path, shape=(16, 16, 8), name="x.nii.gz"):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), str(path))
    return path.read_bytes()


def _still_serving(server):
    status, text = _request(server, "GET", "/info/")
    assert status == 200 and MODEL in json.loads(text)["trainers"]


# ------------------------------------------------------------------------------------------------ 1. /train
def test_training_cannot_reach_config_targets_or_expressions(server):
    payload = server["root"] / "payload.json"  # as if a client had got a file onto the server
    marker = server["victims"] / "pwned"
    payload.write_text(json.dumps({"run": f"$open({str(marker)!r}, 'w').write('x')"}))
    server["outside"] = _outside(server["root"])
    attacks = [
        {"network_def#_target_": "monai.bundle.run", "network_def#config_file": str(payload)},
        {"network_def#config_file": str(payload)},
        {"train#trainer#output": str(server["victims"] / "model.pt")},
        {"network_def#image_size": "$__import__('os').getcwd()"},
        {"network_def#image_size": "@network_def"},
        {"network_def#image_size": 10**9},
        {"network_def#image_size": True},
        {"network_def#epochs": 3},  # not a PatchCore hyper-parameter
        {"preprocessing_config#window": [240, -160]},
        {"bundle_root": str(server["victims"])},
        {"device": "$x"},
    ]
    for params in attacks:
        _refused(_request(server, "POST", f"/train/{MODEL}", body=params), "training option")
    _refused(_request(server, "POST", "/train/", body={MODEL: {"network_def#_target_": "monai.bundle.run"}}))
    _refused(_request(server, "POST", "/train/", body={"network_def#_target_": "monai.bundle.run"}))
    _refused(_request(server, "POST", "/train/no_such_model", body={}), "unknown model")
    status, text = _request(server, "GET", "/train/")
    assert status == 404 or json.loads(text).get("status") != "RUNNING"  # no training process was started
    time.sleep(1.0)
    assert not marker.exists()
    _still_serving(server)


# ------------------------------------------------------------------------------------------------ 2. datastore
def test_image_ids_and_tags_cannot_leave_the_studies_folder(server, tmp_path):
    image, case = _nifti_bytes(tmp_path), server["case"]
    for path in ("/datastore/", "/datastore/image"):
        for bad in ("../victims/x", "..", "/abs/x", "a/b", "..%2Fx", ""):
            if bad:
                _refused(_request(server, "PUT", path, query={"image": bad}, files={"file": ("x.nii.gz", image)}), "image id")
        _refused(_request(server, "PUT", path, files={"file": ("..nii.gz", image)}))
    _refused(_request(server, "DELETE", "/datastore/", query={"id": "../victims/dir"}), "id")
    _refused(_request(server, "DELETE", "/datastore/image", query={"id": "../../victims"}), "id")
    label = (server["studies"] / "labels" / "liver" / f"{case}.nii.gz").read_bytes()
    _refused(_request(server, "PUT", "/datastore/label", query={"image": case, "tag": "../../x"}, files={"label": ("l.nii.gz", label)}), "label tag")
    _refused(_request(server, "PUT", "/datastore/label", query={"image": "../victims/x", "tag": "final"}, files={"label": ("l.nii.gz", label)}))
    _refused(_request(server, "DELETE", "/datastore/label", query={"id": case, "tag": "../../victims"}))
    _refused(_request(server, "GET", "/datastore/image", query={"image": "../../victims/dir/record.txt"}))
    _refused(_request(server, "PUT", "/datastore/image/info", query={"image": "../x"}, fields={"info": "{}"}))
    assert not (server["root"] / "x.nii.gz").exists() and not (server["root"] / "x").exists()
    assert (server["studies"] / "labels" / "liver" / f"{case}.nii.gz").is_file()
    _still_serving(server)


# ------------------------------------------------------------------------------------------------ 3. infer params
def test_infer_requests_cannot_name_server_paths(server):
    case, secret = server["case"], str(server["victims"] / "dir" / "record.txt")
    other = str(server["studies"] / f"{case}.nii.gz")
    for params in ({"image": other}, {"label": secret}, {"session": {"image": other}}, {"result_extension": "/../../x.nii.gz"},
                   {"save_label": True, "label_tag": "../x"}, {"device": "$x"}, {"label_prompt": ["../x"]},
                   {"result_compress": "yes"}, [1, 2], "not json"):  # fmt: skip
        text = params if isinstance(params, str) else json.dumps(params)
        _refused(_request(server, "POST", f"/infer/{MODEL}", query={"image": case}, fields={"params": text}))
    _refused(_request(server, "POST", f"/infer/{MODEL}", query={"image": other}, fields={"params": "{}"}))
    _refused(_request(server, "POST", f"/infer/{MODEL}", query={"image": "../x"}, fields={"params": "{}"}))
    _refused(_request(server, "POST", f"/infer/{MODEL}", query={"image": case, "session_id": "x"}, fields={"params": "{}"}))
    # what OHIF's MONAI Label panel sends beside the model's own options is accepted
    ohif = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False,
            "label_prompt": ["anomaly"], "pixel_threshold": ""}  # fmt: skip
    status, text = _request(server, "POST", f"/infer/{MODEL}", query={"image": case, "output": "image"}, fields={"params": json.dumps(ohif)})
    assert status == 200, text[:300]
    _still_serving(server)


# ------------------------------------------------------------------------------------------------ 4. model files
def test_model_files_cannot_be_downloaded_replaced_or_deleted(server):
    model_file = server["models"] / f"{MODEL}.pt"
    before = model_file.read_bytes()
    _refused(_request(server, "GET", f"/model/{MODEL}"), "model files")
    _refused(_request(server, "PUT", f"/model/{MODEL}", files={"file": ("m.pt", b"not a model")}), "model files")
    _refused(_request(server, "DELETE", f"/model/{MODEL}"), "model files")
    assert model_file.read_bytes() == before
    _still_serving(server)


# ------------------------------------------------------------------------------------------------ 6. uploads
def test_bad_uploads_are_refused_and_leave_nothing(server, tmp_path):
    case = server["case"]
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (UPLOAD_LIMIT_MB + 1) * 2**20, dtype=np.uint8).tobytes()
    _refused(_request(server, "PUT", "/datastore/image", query={"image": "big"}, files={"file": ("big.nii.gz", big)}), "upload limit")
    _refused(_request(server, "POST", f"/infer/{MODEL}", files={"file": ("big.nii.gz", big)}), "upload limit")
    for name, content, word in (("empty.nii.gz", b"", "empty"), ("text.nii.gz", b"hello, not an image\n" * 50, "cannot be read"),
                                ("random.nii.gz", big[: 2**19], "cannot be read"), ("random.nii", big[: 2**19], "cannot be read"),
                                ("tool.exe", b"MZ" + big[:1000], "only")):  # fmt: skip
        _refused(_request(server, "PUT", "/datastore/image", query={"image": "upload"}, files={"file": (name, content)}), word)
        _refused(_request(server, "POST", f"/infer/{MODEL}", fields={"params": "{}"}, files={"file": (name, content)}), word)
    image = (server["studies"] / f"{case}.nii.gz").read_bytes()
    truncated = image[: len(image) // 2]
    _refused(_request(server, "PUT", "/datastore/label", query={"image": case, "tag": "final"}, files={"label": ("t.nii.gz", truncated)}), "cannot be read")
    wrong_shape = _nifti_bytes(tmp_path, (8, 8, 4))
    _refused(_request(server, "PUT", "/datastore/label", query={"image": case, "tag": "final"}, files={"label": ("w.nii.gz", wrong_shape)}), "shape")
    _refused(_request(server, "POST", f"/infer/{MODEL}", query={"image": case}, files={"label": ("w.nii.gz", wrong_shape)}), "shape")
    _refused(_request(server, "POST", f"/infer/{MODEL}", files={"file": ("i.nii.gz", image), "label": ("w.nii.gz", wrong_shape)}), "shape")
    assert not (server["studies"] / "labels" / "final").exists() or not list((server["studies"] / "labels" / "final").iterdir())
    assert not any(server["studies"].glob("upload*")) and not any(server["studies"].glob("big*"))
    _still_serving(server)


def test_a_good_upload_still_works_and_is_written_whole(server):
    case = server["case"]
    image = (server["studies"] / f"{case}.nii.gz").read_bytes()
    status, text = _request(server, "PUT", "/datastore/image", query={"image": "copy_of_case"}, files={"file": ("c.nii.gz", image)},
                            fields={"params": json.dumps({"normal": False})})  # fmt: skip
    assert status == 200, text
    assert (server["studies"] / "copy_of_case.nii.gz").read_bytes() == image
    assert not list(server["studies"].rglob("*.partial"))
    _still_serving(server)


# ------------------------------------------------------------------------------------------------ 5. exposure
def test_start_commands_bind_to_loopback_and_a_public_bind_needs_auth(tmp_path, monkeypatch):
    from lib.security import exposure_error, server_host

    monkeypatch.chdir(tmp_path)
    assert "--host" in (cmd := label_server.server_command("studies", 8000)) and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert list(tmp_path.iterdir()) == []  # building the command writes nothing
    assert server_host(["monailabel", "start_server", "--app", "a"]) == "0.0.0.0"  # MONAI Label's default
    assert server_host(["x", "start_server", "--host", "127.0.0.1"]) == "127.0.0.1"
    assert server_host(["x", "start_server", "--host=10.0.0.5"]) == "10.0.0.5"
    assert server_host(["python", "-m", "monailabel.interfaces.utils.app", "-m", "train"]) is None
    assert "--host 127.0.0.1" in exposure_error("0.0.0.0", auth_enabled=False, allow_remote=False)
    assert exposure_error("0.0.0.0", auth_enabled=True, allow_remote=False) is None
    assert exposure_error("0.0.0.0", auth_enabled=False, allow_remote=True) is None
    assert exposure_error("127.0.0.1", auth_enabled=False, allow_remote=False) is None
    readmes = [label_server.PROJECT_ROOT / "README.md", label_server.APP_DIR / "README.md"]
    for readme in readmes:
        for line in readme.read_text().splitlines():
            if "monailabel start_server --" in line:  # a start command, not prose naming it
                assert "--host 127.0.0.1" in line or ("--host" in line and "MONAI_LABEL_AUTH_ENABLE=true" in readme.read_text()), line
    assert all("Running it safely" in r.read_text() for r in readmes)


def test_the_app_is_found_or_a_clear_message_says_how(monkeypatch, tmp_path):
    from monai_ad.errors import InputError

    assert label_server.find_app_dir() == label_server.APP_DIR
    monkeypatch.setenv("MONAI_AD_APP_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="MONAI_AD_APP_DIR"):
        label_server.find_app_dir()


# ------------------------------------------------------------------------------------------------ 7. atomic saves
def test_label_saves_are_atomic(tmp_path, monkeypatch):
    import shutil

    from lib import datastore as safe

    studies = tmp_path / "studies"
    studies.mkdir()
    image = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), str(image))
    store = safe.SafeLocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    store.add_image("case", str(image), {})
    first = tmp_path / "first.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.uint8), np.eye(4)), str(first))
    store.save_label("case", str(first), "final", {})
    saved = studies / "labels" / "final" / "case.nii.gz"
    assert saved.read_bytes() == first.read_bytes()

    def killed(src, dst, length=0):
        dst.write(src.read(10))
        raise OSError("killed during the save")

    monkeypatch.setattr(shutil, "copyfileobj", killed)
    with pytest.raises(OSError):
        store.save_label("case", str(image), "final", {})
    assert saved.read_bytes() == first.read_bytes()  # the previous label, whole
    assert sorted(p.name for p in saved.parent.iterdir()) == ["case.nii.gz"]
    for bad in ("../x", "a/b", ".."):
        with pytest.raises(Exception, match="plain name|outside"):
            store.save_label("case", str(first), bad, {})
        with pytest.raises(Exception, match="plain name|outside"):
            store.add_image(bad, str(image), {})
    assert not list(tmp_path.rglob("*.partial"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.nii.gz").exists()


def test_a_torn_final_label_is_skipped_not_fatal(tmp_path, caplog):
    from lib import studies as study_rules
    from lib.datastore import SafeLocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    image = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), str(image))
    store = SafeLocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    for name in ("torn", "whole"):
        store.add_image(name, str(image), {})
        store.save_label(name, str(image), "liver", {})
        store.save_label(name, str(image), "final", {})
    torn = studies / "labels" / "final" / "torn.nii.gz"
    torn.write_bytes(torn.read_bytes()[:40])
    normal = [s.image_id for s in study_rules.normal_studies(store)]
    assert normal == ["whole"] and "cannot be read" in caplog.text
