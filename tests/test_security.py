"""The app as an attacker on the same network would try it: a real ``monailabel start_server`` on 127.0.0.1, plain
HTTP requests, no credentials. Every attack must get a 4xx with one line, leave nothing outside the studies folder
(nor in the server's temp folder), and the server must go on serving. One server for the module."""

import base64
import http.client
import json
import os
import re
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
    # the lock a memory detector's correction takes on its model file (lib.scoring.feedback_memory) is the app's own
    return {f for f in _files(root) if not f.startswith(("studies/", "server_tmp/", "sessions/")) and f != "server.log"
            and not (f.startswith("models/") and f.endswith(".memory.lock"))}


@pytest.fixture(autouse=True)
def nothing_left_behind(server):
    yield
    time.sleep(0.3)  # background clean-up after the response
    assert _outside(server["root"]) == server["outside"], "a request wrote or deleted a file outside the studies folder"
    assert _files(server["tmp"]) <= server["tmp_files"], f"left in the temp folder: {_files(server['tmp']) - server['tmp_files']}"
    assert (server["victims"] / "dir" / "record.txt").is_file()
    assert server["process"].poll() is None, "the server died"


def _request(server, method, path, query=None, fields=None, files=None, body=None, timeout=120, headers=None, answer_headers=None):
    """``(status, text)``; the answer's headers go into ``answer_headers`` when a dict is given. ``path`` is sent
    as written (percent-encodings included)."""
    url = server["url"] + path + ("?" + urllib.parse.urlencode(query) if query else "")
    headers = dict(headers or {})
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
        if answer_headers is not None:
            answer_headers.update({k.lower(): v for k, v in response.getheaders()})
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
    assert not list(server["studies"].rglob("*.partial*"))
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
    assert "--host 127.0.0.1" in exposure_error("0.0.0.0", auth_enabled=False, token_on=False)
    assert "auth_token_file" in exposure_error("10.0.0.5", auth_enabled=False, token_on=False)
    assert exposure_error("0.0.0.0", auth_enabled=True, token_on=False) is None
    assert exposure_error("0.0.0.0", auth_enabled=False, token_on=True) is None
    assert exposure_error("127.0.0.1", auth_enabled=False, token_on=False) is None
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
    assert not list(tmp_path.rglob("*.partial*"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.nii.gz").exists()


def test_the_datastore_record_is_replaced_whole(tmp_path, monkeypatch):
    """MONAI Label rewrites ``datastore_v2.json`` in place; a write cut short must leave the previous record, which
    the datastore opens again."""
    from pathlib import Path

    from lib.datastore import SafeLocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    image = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), str(image))
    store = SafeLocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    store.add_image("case", str(image), {"normal": True})
    record = studies / "datastore_v2.json"
    before = record.read_bytes()

    def cut_short(path, text, *args, **kwargs):
        with open(path, "w") as out:
            out.write(text[:20])
        raise OSError("killed while writing")

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(OSError):
        store.update_image_info("case", {"normal": False})
    monkeypatch.undo()
    assert record.read_bytes() == before
    assert SafeLocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False).get_image_info("case")["normal"] is True
    assert not [p.name for p in studies.iterdir() if p.name.startswith(".") and "partial" in p.name]


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


# ------------------------------------------------------------------------------------------------ 8. browsers
def test_other_origins_and_host_names_are_refused(server):
    own = server["url"]
    for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example", own + ".evil.example", "https://127.0.0.1"):
        answer = {}
        _refused(_request(server, "GET", "/datastore/", headers={"Origin": origin}, answer_headers=answer), "cross-origin")
        assert "access-control-allow-origin" not in answer and "access-control-allow-credentials" not in answer
        answer = {}
        preflight = {"Origin": origin, "Access-Control-Request-Method": "GET"}
        status, _ = _request(server, "OPTIONS", "/datastore/", headers=preflight, answer_headers=answer)
        assert status >= 400 and "access-control-allow-origin" not in answer, (origin, status, answer)
        _refused(_request(server, "PUT", "/datastore/label", query={"image": server["case"], "tag": "final"}, headers={"Origin": origin},
                          files={"label": ("l.nii.gz", b"x")}), "cross-origin")  # fmt: skip
    port = urllib.parse.urlsplit(own).port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", "", f"[::2]:{port}"):
        _refused(_request(server, "GET", "/datastore/", headers={"Host": host}), "Host")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert _request(server, "GET", "/info/", headers={"Host": host})[0] == 200
    assert _request(server, "GET", "/info/", headers={"Origin": own})[0] == 200  # the server's own pages (OHIF at /ohif/)


