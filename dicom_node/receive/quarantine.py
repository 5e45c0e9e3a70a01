"""Quarantine: where refused objects go, so that bad input is explained and never silently lost.

Each refused object is kept byte for byte as ``quarantine/<stamp>-<digest>.dcm`` next to a
``<stamp>-<digest>.reason.json`` that says why, who sent it (calling AE, peer IP) and when. The reason file
carries UIDs and technical reasons only, never patient data: callers pass reasons built from UIDs and parser
messages, and context values that are AE titles, addresses, UIDs or status codes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dicom_node.store.layout import NodeLayout
from model_export.atomic_files import write_atomic

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def _digest_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def move_file(source: Path, target: Path) -> None:
    """Move ``source`` to ``target`` atomically; across file systems, copy to a temp file there and rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, target)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        shutil.copyfile(source, part)
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    source.unlink(missing_ok=True)


def quarantine(layout: NodeLayout, data_or_path: bytes | Path, reason: str, **context: Any) -> Path:
    """Keep a refused object (bytes, or a file that is moved) with a reason file; returns the object's path.

    ``context`` is written into the reason file as is (calling_ae, peer_ip, sop_instance_uid, status, ...).
    """
    now = time.time()
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        data = bytes(data_or_path)
        digest = hashlib.sha256(data).hexdigest()
        size = len(data)
    else:
        source = Path(data_or_path)
        digest = _digest_file(source)
        size = source.stat().st_size
    stem = f"{stamp}-{digest[:16]}"
    target = layout.quarantine / f"{stem}.dcm"
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        write_atomic(target, data)
    else:
        move_file(Path(data_or_path), target)
    record = {
        "reason": reason,
        "time": datetime.fromtimestamp(now, timezone.utc).isoformat(),
        "size": size,
        "sha256": digest,
        **{key: value for key, value in context.items()},
    }
    write_atomic(target.with_name(f"{stem}.reason.json"),
                 (json.dumps(record, indent=2, sort_keys=True, default=str) + "\n").encode())
    logger.warning("event=quarantined file=%s reason=%r calling_ae=%s peer_ip=%s", target.name, reason,
                   context.get("calling_ae"), context.get("peer_ip"))
    return target
