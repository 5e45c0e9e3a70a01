"""The node's page key and what it signs: browser session cookies and signed links.

One secret per data folder, ``<data_dir>/secrets/ui.key`` (32 random bytes, mode 0600), made on first use by
whichever process needs it first (the node or ``medfinder ui link``): both must sign with the same key. Replacing
the file ends every session and link at once.

* A **session cookie** is ``<payload>.<hex HMAC-SHA256>`` where the payload (base64url JSON) carries the token's
  name, a fingerprint of that token (so a revoked token's sessions end even if a new token takes its name) and
  the expiry. It is signed, not encrypted: it holds nothing secret.
* A **signed link** is ``?exp=<unix>&sig=<hex HMAC-SHA256(key, "<StudyInstanceUID>|<exp>")>``: it opens one
  study's page without a token, until ``exp``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

UI_KEY_FILE = Path("secrets") / "ui.key"
KEY_BYTES = 32
LINK_PRINCIPAL = "signed-link"  # the audit trail's name for a session opened by a signed link


def ui_key_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / UI_KEY_FILE


def load_or_create_key(path: Path) -> bytes:
    """The key in ``path``, made (0600, atomically, O_EXCL so two processes agree) when it does not exist."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(KEY_BYTES))
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(temporary, path)  # fails if another process made the key meanwhile: then use theirs
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise ValueError(f"{path} holds {len(key)} bytes; delete it to make a new key (sessions and links end)")
    return key


def _mac(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


def token_fingerprint(key: bytes, token_sha256: str) -> str:
    """Binds a session to one token (its stored hash) without putting the hash itself in the cookie."""
    return _mac(key, f"token|{token_sha256}")[:32]


@dataclass(frozen=True)
class Session:
    """Who a browser session belongs to: a token (by name and fingerprint) or a signed link (``fingerprint`` None)."""

    name: str
    fingerprint: str | None
    expires: int  # unix seconds


def sign_session(key: bytes, session: Session) -> str:
    payload = json.dumps({"n": session.name, "f": session.fingerprint, "e": session.expires},
                         separators=(",", ":")).encode("utf-8")
    encoded = base64.urlsafe_b64encode(payload).decode("ascii").rstrip("=")
    return f"{encoded}.{_mac(key, 'session|' + encoded)}"


def read_session(key: bytes, value: str | None, now: float | None = None) -> Session | None:
    """The session in a cookie value, or None when it is missing, forged, malformed or expired."""
    if not value or value.count(".") != 1:
        return None
    encoded, mac = value.split(".")
    if not hmac.compare_digest(mac, _mac(key, "session|" + encoded)):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
        session = Session(name=str(data["n"]), fingerprint=data["f"] if data["f"] is None else str(data["f"]),
                          expires=int(data["e"]))
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    return session if session.expires > (time.time() if now is None else now) else None


def link_signature(key: bytes, study_uid: str, expires: int) -> str:
    return _mac(key, f"{study_uid}|{expires}")


def check_link(key: bytes, study_uid: str, expires: str | None, signature: str | None,
               now: float | None = None) -> int | None:
    """The link's expiry when ``exp``/``sig`` are a valid, unexpired signature of this study, else None."""
    if not expires or not signature or not expires.isdigit() or len(expires) > 12:
        return None
    if not hmac.compare_digest(signature.lower(), link_signature(key, study_uid, int(expires))):
        return None
    return int(expires) if int(expires) > (time.time() if now is None else now) else None


def signed_link(key: bytes, base_url: str, study_uid: str, ttl_s: int, now: float | None = None) -> str:
    """The URL of a study's page that opens without a token for ``ttl_s`` seconds."""
    expires = int((time.time() if now is None else now) + ttl_s)
    return (f"{base_url.rstrip('/')}/ui/studies/{study_uid}/similar"
            f"?exp={expires}&sig={link_signature(key, study_uid, expires)}")