def test_access_options_are_checked_at_start(tmp_path):
    from lib.security import LOOPBACK, access_from_conf

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-of-24-chars\n")
    token_file.chmod(0o600)
    access = access_from_conf({"allowed_origins": "https://OHIF.hospital.example/, http://10.0.0.7:3000", "allowed_hosts": "ml.hospital.example"}, "127.0.0.1", False)
    assert access.origins == ("https://ohif.hospital.example", "http://10.0.0.7:3000") and access.token is None
    assert access.hosts == {*LOOPBACK, "ml.hospital.example"}
    assert "10.1.2.3" in access_from_conf({"auth_token_file": str(token_file)}, "10.1.2.3", False).hosts
    assert access_from_conf({"auth_token_file": str(token_file)}, "0.0.0.0", False).token == b"s3cret-token-of-24-chars"
    assert "0.0.0.0" not in access_from_conf({"auth_token_file": str(token_file)}, "0.0.0.0", False).hosts
    assert access_from_conf({}, "0.0.0.0", True).token is None  # MONAI Label's own authentication
    weak = tmp_path / "weak"
    weak.write_text("short\n")
    weak.chmod(0o600)
    for conf, host, auth, words in (
        ({"allowed_origins": "*"}, "127.0.0.1", False, "'*'"),
        ({"allowed_origins": "https://x.example/ohif"}, "127.0.0.1", False, "no path"),
        ({}, "0.0.0.0", False, "auth_token_file"),
        ({"allow_remote": "true"}, "10.0.0.5", False, "no authentication"),  # the option it replaces opens nothing
        ({"auth_token_file": str(tmp_path / "missing")}, "127.0.0.1", False, "cannot be read"),
        ({"auth_token_file": str(weak)}, "127.0.0.1", False, "at least 16"),
        ({"auth_token_file": str(token_file)}, "0.0.0.0", True, "cannot both be on"),
    ):
        with pytest.raises(ValueError, match=re.escape(words)):
            access_from_conf(conf, host, auth)
    token_file.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        access_from_conf({"auth_token_file": str(token_file)}, "127.0.0.1", False)
    with pytest.raises(ValueError, match="MONAI_LABEL_CORS_ORIGINS"):
        access_from_conf({}, "127.0.0.1", False, cors_origins=["*"])


# ------------------------------------------------------------------------------------------------ 9. links
@pytest.fixture(scope="module")
def planted(server):
    """Links in the studies folder: to a study outside it (symbolic and hard), a label folder and a label file
    pointing outside."""
    studies, victims = server["studies"], server["victims"]
    image = (studies / f"{server['case']}.nii.gz").read_bytes()
    outside_study = victims / "other_patient.nii.gz"
    outside_study.write_bytes(image)
    (victims / "labels_elsewhere").mkdir()
    links = [studies / "linked_study.nii.gz", studies / "hardlinked_study.nii.gz", studies / "labels" / "elsewhere"]
    links[0].symlink_to(outside_study)
    os.link(outside_study, links[1])
    links[2].symlink_to(victims / "labels_elsewhere", target_is_directory=True)
    (studies / "labels" / "final").mkdir(parents=True, exist_ok=True)
    final_link = studies / "labels" / "final" / f"{server['case']}.nii.gz"
    final_link.symlink_to(victims / "dir" / "record.txt")
    server["outside"] = _outside(server["root"])
    time.sleep(2.0)  # the datastore's file watcher has seen them
    before = {p: p.read_bytes() for p in victims.rglob("*") if p.is_file()}
    yield {"ids": ("linked_study", "hardlinked_study"), "final_link": final_link, "victims_before": before}
    for link in [*links, final_link]:
        if link.is_symlink() or link.is_file():
            link.unlink()


