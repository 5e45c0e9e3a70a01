"""End to end on the tiny preset: train -> checkpoints -> resume -> evaluate, plus bad-input policy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from config import load_settings
from trainer.data.manifest import read_manifest
from trainer.data.row_checks import BadRowError
from trainer.engine.checkpoint import load_checkpoint
from trainer.engine.loop import _next_epoch_overruns, load_trained_model, train

REPO = Path(__file__).resolve().parent.parent


def tiny_settings(work_dir: Path, **overrides):
    merged = {"paths": {"work_dir": str(work_dir)}, "train": {"progress": False}}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return load_settings("tiny", overrides=merged)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One tiny training run shared by the tests below (a few seconds)."""
    work = tmp_path_factory.mktemp("tiny")
    out = work / "run"
    result = train(tiny_settings(work), out)
    assert result.epochs_run == 2
    return work, out


def test_training_writes_checkpoints_and_metrics(tiny_run: tuple[Path, Path]) -> None:
    _, out = tiny_run
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert {"sim", "mse", "total"} <= set(lines[0]["loss"])
    assert "R@10" in lines[-1]["val"]["t2i"]
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["global_step"] >= 2
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert state["best"]["metric"] == "val_t2i_R@10"
    assert state["settings"]["train"]["epochs"] == 2
    assert not any(key.startswith("text_encoder.") for key in state["model"])


def test_resume_continues_from_last(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    work, out = tiny_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    result = train(tiny_settings(work, train={"epochs": 3}), resumed)
    assert result.epochs_run == 1  # only epoch 3 was left
    lines = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert load_checkpoint(resumed / "last.pt")["global_step"] > load_checkpoint(out / "last.pt")["global_step"]


def test_evaluate_writes_json_and_tables(tiny_run: tuple[Path, Path]) -> None:
    _, out = tiny_run
    from trainer.evaluation.evaluate import TRAINED, UNTRAINED, evaluate_checkpoint

    payload = evaluate_checkpoint(out / "best.pt", progress=False)
    written = json.loads((out / "eval-test.json").read_text())
    assert written["N"] == payload["N"] >= 8
    trained = written["results"][TRAINED]
    assert {"t2i", "i2t", "keyword", "i2i"} <= set(trained)
    assert set(written["results"]) >= {TRAINED, UNTRAINED}
    assert "pleural effusion" in trained["keyword"]
    assert "Text→Image" in written["tables"] and "P@20" in written["tables"]


def write_bad_manifest(work: Path) -> Path:
    """Three good rows and one of each bad kind, all in the training split."""
    volumes = work / "vols"
    volumes.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        path = volumes / f"good{i}.nii.gz"
        nib.save(nib.Nifti1Image((rng.normal(size=(32, 32, 16)) * 200 - 600).astype(np.int16), np.diag([4, 4, 8, 1.0])), path)
        rows.append(f"good{i},{path.name},report {i} nodule,p{i},nodule,train")
    (volumes / "flat.nii.gz").write_bytes(b"")
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)), volumes / "twod.nii.gz")
    (volumes / "junk.nii.gz").write_text("not a volume")
    rows += [
        "missing,nowhere.nii.gz,a report,p9,,train",
        f"empty,{(volumes / 'good0.nii.gz').name},,p8,,train",
        "twod,twod.nii.gz,a report,p7,,train",
        "junk,junk.nii.gz,a report,p6,,train",
        "val0,good1.nii.gz,val report,p5,,val",
    ]
    manifest = volumes / "manifest.csv"
    manifest.write_text("volume_id,volume,report,patient_id,labels,split\n" + "\n".join(rows) + "\n")
    return manifest


def test_bad_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    manifest = write_bad_manifest(tmp_path)
    settings = tiny_settings(tmp_path, data={"manifest": str(manifest), "on_bad_row": "skip"}, train={"epochs": 1})
    train(settings, tmp_path / "run")
    skipped = load_checkpoint(tmp_path / "run" / "last.pt")["skipped_rows"]
    assert skipped["skipped"] == 4
    text = "\n".join(skipped["rows"])
    for row_number in (4, 5, 6, 7):  # missing, empty report, 2-D volume, junk file
        assert f"row {row_number} " in text
    assert "missing" in text and "empty" in text and "unreadable" in text


def test_bad_rows_stop_the_run_when_asked(tmp_path: Path) -> None:
    manifest = write_bad_manifest(tmp_path)
    settings = tiny_settings(tmp_path, data={"manifest": str(manifest), "on_bad_row": "stop"})
    with pytest.raises(BadRowError, match="row 4"):
        train(settings, tmp_path / "run")


def test_cli_train_and_evaluate(tmp_path: Path) -> None:
    env = {**os.environ, "MEDFINDER__PATHS__WORK_DIR": str(tmp_path), "MEDFINDER__TRAIN__PROGRESS": "false"}
    out = tmp_path / "cli-run"
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "medfinder"), "train", "--config", "tiny", "--out", str(out),
         "--set", "train.epochs=1", "--evaluate"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "best.pt").is_file() and (out / "eval-test.json").is_file()
    assert "Text→Image" in result.stdout


