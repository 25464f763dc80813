"""Latency of the MONAI Label app under concurrent clients: 1, 8 and 16 clients each send one ``/infer`` at the
same moment (PatchCore, a sample phantom study by id) while another client polls ``/info`` and ``/datastore``.

Prints, per client count: the infer latencies (median, max), the wall time for all of them, and the latency of
``/info`` / ``/datastore`` answered meanwhile. The server is a real ``monailabel start_server`` on 127.0.0.1.

    python benchmarks/bench_app_latency.py [--clients 1 8 16] [--preset tiny|small] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import format_table, record

from monai_ad import label_server
from monai_ad.training import train

MODEL = "patchcore_liver_ct"


def infer(url: str, image: str) -> float:
    boundary = uuid.uuid4().hex
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{{}}\r\n--{boundary}--\r\n'.encode()
    request = urllib.request.Request(f"{url}/infer/{MODEL}?image={image}&output=json", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        json.loads(response.read())
    return time.perf_counter() - start


def poll(url: str, stop: threading.Event, seconds: list[float]) -> None:
    paths = ("/info/", "/datastore/?output=stats")
    i = 0
    while not stop.is_set() and i < 10_000:
        start = time.perf_counter()
        with urllib.request.urlopen(url + paths[i % 2], timeout=120) as response:
            response.read()
        seconds.append(time.perf_counter() - start)
        i += 1
        stop.wait(0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--workers", type=int, default=2, help="the app's infer_workers")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_app_") as scratch:
        root = Path(args.work or scratch)
        studies = label_server.prepare_sample_studies(root, n_normal=3, n_abnormal=2, preset=args.preset, progress=False)
        datalist = root / "phantom" / "datalist.json"
        models = root / "models"
        train("patchcore", datalist, models / f"{MODEL}.pt", hparams={"coreset_ratio": 0.05}, device="cpu", progress=False)
        case = json.loads(datalist.read_text())["test"][0]["case_id"]
        conf = {"model_dir": str(models), "models": MODEL, "infer_workers": str(args.workers)}
        env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
        process, url = label_server.start_server(studies, conf=conf, log_path=root / "server.log", env=env)
        rows = []
        try:
            infer(url, case)  # warm-up: the model loads once
            for n in args.clients:
                stop, side = threading.Event(), []
                watcher = threading.Thread(target=poll, args=(url, stop, side))
                start = time.perf_counter()
                watcher.start()
                with ThreadPoolExecutor(n) as pool:
                    latencies = list(pool.map(lambda _: infer(url, case), range(n)))
                wall = time.perf_counter() - start
                stop.set()
                watcher.join()
                rows.append({"clients": n, "infer median s": statistics.median(latencies), "infer max s": max(latencies),
                             "all done s": wall, "/info + /datastore median s": statistics.median(side) if side else "",
                             "/info + /datastore max s": max(side) if side else "", "side requests": len(side)})  # fmt: skip
        finally:
            label_server.stop_server(process)
    table = format_table(rows, list(rows[0]))
    notes = [f"PatchCore (224 px, coreset 0.05) on one {args.preset} phantom study by id, `output=json`; "
             f"the app's infer_workers = {args.workers}; every client sends one request at the same moment, "
             "a side client polls /info and /datastore every 0.25 s meanwhile"]  # fmt: skip
    record("MONAI Label app: latency under concurrent clients", torch.device("cpu"), [table], notes,
           results=None if args.no_record else Path(__file__).resolve().parent / "RESULTS.md")  # fmt: skip


if __name__ == "__main__":
    main()
