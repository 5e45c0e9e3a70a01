"""``medfinder orthanc config``: what it writes, without starting Orthanc (tests/test_orthanc.py starts one)."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

from dicom_node.api.tokens import TokenStore, tokens_path
from dicom_node.orthanc.config import PLUGIN_NAME, plugin_source
from node_helpers import VENV_BIN


def orthanc_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "medfinder"), "orthanc", "config", *args], capture_output=True, text=True,
                          timeout=120)


def test_loopback_configuration_with_a_new_read_token(tmp_path: Path) -> None:
    data_dir, out = tmp_path / "node-data", tmp_path / "orthanc"
    result = orthanc_config("--data-dir", str(data_dir), "--out", str(out), "--node-url", "http://127.0.0.1:8080",
                            "--token-file", str(out / "node-token"))
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "orthanc.json").read_text())
    assert document["RemoteAccessAllowed"] is False and document["AuthenticationEnabled"] is False
    assert (document["HttpPort"], document["DicomPort"], document["DicomAet"]) == (8042, 4242, "ORTHANC")
    assert document["DicomModalities"]["medfinder"] == {
        "AET": "MEDFINDER", "Host": "127.0.0.1", "Port": 11112, "AllowEcho": True, "AllowStore": True,
        "AllowFind": False, "AllowMove": False, "AllowGet": False}
    assert document["PythonScript"] == str((out / PLUGIN_NAME).resolve())
    assert (out / PLUGIN_NAME).read_bytes() == plugin_source()
    assert document["MedFinder"]["NodeUrl"] == "http://127.0.0.1:8080"
    assert document["MedFinder"]["RouteModalities"] == ["CT"]
    token = (out / "node-token").read_text().strip()
    assert stat.S_IMODE((out / "node-token").stat().st_mode) == 0o600
    record = TokenStore(tokens_path(data_dir)).authenticate(token)
    assert record is not None and record.name == "orthanc-orthanc" and [s.value for s in record.scopes] == ["read"]
    assert token not in (out / "orthanc.json").read_text(), "the configuration names the token's file, not the token"

    again = orthanc_config("--data-dir", str(data_dir), "--out", str(out), "--node-url", "http://127.0.0.1:8080",
                           "--token-file", str(out / "node-token"))
    assert again.returncode == 0, again.stderr
    assert (out / "node-token").read_text().strip() == token, "a second run keeps the token it made"
    assert len(TokenStore(tokens_path(data_dir)).records()) == 1


def test_container_paths_and_remote_access_behind_a_generated_user(tmp_path: Path) -> None:
    out = tmp_path / "orthanc-config"
    result = orthanc_config("--data-dir", str(tmp_path / "node-data"), "--out", str(out), "--root",
                            "/etc/orthanc-medfinder", "--storage", "/var/lib/orthanc/db", "--node-url",
                            "http://node:8080", "--node-dicom-host", "node", "--token-file", str(out / "node-token"),
                            "--remote-access", "--plugin-library", "/usr/local/share/orthanc/plugins/libOrthancPython.so",
                            "--route-modality", "CT", "--route-modality", "PT", "--aet", "PACS1")
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "orthanc.json").read_text())
    assert document["PythonScript"] == f"/etc/orthanc-medfinder/{PLUGIN_NAME}"
    assert document["MedFinder"]["TokenFile"] == "/etc/orthanc-medfinder/node-token"
    assert document["StorageDirectory"] == "/var/lib/orthanc/db"
    assert document["DicomModalities"]["medfinder"]["Host"] == "node"
    assert document["MedFinder"]["RouteModalities"] == ["CT", "PT"]
    assert document["RemoteAccessAllowed"] is True and document["AuthenticationEnabled"] is True
    password = (out / "orthanc-admin.password").read_text().strip()
    assert document["RegisteredUsers"] == {"medfinder-admin": password} and len(password) >= 24
    for secret in ("orthanc-admin.password", "orthanc.json", "node-token"):
        assert stat.S_IMODE((out / secret).stat().st_mode) == 0o600, secret


def test_a_token_file_outside_the_mounted_folder_is_refused(tmp_path: Path) -> None:
    result = orthanc_config("--data-dir", str(tmp_path / "node-data"), "--out", str(tmp_path / "out"), "--root",
                            "/etc/orthanc-medfinder", "--node-url", "http://node:8080",
                            "--token-file", str(tmp_path / "elsewhere" / "token"))
    assert result.returncode == 2
    assert "outside" in result.stderr


def test_plugin_is_standard_library_only() -> None:
    """The plugin runs in Orthanc's own Python (Debian's 3.11.2, no venv): it may import nothing of ours."""
    import ast

    tree = ast.parse(plugin_source())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"hashlib", "json", "os", "re", "threading", "time", "urllib", "orthanc"}, imported
