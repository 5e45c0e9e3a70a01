"""Bearer tokens of the REST API: made and revoked by ``medfinder token``, checked by the running node.

Only a SHA-256 of each token is kept (``<data_dir>/secrets/tokens.json``, mode 0600): a stolen file gives no
usable token. Tokens are 32 random bytes, so an unsalted hash is enough (nothing to brute-force). The running
node re-reads the file whenever it changes on disk, so ``medfinder token revoke`` in another process takes effect
on the next request. Writers hold an exclusive ``flock`` on a lock file beside it and replace the file atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

TOKENS_FILE = Path("secrets") / "tokens.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
TOKEN_PREFIX = "mfn_"  # recognisable in a leaked config or a secret scanner


class Scope(StrEnum):
    READ = "read"  # list studies, similar and text search
    REPORT = "report"  # attach reports (a RIS)
    ADMIN = "admin"  # everything


class TokenError(ValueError):
    """A bad token name, a duplicate, or an unknown name to revoke."""


@dataclass(frozen=True)
class TokenRecord:
    """What is stored about one token: never the token itself."""

    name: str
    scopes: tuple[Scope, ...]
    created: str  # ISO 8601, UTC
    sha256: str

    def allows(self, scope: Scope) -> bool:
        """``admin`` implies every other scope."""
        return scope in self.scopes or Scope.ADMIN in self.scopes


def tokens_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / TOKENS_FILE


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """The token file of one data folder; thread-safe, shared between the API's request threads."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cached_stamp: tuple[int, int, int] | None = None
        self._cached: tuple[TokenRecord, ...] = ()

    # --- reading -----------------------------------------------------------------------------------

    def records(self) -> tuple[TokenRecord, ...]:
        """Every token record, re-read only when the file changed (inode, size, mtime)."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return ()
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        with self._lock:
            if stamp != self._cached_stamp:
                self._cached = tuple(_read(self.path))
                self._cached_stamp = stamp
            return self._cached

    def authenticate(self, token: str) -> TokenRecord | None:
        """The record whose hash matches ``token``, comparing every record in constant time."""
        presented = digest(token)
        found: TokenRecord | None = None
        for record in self.records():
            if hmac.compare_digest(presented, record.sha256):
                found = record
        return found

    # --- writing (the ``medfinder token`` command) -------------------------------------------------------

    def create(self, name: str, scopes: Iterable[Scope | str]) -> str:
        """Make a token, store its hash under ``name`` and return the token (the only time it is seen)."""
        if not NAME_PATTERN.match(name):
            raise TokenError(f"token name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
        wanted = tuple(dict.fromkeys(Scope(s) for s in scopes))
        if not wanted:
            raise TokenError("a token needs at least one scope (read, report, admin)")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._locked() as records:
            if any(r.name == name for r in records):
                raise TokenError(f"a token named {name!r} exists; revoke it first")
            records.append(TokenRecord(name, wanted, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       digest(token)))
        return token

    def revoke(self, name: str) -> None:
        with self._locked() as records:
            kept = [r for r in records if r.name != name]
            if len(kept) == len(records):
                raise TokenError(f"no token named {name!r}")
            records[:] = kept

    @contextmanager
    def _locked(self) -> Iterator[list[TokenRecord]]:
        """Read-modify-write under an exclusive lock; the file is replaced atomically, mode 0600."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            records = _read(self.path) if self.path.is_file() else []
            yield records
            temporary = self.path.with_suffix(f".tmp{os.getpid()}")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"tokens": [asdict(r) for r in records]}, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        finally:
            os.close(lock_fd)


def _read(path: Path) -> list[TokenRecord]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [TokenRecord(name=r["name"], scopes=tuple(Scope(s) for s in r["scopes"]), created=r["created"],
                        sha256=r["sha256"]) for r in data.get("tokens", [])]
