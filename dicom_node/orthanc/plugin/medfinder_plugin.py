"""MedFinder's Orthanc plugin: a thin forwarder to the MedFinder node (Orthanc Python plugin 4.0, stdlib only).

Orthanc with a Python script is AGPL: this file stays small and only forwards, over HTTP and DICOM, to the
separately licensed node. Three jobs:

* auto-routing: STABLE_STUDY changes of studies with a routed modality (CT) are read from ``/changes`` in
  sequence order; each change is handled once (the last sequence is kept in ``StateFile``), and a study is sent
  again only when its routed instances changed (the SR the node sends back makes the study "stable" again, but
  adds no CT instance, so it is not re-sent); failed sends are retried with backoff, a bounded number of times;
* a "Similar cases" button on the study page of Orthanc Explorer, opening ``/medfinder/similar/{study id}``;
* ``/medfinder/similar/{id}`` and ``/medfinder/ui/...``: the node's pages, fetched with the node's bearer token
  added here (it never reaches the browser). When the node cannot be reached, an error page says so.

Configuration: the ``MedFinder`` section of orthanc.json, written by ``medfinder orthanc config``.
"""

import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import orthanc

CONFIG = json.loads(orthanc.GetConfiguration()).get("MedFinder", {})
NODE_URL = CONFIG.get("NodeUrl", "http://127.0.0.1:8080").rstrip("/")
MODALITY = CONFIG.get("Modality", "medfinder")
ROUTE_MODALITIES = set(CONFIG.get("RouteModalities", ["CT"]))
STATE_FILE = CONFIG.get("StateFile")
TIMEOUT_S = float(CONFIG.get("TimeoutSeconds", 30))
BASE = "/medfinder/ui"
# Response headers of the node that the browser gets too (everything else is Orthanc's or hop-by-hop).
FORWARDED_HEADERS = ("cache-control", "content-disposition", "etag", "last-modified")
# Request headers the node gets from the browser (never its cookies: the token added here is the credential).
PASSED_HEADERS = ("accept", "content-type", "if-none-match", "if-modified-since")
ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
UI_PATH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")  # no "..", no "//": only the node's /ui pages
KEEP_ROUTED = 20000  # fingerprints remembered (oldest dropped first)
RETRY_ATTEMPTS = int(CONFIG.get("RetryAttempts", 6))
RETRY_BASE_S = float(CONFIG.get("RetryBaseSeconds", 30))  # doubles after each failed attempt


def read_token():
    with open(CONFIG["TokenFile"], encoding="utf-8") as handle:
        return handle.read().strip()


# --- auto-routing ---------------------------------------------------------------------------------------------