def test_links_out_of_the_studies_folder_are_not_served(server, planted):
    status, text = _request(server, "GET", "/datastore/", query={"output": "all"})
    assert status == 200
    listed = json.loads(text)["objects"]
    for output in ("stats", "train"):
        status, text = _request(server, "GET", "/datastore/", query={"output": output})
        assert status == 200 and not any(image_id in text for image_id in planted["ids"]) and str(server["victims"]) not in text
    assert server["case"] in listed and not set(planted["ids"]) & set(listed)
    assert "final" not in listed[server["case"]]["labels"]  # the label file is a link out
    for image_id in planted["ids"]:
        _refused(_request(server, "GET", "/datastore/image", query={"image": image_id}))
        _refused(_request(server, "POST", f"/infer/{MODEL}", query={"image": image_id}, fields={"params": "{}"}), "not in the datastore")
        label = (server["studies"] / "labels" / "liver" / f"{server['case']}.nii.gz").read_bytes()
        _refused(_request(server, "PUT", "/datastore/label", query={"image": image_id, "tag": "final"}, files={"label": ("l.nii.gz", label)}))
    _refused(_request(server, "GET", "/datastore/label", query={"label": server["case"], "tag": "final"}))
    for _ in range(8):
        status, text = _request(server, "POST", "/activelearning/random", body={})
        assert status == 200, text
        sample = json.loads(text)
        assert sample.get("id") not in planted["ids"] and str(server["victims"]) not in text
        if sample.get("path"):
            assert os.path.realpath(sample["path"]).startswith(os.path.realpath(server["studies"]) + os.sep)
    status, text = _request(server, "GET", "/datastore/dataset")
    assert "other_patient" not in text and "another patient" not in text
    label = (server["studies"] / "labels" / "liver" / f"{server['case']}.nii.gz").read_bytes()
    _refused(_request(server, "PUT", "/datastore/label", query={"image": server["case"], "tag": "elsewhere"}, files={"label": ("l.nii.gz", label)}), "outside")
    # a save over a label that is a link out replaces the link; the file it pointed to is untouched
    status, text = _request(server, "PUT", "/datastore/label", query={"image": server["case"], "tag": "final"}, files={"label": ("l.nii.gz", label)})
    assert status == 200, text
    assert not planted["final_link"].is_symlink() and planted["final_link"].read_bytes() == label
    assert {p: p.read_bytes() for p in server["victims"].rglob("*") if p.is_file()} == planted["victims_before"]
    planted["final_link"].unlink()
    _still_serving(server)


# ------------------------------------------------------------------------------------------------ 10. the corpus
def _hostile(method, path, words="", query=None, body=None, params=None, files=None, headers=None, id=None):
    return pytest.param({"method": method, "path": path, "query": query, "body": body, "params": params, "files": files,
                         "headers": headers, "words": words}, id=id or f"{method} {path} {query or body or params or files or headers or ''}"[:80])  # fmt: skip


