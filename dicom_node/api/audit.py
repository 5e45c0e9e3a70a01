"""The audit trail: one JSON line per query and report write, for a privacy officer (who looked up what).

``<data_dir>/audit/audit.jsonl``, mode 0600. It holds what was asked, including the text of a text search: the
officer must be able to see what was looked up, and a search text can itself be PHI. So this file is protected
like the spool, and the text never goes to the application log (which only says ``event=...`` without it). A
report write is audited by study, length and SHA-256 of its text, never the text (the reports folder keeps it).

One ``write`` of one line per entry on a file opened with O_APPEND, under a lock: lines from concurrent requests
never interleave, and the file is reopened for every entry, so log rotation (rename) just works.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

AUDIT_FILE = Path("audit") / "audit.jsonl"


def audit_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / AUDIT_FILE


@dataclass(frozen=True)
class AuditEntry:
    time: str  # ISO 8601, UTC, milliseconds
    token: str  # the token's name
    client: str | None  # the peer address as the socket sees it (no proxy headers are trusted)
    kind: str  # "studies", "study", "similar", "search", "report"
    parameters: dict[str, Any]
    status: int  # the HTTP status answered
    results: list[str]  # study UIDs returned, in order
    latency_ms: float


class AuditLog:
    """Appends :class:`AuditEntry` lines; safe to share between request threads."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()

    def append(self, entry: AuditEntry) -> None:
        line = (json.dumps(asdict(entry), ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    @contextmanager
    def record(self, token: str, client: str | None, kind: str, parameters: dict[str, Any]) -> Iterator[Audited]:
        """Time the block and append its entry when it ends, with the status it set (500 if it raised
        something other than an HTTP error)."""
        audited = Audited()
        started = time.perf_counter()
        try:
            yield audited
        except Exception as error:
            audited.status = int(getattr(error, "status_code", 500))
            raise
        finally:
            self.append(AuditEntry(
                time=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                token=token, client=client, kind=kind, parameters=parameters, status=audited.status,
                results=list(audited.results), latency_ms=round((time.perf_counter() - started) * 1000, 3)))


@dataclass
class Audited:
    """What the audited block reports back: its outcome."""

    status: int = 200
    results: list[str] = field(default_factory=list)
