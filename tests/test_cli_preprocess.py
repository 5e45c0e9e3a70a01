"""``python -m model_export preprocess``: the shared recipe from the command line, torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "model_export", "preprocess", *args],
                          capture_output=True, text=True, timeout=120)


def test_preprocess_a_real_series(lung_ct_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "input.npy"
    result = run(str(lung_ct_dir / "Lung_Dx-A0002_series2_B70f"), "--config", "tiny", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["source_shape_ijk"] == [512, 512, 30]
    array = np.load(out)
    assert array.shape == (1, 16, 32, 32) and list(array.shape) == summary["input_shape"]
    assert 0.0 <= array.min() < array.max() <= 1.0


def test_preprocess_refuses_a_bad_source_clearly(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_text("not DICOM")
    result = run(str(junk))
    assert result.returncode == 1
    assert "junk.dcm" in result.stdout
