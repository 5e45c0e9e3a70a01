"""A real Orthanc for tests: Debian's ``orthanc`` 1.10.1 with ``orthanc-python`` 4.0, configured by
``medfinder orthanc config`` and started as ``Orthanc DIR/orthanc.json`` on loopback ports picked at run time.

Orthanc 1.10.1 has no bind-address option (field notes 4.4): it listens on every interface, so tests send it
traffic on 127.0.0.1 only and its configuration refuses remote HTTP clients (``RemoteAccessAllowed`` false).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_helpers import nodelay_env, stop_process, wait_for

PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")


def require_orthanc() -> None:
    if shutil.which("Orthanc") is None or not PYTHON_PLUGIN.is_file():
        pytest.skip("Debian orthanc + orthanc-python are not installed: run `make setup`")


@contextlib.contextmanager
def orthanc_server(config: Path, http_port: int, log_path: Path) -> Iterator[subprocess.Popen]:
    """``Orthanc CONFIG`` in its own process (TCP_NODELAY: DCMTK's Nagle delay); stopped with SIGTERM."""
    from orthanc_api_client import OrthancApiClient

    require_orthanc()
    log = open(log_path, "wb")
    process = subprocess.Popen(["Orthanc", "--verbose", str(config)], stdout=log, stderr=subprocess.STDOUT,
                               env=nodelay_env(), cwd=config.parent)
    client = OrthancApiClient(f"http://127.0.0.1:{http_port}")
    try:
        wait_for(lambda: process.poll() is not None or client.is_alive(), 60, "Orthanc to answer")
        assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
        yield process
    finally:
        stop_process(process, timeout=30)
        log.close()