NIFTI = b"nifti"  # replaced by a readable image in the test
HOSTILE_REQUESTS = [
    # strategy and scoring names
    _hostile("POST", "/activelearning/first", "unknown activelearning", body={}),
    _hostile("POST", "/activelearning/__class__", "unknown activelearning", body={}),
    _hostile("POST", "/activelearning/" + "r" * 300, "unknown activelearning", body={}, id="POST /activelearning/<300 chars>"),
    _hostile("POST", "/activelearning/%00", "unknown activelearning", body={}),
    _hostile("POST", "/activelearning/random%00", "unknown activelearning", body={}),
    _hostile("POST", "/activelearning/random%2F..", "Not Found", body={}),
    _hostile("POST", "/activelearning/random", "not accepted", body={"strategy": "__class__"}),
    _hostile("POST", "/activelearning/random", "label tag", body={"label_tag": "../x"}),
    _hostile("POST", "/activelearning/random", "client_id", body={"client_id": "x" * 1000}),
    _hostile("POST", "/activelearning/random", "JSON object", body=[1, 2]),
    _hostile("POST", "/scoring/__class__", "unknown scoring", body={}),
    _hostile("POST", "/scoring/feedback_threshold%00", "unknown scoring", body={}),
    _hostile("PUT", "/session/", "sessions", body={}),
    # query values and their encodings
    _hostile("GET", "/datastore/", "output", query={"output": "\x00"}),
    _hostile("GET", "/datastore/dataset", "limit_cases", query={"limit_cases": "nan"}),
    _hostile("GET", "/datastore/image", "image id", query={"image": "a\x00b"}),
    _hostile("GET", "/datastore/image", "image id", query={"image": "%2e%2e%2fvictims"}),  # sent double-encoded
    _hostile("GET", "/datastore/image?image=%2e%2e%2fvictims%2fdir%2frecord.txt", "image id"),
    _hostile("GET", "/datastore/image?image=..%c0%afvictims", "image id"),  # an overlong UTF-8 '/'
    _hostile("GET", "/datastore/image?image=..%5cvictims", "image id"),
    _hostile("GET", "/datastore/image", "image id", query={"image": "x" * 300}, id="GET /datastore/image <300 chars>"),
    _hostile("GET", "/datastore/image", "image id", query={"image": "..\u2215victims"}),
    _hostile("GET", "/datastore/image", "image id", query={"image": "\uff0e\uff0e"}),  # full-width dots
    _hostile("GET", "/datastore/label", "label tag", query={"label": "x", "tag": "final\x00"}),
    # infer options
    _hostile("INFER", "", "pixel_threshold", params={"pixel_threshold": "nan"}),
    _hostile("INFER", "", "pixel_threshold", params={"pixel_threshold": float("nan")}),
    _hostile("INFER", "", "pixel_threshold", params={"pixel_threshold": float("inf")}),
    _hostile("INFER", "", "slice_threshold", params={"slice_threshold": "-Infinity"}),
    _hostile("INFER", "", "min_lesion_mm3", params={"min_lesion_mm3": -1e9}),
    _hostile("INFER", "", "min_lesion_mm3", params={"min_lesion_mm3": 1e300}),
    _hostile("INFER", "", "roi_label", params={"roi_label": 1.5}),
    _hostile("INFER", "", "roi_label", params={"roi_label": -3}),
    _hostile("INFER", "", "not accepted", params={"__class__": 1}),
    # uploads named to escape
    _hostile("PUT", "/datastore/image", "only", files={"file": ("x.nii.gz\x00.exe", NIFTI)}),
    _hostile("PUT", "/datastore/image", "image id", files={"file": ("..\\..\\x.nii.gz", NIFTI)}),
    _hostile("PUT", "/datastore/image", None, query={"image": "ok"}, files={"file": ("x.nii.gz", NIFTI)}, headers={"Content-Length": "-1"}),
    _hostile("PUT", "/datastore/label", "label tag", query={"image": "x", "tag": "..%2f"}, files={"label": ("l.nii.gz", NIFTI)}),
    # who is asking
    _hostile("GET", "/datastore/", "cross-origin", headers={"Origin": "http://evil.example"}),
    _hostile("GET", "/datastore/", "cross-origin", headers={"Origin": "null"}),
    _hostile("POST", "/train/patchcore_liver_ct", "cross-origin", body={}, headers={"Origin": "https://evil.example"}),
    _hostile("GET", "/datastore/", "Host", headers={"Host": "rebind.evil.example"}),
    _hostile("GET", "/datastore/", "Host", headers={"Host": "127.0.0.1@evil.example"}),
    # batch inference: the model's options and MONAI Label's batch keys only, no image list, never on the event loop
    _hostile("POST", f"/batch/infer/{MODEL}", "run_sync", query={"run_sync": "true"}, body={}),
    _hostile("POST", f"/batch/infer/{MODEL}", "images", query={"images": "../victims"}, body={}),
    _hostile("POST", f"/batch/infer/{MODEL}", "not accepted", query={"image": "x"}, body={}),
    _hostile("POST", "/batch/infer/__class__", "unknown model", body={}),
    _hostile("POST", f"/batch/infer/{MODEL}", "not accepted", body={"images": ["../victims/dir/record.txt"]}),
    _hostile("POST", f"/batch/infer/{MODEL}", "not accepted", body={"model": "another_model"}),
    _hostile("POST", f"/batch/infer/{MODEL}", "not accepted", body={"bundle_path": "/tmp"}),
    _hostile("POST", f"/batch/infer/{MODEL}", "max_workers", body={"max_workers": 10**6}),
    _hostile("POST", f"/batch/infer/{MODEL}", "max_workers", body={"max_workers": 0}),
    _hostile("POST", f"/batch/infer/{MODEL}", "max_batch_size", body={"max_batch_size": -1}),
    _hostile("POST", f"/batch/infer/{MODEL}", "label tag", body={"label_tag": "../x"}),
    _hostile("POST", f"/batch/infer/{MODEL}", "gpus", body={"gpus": "0;1"}),
    _hostile("POST", f"/batch/infer/{MODEL}", "device", body={"device": "cuda; rm"}),
    _hostile("POST", f"/batch/infer/{MODEL}", "pixel_threshold", body={"pixel_threshold": "nan"}),
    _hostile("POST", f"/batch/infer/{MODEL}", "JSON object", body=[1, 2]),
]


