#!/usr/bin/env python
"""End-to-end check of the app against a real DICOMweb store and OHIF, all on loopback, nothing downloaded.

1. start Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) in a temporary folder;
2. ingest the real CT series (``monai_ad.dicomweb``: missing UIDs filled in deterministically);
3. train a small PatchCore on tiny phantom studies (the plumbing is under test, not the detector);
4. start ``monailabel start_server`` with the app against Orthanc's DICOMweb root (dcmqi's
   ``itkimage2segimage`` from the venv: no download), the liver ROI from a folder of masks named by
   SeriesInstanceUID (the series' TotalSegmentator map, liver = 5);
5. run the detector on the series by its SeriesInstanceUID; save the result as ``final`` (a DICOM SEG stored
   back to Orthanc); choose the operating threshold on it (``/scoring/feedback_threshold``);
   the infer task stores the reading back to Orthanc as DICOM SEG (one segment per lesion), Parametric Map
   (the heatmap) and TID 1500 SR (``monai_ad.dicom_results``);
6. open ``/ohif/viewer?StudyInstanceUIDs=...`` in headless Chromium (Selenium + Debian chromium/chromedriver),
   wait until the viewport shows the CT, save a screenshot; check that the study browser lists the SEG, the
   Parametric Map and the SR, open each in the viewport (double-click its thumbnail) and screenshot it, with
   what the page drew over the image (SVG annotation elements and their text: the SR's lesion long axes) and
   the browser console while it loaded (DIR/ohif_console.log);
7. open OHIF's MONAI Label mode (``/ohif/monai-label?...``), point its panel at the server, run the detector
   from there and screenshot the segment it draws.

Usage: ``python scripts/ohif_check.py [--out DIR]``; prints a JSON summary (also written to DIR/summary.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_ad import dicomweb, label_server
from monai_ad.training import train
from monai_ad.data.phantom import write_phantom_dataset

REAL_CT = label_server.PROJECT_ROOT.parent / "shared" / "data" / "real_ct" / "ts_example"
MODEL = "patchcore_liver_ct"
TOTALSEGMENTATOR_LIVER = 5
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--window-size=1400,900"]  # fmt: skip


def missing_tools() -> list[str]:
    wanted = {"Orthanc": shutil.which("Orthanc"), "orthanc-dicomweb": Path(dicomweb.ORTHANC_PLUGIN).is_file() or None,
              "chromium": Path(CHROMIUM).is_file() or None, "chromedriver": Path(CHROMEDRIVER).is_file() or None,
              "itkimage2segimage": shutil.which("itkimage2segimage", path=str(Path(sys.executable).parent))}  # fmt: skip
    try:
        import selenium  # noqa: F401
    except ImportError:
        wanted["selenium"] = None
    return [name for name, found in wanted.items() if not found]


def viewport_shows_image(png: Path) -> float:
    """Spread of grey levels in the middle of the page (the OHIF viewport): ~0 while black or empty."""
    from PIL import Image

    image = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    h, w = image.shape
    return float(image[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3].std())


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, read with get_log("browser")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def console_messages(driver) -> list[str]:
    """The browser console's messages since the last call, one line each ("LEVEL message")."""
    return [f"{entry['level']} {entry['message']}" for entry in driver.get_log("browser")]


def drawn_annotations(driver) -> dict:
    """What the viewports draw over their images: cornerstone's SVG layer's shapes and text lines."""
    shapes = driver.execute_script(
        "return document.querySelectorAll('svg.svg-layer line, svg.svg-layer polyline, svg.svg-layer path, "
        "svg.svg-layer circle, svg.svg-layer ellipse').length;"
    )
    texts = driver.execute_script("return Array.from(document.querySelectorAll('svg.svg-layer text')).map(t => t.textContent);")
    return {"svg_shapes": int(shapes), "svg_text": [t for t in texts if t.strip()][:12]}


