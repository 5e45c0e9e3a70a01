"""The bundle's ``manifest.json``: file hashes, the bundle id, reading, writing and verification.

A bundle is a folder: ``image_encoder.onnx``, ``text_encoder.onnx``, ``tokenizer.json`` and ``manifest.json``.
The manifest records the SHA-256 of every other file; the bundle id is a hash of those (so the same model
exported twice gets the same id, whatever the creation time), and ``integrity.manifest_sha256`` covers the
manifest's own content. Any changed byte in any file is therefore detected and the file named. This guards
against corruption and partial copies, not against someone rewriting both a file and its manifest.

Torch-free: the serving runtime and ``medfinder bundle verify`` use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from model_export.errors import BundleError, BundleIntegrityError, BundleMismatchError

BUNDLE_FORMAT = "medfinder-bundle/1"
MANIFEST_FILE = "manifest.json"
IMAGE_ENCODER_FILE = "image_encoder.onnx"
TEXT_ENCODER_FILE = "text_encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
BUNDLE_ID_LENGTH = 16  # hex characters of SHA-256: short enough for a folder name, ample against collisions

#: Keys a bundle must have for the runtime to use it (checked on read, so the error names the key).
REQUIRED_KEYS = ("format", "bundle_id", "embedding_dim", "files", "preprocessing", "text", "image_encoder",
                 "text_encoder")

__all__ = [
    "BUNDLE_FORMAT",
    "IMAGE_ENCODER_FILE",
    "MANIFEST_FILE",
    "TEXT_ENCODER_FILE",
    "TOKENIZER_FILE",
    "bundle_id_for",
    "describe_files",
    "finalize_manifest",
    "manifest_digest",
    "read_manifest",
    "sha256_file",
    "verify_bundle",
    "write_json_atomic",
]


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (ONNX files reach hundreds of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _bundle_files(folder: Path) -> list[str]:
    """Relative POSIX names of every regular file except the manifest and hidden files, sorted."""
    names = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if relative.as_posix() != MANIFEST_FILE:
            names.append(relative.as_posix())
    return names


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` for every file of the bundle folder but the manifest."""
    folder = Path(folder)
    return {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
            for name in _bundle_files(folder)}


def bundle_id_for(files: dict[str, dict[str, Any]]) -> str:
    """The content id: a hash over (name, SHA-256) of every file, independent of metadata and time."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]['sha256']}\n".encode())
    return digest.hexdigest()[:BUNDLE_ID_LENGTH]


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON without its ``integrity`` entry."""
    body = {key: value for key, value in manifest.items() if key != "integrity"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_json_atomic(path: Path, payload: dict[str, Any]) -> Path:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


def finalize_manifest(folder: Path, manifest: dict[str, Any],
                      files: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Hash the folder's files into ``manifest``, set ``bundle_id`` and the integrity digest, write it.

    ``files``: hashes already taken of this folder (only the manifest changed since), to skip hashing again.
    """
    folder = Path(folder)
    manifest = dict(manifest)
    manifest["format"] = BUNDLE_FORMAT
    manifest["files"] = describe_files(folder) if files is None else files
    manifest["bundle_id"] = bundle_id_for(manifest["files"])
    manifest.pop("integrity", None)
    manifest["integrity"] = {"manifest_sha256": manifest_digest(manifest), "algorithm": "sha256"}
    write_json_atomic(folder / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse ``manifest.json`` and check its format and required keys (no file hashing: see verify_bundle)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise BundleError(f"bundle folder {folder} does not exist")
    if not path.is_file():
        raise BundleIntegrityError(f"{path}: missing; {folder} is not a model bundle", path=str(path))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleIntegrityError(f"{path}: not valid JSON ({error})", path=str(path)) from None
    if not isinstance(manifest, dict):
        raise BundleIntegrityError(f"{path}: not a JSON object", path=str(path))
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleMismatchError(f"{path}: format {manifest.get('format')!r}, this runtime reads {BUNDLE_FORMAT!r}")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise BundleIntegrityError(f"{path}: missing keys {missing}", path=str(path))
    return manifest


def verify_bundle(folder: Path) -> dict[str, Any]:
    """The manifest of an intact bundle; :class:`BundleIntegrityError` naming the first file that differs."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    manifest_path = folder / MANIFEST_FILE
    recorded = (manifest.get("integrity") or {}).get("manifest_sha256")
    if recorded != manifest_digest(manifest):
        raise BundleIntegrityError(f"{manifest_path}: content differs from its recorded digest (edited or corrupt)",
                                   path=str(manifest_path))
    files: dict[str, dict[str, Any]] = manifest["files"]
    for name in sorted(files):
        path = folder / name
        if not path.is_file():
            raise BundleIntegrityError(f"{path}: listed in the manifest but missing", path=str(path))
        expected = files[name]
        if path.stat().st_size != expected.get("bytes") or sha256_file(path) != expected.get("sha256"):
            raise BundleIntegrityError(f"{path}: content differs from the manifest's SHA-256 (corrupt or modified)",
                                       path=str(path))
    extra = sorted(set(_bundle_files(folder)) - set(files))
    if extra:
        raise BundleIntegrityError(f"{folder / extra[0]}: not listed in the manifest", path=str(folder / extra[0]))
    if bundle_id_for(files) != manifest["bundle_id"]:
        raise BundleIntegrityError(f"{manifest_path}: bundle_id does not match the files' hashes",
                                   path=str(manifest_path))
    return manifest