class Router:
    """Reads StableStudy changes in order and sends each new or changed CT study to the node once.

    Sends are synchronous, one study at a time, on this thread (never on Orthanc's callback threads). A send that
    fails (node down, refused) is retried with backoff up to ``RETRY_ATTEMPTS`` times, then given up with an
    error in Orthanc's log; the change sequence moves on either way, so one bad study never blocks the rest.
    """

    def __init__(self):
        self.wake = threading.Event()
        self.stopping = False
        self.state = self.load()
        self.thread = threading.Thread(target=self.run, name="medfinder-router", daemon=True)

    def load(self):
        if STATE_FILE and os.path.exists(STATE_FILE):
            with open(STATE_FILE, encoding="utf-8") as handle:
                state = json.load(handle)
            state.setdefault("retry", {})
            return state
        # First start: route what becomes stable from now on, not the whole archive (that is a backfill's job).
        last = json.loads(orthanc.RestApiGet("/changes?last"))
        return {"last_seq": last.get("Last", 0), "routed": {}, "retry": {}}

    def save(self):
        if not STATE_FILE:
            return
        routed = self.state["routed"]
        while len(routed) > KEEP_ROUTED:
            routed.pop(next(iter(routed)))
        temporary = STATE_FILE + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(self.state, handle)
        os.replace(temporary, STATE_FILE)

    def run(self):
        while not self.stopping:
            self.wake.wait(5.0)
            self.wake.clear()
            try:
                self.drain()
                self.retry_due()
            except Exception as error:  # noqa: BLE001 - keep routing alive; the next tick resumes from the saved seq
                orthanc.LogError(f"MedFinder: reading changes failed, will retry: {error!r}")

    def drain(self):
        while not self.stopping:
            page = json.loads(orthanc.RestApiGet(f"/changes?since={self.state['last_seq']}&limit=100"))
            for change in page["Changes"]:  # most are NewInstance: the state is written per routed study and page
                self.state["last_seq"] = change["Seq"]
                if change["ChangeType"] == "StableStudy":
                    self.route(change["ID"])
                    self.save()
            self.save()
            if page.get("Done", True) or not page["Changes"]:
                return

    def retry_due(self):
        now = time.time()
        due = [study_id for study_id, entry in self.state["retry"].items() if entry["next"] <= now]
        for study_id in due:
            self.route(study_id)
        if due:
            self.save()

    def route(self, study_id):
        try:
            series = json.loads(orthanc.RestApiGet(f"/studies/{study_id}/series"))
        except Exception:  # noqa: BLE001 - the study was deleted since the change: nothing to send
            self.state["retry"].pop(study_id, None)
            return
        chosen = [s for s in series if s.get("MainDicomTags", {}).get("Modality") in ROUTE_MODALITIES]
        if not chosen:
            return
        instances = sorted(i for s in chosen for i in s.get("Instances", []))
        fingerprint = hashlib.sha1("\n".join(instances).encode("ascii")).hexdigest()
        if self.state["routed"].get(study_id) == fingerprint:
            return
        try:
            orthanc.RestApiPost(f"/modalities/{MODALITY}/store", json.dumps(
                {"Resources": [s["ID"] for s in chosen], "Synchronous": True}))
        except Exception as error:  # noqa: BLE001 - Orthanc raises a bare error for a failed C-STORE job
            self.failed(study_id, error)
            return
        self.state["retry"].pop(study_id, None)
        self.state["routed"].pop(study_id, None)
        self.state["routed"][study_id] = fingerprint
        orthanc.LogWarning(f"MedFinder: study {study_id} ({len(instances)} instances) sent to {MODALITY}")

    def failed(self, study_id, error):
        entry = self.state["retry"].get(study_id, {"attempts": 0})
        entry["attempts"] += 1
        if entry["attempts"] >= RETRY_ATTEMPTS:
            self.state["retry"].pop(study_id, None)
            orthanc.LogError(f"MedFinder: study {study_id} could not be sent to {MODALITY} after {entry['attempts']} "
                             f"attempts, given up ({error!r}); send it with 'Send to DICOM modality' on its page")
            return
        entry["next"] = time.time() + RETRY_BASE_S * 2 ** (entry["attempts"] - 1)
        self.state["retry"][study_id] = entry
        orthanc.LogWarning(f"MedFinder: sending study {study_id} to {MODALITY} failed (attempt {entry['attempts']}, "
                           f"retried later): {error!r}")


ROUTER = None


def on_change(change_type, level, resource_id):
    global ROUTER
    if change_type == orthanc.ChangeType.ORTHANC_STARTED:
        ROUTER = Router()
        ROUTER.thread.start()
        ROUTER.wake.set()  # catch up with what became stable while Orthanc was down
    elif change_type == orthanc.ChangeType.STABLE_STUDY and ROUTER is not None:
        ROUTER.wake.set()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED and ROUTER is not None:
        ROUTER.stopping = True
        ROUTER.wake.set()


# --- the node's pages -----------------------------------------------------------------------------------------