@pytest.mark.slow
def test_ddp_with_torchrun_on_two_cpu_processes(tmp_path: Path) -> None:
    """DistributedDataParallel (gloo) through torchrun, as on a multi-GPU node."""
    env = {**os.environ, "MEDFINDER__PATHS__WORK_DIR": str(tmp_path), "MEDFINDER__TRAIN__PROGRESS": "false",
           "MEDFINDER__TRAIN__NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "trainer", "train", "--config", "tiny", "--out", str(out), "--set", "train.epochs=1"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(out / "last.pt")
    assert state["global_step"] >= 1
    assert len(read_manifest(Path(state["data"]["manifest"]))) > 0


def test_gradient_accumulation_takes_fewer_optimiser_steps(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    work, out = tiny_run
    accumulated = train(tiny_settings(work, train={"epochs": 1, "batch_size": 4, "grad_accum_steps": 2}), tmp_path / "acc")
    plain = train(tiny_settings(work, train={"epochs": 1, "batch_size": 4}), tmp_path / "plain")
    steps_accumulated = load_checkpoint(tmp_path / "acc" / "last.pt")["global_step"]
    steps_plain = load_checkpoint(tmp_path / "plain" / "last.pt")["global_step"]
    assert steps_plain == 2 * steps_accumulated
    assert accumulated.epochs_run == plain.epochs_run == 1


def test_time_limit_stops_before_an_epoch_that_would_overrun(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    """``train.max_minutes`` predicts the next epoch instead of noticing the overrun after it."""
    assert _next_epoch_overruns(1.0, elapsed_s=50.0, last_epoch_s=11.0)
    assert not _next_epoch_overruns(1.0, elapsed_s=50.0, last_epoch_s=9.0)
    assert not _next_epoch_overruns(None, elapsed_s=1e9, last_epoch_s=1e9)
    work, _ = tiny_run
    # a limit far below one epoch: the run keeps its first epoch (validated, checkpointed) and stops there
    result = train(tiny_settings(work, train={"epochs": 3, "max_minutes": 1e-6}), tmp_path / "boxed")
    assert result.epochs_run == 1
    lines = (tmp_path / "boxed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]
    assert (tmp_path / "boxed" / "best.pt").is_file()


def test_stop_gradient_second_view_trains_the_image_tower(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    """``loss.second_view_gradient=false``: view 2 is a forward-only target, the image tower still learns."""
    import torch

    from trainer.engine.loop import build_model

    work, _ = tiny_run
    settings = tiny_settings(work, train={"epochs": 1}, loss={"second_view_gradient": False})
    model = build_model(settings).train()
    view_1 = torch.rand(3, 1, *settings.preprocessing.target_shape, requires_grad=True)
    view_2 = (view_1.detach() + 0.01).requires_grad_(True)
    losses = model.training_losses(view_1, view_2, torch.randn(3, model.text_encoder.feature_dim))
    losses["total"].backward()
    assert view_2.grad is None  # no backward pass through the second view
    assert view_1.grad is not None and float(view_1.grad.abs().sum()) > 0
    assert float(model.image_encoder.net.conv1.weight.grad.abs().sum()) > 0
    assert "mse" in losses
    result = train(settings, tmp_path / "stopgrad")  # and through the loop, checkpointed with the setting
    assert result.epochs_run == 1
    model, _, loaded = load_trained_model(tmp_path / "stopgrad" / "last.pt")
    assert loaded.loss.second_view_gradient is False


def test_auxiliary_label_loss_trains_a_label_head(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    """``loss.label_weight > 0`` adds L_label on the manifest's labels; 0 (the paper) leaves no trace in checkpoints."""
    work, out = tiny_run
    assert not any(key.startswith("label_head.") for key in load_checkpoint(out / "last.pt")["model"])
    settings = tiny_settings(work, train={"epochs": 1}, loss={"label_weight": 0.5})
    train(settings, tmp_path / "labels")
    line = json.loads((tmp_path / "labels" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["loss"]["label"] > 0
    assert line["loss"]["total"] > line["loss"]["sim"]
    model, state, loaded = load_trained_model(tmp_path / "labels" / "last.pt")
    assert state["model"]["label_head.weight"].shape[0] == len(loaded.loss.label_names)
    assert model.label_head is not None


def test_label_loss_without_labels_is_a_clear_error(tmp_path: Path) -> None:
    manifest = write_bad_manifest(tmp_path)  # its good training rows are labelled "nodule" only
    settings = tiny_settings(tmp_path, data={"manifest": str(manifest)},
                             loss={"label_weight": 1.0, "label_names": ["emphysema"]})
    with pytest.raises(ValueError, match="no training row carries any of the labels"):
        train(settings, tmp_path / "run")