@pytest.mark.parametrize("attack", HOSTILE_REQUESTS)
def test_hostile_request_is_refused_with_one_line(server, attack, tmp_path):
    """Each request of the corpus gets a 4xx with one line; nothing changes outside the studies folder, nothing
    is added to it (the autouse fixture checks the rest) and the server goes on serving."""
    studies_before = _files(server["studies"])
    files = {k: (name, _nifti_bytes(tmp_path) if content is NIFTI else content) for k, (name, content) in (attack["files"] or {}).items()}
    if attack["method"] == "INFER":
        fields = {"params": json.dumps(attack["params"], allow_nan=True)}
        answer = _request(server, "POST", f"/infer/{MODEL}", query={"image": server["case"]}, fields=fields, headers=attack["headers"])
    else:
        answer = _request(server, attack["method"], attack["path"], query=attack["query"], body=attack["body"],
                          files=files or None, headers=attack["headers"])  # fmt: skip
    if attack["words"] is None:  # refused by the HTTP layer itself, before the app: a bare 400
        assert answer[0] == 400, answer
    else:
        _refused(answer, *([attack["words"]] if attack["words"] else []))
    assert _files(server["studies"]) - studies_before <= {"datastore_v2.json"}
    _still_serving(server)


def test_batch_inference_is_bounded(server):
    """A large body is refused before it is parsed; an accepted run gets at most the server's infer workers, one
    device, and runs in the background (it is stopped here before it starts)."""
    _refused(_request(server, "POST", f"/batch/infer/{MODEL}", body={"label_info": [{"x": "y" * (1 << 20)}]}), "1 MB")
    status, text = _request(server, "POST", f"/batch/infer/{MODEL}", query={"images": "labeled"},
                            body={"label_tag": "no_such_tag", "max_batch_size": 1})  # fmt: skip
    assert status == 200, text
    request = json.loads(text)["request"]
    assert request["max_workers"] == 2 and request["multi_gpu"] is False and request["images"] == "labeled", request
    assert request["label_tag"] == "no_such_tag" and request["model"] == MODEL
    assert _request(server, "DELETE", "/batch/infer")[0] == 200
    deadline = time.time() + 60
    while _request(server, "GET", "/batch/infer", query={"check_if_running": "true"})[0] == 200:
        assert time.time() < deadline, "the batch run did not stop"
        time.sleep(0.5)
    _still_serving(server)


def test_an_uploaded_file_name_only_gives_the_study_its_name(server, tmp_path):
    """MONAI Label's client sends the local path as the file name; only its last part is used, for the id."""
    for name, image_id in (("../../victims/escaped.nii.gz", "escaped"), ("/tmp/abs_path.nii.gz", "abs_path")):
        status, text = _request(server, "PUT", "/datastore/image", files={"file": (name, _nifti_bytes(tmp_path))})
        assert status == 200 and json.loads(text)["image"] == image_id, text
        assert (server["studies"] / f"{image_id}.nii.gz").is_file()
        assert _request(server, "DELETE", "/datastore/image", query={"id": image_id})[0] == 200
    assert not (server["victims"] / "escaped.nii.gz").exists() and not (server["root"] / "escaped.nii.gz").exists()


