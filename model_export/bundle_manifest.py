"""The bundle's ``manifest.json``: file hashes, the bundle id, reading, writing and verification.

A bundle is a folder: ``image_encoder.onnx``, ``text_encoder.onnx``, ``tokenizer.json`` and ``manifest.json``.
The manifest records the SHA-256 of every other file; the bundle id is a hash of those (so the same model
exported twice gets the same id, whatever the creation time), and ``integrity.manifest_sha256`` covers the
manifest's own content. Any changed byte in any file is therefore detected and the file named. This guards
against corruption and partial copies, not against someone rewriting both a file and its manifest.

Read back, a manifest is a :class:`BundleManifest`: the parts serving relies on are typed (and checked when
read, so a bad manifest fails with the field named); what exporters record for people (training data, metrics,
parity figures, versions) is kept as they wrote it. The integrity digest is always taken over the JSON as
written, never over a re-serialisation.

Torch-free: the serving runtime and ``medfinder bundle verify`` use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from model_export.atomic_files import write_text_atomic
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


class _Section(BaseModel):
    """A manifest section: typed where serving reads it; extra keys kept as written."""

    model_config = ConfigDict(extra="allow", frozen=True)


class FileEntry(_Section):
    sha256: str
    bytes: int


class ImageEncoderSpec(_Section):
    """The image graph: file, input/output names, input shape (``batch`` first) and dtype."""

    file: str
    input: str
    output: str
    input_shape: list[int | str]
    dtype: str = "float32"


class TextEncoderSpec(_Section):
    """The text graph and its tokenizer."""

    file: str
    inputs: list[str]
    output: str
    tokenizer: str
    max_tokens: int
    text_preprocessing: str = "none"
    dtype: str = "int64"


class ModelInfo(_Section):
    """What the bundle is, for people and logs (name, version; the exporter adds architecture details)."""

    name: str | None = None
    version: str | None = None
    checkpoint: dict[str, Any] | None = None


class DomainSpec(_Section):
    """What a bundle was made for: DICOM modalities and body regions (model_export.domain's region names, e.g.
    CHEST, HEAD, ABDOMEN). The node embeds only studies that match (``selection.domain_check``)."""

    modalities: list[str] = ["CT"]
    body_regions: list[str] = []  # empty = any region


class BundleManifest(_Section):
    """A bundle's ``manifest.json``, read back (see the module docstring for what is typed and why)."""

    format: str
    bundle_id: str
    embedding_dim: int
    files: dict[str, FileEntry]
    preprocessing: dict[str, Any]  # the volume recipe (model_export.preprocessing.describe_spec)
    text: dict[str, Any]  # text handling (model_export.text_windows.TextHandling.from_manifest)
    image_encoder: ImageEncoderSpec
    text_encoder: TextEncoderSpec
    model: ModelInfo = ModelInfo()
    domain: DomainSpec | None = None  # None (bundles made before domains): any CT is embedded
    metrics: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    created: str | None = None
    integrity: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The manifest as JSON data, with exactly the keys it was read or built with."""
        return self.model_dump(mode="json", exclude_unset=True)

    def headline_metrics(self) -> dict[str, Any]:
        """Text->image R@1/5/10 from the test evaluation if recorded, else from validation."""
        metrics = self.metrics or {}
        for split in ("test", "val"):
            t2i = (metrics.get(split) or {}).get("t2i") or {}
            if "R@10" in t2i:
                return {"split": split, **{k: t2i[k] for k in ("R@1", "R@5", "R@10") if k in t2i}}
        return {}

__all__ = [
    "BUNDLE_FORMAT",
    "BundleManifest",
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
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return Path(path)


def finalize_manifest(folder: Path, manifest: dict[str, Any],
                      files: dict[str, dict[str, Any]] | None = None) -> BundleManifest:
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
    path = folder / MANIFEST_FILE
    typed = _typed(manifest, path)
    write_json_atomic(path, manifest)
    return typed


def _typed(manifest: dict[str, Any], path: Path) -> BundleManifest:
    try:
        return BundleManifest.model_validate(manifest)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        raise BundleIntegrityError(f"{path}: {problems}", path=str(path)) from None


def read_manifest(folder: Path) -> BundleManifest:
    """Parse ``manifest.json`` and check its format and fields (no file hashing: see verify_bundle)."""
    return _typed(_read_raw(folder), Path(folder) / MANIFEST_FILE)


def _read_raw(folder: Path) -> dict[str, Any]:
    """``manifest.json`` as written, with its format and required keys checked."""
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


def verify_bundle(folder: Path) -> BundleManifest:
    """The manifest of an intact bundle; :class:`BundleIntegrityError` naming the first file that differs."""
    folder = Path(folder)
    manifest = _read_raw(folder)
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
    return _typed(manifest, manifest_path)
