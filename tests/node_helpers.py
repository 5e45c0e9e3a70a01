"""Real peers for node tests: dcmtk's storescu/storescp/echoscu, redis-server, a Celery worker, the node itself.

Every peer listens on 127.0.0.1 on a free port picked at run time and is killed when its context exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: run `make setup` (Debian packages dcmtk, dicom3tools, redis-server)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def nodelay_env(**extra: str) -> dict[str, str]:
    """dcmtk 3.6.7 waits ~45 ms per PDU without TCP_NODELAY (field notes 4.4)."""
    return {**os.environ, "TCP_NODELAY": "1", **extra}


@contextlib.contextmanager
def storescp(out_dir: Path, ae_title: str = "PACS", port: int | None = None,
             options: Sequence[str] = ()) -> Iterator[int]:
    """dcmtk storescp (a PACS) writing what it receives byte for byte (+B) into ``out_dir``, on ``port`` or a
    free one, with extra storescp ``options``; yields its port."""
    require_tools("storescp")
    out_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = open(out_dir.parent / f"storescp-{port}.log", "wb")
    process = subprocess.Popen(["storescp", "-aet", ae_title, "-od", str(out_dir), "+B", "-v", *options,
                                str(port)], stdout=log, stderr=subprocess.STDOUT, env=nodelay_env())
    try:
        wait_for(lambda: port_open(port), 20, f"storescp on port {port}")
        yield port
    finally:
        stop_process(process)
        log.close()


def meta_end(data: bytes) -> int:
    """Offset where the dataset starts in a Part 10 file (after preamble, 'DICM' and the file meta group)."""
    if data[128:132] != b"DICM":
        raise ValueError("not a Part 10 file with a preamble")
    tag, vr, _length = struct.unpack("<I2sH", data[132:140])
    if tag != 0x00000002 or vr != b"UL":  # (0002,0000) read as group 2, element 0 in little-endian order
        raise ValueError("file meta does not start with its group length")
    (group_length,) = struct.unpack("<I", data[140:144])
    return 144 + group_length


def dataset_bytes(path: Path) -> bytes:
    """The dataset part of a Part 10 file: what travels over the network in a C-STORE."""
    data = path.read_bytes()
    return data[meta_end(data):]


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dicom3tools' validator on one file: (error lines, warning lines). It exits 0 even with errors."""
    require_tools("dciodvfy")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def storescu(port: int, files: Sequence[Path] | Path, *, calling_ae: str = "STORESCU", called_ae: str = "MEDFINDER",
             extra: Sequence[str] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    """Send files (or a folder, recursively) with dcmtk storescu."""
    require_tools("storescu")
    targets = [str(files)] if isinstance(files, Path) else [str(f) for f in files]
    command = ["storescu", "-aet", calling_ae, "-aec", called_ae, "+sd", "+r", *extra, "127.0.0.1", str(port),
               *targets]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=nodelay_env())


def echoscu(port: int, calling_ae: str = "STORESCU", called_ae: str = "MEDFINDER") -> bool:
    require_tools("echoscu")
    result = subprocess.run(["echoscu", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)],
                            capture_output=True, timeout=30, env=nodelay_env())
    return result.returncode == 0


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A real redis-server on 127.0.0.1 (no persistence); yields its URL."""
    require_tools("redis-server")
    port = free_port()
    log = open(workdir / f"redis-{port}.log", "wb")
    process = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                "--appendonly", "no", "--dir", str(workdir)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: port_open(port), 20, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(process)
        log.close()


def write_node_config(path: Path, data_dir: Path, destination_port: int | None, **sections: Any) -> Path:
    """A node YAML for tests: 127.0.0.1 only, short quiet timer, SRs to a test PACS."""
    config: dict[str, Any] = {
        "paths": {"data_dir": str(data_dir)},
        "node": {"bind": "127.0.0.1", "quiet_seconds": 1.5, "delivery_backoff_s": 0.5, "poll_interval_s": 0.1},
        "selection": {"min_slices": 20},
        "workers": {"embedded_threads": 1, "onnx_threads": 1},
    }
    if destination_port is not None:
        config["node"]["destinations"] = [{"ae_title": "PACS", "host": "127.0.0.1", "port": destination_port}]
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@contextlib.contextmanager
def celery_worker(config: Path, log_path: Path) -> Iterator[subprocess.Popen]:
    """A real Celery worker process (prefork, one child) consuming the GPU queue."""
    env = {**os.environ, "MEDFINDER_CONFIG": str(config), "HF_HUB_OFFLINE": "1"}
    log = open(log_path, "wb")
    process = subprocess.Popen([str(VENV_BIN / "celery"), "-A", "workers", "worker", "-Q", "gpu", "--concurrency", "1",
                                "--pool", "prefork", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
                                "--without-heartbeat"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: b"ready" in log_path.read_bytes() or process.poll() is not None, 60, "the Celery worker")
        assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
        yield process
    finally:
        stop_process(process, timeout=30)
        log.close()


def start_node(config: Path, port: int, log_path: Path, *args: str) -> subprocess.Popen:
    """``medfinder serve`` in its own process; returns once it answers C-ECHO."""
    log = open(log_path, "ab")
    process = subprocess.Popen([str(VENV_BIN / "medfinder"), "serve", "--config", str(config), "--port", str(port),
                                *args], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log,
                               stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_for(lambda: process.poll() is not None or echoscu(port), 60, "the node to answer C-ECHO", interval=0.3)
    except AssertionError:
        stop_process(process, signal.SIGKILL)
        raise
    assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
    return process


def write_dcmqrscp_config(path: Path, port: int, storage: Path, peers: dict[str, tuple[str, int]],
                          quota: str = "(1000, 4096mb)") -> Path:
    """A dcmtk dcmqrscp configuration: AE ``PACS`` serving ``storage`` read-only on ``port``, with ``peers``
    (name -> (AE title, port) on 127.0.0.1) in its host table so that it can C-MOVE to them."""
    hosts = "\n".join(f"{name} = ({ae_title}, 127.0.0.1, {peer_port})" for name, (ae_title, peer_port) in peers.items())
    path.write_text(f"""NetworkTCPPort = {port}
MaxPDUSize = 65536
MaxAssociations = 16
HostTable BEGIN
{hosts}
HostTable END
VendorTable BEGIN
VendorTable END
AETable BEGIN
PACS {storage} R {quota} ANY
AETable END
""", encoding="utf-8")
    return path
