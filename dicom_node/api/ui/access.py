"""Who may see the pages, and where their links point.

A request is let in with (first match wins):

1. an ``Authorization: Bearer`` header holding a token with the ``read`` scope — what Orthanc's plugin adds on the
   server side. A bad or insufficient bearer gets a 401/403 *page*: it comes from a misconfigured proxy, and a
   login form would not help;
2. the session cookie (``medfinder_ui``) from the login form or a signed link; a token session is checked
   against the token file on every request, so ``medfinder token revoke`` ends it at once;
3. otherwise a browser is sent (303) to the login form, with ``next`` set to where it was going.

Links in a page start with the *base*: ``/ui``, or the ``X-MedFinder-Base`` header (e.g. ``/medfinder/ui``) the
proxy sets, when it matches ``^/[A-Za-z0-9/_-]*$`` (anything else is ignored: it is written into the page).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from urllib.parse import quote

from fastapi import Request

from dicom_node.api.services import ApiServices, services
from dicom_node.api.tokens import Scope
from dicom_node.api.ui import signing

logger = logging.getLogger(__name__)

DEFAULT_BASE = "/ui"
BASE_HEADER = "x-medfinder-base"
BASE_PATTERN = re.compile(r"^/[A-Za-z0-9/_-]*$")
COOKIE = "medfinder_ui"


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the token's name (or ``signed-link``) for the audit trail, and the peer address."""

    name: str
    client: str | None
    via: str  # "bearer", "session"


class LoginRequired(Exception):
    """No credentials: answered with a 303 to the login form (``routes.install`` maps it)."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class Refused(Exception):
    """A bearer header that is not good enough: answered with an HTML error page of ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def base_of(request: Request) -> str:
    """Where the pages live as the browser sees them: the proxy's base, else ``/ui``."""
    value = request.headers.get(BASE_HEADER)
    if value and BASE_PATTERN.match(value):
        return value.rstrip("/") or DEFAULT_BASE
    return DEFAULT_BASE


def is_proxied(request: Request) -> bool:
    """Served through Orthanc's plugin (a valid base header): Orthanc links are then same-origin."""
    value = request.headers.get(BASE_HEADER)
    return bool(value and BASE_PATTERN.match(value))


def ui_key(api: ApiServices) -> bytes:
    return signing.load_or_create_key(signing.ui_key_path(api.data_dir()))


def client_of(request: Request) -> str | None:
    return request.client.host if request.client else None


def browser_path(request: Request) -> str:
    """The request's path and query as the browser sees them (under the base)."""
    path = request.url.path
    relative = path.removeprefix(DEFAULT_BASE)
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{base_of(request)}{relative}{query}"


def safe_next(candidate: str | None, base: str) -> str:
    """A ``next`` target only inside the pages (no open redirect): else the landing page."""
    if candidate and candidate.startswith(base + "/") and "//" not in candidate and "\\" not in candidate:
        return candidate
    return base + "/"


def login_location(request: Request, next_path: str, reason: str | None = None) -> str:
    location = f"{base_of(request)}/login?next={quote(next_path, safe='')}"
    return location + (f"&reason={reason}" if reason else "")


def viewer(request: Request) -> Viewer:
    """The dependency of every page: the viewer, or :class:`LoginRequired` / :class:`Refused`."""
    api = services(request)
    client = client_of(request)
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        record = api.tokens.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if record is None:
            logger.info("event=ui_auth_refused reason=bad_bearer client=%s", client)
            raise Refused(401, "The node refused the bearer token sent with this request (unknown or revoked). "
                               "If you came through Orthanc, the plugin's token needs renewing.")
        if not record.allows(Scope.READ):
            logger.info("event=ui_auth_refused reason=scope token=%s", record.name)
            raise Refused(403, f"The token {record.name!r} lacks the 'read' scope these pages need.")
        return Viewer(record.name, client, "bearer")
    session = current_session(request, api)
    if session is not None:
        return Viewer(session.name, client, "session")
    raise LoginRequired(browser_path(request))


def current_session(request: Request, api: ApiServices) -> signing.Session | None:
    """The cookie's session when it is valid now (a token session: its token still exists and reads)."""
    value = request.cookies.get(COOKIE)
    if not value:
        return None
    key = ui_key(api)
    session = signing.read_session(key, value)
    if session is None:
        return None
    if session.fingerprint is None:  # opened by a signed link: valid until it expires (or the key changes)
        return session if session.name == signing.LINK_PRINCIPAL else None
    for record in api.tokens.records():
        if record.name == session.name and record.allows(Scope.READ) and \
                signing.token_fingerprint(key, record.sha256) == session.fingerprint:
            return session
    logger.info("event=ui_session_ended reason=token_revoked token=%s", session.name)
    return None


def session_cookie(api: ApiServices, session: signing.Session, base: str) -> dict[str, object]:
    """``Response.set_cookie`` arguments for ``session``: HttpOnly, SameSite=Strict, scoped to the pages."""
    return {"key": COOKIE, "value": signing.sign_session(ui_key(api), session),
            "max_age": max(0, int(session.expires - time.time())), "path": base, "httponly": True,
            "samesite": "strict", "secure": api.settings.ui.secure_cookies}