def node_request(method, path, query, body, headers):
    """(status, headers, body) of one request to the node, with the node's token; raises URLError if down."""
    url = NODE_URL + path + ("?" + urllib.parse.urlencode(query) if query else "")
    outgoing = {name: value for name, value in headers.items() if name.lower() in PASSED_HEADERS}
    outgoing["Authorization"] = "Bearer " + read_token()
    outgoing["X-MedFinder-Base"] = BASE
    request = urllib.request.Request(url, data=body if method == "POST" else None, headers=outgoing,
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, lowercase(response.headers), response.read()
    except urllib.error.HTTPError as error:  # the node answered (404, 422...): its page goes to the browser
        return error.code, lowercase(error.headers), error.read()


def lowercase(headers):
    return {name.lower(): value for name, value in headers.items()}


def answer(output, status, headers, body):
    for name, value in headers.items():
        if name.lower() in FORWARDED_HEADERS:
            output.SetHttpHeader(name, value)
    content_type = headers.get("content-type", "text/html; charset=utf-8")
    if status == 200:
        output.AnswerBuffer(body, content_type)
    elif status in (301, 302, 303, 307) and headers.get("location"):
        output.Redirect(headers["location"])
    else:
        # Plugin 4.0's SendHttpStatus takes text: non-ASCII characters travel as HTML character references.
        text = body.decode("utf-8", "replace").encode("ascii", "xmlcharrefreplace").decode("ascii")
        output.SetHttpHeader("Content-Type", content_type)
        output.SendHttpStatus(status, text, len(text))


def unreachable(output, error):
    text = ("<!doctype html><html><head><meta charset='utf-8'><title>MedFinder unavailable</title></head>"
            "<body style='font-family:sans-serif;margin:2em'><h1>MedFinder node unreachable</h1>"
            "<p data-state='node-unreachable'>The similar-case node at %s did not answer (%s). "
            "Ask your PACS administrator to check that it is running.</p></body></html>"
            % (NODE_URL, type(error).__name__))
    output.SetHttpHeader("Content-Type", "text/html; charset=utf-8")
    output.SendHttpStatus(502, text, len(text))


def forward(output, method, path, request):
    if method not in ("GET", "POST"):
        output.SendMethodNotAllowed("GET,POST")
        return
    try:
        status, headers, body = node_request(method, path, request.get("get") or {}, request.get("body"),
                                             request.get("headers") or {})
    except (urllib.error.URLError, OSError) as error:
        orthanc.LogWarning(f"MedFinder: node unreachable at {NODE_URL}: {error!r}")
        unreachable(output, error)
        return
    answer(output, status, headers, body)


def on_similar(output, uri, **request):
    study_id = request["groups"][0]
    if not ORTHANC_ID.match(study_id):
        output.SendHttpStatus(400, "not an Orthanc study id", len("not an Orthanc study id"))
        return
    try:
        study = json.loads(orthanc.RestApiGet(f"/studies/{study_id}"))
    except Exception:  # noqa: BLE001 - Orthanc answers an unknown id with an error
        output.SendHttpStatus(404, "no such study in Orthanc", len("no such study in Orthanc"))
        return
    study_uid = study["MainDicomTags"]["StudyInstanceUID"]
    forward(output, request["method"], f"/ui/studies/{urllib.parse.quote(study_uid)}/similar", request)


def on_ui(output, uri, **request):
    rest = request["groups"][0]
    if rest and (not UI_PATH.match(rest) or ".." in rest.split("/")):
        output.SendHttpStatus(400, "bad page path", len("bad page path"))
        return
    forward(output, request["method"], "/ui/" + rest, request)


EXPLORER_JS = """
$('#study').live('pagebeforecreate', function() {
  var item = $('<li data-icon="search"><a href="#" id="medfinder-similar">Similar cases</a></li>');
  item.insertAfter($('#study-store').parent());
  item.find('a').click(function(event) {
    event.preventDefault();
    if ($.mobile.pageData) {
      window.location.href = '../medfinder/similar/' + $.mobile.pageData.uuid;
    }
  });
});
"""

orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/medfinder/similar/([^/]+)", on_similar)
orthanc.RegisterRestCallback("/medfinder/ui/?(.*)", on_ui)  # Orthanc drops a trailing "/"
orthanc.ExtendOrthancExplorer(EXPLORER_JS)
