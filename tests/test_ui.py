"""The "Similar cases" pages over real HTTP: ``medfinder serve --http-port`` in its own process with the two
lung-pet-ct-dx studies (dcmtk storescu), tokens and signed links from the real ``medfinder`` commands, a real
Debian Orthanc holding one of the studies (for the "Open in Orthanc" link), and headless Chromium.

The first study is sent alone first: while it is the only one indexed its page shows the empty state, captured
then (HTML and the ``ui-empty.png`` screenshot). Screenshots go to ``$MEDFINDER_ARTIFACTS`` (default
``<repo>/artifacts``): ``ui-results.png`` (A0001's page with A0002's card) and ``ui-empty.png``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from browser_helpers import artifacts_dir, chromium
from node_helpers import (
    free_port,
    start_node,
    stop_process,
    storescu,
    wait_for,
    write_node_config,
)
from orthanc_helpers import orthanc_server
from PIL import Image
from test_api import (
    A0001_SERIES,
    A0002_SERIES,
    MEDFINDER,
    _all_indexed,
    _health,
    create_token,
    study_uid_of,
)

from config.settings import OrthancSettings
from dicom_node.api.orthanc_links import OrthancLinks
from dicom_node.api.ui import signing
from model_export.registry import install_bundle

# Reports are PHI and HTML is code: this report must come back escaped in the snippet, never as markup.
HOSTILE_REPORT = ("FINDINGS: <script>alert('x')</script> <b>Spiculated</b> mass in the right upper lobe & "
                  "hilar nodes. IMPRESSION: suspicious for malignancy.")


@dataclass(frozen=True)
class UiNode:
    root: str  # http://127.0.0.1:PORT
    data_dir: Path
    log: Path
    a0001: str
    a0002: str
    reader: str  # token names: reader (read), ris (report)
    ris: str
    orthanc_url: str
    orthanc_a0002: str  # A0002's Orthanc study id
    empty_html: str  # A0001's page while it was the only study indexed

    def client(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.root, headers=headers, timeout=120, follow_redirects=False)

    @contextlib.contextmanager
    def signed_in(self, token: str | None = None) -> Iterator[httpx.Client]:
        """A client holding a session cookie from the login form."""
        with self.client() as client:
            response = client.post("/ui/login", data={"token": token or self.reader, "next": "/ui/"})
            assert response.status_code == 303, response.text
            yield client

    def audit_lines(self) -> list[dict]:
        path = self.data_dir / "audit" / "audit.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def ui_link(data_dir: Path, study_uid: str, *args: str) -> str:
    result = subprocess.run([MEDFINDER, "ui", "link", study_uid, "--data-dir", str(data_dir), *args],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def _orthanc_config(folder: Path, http_port: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"Name": "ui-test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
              "HttpPort": http_port, "DicomPort": free_port(), "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": []}
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def _screenshot(url: str, name: str, wait_for_uid: str | None) -> None:
    with chromium() as driver:
        driver.get(url)
        if wait_for_uid:
            wait_for(lambda: driver.execute_script(
                "return Array.from(document.images).every(i => i.complete)"), 30, "the thumbnails")
        driver.save_screenshot(str(artifacts_dir() / name))


@pytest.fixture(scope="module")
def ui_node(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, lung_ct_dir: Path) -> Iterator[UiNode]:
    work = tmp_path_factory.mktemp("ui")
    data_dir = work / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    reader = create_token(data_dir, "reader", "read")
    ris = create_token(data_dir, "ris", "report")
    a0001, a0002 = study_uid_of(lung_ct_dir / A0001_SERIES), study_uid_of(lung_ct_dir / A0002_SERIES)
    orthanc_port = free_port()
    with orthanc_server(_orthanc_config(work / "orthanc", orthanc_port), orthanc_port, work / "orthanc.log"):
        orthanc_url = f"http://127.0.0.1:{orthanc_port}"
        first = min((lung_ct_dir / A0002_SERIES).glob("*.dcm"))
        uploaded = httpx.post(f"{orthanc_url}/instances", content=first.read_bytes(), timeout=60)
        assert uploaded.status_code == 200, uploaded.text
        orthanc_a0002 = uploaded.json()["ParentStudy"]
        config = write_node_config(work / "node.yaml", data_dir, None, query={"return_report_snippets": True},
                                   orthanc={"url": orthanc_url, "timeout_s": 2.0})
        dicom_port, http_port = free_port(), free_port()
        log = work / "node.log"
        node = start_node(config, dicom_port, log, "--http-port", str(http_port))
        try:
            root = f"http://127.0.0.1:{http_port}"
            wait_for(lambda: _health(f"{root}/api/v1"), 30, "the REST API")
            bearer = {"Authorization": f"Bearer {reader}"}
            # A0001 alone first: its page's empty state.
            assert storescu(dicom_port, sorted((lung_ct_dir / A0001_SERIES).glob("*.dcm"))).returncode == 0
            wait_for(lambda: _all_indexed(f"{root}/api/v1", reader, {a0001}), 240,
                     f"A0001 indexed\n{log.read_text(errors='replace')[-3000:]}", interval=0.5)
            empty = httpx.get(f"{root}/ui/studies/{a0001}/similar", headers=bearer, timeout=120)
            assert empty.status_code == 200, empty.text
            _screenshot(ui_link(data_dir, a0001, "--base-url", root), "ui-empty.png", None)
            assert storescu(dicom_port, sorted((lung_ct_dir / A0002_SERIES).glob("*.dcm"))).returncode == 0
            wait_for(lambda: _all_indexed(f"{root}/api/v1", reader, {a0001, a0002}), 240,
                     f"both indexed\n{log.read_text(errors='replace')[-3000:]}", interval=0.5)
            put = httpx.put(f"{root}/api/v1/studies/{a0002}/report", content=HOSTILE_REPORT.encode(),
                            headers={"Authorization": f"Bearer {ris}", "Content-Type": "text/plain"}, timeout=120)
            assert put.status_code == 200, put.text
            yield UiNode(root=root, data_dir=data_dir, log=log, a0001=a0001, a0002=a0002, reader=reader, ris=ris,
                         orthanc_url=orthanc_url, orthanc_a0002=orthanc_a0002, empty_html=empty.text)
        finally:
            stop_process(node)


def _cards(html: str) -> list[str]:
    return re.findall(r'<article class="card[^"]*" data-study-uid="([0-9.]+)"', html)


# --- the page ---------------------------------------------------------------------------------------------


def test_the_page_shows_the_query_study_and_the_other_study_ranked(ui_node: UiNode) -> None:
    with ui_node.signed_in() as client:
        page = client.get(f"/ui/studies/{ui_node.a0001}/similar")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    assert _cards(page.text) == [ui_node.a0001, ui_node.a0002], "the query card, then the result"
    result = page.text.split(f'data-study-uid="{ui_node.a0002}"')[1]
    assert '<span class="rank">#1</span>' in result
    width = int(re.search(r'<span style="width: (\d+)%">', result).group(1))
    assert 0 <= width <= 100
    assert re.search(r"<dd>\d{4}-\d{2}-\d{2}</dd>", result), "dates as YYYY-MM-DD"
    assert f'href="/ui/studies/{ui_node.a0002}/similar">Similar to this' in result
    assert f'src="/ui/thumbnails/{ui_node.a0002}.png"' in result
    assert 'href="/ui/static/ui.css"' in page.text
    assert 'action="/ui/search"' in page.text and 'name="date_from"' in page.text and 'name="body_part"' in page.text


def test_open_in_orthanc_only_for_the_study_orthanc_holds(ui_node: UiNode) -> None:
    with ui_node.signed_in() as client:
        page = client.get(f"/ui/studies/{ui_node.a0001}/similar").text
    query, result = page.split(f'data-study-uid="{ui_node.a0002}"')
    expected = f"{ui_node.orthanc_url}/app/explorer.html#study?uuid={ui_node.orthanc_a0002}"
    assert f'href="{expected}"' in result and "Open in Orthanc" in result
    assert "Open in Orthanc" not in query, "Orthanc does not hold A0001"


def test_report_snippet_is_escaped(ui_node: UiNode) -> None:
    with ui_node.signed_in() as client:
        page = client.get(f"/ui/studies/{ui_node.a0001}/similar").text
    assert "<script>alert" not in page and "<b>Spiculated" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &lt;b&gt;Spiculated&lt;/b&gt;" in page
    assert "&amp; hilar nodes" in page


def test_empty_state_and_filtered_empty_state(ui_node: UiNode) -> None:
    assert "No similar studies yet: 1 study indexed." in ui_node.empty_html
    assert _cards(ui_node.empty_html) == [ui_node.a0001], "the query card alone"
    with ui_node.signed_in() as client:
        filtered = client.get(f"/ui/studies/{ui_node.a0001}/similar",
                              params={"date_from": "1900-01-01", "date_to": "1900-12-31"})
        body_part = client.get(f"/ui/studies/{ui_node.a0001}/similar", params={"body_part": "knee"})
    for page in (filtered, body_part):
        assert page.status_code == 200
        assert "No similar studies match these filters (2 studies indexed)." in page.text
    assert 'value="1900-01-01"' in filtered.text and 'value="knee"' in body_part.text, "the form keeps the filters"


def test_unknown_study_is_a_404_page_and_bad_filters_a_422_page(ui_node: UiNode) -> None:
    with ui_node.signed_in() as client:
        unknown = client.get("/ui/studies/1.2.826.0.1.3680043.8.498.77/similar")
        bad_date = client.get(f"/ui/studies/{ui_node.a0001}/similar", params={"date_from": "2020-13-45"})
        reversed_range = client.get(f"/ui/studies/{ui_node.a0001}/similar",
                                    params={"date_from": "2021-01-01", "date_to": "2020-01-01"})
        bad_uid = client.get("/ui/studies/not-a-uid/similar")
        too_many = client.get(f"/ui/studies/{ui_node.a0001}/similar", params={"limit": "1000"})
    assert unknown.status_code == 404 and "text/html" in unknown.headers["content-type"]
    assert "does not hold study 1.2.826.0.1.3680043.8.498.77 (yet)" in unknown.text
    assert bad_date.status_code == 422 and "not a calendar date" in bad_date.text
    assert reversed_range.status_code == 422 and "is after" in reversed_range.text
    assert bad_uid.status_code == 422 and "text/html" in bad_uid.headers["content-type"]
    assert too_many.status_code == 422 and "limit" in too_many.text


def test_text_search_by_post_keeps_the_text_out_of_urls_and_logs(ui_node: UiNode) -> None:
    text = "Spiculated mass, right upper lobe; UI search marker QX-7731"
    before = len(ui_node.audit_lines())
    with ui_node.signed_in() as client:
        page = client.post("/ui/search", data={"text": text, "limit": "10"})
        blank = client.post("/ui/search", data={"text": "   "})
    assert page.status_code == 200
    assert set(_cards(page.text)) == {ui_node.a0001, ui_node.a0002}
    assert "QX-7731" in page.text, "the text stays in the box to refine it"
    assert blank.status_code == 422
    entry = next(e for e in ui_node.audit_lines()[before:] if e["kind"] == "search")
    assert entry["token"] == "reader" and entry["parameters"]["interface"] == "ui"
    assert entry["parameters"]["text"] == text and set(entry["results"]) == {ui_node.a0001, ui_node.a0002}
    assert "QX-7731" not in ui_node.log.read_text(errors="replace")


def test_landing_lists_recent_studies(ui_node: UiNode) -> None:
    with ui_node.signed_in() as client:
        landing = client.get("/ui/")
        bare = client.get("/ui")
    assert landing.status_code == 200
    assert set(_cards(landing.text)) == {ui_node.a0001, ui_node.a0002}
    assert '<p class="big-number">2</p>' in landing.text
    assert f'href="/ui/studies/{ui_node.a0001}/similar"' in landing.text
    assert bare.status_code == 303 and bare.headers["location"] == "/ui/"


def test_ui_queries_are_audited(ui_node: UiNode) -> None:
    before = len(ui_node.audit_lines())
    with ui_node.signed_in() as client:
        client.get(f"/ui/studies/{ui_node.a0001}/similar", params={"limit": "5"})
        client.get("/ui/studies/1.2.826.0.1.3680043.8.498.78/similar")
    similar = [e for e in ui_node.audit_lines()[before:] if e["kind"] == "similar"]
    assert [e["status"] for e in similar] == [200, 404]
    assert similar[0]["parameters"] == {"interface": "ui", "study_uid": ui_node.a0001, "limit": 5}
    assert similar[0]["results"] == [ui_node.a0002] and similar[0]["token"] == "reader"


# --- thumbnails -------------------------------------------------------------------------------------------


def test_thumbnails_for_the_pages_and_the_rest_api(ui_node: UiNode) -> None:
    with ui_node.signed_in() as client:
        page_png = client.get(f"/ui/thumbnails/{ui_node.a0002}.png")
        unknown = client.get("/ui/thumbnails/1.2.826.0.1.3680043.8.498.79.png")
    assert page_png.status_code == 200 and page_png.headers["content-type"] == "image/png"
    assert page_png.headers["cache-control"].startswith("private, max-age=")
    assert Image.open(io.BytesIO(page_png.content)).size == (192, 192)
    assert unknown.status_code == 404
    with ui_node.client() as anonymous:
        assert anonymous.get(f"/ui/thumbnails/{ui_node.a0002}.png").status_code == 401, "an <img>: no redirect"
    with ui_node.client(Authorization=f"Bearer {ui_node.reader}") as rest:
        lung = rest.get(f"/api/v1/studies/{ui_node.a0002}/thumbnail")
        mediastinum = rest.get(f"/api/v1/studies/{ui_node.a0002}/thumbnail", params={"window": "mediastinum"})
        bone = rest.get(f"/api/v1/studies/{ui_node.a0002}/thumbnail", params={"window": "bone"})
        missing = rest.get("/api/v1/studies/1.2.826.0.1.3680043.8.498.79/thumbnail")
    assert lung.status_code == mediastinum.status_code == 200
    assert lung.content == page_png.content, "the same cached rendering"
    assert mediastinum.content != lung.content
    assert bone.status_code == 422 and missing.status_code == 404
    with ui_node.client(Authorization=f"Bearer {ui_node.ris}") as no_read:
        assert no_read.get(f"/api/v1/studies/{ui_node.a0002}/thumbnail").status_code == 403
    with ui_node.client() as anonymous:
        assert anonymous.get(f"/api/v1/studies/{ui_node.a0002}/thumbnail").status_code == 401
    kinds = [(e["kind"], e["parameters"].get("window"), e["status"]) for e in ui_node.audit_lines()]
    assert ("thumbnail", "mediastinum", 200) in kinds
    cached = list((ui_node.data_dir / "thumbnails" / ui_node.a0002).glob("*.png"))
    assert {p.name.split("-", 1)[1] for p in cached} >= {"lung-192.png", "mediastinum-192.png"}


# --- who may look -----------------------------------------------------------------------------------------


def test_a_browser_without_credentials_is_sent_to_the_login_form(ui_node: UiNode) -> None:
    with ui_node.client() as client:
        page = client.get(f"/ui/studies/{ui_node.a0001}/similar", params={"limit": "5"})
        landing = client.get("/ui/")
        form = client.get("/ui/login", params={"next": f"/ui/studies/{ui_node.a0001}/similar"})
        css = client.get("/ui/static/ui.css")
    assert page.status_code == 303
    location = urlparse(page.headers["location"])
    assert location.path == "/ui/login"
    assert parse_qs(location.query)["next"] == [f"/ui/studies/{ui_node.a0001}/similar?limit=5"]
    assert landing.status_code == 303
    assert form.status_code == 200 and 'type="password"' in form.text
    assert f'value="/ui/studies/{ui_node.a0001}/similar"' in form.text
    assert css.status_code == 200 and "text/css" in css.headers["content-type"], "the login page needs it"


def test_login_sets_a_strict_httponly_cookie_and_refuses_bad_tokens(ui_node: UiNode) -> None:
    target = f"/ui/studies/{ui_node.a0001}/similar"
    with ui_node.client() as client:
        wrong = client.post("/ui/login", data={"token": "mfn_nope", "next": target})
        no_scope = client.post("/ui/login", data={"token": ui_node.ris, "next": target})
        evil = client.post("/ui/login", data={"token": ui_node.reader, "next": "https://evil.example/"})
        client.cookies.clear()
        good = client.post("/ui/login", data={"token": ui_node.reader, "next": target})
        page = client.get(target)
        logout = client.post("/ui/logout")
        client.cookies.clear()
        after = client.get(target)
    assert wrong.status_code == 200 and "not valid" in wrong.text and "set-cookie" not in wrong.headers
    assert no_scope.status_code == 200 and "lacks the &#39;read&#39; scope" in no_scope.text
    assert evil.status_code == 303 and evil.headers["location"] == "/ui/", "no open redirect"
    assert good.status_code == 303 and good.headers["location"] == target
    cookie = good.headers["set-cookie"]
    assert cookie.startswith("medfinder_ui=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Path=/ui" in cookie and 28790 <= int(re.search(r"Max-Age=(\d+)", cookie).group(1)) <= 28800
    assert ui_node.reader not in cookie, "the token never goes to the browser"
    assert page.status_code == 200 and ui_node.a0002 in _cards(page.text)
    assert logout.status_code == 303 and 'medfinder_ui=""' in logout.headers["set-cookie"]
    assert after.status_code == 303


def test_a_session_ends_when_its_token_is_revoked(ui_node: UiNode) -> None:
    token = create_token(ui_node.data_dir, "ward-pc", "read")
    with ui_node.signed_in(token) as client:
        assert client.get("/ui/").status_code == 200
        revoked = subprocess.run([MEDFINDER, "token", "revoke", "ward-pc", "--data-dir", str(ui_node.data_dir)],
                                 capture_output=True, text=True, timeout=60, check=False)
        assert revoked.returncode == 0, revoked.stderr
        assert client.get("/ui/").status_code == 303
        # A new token under the same name does not revive the old session.
        create_token(ui_node.data_dir, "ward-pc", "read")
        assert client.get("/ui/").status_code == 303


def test_a_forged_or_altered_cookie_is_ignored(ui_node: UiNode) -> None:
    key = signing.load_or_create_key(signing.ui_key_path(ui_node.data_dir))
    with ui_node.signed_in() as client:
        value = client.cookies["medfinder_ui"]
    forged = signing.sign_session(b"x" * 32, signing.Session("reader", None, int(time.time()) + 600))
    stale = signing.sign_session(key, signing.Session(signing.LINK_PRINCIPAL, None, int(time.time()) - 1))
    payload, mac = value.split(".")
    for bad in (forged, stale, f"{payload}.{'0' * len(mac)}", "garbage"):
        with ui_node.client() as client:
            client.cookies.set("medfinder_ui", bad)
            assert client.get("/ui/").status_code == 303, bad


def test_bearer_header_as_the_orthanc_plugin_sends_it(ui_node: UiNode) -> None:
    with ui_node.client(Authorization=f"Bearer {ui_node.reader}") as client:
        ok = client.get(f"/ui/studies/{ui_node.a0001}/similar")
    with ui_node.client(Authorization="Bearer mfn_revoked") as client:
        bad = client.get(f"/ui/studies/{ui_node.a0001}/similar")
    with ui_node.client(Authorization=f"Bearer {ui_node.ris}") as client:
        no_scope = client.get(f"/ui/studies/{ui_node.a0001}/similar")
    assert ok.status_code == 200 and ui_node.a0002 in _cards(ok.text)
    assert "Sign out" not in ok.text, "no session to end behind a proxy"
    assert bad.status_code == 401 and "text/html" in bad.headers["content-type"] and "refused" in bad.text
    assert no_scope.status_code == 403 and "read" in no_scope.text


def test_base_prefix_from_the_proxy(ui_node: UiNode) -> None:
    headers = {"Authorization": f"Bearer {ui_node.reader}", "X-MedFinder-Base": "/medfinder/ui"}
    with ui_node.client(**headers) as client:
        page = client.get(f"/ui/studies/{ui_node.a0001}/similar").text
        hostile = client.get(f"/ui/studies/{ui_node.a0001}/similar",
                             headers={"X-MedFinder-Base": '/x"><script>alert(1)</script>'}).text
    links = re.findall(r'(?:href|src|action)="([^"]+)"', page)
    local = [link for link in links if not link.startswith("http")]
    assert local and all(link.startswith(("/medfinder/ui/", "/app/explorer.html")) for link in local), local
    assert f'href="/app/explorer.html#study?uuid={ui_node.orthanc_a0002}"' in page, "same-origin through Orthanc"
    assert f'src="/medfinder/ui/thumbnails/{ui_node.a0002}.png"' in page
    assert "<script>alert(1)" not in hostile and 'href="/ui/static/ui.css"' in hostile, "a bad base is ignored"
    assert f'href="{ui_node.orthanc_url}/app/explorer.html#study?uuid={ui_node.orthanc_a0002}"' in hostile, \
        "not proxied: Orthanc's own address"


def test_signed_links_open_a_session_for_their_remaining_life(ui_node: UiNode) -> None:
    url = ui_link(ui_node.data_dir, ui_node.a0001, "--ttl", "600", "--base-url", ui_node.root)
    parsed = urlparse(url)
    assert parsed.path == f"/ui/studies/{ui_node.a0001}/similar"
    assert set(parse_qs(parsed.query)) == {"exp", "sig"}
    with ui_node.client() as client:
        opened = client.get(f"{parsed.path}?{parsed.query}&limit=5")
        page = client.get(opened.headers["location"])
    assert opened.status_code == 303
    assert opened.headers["location"] == f"/ui/studies/{ui_node.a0001}/similar?limit=5", "the clean URL"
    max_age = int(re.search(r"Max-Age=(\d+)", opened.headers["set-cookie"]).group(1))
    assert 590 <= max_age <= 600 and "HttpOnly" in opened.headers["set-cookie"]
    assert page.status_code == 200 and ui_node.a0002 in _cards(page.text)
    entry = [e for e in ui_node.audit_lines() if e["kind"] == "similar"][-1]
    assert entry["token"] == signing.LINK_PRINCIPAL
    key_file = ui_node.data_dir / "secrets" / "ui.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"


def test_tampered_other_study_or_expired_links_go_to_the_login_form(ui_node: UiNode) -> None:
    url = urlparse(ui_link(ui_node.data_dir, ui_node.a0001, "--ttl", "600"))
    query = parse_qs(url.query)
    short = urlparse(ui_link(ui_node.data_dir, ui_node.a0001, "--ttl", "1"))
    time.sleep(2.1)
    cases = {
        "tampered": f"/ui/studies/{ui_node.a0001}/similar?exp={int(query['exp'][0]) + 1}&sig={query['sig'][0]}",
        "other study": f"/ui/studies/{ui_node.a0002}/similar?{url.query}",
        "expired": f"{short.path}?{short.query}",
        "no signature": f"/ui/studies/{ui_node.a0001}/similar?exp={query['exp'][0]}",
    }
    for what, target in cases.items():
        with ui_node.client() as client:
            response = client.get(target)
        assert response.status_code == 303, what
        assert response.headers["location"].startswith("/ui/login?next=") and "reason=link" in \
            response.headers["location"], what
        assert "set-cookie" not in response.headers, what


def test_orthanc_down_gives_no_links_quickly() -> None:
    links = OrthancLinks(OrthancSettings(url=f"http://127.0.0.1:{free_port()}", timeout_s=1.0))
    started = time.perf_counter()
    assert links.lookup(["1.2.3", "1.2.4"]) == {}
    assert time.perf_counter() - started < 3.0
    started = time.perf_counter()
    assert links.lookup(["1.2.3"]) == {}
    assert time.perf_counter() - started < 0.05, "backs off instead of asking again at once"


# --- in a real browser ------------------------------------------------------------------------------------


def test_chromium_shows_the_other_studys_card(ui_node: UiNode) -> None:
    from selenium.webdriver.common.by import By

    url = ui_link(ui_node.data_dir, ui_node.a0001, "--base-url", ui_node.root)
    with chromium() as driver:
        driver.get(url)
        assert driver.current_url == f"{ui_node.root}/ui/studies/{ui_node.a0001}/similar", "redirected, clean"
        card = driver.find_element(By.CSS_SELECTOR, f'.results [data-study-uid="{ui_node.a0002}"]')
        assert card.find_element(By.CSS_SELECTOR, ".rank").text == "#1"
        image = card.find_element(By.CSS_SELECTOR, ".thumb img")
        wait_for(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image),
                 30, "the thumbnail to load")
        assert driver.execute_script("return arguments[0].naturalWidth", image) == 192
        bar = card.find_element(By.CSS_SELECTOR, ".bar span")
        assert bar.size["width"] > 0, "the best match's score bar is drawn"
        assert "Open in Orthanc" in card.text
        # Navigation keeps the session (the cookie from the link).
        card.find_element(By.LINK_TEXT, "Similar to this").click()
        wait_for(lambda: driver.current_url.endswith(f"/ui/studies/{ui_node.a0002}/similar"), 30, "navigation")
        assert driver.find_element(By.CSS_SELECTOR, f'.results [data-study-uid="{ui_node.a0001}"]')
        driver.back()
        wait_for(lambda: driver.execute_script("return Array.from(document.images).every(i => i.complete)"),
                 30, "the thumbnails")
        driver.save_screenshot(str(artifacts_dir() / "ui-results.png"))
    assert (artifacts_dir() / "ui-results.png").stat().st_size > 10_000
    assert (artifacts_dir() / "ui-empty.png").stat().st_size > 5_000
