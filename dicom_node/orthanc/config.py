"""A complete Orthanc configuration wired to a node: ``orthanc.json``, the plugin script and the node's token.

``Orthanc DIR/orthanc.json`` then starts an Orthanc (Debian 1.10.1 + Python plugin 4.0, or the pinned image in
docker-compose.yml) that routes stable CT studies to the node, holds the node as a DICOM modality and shows the
node's "Similar cases" pages. Loopback by default: ``RemoteAccessAllowed`` false and no users; ``remote_access``
turns remote HTTP on behind a generated user (its password in a 0600 file beside the configuration).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from model_export.atomic_files import write_atomic

PLUGIN_NAME = "medfinder_plugin.py"  # never "orthanc.py": it would shadow the plugin's own module
DEBIAN_PYTHON_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPython.so"
NODE_MODALITY = "medfinder"
ADMIN_USER = "medfinder-admin"


@dataclass(frozen=True)
class OrthancConfigRequest:
    """What ``medfinder orthanc config`` was asked for."""

    out: Path
    node_url: str
    token_file: Path
    node_ae_title: str
    node_dicom_port: int
    node_dicom_host: str | None = None  # default: the host of node_url
    http_port: int = 8042
    dicom_port: int = 4242
    ae_title: str = "ORTHANC"
    stable_age_s: int = 60
    route_modalities: tuple[str, ...] = ("CT",)
    plugin_library: str = DEBIAN_PYTHON_PLUGIN
    # Where ``out`` is seen by Orthanc when that differs (a container mount); the paths inside orthanc.json use it.
    root: Path | None = None
    storage: Path | None = None  # default: <root>/db
    remote_access: bool = False


@dataclass(frozen=True)
class OrthancConfigFiles:
    """What was written (paths on this machine)."""

    config: Path
    plugin: Path
    token_file: Path
    admin_password_file: Path | None = None
    notes: list[str] = field(default_factory=list)


def plugin_source() -> bytes:
    return resources.files("dicom_node.orthanc.plugin").joinpath(PLUGIN_NAME).read_bytes()


def _inside(path: Path, request: OrthancConfigRequest) -> str:
    """``path`` (under ``out``) as Orthanc sees it: mapped under ``root`` when one is given."""
    path = path.resolve()
    if request.root is None:
        return str(path)
    try:
        return str(request.root / path.relative_to(request.out.resolve()))
    except ValueError as error:
        raise ValueError(f"{path} is outside {request.out}: with --root every file must be inside --out") from error


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


def orthanc_json(request: OrthancConfigRequest, admin_password: str | None) -> dict:
    """The configuration document (plugin 4.0 reads ``PythonScript``; the ``Python`` section needs 4.1)."""
    node_host = request.node_dicom_host or urlsplit(request.node_url).hostname or "127.0.0.1"
    root = request.root or request.out.resolve()
    storage = str(request.storage or (root / "db"))
    document: dict = {
        "Name": request.ae_title,
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "HttpPort": request.http_port,
        "DicomPort": request.dicom_port,
        "DicomAet": request.ae_title,
        "RemoteAccessAllowed": request.remote_access,
        "AuthenticationEnabled": request.remote_access,
        "StableAge": request.stable_age_s,
        "Plugins": [request.plugin_library],
        "PythonScript": _inside(request.out / PLUGIN_NAME, request),
        "PythonVerbose": False,
        "DicomModalities": {
            NODE_MODALITY: {"AET": request.node_ae_title, "Host": node_host, "Port": request.node_dicom_port,
                            "AllowEcho": True, "AllowStore": True, "AllowFind": False, "AllowMove": False,
                            "AllowGet": False},
        },
        "MedFinder": {
            "NodeUrl": request.node_url.rstrip("/"),
            "TokenFile": _inside(request.token_file, request),
            "Modality": NODE_MODALITY,
            "RouteModalities": list(request.route_modalities),
            "StateFile": str(root / "medfinder-routing.json"),
            "TimeoutSeconds": 30,
            # A send that fails is retried after 30 s, 60 s, 120 s... then given up (logged) after 6 attempts.
            "RetryAttempts": 6,
            "RetryBaseSeconds": 30,
        },
    }
    if admin_password is not None:
        document["RegisteredUsers"] = {ADMIN_USER: admin_password}
    return document


def write_orthanc_config(request: OrthancConfigRequest, token: str | None) -> OrthancConfigFiles:
    """Write the configuration, the plugin and (when ``token`` is given) the token file; idempotent."""
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    if token is not None:
        _write_secret(request.token_file, token)
    elif not request.token_file.is_file():
        raise FileNotFoundError(f"no token file {request.token_file}")
    password_file = None
    password = None
    if request.remote_access:
        password_file = out / "orthanc-admin.password"
        if password_file.is_file():
            password = password_file.read_text(encoding="utf-8").strip()
        else:
            password = secrets.token_urlsafe(24)
            _write_secret(password_file, password)
    plugin = out / PLUGIN_NAME
    write_atomic(plugin, plugin_source())
    config = out / "orthanc.json"
    document = orthanc_json(request, password)
    write_atomic(config, (json.dumps(document, indent=2) + "\n").encode("utf-8"))
    if password is not None:
        os.chmod(config, 0o600)  # it holds the user's password
    return OrthancConfigFiles(config=config, plugin=plugin, token_file=request.token_file,
                              admin_password_file=password_file)
