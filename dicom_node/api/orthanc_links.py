"""Which studies the site's Orthanc holds, for the pages' "Open in Orthanc" links.

Orthanc's REST side goes through ``orthanc-api-client`` (``OrthancApiClient(url, user, pwd)``,
``client.studies.lookup(StudyInstanceUID)`` -> Orthanc's study id or None). Answers, held or not, are kept for
``orthanc.lookup_cache_s``; the lookups of one page run concurrently. Orthanc being down or slow must never stop a
page: the links are left out, one warning is logged, and Orthanc is not asked again for a short back-off.

Where orthanc-api-client 0.25.3 falls short: its calls take no timeout (``requests`` waits forever by default)
and it retries refused connections three times with back-off. A page cannot wait for that, so the client's
session gets an adapter with our timeout and no retries (``_http_session``, the one attribute it keeps it in;
pinned version). Nothing else is needed from plain HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from requests.adapters import HTTPAdapter

from config.settings import OrthancSettings

logger = logging.getLogger(__name__)

EXPLORER_STUDY = "/app/explorer.html#study?uuid={id}"
DOWN_BACKOFF_S = 30.0  # after a failure, pages go without links this long before Orthanc is asked again
MAX_PARALLEL = 8
MAX_CACHED = 10_000  # lookups kept before expired ones are dropped


class _TimeoutAdapter(HTTPAdapter):
    """An adapter that gives every request a timeout and does not retry."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(max_retries=0)
        self._timeout_s = timeout_s

    def send(self, request: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout_s
        return super().send(request, **kwargs)


class OrthancLinks:
    """Looks studies up in one Orthanc (``settings.url``); thread-safe, shared by the request threads."""

    def __init__(self, settings: OrthancSettings) -> None:
        if not settings.url:
            raise ValueError("orthanc.url is not set: no Orthanc to link to")
        self.settings = settings
        self._client = _client(settings)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, str | None]] = {}  # study uid -> (when asked, orthanc id or None)
        self._down_until = 0.0

    def study_url(self, orthanc_id: str, *, same_origin: bool) -> str:
        """Orthanc Explorer's page of a study: same-origin when the page is served through Orthanc's plugin."""
        path = EXPLORER_STUDY.format(id=orthanc_id)
        if same_origin:
            return path
        return (self.settings.public_url or self.settings.url or "").rstrip("/") + path

    def lookup(self, study_uids: Iterable[str]) -> dict[str, str]:
        """Orthanc's study id of each of ``study_uids`` it holds (the others are absent from the answer)."""
        wanted = list(dict.fromkeys(study_uids))
        now = time.monotonic()
        found: dict[str, str] = {}
        missing: list[str] = []
        with self._lock:
            if now < self._down_until:
                return {}
            for uid in wanted:
                cached = self._cache.get(uid)
                if cached is not None and now - cached[0] < self.settings.lookup_cache_s:
                    if cached[1] is not None:
                        found[uid] = cached[1]
                else:
                    missing.append(uid)
        if not missing:
            return found
        try:
            with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(missing)),
                                    thread_name_prefix="orthanc-lookup") as pool:
                answers = list(pool.map(self._lookup_one, missing))
        except Exception as error:  # noqa: BLE001 - any failure means "no links", never a failed page
            logger.warning("event=orthanc_lookup_failed url=%s error=%s backoff_s=%.0f", self.settings.url,
                           type(error).__name__, DOWN_BACKOFF_S)
            with self._lock:
                self._down_until = time.monotonic() + DOWN_BACKOFF_S
            return found
        stamp = time.monotonic()
        with self._lock:
            if len(self._cache) > MAX_CACHED:  # drop expired answers: one entry per study ever shown otherwise
                self._cache = {uid: entry for uid, entry in self._cache.items()
                               if stamp - entry[0] < self.settings.lookup_cache_s}
            for uid, orthanc_id in zip(missing, answers, strict=True):
                self._cache[uid] = (stamp, orthanc_id)
                if orthanc_id is not None:
                    found[uid] = orthanc_id
        return found

    def _lookup_one(self, study_uid: str) -> str | None:
        from orthanc_api_client.exceptions import TooManyResourcesFound

        try:
            return self._client.studies.lookup(study_uid)
        except TooManyResourcesFound:  # the UID names several studies there: no single page to open
            return None


def _client(settings: OrthancSettings) -> Any:
    from orthanc_api_client import OrthancApiClient

    password = None
    if settings.password_file:
        password = Path(settings.password_file).read_text(encoding="utf-8").strip()
    client = OrthancApiClient(settings.url, user=settings.username, pwd=password)
    session = getattr(client, "_http_session", None)
    if session is not None:
        adapter = _TimeoutAdapter(settings.timeout_s)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
    else:  # a client version that keeps its session elsewhere: its own (untimed) requests
        logger.warning("event=orthanc_client_untimed reason=no_http_session")
    return client
