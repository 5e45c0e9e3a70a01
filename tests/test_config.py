"""The typed configuration: defaults, YAML presets, environment overrides and clear validation errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, load_settings
from config.loader import PRESETS_DIR, environment_overrides
from config.settings import OPTIMIZER_PRESETS


def test_defaults_are_the_paper_shapes() -> None:
    settings = load_settings()
    assert settings.preprocessing.target_shape == (96, 224, 224)
    assert settings.model.embedding_dim == 512
    assert settings.model.sampler.window_words == 100
    assert settings.model.image.backbone == "resnet50"


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_preset_validates(preset: str) -> None:
    settings = load_settings(preset)
    assert settings.train.epochs >= 1


def test_required_presets_exist() -> None:
    assert {"tiny", "synthetic-cpu", "paper"} <= {p.stem for p in PRESETS_DIR.glob("*.yaml")}


def test_paper_preset_has_the_papers_optimiser() -> None:
    optim = load_settings("paper").optim
    assert (optim.optimizer, optim.lr, optim.momentum, optim.weight_decay) == ("sgd", 1e-6, 0.9, 1e-5)
    assert load_settings("paper").train.batch_size == 96
    assert load_settings("paper").train.epochs == 400


def test_preset_fills_only_fields_not_given() -> None:
    settings = load_settings(overrides={"optim": {"preset": "paper", "lr": 0.01}})
    assert settings.optim.lr == 0.01
    assert settings.optim.optimizer == OPTIMIZER_PRESETS["paper"]["optimizer"]


def test_yaml_then_environment_then_overrides(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 5\n  batch_size: 4\n")
    env = {"MEDFINDER__TRAIN__EPOCHS": "7", "MEDFINDER__MODEL__FUSION": "false", "OTHER": "x"}
    settings = load_settings(config, overrides={"train": {"batch_size": 6}}, environ=env)
    assert (settings.train.epochs, settings.train.batch_size, settings.model.fusion) == (7, 6, False)


def test_environment_nesting() -> None:
    assert environment_overrides({"MEDFINDER__MODEL__IMAGE__BACKBONE": "vit_base"}) == {
        "model": {"image": {"backbone": "vit_base"}}
    }


def test_errors_name_every_bad_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epochs: 0\n  batchsize: 3\npreprocessing:\n  hu_window: [100, -100]\n")
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    message = str(error.value)
    assert "train.epochs" in message and "train.batchsize" in message and "preprocessing.hu_window" in message


def test_not_yaml_mapping_and_missing_file(tmp_path: Path) -> None:
    config = tmp_path / "list.yaml"
    config.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(config)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_biomedclip_without_a_folder_is_refused() -> None:
    with pytest.raises(ConfigError, match="local folder"):
        load_settings(overrides={"model": {"text": {"kind": "biomedclip"}}})


def test_cli_reports_config_errors_with_exit_code_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "medfinder", "train", "--out", str(tmp_path), "--set", "train.epochs=-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "train.epochs" in result.stderr


def test_python_m_config_prints_effective_settings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "config", "--config", "tiny", "--set", "train.epochs=9"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "epochs: 9" in result.stdout


def test_node_sources_and_destinations_parse_the_command_line_forms() -> None:
    from config.settings import AllowedSource, Destination

    assert AllowedSource.parse("PACS") == AllowedSource(ae_title="PACS")
    assert AllowedSource.parse("PACS@10.0.0.5:104") == AllowedSource(ae_title="PACS", host="10.0.0.5", port=104)
    assert Destination.parse("ARCHIVE@pacs.local:11112").label == "ARCHIVE@pacs.local:11112"
    for bad in ("ARCHIVE", "ARCHIVE@host", "@host:104", "A\\B@host:104", "TOO-LONG-AE-TITLE-X@h:1"):
        with pytest.raises(ValueError):
            Destination.parse(bad)


def test_bad_node_settings_are_named() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, overrides={"node": {"ae_title": "", "port": 70000},
                                       "index": {"backend": "qdrant"}})
    message = str(error.value)
    assert "node.ae_title" in message and "node.port" in message and "index.url" in message
