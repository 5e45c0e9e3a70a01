"""The bundle registry (install, list, activate) and ``medfinder bundle reference --checkpoint``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bundle_helpers import clone_bundle

from config import load_settings
from medfinder.cli import main
from model_export.bundle_manifest import MANIFEST_FILE, finalize_manifest, read_manifest
from model_export.errors import BundleError, BundleIntegrityError
from model_export.registry import (
    ACTIVE_FILE,
    activate_bundle,
    active_bundle_id,
    active_bundle_path,
    install_bundle,
    list_bundles,
    registry_dir,
)
from model_export.runtime import load_bundle
from trainer.export.reference import REFERENCE_NAME


def second_bundle(tiny_bundle: Path, target: Path) -> Path:
    """Another valid bundle with a different id (an extra file), without exporting again."""
    folder = clone_bundle(tiny_bundle, target, writable=(MANIFEST_FILE,))
    (folder / "NOTICE.txt").write_text("demo bundle\n")
    manifest = read_manifest(folder).as_dict()
    manifest["model"]["version"] = "second"
    finalize_manifest(folder, manifest)
    return folder


def test_data_dir_setting_and_environment() -> None:
    assert load_settings(environ={}).paths.data_dir == Path("medfinder-data")
    settings = load_settings(environ={"MEDFINDER__PATHS__DATA_DIR": "/srv/medfinder"})
    assert registry_dir(settings) == Path("/srv/medfinder/bundles")


def test_registry_install_list_activate(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    with pytest.raises(BundleError, match="no active model bundle"):
        active_bundle_path(data)
    first = install_bundle(tiny_bundle, data)
    assert first.parent == registry_dir(data) and first.name == read_manifest(tiny_bundle).bundle_id
    assert install_bundle(tiny_bundle, data) == first  # same content: nothing new
    other = install_bundle(second_bundle(tiny_bundle, tmp_path / "second"), data, activate=True)
    assert other.name != first.name
    assert [e.bundle_id for e in list_bundles(data) if e.active] == [other.name]
    assert active_bundle_path(data) == other

    assert activate_bundle(data, first.name[:6]) == first.name  # a unique prefix is enough
    assert active_bundle_id(data) == first.name
    assert json.loads((registry_dir(data) / ACTIVE_FILE).read_text())["bundle_id"] == first.name
    assert load_bundle(active_bundle_path(load_settings(overrides={"paths": {"data_dir": str(data)}}))).bundle_id \
        == first.name
    with pytest.raises(BundleError, match="not installed"):
        activate_bundle(data, "feedface")

    assert main(["bundle", "activate", other.name, "--data-dir", str(data)]) == 0
    assert main(["bundle", "list", "--data-dir", str(data)]) == 0
    listing = capsys.readouterr().out
    active_line = next(line for line in listing.splitlines() if line.startswith("*"))
    assert other.name in active_line and "second" in active_line and "R@10" in active_line
    assert first.name in listing and "medfinder-resnet10-minilm" in listing
    assert main(["bundle", "list", "--json", "--data-dir", str(data)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["bundle_id"]: row["active"] for row in rows} == {first.name: False, other.name: True}
    assert all(row["embedding_dim"] == 32 and "R@10" in row["t2i"] for row in rows)
    assert main(["bundle", "verify", first.name, "--data-dir", str(data)]) == 0


def test_a_damaged_bundle_is_never_activated(tiny_bundle: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    installed = install_bundle(tiny_bundle, data, activate=True)
    other = install_bundle(second_bundle(tiny_bundle, tmp_path / "second"), data)
    (other / "NOTICE.txt").write_text("changed\n")
    with pytest.raises(BundleIntegrityError, match="NOTICE.txt"):
        activate_bundle(data, other.name)
    assert active_bundle_id(data) == installed.name


def test_reference_from_a_checkpoint_installs_and_activates(
    tiny_checkpoint: Path, tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole command but torch.onnx.export itself (the session bundle's graphs of the same checkpoint are
    reused to keep the suite fast; exporting is covered by ``tiny_bundle``). Parity still runs, for real."""
    for name in ("image_encoder", "text_encoder"):
        monkeypatch.setattr(f"trainer.export.bundle_export.export_{name}",
                            lambda _model, path, *_args, source=tiny_bundle / f"{name}.onnx": shutil.copy(source, path))
    data = tmp_path / "data"
    assert main(["bundle", "reference", "--checkpoint", str(tiny_checkpoint), "--data-dir", str(data)]) == 0
    first_run = capsys.readouterr().out
    assert "[1/3]" in first_run and "[3/3]" in first_run and "not a clinical model" in first_run
    (entry,) = list_bundles(data)
    assert entry.active and entry.name == REFERENCE_NAME
    assert entry.manifest.parity["min_cosine"] >= 0.9999
    assert [p.name for p in registry_dir(data).iterdir() if p.name.startswith(".")] == []  # no staging left over

    assert main(["bundle", "reference", "--checkpoint", str(tiny_checkpoint), "--data-dir", str(data)]) == 0
    assert "nothing to do" in capsys.readouterr().out  # already installed and active: no second export
    assert [e.bundle_id for e in list_bundles(data)] == [entry.bundle_id]


def test_reference_trains_and_evaluates_once_then_reuses_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --checkpoint: a real training run and test evaluation (the tiny preset standing in for the
    15-minute synthetic-cpu one), a real export with its parity check, install and activate; run again, the
    complete run folder and the installed bundle are reused and nothing is trained or exported."""
    run_dir, data = tmp_path / "run", tmp_path / "data"
    command = ["bundle", "reference", "--config", "tiny", "--set", f"paths.work_dir={tmp_path / 'work'}",
               "--set", "train.progress=false", "--run-dir", str(run_dir), "--data-dir", str(data)]
    assert main(command) == 0
    first = capsys.readouterr().out
    assert "training MedFinder" in first and "[3/3]" in first
    assert (run_dir / "best.pt").is_file() and (run_dir / "eval-test.json").is_file()
    (entry,) = list_bundles(data)
    assert entry.active and entry.name == REFERENCE_NAME and entry.manifest.parity["min_cosine"] >= 0.9999
    assert entry.manifest.metrics["test"] is not None  # the evaluation beside best.pt went into the manifest
    stamp = (run_dir / "best.pt").stat().st_mtime_ns
    assert main(command) == 0
    second = capsys.readouterr().out
    assert "no training" in second and "nothing to do" in second
    assert (run_dir / "best.pt").stat().st_mtime_ns == stamp and len(list_bundles(data)) == 1


def test_reference_defaults_to_the_synthetic_cpu_preset() -> None:
    from medfinder.cli import build_parser

    args = build_parser().parse_args(["bundle", "reference"])
    assert args.config == "synthetic-cpu"