def test_a_scoring_run_that_hangs_frees_its_slot():
    import subprocess

    from lib import tasks
    from monailabel.utils.async_tasks import utils

    method = "scoring_check"
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    utils.background_tasks[method] = [{"id": "hung", "status": "RUNNING"}]
    utils.background_processes[method] = {"hung": hung}
    try:
        assert tasks.busy(method)
        tasks.stop_overdue(method, limit_s=1.0, every_s=0.2)
        deadline = time.time() + 20
        while hung.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert hung.poll() is not None, "the hung run was not stopped"
        assert not tasks.busy(method) and utils.background_tasks[method][0]["status"] == "STOPPED"
    finally:
        hung.kill()
        utils.background_tasks.pop(method, None), utils.background_processes.pop(method, None)


# ------------------------------------------------------------------------------------------------ 11. the access token
TOKEN = "k2V9-the-site-token-7QpL"
VIEWER = "http://viewer.hospital.example:3000"


@pytest.fixture(scope="module")
def token_server(server, tmp_path_factory):
    """A second server, on its own copy of the studies, with a token, an allowed viewer origin and a host name."""
    import shutil

    root = tmp_path_factory.mktemp("token")
    studies = root / "studies"
    shutil.copytree(server["studies"], studies, ignore=shutil.ignore_patterns(".monai_ad"), symlinks=True)
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    conf = {"model_dir": str(server["models"]), "models": MODEL, "auth_token_file": str(token_file), "allowed_origins": VIEWER,
            "allowed_hosts": "ml.hospital.example"}  # fmt: skip
    env = {"MONAI_LABEL_SESSION_PATH": str(root / "sessions"), "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    # the server answers /info/ only with the token: wait for it as a client holding the token would
    process, url = None, None
    port = label_server.free_port()
    app_dir, log_config = label_server.prepare_state(label_server.state_dir(studies))
    cmd = label_server.server_command(studies, port, conf, app_dir=app_dir, log_config=log_config)
    import subprocess

    with open(root / "server.log", "ab") as log:
        process = subprocess.Popen(cmd, env=label_server.server_env(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-2000:]
            try:
                if _request({"url": url}, "GET", "/info/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1.0)
        yield {"url": url, "studies": studies, "process": process}
    finally:
        label_server.stop_server(process)


def _routes(token_server):
    """Every route of the server: those of its OpenAPI schema and those it leaves out of it."""
    status, text = _request(token_server, "GET", "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    routes = {(method.upper(), re.sub(r"\{[^}]+\}", "x", path)) for path, item in json.loads(text)["paths"].items() for method in item}
    routes |= {("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/favicon.ico"), ("POST", "/reload"),
               ("GET", "/static/favicon.ico"), ("GET", "/ohif/"), ("PUT", "/datastore/"), ("DELETE", "/datastore/"), ("POST", "/scoring/"),
               ("GET", "/proxy/dicom/qido/studies"), ("POST", "/infer/wsi/x"), ("OPTIONS", "/info/")}  # fmt: skip
    assert len(routes) > 40 and ("POST", "/infer/x") in routes and ("PUT", "/datastore/label") in routes
    return sorted(routes)


def test_with_a_token_every_route_refuses_a_request_without_it(token_server):
    wrong = [None, "Bearer", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"bearer  {TOKEN.lower()}", f"Token {TOKEN}",
             "Basic " + base64.b64encode(b"admin:admin").decode(), "Basic !!!", f"Basic {TOKEN}"]  # fmt: skip
    routes = _routes(token_server)
    for i, (method, path) in enumerate(routes):
        authorization = wrong[i % len(wrong)]
        headers = {"Authorization": authorization} if authorization else {}
        answer = {}
        status, text = _request(token_server, method, path, headers=headers, answer_headers=answer)
        assert status == 401, (method, path, status, text[:200])
        if method != "HEAD":  # a HEAD answer has no body
            _refused((status, text), "access token")
        assert answer.get("www-authenticate", "").startswith("Bearer"), (method, path)
    for authorization in wrong:
        _refused(_request(token_server, "GET", "/datastore/", query={"output": "all"}, headers={"Authorization": authorization} if authorization else {}), "access token")
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert _request(token_server, "GET", "/info/", headers=good)[0] == 200
    basic = {"Authorization": "Basic " + base64.b64encode(f"radiologist:{TOKEN}".encode()).decode()}
    status, text = _request(token_server, "GET", "/datastore/", query={"output": "all"}, headers=basic)
    assert status == 200 and json.loads(text)["objects"]
    port = urllib.parse.urlsplit(token_server["url"]).port
    assert _request(token_server, "GET", "/info/", headers={**good, "Host": f"ml.hospital.example:{port}"})[0] == 200
    _refused(_request(token_server, "GET", "/info/", headers={**good, "Host": f"other.example:{port}"}), "Host")
    # the token does not open what the guard closes
    _refused(_request(token_server, "GET", f"/model/{MODEL}", headers=good), "model files")
    _refused(_request(token_server, "GET", "/datastore/image", query={"image": "../x"}, headers=good), "image id")


def test_the_allowed_viewer_origin_may_call_the_server_and_no_other(token_server):
    good = {"Authorization": f"Bearer {TOKEN}"}
    answer = {}
    status, _ = _request(token_server, "OPTIONS", "/datastore/", headers={"Origin": VIEWER, "Access-Control-Request-Method": "GET",
                                                                           "Access-Control-Request-Headers": "authorization"}, answer_headers=answer)  # fmt: skip
    assert status == 200 and answer["access-control-allow-origin"] == VIEWER and answer["access-control-allow-credentials"] == "true"
    answer = {}
    assert _request(token_server, "GET", "/info/", headers={**good, "Origin": VIEWER}, answer_headers=answer)[0] == 200
    assert answer["access-control-allow-origin"] == VIEWER
    answer = {}
    _refused(_request(token_server, "GET", "/info/", headers={**good, "Origin": "http://evil.example"}, answer_headers=answer), "cross-origin")
    assert "access-control-allow-origin" not in answer
    _refused(_request(token_server, "GET", "/info/", headers={"Origin": VIEWER}), "access token")  # the origin is no credential


def test_monai_label_jwt_path_offline(monkeypatch):
    """MONAI Label's own authentication, exercised without a Keycloak server: its realm key stubbed with a key
    made here. Requests without a token or with a forged one are refused (401); with the installed PyJWT (2.x,
    which needs the algorithms named) a correctly signed token is refused as well, so that path admits nobody."""
    import asyncio

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from fastapi import HTTPException
    from monailabel.endpoints.user import auth

    def public_pem(key):
        return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    realm, forger = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    monkeypatch.setattr(auth.settings, "MONAI_LABEL_AUTH_ENABLE", True)
    monkeypatch.setattr(auth, "get_public_key", lambda uri: public_pem(realm))
    claims = {"preferred_username": "radiologist", "realm_access": {"roles": ["monailabel-user"]}, "exp": int(time.time()) + 600}
    signed, forged = jwt.encode(claims, realm, algorithm="RS256"), jwt.encode(claims, forger, algorithm="RS256")
    assert jwt.decode(signed, public_pem(realm), algorithms=["RS256"])["preferred_username"] == "radiologist"
    for token in ("", "not-a-jwt", forged, signed):
        with pytest.raises(HTTPException) as refused:
            asyncio.run(auth.get_current_user(token))
        assert refused.value.status_code == 401, token


def test_upload_folders_left_by_a_stopped_server_are_removed_and_live_ones_kept(tmp_path):
    import subprocess

    from lib.security import UPLOAD_PREFIX, remove_stale_uploads, upload_folder

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    stale = tmp_path / f"{UPLOAD_PREFIX}{ended.pid}_abc"
    stale.mkdir()
    (stale / "image.nii.gz").write_bytes(b"partial")
    live = upload_folder(str(tmp_path))  # this process's: a request in flight
    (live / "image.nii.gz").write_bytes(b"in flight")
    other = tmp_path / f"{UPLOAD_PREFIX}notapid"
    other.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = tmp_path / f"{UPLOAD_PREFIX}{ended.pid}_link"
    link.symlink_to(outside)
    assert remove_stale_uploads(str(tmp_path)) == 1
    assert not stale.exists() and (live / "image.nii.gz").read_bytes() == b"in flight"
    assert other.is_dir() and link.is_symlink() and outside.is_dir()