def screenshot_ohif(url: str, out_png: Path, timeout: float = 90.0) -> dict:
    driver = chromium()
    start = time.time()
    spread = 0.0
    try:
        driver.get(url)
        while time.time() - start < timeout:
            time.sleep(3)
            driver.save_screenshot(str(out_png))
            spread = viewport_shows_image(out_png)
            if spread > 20:
                time.sleep(2)  # let the last tiles settle
                driver.save_screenshot(str(out_png))
                break
        title = driver.title
    finally:
        driver.quit()
    return {"url": url, "screenshot": str(out_png), "viewport_grey_std": round(viewport_shows_image(out_png), 2),
            "rendered": spread > 20, "seconds": round(time.time() - start, 1), "title": title}  # fmt: skip


def changed_fraction(before: Path, after: Path) -> float:
    """Share of pixels of the left (axial) viewport that differ between two screenshots."""
    from PIL import Image

    a = np.asarray(Image.open(before).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(after).convert("RGB"), dtype=np.int16)
    h, w = a.shape[:2]
    region = (slice(h // 8, 7 * h // 8), slice(w // 5, w * 2 // 5))
    return float((np.abs(a[region] - b[region]).sum(-1) > 30).mean())


RESULT_SERIES = {"segmentation": "Anomaly lesions", "parametric_map": "Anomaly heatmap", "report": "Anomaly findings"}


def study_series(dicomweb_url: str, study_uid: str) -> list[dict]:
    """The study's series as QIDO-RS lists them: UID, modality and description."""
    with urllib.request.urlopen(f"{dicomweb_url}/studies/{study_uid}/series?includefield=0008103E") as response:
        series = json.loads(response.read())
    value = lambda s, tag: (s.get(tag, {}).get("Value") or [""])[0]  # noqa: E731
    return [{"uid": value(s, "0020000E"), "modality": value(s, "00080060"), "description": value(s, "0008103E")} for s in series]


def open_results_in_ohif(url: str, study_uid: str, out: Path, timeout: float = 90.0) -> dict:
    """OHIF's viewer on the study: which of the DICOM results its study browser lists (by series description), and
    each one opened in the viewport of a freshly loaded viewer (so no result inherits another's display settings)
    by a double-click on its thumbnail, screenshot before and after, with what is drawn over the image and the
    browser console of each (all in DIR/ohif_console.log)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = chromium()
    start, shown, console = time.time(), {}, {}
    base = out / "ohif_results_base.png"

    def load_viewer() -> str:
        begun = time.time()
        driver.get(f"{url}/ohif/viewer?StudyInstanceUIDs={study_uid}")
        while time.time() - begun < timeout:
            time.sleep(3)
            driver.save_screenshot(str(base))
            if viewport_shows_image(base) > 20:
                break
        time.sleep(3)
        driver.save_screenshot(str(base))
        return driver.find_element(By.TAG_NAME, "body").text

    try:
        for kind, description in RESULT_SERIES.items():
            entry = {"listed": description in load_viewer()}
            console[f"{kind} (viewer loading)"] = console_messages(driver)
            labels = driver.find_elements(By.XPATH, f"//*[contains(text(), '{description}')]")
            if labels:
                png = out / f"ohif_{kind}.png"
                ActionChains(driver).double_click(labels[0]).perform()
                time.sleep(8)  # the series loads (a SEG is hydrated over its CT)
                driver.save_screenshot(str(png))
                entry.update(opened=True, screenshot=str(png), viewport_changed=round(changed_fraction(base, png), 4),
                             viewport_grey_std=round(viewport_shows_image(png), 2), **drawn_annotations(driver),
                             page_mentions=[w for w in ("Segmentation", "Lesion 1", "Length", "Volume", "Anomaly score",
                                                         "not supported", "Unable", "Error") if w in driver.find_element(By.TAG_NAME, "body").text])  # fmt: skip
                console[kind] = console_messages(driver)
                entry["console_problems"] = [m for m in console[kind] if m.startswith(("SEVERE", "WARNING"))][:12]
            shown[kind] = entry
    finally:
        with open(out / "ohif_console.log", "w") as log:
            for stage, messages in console.items():
                log.write(f"== {stage}\n" + "".join(f"{m}\n" for m in messages))
        driver.quit()
    return {**shown, "seconds": round(time.time() - start, 1)}


def run_detector_in_ohif(url: str, study_uid: str, server_log: Path, out: Path, timeout: float = 120.0) -> dict:
    """OHIF's MONAI Label mode: point its panel at the server, check the detector is listed, press Run, wait
    for the server to answer, and screenshot the viewport before and after (the anomaly segment is drawn)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def infer_answers() -> int:
        return server_log.read_text(errors="replace").count("Result File:")

    driver = chromium()
    start = time.time()
    try:
        driver.get(f"{url}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
        box = None
        while box is None and time.time() - start < timeout:
            time.sleep(2)
            boxes = [i for i in driver.find_elements(By.CSS_SELECTOR, "input[type=text]") if "http" in (i.get_attribute("value") or "")]
            box = boxes[0] if boxes else None
        if box is None:
            return {"listed": False, "ran": False, "reason": "no server field in the MONAI Label panel"}
        time.sleep(3)  # the series loads
        box.send_keys(Keys.CONTROL + "a")  # one key chord per call: the modifier stays down until the call ends
        box.send_keys(Keys.DELETE)
        box.send_keys(url + "/")
        box.find_element(By.XPATH, "./following::button[1]").click()  # connect
        time.sleep(5)
        listed = MODEL in driver.find_element(By.TAG_NAME, "body").text
        driver.save_screenshot(str(out / "ohif_monai_label_before.png"))
        answers = infer_answers()
        runs = [b for b in driver.find_elements(By.XPATH, "//button") if b.text.strip() == "Run"]
        if not (listed and runs):
            return {"listed": listed, "ran": False}
        runs[0].click()
        while infer_answers() == answers and time.time() - start < timeout:
            time.sleep(1)
        time.sleep(5)  # the label map is fetched and drawn
        driver.save_screenshot(str(out / "ohif_monai_label.png"))
    finally:
        driver.quit()
    return {"listed": listed, "ran": infer_answers() > answers, "screenshot": str(out / "ohif_monai_label.png"),
            "viewport_changed": round(changed_fraction(out / "ohif_monai_label_before.png", out / "ohif_monai_label.png"), 4),
            "seconds": round(time.time() - start, 1)}  # fmt: skip


def run_check(out: Path) -> dict:
    from monailabel.client import MONAILabelClient

    out.mkdir(parents=True, exist_ok=True)
    timings, summary = {}, {}
    t0 = time.time()
    shutil.rmtree(out / "orthanc", ignore_errors=True)  # this check's own store: a run's study holds that run's series only
    orthanc, dicomweb_url = dicomweb.start_orthanc(out / "orthanc", label_server.free_port())
    server = None
    try:
        uids = dicomweb.ingest_series(REAL_CT / "example_ct_dicom", dicomweb_url)
        again = dicomweb.repair_uids(dicomweb.read_series(REAL_CT / "example_ct_dicom"))
        summary["ingest"] = {"StudyInstanceUID": uids.study, "SeriesInstanceUID": uids.series, "instances": len(uids.instances),
                             "deterministic": (again.study, again.series, again.instances) == (uids.study, uids.series, uids.instances)}  # fmt: skip
        timings["orthanc_and_ingest"] = time.time() - t0

        t = time.time()
        models = out / "models"
        datalist = write_phantom_dataset(out / "phantom", n_normal=3, n_abnormal=0, preset="tiny", progress=False)
        train("patchcore", datalist, models / f"{MODEL}.pt",
                     hparams={"image_size": 64, "coreset_ratio": 0.05}, device="cpu", progress=False)  # fmt: skip
        roi_dir = out / "roi"
        roi_dir.mkdir(exist_ok=True)
        shutil.copy(REAL_CT / "example_seg_dicom.nii.gz", roi_dir / f"{uids.series}.nii.gz")
        timings["model"] = time.time() - t

        t = time.time()
        conf = {"model_dir": str(models), "roi_dir": str(roi_dir), "roi_label": str(TOTALSEGMENTATOR_LIVER), "models": MODEL}
        env = {"MONAI_LABEL_DATASTORE_CACHE_PATH": str(out / "cache"), "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(out / "cache"),
               "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}  # fmt: skip
        server, url = label_server.start_server(dicomweb_url, conf=conf, log_path=out / "server.log", env=env, timeout=240)
        timings["server_start"] = time.time() - t
        client = MONAILabelClient(url, tmpdir=str(out / "client"))
        with urllib.request.urlopen(url + "/datastore/?output=stats") as response:
            summary["datastore_stats"] = json.loads(response.read())

        t = time.time()
        label_file, params = client.infer(MODEL, uids.series, {})
        label = nib.load(label_file)
        summary["infer"] = {"label_shape": list(label.shape), "slices_scored": sum(s is not None for s in params["slice_scores"]),
                            "abnormal_slices": params["abnormal_slices"], "lesions": len(params["lesions"]),
                            "label_names": params["label_names"], "anomaly_voxels": int(np.count_nonzero(np.asarray(label.dataobj)))}  # fmt: skip
        timings["infer"] = time.time() - t
        stored = params.get("dicom_results") or {}
        ours = {v["SeriesInstanceUID"] for v in stored.values() if isinstance(v, dict)}
        summary["dicom_results"] = {"stored": stored, "series": [s for s in study_series(dicomweb_url, uids.study) if s["uid"] in ours]}

        t = time.time()
        client.save_label(uids.series, label_file, tag="final", params={"label_info": [{"name": "anomaly", "idx": 1}]})
        series = [s for s in study_series(dicomweb_url, uids.study) if s["uid"] not in ours]  # the CT and the saved label
        summary["after_save"] = {"series_in_study": len(series), "modalities": sorted(s["modality"] for s in series)}
        timings["save_final_seg"] = time.time() - t

        t = time.time()  # the saved correction drives the operating threshold (run in the server: run_sync)
        request = urllib.request.Request(f"{url}/scoring/feedback_threshold?run_sync=true", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=300) as response:
            feedback = json.loads(response.read()).get(MODEL) or {}
        summary["feedback"] = {k: feedback.get(k) for k in ("cases", "threshold_before", "threshold_after", "dice_before", "dice_after")}
        timings["feedback_threshold"] = time.time() - t

        t = time.time()
        summary["ohif"] = screenshot_ohif(f"{url}/ohif/viewer?StudyInstanceUIDs={uids.study}", out / "ohif_viewer.png")
        timings["ohif"] = time.time() - t

        t = time.time()
        summary["ohif_dicom_results"] = open_results_in_ohif(url, uids.study, out)
        timings["ohif_dicom_results"] = time.time() - t

        t = time.time()
        summary["ohif_monai_label"] = run_detector_in_ohif(url, uids.study, out / "server.log", out)
        timings["ohif_monai_label"] = time.time() - t
    finally:
        if server is not None:
            label_server.stop_server(server)
        orthanc.terminate()
        orthanc.wait(20)
    summary["seconds"] = {k: round(v, 1) for k, v in {**timings, "total": time.time() - t0}.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (default: a new temporary folder)")
    args = parser.parse_args()
    missing = missing_tools()
    if missing:
        print(f"missing: {', '.join(missing)} (scripts/setup_env.sh installs them)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ohif_check_"))
    summary = run_check(out)
    print(json.dumps(summary, indent=2))
    sr_drawn = summary["ohif_dicom_results"].get("report", {}).get("svg_shapes", 0) > 0  # the lesions' long axes
    ok = summary["ohif"]["rendered"] and summary["after_save"]["series_in_study"] >= 2 and summary["ohif_monai_label"]["ran"] and sr_drawn
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
