"""``medfinder export``: the bundle's files and manifest, parity with PyTorch (random and real CT), loud failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medfinder.cli import main
from model_export.bundle_manifest import IMAGE_ENCODER_FILE, MANIFEST_FILE, TEXT_ENCODER_FILE, TOKENIZER_FILE
from model_export.errors import ParityError
from model_export.preprocessing import load_dicom_series, preprocess_volume
from model_export.runtime import load_bundle
from trainer.engine.embedding import embed_reports, embed_volume_arrays
from trainer.engine.text_features import TextFeatureCache
from trainer.export.parity import long_report, require_parity

MIN_COSINE = 0.9999


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_export_writes_the_bundle_files_and_manifest(tiny_bundle: Path, tiny_checkpoint: Path) -> None:
    assert {p.name for p in tiny_bundle.iterdir()} == {IMAGE_ENCODER_FILE, TEXT_ENCODER_FILE, TOKENIZER_FILE,
                                                        MANIFEST_FILE}
    manifest = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    assert len(manifest["bundle_id"]) == 16
    assert manifest["embedding_dim"] == 32
    assert manifest["preprocessing"]["input_shape"] == [1, 16, 32, 32]
    assert manifest["preprocessing"]["orientation"] == "RAS" and manifest["preprocessing"]["hu_window"] == [-1000, 1000]
    assert manifest["image_encoder"]["file"] == IMAGE_ENCODER_FILE
    assert manifest["text_encoder"]["file"] == TEXT_ENCODER_FILE
    assert set(manifest["files"]) == {IMAGE_ENCODER_FILE, TEXT_ENCODER_FILE, TOKENIZER_FILE}
    text = manifest["text"]
    assert (text["window_words"], text["max_chunks"], text["sampler_enabled"], text["text_preprocessing"]) == (
        32, 8, True, "none")
    assert "mean" in text["pooling"] and "inference_chunks" in text["chunking"]
    assert manifest["opset"] == 18
    assert {"torch", "onnx", "onnxruntime"} <= {k for k, v in manifest["versions"].items() if v}
    assert manifest["metrics"]["best"]["metric"] == "val_t2i_R@10" and "R@10" in manifest["metrics"]["val"]["t2i"]
    assert manifest["training"]["data"]["volumes"]["train"] == 24 and "not clinical" in manifest["training"]["kind"]
    assert manifest["model"]["checkpoint"]["file"] == tiny_checkpoint.name and manifest["created"]
    parity = manifest["parity"]
    assert parity["passed"] and parity["min_cosine"] >= MIN_COSINE
    for encoder in ("image_encoder", "text_encoder"):
        assert parity[encoder]["min_cosine"] >= MIN_COSINE and 0 <= parity[encoder]["max_abs_diff"] < 1e-4
    assert max(parity["texts"]["words"]) > 2 * parity["texts"]["window_words"]  # a multi-chunk report was checked


def test_export_parity_included_a_real_series(tiny_bundle: Path, lung_ct_dir: Path) -> None:
    parity = json.loads((tiny_bundle / MANIFEST_FILE).read_text())["parity"]
    assert parity["real_series"] and (lung_ct_dir / parity["real_series"]).is_dir()
    assert parity["image_encoder"]["cases"]["real_series"]["min_cosine"] >= MIN_COSINE


def test_runtime_matches_pytorch_on_a_real_series(tiny_bundle: Path, tiny_model, lung_ct_dir: Path) -> None:
    model, settings = tiny_model
    series = lung_ct_dir / "Lung_Dx-A0002_series2_B70f"
    array = preprocess_volume(load_dicom_series(series), settings.preprocessing)
    reference = embed_volume_arrays(model, array[np.newaxis], 1, torch.device("cpu"))
    bundle = load_bundle(tiny_bundle, expected_dim=32, threads=1)
    served = bundle.embed_series(series)
    assert served.shape == (32,) and served.dtype == np.float32
    assert cosines(reference, served[np.newaxis]).min() >= MIN_COSINE
    files = sorted(series.glob("*.dcm"))  # a list of files works like the folder
    np.testing.assert_allclose(bundle.embed_series(files), served, atol=1e-6)


def test_runtime_matches_pytorch_on_volumes_and_texts(tiny_bundle: Path, tiny_model) -> None:
    model, settings = tiny_model
    bundle = load_bundle(tiny_bundle, threads=1)
    volumes = np.random.default_rng(3).random((3, 1, 16, 32, 32), dtype=np.float32)
    reference = embed_volume_arrays(model, volumes, 3, torch.device("cpu"))
    served = bundle.embed_volume(volumes)
    assert served.shape == (3, 32) and cosines(reference, served).min() >= MIN_COSINE
    assert cosines(reference[:1], bundle.embed_volume(volumes[0])[np.newaxis]).min() >= MIN_COSINE

    report = long_report(3 * settings.model.sampler.window_words + 5)  # 4 chunks
    texts = ["pleural effusion", "Consolidation in the LEFT lower lobe,\tno effusion.", report]
    reference = embed_reports(model, TextFeatureCache(model.text_encoder), texts, settings.model.sampler,
                              torch.device("cpu"))
    served = bundle.embed_text(texts)
    assert served.shape == (3, 32) and cosines(reference, served).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


def test_parity_failure_is_loud(tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Graphs that do not match the checkpoint's weights: exit code 1, the figures in the message, no bundle."""
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    state["model"]["image_head.weight"] = state["model"]["image_head.weight"] + torch.randn_like(
        state["model"]["image_head.weight"], generator=torch.Generator().manual_seed(0))
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)

    def copy_graph(name: str):  # reuse the graphs exported from the original weights (fast, and now wrong)
        return lambda _model, path, *_args: shutil.copy(tiny_bundle / name, path)

    monkeypatch.setattr("trainer.export.bundle_export.export_image_encoder", copy_graph(IMAGE_ENCODER_FILE))
    monkeypatch.setattr("trainer.export.bundle_export.export_text_encoder", copy_graph(TEXT_ENCODER_FILE))
    out = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(changed), "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert "parity check failed" in error and "image" in error
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["changed.pt"]


def test_require_parity_names_the_figures() -> None:
    failed = {"passed": False, "min_cosine": 0.5, "threshold_min_cosine": 0.9999, "max_abs_diff": 0.3,
              "image_encoder": {"min_cosine": 0.5}, "text_encoder": {"min_cosine": 1.0}}
    with pytest.raises(ParityError, match=r"0\.500000 < 0\.9999"):
        require_parity(failed)
