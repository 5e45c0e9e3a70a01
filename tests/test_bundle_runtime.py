"""The serving runtime: integrity, clear refusals, providers, text handling, and no torch."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bundle_helpers import clone_bundle, flip_byte
from config.settings import default_shared_data_dir
from model_export.bundle_manifest import IMAGE_ENCODER_FILE, MANIFEST_FILE, TEXT_ENCODER_FILE, TOKENIZER_FILE
from model_export.errors import BundleError, BundleInputError, BundleIntegrityError, BundleMismatchError
from model_export.runtime import CPU, ModelBundle, load_bundle, select_providers
from model_export.text_cleaning import text_cleaner

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> ModelBundle:
    return load_bundle(tiny_bundle, expected_dim=32, threads=1)


@pytest.mark.parametrize("name", [IMAGE_ENCODER_FILE, TEXT_ENCODER_FILE, TOKENIZER_FILE, MANIFEST_FILE])
def test_one_flipped_byte_is_refused_naming_the_file(tiny_bundle: Path, tmp_path: Path, name: str) -> None:
    broken = clone_bundle(tiny_bundle, tmp_path / "broken", writable=(name,))
    flip_byte(broken / name)
    with pytest.raises(BundleIntegrityError, match=name.replace(".", r"\.")) as caught:
        load_bundle(broken)
    assert caught.value.path == str(broken / name)
    result = subprocess.run([sys.executable, "-m", "model_export", "bundle", "verify", str(broken)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0 and name in result.stderr


def test_verify_accepts_an_intact_bundle_and_refuses_edits(tiny_bundle: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "model_export", "bundle", "verify", str(tiny_bundle)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert json.loads((tiny_bundle / MANIFEST_FILE).read_text())["bundle_id"] in result.stdout

    edited = clone_bundle(tiny_bundle, tmp_path / "edited", writable=(MANIFEST_FILE,))
    manifest = json.loads((edited / MANIFEST_FILE).read_text())
    manifest["embedding_dim"] = 64  # valid JSON, wrong content
    (edited / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match="manifest.json"):
        load_bundle(edited)

    extra = clone_bundle(tiny_bundle, tmp_path / "extra")
    (extra / "notes.txt").write_text("not part of the bundle")
    with pytest.raises(BundleIntegrityError, match="notes.txt"):
        load_bundle(extra)
    missing = clone_bundle(tiny_bundle, tmp_path / "missing")
    (missing / TOKENIZER_FILE).unlink()
    with pytest.raises(BundleIntegrityError, match="tokenizer.json"):
        load_bundle(missing)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_expected_dim_mismatch_is_refused(tiny_bundle: Path) -> None:
    with pytest.raises(BundleMismatchError, match=r"32 dimensions.*512-d"):
        load_bundle(tiny_bundle, expected_dim=512)


def test_wrong_volume_shape_or_dtype_is_a_clear_error(bundle: ModelBundle) -> None:
    good = np.zeros((1, 16, 32, 32), dtype=np.float32)
    assert bundle.embed_volume(good).shape == (32,)
    assert bundle.embed_volume(good[np.newaxis].repeat(2, axis=0)).shape == (2, 32)
    with pytest.raises(BundleInputError, match=r"expected \[1, 16, 32, 32\].*got \[16, 32, 32\]"):
        bundle.embed_volume(good[0])
    with pytest.raises(BundleInputError, match=r"got \[1, 1, 16, 32, 24\]"):
        bundle.embed_volume(np.zeros((1, 1, 16, 32, 24), dtype=np.float32))
    with pytest.raises(BundleInputError, match="expected float32, got float64"):
        bundle.embed_volume(good.astype(np.float64))
    with pytest.raises(BundleInputError, match="numpy.ndarray, got list"):
        bundle.embed_volume(good.tolist())
    with pytest.raises(BundleInputError, match="NaN"):
        bundle.embed_volume(np.full_like(good, np.nan))


@pytest.mark.parametrize("text", ["", "   ", " \n\t "])
def test_empty_text_is_refused(bundle: ModelBundle, text: str) -> None:
    with pytest.raises(BundleInputError, match="empty"):
        bundle.embed_text(text)


def test_text_lists_chunks_and_pooling(bundle: ModelBundle) -> None:
    with pytest.raises(BundleInputError, match=r"texts\[1\] is empty"):
        bundle.embed_text(["pleural effusion", ""])
    with pytest.raises(BundleInputError, match="empty list"):
        bundle.embed_text([])
    with pytest.raises(BundleInputError, match="expected str"):
        bundle.embed_text([3])
    single = bundle.embed_text("pleural effusion")
    batch = bundle.embed_text(["pleural effusion", "no nodule"])
    assert single.shape == (32,) and batch.shape == (2, 32)
    np.testing.assert_allclose(batch[0], single, atol=1e-6)
    # a 70-word report with 32-word windows: 3 chunks, mean-pooled and re-normalised
    words = [f"w{i % 11}" for i in range(70)]
    chunks = [" ".join(words[i : i + 32]) for i in range(0, 70, 32)]
    pooled = bundle.embed_text(chunks).mean(axis=0)
    np.testing.assert_allclose(bundle.embed_text(" ".join(words)), pooled / np.linalg.norm(pooled), atol=1e-6)


def test_providers_are_chosen_and_reported(tiny_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert select_providers()[-1] == CPU
    with pytest.raises(BundleMismatchError, match="NoSuchExecutionProvider"):
        select_providers(["NoSuchExecutionProvider"])
    with caplog.at_level(logging.INFO, logger="model_export.runtime"):
        loaded = load_bundle(tiny_bundle, providers=[CPU], threads=1)
    assert loaded.providers == {"image_encoder": [CPU], "text_encoder": [CPU]}
    assert any("providers=" in record.getMessage() and CPU in record.getMessage() for record in caplog.records)


def test_open_clip_text_cleaning_is_reproduced_without_torch() -> None:
    from open_clip.tokenizer import _clean_whitespace

    clean = text_cleaner("open_clip_whitespace_clean")
    for text in ["  Mild\temphysema &amp;amp; effusion\n", "caf\u00c3\u00a9 &lt;5 mm&gt;", "a\u00a0b  \u2013 c", ""]:
        assert clean(text) == _clean_whitespace(text)
    assert text_cleaner("none")("  x  ") == "  x  "
    with pytest.raises(BundleMismatchError, match="unknown text preprocessing"):
        text_cleaner("lowercase-everything")


def test_runtime_runs_with_torch_blocked(tiny_bundle: Path) -> None:
    series = default_shared_data_dir() / "ct" / "lung-pet-ct-dx" / "Lung_Dx-A0002_series2_B70f"
    series_check = f"assert bundle.embed_series({str(series)!r}).shape == (32,)" if series.is_dir() else ""
    script = textwrap.dedent(f"""
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, BlockTorch())
        import numpy as np
        from model_export.runtime import load_bundle

        bundle = load_bundle({str(tiny_bundle)!r}, expected_dim=32, threads=1)
        assert bundle.embed_text(["pleural effusion", "nodule " * 80]).shape == (2, 32)
        assert bundle.embed_volume(np.zeros((1, 16, 32, 32), np.float32)).shape == (32,)
        {series_check}
        assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
