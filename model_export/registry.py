"""The bundle registry on disk: several bundles side by side under ``<data_dir>/bundles/``, one active.

Layout::

    <paths.data_dir>/bundles/<bundle_id>/{manifest.json, image_encoder.onnx, text_encoder.onnx, tokenizer.json}
    <paths.data_dir>/bundles/active.json      {"bundle_id": ..., "activated_at": ...}, replaced atomically

Installing copies (or moves) a verified folder under its content id, so installing the same bundle twice is a
no-op; activating verifies the bundle first, so a corrupt bundle never becomes active. Torch-free: the node
calls :func:`active_bundle_path` at start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from config.settings import Settings
from model_export.bundle_manifest import BundleManifest, read_manifest, verify_bundle, write_json_atomic
from model_export.errors import BundleError, BundleIntegrityError

logger = logging.getLogger(__name__)

BUNDLES_DIR = "bundles"
ACTIVE_FILE = "active.json"

Where = Settings | Path | str


@dataclass(frozen=True)
class BundleEntry:
    """One installed bundle as ``medfinder bundle list`` shows it."""

    bundle_id: str
    path: Path
    active: bool
    manifest: BundleManifest | None
    error: str | None = None

    @property
    def name(self) -> str:
        return str(self.manifest.model.name if self.manifest and self.manifest.model.name is not None else "?")

    @property
    def version(self) -> str:
        return str(self.manifest.model.version if self.manifest and self.manifest.model.version is not None else "?")

    @property
    def embedding_dim(self) -> int | None:
        return self.manifest.embedding_dim if self.manifest else None

    @property
    def created(self) -> str:
        return str(self.manifest.created if self.manifest and self.manifest.created else "?")

    def headline_metrics(self) -> dict[str, Any]:
        """Text->image R@1/5/10 from the test evaluation if recorded, else from validation."""
        return self.manifest.headline_metrics() if self.manifest else {}


def registry_dir(where: Where) -> Path:
    """``<data_dir>/bundles`` for a Settings object, or a data directory given directly."""
    data_dir = where.paths.data_dir if isinstance(where, Settings) else Path(where)
    return Path(data_dir) / BUNDLES_DIR


def active_bundle_id(where: Where) -> str | None:
    """The id in ``active.json``, or None when no bundle was activated."""
    path = registry_dir(where) / ACTIVE_FILE
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["bundle_id"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise BundleError(f"{path}: unreadable ({error!r}); activate a bundle again") from None


def list_bundles(where: Where) -> list[BundleEntry]:
    """Every bundle folder in the registry (unreadable ones too, with their error), newest first."""
    root = registry_dir(where)
    if not root.is_dir():
        return []
    active = active_bundle_id(where)
    entries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            entries.append(BundleEntry(folder.name, folder, folder.name == active, read_manifest(folder)))
        except BundleError as error:
            entries.append(BundleEntry(folder.name, folder, folder.name == active, None, str(error)))
    return sorted(entries, key=lambda entry: entry.created, reverse=True)


def find_bundle(where: Where, bundle_id: str) -> Path:
    """The folder of ``bundle_id`` (a unique prefix is enough)."""
    root = registry_dir(where)
    installed = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if root.is_dir() else []
    if bundle_id in installed:
        return root / bundle_id
    matches = [name for name in installed if bundle_id and name.startswith(bundle_id)]
    if len(matches) == 1:
        return root / matches[0]
    what = f"is ambiguous ({matches})" if matches else "is not installed"
    raise BundleError(f"bundle {bundle_id!r} {what} in {root} (installed: {installed or 'none'})")


def activate_bundle(where: Where, bundle_id: str) -> str:
    """Verify the bundle, then mark it active (atomic replace of ``active.json``); returns its full id."""
    folder = find_bundle(where, bundle_id)
    manifest = verify_bundle(folder)
    write_json_atomic(registry_dir(where) / ACTIVE_FILE, {
        "bundle_id": manifest.bundle_id,
        "activated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    logger.info("bundle activated: id=%s model=%s", manifest.bundle_id, manifest.model.name)
    return manifest.bundle_id


def active_bundle_path(where: Where) -> Path:
    """The active bundle's folder; :class:`BundleError` when none is active or it has gone missing."""
    bundle_id = active_bundle_id(where)
    if bundle_id is None:
        raise BundleError(f"no active model bundle in {registry_dir(where)}: run `medfinder bundle reference` "
                          "or `medfinder bundle activate ID`")
    folder = registry_dir(where) / bundle_id
    if not folder.is_dir():
        raise BundleError(f"the active bundle {bundle_id} is missing from {registry_dir(where)}")
    return folder


def install_bundle(source: Path, where: Where, activate: bool = False, move: bool = False) -> Path:
    """Verify ``source`` and put it at ``<registry>/<bundle_id>``; an intact copy already there is kept."""
    source = Path(source)
    manifest = verify_bundle(source)
    bundle_id = manifest.bundle_id
    root = registry_dir(where)
    root.mkdir(parents=True, exist_ok=True)
    target = root / bundle_id
    if target.exists():
        try:
            verify_bundle(target)
            logger.info("bundle %s already installed", bundle_id)
        except BundleIntegrityError:
            logger.warning("bundle %s in the registry is damaged: replacing it", bundle_id)
            shutil.rmtree(target)
    if not target.exists():
        staging = root / f".{bundle_id}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        if move:
            shutil.move(str(source), str(staging))
        else:
            shutil.copytree(source, staging)
        os.replace(staging, target)
        logger.info("bundle installed: id=%s model=%s", bundle_id, manifest.model.name)
    if activate:
        activate_bundle(where, bundle_id)
    return target


def installed_from_checkpoint(where: Where, checkpoint_sha256: str, name: str | None = None) -> Path | None:
    """An installed bundle exported from the checkpoint with this SHA-256 (and name), if any."""
    for entry in list_bundles(where):
        if entry.manifest is None:
            continue
        model = entry.manifest.model
        same_name = name is None or model.name == name
        if (model.checkpoint or {}).get("sha256") == checkpoint_sha256 and same_name:
            return entry.path
    return None
