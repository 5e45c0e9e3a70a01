"""The "Similar cases" page in a real browser: first view (thumbnails not yet drawn) and later views
(thumbnails cached), against the JSON API answering the same query in the same run.

A real ``medfinder serve`` (embedded mode, its own data folder, the REST port on 127.0.0.1) with the active bundle
of ``paths.data_dir`` (``--bundle DIR`` for another) receives 12 studies from dcmtk ``storescu``: the two
lung-pet-ct-dx series (Lung_Dx-A0001 series 2, Lung_Dx-A0002 series 2) rewritten ``--copies`` times each with new
Study/Series/SOP Instance UIDs and patient ids, so a query has 10 results (its own patient's copies excluded:
each copy is its own patient). Headless Debian Chromium (selenium, ``--headless --no-sandbox --disable-gpu``)
holds a page session (the node's signed session cookie) and loads ``/ui/studies/{uid}/similar?limit=10``.

Figures: navigation timing ``loadEventEnd - navigationStart`` (the HTML, the stylesheet and all 11 thumbnails
loaded) for the first view (cold thumbnail cache on the node) and the median of ``--views`` later views, with the
browser's cache on (what a reader gets) and off (every thumbnail fetched again, from the node's cache); the HTML
alone over httpx; and ``GET /api/v1/studies/{uid}/similar?limit=10`` (JSON) as the reference.

    python -m benchmarks ui_page [--views 7] [--copies 6] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from config import load_settings
from config.settings import default_shared_data_dir

SERIES = ("Lung_Dx-A0001_series2_5mm", "Lung_Dx-A0002_series2_B70f")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
LIMIT = 10


def rewrite_copies(source: Path, out: Path, copies: int, tag: str) -> list[str]:
    """``copies`` copies of one series as new studies (new UIDs, patient id/name); their StudyInstanceUIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    study_uids = []
    files = sorted(source.glob("*.dcm"))
    for copy in range(copies):
        study_uid = generate_uid(entropy_srcs=[tag, str(copy), "study"])
        series_uid = generate_uid(entropy_srcs=[tag, str(copy), "series"])
        folder = out / f"{tag}-{copy}"
        folder.mkdir(parents=True)
        for number, path in enumerate(files):
            ds = pydicom.dcmread(path)
            sop_uid = generate_uid(entropy_srcs=[tag, str(copy), str(number)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.PatientID = f"BENCH-{tag}-{copy}"
            ds.PatientName = f"Bench^{tag}{copy}"
            ds.AccessionNumber = f"B{tag[-4:]}{copy:02d}"
            ds.save_as(folder / path.name)
        study_uids.append(str(study_uid))
    return study_uids


def _driver() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1600,1200", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _load_ms(driver: Any, url: str) -> tuple[float, int]:
    """One navigation: loadEventEnd - navigationStart (ms) and how many result cards the DOM holds."""
    driver.get(url)
    timing = driver.execute_script(
        "const t = performance.timing; return [t.navigationStart, t.loadEventEnd];")
    while not timing[1]:  # get() returns at load; loadEventEnd is set just after the handlers ran
        time.sleep(0.01)
        timing = driver.execute_script("const t = performance.timing; return [t.navigationStart, t.loadEventEnd];")
    broken = driver.execute_script("return Array.from(document.images).filter(i => !i.naturalWidth).length")
    if broken:
        raise RuntimeError(f"{broken} thumbnail(s) did not load")
    cards = driver.execute_script("return document.querySelectorAll('.results [data-study-uid]').length")
    return float(timing[1] - timing[0]), int(cards)


def run(bundle: Path, views: int, copies: int, workdir: Path) -> dict[str, Any]:
    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from node_helpers import (
        free_port,
        start_node,
        stop_process,
        storescu,
        wait_for,
        write_node_config,
    )

    from dicom_node.api.tokens import TokenStore, tokens_path
    from dicom_node.api.ui import signing
    from model_export.registry import install_bundle

    lung = default_shared_data_dir() / "ct" / "lung-pet-ct-dx"
    data_dir = workdir / "node-data"
    install_bundle(bundle, data_dir, activate=True)
    token = TokenStore(tokens_path(data_dir)).create("benchmark", ["read"])
    uids: list[str] = []
    for index, name in enumerate(SERIES):
        uids += rewrite_copies(lung / name, workdir / "studies", copies, f"s{index}")
    # No PDF companions: they draw the same thumbnails into the same cache, and the first view must find it cold.
    config = write_node_config(workdir / "node.yaml", data_dir, None, workers={"onnx_threads": None},
                               results={"companion": "off"})
    dicom_port, http_port = free_port(), free_port()
    node = start_node(config, dicom_port, workdir / "node.log", "--http-port", str(http_port))
    root = f"http://127.0.0.1:{http_port}"
    bearer = {"Authorization": f"Bearer {token}"}
    try:
        result = storescu(dicom_port, workdir / "studies", timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr

        def indexed() -> bool:
            studies = httpx.get(f"{root}/api/v1/studies", headers=bearer, timeout=30).json()["studies"]
            return sum(s["state"] in ("indexed", "reported") for s in studies) >= len(uids)

        wait_for(indexed, 900, f"{len(uids)} studies indexed", interval=1.0)
        query = uids[0]
        page = f"{root}/ui/studies/{query}/similar?limit={LIMIT}"
        api = f"{root}/api/v1/studies/{query}/similar"
        with httpx.Client(headers=bearer, timeout=60) as client:
            hits = len(client.get(api, params={"limit": LIMIT}).json()["results"])
        drawn = list((data_dir / "thumbnails").rglob("*.png"))
        assert not drawn, f"{len(drawn)} thumbnails drawn before the first view"
        key = signing.load_or_create_key(signing.ui_key_path(data_dir))
        cookie = signing.sign_session(key, signing.Session(signing.LINK_PRINCIPAL, None, int(time.time()) + 3600))
        driver = _driver()
        try:
            driver.get(f"{root}/ui/static/ui.css")  # same origin, inside the cookie's path: set the session
            driver.add_cookie({"name": "medfinder_ui", "value": cookie, "path": "/ui", "httpOnly": True})
            first_ms, cards = _load_ms(driver, page)
            cached = [_load_ms(driver, page)[0] for _ in range(views)]
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
            uncached = [_load_ms(driver, page)[0] for _ in range(views)]
        finally:
            driver.quit()
        api_ms, html_ms = [], []
        with httpx.Client(headers=bearer, timeout=60) as client:
            for _ in range(max(views, 20)):  # interleaved, so both see the same node
                for url, into in ((api, api_ms), (f"{root}/ui/studies/{query}/similar", html_ms)):
                    started = time.perf_counter()
                    client.get(url, params={"limit": LIMIT}).raise_for_status()
                    into.append((time.perf_counter() - started) * 1000)
    finally:
        stop_process(node)
    return {"studies": len(uids), "results": hits, "cards": cards, "first_view_ms": first_ms,
            "later_view_ms": statistics.median(cached), "later_view_no_browser_cache_ms": statistics.median(uncached),
            "html_only_ms": statistics.median(html_ms), "json_api_ms": statistics.median(api_ms),
            "later_views": cached, "later_views_no_browser_cache": uncached, "views": views}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks ui_page")
    parser.add_argument("--views", type=int, default=7, help="later views to take the median of (>= 5)")
    parser.add_argument("--copies", type=int, default=6, help="copies of each lung series (2 x copies studies)")
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: the active bundle of paths.data_dir)")
    args = parser.parse_args(argv)
    from model_export.errors import BundleError
    from model_export.registry import active_bundle_path

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        print("ui_page: skipped: Debian chromium + chromium-driver are not installed (make setup)")
        return 0
    try:
        bundle = args.bundle or active_bundle_path(load_settings(None))
    except BundleError as error:
        print(f"ui_page: skipped: {error}")
        return 0
    with tempfile.TemporaryDirectory(prefix="medfinder-ui-") as tmp:
        figures = run(bundle, max(5, args.views), args.copies, Path(tmp))
    api = figures["json_api_ms"]
    print(f"'Similar cases' page, {figures['studies']} studies indexed, {figures['cards']} result cards "
          f"(limit {LIMIT}), headless Chromium, bundle {bundle.name[:12]}:")
    rows = [("first view (thumbnails drawn on demand)", figures["first_view_ms"]),
            (f"later views, median of {figures['views']} (browser cache on)", figures["later_view_ms"]),
            (f"later views, median of {figures['views']} (browser cache off)",
             figures["later_view_no_browser_cache_ms"]),
            ("page HTML alone over httpx, median", figures["html_only_ms"]),
            ("JSON API GET /similar?limit=10, median (reference)", api)]
    for label, ms in rows:
        print(f"  {label:<58} {ms:8.1f} ms  {ms / api:6.1f}x API")
    verdict = "meets" if figures["later_view_no_browser_cache_ms"] <= 1000 else "MISSES"
    print(f"  later view <= 1 s (thumbnails cached, even with the browser cache off): {verdict}")
    print(json.dumps({"benchmark": "ui_page", **figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
